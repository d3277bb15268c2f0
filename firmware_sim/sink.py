"""A webhook receiver for tests and demos: verifies, classifies, records and misbehaves.

Every POST (any path) is answered in this order: optional delay; auth (``--basic``,
``--bearer``, ``--api-key``) → 401; gzip body (``Content-Encoding: gzip``) → 400 when
corrupt; signature over the *uncompressed* body (``--scheme cdr-manager`` checks
``X-CDR-Signature``; ``standard-webhooks`` checks ``webhook-id``/``webhook-timestamp``/
``webhook-signature`` and a timestamp within ``--tolerance-s``) → 401; body shape
(monoz, monogoto, envelope, report, flat) → 400 only with ``--strict``; injected failure
(``--fail-rate`` with ``--status-on-fail``; 429 and 503 carry ``Retry-After``; status 0
closes the connection without an answer) → that status; else 200.

Each request becomes one JSON line in ``--record`` (and one dict in ``Sink.requests``):
``time`` (UTC ISO ms), ``method``, ``path``, ``query``, ``headers``, ``body`` (text) or
``body_b64`` (when not UTF-8), ``body_bytes``, ``wire_bytes``, ``content_encoding``,
``webhook_id``, ``duplicate`` (an earlier request with this webhook-id got a 2xx),
``auth_ok``, ``signature_ok`` (None when no secret is set), ``shape``, ``shape_error``,
``items`` (records in the body), ``status``, ``reason``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import collections
import concurrent.futures
import datetime as dt
import gzip
import hmac
import io
import json
import random
import re
import signal
import ssl
import sys
import time
import zlib
from pathlib import Path
from types import TracebackType
from typing import IO, Any

from aiohttp import web

from gateway.delivery import signing

SCHEMES = ("cdr-manager", "standard-webhooks")
MAX_BODY = 16 * 1024 * 1024
MONOZ_MAX_ITEMS = 10
MONOZ_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}\.\d{3}Z")
REPORT_TS = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}Z")
UNIQUE_ID = re.compile(r"CDR-[A-Za-z0-9]{20}")
MONOGOTO_STRINGS = (
    "CdrType",
    "UniqueID",
    "Iccid",
    "IMSI",
    "MSISDN",
    "IMEI",
    "MNO",
    "MnoName",
    "MCC",
    "MNC",
    "ThingName",
    "ThingId",
    "ThingsGroupId",
    "ThingsGroupName",
    "APN",
)
MONOGOTO_NUMBERS = ("Timestamp", "Usage")
MONOGOTO_FIELDS = frozenset(MONOGOTO_STRINGS + MONOGOTO_NUMBERS)
REPORT_FIELDS = {
    "contentType": str,
    "httpMethod": str,
    "callbackURL": str,
    "validUntil": str,
    "fileName": str,
    "fileSizeInBytes": int,
    "numberOfLines": int,
    "taskName": str,
    "taskId": int,
    "error": str,
}
ENVELOPE_KINDS = ("cdr", "packet", "event")


class ShapeError(ValueError):
    """The body is recognisably one shape but breaks its rules."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _check_monoz_object(obj: Any, where: str) -> None:
    if not isinstance(obj, dict):
        raise ShapeError(f"{where}: expected an object, got {type(obj).__name__}")
    ids = [k for k in ("ICCID", "Topic") if k in obj]
    if len(ids) != 1:
        raise ShapeError(f"{where}: needs exactly one of ICCID or Topic, got {sorted(obj)}")
    extra = set(obj) - {ids[0], "Timestamp", "Payload"}
    missing = {"Timestamp", "Payload"} - set(obj)
    if extra or missing:
        raise ShapeError(
            f"{where}: fields must be {ids[0]}, Timestamp, Payload"
            + (f"; unexpected {sorted(extra)}" if extra else "")
            + (f"; missing {sorted(missing)}" if missing else "")
        )
    ident = obj[ids[0]]
    if ids[0] == "ICCID":
        ok = (isinstance(ident, int) and not isinstance(ident, bool) and ident >= 0) or (
            isinstance(ident, str) and ident != ""
        )
        if not ok:
            raise ShapeError(f"{where}.ICCID: expected a number or text, got {ident!r}")
    elif not isinstance(ident, str):
        raise ShapeError(f"{where}.Topic: expected text, got {ident!r}")
    ts = obj["Timestamp"]
    if not (isinstance(ts, str) and MONOZ_TS.fullmatch(ts)):
        raise ShapeError(f"{where}.Timestamp: expected YYYY-MM-DDTHH:MM:SS.mmmZ, got {ts!r}")
    try:
        dt.datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ")
    except ValueError:
        raise ShapeError(f"{where}.Timestamp: not a real date/time: {ts!r}") from None


def _check_monogoto(cdr: Any, where: str) -> None:
    if not isinstance(cdr, dict):
        raise ShapeError(f"{where}: expected an object, got {type(cdr).__name__}")
    if set(cdr) != MONOGOTO_FIELDS:
        extra, missing = set(cdr) - MONOGOTO_FIELDS, MONOGOTO_FIELDS - set(cdr)
        raise ShapeError(
            f"{where}: Monogoto CDR fields differ"
            + (f"; unexpected {sorted(extra)}" if extra else "")
            + (f"; missing {sorted(missing)}" if missing else "")
        )
    for name in MONOGOTO_STRINGS:
        if not isinstance(cdr[name], str):
            raise ShapeError(f"{where}.{name}: expected text, got {cdr[name]!r}")
    for name in MONOGOTO_NUMBERS:
        if not _is_number(cdr[name]):
            raise ShapeError(f"{where}.{name}: expected a number, got {cdr[name]!r}")
    if not UNIQUE_ID.fullmatch(cdr["UniqueID"]):
        raise ShapeError(
            f"{where}.UniqueID: expected CDR- and 20 alphanumerics, got {cdr['UniqueID']!r}"
        )


def _check_report(obj: dict[str, Any]) -> None:
    if set(obj) != set(REPORT_FIELDS):
        extra, missing = set(obj) - set(REPORT_FIELDS), set(REPORT_FIELDS) - set(obj)
        raise ShapeError(
            "report notice fields differ"
            + (f"; unexpected {sorted(extra)}" if extra else "")
            + (f"; missing {sorted(missing)}" if missing else "")
        )
    for name, kind in REPORT_FIELDS.items():
        v = obj[name]
        if not isinstance(v, kind) or isinstance(v, bool):
            raise ShapeError(f"{name}: expected {kind.__name__}, got {v!r}")
    if not REPORT_TS.fullmatch(obj["validUntil"]):
        raise ShapeError(f"validUntil: expected YYYY-MM-DDTHH:MM:SSZ, got {obj['validUntil']!r}")


def _check_envelope(obj: dict[str, Any]) -> None:
    kind = next(k for k in ENVELOPE_KINDS if k in obj)
    if set(obj) != {kind, "meta", "name"}:
        raise ShapeError(f"envelope must be {{{kind}, meta, name}}, got {sorted(obj)}")
    if not isinstance(obj[kind], dict) or not isinstance(obj["meta"], dict):
        raise ShapeError(f"envelope {kind} and meta must be objects")
    if not isinstance(obj["name"], str):
        raise ShapeError(f"envelope name must be text, got {obj['name']!r}")


def _looks_monoz(obj: Any) -> bool:
    # Exactly one id field: a flat packet record carries both ICCID and Topic.
    return isinstance(obj, dict) and "Payload" in obj and ("ICCID" in obj) != ("Topic" in obj)


def detect_shape(value: Any) -> tuple[str, str | None, int]:
    """(shape, shape_error or None, item count) of a decoded JSON body."""
    if isinstance(value, list):
        if not value:
            return "array", "empty array", 0
        if isinstance(value[0], dict) and "CdrType" in value[0]:
            shape = "monogoto"
        elif _looks_monoz(value[0]):
            shape = "monoz"
        else:
            return "array", "array of unrecognised records", len(value)
        if shape == "monoz" and len(value) > MONOZ_MAX_ITEMS:
            return shape, f"monoZ array holds {len(value)} packets, at most 10", len(value)
        try:
            for n, item in enumerate(value):
                if shape == "monoz":
                    _check_monoz_object(item, f"[{n}]")
                else:
                    _check_monogoto(item, f"[{n}]")
        except ShapeError as exc:
            return shape, str(exc), len(value)
        return shape, None, len(value)
    if not isinstance(value, dict):
        return "scalar", f"top level is {type(value).__name__}, not an object or array", 0
    try:
        if _looks_monoz(value):
            shape = "monoz"
            _check_monoz_object(value, "body")
        elif "meta" in value and any(k in value for k in ENVELOPE_KINDS):
            shape = "envelope"
            _check_envelope(value)
        elif "callbackURL" in value or "validUntil" in value:
            shape = "report"
            _check_report(value)
        else:
            shape = "flat"
    except ShapeError as exc:
        return shape, str(exc), 1
    return shape, None, 1


def _iso_now() -> str:
    now = time.time_ns()
    secs, rem = divmod(now, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{rem // 1_000_000:03d}Z"


class Sink:
    """An aiohttp webhook receiver on host:port (0 picks a free port); see module doc."""

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        secret: str | None = None,
        scheme: str = "cdr-manager",
        tolerance_s: float = 300.0,
        basic: str | None = None,
        bearer: str | None = None,
        api_key: str | None = None,
        api_key_header: str = "x-api-key",
        fail_rate: float = 0.0,
        fail_status: int = 500,
        retry_after: int = 1,
        delay_ms: float = 0.0,
        strict: bool = False,
        seed: int | None = None,
        record: Path | str | None = None,
        quiet: bool = True,
        ssl_context: ssl.SSLContext | None = None,
        keep: int | None = None,
    ) -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
        if not 0.0 <= fail_rate <= 1.0:
            raise ValueError(f"fail rate must be 0..1, got {fail_rate}")
        if fail_status != 0 and not 100 <= fail_status <= 599:
            raise ValueError(f"status on fail must be 0 (hang up) or 100-599, got {fail_status}")
        if basic is not None and ":" not in basic:
            raise ValueError("basic auth must be user:pass")
        self.host = host
        self.port = port
        self.secret = secret
        self.scheme = scheme
        self.tolerance_s = tolerance_s
        self.basic = basic
        self.bearer = bearer
        self.api_key = api_key
        self.api_key_header = api_key_header
        # Runtime knobs: tests and the demo flip these while the sink runs.
        self.fail_rate = fail_rate
        self.fail_status = fail_status
        self.fail_next = 0
        self.retry_after = retry_after
        self.delay_ms = delay_ms
        self.strict = strict
        self.quiet = quiet
        self.record_path = Path(record) if record is not None else None
        self.ssl_context = ssl_context
        self.requests: list[dict[str, Any]] = []
        self.keep = keep  # how many records .requests holds (None: all), for long demos
        self.counters: collections.Counter[str] = collections.Counter()
        self._rng = random.Random(seed)
        self._ok_ids: set[str] = set()
        self._runner: web.ServerRunner | None = None
        self._record_file: IO[str] | None = None
        self._writer: concurrent.futures.ThreadPoolExecutor | None = None

    @property
    def url(self) -> str:
        """Base URL of the running sink (append any path)."""
        scheme = "https" if self.ssl_context else "http"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        """Bind and serve; afterwards .port is the real port."""
        if self._runner is not None:
            return
        if self.record_path is not None:
            self._writer = concurrent.futures.ThreadPoolExecutor(1, "sink-record")
            loop = asyncio.get_running_loop()
            try:
                self._record_file = await loop.run_in_executor(
                    self._writer, self._open_record, self.record_path
                )
            except OSError as exc:
                await self._close_record()
                raise OSError(f"cannot open record file {self.record_path}: {exc}") from exc
        # auto_decompress off: the sink decodes gzip itself, to record the wire size and
        # to answer a corrupt body with a clear 400.
        server = web.Server(self._handle, auto_decompress=False, handler_cancellation=True)
        runner = web.ServerRunner(server, shutdown_timeout=1.0, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, self.host, self.port, ssl_context=self.ssl_context)
        try:
            await site.start()
        except OSError as exc:
            await runner.cleanup()
            await self._close_record()
            raise OSError(f"cannot listen on {self.host}:{self.port}: {exc}") from exc
        self.port = site.port
        self._runner = runner

    async def stop(self) -> None:
        """Stop serving and close the record file; safe to call twice."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        await self._close_record()

    async def __aenter__(self) -> Sink:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def accepted(self) -> list[dict[str, Any]]:
        """Recorded requests answered with a 2xx."""
        return [r for r in self.requests if 200 <= r["status"] < 300]

    def json_bodies(self) -> list[Any]:
        """Parsed JSON bodies of the accepted requests, in arrival order."""
        return [json.loads(r["body"]) for r in self.accepted() if "body" in r]

    @staticmethod
    def _open_record(path: Path) -> IO[str]:
        path.parent.mkdir(parents=True, exist_ok=True)
        return path.open("a", encoding="utf-8")

    async def _close_record(self) -> None:
        f, self._record_file = self._record_file, None
        writer, self._writer = self._writer, None
        if writer is not None:
            if f is not None:
                await asyncio.get_running_loop().run_in_executor(writer, f.close)
            writer.shutdown(wait=False)  # idle by now: its last job was the close

    def _write_line(self, line: str) -> None:
        f = self._record_file  # stop() may clear it meanwhile; the close queues behind us
        if f is not None:
            f.write(line + "\n")
            # Flushed per line so a tail -f or a test reading the file sees it at once.
            f.flush()

    def _auth_ok(self, request: web.BaseRequest) -> bool:
        got = request.headers.get("Authorization", "")
        if self.basic is not None:
            want = "Basic " + base64.b64encode(self.basic.encode()).decode()
            if not hmac.compare_digest(got.encode(), want.encode()):
                return False
        if self.bearer is not None and not hmac.compare_digest(
            got.encode(), f"Bearer {self.bearer}".encode()
        ):
            return False
        if self.api_key is not None:
            key = request.headers.get(self.api_key_header, "")
            if not hmac.compare_digest(key.encode(), self.api_key.encode()):
                return False
        return True

    def _signature(self, request: web.BaseRequest, body: bytes) -> tuple[bool | None, str]:
        """(signature_ok, reason); None when no secret is configured."""
        if self.secret is None:
            return None, ""
        h = request.headers
        if self.scheme == "cdr-manager":
            got = h.get("X-CDR-Signature")
            if got is None:
                return False, "missing X-CDR-Signature"
            if hmac.compare_digest(got.encode(), signing.cdr_manager(self.secret, body).encode()):
                return True, ""
            return False, "X-CDR-Signature does not match"
        msg_id, ts_text, sig = (
            h.get("webhook-id"),
            h.get("webhook-timestamp"),
            h.get("webhook-signature"),
        )
        if not (msg_id and ts_text and sig):
            return False, "missing webhook-id, webhook-timestamp or webhook-signature"
        try:
            ts = int(ts_text)
        except ValueError:
            return False, f"webhook-timestamp is not an integer: {ts_text!r}"
        if self.tolerance_s and abs(time.time() - ts) > self.tolerance_s:
            return False, f"webhook-timestamp {ts} is more than {self.tolerance_s:g} s off"
        try:
            ok = signing.verify_standard_webhooks(self.secret, msg_id, ts, body, sig)
        except (ValueError, IndexError):
            ok = False
        return ok, "" if ok else "webhook-signature does not match"

    async def _read(self, request: web.BaseRequest) -> bytes:
        chunks: list[bytes] = []
        size = 0
        async for chunk in request.content.iter_chunked(65536):
            size += len(chunk)
            if size > MAX_BODY:
                raise web.HTTPRequestEntityTooLarge(max_size=MAX_BODY, actual_size=size)
            chunks.append(chunk)
        return b"".join(chunks)

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        if self.delay_ms > 0:
            await asyncio.sleep(self.delay_ms / 1000)
        rec: dict[str, Any] = {
            "time": _iso_now(),
            "method": request.method,
            "path": request.path,
            "query": request.query_string,
            "headers": dict(request.headers.items()),
            "webhook_id": request.headers.get("webhook-id"),
            "duplicate": False,
            "auth_ok": None,
            "signature_ok": None,
            "shape": "",
            "shape_error": None,
            "items": 0,
        }
        try:
            wire = await self._read(request)
        except web.HTTPRequestEntityTooLarge:
            return await self._finish(rec, 413, f"body larger than {MAX_BODY} bytes")
        rec["wire_bytes"] = len(wire)
        encoding = request.headers.get("Content-Encoding", "").strip().lower()
        rec["content_encoding"] = encoding
        body = wire
        if encoding == "gzip":
            try:
                body = await asyncio.to_thread(_gunzip, wire)
            except (OSError, EOFError, zlib.error, ValueError) as exc:
                rec["body_b64"] = base64.b64encode(wire).decode()
                return await self._finish(rec, 400, f"bad gzip body: {exc}")
        elif encoding not in ("", "identity"):
            rec["body_b64"] = base64.b64encode(wire).decode()
            return await self._finish(rec, 415, f"unsupported Content-Encoding {encoding!r}")
        rec["body_bytes"] = len(body)
        try:
            rec["body"] = body.decode("utf-8")
        except UnicodeDecodeError:
            rec["body_b64"] = base64.b64encode(body).decode()
        rec["duplicate"] = rec["webhook_id"] in self._ok_ids
        rec["auth_ok"] = self._auth_ok(request)
        rec["signature_ok"], sig_reason = self._signature(request, body)
        rec["shape"], rec["shape_error"], rec["items"] = _classify(body)
        if not rec["auth_ok"]:
            return await self._finish(rec, 401, "bad or missing credentials")
        if rec["signature_ok"] is False:
            return await self._finish(rec, 401, sig_reason)
        if rec["shape_error"] and self.strict:
            return await self._finish(rec, 400, f"{rec['shape']}: {rec['shape_error']}")
        if self.fail_next > 0 or (self.fail_rate and self._rng.random() < self.fail_rate):
            self.fail_next = max(0, self.fail_next - 1)
            if self.fail_status == 0:
                return await self._hang_up(request, rec)
            return await self._finish(rec, self.fail_status, "injected failure")
        return await self._finish(rec, 200, "ok")

    async def _hang_up(self, request: web.BaseRequest, rec: dict[str, Any]) -> web.StreamResponse:
        """Close the connection without an answer: the client sees a connection error."""
        await self._finish(rec, 0, "injected: connection closed without a response")
        if request.transport is not None:
            request.transport.abort()
        # aiohttp finds the transport closed and does not write this.
        return web.Response(status=500)

    async def _finish(self, rec: dict[str, Any], status: int, reason: str) -> web.Response:
        rec["status"] = status
        rec["reason"] = reason
        self.requests.append(rec)
        if self.keep is not None and len(self.requests) > self.keep:
            del self.requests[: len(self.requests) - self.keep]
        self.counters["requests"] += 1
        self.counters[_counter_name(status)] += 1
        if rec["shape_error"]:
            self.counters["shape_errors"] += 1
        if rec["duplicate"]:
            self.counters["duplicates"] += 1
        if 200 <= status < 300 and rec["webhook_id"]:
            self._ok_ids.add(rec["webhook_id"])
        if self._record_file is not None and self._writer is not None:
            # One writer thread keeps lines in arrival order and file I/O off the loop; the
            # line is on disk before the client gets its answer.
            line = json.dumps(rec, ensure_ascii=False)
            await asyncio.get_running_loop().run_in_executor(self._writer, self._write_line, line)
        if not self.quiet:
            print(_summary_line(rec), flush=True)
        headers = {"Retry-After": str(self.retry_after)} if status in (429, 503) else {}
        return web.json_response(
            {"status": status, "reason": reason}, status=status or 500, headers=headers
        )


def _summary_line(rec: dict[str, Any]) -> str:
    sig = {True: "ok", False: "BAD", None: "-"}[rec["signature_ok"]]
    shape = rec["shape"] or "-"
    if rec["items"] > 1:
        shape += f"[{rec['items']}]"
    err = f" shape_error={rec['shape_error']!r}" if rec["shape_error"] else ""
    dup = " duplicate" if rec["duplicate"] else ""
    return (
        f"{rec['time']} {rec['method']} {rec['path']} {rec['status']} {shape} sig={sig} "
        f"{rec.get('body_bytes', 0)}B id={rec['webhook_id'] or '-'}{dup}{err}"
    )


def _gunzip(data: bytes) -> bytes:
    # Read at most one byte past the cap so a gzip bomb stops early.
    with gzip.GzipFile(fileobj=io.BytesIO(data)) as f:
        out = f.read(MAX_BODY + 1)
    if len(out) > MAX_BODY:
        raise ValueError(f"decompresses to more than {MAX_BODY} bytes")
    return out


def _classify(body: bytes) -> tuple[str, str | None, int]:
    if not body.strip():
        return "empty", "empty body", 0
    try:
        value = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        return "non-json", f"body is not JSON: {exc}", 0
    return detect_shape(value)


def _counter_name(status: int) -> str:
    if 200 <= status < 300:
        return "ok"
    if status == 401:
        return "unauthorized"
    if status == 0:
        return "closed"
    return f"http_{status}"


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m firmware_sim sink",
        description="Webhook receiver: verifies signatures, detects body shapes, records.",
    )
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--secret", default=None, help="signing secret (whsec_… for standard-webhooks)")
    p.add_argument("--scheme", choices=SCHEMES, default="cdr-manager")
    p.add_argument("--tolerance-s", type=float, default=300.0, help="standard-webhooks; 0 = off")
    p.add_argument("--basic", default=None, metavar="USER:PASS")
    p.add_argument("--bearer", default=None, metavar="TOKEN")
    p.add_argument("--api-key", default=None)
    p.add_argument("--api-key-header", default="x-api-key")
    p.add_argument("--fail-rate", type=float, default=0.0, help="0..1")
    p.add_argument("--status-on-fail", type=int, default=500, help="0 = close the connection")
    p.add_argument("--retry-after", type=int, default=1, help="seconds, sent with 429/503")
    p.add_argument("--delay-ms", type=float, default=0.0)
    p.add_argument("--strict", action="store_true", help="answer 400 to a shape error")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--record", type=Path, default=None, metavar="FILE", help="JSONL file")
    p.add_argument("--quiet", action="store_true")
    return p.parse_args(argv)


async def _serve(sink: Sink) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for s in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(s, stop.set)
    async with sink:
        print(f"sink: listening on {sink.url}", file=sys.stderr, flush=True)
        await stop.wait()
    c = sink.counters
    print(
        f"sink: requests={c['requests']} ok={c['ok']} unauthorized={c['unauthorized']} "
        f"duplicates={c['duplicates']} shape_errors={c['shape_errors']}",
        file=sys.stderr,
    )


def main(argv: list[str]) -> int:
    """CLI entry: python -m firmware_sim sink …"""
    args = _args(argv)
    try:
        sink = Sink(
            args.host,
            args.port,
            secret=args.secret,
            scheme=args.scheme,
            tolerance_s=args.tolerance_s,
            basic=args.basic,
            bearer=args.bearer,
            api_key=args.api_key,
            api_key_header=args.api_key_header,
            fail_rate=args.fail_rate,
            fail_status=args.status_on_fail,
            retry_after=args.retry_after,
            delay_ms=args.delay_ms,
            strict=args.strict,
            seed=args.seed,
            record=args.record,
            quiet=args.quiet,
            keep=1000,
        )
        asyncio.run(_serve(sink))
    except ValueError as exc:
        print(f"sink: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"sink: {exc}", file=sys.stderr)
        return 2
    return 0

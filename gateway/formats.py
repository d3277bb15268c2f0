"""Pure encoders for the wire formats: monoz, monogoto, envelope, flat, report.

Nothing here does I/O; every function maps records to the exact bytes that are POSTed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import fractions
import functools
import io
import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import orjson

from gateway.store import PacketRow

CONTENT_TYPE = "application/json; charset=utf-8"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INT64 = 2**63 - 1


@dataclass(frozen=True, slots=True)
class PayloadOptions:
    encoding: str = "auto"
    id_field: str = "ICCID"
    iccid_as: str = "auto"


@functools.lru_cache(maxsize=256)
def _iso_seconds(secs: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def iso_ms(ns: int) -> str:
    """UTC ISO 8601 with milliseconds and Z: 2023-10-16T09:17:32.123Z."""
    secs, rem = divmod(ns, 1_000_000_000)
    # Records of one batch mostly share their second: format it once.
    return f"{_iso_seconds(secs)}.{rem // 1_000_000:03d}Z"


class DecodeFailed(ValueError):
    """The payload is not valid in the configured encoding."""


def cbor_to_json(value: Any) -> Any:
    """Map a decoded CBOR value to JSON, as the README documents.

    bytes → base64 text; datetime/date → ISO 8601 text; a tag without a native type →
    {"tag": n, "value": v}; undefined → null; simple values → their number; NaN and
    infinities → null; integers beyond 64 bits → decimal text; map keys → text.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        return value if -_INT64 - 1 <= value <= _INT64 else str(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if isinstance(value, Mapping):
        return {_json_key(k): cbor_to_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [cbor_to_json(v) for v in value]
    if isinstance(value, set | frozenset):
        return [cbor_to_json(v) for v in sorted(value, key=repr)]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | fractions.Fraction):
        f = float(value)
        return f if math.isfinite(f) else None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, cbor2.CBORTag):
        return {"tag": value.tag, "value": cbor_to_json(value.value)}
    if isinstance(value, cbor2.CBORSimpleValue):
        return int(value.value)
    if value is cbor2.undefined:
        return None
    return str(value)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray):
        return base64.b64encode(bytes(key)).decode()
    if isinstance(key, bool):
        return "true" if key else "false"
    return str(cbor_to_json(key)) if not isinstance(key, int | float) else str(key)


def decode_cbor(payload: bytes) -> Any:
    """Decode exactly one CBOR item; trailing bytes or any decoder error → DecodeFailed."""
    stream = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises many types on hostile input
        raise DecodeFailed(f"not valid CBOR: {exc}") from exc
    if stream.tell() != len(payload):
        raise DecodeFailed("not valid CBOR: trailing bytes after the first item")
    return cbor_to_json(value)


def encode_payload(payload: bytes, encoding: str) -> tuple[Any, bool]:
    """The Payload value for `encoding`, and whether decoding failed (then base64)."""
    if encoding == "base64":
        return base64.b64encode(payload).decode(), False
    if encoding == "hex":
        return binascii.hexlify(payload).decode(), False
    if encoding == "cbor-json":
        try:
            return decode_cbor(payload), False
        except DecodeFailed:
            return base64.b64encode(payload).decode(), True
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode(), encoding == "utf8"
    # A packed binary struct of small numbers is valid UTF-8 too; "auto" only calls it
    # text when it has no control characters besides tab, CR and LF.
    if encoding == "auto" and not text.isprintable() and _CONTROL.search(text):
        return base64.b64encode(payload).decode(), False
    return text, False


def decoded_payload(payload: bytes, encoding: str) -> Any:
    """The payload as a structured value for `when` conditions (JSON or CBOR), else None."""
    if encoding == "cbor-json":
        try:
            return decode_cbor(payload)
        except DecodeFailed:
            return None
    if payload[:1] in (b"{", b"["):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:
            return None
    return None


def iccid_json(iccid: str, iccid_as: str) -> bytes:
    """ICCID as a JSON number when it is all digits (as monoZ:Link sends it), else text."""
    if iccid_as != "string" and iccid.isdigit() and not (len(iccid) > 1 and iccid[0] == "0"):
        return iccid.encode()
    return orjson.dumps(iccid)


def monoz_object(row: PacketRow, opts: PayloadOptions) -> tuple[bytes, bool]:
    """One monoZ:Link object as JSON bytes, and whether its payload failed to decode."""
    payload, failed = encode_payload(row.payload, opts.encoding)
    if opts.id_field == "Topic":
        head = b'{"Topic":' + orjson.dumps(row.topic)
    else:
        head = b'{"ICCID":' + iccid_json(row.iccid, opts.iccid_as)
    return (
        head
        + b',"Timestamp":"'
        + iso_ms(row.recv_ns).encode()
        + b'","Payload":'
        + orjson.dumps(payload)
        + b"}",
        failed,
    )


def monoz(rows: Sequence[PacketRow], opts: PayloadOptions, *, single: bool) -> tuple[bytes, int]:
    """A monoZ:Link body: one object when `single`, else an array; and decode failures."""
    parts = [monoz_object(r, opts) for r in rows]
    failed = sum(f for _, f in parts)
    if single and len(parts) == 1:
        return parts[0][0], failed
    return b"[" + b",".join(p for p, _ in parts) + b"]", failed


def packet_record(row: PacketRow, opts: PayloadOptions) -> tuple[dict[str, Any], bool]:
    """A packet as a plain record for envelope and flat formats."""
    payload, failed = encode_payload(row.payload, opts.encoding)
    rec: dict[str, Any] = {"Topic": row.topic, "Timestamp": iso_ms(row.recv_ns), "Payload": payload}
    if row.iccid:
        as_number = not iccid_json(row.iccid, opts.iccid_as).startswith(b'"')
        # orjson (and many receivers) stop at 64 bits; a 20-digit ICCID stays text here.
        rec["ICCID"] = int(row.iccid) if as_number and int(row.iccid) <= _INT64 else row.iccid
    return rec, failed


def envelope(record: Mapping[str, Any], meta: Mapping[str, Any], name: str, kind: str) -> bytes:
    """{"cdr"|"packet"|"event": record, "meta": meta, "name": webhook name}."""
    return orjson.dumps({kind: dict(record), "meta": dict(meta), "name": name})


def flat(record: Mapping[str, Any]) -> bytes:
    """The record's fields at the top level."""
    return orjson.dumps(dict(record))


def monogoto(cdrs: Iterable[Mapping[str, Any]]) -> bytes:
    """A JSON array of Monogoto DATA CDRs."""
    return orjson.dumps([dict(c) for c in cdrs])


def report_notice(fields: Mapping[str, Any]) -> bytes:
    """The CDR Manager report notice object."""
    return orjson.dumps(dict(fields))

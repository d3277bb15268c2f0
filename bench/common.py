"""Parts bench/live.py and bench/footprint.py share: paced publisher processes, a
receiver that timestamps records and counts wire bytes, percentiles."""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing as mp
import queue
import select
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
from aiohttp import web
from drain import ROOT, free_port, gateway_config, register_sessions

# Publisher, sequence number, publish time (ns) and some sensor fields: 70-odd bytes,
# about drain.py's PAYLOAD.
PAYLOAD = b'{"p":%d,"s":%d,"t":%d,"temp":21.5,"hum":40,"bat":97}'


class _PahoPublisher:
    """paho-mqtt's client as a publisher (`--publisher paho`): about 190 µs of CPU per
    packet."""

    def __init__(self, port: int, client_id: str) -> None:
        self.acked = 0
        self.c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5
        )
        self.c.max_inflight_messages_set(1000)
        self.c.max_queued_messages_set(0)
        self.c.on_publish = self._on_publish
        self.c.connect("127.0.0.1", port)
        self.c.loop_start()
        self.room = 1 << 30  # paho queues what its inflight window cannot take

    def _on_publish(self, *_a: object) -> None:
        self.acked += 1

    def publish_many(self, topic: str, payloads: list[bytes]) -> None:
        for payload in payloads:
            self.c.publish(topic, payload, qos=1)

    def poll(self, timeout: float) -> None:
        time.sleep(max(0.0, timeout))

    def close(self) -> None:
        self.c.disconnect()
        self.c.loop_stop()


def _varint(n: int) -> bytes:
    """MQTT's Variable Byte Integer."""
    out = bytearray()
    while True:
        n, b = n >> 7, n & 0x7F
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _unvarint(buf: bytes, i: int) -> tuple[int, int] | None:
    """The Variable Byte Integer at buf[i:]: (value, index after it), or None if buf ends
    before it does."""
    n = shift = 0
    while i < len(buf):
        b = buf[i]
        n |= (b & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not b & 0x80:
            return n, i
    return None


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _utf8(s: str) -> bytes:
    return len(s.encode()).to_bytes(2, "big") + s.encode()


class _RawMqtt:
    """The least an MQTT 5 QoS 1 publisher needs, on a plain socket: CONNECT, PUBLISH,
    and counting PUBACKs. A load generator only: paho costs a publisher about 190 µs of
    CPU per packet, so at 5,000/s paho publishers took nearly one of the bench's two
    cores from the gateway they are meant to load."""

    def __init__(self, port: int, client_id: str) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # protocol name, level 5, clean start, keep alive 60 s, no properties
        var = _utf8("MQTT") + bytes([5, 0x02]) + (60).to_bytes(2, "big") + b"\x00"
        self.sock.sendall(_packet(0x10, var + _utf8(client_id)))
        self.buf = b""
        self.receive_max = 65535
        first, body = self._read_packet()
        if first >> 4 != 2 or body[1] != 0:
            raise SystemExit(f"CONNACK refused: {body!r}")
        self._connack_props(body[2:])
        self.sock.setblocking(False)
        self.mid = 0
        self.inflight: set[int] = set()
        self.acked = 0

    def _connack_props(self, props: bytes) -> None:
        # properties length, then (id, value) pairs; only Receive Maximum (0x21) matters
        n, i = _unvarint(props, 0) or (0, len(props))
        end = i + n
        while i < end:
            pid = props[i]
            i += 1
            if pid == 0x21:
                self.receive_max = int.from_bytes(props[i : i + 2], "big")
                return
            if pid in (0x24, 0x25, 0x28, 0x29, 0x2A):  # one byte
                i += 1
            elif pid in (0x13, 0x22):  # two bytes
                i += 2
            elif pid in (0x11, 0x27):  # four bytes
                i += 4
            else:  # a string or string pair: the rest does not matter here
                return

    def _read_packet(self) -> tuple[int, bytes]:
        while True:
            got = self._split()
            if got is not None:
                return got
            chunk = self.sock.recv(65536)
            if not chunk:
                raise SystemExit("broker closed the connection")
            self.buf += chunk

    def _split(self) -> tuple[int, bytes] | None:
        buf = self.buf
        length = _unvarint(buf, 1)  # the remaining length, after the type byte
        if length is None:
            return None
        n, i = length
        if len(buf) < i + n:
            return None
        self.buf = buf[i + n :]
        return buf[0], buf[i : i + n]

    @property
    def room(self) -> int:
        """How many more may go before a PUBACK (the broker's Receive Maximum, or 1000)."""
        return min(1000, self.receive_max) - len(self.inflight)

    def publish_many(self, topic: str, payloads: list[bytes]) -> None:
        out = []
        name = _utf8(topic)
        for payload in payloads:
            self.mid = self.mid % 65535 + 1
            self.inflight.add(self.mid)
            # topic, packet id, no properties, payload
            out.append(_packet(0x32, name + self.mid.to_bytes(2, "big") + b"\x00" + payload))
        self.sock.setblocking(True)
        self.sock.sendall(b"".join(out))
        self.sock.setblocking(False)

    def poll(self, timeout: float) -> None:
        """Take the PUBACKs that arrive within timeout."""
        r, _, _ = select.select([self.sock], [], [], max(0.0, timeout))
        if not r:
            return
        chunk = self.sock.recv(262144)
        if not chunk:
            raise SystemExit("broker closed the connection")
        self.buf += chunk
        while (got := self._split()) is not None:
            first, body = got
            if first >> 4 == 4:  # PUBACK: packet id, then an optional reason code
                if len(body) > 2 and body[2] >= 0x80:
                    raise SystemExit(f"PUBACK with reason code {body[2]:#x}")
                mid = int.from_bytes(body[:2], "big")
                if mid in self.inflight:
                    self.inflight.discard(mid)
                    self.acked += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.setblocking(True)
            self.sock.sendall(b"\xe0\x00")  # DISCONNECT
        self.sock.close()


def _publisher(
    kind: str, port: int, idx: int, rate: float, seconds: float, go: Any, out: Any
) -> None:  # pragma: no cover - runs in a child process
    """Publish rate * seconds packets, paced to `rate`; report to the parent."""
    c = PUBLISHERS[kind](port, f"live-pub-{idx}")
    out.put(("ready", idx))
    go.wait(60)
    cpu0 = time.process_time()
    total = int(rate * seconds)
    topic = f"devices/89811000000000{idx:02d}000/up"
    sent = 0
    lag_max = 0.0
    t0 = time.monotonic()
    while sent < total:
        target = min(total, int((time.monotonic() - t0) * rate) + 1)
        lag_max = max(lag_max, (target - sent - 1) / rate)
        due = min(target, sent + c.room)
        if due > sent:
            c.publish_many(topic, [PAYLOAD % (idx, i, time.time_ns()) for i in range(sent, due)])
            sent = due
        # until the next packet is due, or (with the broker's Receive Maximum reached) a PUBACK
        c.poll(0.01 if due < target else t0 + sent / rate - time.monotonic())
    publish_s = time.monotonic() - t0
    deadline = time.monotonic() + 60
    while c.acked < sent and time.monotonic() < deadline:
        c.poll(0.01)
    acked = c.acked
    c.close()
    out.put(
        (
            "done",
            {
                "idx": idx,
                "sent": sent,
                "acked": acked,
                "publish_s": publish_s,
                "lag_max_ms": lag_max * 1000,
                "cpu_s": time.process_time() - cpu0,
            },
        )
    )


PUBLISHERS: dict[str, Any] = {"raw": _RawMqtt, "paho": _PahoPublisher}


class Publishers:
    """`n` publisher processes, each paced to rate/n packets/s, started together."""

    def __init__(self, port: int, rate: float, seconds: float, n: int, kind: str = "raw") -> None:
        ctx = mp.get_context("spawn")
        self.out: Any = ctx.Queue()
        go = ctx.Event()
        self.procs = [
            ctx.Process(target=_publisher, args=(kind, port, i, rate / n, seconds, go, self.out))
            for i in range(n)
        ]
        for p in self.procs:
            p.start()
        for _ in range(n):
            kind, _idx = self.out.get(timeout=60)
            assert kind == "ready"
        self._results: list[dict[str, Any]] = []
        self.deadline = time.monotonic() + seconds + 120
        go.set()

    def done(self) -> bool:
        """Whether every publisher has finished (all its packets acknowledged, or 60 s)."""
        try:
            while True:
                _kind, result = self.out.get_nowait()
                self._results.append(result)
        except queue.Empty:
            pass
        if time.monotonic() > self.deadline:
            raise SystemExit("publishers did not finish")
        return len(self._results) == len(self.procs)

    def results(self) -> list[dict[str, Any]]:
        for p in self.procs:
            p.join(10)
        return self._results


def start_publishers(
    port: int, rate: float, seconds: float, n: int, kind: str = "raw"
) -> Publishers:
    return Publishers(port, rate, seconds, n, kind)


def gateway_toml(
    path: Path,
    port: int,
    state: Path,
    client_id: str,
    hook: str,
    web: bool = False,
    processes: int = 1,
) -> Path:
    """drain.py's gateway config; with `web`, the dashboard on a free loopback port."""
    gateway_config(path, port, state, client_id, hook, processes)
    if web:
        listen = f'listen = "127.0.0.1:{free_port()}"'
        path.write_text(path.read_text().replace("[web]\nenabled = false", f"[web]\n{listen}"))
    return path


def sink_hook(port: int, batch: str, extra: str = "") -> str:
    """A [[webhooks]] table for a receiver on this host."""
    return f'[[webhooks]]\nname = "sink"\nurl = "http://127.0.0.1:{port}/in"\n{batch}\n{extra}\n'


def start_gateway(
    cfg: Path, port: int, client_id: str, log: Path, register: bool = True, processes: int = 1
) -> subprocess.Popen[bytes]:
    """`gateway run`, once it says it is connected (each of its `processes` sessions).
    With `register`, its sessions and subscriptions are made first, so that nothing
    published after this is missed; without, the caller has made them (a client that
    registers takes what is queued)."""
    if register:
        register_sessions(port, client_id, processes)
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "gateway", "run", "-c", str(cfg)],
            stdout=out,
            stderr=out,
            cwd=ROOT,
        )
    deadline = time.monotonic() + 20
    while log.read_text(errors="replace").count("connected to") < processes:
        if time.monotonic() > deadline or proc.poll() is not None:
            proc.kill()
            raise SystemExit(f"gateway did not connect: {log.read_text()[-2000:]}")
        time.sleep(0.05)
    return proc


class LatencySink:
    """aiohttp receiver in a thread: for every monoZ record, the latency from its
    publisher's clock to now; counts requests and bytes on the wire."""

    def __init__(self, trace: bool = False) -> None:
        self.latencies_ns: list[int] = []
        # With `trace`: (publisher's clock, the record's Timestamp, arrival) per packet.
        self.trace: list[tuple[int, str, int]] | None = [] if trace else None
        self.seen: set[tuple[int, int]] = set()
        self.duplicates = 0
        self.records = 0
        self.requests = 0
        self.body_bytes = 0  # as sent (compressed with gzip = true)
        self.header_bytes = 0  # request line and headers, as HTTP/1.1 puts them
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        self._runner: web.AppRunner | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._serve, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise SystemExit("sink did not start")

    async def _handle(self, req: web.Request) -> web.Response:
        body = await req.read()
        now = time.time_ns()
        self.requests += 1
        self.body_bytes += int(req.headers.get("Content-Length", len(body)))
        self.header_bytes += len(f"POST {req.path_qs} HTTP/1.1\r\n\r\n") + sum(
            len(k) + len(v) + 4 for k, v in req.raw_headers
        )
        recs = orjson.loads(body)
        for rec in recs if isinstance(recs, list) else [recs]:
            self.records += 1
            try:
                p = orjson.loads(rec["Payload"])
                key = (p["p"], p["s"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                continue  # not one of ours (a simulated device's reading): counted only
            if key in self.seen:
                self.duplicates += 1
                continue
            self.seen.add(key)
            self.latencies_ns.append(now - p["t"])
            if self.trace is not None:
                self.trace.append((p["t"], rec.get("Timestamp", ""), now))
        return web.Response(text="ok")

    def _serve(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/{t:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self._runner.setup())
        self.loop.run_until_complete(web.TCPSite(self._runner, "127.0.0.1", self.port).start())
        ready.set()
        self.loop.run_forever()
        self.loop.run_until_complete(self._runner.cleanup())
        self.loop.close()

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)


def percentiles(latencies_ns: list[int]) -> dict[str, float]:
    """p50, p99 and max in ms (nan when empty)."""
    if not latencies_ns:
        return {"p50_ms": float("nan"), "p99_ms": float("nan"), "max_ms": float("nan")}
    s = sorted(latencies_ns)

    def at(q: float) -> float:
        return s[min(len(s) - 1, int(q * len(s)))] / 1e6

    return {"p50_ms": at(0.50), "p99_ms": at(0.99), "max_ms": s[-1] / 1e6}

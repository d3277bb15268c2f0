"""Backlog drain: N packets preloaded into a stopped consumer's session, then drained.

    .venv/bin/python bench/drain.py [--n 200000] [--profiles ingest,bulk,bulk-x2,monoz]
                                    [--payload-bytes 71]

Every consumer gets the same backlog on its own persistent session, on one mosquitto
started here on a free loopback port. Baselines in the same run:
  mosquitto_sub  `mosquitto_sub -c -q 1 -C N` (the broker's ceiling)
  bare paho      paho MQTT 5, manual ack, acks sent in groups of 500, stores nothing
Gateway rows:
  ingest         gateway with no webhook: packets/s committed to SQLite and acknowledged
  bulk / monoz   gateway delivering to a local aiohttp sink (50 ms/500 and 1 s/10)
  bulk-x2        bulk with mqtt.ingest_processes = 2 (sessions in one shared group):
                 CPU and peak RSS are those of the gateway and its ingest processes
Disk bytes per packet (/proc/<pid>/io write_bytes until the receiver has every record)
take in most of a packet's life here: its row written (WAL, then checkpoint), its batch,
and its row deleted once delivered; not the checkpoint at the gateway's stop. Also per
payload byte. --payload-bytes pads the JSON payload to that size (drain.sized_payload).
Prints a table and one JSON line. Only loopback; every wait is bounded.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import resource
import shutil
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from aiohttp import web
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.store import counters

ROOT = Path(__file__).resolve().parent.parent
TOPIC = "devices/{}/up"
PAYLOAD = b'{"temp":21.5,"hum":40,"bat":97,"lat":35.6812,"lon":139.7671,"n":123456}'


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_broker(
    workdir: Path, max_inflight: int | None = 0
) -> tuple[subprocess.Popen[bytes], int]:
    """mosquitto on a free loopback port, in memory, queues unbounded; `max_inflight`
    None leaves its max_inflight_messages at mosquitto's default."""
    port = free_port()
    conf = workdir / "mosquitto.conf"
    inflight = "" if max_inflight is None else f"max_inflight_messages {max_inflight}\n"
    conf.write_text(
        f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n"
        "max_queued_messages 0\nmax_queued_bytes 0\n"
        + inflight
        + ("user root\n" if os.geteuid() == 0 else "")
    )
    proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return proc, port
        time.sleep(0.05)
    raise SystemExit("mosquitto did not start")


def register_session(port: int, client_id: str, topic: str = "devices/+/up") -> None:
    """Create a persistent session with a QoS 1 subscription, then go offline."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    c.subscribe(topic, qos=1)[1]
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()


def forget_session(port: int, client_id: str) -> None:
    """End a persistent session, so that it stops collecting copies of later packets."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port, clean_start=True)
    c.disconnect()


def register_sessions(port: int, client_id: str, processes: int = 1) -> list[str]:
    """The sessions of a gateway with `processes` ingest processes (one shared group,
    named after the client id, when there are several); returns their client ids."""
    topic = f"$share/{client_id}/devices/+/up" if processes > 1 else "devices/+/up"
    ids = [f"{client_id}-{i}" if i else client_id for i in range(processes)]
    for each in ids:
        register_session(port, each, topic)
    return ids


def register_mosquitto_sub(port: int, client_id: str) -> None:
    subprocess.run(
        [
            "mosquitto_sub",
            "-p",
            str(port),
            "-c",
            "-i",
            client_id,
            "-q",
            "1",
            "-t",
            "devices/+/up",
            "-W",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        check=False,
    )


def sized_payload(size: int) -> bytes:
    """PAYLOAD itself, or PAYLOAD with a "pad" field that makes it `size` bytes."""
    if size == len(PAYLOAD):
        return PAYLOAD
    smallest = len(PAYLOAD) + len(b',"pad":""')
    if size < smallest:
        raise SystemExit(f"payload sizes here: {len(PAYLOAD)}, or {smallest} and up; not {size}")
    return PAYLOAD[:-1] + b',"pad":"' + b"x" * (size - smallest) + b'"}'


def preload(port: int, n: int, payload: bytes = PAYLOAD) -> float:
    """Publish n QoS 1 packets; returns seconds taken."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    began = time.monotonic()
    for start in range(0, n, 10_000):  # chunks: paho refuses an unbounded queue
        infos = [
            c.publish(TOPIC.format(f"898110000000{i % 1000:07d}"), payload, qos=1)
            for i in range(start, min(n, start + 10_000))
        ]
        for info in infos:
            info.wait_for_publish(120)
    took = time.monotonic() - began
    c.disconnect()
    c.loop_stop()
    return took


def run_mosquitto_sub(port: int, client_id: str, n: int) -> float:
    began = time.monotonic()
    subprocess.run(
        [
            "mosquitto_sub",
            "-p",
            str(port),
            "-c",
            "-i",
            client_id,
            "-q",
            "1",
            "-t",
            "devices/+/up",
            "-C",
            str(n),
            "-W",
            "600",
        ],
        stdout=subprocess.DEVNULL,
        check=True,
    )
    return time.monotonic() - began


def run_bare_paho(port: int, client_id: str, n: int) -> dict[str, float]:
    done = threading.Event()
    pending: list[int] = []
    count = 0

    def on_message(c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        nonlocal count
        pending.append(msg.mid)
        count += 1
        if len(pending) >= 500 or count >= n:
            for mid in pending:
                c.ack(mid, 1)
            pending.clear()
        if count >= n:
            done.set()

    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5, manual_ack=True
    )
    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 1000
    began = time.monotonic()
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    c.loop_start()
    done.wait(600)
    took = time.monotonic() - began
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    c.disconnect()
    c.loop_stop()
    # This process does nothing else meanwhile (the sink thread is idle).
    cpu = cpu1.ru_utime - cpu0.ru_utime + cpu1.ru_stime - cpu0.ru_stime
    return {"seconds": took, "cpu_us_per_packet": cpu / n * 1e6}


class Sink:
    """aiohttp receiver in a thread that counts records."""

    def __init__(self) -> None:
        self.records = 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        async def handle(req: web.Request) -> web.Response:
            body = json.loads(await req.read())
            self.records += len(body) if isinstance(body, list) else 1
            return web.Response(text="ok")

        app = web.Application(client_max_size=64 << 20)
        app.router.add_post("/{t:.*}", handle)
        runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(runner.setup())
        self.loop.run_until_complete(web.TCPSite(runner, "127.0.0.1", self.port).start())
        self.loop.run_forever()


HOOKS = {
    "ingest": "",
    "bulk": "batch = { window_ms = 50, max_items = 500 }",
    "monoz": "batch = { window_ms = 1000, max_items = 10 }",
}


def gateway_config(
    path: Path, port: int, state: Path, client_id: str, hook: str, processes: int = 1
) -> None:
    shared = ""
    if processes > 1:
        shared = f'shared_group = "{client_id}"\ningest_processes = {processes}'
    path.write_text(f"""
[gateway]
state_dir = "{state}"
max_buffer_mb = 4096
[mqtt]
host = "127.0.0.1"
port = {port}
client_id = "{client_id}"
{shared}
[web]
enabled = false
{hook}
""")


def cpu_seconds(ps: psutil.Process) -> float:
    """User and system CPU of a process and its children (ingest processes)."""
    total = 0.0
    for p in [ps, *ps.children()]:
        with contextlib.suppress(psutil.Error):
            t = p.cpu_times()
            total += t.user + t.system
    return total


def rss_bytes(ps: psutil.Process) -> int:
    """RSS of a process and its children."""
    total = 0
    for p in [ps, *ps.children()]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def stored(db: Path) -> int:
    """packets_received from a gateway's store (0 until it exists)."""
    if not db.exists():
        return 0
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
        try:
            return counters(conn)["packets_received"]
        finally:
            conn.close()
    except sqlite3.Error:
        return 0


def run_gateway(
    cfg: Path, state: Path, n: int, sink: Sink | None, py_spy: Path | None = None
) -> dict[str, float]:
    db = state / "gateway.db"
    began = time.monotonic()
    cmd = [sys.executable, "-m", "gateway", "run", "-c", str(cfg)]
    if py_spy is not None:
        # Collapsed stacks of every thread, for a look at where the time goes.
        cmd = ["py-spy", "record", "--threads", "--subprocesses", "--format", "raw",
               "--rate", "200", "-o", str(py_spy), "--", *cmd]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    ps = psutil.Process(proc.pid)
    if py_spy is not None:
        # Measure and stop the gateway, not py-spy: py-spy writes its file when it exits.
        deadline = time.monotonic() + 10
        while not ps.children() and time.monotonic() < deadline:
            time.sleep(0.01)
        ps = ps.children()[0]
    peak = 0
    io0 = None
    # CPU seconds of each ingest process (mqtt.ingest_processes), as last seen.
    child_cpu: dict[int, float] = {}
    deadline = time.monotonic() + 900
    try:
        while time.monotonic() < deadline:
            try:
                for child in ps.children():
                    child_cpu[child.pid] = sum(child.cpu_times()[:2])
                peak = max(peak, rss_bytes(ps))
                io = ps.io_counters()
                io0 = io0 or io
            except psutil.Error:
                pass
            if sink is not None:
                if sink.records >= n:
                    break
            elif stored(db) >= n:
                break
            time.sleep(0.02)
        took = time.monotonic() - began
        io1 = ps.io_counters()
        cpu = ps.cpu_times()
    finally:
        ps.terminate()
        proc.wait(30)
    written = io1.write_bytes - (io0.write_bytes if io0 else 0)
    return {
        "seconds": took,
        "peak_rss_mb": peak / 1e6,
        "disk_bytes_per_packet": written / n,
        "cpu_us_per_packet": (cpu.user + cpu.system + sum(child_cpu.values())) / n * 1e6,
        # Of that, the ingest processes' share (mqtt.ingest_processes > 1; 0 without).
        "ingest_procs_cpu_us_per_packet": sum(child_cpu.values()) / n * 1e6,
    }


def summarise(rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per consumer: medians over the rounds, and each round's ratio to that round's
    bare paho and mosquitto_sub (nan without baselines)."""
    base = {
        (r["consumer"], r["round"]): r["rate"]
        for r in rows
        if r["consumer"] in ("bare paho", "mosquitto_sub")
    }
    out: dict[str, dict[str, Any]] = {}
    for name in dict.fromkeys(r["consumer"] for r in rows):
        mine = [r for r in rows if r["consumer"] == name]
        each = [r["rate"] / base.get(("bare paho", r["round"]), float("nan")) for r in mine]
        summary: dict[str, Any] = {
            "rate": statistics.median(r["rate"] for r in mine),
            "x_paho": statistics.median(each),
            "x_paho_each": each,
            "x_sub": statistics.median(
                r["rate"] / base.get(("mosquitto_sub", r["round"]), float("nan")) for r in mine
            ),
        }
        for key in (
            "peak_rss_mb",
            "disk_bytes_per_packet",
            "cpu_us_per_packet",
            "ingest_procs_cpu_us_per_packet",
        ):
            if key in mine[0]:
                summary[key] = statistics.median(r[key] for r in mine)
        out[name] = summary
    return out


def each(summary: dict[str, Any]) -> str:
    return "  " + " ".join(f"{x:.2f}" for x in summary["x_paho_each"])


def _fmt(summary: dict[str, Any], key: str, spec: str) -> str:
    return format(summary[key], spec) if key in summary else "-"


def _per_payload_byte(summary: dict[str, Any], payload_bytes: int) -> str:
    disk = summary.get("disk_bytes_per_packet")
    return "-" if disk is None else f"{disk / payload_bytes:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--n", type=int, default=200_000)
    ap.add_argument("--profiles", default="ingest,bulk,bulk-x2,monoz")
    ap.add_argument(
        "--py-spy", type=Path, default=None, metavar="DIR", help="profile each gateway run"
    )
    ap.add_argument("--no-baselines", action="store_true", help="gateway rows only")
    ap.add_argument("--payload-bytes", type=int, default=len(PAYLOAD))
    ap.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every row this many times, in turn; print medians, and the range of each "
        "row's ratio to bare paho in the same round",
    )
    args = ap.parse_args()
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_sub") is None:
        raise SystemExit("needs Debian's mosquitto and mosquitto-clients")
    n = args.n
    payload = sized_payload(args.payload_bytes)
    work = Path(tempfile.mkdtemp(prefix="drain-"))
    broker, port = start_broker(work)
    rows: list[dict[str, object]] = []
    rnd = 0
    try:

        def measure(name: str, register: object, consume: object) -> None:
            sessions = register()  # type: ignore[operator]
            pub_s = preload(port, n, payload)
            result = consume()  # type: ignore[operator]
            # Ended, so that later preloads queue nothing for it: every row meets a
            # broker holding only its own backlog.
            for client_id in sessions:
                forget_session(port, client_id)
            if isinstance(result, float):
                result = {"seconds": result}
            rate = n / result["seconds"]
            rows.append(
                {
                    "consumer": name,
                    "round": rnd,
                    "packets": n,
                    "rate": rate,
                    "preload_s": pub_s,
                    **result,
                }
            )
            print(f"  {name:<14} {rate:>10,.0f} packets/s", file=sys.stderr, flush=True)

        for rnd in range(args.rounds):
            if not args.no_baselines:
                measure(
                    "mosquitto_sub",
                    lambda: register_mosquitto_sub(port, "b-sub") or ["b-sub"],
                    lambda: run_mosquitto_sub(port, "b-sub", n),
                )
                measure(
                    "bare paho",
                    lambda: register_session(port, "b-paho") or ["b-paho"],
                    lambda: run_bare_paho(port, "b-paho", n),
                )
            for prof in args.profiles.split(","):
                base, _, times = prof.partition("-x")
                procs = int(times or 1)
                state = work / f"state-{prof}-{rnd}"
                cfg = work / f"{prof}-{rnd}.toml"
                sink = Sink() if base != "ingest" else None
                hook = (
                    ""
                    if sink is None
                    else (
                        f'[[webhooks]]\nname = "sink"\nurl = "http://127.0.0.1:{sink.port}/in"\n'
                        f"{HOOKS[base]}\nconcurrency = 4\n"
                    )
                )
                gateway_config(cfg, port, state, f"gw-{prof}", hook, procs)

                measure(
                    f"gateway {prof}",
                    lambda p=prof, k=procs: register_sessions(port, f"gw-{p}", k),
                    lambda c=cfg, s=state, k=sink, p=prof, r=rnd: run_gateway(
                        c, s, n, k, args.py_spy / f"{p}-{r}.txt" if args.py_spy else None
                    ),
                )
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nbacklog drain, {n:,} packets of {len(payload)} bytes, "
        f"{os.cpu_count()} cores, Python {sys.version.split()[0]}"
        + (f", medians of {args.rounds} rounds" if args.rounds > 1 else "")
    )
    print(
        f"{'consumer':<16}{'packets/s':>12}{'x paho':>8}{'x sub':>8}{'peak RSS MB':>13}"
        f"{'disk B/pkt':>12}{'B/payload B':>12}{'CPU us/pkt':>12}"
        + ("  x paho, each round" if args.rounds > 1 else "")
    )
    summaries = summarise(rows)
    for name, summary in summaries.items():
        print(
            f"{name:<16}{summary['rate']:>12,.0f}{summary['x_paho']:>8.2f}"
            f"{summary['x_sub']:>8.2f}{_fmt(summary, 'peak_rss_mb', '.1f'):>13}"
            f"{_fmt(summary, 'disk_bytes_per_packet', '.0f'):>12}"
            f"{_per_payload_byte(summary, len(payload)):>12}"
            f"{_fmt(summary, 'cpu_us_per_packet', '.1f'):>12}"
            + (each(summary) if args.rounds > 1 else "")
        )
    for name, summary in summaries.items():
        if summary.get("ingest_procs_cpu_us_per_packet"):
            print(
                f"({name}: {summary['ingest_procs_cpu_us_per_packet']:.1f} of its"
                f" {summary['cpu_us_per_packet']:.1f} CPU us/pkt in the ingest processes)"
            )
    print(json.dumps({"bench": "drain", "n": n, "payload_bytes": len(payload), "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

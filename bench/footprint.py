"""Footprint: memory with a large backlog, CPU when idle, disk writes and wire bytes.

    .venv/bin/python bench/footprint.py [--backlog 1000000] [--idle-s 60] [--packets 20000]
                                        [--idle-commit-delay-ms 0] [--no-baselines]
                                        [--backlog-payloads 71,256] [--parts backlog,…]

One mosquitto started here on a free loopback port (in memory, as bench/drain.py).
1. Backlog: --backlog packets of 71 bytes are preloaded into the gateway's persistent
   session while it is stopped. It then starts with its webhook (monoZ profile) pointing
   at a port that refuses connections, so everything it takes stays on disk. RSS is
   sampled every 50 ms while it ingests (peak) and for --steady-s after (steady); disk
   writes per packet from /proc/<pid>/io write_bytes. Baseline: a bare paho MQTT 5
   client (manual ack, acks in groups of 500, stores nothing) drains its own copy of the
   same backlog, in a process of its own. --backlog-payloads runs this part once per
   payload size (JSON padded to that size), each on a session of its own.
2. Delivery: --packets packets published at 1,000/s go through the gateway to an aiohttp
   receiver, monoZ profile (1 s / 10), with and without `gzip = true`: disk bytes
   written per packet and per payload byte (ingest and delivery bookkeeping), and
   bytes on the wire per packet at the receiver (body; body and request headers).
3. Idle: `python -m firmware_sim fleet --devices 100 --rate 0.1` (10 packets/s in all)
   for --idle-s after a 10 s warm-up, delivered by the gateway (monoZ profile, web
   dashboard on); CPU % of one core (user and system time apart, and context switches
   a second across all its threads) and RSS of the gateway (defaults: its commit delay
   is "auto", 100 ms for that profile), and in the same window of a second gateway
   with `gateway.commit_delay_ms` (--idle-commit-delay-ms, 0: no delay) and, as
   baselines, `mosquitto_sub -q 1` and a bare paho
   subscriber.
Prints a table and one JSON line. Only loopback; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import psutil
from common import (
    PAYLOAD,
    LatencySink,
    gateway_toml,
    sink_hook,
    start_gateway,
    start_publishers,
)
from drain import PAYLOAD as SAMPLE_PAYLOAD
from drain import (
    ROOT,
    forget_session,
    free_port,
    preload,
    register_session,
    run_bare_paho,
    sized_payload,
    start_broker,
    stored,
)

MONOZ = "batch = { window_ms = 1000, max_items = 10 }"


def _bare_subscriber(port: int, seconds: float) -> None:  # pragma: no cover - child
    """A bare paho QoS 1 subscriber that only receives."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.connect("127.0.0.1", port)
    c.subscribe("devices/+/up", qos=1)
    c.loop_start()
    time.sleep(seconds)
    c.disconnect()
    c.loop_stop()


def _ctx(p: psutil.Process) -> int:
    """Voluntary and involuntary context switches of all the process's threads (psutil's
    num_ctx_switches counts the main thread's only); those of threads that ended are
    lost."""
    n = 0
    for status in Path(f"/proc/{p.pid}/task").glob("*/status"):
        try:
            text = status.read_text()
        except OSError:  # the thread ended meanwhile
            continue
        n += sum(int(v) for v in re.findall(r"ctxt_switches:\s+(\d+)", text))
    return n


def _switches(p: psutil.Process, seconds: float, before: int) -> float:
    return (_ctx(p) - before) / seconds


def watch(pid: int, until: Callable[[], bool], limit_s: float) -> dict[str, float]:
    """Sample a process every 50 ms until `until()` (or it ends): peak RSS, time, disk
    bytes written and CPU % of one core, from the last sample."""
    ps = psutil.Process(pid)
    io0, cpu0 = ps.io_counters(), ps.cpu_times()
    io1, cpu1 = io0, cpu0
    began = time.monotonic()
    peak = 0
    while True:
        try:
            peak = max(peak, ps.memory_info().rss)
            io1, cpu1 = ps.io_counters(), ps.cpu_times()
        except psutil.NoSuchProcess:
            break
        if until():
            break
        if time.monotonic() - began > limit_s:
            raise SystemExit(f"process {pid}: not done after {limit_s:.0f} s")
        time.sleep(0.05)
    took = time.monotonic() - began
    return {
        "seconds": took,
        "rss_peak_mb": peak / 1e6,
        "write_bytes": io1.write_bytes - io0.write_bytes,
        "cpu_pct": 100 * (cpu1.user + cpu1.system - cpu0.user - cpu0.system) / took,
    }


def backlog(port: int, n: int, work: Path, baselines: bool, size: int) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    payload = sized_payload(size)
    client_id = f"fp-backlog-{size}"
    register_session(port, client_id)
    if baselines:
        register_session(port, "fp-paho")
    print(f"  preloading {n:,} packets of {size} bytes …", file=sys.stderr, flush=True)
    pub_s = preload(port, n, payload)
    print(f"  preloaded in {pub_s:.0f} s", file=sys.stderr, flush=True)
    if baselines:
        child = mp.get_context("spawn").Process(target=run_bare_paho, args=(port, "fp-paho", n))
        child.start()
        assert child.pid is not None
        m = watch(child.pid, lambda: not child.is_alive(), 900)
        child.join()
        forget_session(port, "fp-paho")
        rows.append(
            {"what": "backlog", "consumer": "bare paho", "packets": n, "payload_bytes": size, **m}
        )
    refusing = free_port()
    state = work / f"state-backlog-{size}"
    cfg = gateway_toml(
        work / f"backlog-{size}.toml",
        port,
        state,
        client_id,
        sink_hook(refusing, MONOZ, 'retry = { preset = "durable" }'),
    )
    proc = start_gateway(cfg, port, client_id, work / f"backlog-{size}.log", register=False)
    try:
        db = state / "gateway.db"
        m = watch(proc.pid, lambda: stored(db) >= n, 1800)
        print(f"  gateway took {n:,} packets in {m['seconds']:.0f} s", file=sys.stderr)
        ps = psutil.Process(proc.pid)
        steady = []
        end = time.monotonic() + ARGS.steady_s
        while time.monotonic() < end:
            steady.append(ps.memory_info().rss)
            time.sleep(0.2)
        pending = stored(db)
    finally:
        proc.terminate()
        proc.wait(60)
        # Later preloads (another payload size) must not queue copies for this session.
        forget_session(port, client_id)
    rows.append(
        {
            "what": "backlog",
            "consumer": "gateway",
            "packets": n,
            "payload_bytes": size,
            **m,
            "rss_steady_mb": max(steady) / 1e6,
            "rss_steady_last_mb": steady[-1] / 1e6,
            "disk_bytes_per_packet": m["write_bytes"] / n,
            "disk_bytes_per_payload_byte": m["write_bytes"] / (n * size),
            "store_mb": sum(f.stat().st_size for f in state.glob("gateway.db*")) / 1e6,
            "stored": pending,
        }
    )
    return rows


def delivery(port: int, n: int, work: Path, gzip: bool) -> dict[str, Any]:
    sink = LatencySink()
    name = f"fp-deliver{'-gzip' if gzip else ''}"
    state = work / f"state-{name}"
    cfg = gateway_toml(
        work / f"{name}.toml",
        port,
        state,
        name,
        sink_hook(sink.port, MONOZ, "gzip = true" if gzip else ""),
    )
    proc = start_gateway(cfg, port, name, work / f"{name}.log")
    try:
        pubs = start_publishers(port, 1000, n / 1000, 2)
        m = watch(proc.pid, lambda: pubs.done() and len(sink.seen) >= n, n / 1000 + 120)
        sent = sum(r["acked"] for r in pubs.results())
        # Give the last batches' bookkeeping (their completion transactions) time to land.
        time.sleep(2.0)
        written = psutil.Process(proc.pid).io_counters().write_bytes
    finally:
        proc.terminate()
        proc.wait(60)
        sink.stop()
        forget_session(port, name)
    payload_bytes = len(PAYLOAD % (0, n // 2, time.time_ns()))
    return {
        "what": "deliver",
        "consumer": f"gateway monoz{' gzip' if gzip else ''}",
        "packets": sent,
        "received": len(sink.seen),
        "requests": sink.requests,
        "rss_peak_mb": m["rss_peak_mb"],
        "cpu_pct": m["cpu_pct"],
        "disk_bytes_per_packet": written / sent,
        "disk_bytes_per_payload_byte": written / (sent * payload_bytes),
        "payload_bytes": payload_bytes,
        "wire_body_bytes_per_packet": sink.body_bytes / sink.records,
        "wire_bytes_per_packet": (sink.body_bytes + sink.header_bytes) / sink.records,
    }


IDLE_DELAYED = "gateway, delay"  # the second gateway of the idle part


def idle(
    port: int, seconds: float, work: Path, baselines: bool, delay_ms: float
) -> list[dict[str, Any]]:
    sinks = {"gateway": LatencySink(), IDLE_DELAYED: LatencySink()}
    gws = {}
    delayed = ("fp-idle-delay", f"commit_delay_ms = {delay_ms:g}\n")
    for k, (name, extra) in zip(sinks, (("fp-idle", ""), delayed), strict=True):
        cfg = gateway_toml(
            work / f"{name}.toml", port, work / f"state-{name}", name,
            sink_hook(sinks[k].port, MONOZ), True,
        )  # fmt: skip
        cfg.write_text(cfg.read_text().replace("[gateway]\n", f"[gateway]\n{extra}", 1))
        gws[k] = start_gateway(cfg, port, name, work / f"{name}.log")
    others: dict[str, Any] = {}
    if baselines:
        others["mosquitto_sub"] = subprocess.Popen(
            ["mosquitto_sub", "-p", str(port), "-q", "1", "-t", "devices/+/up"],
            stdout=subprocess.DEVNULL,
        )
        child = mp.get_context("spawn").Process(target=_bare_subscriber, args=(port, seconds + 30))
        child.start()
        others["bare paho"] = child
    fleet = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "fleet",
            "--broker",
            f"127.0.0.1:{port}",
            "--devices",
            "100",
            "--rate",
            "0.1",
            "--duration",
            str(seconds + 15),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    rows = []
    try:
        time.sleep(10)  # connections, subscriptions, the first readings
        procs = {k: psutil.Process(gw.pid) for k, gw in gws.items()}
        procs |= {k: psutil.Process(v.pid) for k, v in others.items()}
        before = {k: (p.cpu_times(), p.io_counters()) for k, p in procs.items()}
        before_ctx = {k: _ctx(p) for k, p in procs.items()}
        counts0 = {k: (s.records, s.requests) for k, s in sinks.items()}
        time.sleep(seconds)
        for k, p in procs.items():
            (t0, io0), t1, io1 = before[k], p.cpu_times(), p.io_counters()
            busy = t1.user + t1.system - t0.user - t0.system
            src = k if k in sinks else "gateway"  # a baseline: the default gateway's stream
            records = sinks[src].records - counts0[src][0]
            rows.append(
                {
                    "what": "idle",
                    "consumer": k,
                    "commit_delay_ms": {IDLE_DELAYED: delay_ms, "gateway": "auto"}.get(k),
                    "seconds": seconds,
                    "cpu_pct": 100 * busy / seconds,
                    "cpu_user_pct": 100 * (t1.user - t0.user) / seconds,
                    "cpu_system_pct": 100 * (t1.system - t0.system) / seconds,
                    "context_switches_per_s": _switches(procs[k], seconds, before_ctx[k]),
                    "rss_mb": p.memory_info().rss / 1e6,
                    "delivered_per_s": records / seconds,
                    "requests": sinks[src].requests - counts0[src][1],
                    "disk_bytes_per_packet": (io1.write_bytes - io0.write_bytes) / max(records, 1),
                }
            )
    finally:
        fleet.terminate()
        fleet.wait(30)
        for v in others.values():
            if isinstance(v, subprocess.Popen):
                v.terminate()
                v.wait(10)
            else:
                v.terminate()
                v.join(10)
        for gw in gws.values():
            gw.terminate()
            gw.wait(60)
        for sink in sinks.values():
            sink.stop()
        forget_session(port, "fp-idle")
        forget_session(port, "fp-idle-delay")
    return rows


ARGS = argparse.Namespace()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--backlog", type=int, default=1_000_000)
    ap.add_argument(
        "--backlog-payloads",
        default=str(len(SAMPLE_PAYLOAD)),
        metavar="BYTES,…",
        help="payload sizes of the backlog part, one run each (the first with baselines)",
    )
    ap.add_argument("--steady-s", type=float, default=10.0)
    ap.add_argument("--packets", type=int, default=20_000, help="for the delivery runs")
    ap.add_argument("--idle-s", type=float, default=60.0)
    ap.add_argument(
        "--idle-commit-delay-ms",
        type=float,
        default=0.0,
        help="gateway.commit_delay_ms of the idle part's second gateway (0: none)",
    )
    ap.add_argument("--parts", default="backlog,deliver,idle")
    ap.add_argument("--no-baselines", action="store_true", help="gateway rows only")
    ap.parse_args(namespace=ARGS)
    if shutil.which("mosquitto") is None or shutil.which("mosquitto_sub") is None:
        raise SystemExit("needs Debian's mosquitto and mosquitto-clients")
    parts = ARGS.parts.split(",")
    baselines = not ARGS.no_baselines
    work = Path(tempfile.mkdtemp(prefix="footprint-", dir=os.environ.get("FOOTPRINT_DIR")))
    broker, port = start_broker(work)
    rows: list[dict[str, Any]] = []
    try:
        if "idle" in parts:
            rows += idle(port, ARGS.idle_s, work, baselines, ARGS.idle_commit_delay_ms)
        if "deliver" in parts:
            rows += [delivery(port, ARGS.packets, work, gz) for gz in (False, True)]
        if "backlog" in parts:
            for i, size in enumerate(int(s) for s in ARGS.backlog_payloads.split(",")):
                rows += backlog(port, ARGS.backlog, work, baselines and i == 0, size)
    finally:
        broker.terminate()
        broker.wait(30)
        shutil.rmtree(work, ignore_errors=True)
    report(rows)
    return 0


def fmt(r: dict[str, Any], key: str, spec: str) -> str:
    return format(r[key], spec) if key in r else "-"


def report(rows: list[dict[str, Any]]) -> None:
    print(f"\nfootprint, {os.cpu_count()} cores, Python {sys.version.split()[0]}")
    idle_rows = [r for r in rows if r["what"] == "idle"]
    if idle_rows:
        print(f"\nidle: 100 devices, one packet each every 10 s, {idle_rows[0]['seconds']:g} s")
        print(
            f"{'consumer':<34}{'CPU % of a core':>16}{'user':>7}{'system':>7}{'switches/s':>11}"
            f"{'RSS MB':>8}{'disk B/pkt':>12}"
        )
        for r in idle_rows:
            name = r["consumer"]
            if name == IDLE_DELAYED:
                name = f"gateway, commit_delay_ms = {r['commit_delay_ms']:g}"
            elif name == "gateway":
                name = "gateway (commit_delay_ms auto)"
            disk = f"{r['disk_bytes_per_packet']:.0f}" if "gateway" in name else "-"
            print(
                f"{name:<34}{r['cpu_pct']:>16.2f}{r['cpu_user_pct']:>7.2f}"
                f"{r['cpu_system_pct']:>7.2f}{r['context_switches_per_s']:>11.0f}"
                f"{r['rss_mb']:>8.1f}{disk:>12}"
            )
        for g in idle_rows[:2]:
            print(
                f"({g['consumer']} delivered {g['delivered_per_s']:.1f} packets/s"
                f" in {g['requests']} requests)"
            )
    back = [r for r in rows if r["what"] == "backlog"]
    if back:
        print(f"\nbacklog: {back[0]['packets']:,} packets")
        print(
            f"{'consumer':<16}{'payload B':>10}{'s':>6}{'peak RSS MB':>13}{'steady RSS MB':>15}"
            f"{'disk B/pkt':>12}{'B/payload B':>13}{'store MB':>10}"
        )
        for r in back:
            print(
                f"{r['consumer']:<16}{r['payload_bytes']:>10}{r['seconds']:>6.0f}"
                f"{r['rss_peak_mb']:>13.1f}"
                f"{fmt(r, 'rss_steady_mb', '.1f'):>15}{fmt(r, 'disk_bytes_per_packet', '.0f'):>12}"
                f"{fmt(r, 'disk_bytes_per_payload_byte', '.2f'):>13}{fmt(r, 'store_mb', '.0f'):>10}"
            )
    dl = [r for r in rows if r["what"] == "deliver"]
    if dl:
        print(
            f"\ndelivery: {dl[0]['packets']:,} packets of {dl[0]['payload_bytes']} bytes "
            "at 1,000/s, monoZ profile (1 s / 10)"
        )
        print(
            f"{'consumer':<20}{'requests':>9}{'disk B/pkt':>12}{'B/payload B':>13}"
            f"{'wire body B/pkt':>17}{'wire B/pkt':>12}"
        )
        for r in dl:
            print(
                f"{r['consumer']:<20}{r['requests']:>9}{r['disk_bytes_per_packet']:>12.0f}"
                f"{r['disk_bytes_per_payload_byte']:>13.2f}{r['wire_body_bytes_per_packet']:>17.1f}"
                f"{r['wire_bytes_per_packet']:>12.1f}"
            )
    print(json.dumps({"bench": "footprint", "rows": rows}))


if __name__ == "__main__":
    mp.set_start_method("spawn")
    raise SystemExit(main())

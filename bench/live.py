"""Live traffic: end-to-end latency and loss at a fixed publish rate.

    .venv/bin/python bench/live.py [--rates 1000,5000] [--seconds 30] [--publishers 4]
                                   [--profiles monoz,w0] [--no-baselines]

For each rate, `--publishers` processes (paho MQTT 5, QoS 1, each paced to its share of
the rate) publish for `--seconds` to one mosquitto started here on a free loopback port.
Each payload carries its publisher, a sequence number and the publisher's clock
(time.time_ns()) at publish time; the consumer takes the difference on receipt (same
host, same clock). Consumers, one at a time, each with the same publishers:
  bare paho      an MQTT 5 subscriber that timestamps each packet in on_message
                 (the broker-only latency; the baseline)
  gateway monoz  the gateway (a subprocess) delivering to an aiohttp receiver in this
                 process, batch = { window_ms = 1000, max_items = 10 }
  gateway w0     the same with batch = { window_ms = 0, max_items = 10 }: a request as
                 soon as delivery sees packets, with up to 10 of those waiting
  gateway w0-x2  (and any profile with -xN) the same with mqtt.ingest_processes = N
  gateway monoz-c16  (any profile with -cN, before any -xN) the webhook's concurrency = N
Latency: p50, p99 and max over every distinct packet received. Packets the broker
acknowledged to a publisher that did not arrive within --drain-s after the last publish
are "late" when the gateway had committed them (still in its store), else "lost".
CPU % (of one core) and peak RSS are the gateway's (with its ingest processes) while
the publishers ran.
Prints a table and one JSON line. Only loopback; every wait is bounded. `--dump DIR`
also writes each gateway row's packets (publish time, the record's Timestamp, arrival
time) to DIR/<profile>-<rate>.csv, to see where in a run latency came from.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import paho.mqtt.client as mqtt
import psutil
from common import (
    PUBLISHERS,
    LatencySink,
    gateway_toml,
    percentiles,
    sink_hook,
    start_gateway,
    start_publishers,
)
from drain import cpu_seconds, forget_session, rss_bytes, start_broker, stored

PROFILES = {
    "monoz": "batch = { window_ms = 1000, max_items = 10 }",
    "w0": "batch = { window_ms = 0, max_items = 10 }",
}


class BareSubscriber:
    """paho MQTT 5, QoS 1, timestamps each packet on receipt (paho acknowledges it)."""

    def __init__(self, port: int) -> None:
        self.latencies_ns: list[int] = []
        self.seen: set[tuple[int, int]] = set()
        self.duplicates = 0
        self._subscribed = threading.Event()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
        self.client.on_message = self._on_message
        self.client.on_subscribe = lambda *_a: self._subscribed.set()
        self.client.connect("127.0.0.1", port)
        self.client.loop_start()
        self.client.subscribe("devices/+/up", qos=1)
        if not self._subscribed.wait(10):
            raise SystemExit("bare subscriber: no SUBACK")

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        now = time.time_ns()
        p = orjson.loads(msg.payload)
        key = (p["p"], p["s"])
        if key in self.seen:
            self.duplicates += 1
            return
        self.seen.add(key)
        self.latencies_ns.append(now - p["t"])

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def run_rate(
    port: int,
    rate: int,
    args: argparse.Namespace,
    consumer: str,
    work: Path,
) -> dict[str, Any]:
    """One consumer at one rate: publishers, consumer, and what it saw."""
    proc: subprocess.Popen[bytes] | None = None
    sink: LatencySink | None = None
    bare: BareSubscriber | None = None
    usage: dict[str, float] = {}
    row: dict[str, Any] = {}
    processes = 1  # mqtt.ingest_processes, from a profile's -xN
    client_id = f"live-{consumer.split()[-1]}-{rate}"
    if consumer == "bare paho":
        bare = BareSubscriber(port)
        seen: Callable[[], int] = lambda: len(bare.seen)  # noqa: E731
    else:
        prof, _, times = consumer.split()[-1].partition("-x")
        processes = int(times or 1)
        prof, _, slots = prof.partition("-c")
        sink = LatencySink(trace=args.dump is not None)
        cfg = gateway_toml(
            work / f"{client_id}.toml",
            port,
            work / f"state-{client_id}",
            client_id,
            sink_hook(sink.port, PROFILES[prof], f"concurrency = {slots}" if slots else ""),
            processes=processes,
        )
        proc = start_gateway(cfg, port, client_id, work / f"{client_id}.log", processes=processes)
        seen = lambda: len(sink.seen)  # noqa: E731
    try:
        ps = psutil.Process(proc.pid) if proc else None
        cpu0 = cpu_seconds(ps) if ps else None
        began = time.monotonic()
        pubs = start_publishers(port, rate, args.seconds, args.publishers, args.publisher)
        rss_peak = 0
        while not pubs.done():
            if ps is not None:
                rss_peak = max(rss_peak, rss_bytes(ps))
            time.sleep(0.2)
        results = pubs.results()
        published_s = time.monotonic() - began
        if ps is not None and cpu0 is not None:
            busy = cpu_seconds(ps) - cpu0
            usage = {"cpu_pct": 100 * busy / published_s, "rss_peak_mb": rss_peak / 1e6}
        acked = sum(r["acked"] for r in results)
        deadline = time.monotonic() + args.drain_s
        while seen() < acked and time.monotonic() < deadline:
            time.sleep(0.05)
        received = seen()
        lat = bare.latencies_ns if bare else sink.latencies_ns  # type: ignore[union-attr]
        dups = bare.duplicates if bare else sink.duplicates  # type: ignore[union-attr]
        sent = sum(r["sent"] for r in results)
        row.update(
            {
                "consumer": consumer,
                "rate": rate,
                "seconds": args.seconds,
                "published": sent,
                "acked": acked,
                "publish_rate": sent / max(r["publish_s"] for r in results),
                "publisher_lag_max_ms": max(r["lag_max_ms"] for r in results),
                "publisher_cpu_pct": 100
                * sum(r["cpu_s"] for r in results)
                / max(r["publish_s"] for r in results),
                "received": received,
                "duplicates": dups,
                **percentiles(lat),
                **usage,
            }
        )
        if sink is not None:
            row["requests"] = sink.requests
        return row
    finally:
        if bare is not None:
            bare.close()
        if proc is not None:
            proc.terminate()
            proc.wait(30)
            for n in range(processes):
                forget_session(port, f"{client_id}-{n}" if n else client_id)
            # What the gateway committed: packets not yet delivered are late, not lost.
            row["stored"] = stored(work / f"state-{client_id}" / "gateway.db")
        if sink is not None:
            sink.stop()
            if sink.trace is not None and args.dump is not None:
                args.dump.mkdir(parents=True, exist_ok=True)
                lines = [f"{t},{stamp},{at}" for t, stamp, at in sink.trace]
                name = f"{consumer.split()[-1]}-{rate}.csv"
                (args.dump / name).write_text(
                    "published_ns,timestamp,arrived_ns\n" + "\n".join(lines) + "\n"
                )


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--rates", default="1000,5000", help="packets/s, comma-separated")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--publishers", type=int, default=4)
    ap.add_argument(
        "--publisher",
        choices=sorted(PUBLISHERS),
        default="raw",
        help="raw: a minimal MQTT 5 publisher on a socket (cheap enough not to share the"
        " cores' time with the gateway); paho: paho-mqtt clients (much more CPU per packet)",
    )
    ap.add_argument("--profiles", default="monoz,w0")
    ap.add_argument("--drain-s", type=float, default=30.0, help="wait for stragglers")
    ap.add_argument("--no-baselines", action="store_true", help="gateway rows only")
    ap.add_argument(
        "--dump",
        type=Path,
        help="write DIR/<consumer>-<rate>.csv per gateway row: each packet's publish time"
        " (ns), its Timestamp in the gateway's record and its arrival time (ns)",
    )
    args = ap.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("needs Debian's mosquitto")
    work = Path(tempfile.mkdtemp(prefix="live-"))
    broker, port = start_broker(work)
    rows: list[dict[str, Any]] = []
    consumers = [] if args.no_baselines else ["bare paho"]
    consumers += [f"gateway {p}" for p in args.profiles.split(",")]
    try:
        for rate in (int(r) for r in args.rates.split(",")):
            for consumer in consumers:
                row = run_rate(port, rate, args, consumer, work)
                # Not received in time but committed by the gateway: late, not lost.
                missing = row["acked"] - row["received"]
                row["late"] = max(0, min(missing, row.get("stored", 0) - row["received"]))
                row["lost"] = missing - row["late"]
                rows.append(row)
                print(
                    f"  {rate:>6}/s {consumer:<14} p50 {row['p50_ms']:8.1f} ms  "
                    f"p99 {row['p99_ms']:8.1f} ms  lost {row['lost']}",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        broker.terminate()
        broker.wait(10)
        shutil.rmtree(work, ignore_errors=True)

    print(
        f"\nlive traffic, {args.seconds:g} s per run, {args.publishers} {args.publisher} publisher"
        " processes, "
        f"QoS 1, {os.cpu_count()} cores, Python {sys.version.split()[0]}"
    )
    print(
        f"{'rate/s':>7} {'consumer':<15}{'sent/s':>8}{'published':>10}{'received':>10}"
        f"{'late':>6}{'lost':>6}{'dups':>6}{'p50 ms':>9}{'p99 ms':>9}{'max ms':>9}"
        f"{'CPU %':>7}{'RSS MB':>8}{'pub CPU %':>10}"
    )
    for r in rows:
        cpu = f"{r['cpu_pct']:.0f}" if "cpu_pct" in r else "-"
        rss = f"{r['rss_peak_mb']:.0f}" if "rss_peak_mb" in r else "-"
        print(
            f"{r['rate']:>7} {r['consumer']:<15}{r['publish_rate']:>8.0f}{r['acked']:>10}"
            f"{r['received']:>10}{r['late']:>6}{r['lost']:>6}{r['duplicates']:>6}{r['p50_ms']:>9.1f}"
            f"{r['p99_ms']:>9.1f}{r['max_ms']:>9.1f}{cpu:>7}{rss:>8}{r['publisher_cpu_pct']:>10.0f}"
        )
    print(
        json.dumps(
            {
                "bench": "live",
                "publishers": args.publishers,
                "publisher": args.publisher,
                "rows": rows,
            }
        )
    )
    return 0


if __name__ == "__main__":
    mp.set_start_method("spawn")
    raise SystemExit(main())

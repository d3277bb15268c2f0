"""A broker that caps unacknowledged packets: the store's commit rate with and without
learning the cap.

    .venv/bin/python bench/capped.py [--caps 32,100] [--seconds 5] [--delay-ms 100]

AWS IoT Core sends a client at most 100 packets ahead of their PUBACKs; EMQX, VerneMQ and
mosquitto cap MQTT 3.1.1 clients (EMQX's max_inflight: 32). mosquitto keeps its cap only
for the first packets of a connection, so no broker here can show the steady state. A
feeder thread plays the broker instead: it hands the store `cap` packets, then the next
one each time the store commits one (its PUBACK), always keeping `cap` packets
unacknowledged. The store is the gateway's own (gateway.store.Store, a real SQLite file
in a temporary directory) with `--delay-ms` as gateway.commit_delay_ms and the
service's bound of 500 packets. For each cap, two rows in the same run:
  learnt     the gateway as it is: two waits that run out holding the same count teach
             the store the cap, which then ends the wait
  baseline   the same store with cap learning off (every commit waits out the delay)
Prints packets/s committed, commits/s and the cap learnt, and one JSON line.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

from gateway.store import Incoming, Store
from gateway.store import pacing as st


def run(cap: int, seconds: float, delay_s: float, learn: bool) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="capped-") as tmp:
        saved = st.CAP_MIN_PACKETS
        if not learn:
            st.CAP_MIN_PACKETS = 1 << 62
        try:
            with Store.open(Path(tmp), commit_delay_s=delay_s) as store:
                acked = threading.Semaphore(0)
                committed = [0]

                def on_committed(packets: list[Incoming]) -> None:
                    committed[0] += len(packets)
                    for _ in packets:
                        acked.release()

                store.on_committed = on_committed
                payload = b'{"t": 21.5, "h": 40, "seq": 0000000000}'.ljust(71, b" ")
                sent = 0
                began = time.monotonic()
                end = began + seconds
                while time.monotonic() < end:
                    if sent >= cap and not acked.acquire(timeout=max(0.0, end - time.monotonic())):
                        break
                    sent += 1
                    store.submit_packet(
                        Incoming("devices/x/up", payload, "", sent % 65535, False, 1)
                    )
                took = time.monotonic() - began
                done = committed[0]
                commits = store.commits
                learnt = store.broker_cap
        finally:
            st.CAP_MIN_PACKETS = saved
    return {
        "cap": cap,
        "row": "learnt" if learn else "baseline",
        "packets_per_s": done / took,
        "commits_per_s": commits / took,
        "cap_learnt": learnt,
    }


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--caps", default="32,100")
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--delay-ms", type=float, default=100.0)
    args = ap.parse_args()
    rows = []
    for cap in [int(c) for c in args.caps.split(",")]:
        for learn in (True, False):
            rows.append(run(cap, args.seconds, args.delay_ms / 1000, learn))
    print(
        f"\ncapped broker (feeder), commit delay {args.delay_ms:g} ms, {args.seconds:g} s per row"
    )
    print(f"{'cap':>5} {'row':<9} {'packets/s':>10} {'commits/s':>10} {'cap learnt':>11}")
    for r in rows:
        print(
            f"{r['cap']:>5} {r['row']:<9} {r['packets_per_s']:>10,.0f}"
            f" {r['commits_per_s']:>10.1f} {r['cap_learnt']:>11}"
        )
    print(json.dumps({"bench": "capped", "delay_ms": args.delay_ms, "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

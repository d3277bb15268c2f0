"""Modem recovery timelines: each fault class, the ladder's steps, and when the modem was back.

    .venv/bin/python bench/recovery.py [--unregistered-s 5] [--unresponsive-s 5]
                                       [--settle-s 5] [--reboot-s 1]

For each fault class the emulated modem (a pty behind a link, its control port in this
process) gets the fault while `gateway run` (a real mosquitto on a free loopback port)
polls it every second; the power-cycle command is the emulator's `modem-control …
power_cycle`. The timeline comes from the events table's timestamps: the fault, every
`modem_recovery` step, and the first `registration_regained` / `modem_recovered` after it.
Prints one table per fault class and one JSON line. Loopback only; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from firmware_sim.control import ControlServer  # noqa: E402
from firmware_sim.modem import ModemEmulator  # noqa: E402
from tests.conftest import Broker, free_port  # noqa: E402

# (fault, problem it makes, the event that says the modem is back)
FAULTS = (
    ("unregistered", "registration_regained"),
    ("unregistered_until_reset", "registration_regained"),
    ("hung", "modem_recovered"),
    ("unresponsive", "modem_recovered"),
)
WAIT_S = 120.0


def events(db: Path, since_ns: int) -> list[tuple[int, str, dict[str, Any]]]:
    try:
        conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.Error:
        return []
    try:
        rows = conn.execute(
            "SELECT ts_ns, kind, data FROM events WHERE ts_ns >= ? ORDER BY id", (since_ns,)
        ).fetchall()
    except sqlite3.Error:
        return []
    finally:
        conn.close()
    return [(int(t), str(k), json.loads(d)) for t, k, d in rows]


def wait(pred: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not pred():
        if time.monotonic() > deadline:
            raise SystemExit(f"timed out waiting for {what}")
        time.sleep(0.1)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--unregistered-s", type=float, default=5.0)
    p.add_argument("--unresponsive-s", type=float, default=5.0)
    p.add_argument("--settle-s", type=float, default=5.0)
    p.add_argument("--reboot-s", type=float, default=1.0)
    args = p.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("mosquitto is not installed")
    work = Path(tempfile.mkdtemp(prefix="recovery-bench-"))
    (work / "broker").mkdir()
    broker = Broker(free_port(), work / "broker")
    broker.start()
    link = work / "ttyModem"
    emu = ModemEmulator("quectel", link=link, urcs=False, reboot_s=args.reboot_s)
    emu.start_pty()
    control = ControlServer(("127.0.0.1", 0), emu)
    threading.Thread(target=control.serve_forever, args=(0.1,), daemon=True).start()
    power = (
        f"{sys.executable} -m firmware_sim modem-control"
        f" 127.0.0.1:{control.server_address[1]} power_cycle"
    )
    cfg = work / "gw.toml"
    cfg.write_text(
        f"""
[gateway]
state_dir = "{work / "state"}"

[mqtt]
host = "127.0.0.1"
port = {broker.port}

[web]
enabled = false

[modem]
port = "{link}"
poll_interval_s = 1
command_timeout_s = 1

[modem.recovery]
unregistered_s = {args.unregistered_s}
unresponsive_s = {args.unresponsive_s}
settle_s = {args.settle_s}
max_resets_per_hour = 60
power_cycle_command = "{power}"
"""
    )
    db = work / "state" / "gateway.db"
    log = (work / "gateway.log").open("wb")
    gw = subprocess.Popen(
        [sys.executable, "-m", "gateway", "run", "-c", str(cfg)], stdout=log, stderr=log, cwd=ROOT
    )
    results = []
    try:
        wait(lambda: any(k == "gateway_started" for _, k, _ in events(db, 0)), 30, "start")
        wait(lambda: emu.state()["echo"] is False, 30, "the gateway's first poll")
        for fault, back in FAULTS:
            time.sleep(2.0)  # a few healthy polls between fault classes
            start = time.time_ns()
            emu.set_fault(fault)
            wait(
                lambda b=back, s=start: any(k == b for _, k, _ in events(db, s)),  # type: ignore[misc]
                WAIT_S,
                f"{back} after {fault}",
            )
            rows = events(db, start)
            end = next(t for t, k, _ in rows if k == back)
            timeline = [{"at_s": 0.0, "what": f"fault {fault}"}]
            for t, k, d in rows:
                if t > end:
                    break
                if k == "modem_recovery":
                    what = f"step {d['step']} (attempt {d['attempt']})"
                elif k in ("registration_lost", "modem_unreachable", back):
                    what = k
                else:
                    continue
                timeline.append({"at_s": round((t - start) / 1e9, 2), "what": what})
            results.append(
                {"fault": fault, "recovered_s": timeline[-1]["at_s"], "timeline": timeline}
            )
    finally:
        gw.terminate()
        gw.wait(20)
        log.close()
        control.shutdown()
        control.server_close()
        emu.stop()
        broker.stop()
    print(
        f"recovery timelines (unregistered_s={args.unregistered_s:g}"
        f" unresponsive_s={args.unresponsive_s:g} settle_s={args.settle_s:g}"
        f" reboot_s={args.reboot_s:g}, poll 1 s)"
    )
    for r in results:
        print(f"\n{r['fault']}: back after {r['recovered_s']:.2f} s")
        for row in r["timeline"]:
            print(f"  {row['at_s']:7.2f} s  {row['what']}")
    print(json.dumps({"bench": "recovery", "results": results}))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

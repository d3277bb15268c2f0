"""The fault suite's long versions (pytest marker `slow`), with a summary of what they measured.

    .venv/bin/python bench/faults.py [--all] [--seed N]

Runs `pytest -m slow tests/faults` (with --all, the short versions too), then prints
one row per test: outcome, seconds and the figures each test records (duplicates,
batches sent again, broker redeliveries, seeds...), and one JSON line. The default
`pytest` run leaves these long versions out (`-m 'not slow'` in pyproject's addopts);
the `-m` given here overrides it. FAULTS_SEED (or --seed) repeats a run's random faults.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--all", action="store_true", help="the short versions too")
    ap.add_argument("--seed", type=int, default=None, help="FAULTS_SEED for every test")
    args = ap.parse_args()
    env = dict(os.environ)
    if args.seed is not None:
        env["FAULTS_SEED"] = str(args.seed)
    with tempfile.TemporaryDirectory(prefix="faults-") as tmp:
        report = Path(tmp) / "junit.xml"
        cmd = [
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-q",
            "-m",
            "slow or not slow" if args.all else "slow",
            # record_property needs the xunit1 flavour of the report
            "-o",
            "junit_family=xunit1",
            f"--junitxml={report}",
            "tests/faults",
        ]
        began = time.monotonic()
        rc = subprocess.run(cmd, cwd=ROOT, env=env, check=False).returncode
        took = time.monotonic() - began
        rows = read_report(report) if report.exists() else []
    print(f"\nfault suite{' (all)' if args.all else ' (long versions)'}: {took:.0f} s, exit {rc}")
    print(f"{'test':<76}{'result':>8}{'s':>7}  figures")
    for r in rows:
        figures = ", ".join(f"{k}={v}" for k, v in r["properties"].items())
        print(f"{r['name'][:75]:<76}{r['result']:>8}{r['seconds']:>7.1f}  {figures}")
        if r["message"]:
            print(f"    {r['message']}")
    print(json.dumps({"bench": "faults", "exit": rc, "seconds": round(took, 1), "tests": rows}))
    return rc


def read_report(path: Path) -> list[dict[str, object]]:
    rows: list[dict[str, object]] = []
    for case in ET.parse(path).getroot().iter("testcase"):
        result, message = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                xfail = tag == "skipped" and "xfail" in (el.get("type", "") + el.get("message", ""))
                result = "xfail" if xfail else tag
                if tag != "skipped":
                    message = el.get("message", "").splitlines()[0][:300]
        props = {
            p.get("name", ""): p.get("value", "")
            for p in case.iter("property")
            if not p.get("name", "").startswith("hypothesis-")
        }
        rows.append(
            {
                "name": case.get("name", ""),
                "result": result,
                "seconds": float(case.get("time", "0")),
                "properties": props,
                "message": message,
            }
        )
    return rows


if __name__ == "__main__":
    raise SystemExit(main())

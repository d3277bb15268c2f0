"""`gateway demo` headless: what the sink recorded proves the whole path works."""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import cbor2
import pytest

from tests.conftest import ROOT, gateway_cmd

# A short, busy demo: a CDR every 3 s, a report every 6 s.
DEMO_ARGS = ("--duration", "14", "--devices", "3", "--rate", "2", "--cdr-interval", "3")
DEMO_ARGS += ("--report-every", "6")


def run_demo(workdir: Path, *extra: str, env: dict[str, str] | None = None) -> str:
    r = subprocess.run(
        gateway_cmd("demo", *DEMO_ARGS, "--workdir", str(workdir), *extra),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=env,
        timeout=120,
        stdin=subprocess.DEVNULL,
    )
    logs = {p.name: p.read_text(errors="replace")[-2000:] for p in workdir.glob("*.log")}
    assert r.returncode == 0, (r.stdout, r.stderr, logs)
    return r.stdout


def encoding_of(payload: Any) -> str:
    """json, cbor or binary: what a fleet device sent, told from the monoZ Payload."""
    if isinstance(payload, str) and payload.startswith("{"):
        json.loads(payload)
        return "json"
    raw = base64.b64decode(payload, validate=True)
    try:
        value = cbor2.loads(raw)
    except (cbor2.CBORDecodeError, ValueError):
        value = None
    if isinstance(value, dict):
        return "cbor"
    assert len(raw) == 27, raw  # the packed struct of firmware_sim/devices.py
    return "binary"


def check_record(workdir: Path) -> dict[str, list[dict[str, Any]]]:
    lines = (workdir / "requests.jsonl").read_text().splitlines()
    reqs = [json.loads(line) for line in lines]
    assert reqs
    for r in reqs:
        assert r["auth_ok"] is True, r
        assert r["signature_ok"] is True, r
        assert r["shape_error"] is None, r
        assert r["status"] == 200, r
    by_path: dict[str, list[dict[str, Any]]] = {}
    for r in reqs:
        by_path.setdefault(r["path"], []).append(r)
    return by_path


def assert_demo_delivered_everything(by_path: dict[str, list[dict[str, Any]]]) -> None:
    ingest = by_path["/ingest"]
    assert {r["shape"] for r in ingest} == {"monoz"}
    assert all(r["headers"]["1_Area"] == "Tokyo" for r in ingest)
    records = []
    for r in ingest:
        body = json.loads(r["body"])
        records += body if isinstance(body, list) else [body]
    kinds = Counter(encoding_of(rec["Payload"]) for rec in records)
    assert set(kinds) == {"json", "cbor", "binary"}, kinds
    assert all(isinstance(rec["ICCID"], int) for rec in records)

    cdrs = [c for r in by_path["/cdrs"] for c in json.loads(r["body"])]
    assert {r["shape"] for r in by_path["/cdrs"]} == {"monogoto"}
    assert cdrs
    assert all(c["CdrType"] == "DATA" and c["Usage"] >= 0 for c in cdrs)
    assert sum(c["Usage"] for c in cdrs) > 0

    events = [json.loads(r["body"]) for r in by_path["/events"]]
    assert {r["shape"] for r in by_path["/events"]} == {"envelope"}
    assert "gateway_started" in {e["event"]["event"] for e in events}
    assert all(e["meta"] == {"site": "demo"} and e["name"] == "ops" for e in events)

    notices = [json.loads(r["body"]) for r in by_path["/reports"]]
    assert notices
    assert all(n["error"] == "" and n["fileName"].endswith(".zip") for n in notices)
    assert sum(n["numberOfLines"] for n in notices) >= 1


def test_the_demo_delivers_all_encodings_cdrs_events_and_reports_signed(tmp_path: Path) -> None:
    out = run_demo(tmp_path / "demo")
    assert "broker: mosquitto" in out
    assert "summary" in out
    assert_demo_delivered_everything(check_record(tmp_path / "demo"))
    # The heavy traffic burst made one period's CDR pass the big-usage condition.
    alerts = check_record(tmp_path / "demo").get("/alerts", [])
    assert alerts
    assert all(json.loads(r["body"])["cdr"]["Usage"] > 20000 for r in alerts)


def test_the_demo_runs_on_the_embedded_broker_without_mosquitto(tmp_path: Path) -> None:
    pytest.importorskip("amqtt", reason="the embedded broker needs amqtt (dev extra)")
    path = os.pathsep.join(
        p for p in os.environ["PATH"].split(os.pathsep) if not (Path(p) / "mosquitto").exists()
    )
    # --broker amqtt: as `auto` picks on a machine without the package (/usr/sbin/mosquitto
    # cannot be hidden from a test; the choice itself is tested below).
    out = run_demo(tmp_path / "demo", "--broker", "amqtt", env={**os.environ, "PATH": path})
    assert "broker: amqtt" in out
    assert_demo_delivered_everything(check_record(tmp_path / "demo"))


def test_auto_picks_mosquitto_from_path_or_sbin_else_the_embedded_broker(tmp_path: Path) -> None:
    from gateway.demo import find_mosquitto

    assert find_mosquitto(path="", sbin=tmp_path) is None
    (tmp_path / "mosquitto").write_text("")
    assert find_mosquitto(path="", sbin=tmp_path) == str(tmp_path / "mosquitto")


PROGRESS = re.compile(
    r"^ *(\d+)s  received +\d+  delivered +\d+  in flight +\d+  dead letters +\d+"
    r"  CDRs +\d+ +(\d+\.\d) requests/s$"
)


def test_the_demo_logs_one_progress_line_every_5_s_with_a_steady_rate_when_piped(
    tmp_path: Path,
) -> None:
    # stdout is a pipe, as under systemd or `gateway demo > demo.log`.
    r = subprocess.run(
        gateway_cmd("demo", "--duration", "16", "--devices", "3", "--rate", "2",
                    "--workdir", str(tmp_path / "demo")),
        capture_output=True, text=True, cwd=ROOT, timeout=120, stdin=subprocess.DEVNULL,
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout, r.stderr)
    assert "\r" not in r.stdout
    lines = [m for line in r.stdout.splitlines() if (m := PROGRESS.match(line))]
    assert [int(m.group(1)) for m in lines] == [5, 10, 15], r.stdout
    # 3 devices at 2 packets/s, batched per second: about one request a second, never a
    # sample that fell between two batches.
    assert all(float(m.group(2)) >= 0.5 for m in lines), r.stdout


def test_the_rate_is_averaged_over_a_window_longer_than_a_batch() -> None:
    from gateway.demo import RATE_WINDOW_S, RateWindow

    # A webhook that sends 10 requests at once every 2 s, sampled every second.
    window = RateWindow(RATE_WINDOW_S, 0.0)
    rates = [window.add(float(t), 10 * (t // 2)) for t in range(1, 31)]
    assert all(4.0 <= r <= 6.0 for r in rates[10:]), rates


def test_the_demo_config_is_package_data_and_valid(tmp_path: Path) -> None:
    from importlib import resources

    from gateway import config

    # The installed wheel reads it from the package (tests/test_wheel.py runs that).
    text = resources.files("gateway").joinpath("demo.toml").read_text(encoding="utf-8")
    path = tmp_path / "demo.toml"
    path.write_text(text)
    cfg = config.load(path)
    assert {h.source for h in cfg.webhooks} == {"packets", "cdrs", "events", "reports"}

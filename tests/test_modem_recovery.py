"""The modem recovery ladder end to end: `gateway run` against the emulated modem on a pty
(behind a link, as udev gives one), a real broker, an events webhook on a real receiver."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from firmware_sim.control import ControlServer
from firmware_sim.modem import ModemEmulator
from gateway import config
from gateway.web import status as status_mod
from tests.conftest import ROOT, Broker, db_rows, free_port, gateway_cmd, until, write_config
from tests.receiver import Receiver

# Short timings: each step of the ladder is a second or two.
FAST = {"unregistered_s": 1, "unresponsive_s": 1, "settle_s": 2}


class Modem:
    """An emulated modem behind a link, with its control port served in-process."""

    def __init__(self, tmp_path: Path, **kwargs: Any) -> None:
        kwargs.setdefault("urcs", False)
        kwargs.setdefault("reboot_s", 0.3)
        self.link = tmp_path / "ttyModem"
        self.emu = ModemEmulator("quectel", link=self.link, **kwargs)
        self.emu.start_pty()
        self.control = ControlServer(("127.0.0.1", 0), self.emu)
        threading.Thread(target=self.control.serve_forever, args=(0.1,), daemon=True).start()

    @property
    def power_command(self) -> str:
        port = self.control.server_address[1]
        return f"{sys.executable} -m firmware_sim modem-control 127.0.0.1:{port} power_cycle"

    def sent(self, prefix: str) -> list[str]:
        return [c for c in list(self.emu.commands) if c.upper().startswith(prefix)]

    def stop(self) -> None:
        self.control.shutdown()
        self.control.server_close()
        self.emu.stop()


@pytest.fixture
def modem(tmp_path: Path) -> Iterator[Any]:
    made: list[Modem] = []

    def make(**kwargs: Any) -> Modem:
        m = Modem(tmp_path, **kwargs)
        made.append(m)
        return m

    yield make
    for m in made:
        m.stop()


def gw_config(
    tmp_path: Path,
    broker: Broker,
    modem: Modem,
    receiver: Receiver | None = None,
    web_port: int = 0,
    **recovery: Any,
) -> config.Config:
    rec = {**FAST, **recovery}
    lines = "\n".join(f"{k} = {json.dumps(v)}" for k, v in rec.items())
    hook = ""
    if receiver is not None:
        hook = f"""
[[webhooks]]
name = "ops"
url = "{receiver.url}"
source = "events"
format = "envelope"
batch = {{ window_ms = 0, max_items = 1 }}
"""
    path = write_config(
        tmp_path / "gw.toml",
        broker.port,
        tmp_path / "state",
        web=f'listen = "127.0.0.1:{web_port}"' if web_port else "enabled = false",
        extra=f"""
[modem]
port = "{modem.link}"
poll_interval_s = 0.2
command_timeout_s = 0.3

[modem.recovery]
{lines}

[cdr]
interval_s = 1
{hook}
""",
    )
    return config.load(path)


def events(cfg: config.Config, *kinds: str) -> list[tuple[str, dict[str, Any]]]:
    marks = ",".join("?" * len(kinds))
    try:
        rows = db_rows(
            cfg.db_path, f"SELECT kind, data FROM events WHERE kind IN ({marks}) ORDER BY id", kinds
        )
    except Exception:
        return []  # the store is not made yet
    return [(str(k), json.loads(str(d))) for k, d in rows]


def steps(cfg: config.Config) -> list[str]:
    return [d["step"] for _, d in events(cfg, "modem_recovery")]


async def wait_ok(cfg: config.Config) -> None:
    await until(
        lambda: any(k == "ok" for k in _states(cfg)), 20, "the first answering modem snapshot"
    )


def _states(cfg: config.Config) -> list[str]:
    try:
        return [str(s) for (s,) in db_rows(cfg.db_path, "SELECT state FROM modem_snapshots")]
    except Exception:
        return []


async def test_lost_registration_is_radio_cycled_and_reported_to_the_events_webhook(
    mosquitto: Broker,
    tmp_path: Path,
    modem: Any,
    receiver: Receiver,
    gateway_proc: Any,
    http: aiohttp.ClientSession,
) -> None:
    m = modem()
    web = free_port()
    cfg = gw_config(tmp_path, mosquitto, m, receiver, web_port=web)
    gateway_proc(cfg.path).start()
    await wait_ok(cfg)
    m.emu.set_fault("unregistered")
    await until(
        lambda: "registration_regained" in [k for k, _ in events(cfg, "registration_regained")],
        20,
        "registration_regained",
    )
    kinds = [(k, d.get("step")) for k, d in events(cfg, "registration_lost", "modem_recovery")]
    assert kinds == [("registration_lost", None), ("modem_recovery", "radio_cycle")]
    step = events(cfg, "modem_recovery")[0][1]
    assert step["attempt"] == 1
    assert "not registered (searching)" in step["reason"]
    assert m.sent("AT+CFUN=") == ["AT+CFUN=0", "AT+CFUN=1"]

    def delivered() -> list[dict[str, Any]]:
        return [r["event"] for r in receiver.delivered() if r["event"]["event"] == "modem_recovery"]

    await until(delivered, 20, "the modem_recovery event at the events webhook")
    assert delivered()[0]["data"]["step"] == "radio_cycle"

    snap = status_mod.read(cfg.db_path, cfg)
    rec = snap["modem"]["recovery"]
    assert rec["totals"]["radio_cycle"] == 1
    assert rec["resets_last_hour"] == 1
    assert rec["last"]["outcome"] == "recovered"
    assert rec["state"] == "idle"
    async with http.get(f"http://127.0.0.1:{web}/metrics") as r:
        text = await r.text()
    assert 'gateway_modem_recoveries_total{step="radio_cycle"} 1.0' in text
    assert 'gateway_modem_recoveries_total{step="reset"} 0.0' in text


async def test_registration_a_radio_cycle_cannot_bring_back_is_reset(
    mosquitto: Broker, tmp_path: Path, modem: Any, gateway_proc: Any
) -> None:
    m = modem()
    cfg = gw_config(tmp_path, mosquitto, m)
    gateway_proc(cfg.path).start()
    await wait_ok(cfg)
    m.emu.set_fault("unregistered_until_reset")
    await until(lambda: events(cfg, "registration_regained"), 30, "registration_regained")
    assert steps(cfg) == ["radio_cycle", "reset"]
    assert m.sent("AT+CFUN=") == ["AT+CFUN=0", "AT+CFUN=1", "AT+CFUN=1,1"]
    assert m.emu.state()["reboots"] == 1
    # Back from the reboot the modem echoed again; the gateway set it up again.
    await until(lambda: not m.emu.echo, 10, "echo off again")
    assert m.sent("AT+CMEE=1")[-1:] == ["AT+CMEE=1"]
    assert [d["attempt"] for _, d in events(cfg, "modem_recovery")] == [1, 2]


@pytest.mark.parametrize(
    ("fault", "want"),
    [("hung", ["reopen", "reset"]), ("unresponsive", ["reopen", "reset", "power_cycle"])],
)
async def test_a_silent_modem_is_reopened_then_reset_then_power_cycled(
    mosquitto: Broker,
    tmp_path: Path,
    modem: Any,
    gateway_proc: Any,
    fault: str,
    want: list[str],
) -> None:
    m = modem()
    cfg = gw_config(tmp_path, mosquitto, m, power_cycle_command=m.power_command)
    gateway_proc(cfg.path).start()
    await wait_ok(cfg)
    m.emu.set_fault(fault)
    await until(lambda: events(cfg, "modem_recovered"), 40, "modem_recovered")
    assert steps(cfg) == want
    assert [k for k, _ in events(cfg, "modem_unreachable", "modem_recovered")] == [
        "modem_unreachable",
        "modem_recovered",
    ]
    state = m.emu.state()
    assert state["faults"] == []
    assert state["power_cycles"] == (1 if fault == "unresponsive" else 0)
    reason = events(cfg, "modem_recovery")[0][1]["reason"]
    assert reason.startswith("no valid AT answer")

    def outcome() -> str:
        last = status_mod.read(cfg.db_path, cfg)["modem"]["recovery"]["last"] or {}
        return str(last.get("outcome"))

    await until(lambda: outcome() == "recovered", 20, "the ladder to end")


async def test_a_spent_budget_gives_up_and_stays_so_across_a_restart_then_a_manual_reset(
    mosquitto: Broker, tmp_path: Path, modem: Any, gateway_proc: Any
) -> None:
    m = modem()
    cfg = gw_config(tmp_path, mosquitto, m, max_resets_per_hour=1)
    first = gateway_proc(cfg.path)
    first.start()
    await wait_ok(cfg)
    m.emu.set_fault("unregistered_until_reset")
    await until(lambda: "gave_up" in steps(cfg), 30, "gave_up")
    assert steps(cfg) == ["radio_cycle", "gave_up"]
    gave_up = events(cfg, "modem_recovery")[1][1]
    assert "1 radio cycle(s) and reset(s) in the last hour" in gave_up["reason"]
    assert not m.sent("AT+CFUN=1,1")

    assert first.terminate() == 0
    polled = len(_states(cfg))
    second = gateway_proc(cfg.path)
    second.start()
    # Longer than unregistered_s and settle_s together after the restart: a ladder that
    # started over would have cycled the radio again by now.
    await until(lambda: len(_states(cfg)) > polled + 20, 20, "polls after the restart")
    assert steps(cfg) == ["radio_cycle", "gave_up"]
    assert m.sent("AT+CFUN=") == ["AT+CFUN=0", "AT+CFUN=1"]
    rec = status_mod.read(cfg.db_path, cfg)["modem"]["recovery"]
    assert rec["state"] == "gave_up"
    assert rec["resets_last_hour"] == 1

    assert cfg.path is not None

    async def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return await asyncio.to_thread(
            subprocess.run,
            gateway_cmd(*args, "-c", str(cfg.path)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
            check=False,
        )

    status = await cli("status")
    assert "recovery gave up until" in status.stdout
    assert "radio_cycle=1" in status.stdout
    busy = await cli("modem", "reset")
    assert busy.returncode == 2
    assert "in use by another process" in busy.stderr
    assert "Stop the gateway" in busy.stderr

    assert second.terminate() == 0
    done = await cli("modem", "reset")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 radio cycle(s) and reset(s) in the last hour, limit 1 (over the limit" in done.stdout
    assert "AT+CFUN=1,1 sent; the modem answered again" in done.stdout
    assert m.sent("AT+CFUN=1,1") == ["AT+CFUN=1,1"]
    assert m.emu.state()["faults"] == []
    manual = events(cfg, "modem_recovery")[-1][1]
    assert (manual["step"], manual["reason"]) == ("reset", "manual: gateway modem reset")


async def test_usage_across_a_recovery_reset_is_neither_lost_nor_counted_twice(
    mosquitto: Broker, tmp_path: Path, modem: Any, gateway_proc: Any
) -> None:
    m = modem(counter_start=7000)
    cfg = gw_config(tmp_path, mosquitto, m)
    gateway_proc(cfg.path).start()
    await wait_ok(cfg)  # the baseline reading: 7000 bytes the gateway never bills

    def billed() -> int:
        rows = db_rows(
            cfg.db_path,
            "SELECT (SELECT COALESCE(SUM(usage), 0) FROM cdrs)"
            " + (SELECT COALESCE(SUM(pending), 0) FROM cdr_state)",
        )
        return int(rows[0][0])  # type: ignore[call-overload]

    m.emu.add_traffic(1000, 2500)
    await until(lambda: billed() == 3500, 20, "the first traffic billed")
    m.emu.set_fault("unregistered_until_reset")
    m.emu.add_traffic(400, 0)  # counted by the modem before it is reset
    await until(lambda: events(cfg, "registration_regained"), 30, "registration_regained")
    assert steps(cfg) == ["radio_cycle", "reset"]
    assert events(cfg, "counters_reset")  # the reset zeroed the modem's counters
    m.emu.add_traffic(300, 1200)
    counted = int(m.emu.state()["counted_bytes"])
    assert counted == 3500 + 400 + 1500
    await until(lambda: billed() == counted, 20, f"{counted} bytes billed (got {billed()})")
    await until(
        lambda: db_rows(cfg.db_path, "SELECT COUNT(*) FROM cdrs")[0][0], 20, "a CDR emitted"
    )
    assert billed() == counted


@pytest.mark.parametrize(
    "stored",
    [
        "not json",
        "[1, 2]",
        '{"budget": "x", "last": {"step": 5}, "resume_at": "soon", "attempt": null}',
        '{"budget": [1e12, "a", true], "last": {"step": "reset", "at": "yesterday"},'
        ' "resume_at": 1e12, "attempt": "2", "last_step": "explode", "step_at": 1e12,'
        ' "problem": "unregistered"}',
    ],
)
def test_a_damaged_recovery_row_never_fails_the_status_or_the_ladder(
    tmp_path: Path, stored: str
) -> None:
    from gateway.modem import recovery
    from gateway.store import connect, migrate, set_meta

    cfg = config.parse(
        {"mqtt": {"host": "h"}, "modem": {}, "gateway": {"state_dir": str(tmp_path)}}, {}
    )
    conn = connect(cfg.db_path)
    try:
        migrate(conn)
        set_meta(conn, recovery.META_KEY, stored)
        conn.commit()
        now = 1_700_000_000.0
        rec = status_mod.snapshot(conn, cfg, int(now * 1e9))["modem"]["recovery"]
        saved = recovery.load_saved(conn)
    finally:
        conn.close()
    assert rec["state"] in ("idle", "gave_up")
    if rec["resume_at"] is not None:
        assert rec["resume_at"] <= now + recovery.WINDOW_S  # a clock set back: an hour at most
    assert rec["resets_last_hour"] in (0, 1)  # a timestamp in the future counts as now
    assert rec["last"] is None or set(rec["last"]) <= {"step", "attempt", "reason", "at"}
    assert cfg.modem is not None
    ladder = recovery.Ladder(cfg.modem.recovery, saved, now)
    assert ladder.resume_wall <= now + recovery.WINDOW_S
    assert ladder.observe("unregistered", 10.0, now) in (None, "radio_cycle")
    assert ladder.observe("", 11.0, now) in (None, "recovered")


def test_manual_radio_cycle_brings_registration_back_and_is_counted(
    mosquitto: Broker, tmp_path: Path, modem: Any
) -> None:
    m = modem()
    cfg = gw_config(tmp_path, mosquitto, m)
    m.emu.set_fault("unregistered")
    assert cfg.path is not None
    run = subprocess.run(
        gateway_cmd("modem", "reset", "-c", str(cfg.path), "--step", "radio_cycle"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=60,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert "radio_cycle: 1 radio cycle(s) and reset(s) in the last hour, limit 2\n" in run.stdout
    assert "radio cycle done; registration: home" in run.stdout
    assert m.sent("AT+CFUN=") == ["AT+CFUN=0", "AT+CFUN=1"]
    assert steps(cfg) == ["radio_cycle"]
    rec = status_mod.read(cfg.db_path, cfg)["modem"]["recovery"]
    assert (rec["resets_last_hour"], rec["totals"]["radio_cycle"]) == (1, 1)

"""The emulated modem's radio, and radio diagnostics end to end: `gateway modem info` over a
real pty for every vendor, the poller, and a running gateway's API, /metrics and CLI."""

from __future__ import annotations

import asyncio
import json
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from firmware_sim.modem import ModemEmulator
from gateway.config import ModemSection
from gateway.modem import info as modem_info
from gateway.modem import poller
from gateway.modem.poller import ModemState
from gateway.modem.profiles import ModemInfo
from gateway.store import Store
from tests.conftest import ROOT, Broker, free_port, gateway_cmd, wait_for, write_config

RADIO_KEYS = ("access_technology", "rsrp_dbm", "rsrq_db", "sinr_db", "cell_id", "tac")
EXTRA_KEYS = ("band", "earfcn", "pci", "rscp_dbm", "ecno_db")
CELL, TAC = 0x2B3C4D5, 0x0F12
# What each vendor's commands give beyond AT+CESQ and AT+CEREG (the pinned values below).
LTE_EXTRAS: dict[str, dict[str, Any]] = {
    "generic": {"sinr_db": None, "band": None, "earfcn": None, "pci": None},
    "quectel": {"sinr_db": 13.0, "band": 20, "earfcn": 6300, "pci": 301},
    "ublox": {"sinr_db": None, "band": None, "earfcn": 6300, "pci": 301},
    "simcom": {"sinr_db": 13.0, "band": 20, "earfcn": 6300, "pci": 301},
    "telit": {"sinr_db": 13.0, "band": 20, "earfcn": 6300, "pci": None},
    "huawei": {"sinr_db": 13.0, "band": None, "earfcn": None, "pci": None},
}


@pytest.fixture
def emulators() -> Iterator[list[ModemEmulator]]:
    started: list[ModemEmulator] = []
    yield started
    for emu in started:
        emu.stop()


def pinned(vendor: str, started: list[ModemEmulator], *settings: str, **kw: Any) -> str:
    """A pty emulator with its radio pinned; returns the pty path."""
    emu = ModemEmulator(vendor, seed=11, urc_interval=0.2, **kw)
    started.append(emu)
    for s in settings:
        assert emu.control(f"radio {s}") == "ok", s
    return emu.start_pty()


def info_json(url: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    assert modem_info.command(url, "auto", as_json=True, timeout=2.0) == 0
    return json.loads(capsys.readouterr().out)  # type: ignore[no-any-return]


# -- the emulator -----------------------------------------------------------------------------


def test_levels_move_within_bounds_repeatably_and_pinned_ones_stay() -> None:
    def walk(seed: int) -> list[tuple[float, float]]:
        emu = ModemEmulator("generic", seed=seed, urcs=False)
        emu.control("radio sinr 7")
        out = []
        for _ in range(60):
            emu.radio.step()
            c = emu.radio.cond
            out.append((c.rsrp, c.sinr))
        return out

    a, b = walk(5), walk(5)
    assert a == b
    rsrps = {r for r, _ in a}
    assert len(rsrps) > 3  # it moves
    assert all(-98.0 <= r <= -86.0 for r in rsrps)  # within 6 dB of where it started
    assert {s for _, s in a} == {7.0}
    assert walk(6) != a


def test_control_port_commands_set_the_radio() -> None:
    emu = ModemEmulator("quectel", urcs=False)
    assert emu.control("radio rat nb-iot") == "ok"
    assert emu.control("radio cell_id 1A2B") == "ok"
    assert emu.control("radio rsrp -101.5") == "ok"
    assert emu.control("radio rat wifi").startswith("error: unknown rat")
    assert emu.control("radio rsrp loud").startswith("error:")
    assert emu.control("radio colour blue").startswith("error: unknown radio setting")
    state = json.loads(emu.control("state"))["radio"]
    assert (state["rat"], state["cell_id"], state["rsrp"]) == ("nb-iot", 0x1A2B, -101.5)
    assert state["pinned"] == ["rsrp"]


# -- modem info over a pty, per vendor -------------------------------------------------------


@pytest.mark.parametrize("vendor", list(LTE_EXTRAS))
def test_modem_info_json_reports_the_pinned_radio_of_every_vendor(
    vendor: str, emulators: list[ModemEmulator], capsys: pytest.CaptureFixture[str]
) -> None:
    url = pinned(
        vendor,
        emulators,
        "rat lte-m",
        "rsrp -95",
        "rsrq -11",
        "sinr 13",
        f"cell_id {CELL:X}",
        f"tac {TAC:X}",
        "band 20",
        "earfcn 6300",
        "pci 301",
    )
    data = info_json(url, capsys)
    assert "radio" not in data["failed"]
    got = {k: data[k] for k in (*RADIO_KEYS, *EXTRA_KEYS)}
    assert got == {
        "access_technology": "lte-m",
        "rsrp_dbm": -95.0,
        "rsrq_db": -11.0,
        "cell_id": CELL,
        "tac": TAC,
        "rscp_dbm": None,
        "ecno_db": None,
        **LTE_EXTRAS[vendor],
    }


@pytest.mark.parametrize("vendor", ["generic", "huawei", "quectel"])
def test_umts_reports_rscp_and_ecno_and_no_lte_levels(
    vendor: str, emulators: list[ModemEmulator], capsys: pytest.CaptureFixture[str]
) -> None:
    url = pinned(vendor, emulators, "rat umts", "rscp -85", "ecno -7.5")
    data = info_json(url, capsys)
    assert {k: data[k] for k in (*RADIO_KEYS, "rscp_dbm", "ecno_db")} == {
        "access_technology": "umts",
        "rsrp_dbm": None,
        "rsrq_db": None,
        "sinr_db": None,
        "cell_id": None,
        "tac": None,
        "rscp_dbm": -85.0,
        "ecno_db": -7.5,
    }


def test_a_modem_without_radio_commands_reads_as_before_with_nulls(
    emulators: list[ModemEmulator], capsys: pytest.CaptureFixture[str]
) -> None:
    url = pinned("generic", emulators, "off")
    data = info_json(url, capsys)
    assert all(data[k] is None for k in (*RADIO_KEYS, *EXTRA_KEYS))
    assert "radio" not in data["failed"]
    assert (data["registration"], data["csq"], data["operator"]) == ("home", 20, "NTT DOCOMO")


def test_no_service_reports_nulls_and_the_technology_stays_unknown(
    emulators: list[ModemEmulator], capsys: pytest.CaptureFixture[str]
) -> None:
    for vendor in ("quectel", "huawei", "simcom", "telit"):
        emu = ModemEmulator(vendor, seed=1, urcs=False)
        emulators.append(emu)
        emu.set_registration("searching")
        data = info_json(emu.start_pty(), capsys)
        assert all(data[k] is None for k in (*RADIO_KEYS, *EXTRA_KEYS)), (vendor, data)


# -- a running gateway ------------------------------------------------------------------------


def _get(url: str, token: str) -> bytes:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(req, timeout=5) as r:
        return r.read()  # type: ignore[no-any-return]


def test_a_running_gateway_shows_the_radio_in_api_metrics_status_and_history(
    mosquitto: Broker, tmp_path: Path, gateway_proc: Any, emulators: list[ModemEmulator]
) -> None:
    token = "radio-test-token"
    emu = ModemEmulator("huawei", seed=3, urc_interval=0.2)
    emulators.append(emu)
    for s in ("rat lte", "rsrp -85", "rsrq -9", "sinr 15", f"cell_id {CELL:X}", f"tac {TAC:X}"):
        assert emu.control(f"radio {s}") == "ok"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        web=f'listen = "127.0.0.1:{port}"\ntoken = "{token}"',
        extra=f'[modem]\nport = "{emu.start_pty()}"\npoll_interval_s = 0.3\n',
    )
    gw = gateway_proc(cfg)
    gw.start()

    def modem() -> dict[str, Any]:
        try:
            return json.loads(_get(base + "/api/status", token))["modem"]  # type: ignore[no-any-return]
        except OSError:
            return {}

    wait_for(lambda: (modem().get("info") or {}).get("rsrp_dbm") == -85.0, 20, "RSRP -85")
    m = modem()
    assert m["signal_quality"] == "good"  # RSRP -85 good, SINR 15 good
    i = m["info"]
    assert (i["access_technology"], i["sinr_db"], i["cell_id"], i["tac"]) == (
        "lte",
        15.0,
        CELL,
        TAC,
    )
    samples = {
        s.name: s.value
        for fam in text_string_to_metric_families(_get(base + "/metrics", token).decode())
        for s in fam.samples
    }
    assert samples["gateway_modem_rsrp_dbm"] == -85.0
    assert samples["gateway_modem_rsrq_db"] == -9.0
    assert samples["gateway_modem_sinr_db"] == 15.0
    assert "gateway_modem_rscp_dbm" not in samples

    # The installer turns the antenna: worse signal, a poorer grade, both in the history.
    assert emu.control("radio rsrp -104") == "ok"
    wait_for(lambda: modem().get("signal_quality") == "poor", 20, "the grade to become poor")
    status = subprocess.run(
        gateway_cmd("status", "-c", str(cfg)), capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert status.returncode == 0, status.stderr
    assert "radio    lte  RSRP -104 dBm  RSRQ -9 dB  SINR 15 dB" in status.stdout
    assert f"cell {CELL} TAC {TAC}  quality poor" in status.stdout
    history = subprocess.run(
        gateway_cmd("modem", "signal", "-c", str(cfg), "--since", "10m", "--json"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert history.returncode == 0, history.stderr
    rows = json.loads(history.stdout)
    grades = [r["signal_quality"] for r in rows if r["rsrp_dbm"] is not None]
    assert "good" in grades
    assert grades[-1] == "poor"
    assert grades.index("good") < grades.index("poor")
    table = subprocess.run(
        gateway_cmd("modem", "signal", "-c", str(cfg)),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
    )
    assert table.returncode == 0, table.stderr
    assert table.stdout.splitlines()[0].startswith("time (UTC)")
    assert "-104" in table.stdout.splitlines()[-1]
    assert gw.terminate() == 0


# -- the poller -------------------------------------------------------------------------------


async def test_the_poller_keeps_a_modem_without_radio_commands_ok_and_stops_asking(
    tmp_path: Path, emulators: list[ModemEmulator]
) -> None:
    url = pinned("generic", emulators, "off")
    emu = emulators[-1]
    store = Store(tmp_path / "gateway.db")
    state = ModemState()
    cfg = ModemSection(port=url, poll_interval_s=0.05, command_timeout_s=0.5)
    task = asyncio.create_task(poller.run(cfg, store, state=state, sysfs_root=tmp_path))
    try:
        deadline = time.monotonic() + 10
        while state.state != "ok" or list(emu.commands).count("AT+CSQ") < 5:
            assert time.monotonic() < deadline, f"five polls (state {state.state})"
            await asyncio.sleep(0.02)
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.close()
    assert state.info is not None
    assert "radio" not in dict(state.info.failed)
    assert state.info.rsrp_dbm is None
    assert state.info.access_technology is None
    # Asked once on this connection, then known not to be there.
    sent = list(emu.commands)
    assert sent.count("AT+CESQ") == 1
    assert sent.count("AT+CEREG=2") == 1


def test_the_poller_reads_registration_urcs_in_the_n2_form(tmp_path: Path) -> None:
    store = Store(tmp_path / "gateway.db")
    try:
        p = poller._Poller(
            ModemSection(port="/dev/null"), store, None, ModemState(), tmp_path, None
        )
        p.info = ModemInfo(registration="home")
        # A handover while registered changes nothing the poller waits for.
        p._on_urc('+CEREG: 1,"1A2C","01A2B3C5",7')
        assert not p.dirty.is_set()
        p._on_urc("+CEREG: 2")
        assert p.dirty.is_set()
        p.dirty.clear()
        p.info = ModemInfo(registration="searching")
        p._on_urc('+CEREG: 5,"1A2B","01A2B3C4",9')
        assert p.dirty.is_set()
    finally:
        store.close()


async def test_after_a_modem_reset_the_poller_sets_its_radio_modes_again(
    tmp_path: Path, emulators: list[ModemEmulator]
) -> None:
    url = pinned("ublox", emulators, "pci 77")
    emu = emulators[-1]
    store = Store(tmp_path / "gateway.db")
    state = ModemState()
    cfg = ModemSection(port=url, poll_interval_s=0.05, command_timeout_s=0.5)
    task = asyncio.create_task(poller.run(cfg, store, state=state, sysfs_root=tmp_path))

    async def until(what: str, pred: Any) -> None:
        deadline = time.monotonic() + 10
        while not pred():
            assert time.monotonic() < deadline, what
            await asyncio.sleep(0.02)

    def located() -> bool:
        i = state.info
        return i is not None and i.pci == 77 and i.cell_id is not None

    try:
        await until("the first located reading", located)
        emu.reboot()  # +CEREG back to n=0, +UCGED back to mode 0
        await until(
            "the modes set again", lambda: emu.radio.cereg_n == 2 and emu.radio.ucged_mode == 5
        )
        sent = list(emu.commands)
        assert sent.count("AT+CEREG=2") == sent.count("AT+UCGED=5") == 2
        after = time.time_ns()
        await until(
            "a located reading after the reset", lambda: state.updated_ns > after and located()
        )
    finally:
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        store.close()

"""End to end over real ptys and TCP ports: the firmware_sim modem, `modem info`, the poller."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from firmware_sim.modem import Identity, ModemEmulator
from gateway.config import ModemSection
from gateway.modem import info as modem_info
from gateway.modem import poller
from gateway.modem.at import AtChannel, AtTimeout
from gateway.modem.poller import ModemState
from gateway.modem.profiles import make_profile, read_all
from gateway.store import Store
from tests.conftest import free_port, wait_for

VENDORS = ("generic", "quectel", "ublox", "simcom", "telit", "huawei")
BIG = 5_000_000_000  # counters above 2**32
SYSFS_TX, SYSFS_RX = 2**33 + 1, 2**32 + 7
IDENT = Identity(
    iccid="8944200053671052499",
    imsi="234150123456789",
    imei="356938035643809",
    msisdn="+447700900123",
    operator="Vodafone UK",
    plmn="23415",
    apn="pp.vodafone.co.uk",
    csq=17,
    registration="roaming",
)

Factory = Callable[..., ModemEmulator]


@pytest.fixture
def sysfs_root(tmp_path: Path) -> Path:
    d = tmp_path / "sys" / "wwan0" / "statistics"
    d.mkdir(parents=True)
    (d / "tx_bytes").write_text(f"{SYSFS_TX}\n")
    (d / "rx_bytes").write_text(f"{SYSFS_RX}\n")
    return tmp_path / "sys"


@pytest.fixture
def emulator() -> Iterator[Factory]:
    """Start ModemEmulators (stopped at teardown); URCs on with a fixed seed by default."""
    started: list[ModemEmulator] = []

    def make(vendor: str = "quectel", **kwargs: Any) -> ModemEmulator:
        kwargs.setdefault("identity", IDENT)
        kwargs.setdefault("seed", 7)
        kwargs.setdefault("urc_interval", 0.1)
        kwargs.setdefault("counter_start", BIG)
        emu = ModemEmulator(vendor, **kwargs)
        started.append(emu)
        return emu

    yield make
    for emu in started:
        emu.stop()


# -- modem info ---------------------------------------------------------------------------


@pytest.mark.parametrize("vendor", VENDORS)
def test_modem_info_json_for_every_vendor_over_a_pty(
    vendor: str, emulator: Factory, sysfs_root: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    emu = emulator(vendor)
    url = emu.start_pty()
    rc = modem_info.command(url, "auto", as_json=True, timeout=2.0, sysfs_root=sysfs_root)
    out, err = capsys.readouterr()
    assert rc == 0, err
    data = json.loads(out)
    assert data["failed"] == {}
    assert data["profile"] == vendor
    assert {
        k: data[k]
        for k in (
            "iccid",
            "imsi",
            "imei",
            "msisdn",
            "operator",
            "mcc",
            "mnc",
            "apn",
            "csq",
            "signal_dbm",
            "registration",
            "sim_state",
        )
    } == {
        "iccid": "8944200053671052499",
        "imsi": "234150123456789",
        "imei": "356938035643809",
        "msisdn": "+447700900123",
        "operator": "Vodafone UK",
        "mcc": "234",
        "mnc": "15",
        "apn": "pp.vodafone.co.uk",
        "csq": 17,
        "signal_dbm": -79,
        "registration": "roaming",
        "sim_state": "ready",
    }
    if vendor in ("simcom", "generic"):
        assert (data["tx_bytes"], data["rx_bytes"]) == (SYSFS_TX, SYSFS_RX)
        assert data["counter_source"] == "sysfs:wwan0"
    else:
        assert data["tx_bytes"] >= BIG
        assert data["rx_bytes"] >= BIG
        assert data["counter_source"].startswith(("AT+", "AT#", "AT^"))
    assert "ATE0" in emu.commands


def test_modem_info_text_over_tcp_with_an_explicit_profile(
    emulator: Factory, capsys: pytest.CaptureFixture[str]
) -> None:
    emu = emulator("telit", identity=Identity(msisdn=""), tx_rate=0, rx_rate=0)
    url = emu.start_tcp()
    assert url.startswith("socket://127.0.0.1:")
    assert modem_info.command(url, "telit", timeout=2.0) == 0
    out = capsys.readouterr().out
    assert re.search(r"^profile: +telit$", out, re.M)
    assert re.search(r"^msisdn: +-$", out, re.M)
    assert re.search(rf"^tx_bytes: +{BIG}$", out, re.M)


def test_modem_info_errors_are_one_line_and_exit_2(
    emulator: Factory, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    assert modem_info.command(str(tmp_path / "ttyUSB9"), timeout=0.2) == 2
    err = capsys.readouterr().err
    assert err.startswith("modem info: cannot open modem port")
    assert err.count("\n") == 1
    emu = emulator("quectel", faults=("silence",))
    url = emu.start_pty()
    assert modem_info.command(url, timeout=0.1) == 2
    assert "did not answer AT within" in capsys.readouterr().err
    assert modem_info.command(url, "nokia") == 2
    assert "unknown modem profile 'nokia'" in capsys.readouterr().err


def test_modem_info_without_a_sim_names_what_failed(
    emulator: Factory, capsys: pytest.CaptureFixture[str]
) -> None:
    emu = emulator("huawei", faults=("no_sim",))
    assert modem_info.command(emu.start_pty(), as_json=True, timeout=1.0) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["sim_state"] == "not_inserted"
    assert data["registration"] == "not_registered"
    assert set(data["failed"]) == {"iccid", "imsi", "msisdn"}


# -- faults on the channel --------------------------------------------------------------------


def test_garbage_bursts_and_urcs_do_not_change_what_is_read(emulator: Factory) -> None:
    emu = emulator("quectel", faults=("garbage",), urc_interval=0.02, tx_rate=0, rx_rate=0)
    assert emu.control("radio rsrp -95") == emu.control("radio sinr 13") == "ok"
    with AtChannel.open(emu.start_pty(), timeout=1.0) as ch:
        ch.init()
        for _ in range(5):
            info = read_all(ch, make_profile("quectel"))
            assert info.failed == ()
            assert (info.iccid, info.imsi, info.operator, info.tx_bytes) == (
                IDENT.iccid,
                IDENT.imsi,
                IDENT.operator,
                BIG,
            )
            assert (info.rsrp_dbm, info.sinr_db, info.band) == (-95.0, 13.0, 3)
    assert ch.urcs  # they arrived, and went to the URC list


def test_slow_answers_time_out_then_are_read_with_a_longer_timeout(emulator: Factory) -> None:
    emu = emulator("ublox", urcs=False, slow_s=0.3)
    with AtChannel.open(emu.start_pty(), timeout=1.0) as ch:
        ch.init()
        emu.set_fault("slow")
        with pytest.raises(AtTimeout):
            ch.command("AT+CSQ", timeout=0.1)
        assert ch.command("AT+CSQ", timeout=2.0) == ["+CSQ: 17,99"]


def test_subprocess_emulator_prints_its_pty_and_obeys_the_control_port(
    capsys: pytest.CaptureFixture[str],
) -> None:
    control = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "firmware_sim",
            "modem",
            "--vendor",
            "quectel",
            "--pty",
            "--control",
            f"127.0.0.1:{control}",
            "--seed",
            "1",
            "--counter-start",
            str(BIG),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).resolve().parent.parent,
    )
    try:
        assert proc.stdout is not None
        path = proc.stdout.readline().strip()
        assert path.startswith("/dev/pts/")
        assert modem_info.command(path, as_json=True, timeout=2.0) == 0
        assert json.loads(capsys.readouterr().out)["tx_bytes"] >= BIG
        with socket.create_connection(("127.0.0.1", control), timeout=5) as s:
            f = s.makefile("rw")
            for line, reply in (
                ("fault no_sim on", "ok"),
                ("fault nope on", "error"),
                ("reset_counters", "ok"),
            ):
                f.write(line + "\n")
                f.flush()
                assert f.readline().startswith(reply)
            f.write("state\n")
            f.flush()
            state = json.loads(f.readline())
            assert state["faults"] == ["no_sim"]
            assert state["tx_bytes"] < BIG
        assert modem_info.command(path, as_json=True, timeout=2.0) == 0
        assert json.loads(capsys.readouterr().out)["sim_state"] == "not_inserted"
    finally:
        proc.terminate()
        assert proc.wait(10) == 0
        if proc.stdout:
            proc.stdout.close()
        if proc.stderr:
            proc.stderr.close()


# -- the poller ---------------------------------------------------------------------------------


async def until(pred: Callable[[], object], what: str, timeout: float = 10.0) -> None:
    """Poll pred until it holds or the deadline passes."""
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        await asyncio.sleep(0.02)


async def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    def q(conn: Any) -> list[tuple[Any, ...]]:
        return list(conn.execute(sql))

    return await asyncio.wrap_future(store.call(q))


class Harness:
    """A poller task against a real Store, with its state and the events it reported."""

    def __init__(self, store: Store, cfg: ModemSection, sysfs_root: Path) -> None:
        self.store = store
        self.cfg = cfg
        self.state = ModemState()
        self.events: list[tuple[str, dict[str, Any]]] = []
        self.task = asyncio.create_task(
            poller.run(
                cfg,
                store,
                on_event=lambda k, d: self.events.append((k, d)),
                state=self.state,
                sysfs_root=sysfs_root,
            )
        )

    def kinds(self) -> list[str]:
        return [k for k, _ in self.events]

    async def wait_state(self, state: str, timeout: float = 10.0) -> None:
        await until(
            lambda: self.state.state == state,
            f"modem state {state!r} (now {self.state.state!r}: {self.state.last_error})",
            timeout,
        )

    async def wait_event(self, kind: str, timeout: float = 10.0) -> dict[str, Any]:
        await until(lambda: kind in self.kinds(), f"event {kind!r} (got {self.kinds()})", timeout)
        return next(d for k, d in self.events if k == kind)

    async def stop(self) -> None:
        self.task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await self.task


@pytest.fixture
async def harness(tmp_path: Path, sysfs_root: Path) -> Any:
    stores: list[Store] = []
    harnesses: list[Harness] = []

    def start(port: str, profile: str = "auto", **kw: Any) -> Harness:
        if not stores:
            stores.append(Store(tmp_path / "gateway.db"))
        cfg = ModemSection(
            port=port,
            profile=profile,
            poll_interval_s=kw.pop("poll", 0.2),
            command_timeout_s=kw.pop("timeout", 0.3),
        )
        h = Harness(stores[0], cfg, sysfs_root)
        harnesses.append(h)
        return h

    yield start
    for h in harnesses:
        if not h.task.done():
            await h.stop()
    for s in stores:
        s.close()


async def test_poller_snapshots_identity_and_growing_counters(
    emulator: Factory, harness: Any
) -> None:
    emu = emulator("quectel", tx_rate=0, rx_rate=0)
    h = harness(emu.start_pty())
    await h.wait_state("ok")
    assert h.state.info is not None
    assert h.state.info.iccid == IDENT.iccid
    emu.add_traffic(1000, 3000)
    await until(
        lambda: h.state.info is not None and h.state.info.tx_bytes == BIG + 1000, "counters to grow"
    )
    snaps = await rows(h.store, "SELECT state, data FROM modem_snapshots ORDER BY id")
    assert len(snaps) >= 2
    assert all(s == "ok" for s, _ in snaps)
    last = json.loads(snaps[-1][1])
    assert (last["iccid"], last["tx_bytes"], last["rx_bytes"], last["error"]) == (
        IDENT.iccid,
        BIG + 1000,
        BIG + 3000,
        "",
    )
    assert last["operator"] == "Vodafone UK"
    # Identity is read once at start, not every poll.
    assert list(emu.commands).count("AT+CIMI") == 1
    await h.stop()


@pytest.mark.parametrize("vendor", ["simcom", "huawei"])
async def test_poller_no_sim_and_sim_busy_are_states_that_recover(
    vendor: str, emulator: Factory, harness: Any
) -> None:
    emu = emulator(vendor)
    h = harness(emu.start_pty())
    await h.wait_state("ok")
    emu.set_fault("no_sim")
    await h.wait_state("no_sim")
    removed = await h.wait_event("sim_removed")
    assert removed["iccid"] == IDENT.iccid
    assert h.state.info is not None
    assert h.state.info.iccid == ""
    await h.wait_event("registration_lost")
    emu.clear_fault("no_sim")
    emu.set_fault("sim_busy")
    await h.wait_state("sim_busy")
    emu.clear_fault("sim_busy")
    await h.wait_state("ok")
    await h.wait_event("registration_regained")
    assert "sim_changed" not in h.kinds()
    states = {s for (s,) in await rows(h.store, "SELECT state FROM modem_snapshots")}
    assert {"ok", "no_sim", "sim_busy"} <= states


async def test_poller_silent_modem_is_unreachable_then_recovers(
    emulator: Factory, harness: Any
) -> None:
    emu = emulator("telit")
    h = harness(emu.start_pty())
    await h.wait_state("ok")
    emu.set_fault("silence")
    await h.wait_state("unreachable")
    await h.wait_event("modem_unreachable")
    emu.clear_fault("silence")
    await h.wait_state("ok")
    recovered = await h.wait_event("modem_recovered")
    assert recovered["after"] == "unreachable"
    stored = [k for (k,) in await rows(h.store, "SELECT kind FROM events ORDER BY id")]
    assert stored.index("modem_unreachable") < stored.index("modem_recovered")


@pytest.mark.parametrize("transport", ["pty", "tcp"])
async def test_poller_survives_an_unplugged_port(
    transport: str, emulator: Factory, harness: Any, tmp_path: Path
) -> None:
    emu = emulator("ublox", link=tmp_path / "ttyModem")
    url = emu.start_pty() if transport == "pty" else emu.start_tcp()
    h = harness(url)
    await h.wait_state("ok")
    emu.set_fault("disconnect")
    await h.wait_state("unreachable")
    assert h.state.last_error
    emu.clear_fault("disconnect")
    await h.wait_state("ok")
    await h.wait_event("modem_recovered")
    assert not h.task.done()


async def test_poller_starts_before_the_modem_exists(
    emulator: Factory, harness: Any, tmp_path: Path
) -> None:
    link = tmp_path / "ttyModem"
    h = harness(str(link))
    await h.wait_state("unreachable")
    emu = emulator("quectel", link=link)
    emu.start_pty()
    await h.wait_state("ok")
    # The state turns ok a moment before the recovery event is recorded: wait for it.
    await until(
        lambda: h.kinds()[:2] == ["modem_unreachable", "modem_recovered"],
        f"unreachable then recovered events (got {h.kinds()})",
        10.0,
    )
    assert h.kinds()[:2] == ["modem_unreachable", "modem_recovered"]


async def test_poller_sim_swap_is_an_event_and_rereads_identity(
    emulator: Factory, harness: Any
) -> None:
    emu = emulator("huawei")
    h = harness(emu.start_pty(), poll=5.0)
    await h.wait_state("ok")
    emu.swap_sim("89441000303132333435", imsi="234150999999999")
    # The +CPIN URCs make the next poll come early, long before poll_interval_s.
    changed = await h.wait_event("sim_changed", timeout=4.0)
    assert changed == {
        "port": h.cfg.port,
        "old_iccid": IDENT.iccid,
        "iccid": "89441000303132333435",
        "imsi": "234150999999999",
    }
    assert h.state.info is not None
    assert h.state.info.imsi == "234150999999999"
    stored = await rows(h.store, "SELECT data FROM events WHERE kind = 'sim_changed'")
    assert json.loads(stored[0][0])["iccid"] == "89441000303132333435"


async def test_poller_reports_a_different_sim_after_a_restart(
    emulator: Factory, harness: Any
) -> None:
    # A slow modem, and the writer held once the poller talks to it: the first snapshot is
    # still queued when the poller is stopped. A stop must not drop a reading it showed.
    emu = emulator("quectel", urcs=False, faults=("slow",), slow_s=0.05)
    h = harness(emu.start_pty())
    await until(lambda: len(emu.commands) > 0, "the poller's first command")
    release = threading.Event()
    held = h.store.call(lambda _c: release.wait(10))
    await h.wait_state("ok")
    await h.stop()
    release.set()
    await asyncio.wrap_future(held)
    emu.clear_fault("slow")
    emu.swap_sim("89441000303132333435")
    h2 = harness(emu.url)
    changed = await h2.wait_event("sim_changed")
    assert changed["old_iccid"] == IDENT.iccid


async def test_poller_counter_reset_on_modem_reboot(emulator: Factory, harness: Any) -> None:
    emu = emulator("quectel", tx_rate=0, rx_rate=0)
    h = harness(emu.start_pty())
    await h.wait_state("ok")
    emu.add_traffic(100, 100)
    await until(lambda: h.state.info is not None and h.state.info.tx_bytes == BIG + 100, "traffic")
    emu.reboot()
    reset = await h.wait_event("counters_reset")
    assert (reset["prev_tx_bytes"], reset["tx_bytes"]) == (BIG + 100, 0)
    await h.wait_state("ok")
    # After the reboot the modem echoes again; the poller's fresh init turns that off.
    await until(lambda: not emu.echo, "echo off again")


async def test_poller_registration_lost_and_regained(emulator: Factory, harness: Any) -> None:
    emu = emulator("generic")
    h = harness(emu.start_pty())
    await h.wait_state("ok")
    emu.set_registration("searching")
    lost = await h.wait_event("registration_lost")
    assert lost["registration"] == "searching"
    assert h.state.state == "ok"
    emu.set_registration("home")
    regained = await h.wait_event("registration_regained")
    assert regained["registration"] == "home"


async def test_poller_garbage_keeps_it_ok(emulator: Factory, harness: Any) -> None:
    emu = emulator("simcom", faults=("garbage",), urc_interval=0.05)
    h = harness(emu.start_pty())
    await h.wait_state("ok")
    await until(lambda: len(emu.commands) > 40, "several polls")
    assert h.state.state == "ok"
    assert h.state.info is not None
    assert h.state.info.failed == ()
    assert "modem_unreachable" not in h.kinds()


async def test_poller_stops_promptly_when_cancelled_mid_command(
    emulator: Factory, harness: Any
) -> None:
    emu = emulator("quectel", slow_s=0.25)
    h = harness(emu.start_pty(), timeout=2.0)
    await h.wait_state("ok")
    sent = len(emu.commands)
    emu.set_fault("slow")
    await until(lambda: len(emu.commands) > sent, "a command in flight")
    started = time.monotonic()
    await h.stop()
    assert time.monotonic() - started < 1.0


def test_link_points_at_the_current_pty(emulator: Factory, tmp_path: Path) -> None:
    link = tmp_path / "ttyModem"
    emu = emulator("quectel", link=link)
    assert emu.start_pty() == str(link)
    first = os.readlink(link)
    emu.set_fault("disconnect")
    assert not link.exists()
    emu.clear_fault("disconnect")
    wait_for(link.exists, 5, "the link to come back")
    assert os.readlink(link).startswith("/dev/pts/")
    assert first.startswith("/dev/pts/")

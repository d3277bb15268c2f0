"""The data budget: the billing cycle's usage from the CDR accounting, its two events,
and where it shows (status, /metrics, `gateway status`), end to end and on a real store."""

from __future__ import annotations

import calendar
import datetime
import json
import sqlite3
import subprocess
import time
import tomllib
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs

from firmware_sim.modem import Identity, ModemEmulator
from gateway import config
from gateway import store as st
from gateway.config import CdrSection, ModemSection
from gateway.errors import ConfigError
from gateway.modem import poller
from gateway.usage import budget, cdr
from tests.conftest import ROOT, Broker, db_rows, free_port, gateway_cmd, wait_for, write_config
from tests.receiver import Receiver

SIM = "8944500000000000013"
OTHER_SIM = "8944500000000000021"
CDR = CdrSection(interval_s=1.0)
UTC = datetime.UTC


def ns(*when: int) -> int:
    """Unix ns of a UTC (year, month, day[, hour, minute, second])."""
    parts = (*when, 0, 0, 0)[:6]
    return calendar.timegm(parts) * 10**9


# -- configuration -----------------------------------------------------------------------------


def modem_problems(**keys: Any) -> list[str]:
    try:
        config.parse({"mqtt": {"host": "h"}, "modem": keys}, {})
    except ConfigError as exc:
        return exc.problems
    return []


def test_budget_keys_are_read_with_their_defaults_and_fractions() -> None:
    cfg = config.parse({"mqtt": {"host": "h"}, "modem": {}}, {})
    assert cfg.modem is not None
    assert (cfg.modem.data_budget_mb, cfg.modem.billing_day) == (0.0, 1)
    assert budget.Budget.from_config(cfg.modem) == budget.Budget(0, 1)
    # A billing day without a budget still says when the cycle's count starts over.
    cfg = config.parse({"mqtt": {"host": "h"}, "modem": {"billing_day": 28}}, {})
    assert cfg.modem is not None
    assert cfg.modem.billing_day == 28
    raw = tomllib.loads('[mqtt]\nhost = "h"\n[modem]\ndata_budget_mb = 0.009765625\n')
    cfg = config.parse(raw, {})
    assert cfg.modem is not None
    assert budget.Budget.from_config(cfg.modem).budget_bytes == 10240
    cfg = config.parse({"mqtt": {"host": "h"}, "modem": {"data_budget_mb": 500}}, {})
    assert cfg.modem is not None
    assert budget.Budget.from_config(cfg.modem).budget_bytes == 500 * 1024 * 1024


@pytest.mark.parametrize(
    ("keys", "problem"),
    [
        ({"data_budget_mb": "500MB"}, "modem.data_budget_mb: must be a number of MB"),
        ({"data_budget_mb": True}, "modem.data_budget_mb: must be a number of MB"),
        ({"data_budget_mb": -1}, "modem.data_budget_mb: must be at least 0 (0 for no budget)"),
        ({"data_budget_mb": float("nan")}, "modem.data_budget_mb: must be a finite number"),
        ({"data_budget_mb": float("inf")}, "modem.data_budget_mb: must be a finite number"),
        ({"data_budget_mb": 1e12}, "modem.data_budget_mb: must be at most 1e+09"),
        ({"data_budget_mb": 1e-9}, "modem.data_budget_mb: must be 0 or at least 1 byte"),
        ({"billing_day": 0}, "modem.billing_day: must be 1-28"),
        ({"billing_day": 29}, "modem.billing_day: must be 1-28 (the 29th-31st do not exist"),
        ({"billing_day": 31}, "modem.billing_day: must be 1-28"),
        ({"billing_day": "1"}, "modem.billing_day: must be a day of the month, 1-28"),
        ({"billing_day": 1.5}, "modem.billing_day: must be a day of the month, 1-28"),
        ({"data_budget": 500}, "modem.data_budget: unknown key (did you mean 'data_budget_mb'?)"),
    ],
)
def test_bad_budget_keys_name_the_key_and_the_value(keys: dict[str, Any], problem: str) -> None:
    got = modem_problems(**keys)
    assert len(got) == 1, got
    assert got[0].startswith(problem), got


# -- the calendar ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("now", "day", "start", "end"),
    [
        ((2026, 12, 15, 10), 20, (2026, 11, 20), (2026, 12, 20)),
        ((2026, 12, 20), 20, (2026, 12, 20), (2027, 1, 20)),  # 00:00 UTC begins the cycle
        ((2026, 12, 19, 23, 59, 59), 20, (2026, 11, 20), (2026, 12, 20)),
        ((2026, 12, 31, 23, 59, 59), 1, (2026, 12, 1), (2027, 1, 1)),  # Dec -> Jan
        ((2027, 1, 1), 1, (2027, 1, 1), (2027, 2, 1)),
        ((2027, 1, 5), 10, (2026, 12, 10), (2027, 1, 10)),  # back into the previous year
        ((2028, 2, 29, 12), 28, (2028, 2, 28), (2028, 3, 28)),  # a leap day
        ((2027, 3, 27), 28, (2027, 2, 28), (2027, 3, 28)),  # a 28-day cycle
    ],
)
def test_cycle_bounds_examples(
    now: tuple[int, ...], day: int, start: tuple[int, ...], end: tuple[int, ...]
) -> None:
    assert budget.cycle_bounds(ns(*now), day) == (ns(*start), ns(*end))


@pytest.mark.parametrize("day", [0, 29, 30, 31, -1])
def test_cycle_bounds_refuse_a_day_not_in_every_month(day: int) -> None:
    with pytest.raises(ValueError, match="billing_day must be 1-28"):
        budget.cycle_bounds(ns(2026, 12, 6), day)


@settings(max_examples=300, deadline=None)
@given(
    hs.datetimes(min_value=datetime.datetime(2000, 1, 1), max_value=datetime.datetime(2100, 1, 1)),
    hs.integers(1, 28),
    hs.integers(0, 10**9 - 1),
)
def test_property_cycles_tile_time_from_billing_day_to_billing_day(
    when: datetime.datetime, day: int, sub_ns: int
) -> None:
    now = calendar.timegm(when.timetuple()) * 10**9 + sub_ns
    start, end = budget.cycle_bounds(now, day)
    assert start <= now < end
    first = datetime.datetime.fromtimestamp(start // 10**9, UTC)
    last = datetime.datetime.fromtimestamp(end // 10**9, UTC)
    assert (first.day, first.hour, first.minute, first.second) == (day, 0, 0, 0)
    assert (last.day, last.hour, last.minute, last.second) == (day, 0, 0, 0)
    # One calendar month apart: December's cycle ends in January of the next year.
    assert (last.year * 12 + last.month) - (first.year * 12 + first.month) == 1
    assert 28 * 86400 <= (end - start) // 10**9 <= 31 * 86400
    # Neighbouring cycles meet exactly: no gap, no overlap.
    assert budget.cycle_bounds(end, day)[0] == end
    assert budget.cycle_bounds(start - 1, day)[1] == start
    assert budget.cycle_bounds(start, day) == (start, end)


# -- accounting on a real store: the poller's write path -----------------------------------------


def open_db(path: Path) -> sqlite3.Connection:
    conn = st.connect(path)
    st.migrate(conn)
    return conn


def read(
    conn: sqlite3.Connection,
    ts_ns: int,
    tx: int,
    rx: int = 0,
    *,
    iccid: str = SIM,
    data_budget: budget.Budget | None,
) -> list[str]:
    """One answering snapshot through the poller's store function; the events it raised."""
    data = orjson.dumps(
        {"iccid": iccid, "tx_bytes": tx, "rx_bytes": rx, "counter_source": "quectel:QGDCNT"}
    )
    raised = poller.write_snapshot(conn, ts_ns, "ok", data, [], CDR, data_budget)
    return [kind for kind, _ in raised]


def stored_events(conn: sqlite3.Connection) -> list[tuple[str, dict[str, Any]]]:
    rows = conn.execute(
        "SELECT kind, data FROM events WHERE kind LIKE 'data_budget%' ORDER BY id"
    ).fetchall()
    return [(k, json.loads(d)) for k, d in rows]


def snapshot(conn: sqlite3.Connection, mb: float, day: int, now_ns: int) -> dict[str, Any]:
    modem = ModemSection(port="x", data_budget_mb=mb, billing_day=day)
    return budget.cycle_snapshot(conn, modem, now_ns)


def test_cycle_boundary_starts_a_new_count_and_rearms_both_events(tmp_path: Path) -> None:
    b = budget.Budget(10_000, 28)
    mb = 10_000 / budget.MB
    db = tmp_path / "gateway.db"
    conn = open_db(db)
    assert read(conn, ns(2027, 2, 27, 12), 1000, data_budget=b) == []  # the baseline
    assert read(conn, ns(2027, 2, 27, 13), 8000, 2000, data_budget=b) == [budget.WARNING]
    conn.close()
    conn = open_db(db)  # a restart: the warning is not raised again
    assert read(conn, ns(2027, 2, 27, 23, 59, 59), 9000, 2000, data_budget=b) == [budget.EXCEEDED]
    assert snapshot(conn, mb, 28, ns(2027, 2, 27, 23, 59, 59)) == {
        "used_bytes": 10_000,  # exactly 100 %
        "budget_bytes": 10_000,
        "percent": 100.0,
        "cycle_start": "2027-01-28T00:00:00Z",
        "cycle_end": "2027-02-28T00:00:00Z",
        "iccid": SIM,
    }
    assert [k for k, _ in stored_events(conn)] == [budget.WARNING, budget.EXCEEDED]
    # The next cycle begins on the 28th at 00:00 UTC; before a reading in it, it is empty.
    assert snapshot(conn, mb, 28, ns(2027, 2, 28))["used_bytes"] == 0
    assert read(conn, ns(2027, 2, 28), 9500, 2000, data_budget=b) == []
    after = snapshot(conn, mb, 28, ns(2027, 3, 1))
    assert (after["used_bytes"], after["percent"]) == (500, 5.0)
    assert (after["cycle_start"], after["cycle_end"]) == (
        "2027-02-28T00:00:00Z",
        "2027-03-28T00:00:00Z",
    )
    kinds = read(conn, ns(2027, 3, 27, 23), 19_500, 2000, data_budget=b)
    assert kinds == [budget.WARNING, budget.EXCEEDED]  # both crossed by one reading
    events = stored_events(conn)
    assert [k for k, _ in events] == [budget.WARNING, budget.EXCEEDED] * 2
    assert events[0][1] == {
        "used_bytes": 9000,
        "budget_bytes": 10_000,
        "percent": 90.0,
        "cycle_start": "2027-01-28T00:00:00Z",
        "iccid": SIM,
    }
    assert events[3][1]["used_bytes"] == 10_500
    assert events[3][1]["cycle_start"] == "2027-02-28T00:00:00Z"
    conn.close()


def test_december_to_january_and_a_clock_set_back(tmp_path: Path) -> None:
    b = budget.Budget(1000, 1)
    conn = open_db(tmp_path / "gateway.db")
    read(conn, ns(2026, 12, 31, 23), 0, data_budget=b)
    assert read(conn, ns(2026, 12, 31, 23, 59, 59), 850, data_budget=b) == [budget.WARNING]
    assert read(conn, ns(2027, 1, 1), 900, data_budget=b) == []  # 50 bytes in January
    # The clock jumps back into December: the January count goes on, nothing is re-raised.
    assert read(conn, ns(2026, 12, 31, 22), 1000, data_budget=b) == []
    snap = snapshot(conn, 1000 / budget.MB, 1, ns(2027, 1, 2))
    assert (snap["used_bytes"], snap["cycle_start"]) == (150, "2027-01-01T00:00:00Z")
    assert snap["cycle_end"] == "2027-02-01T00:00:00Z"


def test_a_sim_swap_starts_the_new_sims_own_count(tmp_path: Path) -> None:
    b = budget.Budget(1000, 1)
    now = ns(2026, 12, 6, 12)
    conn = open_db(tmp_path / "gateway.db")
    read(conn, now, 0, data_budget=b)
    assert read(conn, now + 1, 900, data_budget=b) == [budget.WARNING]
    # The bytes up to the reading that sees the new SIM are the old SIM's (as in its CDR).
    assert read(conn, now + 2, 950, iccid=OTHER_SIM, data_budget=b) == []
    assert read(conn, now + 3, 1750, iccid=OTHER_SIM, data_budget=b) == [budget.WARNING]
    snap = snapshot(conn, 1000 / budget.MB, 1, now + 4)
    assert (snap["iccid"], snap["used_bytes"]) == (OTHER_SIM, 800)


def test_a_budget_raised_in_the_config_is_crossed_afresh(tmp_path: Path) -> None:
    now = ns(2026, 12, 6, 12)
    conn = open_db(tmp_path / "gateway.db")
    read(conn, now, 0, data_budget=budget.Budget(1000, 1))
    assert read(conn, now + 1, 1000, data_budget=budget.Budget(1000, 1)) == [
        budget.WARNING,
        budget.EXCEEDED,
    ]
    # Raised to 2,000 bytes: 1,000 is 50 %; the events come again at 80 % and 100 %.
    assert read(conn, now + 2, 1500, data_budget=budget.Budget(2000, 1)) == []
    assert read(conn, now + 3, 1600, data_budget=budget.Budget(2000, 1)) == [budget.WARNING]
    assert read(conn, now + 4, 2100, data_budget=budget.Budget(2000, 1)) == [budget.EXCEEDED]


def test_first_count_and_a_damaged_count_start_from_the_cycles_cdrs(tmp_path: Path) -> None:
    """A store whose usage was accounted without a count (a gateway from before the data
    budget) starts from the cycle's CDRs and the usage not yet in one."""
    conn = open_db(tmp_path / "gateway.db")
    read(conn, ns(2026, 11, 30, 12), 0, data_budget=None)
    read(conn, ns(2026, 11, 30, 13), 700, data_budget=None)
    cdr.close_period(conn, CDR, ns(2026, 11, 30, 14))  # ended in November's cycle
    read(conn, ns(2026, 12, 1, 1), 1000, data_budget=None)  # +300 in December
    cdr.close_period(conn, CDR, ns(2026, 12, 1, 2))
    read(conn, ns(2026, 12, 2), 1400, data_budget=None)  # +400, still pending
    b = budget.Budget(2000, 1)
    mb = 2000 / budget.MB
    assert snapshot(conn, mb, 1, ns(2026, 12, 3))["used_bytes"] == 700
    assert read(conn, ns(2026, 12, 3), 1500, data_budget=b) == []  # +100
    assert snapshot(conn, mb, 1, ns(2026, 12, 3))["used_bytes"] == 800
    with st.transaction(conn):
        st.set_meta(conn, budget.META_KEY, '{"used": "lots"')
    assert read(conn, ns(2026, 12, 4), 1600, data_budget=b) == []
    assert snapshot(conn, mb, 1, ns(2026, 12, 4))["used_bytes"] == 900


ops = hs.lists(
    hs.one_of(
        hs.tuples(hs.just("traffic"), hs.integers(0, 5000)),
        hs.tuples(hs.just("read"), hs.just(0)),
        hs.tuples(hs.just("reset"), hs.just(0)),
        hs.tuples(hs.just("restart"), hs.just(0)),
        hs.tuples(hs.just("close"), hs.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(ops, hs.integers(1, 30_000))
def test_property_the_cycle_count_is_the_cdr_usage_and_each_event_comes_once(
    tmp_path_factory: pytest.TempPathFactory, program: list[tuple[str, int]], size: int
) -> None:
    """Within one cycle the count is always what the CDRs and the pending usage hold: no
    byte counted twice or lost against the CDRs, across restarts, resets and periods; each
    event is raised once, when (and only when) the count has reached its threshold."""
    db = tmp_path_factory.mktemp("budget") / "gateway.db"
    conn = open_db(db)
    b = budget.Budget(size, 1)
    now = ns(2026, 12, 2)
    tx = 0
    for op, n in [("read", 0), *program, ("read", 0)]:
        now += 10**9
        if op == "traffic":
            tx += n
        elif op == "reset":
            tx = 0
        elif op == "restart":
            conn.close()
            conn = open_db(db)
        elif op == "close":
            cdr.close_period(conn, CDR, now)
        else:
            read(conn, now, tx, data_budget=b)
    billed = conn.execute(
        "SELECT (SELECT COALESCE(SUM(usage), 0) FROM cdrs) + (SELECT pending FROM cdr_state)"
    ).fetchone()[0]
    snap = snapshot(conn, size / budget.MB, 1, now)
    assert snap["used_bytes"] == billed
    kinds = Counter(k for k, _ in stored_events(conn))
    assert kinds[budget.WARNING] == (1 if billed * 5 >= size * 4 else 0)
    assert kinds[budget.EXCEEDED] == (1 if billed >= size else 0)
    conn.close()


# -- end to end: the gateway as a process, the emulated modem, an events webhook -----------------

BUDGET_MB = "0.009765625"  # 10,240 bytes
BUDGET = 10_240


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=5) as r:
        return bytes(r.read())


def status_of(base: str) -> dict[str, Any] | None:
    try:
        return json.loads(get(base + "/api/status"))  # type: ignore[no-any-return]
    except OSError:
        return None  # not listening yet


def metric(text: str, name: str) -> float:
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(name + " ")]
    assert len(values) == 1, f"{name} in /metrics: {values}"
    return values[0]


def test_budget_events_once_each_across_restarts_and_a_counter_reset(
    mosquitto: Broker, tmp_path: Path, gateway_proc: Any
) -> None:
    today = datetime.datetime.now(UTC)
    # A cycle that began today at 00:00 UTC (or mid-month): no boundary during the test.
    day = today.day if today.day <= 28 else 15
    start, end = budget.cycle_bounds(time.time_ns(), day)
    emu = ModemEmulator(
        "quectel", identity=Identity(iccid=SIM, plmn="44010"), urcs=False, counter_start=5000
    )
    pty = emu.start_pty()
    receiver = Receiver().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    db = tmp_path / "state" / "gateway.db"
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        web=f'listen = "127.0.0.1:{port}"',
        extra=f"""
[modem]
port = "{pty}"
poll_interval_s = 0.2
data_budget_mb = {BUDGET_MB}
billing_day = {day}

[cdr]
interval_s = 1

[[webhooks]]
name = "ops"
url = "{receiver.url}"
source = "events"
format = "flat"
when = [ {{ field = "event", op = "startswith", value = "data_budget" }} ]
""",
    )
    gw = gateway_proc(cfg)

    def used_is(n: int) -> dict[str, Any]:
        def check() -> dict[str, Any] | None:
            s = status_of(base)
            d = s and s["data_budget"]
            return d if d and d["used_bytes"] == n else None

        return wait_for(check, 20, f"{n} bytes used this cycle")  # type: ignore[return-value]

    def stored() -> list[str]:
        rows = db_rows(db, "SELECT kind FROM events WHERE kind LIKE 'data_budget%' ORDER BY id")
        return [str(k) for (k,) in rows]

    def delivered() -> list[dict[str, Any]]:
        return receiver.delivered()

    try:
        gw.start()

        def baseline() -> bool:
            s = status_of(base)
            return bool(s and (s["modem"]["info"] or {}).get("tx_bytes") == 5000)

        wait_for(baseline, 20, "the modem's first reading")
        emu.add_traffic(4000, 4000)
        d = used_is(8000)  # 78.1 %: no event yet
        assert (d["budget_bytes"], d["percent"]) == (BUDGET, 78.1)
        assert (d["cycle_start"], d["cycle_end"]) == (budget.iso(start), budget.iso(end))
        assert stored() == []

        emu.add_traffic(100, 100)
        used_is(8200)
        wait_for(lambda: len(delivered()) == 1, 20, "the warning at the webhook")
        warning = delivered()[0]
        assert warning["event"] == "data_budget_warning"
        assert warning["data"] == {
            "used_bytes": 8200,
            "budget_bytes": BUDGET,
            "percent": 80.0,
            "cycle_start": budget.iso(start),
            "iccid": SIM,
        }

        # Stopped, the modem keeps counting: the restart adds exactly that, raises nothing.
        assert gw.terminate() == 0
        emu.add_traffic(1000, 0)
        gw.start()
        used_is(9200)
        # A counter reset (modem reboot) mid-cycle: the bytes after it count from zero.
        emu.reset_counters()
        emu.add_traffic(500, 500)
        used_is(10_200)
        assert stored() == ["data_budget_warning"]

        emu.add_traffic(40, 0)
        used_is(BUDGET)
        wait_for(lambda: len(delivered()) == 2, 20, "the exceeded event at the webhook")
        exceeded = delivered()[1]
        assert exceeded["event"] == "data_budget_exceeded"
        assert exceeded["data"]["used_bytes"] == BUDGET
        assert exceeded["data"]["percent"] == 100.0

        assert gw.terminate() == 0
        emu.add_traffic(1000, 0)
        gw.start()
        d = used_is(BUDGET + 1000)
        assert d["percent"] == 109.7
        assert stored() == ["data_budget_warning", "data_budget_exceeded"]
        assert [e["event"] for e in delivered()] == ["data_budget_warning", "data_budget_exceeded"]

        # The count is the CDRs' usage and what is not yet in a CDR: the same bytes.
        def cdr_usage() -> int:
            rows = db_rows(
                db,
                "SELECT (SELECT COALESCE(SUM(usage), 0) FROM cdrs)"
                " + (SELECT pending FROM cdr_state)",
            )
            return int(rows[0][0])  # type: ignore[call-overload]

        assert cdr_usage() == BUDGET + 1000
        assert db_rows(db, "SELECT COUNT(*) FROM cdrs")[0][0] >= 1  # type: ignore[operator]

        text = get(base + "/metrics").decode()
        assert metric(text, "gateway_data_cycle_used_bytes") == BUDGET + 1000
        assert metric(text, "gateway_data_budget_bytes") == BUDGET
        assert metric(text, "gateway_data_cycle_start_timestamp_seconds") == start / 1e9
        out = subprocess.run(
            gateway_cmd("status", "-c", str(cfg)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        ).stdout
        line = (
            f"data     this cycle: 11.0 KB of 10.0 KB (109 %), cycle from {budget.iso(start)[:10]}"
        )
        assert line in out.splitlines()
        assert gw.terminate() == 0
    finally:
        receiver.stop()
        emu.stop()

"""The data budget: the bytes used in the current billing cycle, against `[modem]
data_budget_mb`.

The cycle's usage comes from the same readings as the usage CDRs: every byte that
`cdr.account` adds to a SIM's usage is added to the cycle's total in the same
transaction (`add_usage`), so a restart neither loses nor double-counts it, and a counter
reset or a change of counter source is handled once, by the CDR accounting. The total
lives in the store's `meta` table (key META_KEY) with the cycle and SIM it belongs to and
the budgets its two events were raised for, so a restart does not raise them again and a
new cycle re-arms them.

A billing cycle starts on `billing_day` at 00:00 UTC and ends when the next one starts.
Usage counts in the cycle in which it is read.
"""

from __future__ import annotations

import calendar
import datetime
import logging
import sqlite3
import time
from dataclasses import asdict, dataclass
from typing import Any

import orjson

from gateway.config import ModemSection
from gateway.store import dumps, get_meta, set_meta

log = logging.getLogger("gateway.budget")

META_KEY = "data_budget"
MB = 1024 * 1024  # data_budget_mb counts MB of this many bytes, as max_buffer_mb does
WARN_PERMILLE = 800  # data_budget_warning at 80 %
WARNING, EXCEEDED = "data_budget_warning", "data_budget_exceeded"

Event = tuple[str, dict[str, Any]]


@dataclass(frozen=True, slots=True)
class Budget:
    """The budget in bytes (0: none) and the day its billing cycles start."""

    budget_bytes: int = 0
    billing_day: int = 1

    @classmethod
    def from_config(cls, modem: ModemSection) -> Budget:
        return cls(round(modem.data_budget_mb * MB), modem.billing_day)


@dataclass(slots=True)
class CycleState:
    """The persisted count of one SIM's billing cycle."""

    cycle_start_ns: int
    billing_day: int
    iccid: str
    used: int
    # The budget (bytes) each event was raised for in this cycle; 0: not raised. A budget
    # changed in the config is crossed afresh.
    warned_for: int = 0
    exceeded_for: int = 0


# -- the calendar ------------------------------------------------------------------------------


def _month_start(year: int, month: int, day: int) -> int:
    return calendar.timegm((year, month, day, 0, 0, 0)) * 10**9


def cycle_bounds(now_ns: int, billing_day: int) -> tuple[int, int]:
    """(start, end) in Unix ns of the billing cycle containing now_ns: from billing_day
    00:00 UTC of this month (or the previous one, before that day) to the same day of the
    next month."""
    if not 1 <= billing_day <= 28:
        raise ValueError(f"billing_day must be 1-28, got {billing_day}")
    now = datetime.datetime.fromtimestamp(now_ns // 10**9, datetime.UTC)
    year, month = now.year, now.month
    if now.day < billing_day:
        year, month = (year - 1, 12) if month == 1 else (year, month - 1)
    next_year, next_month = (year + 1, 1) if month == 12 else (year, month + 1)
    return _month_start(year, month, billing_day), _month_start(next_year, next_month, billing_day)


def iso(ns: int) -> str:
    """Unix ns as ISO 8601 UTC to the second."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns // 10**9))


def permille(used: int, budget_bytes: int) -> int:
    """Thousandths of the budget used, rounded down (800 is the warning's 80.0 %)."""
    return used * 1000 // budget_bytes


# -- the stored count --------------------------------------------------------------------------


def load(conn: sqlite3.Connection) -> CycleState | None:
    """The stored count; None when there is none or it is damaged (then counted afresh)."""
    text = get_meta(conn, META_KEY)
    if not text:
        return None
    try:
        raw = orjson.loads(text)
        s = CycleState(**raw)
    except (orjson.JSONDecodeError, TypeError) as exc:
        log.warning("data budget: stored count is damaged (%s); counting afresh", exc)
        return None
    numbers = (s.cycle_start_ns, s.billing_day, s.used, s.warned_for, s.exceeded_for)
    if not isinstance(s.iccid, str) or not all(type(v) is int and v >= 0 for v in numbers):
        log.warning("data budget: stored count is damaged (wrong types); counting afresh")
        return None
    return s


def _save(conn: sqlite3.Connection, state: CycleState) -> None:
    set_meta(conn, META_KEY, dumps(asdict(state)))


def _seed(conn: sqlite3.Connection, iccid: str, start_ns: int) -> int:
    """What the CDR tables hold of the cycle, for a count that starts mid-cycle (the
    first gateway start that counts, or a changed billing_day): the SIM's CDRs whose
    period ends in the cycle, and its usage not yet in a CDR."""
    emitted = conn.execute(
        "SELECT COALESCE(SUM(usage), 0) FROM cdrs WHERE iccid = ? AND period_end_ns > ?",
        (iccid, start_ns),
    ).fetchone()[0]
    pending = conn.execute(
        "SELECT COALESCE(SUM(pending), 0) FROM cdr_state WHERE iccid = ?", (iccid,)
    ).fetchone()[0]
    return int(emitted) + int(pending)


def _current(
    conn: sqlite3.Connection, budget: Budget, iccid: str, now_ns: int
) -> tuple[CycleState, str]:
    """The count of the cycle containing now_ns for this SIM, and where it comes from:
    "stored", "seeded" (no usable count: from the CDR tables), "new_sim" or "new_cycle"."""
    start, _ = cycle_bounds(now_ns, budget.billing_day)
    s = load(conn)
    if s is None or s.billing_day != budget.billing_day:
        return CycleState(start, budget.billing_day, iccid, _seed(conn, iccid, start)), "seeded"
    if s.iccid != iccid:
        # The budget is the SIM plan's: another SIM has a count of its own.
        return CycleState(start, budget.billing_day, iccid, 0), "new_sim"
    if s.cycle_start_ns < start:
        return CycleState(start, budget.billing_day, iccid, 0), "new_cycle"
    # The same cycle, or a clock set back before its start: that cycle goes on.
    return s, "stored"


def add_usage(
    conn: sqlite3.Connection, budget: Budget, iccid: str, added: int, now_ns: int
) -> list[Event]:
    """Count the bytes `cdr.account` just added for a reading of SIM `iccid` (inside
    its transaction); returns the events they raised (the caller records them)."""
    if not iccid:
        return []
    s, origin = _current(conn, budget, iccid, now_ns)
    before = asdict(s)
    if origin in ("stored", "new_cycle"):
        s.used += added
    # "seeded" already holds them (the CDR state they were just added to); for "new_sim"
    # they were the previous SIM's last bytes.
    events: list[Event] = []
    b = budget.budget_bytes
    if b > 0:
        level = permille(s.used, b)
        if level >= WARN_PERMILLE and s.warned_for != b:
            s.warned_for = b
            events.append((WARNING, _event_data(s, b)))
        if level >= 1000 and s.exceeded_for != b:
            s.exceeded_for = b
            events.append((EXCEEDED, _event_data(s, b)))
    if origin != "stored" or asdict(s) != before:
        _save(conn, s)
    return events


def _event_data(s: CycleState, budget_bytes: int) -> dict[str, Any]:
    return {
        "used_bytes": s.used,
        "budget_bytes": budget_bytes,
        "percent": permille(s.used, budget_bytes) / 10,
        "cycle_start": iso(s.cycle_start_ns),
        "iccid": s.iccid,
    }


# -- what status, metrics and heartbeats show ---------------------------------------------------


def cycle_snapshot(
    conn: sqlite3.Connection, modem: ModemSection, now_ns: int | None = None
) -> dict[str, Any]:
    """The current billing cycle's data use (read-only; any connection to the store):
    {"used_bytes", "budget_bytes" (None: no budget), "percent" (None: no budget),
    "cycle_start", "cycle_end" (ISO 8601 UTC), "iccid"}."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    budget = Budget.from_config(modem)
    start, end = cycle_bounds(now_ns, budget.billing_day)
    row = conn.execute("SELECT iccid FROM cdr_state WHERE id = 1").fetchone()
    s = load(conn)
    iccid = s.iccid if s is not None else (str(row[0]) if row and row[0] else "")
    used = _current(conn, budget, iccid, now_ns)[0].used if iccid else 0
    b = budget.budget_bytes
    return {
        "used_bytes": used,
        "budget_bytes": b or None,
        "percent": permille(used, b) / 10 if b else None,
        "cycle_start": iso(start),
        "cycle_end": iso(end),
        "iccid": iccid,
    }

"""Which CDRs a report covers, and when a calendar report is due.

`period = "previous_day"` / `"previous_month"` reports cover one UTC day or month, by the
CDR's Timestamp (the end of the usage it counts). Each runs once after its period ended:
the period is done when a successful export of exactly its bounds is in the `reports`
table, so a restart, or `gateway cdr export` meanwhile, never sends it twice. Periods the
gateway was down for are exported one after another when it is back (at most
MAX_CATCH_UP of them); a failed export is tried again when the current period ends.
"""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable
from typing import Any

from gateway.config import ReportConfig
from gateway.delivery.conditions import Filter, lookup

# A CDR stamped just before midnight is written by the writer a moment later: a report
# due at the period's end waits this long for it.
SETTLE_NS = 60 * 1_000_000_000
# At most this many missed periods are exported after a long outage (a month of days, a
# year of months); older CDRs are past retention anyway.
MAX_CATCH_UP = {"previous_day": 31, "previous_month": 12}

Period = tuple[int, int]


def _utc(ns: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(ns // 1_000_000_000, dt.UTC)


def _ns(t: dt.datetime) -> int:
    return int(t.timestamp()) * 1_000_000_000


def bounds(kind: str, ns: int) -> Period:
    """[start, end) in ns of the UTC day or month that holds `ns`."""
    t = _utc(ns)
    if kind == "previous_day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return _ns(start), _ns(start + dt.timedelta(days=1))
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return _ns(start), _ns(nxt)


def latest_complete(kind: str, now_ns: int) -> Period:
    """The newest period that has ended by `now_ns`."""
    return bounds(kind, bounds(kind, now_ns)[0] - 1)


def _aligned(kind: str, start: int, end: int) -> bool:
    return bounds(kind, start) == (start, end)


def _runs(conn: sqlite3.Connection, rc: ReportConfig) -> list[tuple[int, int, str]]:
    """(start, end, error) of this report's calendar runs, newest first."""
    rows = conn.execute(
        "SELECT period_start_ns, period_end_ns, error FROM reports WHERE name = ?"
        " ORDER BY id DESC LIMIT 500",
        (rc.name,),
    ).fetchall()
    return [(int(s), int(e), str(err)) for s, e, err in rows if _aligned(rc.period, s, e)]


def next_period(conn: sqlite3.Connection, rc: ReportConfig, now_ns: int) -> Period | None:
    """The oldest complete period not exported yet, or None when all are."""
    latest = latest_complete(rc.period, now_ns)
    done = [(s, e) for s, e, err in _runs(conn, rc) if not err]
    oldest = latest
    for _ in range(MAX_CATCH_UP[rc.period] - 1):
        oldest = bounds(rc.period, oldest[0] - 1)
    if not done:
        return latest
    last_start = max(s for s, _ in done)
    cand = bounds(rc.period, bounds(rc.period, last_start)[1])
    if cand[0] < oldest[0]:
        cand = oldest
    return cand if cand[1] <= now_ns else None


def due_ns(conn: sqlite3.Connection, rc: ReportConfig, now_ns: int) -> int:
    """When a calendar report next runs (wall clock, ns): SETTLE_NS after its period ends,
    or after the current one when the next to export failed already; with `at`, at the
    first such local time of day from then."""
    p = next_period(conn, rc, now_ns)
    tried = {(s, e) for s, e, err in _runs(conn, rc) if err}
    end = bounds(rc.period, now_ns)[1] if p is None or p in tried else p[1]
    due = end + SETTLE_NS
    if rc.at:
        hh, mm = (int(x) for x in rc.at.split(":"))
        base = dt.datetime.fromtimestamp(due / 1e9).astimezone()
        cand = base.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if cand < base:
            cand += dt.timedelta(days=1)
        due = int(cand.timestamp() * 1e9)
    return due


def selector(rc: ReportConfig) -> Callable[[dict[str, Any]], bool]:
    """Whether a CDR belongs in the report by its `filter` (an empty filter takes all)."""
    f = Filter(rc.filter)
    if f.empty:
        return lambda _rec: True
    return lambda rec: f(lambda name: lookup(rec, name))


def select_rows(
    conn: sqlite3.Connection, rc: ReportConfig, after_id: int, period: Period | None
) -> list[tuple[int, str]]:
    """(id, stored JSON) of the CDRs a run covers before its filter: those after the last
    run's CDR (`since_last`), or those stamped within `period`."""
    args: tuple[int, ...] = (after_id,)
    if period is None:
        sql = "SELECT id, data FROM cdrs WHERE id > ? ORDER BY id"
    else:
        sql = "SELECT id, data FROM cdrs WHERE ts_ms >= ? AND ts_ms < ? ORDER BY id"
        args = (period[0] // 1_000_000, period[1] // 1_000_000)
    return [(int(i), str(d)) for i, d in conn.execute(sql, args).fetchall()]

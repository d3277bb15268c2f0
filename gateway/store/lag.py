"""Delivery lag: how old the oldest record a webhook has not delivered yet is.

Read on every status request, `/metrics` scrape and lag check, so it is a handful of
lookups by primary key, never a scan of a backlog: the first record after the route's
cursor (the oldest it has not taken), and the oldest record of its open batches (taken,
not yet accepted). The batches table holds a few dozen rows per webhook (see
Route.max_open; more only while a `gateway dlq replay` is being sent), so reading a
route's rows there stays small too.
"""

from __future__ import annotations

import sqlite3

from gateway.store.counting import released_mark
from gateway.store.tables import packet_tables

# A source's table, and the column that says when each record happened.
_TIMES = {"cdrs": ("cdrs", "period_end_ns"), "events": ("events", "ts_ns")}


def _packet_ns(conn: sqlite3.Connection, op: str, pid: int) -> int | None:
    """recv_ns of the first unreleased packet with id `op` pid ('>' or '>=')."""
    after = released_mark(conn)
    for table, _lo, hi in packet_tables(conn):
        if hi < pid or hi <= after:
            continue
        row = conn.execute(
            f"SELECT recv_ns FROM {table} WHERE id {op} ? AND id > ? ORDER BY id LIMIT 1",
            (pid, after),
        ).fetchone()
        if row is not None:
            return int(row[0])
    return None


def _record_ns(conn: sqlite3.Connection, source: str, op: str, rid: int) -> int | None:
    if source == "packets":
        return _packet_ns(conn, op, rid)
    table = _TIMES.get(source)
    if table is None:
        return None
    row = conn.execute(
        f"SELECT {table[1]} FROM {table[0]} WHERE id {op} ? ORDER BY id LIMIT 1", (rid,)
    ).fetchone()
    return int(row[0]) if row is not None and row[0] is not None else None


def oldest_pending_ns(conn: sqlite3.Connection, route: str) -> int | None:
    """When the oldest record `route` has not delivered yet happened (Unix ns), or None
    when it has nothing pending.

    Pending: taken into an open batch (waiting for its answer or a retry), or not taken
    yet (after the cursor, including records the webhook's `when` will skip and those
    in a batching window still open). A batch with a body of its own (a report notice, a
    replayed dead letter) counts from when it was made."""
    row = conn.execute("SELECT source, cursor FROM routes WHERE name = ?", (route,)).fetchone()
    if row is None:
        return None
    source, cursor = str(row[0]), int(row[1])
    found: list[int] = []
    ts = _record_ns(conn, source, ">", cursor)
    if ts is not None:
        found.append(ts)
    first, made = conn.execute(
        "SELECT MIN(first_id), MIN(CASE WHEN first_id IS NULL THEN created_ns END)"
        " FROM batches WHERE route = ?",
        (route,),
    ).fetchone()
    if first is not None:
        # The batch's oldest record; gone (evicted by drop_oldest), the next one kept.
        ts = _record_ns(conn, source, ">=", int(first))
        if ts is not None:
            found.append(ts)
    if made is not None:
        found.append(int(made))
    return min(found) if found else None


def oldest_pending_s(conn: sqlite3.Connection, route: str, now_ns: int) -> float:
    """The age of `route`'s oldest pending record in seconds (0.0 when nothing is
    pending, never negative: a wall clock set back makes records look newer)."""
    ts = oldest_pending_ns(conn, route)
    if ts is None:
        return 0.0
    return round(max(0, now_ns - ts) / 1e9, 1)


def lags(conn: sqlite3.Connection, routes: list[str], now_ns: int) -> dict[str, float]:
    """oldest_pending_s of each route, in one read transaction."""
    return {name: oldest_pending_s(conn, name, now_ns) for name in routes}


def backlog(conn: sqlite3.Connection, route: str) -> int:
    """Records `route` has not delivered yet, counted from ids without a scan: those in
    its open batches, plus the ids after its cursor (an upper bound: ids evicted by
    drop_oldest, superseded heartbeats and records its `when` will skip count too)."""
    row = conn.execute("SELECT source, cursor FROM routes WHERE name = ?", (route,)).fetchone()
    if row is None:
        return 0
    source, cursor = str(row[0]), int(row[1])
    top = 0
    if source == "packets":
        spans = packet_tables(conn)
        top = spans[-1][2] if spans else 0
        cursor = max(cursor, released_mark(conn))
    elif source in _TIMES:
        top = int(conn.execute(f"SELECT COALESCE(MAX(id), 0) FROM {source}").fetchone()[0])
    taken = conn.execute(
        "SELECT COALESCE(SUM(count), 0) FROM batches WHERE route = ?", (route,)
    ).fetchone()[0]
    return max(0, top - cursor) + int(taken)

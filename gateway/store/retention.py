"""Retention of the side tables (CDRs, events, modem snapshots, reports and their files)
and the bytes they hold, which count toward gateway.max_buffer_mb.

Rows older than gateway.retention_days go, oldest first, in chunks of RETENTION_ROWS per
table and transaction, in the writer's turns between packet commits (Retention
._tend_retention), never inside one. A row a consumer has not taken stays, however old:

- a CDR or event after the cursor of a webhook that reads its table, or in one of its
  open batches;
- a CDR after the last one a configured report exported;
- a report whose notice is still waiting in an open batch, and each report's newest
  run (the next export counts from it).

Delivered batches leave no rows behind: a batch's row is deleted when the receiver
accepts it.

The bytes each table holds are kept in `table_sizes` by triggers (schema 12), as the
dead letters' are (DEAD_BYTES): every writer, the CLI too, keeps them exact without a
scan. They estimate the pages the rows take (size_expression): a row's record as SQLite
lays it out in the store's pages (overflow pages included), its index entries, and a
report's file while the file is kept.
"""

from __future__ import annotations

import contextlib
import logging
import sqlite3
import time
from collections.abc import Iterable, Mapping
from pathlib import Path

from gateway.store.counting import _bump
from gateway.store.db import transaction

log = logging.getLogger("gateway.store")

# The tables under retention: what one row's record holds ({0}: NEW or OLD in a
# trigger, the table's name in a query), and what its index entries take beside it.
_RECORDS = {
    # data, UniqueID and ICCID, the integers and the record's header.
    "cdrs": (
        "(length(CAST({0}.data AS BLOB)) + length(CAST({0}.unique_id AS BLOB))"
        " + length(CAST({0}.iccid AS BLOB)) + 40)"
    ),
    "events": "(length(CAST({0}.data AS BLOB)) + length(CAST({0}.kind AS BLOB)) + 20)",
    "modem_snapshots": "(length(CAST({0}.data AS BLOB)) + length(CAST({0}.state AS BLOB)) + 20)",
    "reports": (
        "(length(CAST({0}.path AS BLOB)) + length(CAST({0}.file_name AS BLOB))"
        " + length(CAST({0}.error AS BLOB)) + length({0}.token_sha256) + length({0}.name) + 80)"
    ),
}
_INDEXES = {
    # The UNIQUE index on UniqueID (filled in random order: pages about two thirds
    # full) and the ts_ms one.
    "cdrs": "(2 * length(CAST({0}.unique_id AS BLOB)) + 40)",
    "events": "0",
    "modem_snapshots": "0",
    "reports": "(2 * length({0}.token_sha256) + 20)",
}
# A report also counts its zip file while the file is kept.
_FILES = {"reports": "(CASE WHEN {0}.path != '' THEN {0}.size ELSE 0 END)"}
RETAINED_TABLES = tuple(_RECORDS)


def size_expression(table: str, page_size: int) -> str:
    """What one row of `table` counts for, as SQL ({0}: the row): its record as SQLite
    stores it in pages of page_size bytes, its index entries, and a report's file.

    A record longer than a page's local room keeps a part in the page and the rest in
    overflow pages of its own, each taken whole: on 1 KiB pages a 550-byte snapshot
    takes about 1,150 bytes. The formula is SQLite's (btreeParseCellAdjustSizeForOverflow)."""
    usable = page_size
    max_local = (usable - 12) * 64 // 255 - 23
    min_local = (usable - 12) * 32 // 255 - 23
    room = usable - 4
    r = _RECORDS[table]
    stored = (
        f"(CASE WHEN {r} <= {max_local} THEN {r} + 4"
        f" ELSE {min_local} + 4 + (({r} - {min_local} + {room - 1}) / {room}) * {page_size} END)"
    )
    return f"({stored} + {_INDEXES[table]} + {_FILES.get(table, '0')})"


# The writer looks at retention this often (unless StoreSettings says otherwise), and
# again at once while a table has more to delete than one chunk.
RETENTION_CHECK_S = 60.0
# At most this many rows of one table per transaction: packets commit in between.
RETENTION_ROWS = 500


def table_sizes(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """(rows, bytes) of each retained table, from `table_sizes`."""
    out = dict.fromkeys(RETAINED_TABLES, (0, 0))
    try:
        for name, rows, size in conn.execute("SELECT name, rows, bytes FROM table_sizes"):
            out[str(name)] = (int(rows), int(size))
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        # A store `gateway status` reads before the gateway migrated it: counted here.
        have = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}
        page = int(conn.execute("PRAGMA page_size").fetchone()[0])
        for t in RETAINED_TABLES:
            if t in have:
                out[t] = measure(conn, t, page)
    return out


def measure(conn: sqlite3.Connection, table: str, page_size: int) -> tuple[int, int]:
    """(rows, bytes) of a retained table, counted row by row (a scan)."""
    rows, size = conn.execute(
        f"SELECT COUNT(*), COALESCE(SUM({size_expression(table, page_size).format(table)}), 0)"
        f" FROM {table}"
    ).fetchone()
    return int(rows), int(size)


def retained_bytes(conn: sqlite3.Connection) -> int:
    """The bytes the retained tables hold, as counted toward gateway.max_buffer_mb."""
    return int(conn.execute("SELECT COALESCE(SUM(bytes), 0) FROM table_sizes").fetchone()[0])


def _taken(conn: sqlite3.Connection, source: str, routes: Iterable[str] | None) -> int | None:
    """The highest id of `source` every route reading it has taken and finished with
    (None: no route reads it). `routes`: the configured ones; None means every route
    the store knows for that source."""
    if routes is None:
        cursors = [
            int(r[0]) for r in conn.execute("SELECT cursor FROM routes WHERE source = ?", (source,))
        ]
        names: list[str] | None = None
    else:
        names = list(routes)
        marks = ",".join("?" * len(names))
        cursors = [
            int(r[0])
            for r in conn.execute(f"SELECT cursor FROM routes WHERE name IN ({marks})", names)
        ]
        # A configured route not seen yet starts at 0: it takes everything.
        if len(cursors) < len(names):
            cursors.append(0)
    if not cursors:
        return None
    bound = min(cursors)
    sql = "SELECT MIN(first_id) FROM batches WHERE source = ? AND first_id IS NOT NULL"
    args: list[object] = [source]
    if names is not None:
        sql += f" AND route IN ({','.join('?' * len(names))})"
        args.extend(names)
    open_first = conn.execute(sql, args).fetchone()[0]
    if open_first is not None:
        bound = min(bound, int(open_first) - 1)
    return bound


def _exported(conn: sqlite3.Connection, reports: Iterable[str] | None) -> int | None:
    """The highest CDR id every report has exported (None: no report has run)."""
    rows = dict(conn.execute("SELECT name, MAX(last_cdr_id) FROM reports GROUP BY name"))
    names = list(rows) if reports is None else [n for n in reports if n in rows]
    if not names:
        return None
    return min(int(rows[n]) for n in names)


def _oldest(
    conn: sqlite3.Connection, table: str, ts: str, cutoff: int, bound: int | None, limit: int
) -> int:
    """The highest id among the oldest `limit` rows (by id) that are older than cutoff
    and at or below bound; 0 for none. Oldest by id, as dead letters are evicted: a row
    written after the clock was set back holds the rest until it is old enough too."""
    last = 0
    sql = f"SELECT id, {ts} FROM {table}"
    args: list[int] = []
    if bound is not None:
        sql += " WHERE id <= ?"
        args.append(bound)
    for rid, when in conn.execute(sql + " ORDER BY id LIMIT ?", (*args, limit)):
        if when >= cutoff:
            break
        last = int(rid)
    return last


def _prune_reports(conn: sqlite3.Connection, cutoff_ns: int, limit: int) -> int:
    """Delete reports made before cutoff_ns, and their files; never a report's newest
    run, nor one whose notice may still be waiting in an open batch."""
    waiting = conn.execute(
        "SELECT MIN(created_ns) FROM batches WHERE source = 'reports'"
    ).fetchone()[0]
    if waiting is not None:
        cutoff_ns = min(cutoff_ns, int(waiting))
    rows = conn.execute(
        "SELECT id, path FROM reports WHERE created_ns < ?"
        " AND id NOT IN (SELECT MAX(id) FROM reports GROUP BY name) ORDER BY id LIMIT ?",
        (cutoff_ns, limit),
    ).fetchall()
    for rid, path in rows:
        if path:
            # Before the row: a file left behind by a crash here is an orphan the row no
            # longer counts, while a row left without its file only answers 410.
            with contextlib.suppress(OSError):
                Path(path).unlink(missing_ok=True)
        conn.execute("DELETE FROM reports WHERE id = ?", (rid,))
    return len(rows)


def prune(
    conn: sqlite3.Connection,
    table: str,
    now_ns: int,
    retention_s: float,
    consumers: Mapping[str, Iterable[str] | None],
    limit: int = RETENTION_ROWS,
) -> int:
    """Delete up to `limit` of `table`'s rows older than retention_s that no consumer
    still needs, count them in retention_pruned_<table> (in a transaction of its own);
    returns how many. `consumers`: the configured webhooks per source ("cdrs",
    "events") and report names ("reports"); a missing key means all the store knows."""
    cutoff_ns = now_ns - int(retention_s * 1e9)
    with transaction(conn):
        if table == "reports":
            n = _prune_reports(conn, cutoff_ns, limit)
        else:
            if table == "modem_snapshots":
                bound = None
                ts, cutoff = "ts_ns", cutoff_ns
            elif table == "events":
                bound = _taken(conn, "events", consumers.get("events"))
                # The events table has no AUTOINCREMENT: without its newest row the next
                # event would take that id again, at or below the cursor of every events
                # webhook that took the row, and no webhook would ever send it.
                newest = conn.execute("SELECT MAX(id) FROM events").fetchone()[0]
                if newest is not None:
                    keep = int(newest) - 1
                    bound = keep if bound is None else min(bound, keep)
                ts, cutoff = "ts_ns", cutoff_ns
            else:
                bound = _taken(conn, "cdrs", consumers.get("cdrs"))
                exported = _exported(conn, consumers.get("reports"))
                if exported is not None:
                    bound = exported if bound is None else min(bound, exported)
                ts, cutoff = "ts_ms", cutoff_ns // 1_000_000
            last = _oldest(conn, table, ts, cutoff, bound, limit)
            n = 0
            if last:
                n = int(conn.execute(f"DELETE FROM {table} WHERE id <= ?", (last,)).rowcount)
        _bump(conn, f"retention_pruned_{table}", n)
    return n


class Retention:
    """The Store's part that keeps the retained tables within gateway.retention_days and
    reads the bytes they hold."""

    conn: sqlite3.Connection
    commits: int
    # See Buffer.retained_bytes.
    retained_bytes: int
    retention_s: float  # 0: keep for ever
    retention_check_s: float
    # When the writer prunes next (time.monotonic()); the dead letters' turn (_tend_at)
    # brings it forward when a chunk was full.
    _retention_at: float
    _tend_at: float
    # Who reads each retained table (set_consumers); None: every one the store knows.
    _consumers: dict[str, tuple[str, ...] | None]

    def set_consumers(self, source: str, names: Iterable[str]) -> None:
        """The configured webhooks that read `source` ("cdrs", "events"), or the
        configured report names ("reports"): retention keeps what they have not taken."""
        self._consumers[source] = tuple(names)

    def _tend_retention(self) -> None:
        """Read the retained bytes; when due, prune one chunk of each table."""
        conn = self.conn
        try:
            self.retained_bytes = retained_bytes(conn)
        except sqlite3.Error as exc:
            log.warning("cannot read the retained tables' sizes: %s", exc)
            return
        now = time.monotonic()
        if not self.retention_s or now < self._retention_at:
            return
        self._retention_at = now + self.retention_check_s
        pruned: dict[str, int] = {}
        for table in RETAINED_TABLES:
            try:
                n = prune(conn, table, time.time_ns(), self.retention_s, self._consumers)
            except sqlite3.Error as exc:
                log.warning("retention: cannot prune %s: %s", table, exc)
                continue
            if n:
                self.commits += 1
                pruned[table] = n
            if n >= RETENTION_ROWS:
                # More to do: again on the writer's next turn, after waiting packets.
                self._retention_at = now
                self._tend_at = now
        if pruned:
            self.retained_bytes = retained_bytes(conn)
            log.info(
                "retention: deleted %s older than gateway.retention_days",
                ", ".join(f"{n} {t}" for t, n in pruned.items()),
            )

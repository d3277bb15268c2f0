"""The `counters` table: persistent counters, and the marks kept beside them.

packets_received is not bumped per packet: it is counted from the packet ids (see
COUNTED and count_received), which keeps the counters page out of packet commits.
"""

from __future__ import annotations

import sqlite3

from gateway.store.tables import packet_tables

# The counters counters() reports even before they are first bumped (as 0); others,
# such as rejected_<reason>, once they are.
COUNTERS = (
    "packets_received",
    "packets_redelivered",
    "packets_too_large",
    "packets_dropped",
    "packets_delivered",
    "packets_dead",
    "decode_failed",
    "cdrs_emitted",
    "events_recorded",
    "dead_letters_evicted",
)
# A row of `counters`, not a counter: packets with a higher id are received but not yet
# added to packets_received, and no packet id at or below it is handed out again.
COUNTED = "_packets_counted"
# Also a row of `counters`: every packet with an id at or below it has been delivered
# (or dead-lettered) wherever it had to go. Such rows may stay on disk for a while (see
# PACKET_TABLES), and nothing reads them.
RELEASED = "_packets_released"
# Also a row of `counters`, not a counter: the bytes the dead letters hold
# (DEAD_LETTER_BYTES of each row), kept by triggers (schema 11) so that every writer,
# `gateway dlq` in a process of its own too, keeps it exact without a scan of the table.
DEAD_BYTES = "_dead_letter_bytes"


def _bump(conn: sqlite3.Connection, name: str, n: int) -> None:
    if n:
        conn.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )


def bump(conn: sqlite3.Connection, name: str, n: int = 1) -> None:
    """Add n to a persistent counter (inside the caller's transaction)."""
    _bump(conn, name, n)


def _mark(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _set_mark(conn: sqlite3.Connection, name: str, value: int) -> None:
    # An upsert keeps the row where it is: INSERT OR REPLACE deletes and adds it again,
    # which also rewrites its entry in the name index, one page more in each commit that
    # released packets.
    conn.execute(
        "INSERT INTO counters(name, value) VALUES (?, ?)"
        " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def released_mark(conn: sqlite3.Connection) -> int:
    """The RELEASED mark: packets with an id at or below it are finished with."""
    return _mark(conn, RELEASED)


def _ids(conn: sqlite3.Connection) -> tuple[int, int]:
    """(highest packet id stored or 0, the COUNTED mark)."""
    spans = packet_tables(conn)
    return (spans[-1][2] if spans else 0), _mark(conn, COUNTED)


def count_received(conn: sqlite3.Connection) -> None:
    """Add the packets stored since the COUNTED mark to packets_received and move the
    mark to the highest id. Called (inside the caller's transaction) before packets
    are deleted, so that the rows it counts from are still there."""
    top, counted = _ids(conn)
    if top > counted:
        _bump(conn, "packets_received", top - counted)
        _set_mark(conn, COUNTED, top)


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    """All persistent counters, zero for those never bumped."""
    out = dict.fromkeys(COUNTERS, 0)
    rows = {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}
    counted = rows.pop(COUNTED, 0)
    rows.pop(RELEASED, None)
    rows.pop(DEAD_BYTES, None)
    out.update(rows)
    top, _ = _ids(conn)
    out["packets_received"] += max(top - counted, 0)
    return out

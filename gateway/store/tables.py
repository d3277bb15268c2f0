"""The packet tables: two of them, taking turns, and the ids each holds."""

from __future__ import annotations

import sqlite3

# Packets live in two tables, each holding one range of ids. New packets go to one; once
# every packet in the other is released, that table is emptied whole (DELETE without
# WHERE), which frees its pages without writing them. Deleting delivered packets row by
# row would change every page before it is freed, and each changed page is written twice
# (WAL, checkpoint): a quarter of the WAL at 1,000 packets/s. The `packets` view shows
# both tables' unreleased rows, for people and tests; the gateway reads the tables.
PACKET_TABLES = ("packets_a", "packets_b")

# Two subqueries: with MIN and MAX in one SELECT, SQLite reads the whole table.
_SPAN = "SELECT (SELECT MIN(id) FROM {0}), (SELECT MAX(id) FROM {0})"


def packet_tables(conn: sqlite3.Connection) -> list[tuple[str, int, int]]:
    """(table, lowest id, highest id) of each packet table holding rows, oldest first.

    Their lowest rows may be released ones (see released_mark). A store not migrated to
    schema 7 yet, as `gateway status` may read it, has the one table `packets`."""
    spans = []
    names: tuple[str, ...] = PACKET_TABLES
    try:
        rows = [conn.execute(_SPAN.format(t)).fetchone() for t in names]
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        names = ("packets",)
        rows = [conn.execute(_SPAN.format("packets")).fetchone()]
    for t, (lo, hi) in zip(names, rows, strict=True):
        if lo is not None:
            spans.append((t, int(lo), int(hi)))
    spans.sort(key=lambda r: r[1])
    return spans

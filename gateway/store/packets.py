"""Reading the packet tables: the span of unreleased ids, the next id, senders, and the
packets delivery fetches."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence

from gateway.store.counting import COUNTED, _mark, released_mark
from gateway.store.records import PacketRow
from gateway.store.tables import PACKET_TABLES, packet_tables


def packet_span(conn: sqlite3.Connection) -> tuple[int, int]:
    """(lowest, highest) id of the packets not yet released, (0, 0) when there are none.
    Ids in between may be missing (packets evicted by drop_oldest)."""
    spans = packet_tables(conn)
    if not spans:
        return 0, 0
    lo, hi = max(spans[0][1], released_mark(conn) + 1), spans[-1][2]
    return (lo, hi) if lo <= hi else (0, 0)


def next_packet_row(conn: sqlite3.Connection) -> tuple[int, str]:
    """The id for the next packet row, and the table it goes to (inside the caller's
    transaction).

    Ids go up by one per stored packet and are never reused, even once the tables are
    empty: a webhook's cursor is the last id it has delivered. Whatever deletes packets
    first moves the COUNTED mark up to the highest id (count_received).

    The table is the newer one while both hold packets. Once the older one has been
    emptied, the other is left to drain and new packets go to the empty one."""
    spans = packet_tables(conn)
    top = spans[-1][2] if spans else 0
    if len(spans) == 1:
        table = next(t for t in PACKET_TABLES if t != spans[0][0])
    else:
        table = spans[-1][0] if spans else PACKET_TABLES[0]
    return max(top, _mark(conn, COUNTED)) + 1, table


_PACKET_COLS = "p.id, p.recv_ns, s.topic, s.iccid, p.payload"
_PACKETS = "{} p JOIN senders s ON s.id = p.sender"


def sender_id(conn: sqlite3.Connection, topic: str, iccid: str) -> int:
    """The `senders` row of (topic, ICCID), added if new (inside the caller's transaction)."""
    row = conn.execute(
        "SELECT id FROM senders WHERE topic = ? AND iccid = ?", (topic, iccid)
    ).fetchone()
    if row is not None:
        return int(row[0])
    return int(
        conn.execute("INSERT INTO senders(topic, iccid) VALUES (?, ?)", (topic, iccid)).lastrowid
        or 0
    )


def fetch_packets(conn: sqlite3.Connection, after: int, limit: int) -> list[PacketRow]:
    """Unreleased packets with id > after, oldest first."""
    # A new route starts at 0: released rows still on disk are not for it either.
    after = max(after, released_mark(conn))
    out: list[PacketRow] = []
    for table, _lo, hi in packet_tables(conn):
        if hi <= after:
            continue
        out.extend(
            PacketRow(*r)
            for r in conn.execute(
                f"SELECT {_PACKET_COLS} FROM {_PACKETS.format(table)}"
                " WHERE p.id > ? ORDER BY p.id LIMIT ?",
                (after, limit - len(out)),
            )
        )
        if len(out) >= limit:
            break
    return out


def packets_by_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> list[PacketRow]:
    """The packets still stored and unreleased among `ids` (drop_oldest may have evicted
    some), oldest first."""
    mark = released_mark(conn)
    wanted = sorted(i for i in ids if i > mark)
    out: list[PacketRow] = []
    for table, lo, hi in packet_tables(conn):
        mine = [i for i in wanted if lo <= i <= hi]
        for k in range(0, len(mine), 500):
            chunk = mine[k : k + 500]
            marks = ",".join("?" * len(chunk))
            out.extend(
                PacketRow(*r)
                for r in conn.execute(
                    f"SELECT {_PACKET_COLS} FROM {_PACKETS.format(table)}"
                    f" WHERE p.id IN ({marks}) ORDER BY p.id",
                    chunk,
                )
            )
    return out

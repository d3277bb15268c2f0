"""The `events` table: what happened to the gateway (started, buffer high, webhook
disabled …), for `gateway status` and events webhooks."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

import orjson

from gateway.store.counting import _bump
from gateway.store.db import dumps, get_meta, set_meta, transaction
from gateway.store.records import batch_item_ids

# The events table keeps the newest this many (but any an events webhook has not taken).
KEEP_EVENTS = 10_000


def add_event(conn: sqlite3.Connection, kind: str, data: dict[str, Any], ts_ns: int = 0) -> int:
    """Record a gateway event (its own transaction); returns its id.

    Events beyond the newest KEEP_EVENTS are pruned, but never one an events webhook
    has not taken yet.
    """
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO events(ts_ns, kind, data) VALUES (?, ?, ?)",
            (ts_ns or time.time_ns(), kind, dumps(data)),
        )
        eid = int(cur.lastrowid or 0)
        _bump(conn, "events_recorded", 1)
        if eid % 100 == 0 and eid > KEEP_EVENTS:
            # By rows, not ids: superseded heartbeats leave gaps in the ids (add_heartbeat).
            row = conn.execute(
                "SELECT id FROM events ORDER BY id DESC LIMIT 1 OFFSET ?", (KEEP_EVENTS,)
            ).fetchone()
            taken = conn.execute(
                "SELECT MIN(cursor) FROM routes WHERE source = 'events'"
            ).fetchone()[0]
            if row is not None:
                bound = int(row[0])
                if taken is not None:
                    bound = min(bound, int(taken))
                conn.execute("DELETE FROM events WHERE id <= ?", (bound,))
    return eid


HEARTBEAT = "gateway_heartbeat"
# meta: the ids of the heartbeat rows still in the events table, as JSON.
_HEARTBEAT_ROWS = "heartbeat_rows"


def add_heartbeat(conn: sqlite3.Connection, data: dict[str, Any]) -> int:
    """Record a gateway_heartbeat event (its own transaction); returns its id.

    A heartbeat supersedes the ones before it: their rows are deleted, unless an open
    batch of an events webhook holds them (a batch is sent again with the same body),
    so heartbeats never fill the table or push other events out of it, and a receiver
    that was away gets the newest figures instead of every heartbeat it missed. They are
    not counted in `events_recorded`."""
    with transaction(conn):
        # Inserted before the earlier ones go: the events table has no AUTOINCREMENT, and
        # deleting its newest row would let the next event take that id again, one an
        # events webhook's cursor may have passed already.
        cur = conn.execute(
            "INSERT INTO events(ts_ns, kind, data) VALUES (?, ?, ?)",
            (time.time_ns(), HEARTBEAT, dumps(data)),
        )
        eid = int(cur.lastrowid or 0)
        kept = orjson.loads(get_meta(conn, _HEARTBEAT_ROWS, "[]"))
        held: set[int] = set()
        for item_ids, first_id, count in conn.execute(
            "SELECT item_ids, first_id, count FROM batches WHERE source = 'events'"
        ):
            held.update(batch_item_ids(item_ids, first_id, int(count or 0)))
        stay = [int(i) for i in kept if int(i) in held]
        for i in kept:
            if int(i) not in held:
                conn.execute("DELETE FROM events WHERE id = ? AND kind = ?", (int(i), HEARTBEAT))
        set_meta(conn, _HEARTBEAT_ROWS, dumps([*stay, eid]))
    return eid

"""The `events` table: what happened to the gateway (started, buffer high, webhook
disabled …), for `gateway status` and events webhooks."""

from __future__ import annotations

import sqlite3
import time
from typing import Any

from gateway.store.counting import _bump
from gateway.store.db import dumps, transaction

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
            taken = conn.execute(
                "SELECT MIN(cursor) FROM routes WHERE source = 'events'"
            ).fetchone()[0]
            bound = eid - KEEP_EVENTS
            if taken is not None:
                bound = min(bound, int(taken))
            conn.execute("DELETE FROM events WHERE id <= ?", (bound,))
    return eid

"""Recognising a broker's redeliveries: the sessions' redelivery windows, pinned packet
tables, and the `inflight` rows kept for what has no packet row to be known by."""

from __future__ import annotations

import sqlite3
import sys
import time
from collections import deque

from gateway.store.counting import released_mark
from gateway.store.db import get_meta, scalar
from gateway.store.records import Incoming, digest_of
from gateway.store.tables import PACKET_TABLES, packet_tables

# A broker redelivers (DUP=1) the packets whose PUBACK it had not had when a connection
# ended. PUBACKs go after the commit, in commit order, so those had their rows among the
# session's latest: the packets committed while their PUBACKs waited for the MQTT
# thread (at most max_pending and a commit's worth: it hands over no more while they
# wait), and those whose PUBACK was on its way, no more than the broker sends ahead
# (the Receive Maximum, when the broker keeps to it: mosquitto 2.0.11 does only for a
# connection's first packets). That many of a session's last rows are its redelivery
# window. A packet row keeps its packet id and epoch (schema 10), a delivered table
# holding one of the window's rows is not emptied (it is "pinned"), and `inflight` is
# written for the rest only: a recognised redelivery again, a packet too large to
# store, and the window's rows of a table that stayed pinned for PIN_WAIT_S (then
# emptied, which at a few packets a second is the usual way).
PIN_WAIT_S = 60.0
# A row of `meta`: the highest connection epoch of a committed packet (Store.last_epoch).
LAST_EPOCH = "last_epoch"


class Redelivery:
    """The Store's part that tells a broker's redelivery (DUP=1) from a new packet."""

    conn: sqlite3.Connection
    # How many of a session's latest packet rows a redelivery may reach back to.
    redelivery_window: int
    # The ids of each session's last redelivery_window packet rows, oldest first.
    _recent: dict[int, deque[int]]
    # Since when (time.monotonic()) each pinned table has waited to be emptied.
    _pinned_since: dict[str, float]
    # The highest connection epoch stored (see LAST_EPOCH).
    _epoch_saved: int

    def _load_recent(self, sessions: int) -> dict[int, deque[int]]:
        """Each session's last redelivery_window row ids, read from the newest row down
        until every session 0 … sessions - 1 has that many (or the rows run out)."""
        window = self.redelivery_window
        found: dict[int, list[int]] = {}
        wanted = range(sessions)
        for table, _lo, _hi in reversed(packet_tables(self.conn)):
            rows = self.conn.execute(
                f"SELECT id, mid >> 16 FROM {table} WHERE mid IS NOT NULL ORDER BY id DESC"
            )
            for rid, session in rows:
                ids = found.setdefault(session, [])
                if len(ids) < window:
                    ids.append(rid)
                    if len(ids) == window and all(len(found.get(n, ())) == window for n in wanted):
                        break
            else:
                continue
            break
        return {n: deque(reversed(ids), maxlen=window) for n, ids in found.items()}

    def _pin_bound(self) -> int:
        """The lowest id among the sessions' recent rows (sys.maxsize: none)."""
        return min((ids[0] for ids in self._recent.values() if ids), default=sys.maxsize)

    def _unneeded_mark(self, conn: sqlite3.Connection) -> int:
        """Rows at or below this id are needed by nothing: released, and older than every
        session's redelivery window."""
        return min(released_mark(conn), self._pin_bound() - 1)

    def _latest_use(self, p: Incoming) -> tuple[bytes, int] | None:
        """(digest, epoch) of the latest packet committed under p's packet id in its
        session, as far back as a redelivery may reach; None when there is none.

        The packet rows are looked at down to the session's oldest recent row, and the
        `inflight` row of the packet id if it was written no longer ago than that (its
        at_id: the highest packet id then, or the row's own when copied from one)."""
        conn = self.conn
        recent = self._recent.get(p.source)
        key = p.inflight_key
        found: tuple[bytes, int] | None = None
        row_id = -1
        if recent:
            for t in PACKET_TABLES:
                row = conn.execute(
                    f"SELECT p.id, s.topic, p.payload, p.epoch FROM {t} AS p"
                    " JOIN senders AS s ON s.id = p.sender"
                    " WHERE p.id >= ? AND p.mid = ? ORDER BY p.id DESC LIMIT 1",
                    (recent[0], key),
                ).fetchone()
                if row is not None and row[0] > row_id:
                    row_id = row[0]
                    found = (digest_of(row[1], row[2]), row[3])
        oldest = recent[0] if recent is not None and len(recent) == recent.maxlen else 0
        kept = conn.execute("SELECT digest, epoch, at_id FROM inflight WHERE mid = ?", (key,))
        row = kept.fetchone()
        if row is not None and row[2] >= max(oldest, row_id):
            found = (row[0][:8], row[1])
        return found

    def _keep_keys(self, conn: sqlite3.Connection, table: str, lo: int, hi: int) -> None:
        """Copy what `inflight` needs of the rows lo … hi of a table about to lose them."""
        rows = conn.execute(
            f"SELECT p.mid, s.topic, p.payload, p.epoch, p.id FROM {table} AS p"
            " JOIN senders AS s ON s.id = p.sender"
            " WHERE p.id >= ? AND p.id <= ? AND p.mid IS NOT NULL ORDER BY p.id",
            (lo, hi),
        )
        conn.executemany(
            "INSERT INTO inflight(mid, digest, epoch, at_id) VALUES (?,?,?,?)"
            " ON CONFLICT(mid) DO UPDATE SET digest = excluded.digest,"
            " epoch = excluded.epoch, at_id = excluded.at_id"
            " WHERE excluded.at_id >= inflight.at_id",
            [
                (key, digest_of(topic, payload), epoch, rid)
                for key, topic, payload, epoch, rid in rows
            ],
        )

    def _unpinned(self, conn: sqlite3.Connection, table: str, hi: int) -> bool:
        """Whether a released table whose rows end at `hi` may be emptied now: when none
        of them is a recent row, or, once it has waited PIN_WAIT_S, with their keys
        copied to `inflight` first."""
        bound = self._pin_bound()
        if hi < bound:
            self._pinned_since.pop(table, None)
            return True
        now = time.monotonic()
        since = self._pinned_since.setdefault(table, now)
        if now - since < PIN_WAIT_S:
            return False
        self._keep_keys(conn, table, bound, hi)
        del self._pinned_since[table]
        return True

    def _saved_epoch(self) -> int:
        """The highest connection epoch stored (see LAST_EPOCH)."""
        saved = int(get_meta(self.conn, LAST_EPOCH, "0"))
        return max(saved, scalar(self.conn, "SELECT COALESCE(MAX(epoch), 0) FROM inflight"))

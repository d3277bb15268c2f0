"""The packet buffer: which packets are written now and which wait (buffer full, disk
short of space), writing them, and freeing their space once delivered (release) or when
the buffer is full (drop_oldest)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import sqlite3
import time
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.store.counting import RELEASED, _bump, _set_mark, count_received, released_mark
from gateway.store.db import dumps, scalar, set_meta, transaction
from gateway.store.dead_letters import DEAD_LETTER_PREFIX_BYTES
from gateway.store.events import add_event
from gateway.store.packets import next_packet_row, packet_span, sender_id
from gateway.store.records import Incoming
from gateway.store.redelivery import LAST_EPOCH, Redelivery
from gateway.store.tables import PACKET_TABLES, packet_tables

log = logging.getLogger("gateway.store")

# The writer keeps at most this many senders (topic and ICCID) in memory.
SENDER_CACHE = 10_000


@dataclass(slots=True)
class _Written:
    """What a packet commit wrote, for after its COMMIT."""

    accepted: list[Incoming]  # stored, recognised redeliveries, too large
    stored: bool  # whether any packet row was added
    rows: list[tuple[int, int]]  # (session, id) of each row added
    epoch: int  # the highest connection epoch among the packets
    added: int  # payload bytes added to the buffer
    evicted: tuple[int, int]  # (packets, bytes) drop_oldest deleted


class Buffer(Redelivery):
    """The Store's part that admits, writes, evicts and releases packets."""

    conn: sqlite3.Connection
    # The store's directory, for statvfs at each commit: pathlib's `.parent` and str()
    # cost more than the call.
    _dir: str
    max_buffer_bytes: int
    on_full: str  # "backpressure" or "drop_oldest"
    min_free_bytes: int
    _page_size: int
    # Payload bytes of the unreleased packets, the bytes the dead letters hold, and those
    # of the retained tables (CDRs, events, modem snapshots, reports; read every
    # DEAD_LETTER_TEND_S, see retention): all count toward max_buffer_bytes.
    buffer_bytes: int
    dead_letter_bytes: int
    retained_bytes: int
    # Transactions that wrote, since start (see Store.__init__).
    commits: int
    # Packets taken from the queue but not written (buffer full, disk short, write
    # failing): written with the next commit.
    _held: list[Incoming]
    # The webhooks that consume packets (set_packet_routes).
    _packet_routes: tuple[str, ...]
    # senders rows the writer knows by (topic, ICCID): committed ones, and those the
    # packet commit under way added (kept once it commits). Senders no packet refers
    # to any more are deleted once as many were added as there are packets (at
    # least SENDER_CACHE): a topic with a part of its own per message must not make
    # the table grow for ever.
    _senders: dict[tuple[str, str], int]
    _new_senders: dict[tuple[str, str], int]
    _senders_added: int
    # Why packets are not being acknowledged right now ("" when they are): a failed
    # write (disk full, read-only file system), or the disk reserve reached.
    write_error: str
    paused: str
    _failing_since_ns: int
    # Whether the buffer is above 80 % full (and not yet back below 70 %).
    _buffer_high: bool
    # Told the packets of each commit, to acknowledge them; and that packets were stored.
    on_committed: Callable[[list[Incoming]], None] | None
    on_change: Callable[[], None] | None

    @property
    def full(self) -> bool:
        return self.used_bytes >= self.max_buffer_bytes

    @property
    def used_bytes(self) -> int:
        """What counts toward max_buffer_bytes: packets, dead letters, retained tables."""
        return self.buffer_bytes + self.dead_letter_bytes + self.retained_bytes

    def set_packet_routes(self, names: Iterable[str]) -> None:
        """The webhooks that consume packets; a packet is kept until all of them are done."""
        self._packet_routes = tuple(names)

    def disk_shortage(self, incoming: int) -> str:
        """Why writing `incoming` payload bytes would eat into min_free_bytes, or ""."""
        if not self.min_free_bytes:
            return ""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return ""
        free = st.f_bavail * st.f_frsize
        # A packet costs more than its payload: row, index, inflight and WAL pages.
        need = 2 * incoming + 64 * 1024
        if free - need >= self.min_free_bytes:
            return ""
        # Pages freed by delivered packets are reused before the file grows.
        if scalar(self.conn, "PRAGMA freelist_count") * self._page_size >= need:
            return ""
        if (
            self._delete_released()
            and scalar(self.conn, "PRAGMA freelist_count") * self._page_size >= need
        ):
            return ""
        return (
            f"{free / 1e6:.1f} MB free on the store's file system, "
            f"less than gateway.min_free_mb ({self.min_free_bytes / 1048576:g} MB)"
        )

    def _delete_released(self) -> bool:
        """Delete released packets still on disk (see PACKET_TABLES), row by row; whether
        any were. Only for a disk short of space, where the pages they free are worth
        the writes."""
        conn = self.conn
        mark = self._unneeded_mark(conn)
        tables = [t for t, lo, _hi in packet_tables(conn) if lo <= mark]
        if not tables:
            return False
        try:
            with transaction(conn):
                for t in tables:
                    conn.execute(f"DELETE FROM {t} WHERE id <= ?", (mark,))
        except sqlite3.Error as exc:
            log.warning("could not delete delivered packets to free space: %s", exc)
            return False
        self.commits += 1
        return True

    def _admit(self, packets: list[Incoming]) -> list[Incoming]:
        """The packets to write now; the rest are held in memory (not acknowledged, so the
        broker keeps them) while the buffer is full or the disk is short of space."""
        incoming_bytes = sum(len(p.payload) for p in packets if not p.too_large)
        used = self.used_bytes
        if used + incoming_bytes > self.max_buffer_bytes and self.on_full == "backpressure":
            # Stop acknowledging: keep them in memory (bounded by the broker's receive
            # maximum) and try again when delivery (or a dead letters' eviction) frees space.
            room = self.max_buffer_bytes - used
            fit: list[Incoming] = []
            for p in packets:
                size = 0 if p.too_large else len(p.payload)
                if size <= room or p.too_large:
                    fit.append(p)
                    room -= size
                else:
                    break
            self._held = packets[len(fit) :]
            packets = fit
            if not packets:
                return []
        shortage = self.disk_shortage(sum(len(p.payload) for p in packets))
        if shortage:
            # Keep the disk from filling up: acknowledge nothing, hold the packets (at
            # most the broker's receive maximum), try again.
            if not self.paused:
                log.error("store paused, not acknowledging packets: %s", shortage)
            self.paused = shortage
            self._held = packets + self._held
            return []
        if self.paused:
            log.warning("store resumed: disk space is back above gateway.min_free_mb")
            self.paused = ""
        return packets

    def _write_packets(self, packets: list[Incoming]) -> _Written:
        """Write packets inside the open transaction (in a savepoint of their own)."""
        conn = self.conn
        store_rows: list[tuple[int, int, bytes, int, int, int]] = []
        sessions: list[int] = []
        # `inflight` rows: what has no packet row to be recognised by (see
        # PIN_WAIT_S), written as of the highest packet id so far.
        inflight: list[tuple[int, bytes, int, int]] = []
        too_large: list[Incoming] = []
        redelivered = 0
        accepted: list[Incoming] = []
        evicted = (0, 0)
        self._new_senders.clear()  # left by a commit that was rolled back
        with transaction(conn):
            first, table = next_packet_row(conn)
            for p in packets:
                if p.dup:
                    digest = p.digest()
                    latest = self._latest_use(p)
                    if latest is not None and latest[0] == digest and latest[1] < p.epoch:
                        p.outcome = "redelivery"
                        redelivered += 1
                        accepted.append(p)
                        # Its PUBACK may be lost again, after its row has gone.
                        inflight.append((p.inflight_key, digest, latest[1], first - 1))
                        continue
                if p.too_large:
                    p.outcome = "too_large"
                    too_large.append(p)
                    inflight.append((p.inflight_key, p.digest(), p.epoch, first - 1))
                else:
                    p.outcome = "stored"
                    sender = self._sender(p.topic, p.iccid)
                    store_rows.append(
                        (p.recv_ns, sender, p.payload, len(p.payload), p.inflight_key, p.epoch)
                    )
                    sessions.append(p.source)
                accepted.append(p)
            conn.executemany(
                f"INSERT INTO {table}(id, recv_ns, sender, payload, size, mid, epoch)"
                " VALUES (?,?,?,?,?,?,?)",
                [(first + i, *row) for i, row in enumerate(store_rows)],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO inflight(mid, digest, epoch, at_id) VALUES (?,?,?,?)",
                inflight,
            )
            epoch = max(p.epoch for p in packets)
            if epoch > self._epoch_saved:
                set_meta(conn, LAST_EPOCH, str(epoch))
            for p in too_large:
                # A prefix, the size and a hash: a sender of huge packets must not fill
                # the disk with them (see DEAD_LETTER_PREFIX_BYTES).
                conn.execute(
                    "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, reason,"
                    " status, excerpt, attempts, created_ns, topic, iccid, recv_ns, size,"
                    " sha256) VALUES ('', 'packets', '', ?, 1, 'too_large', 0, ?, 0, ?, ?, ?,"
                    " ?, ?, ?)",
                    (
                        p.payload[:DEAD_LETTER_PREFIX_BYTES],
                        f"payload of {len(p.payload)} bytes exceeds mqtt.max_payload_bytes",
                        time.time_ns(),
                        p.topic,
                        p.iccid,
                        p.recv_ns,
                        len(p.payload),
                        hashlib.sha256(p.payload).hexdigest(),
                    ),
                )
            added = sum(r[3] for r in store_rows)
            used = self.used_bytes + added
            if self.on_full == "drop_oldest" and used > self.max_buffer_bytes:
                excess = used - self.max_buffer_bytes
                evicted = self._evict_oldest(excess, first)
            # packets_received is not bumped here: it is counted from the ids (see
            # count_received), which keeps the counters page out of this commit.
            _bump(conn, "packets_redelivered", redelivered)
            _bump(conn, "packets_too_large", len(too_large))
            _bump(conn, "packets_dead", len(too_large))
            if self.write_error:
                # Written with the first commit that works again, so that `gateway
                # status` can tell what happened while nothing could be written.
                conn.execute(
                    "INSERT INTO events(ts_ns, kind, data) VALUES (?, ?, ?)",
                    (
                        time.time_ns(),
                        "store_write_failed",
                        dumps({"error": self.write_error, "since_ns": self._failing_since_ns}),
                    ),
                )
                _bump(conn, "events_recorded", 1)
        rows = [(n, first + i) for i, n in enumerate(sessions)]
        return _Written(accepted, bool(store_rows), rows, epoch, added, evicted)

    def _write_failed(self, packets: list[Incoming], exc: sqlite3.Error) -> None:
        """Disk full, read-only file system, I/O error: acknowledge nothing, keep the
        packets in memory and try again; the broker still holds them."""
        if exc.__class__.__name__ != self.write_error.split(":", 1)[0]:
            log.error("store write failed, not acknowledging packets: %s", exc)
        if not self.write_error:
            self._failing_since_ns = time.time_ns()
        self.write_error = f"{exc.__class__.__name__}: {exc}"
        for p in packets:
            p.outcome = ""
        self._held = packets + self._held
        time.sleep(0.2)

    def _sender(self, topic: str, iccid: str) -> int:
        """sender_id, from memory when the writer has seen that sender before."""
        key = (topic, iccid)
        found = self._senders.get(key) or self._new_senders.get(key)
        if found is None:
            found = self._new_senders[key] = sender_id(self.conn, topic, iccid)
        return found

    def _prune_senders(self, conn: sqlite3.Connection) -> None:
        """Delete senders no packet refers to, once enough were added (see _senders)."""
        if self._senders_added < SENDER_CACHE:
            return
        lo, hi = packet_span(conn)
        if self._senders_added < hi - lo:
            return
        # Released rows still on disk are never read again (see PACKET_TABLES), but for
        # the window's (see PIN_WAIT_S).
        held = " UNION ".join(f"SELECT sender FROM {t} WHERE id > ?" for t in PACKET_TABLES)
        keep = self._unneeded_mark(conn)
        conn.execute(f"DELETE FROM senders WHERE id NOT IN ({held})", (keep,) * len(PACKET_TABLES))
        self._senders_added = 0
        self._senders.clear()

    def _committed(self, written: _Written) -> None:
        """After the packets' COMMIT: count their bytes, then have them acknowledged."""
        window = self.redelivery_window
        for session, rid in written.rows:
            recent = self._recent.get(session)
            if recent is None:
                recent = self._recent[session] = deque(maxlen=window)
            recent.append(rid)
        self._epoch_saved = max(self._epoch_saved, written.epoch)
        if self._new_senders:
            if len(self._senders) + len(self._new_senders) > SENDER_CACHE:
                self._senders.clear()
            self._senders.update(self._new_senders)
            self._senders_added += len(self._new_senders)
            self._new_senders.clear()
        self.buffer_bytes += written.added - written.evicted[1]
        if written.evicted[0]:
            log.warning(
                "buffer full: dropped %d oldest packets (%d bytes)",
                written.evicted[0],
                written.evicted[1],
            )
        if self.write_error:
            log.warning("store writable again after: %s", self.write_error)
        self.write_error = ""
        if self.on_committed is not None:
            self.on_committed(written.accepted)
        if self.on_change is not None and written.stored:
            self.on_change()

    def _watch_buffer(self) -> None:
        """Record an event when the buffer passes 80 % full, and when it is below 70 % again."""
        used = self.used_bytes
        level = used / self.max_buffer_bytes if self.max_buffer_bytes else 0.0
        high = level >= 0.8 if not self._buffer_high else level >= 0.7
        if high == self._buffer_high:
            return
        self._buffer_high = high
        data = {
            "bytes": self.buffer_bytes,
            "dead_letter_bytes": self.dead_letter_bytes,
            "retained_bytes": self.retained_bytes,
            "max_bytes": self.max_buffer_bytes,
        }
        log.warning(
            "buffer %s: %d of %d bytes (%d in dead letters, %d in CDRs, events, snapshots"
            " and reports)",
            "above 80 %" if high else "back below 70 %",
            used,
            self.max_buffer_bytes,
            self.dead_letter_bytes,
            self.retained_bytes,
        )
        if high and self.retained_bytes * 2 > self.max_buffer_bytes:
            # Delivery cannot free these: only retention (or a larger buffer) does.
            log.error(
                "CDRs, events, modem snapshots and reports hold %d of the %d bytes of"
                " gateway.max_buffer_mb: raise max_buffer_mb or lower gateway.retention_days",
                self.retained_bytes,
                self.max_buffer_bytes,
            )
        with contextlib.suppress(sqlite3.Error):
            add_event(self.conn, "buffer_high" if high else "buffer_ok", data)

    def _evict_oldest(self, excess: int, first: int) -> tuple[int, int]:
        """drop_oldest: delete the oldest packets until `excess` bytes are freed.

        Runs inside the caller's transaction; returns (packets, bytes) dropped, which
        count only once that transaction commits."""
        conn = self.conn
        count_received(conn)
        freed = 0
        dropped = 0
        after = released_mark(conn)
        for table, _lo, _hi in packet_tables(conn):
            while freed < excess:
                rows = conn.execute(
                    f"SELECT id, size FROM {table} WHERE id > ? ORDER BY id LIMIT 500", (after,)
                ).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                for rid, size in rows:
                    freed += size
                    dropped += 1
                    if freed >= excess:
                        last = rid
                        break
                # The rows of this commit (from `first` on) are recent too.
                bound = min(self._pin_bound(), first)
                if last >= bound:
                    self._keep_keys(conn, table, max(after + 1, bound), last)
                conn.execute(f"DELETE FROM {table} WHERE id > ? AND id <= ?", (after, last))
                after = last
        _bump(conn, "packets_dropped", dropped)
        return dropped, freed

    def release_packets(self, conn: sqlite3.Connection) -> int:
        """Delete packets every packet route has finished with; returns how many."""
        if not self._packet_routes:
            return 0
        marks = ",".join("?" * len(self._packet_routes))
        low = conn.execute(
            f"SELECT MIN(cursor), COUNT(*) FROM routes WHERE name IN ({marks})",
            self._packet_routes,
        ).fetchone()
        if low is None or low[1] < len(self._packet_routes):
            return 0
        bound = int(low[0])
        # Only the configured webhooks' batches hold packets back: a webhook removed from
        # the config must not keep every later packet on disk (its batches stay listed).
        open_first = conn.execute(
            "SELECT MIN(first_id) FROM batches WHERE source = 'packets' AND first_id IS NOT NULL"
            f" AND route IN ({marks})",
            self._packet_routes,
        ).fetchone()[0]
        if open_first is not None:
            bound = min(bound, int(open_first) - 1)
        mark = released_mark(conn)
        spans = packet_tables(conn)
        freed = n = 0
        for table, lo, hi in spans:
            if lo <= bound and hi > mark:
                size, count = conn.execute(
                    f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM {table}"
                    " WHERE id > ? AND id <= ?",
                    (mark, bound),
                ).fetchone()
                freed += int(size)
                n += int(count)
        if n:
            count_received(conn)
            _set_mark(conn, RELEASED, bound)
            mark = bound
        # A table is emptied only once all of it is released: row by row, SQLite would
        # write each of its pages once more before freeing it. (drop_oldest can leave a
        # table with released rows only, hence `mark`.) A pinned one waits.
        for table, _lo, hi in spans:
            if hi > mark or not self._unpinned(conn, table, hi):
                break
            conn.execute(f"DELETE FROM {table}")
        if n:
            self.buffer_bytes -= freed
            self._prune_senders(conn)
        return n

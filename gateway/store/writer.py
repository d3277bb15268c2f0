"""The Store: the gateway's one SQLite database, written by one thread with group commit.

Every write goes through one thread (`Store.call`, `Store.submit_packet`), so SQLite never
sees two writers and the asyncio loop never blocks on disk. Packets are committed before
the ingest is told to acknowledge them (on_committed). The class is put together from
its parts: Pacing (when to commit), Buffer (the packets, with Redelivery),
DeadLetters (their limits) and Retention (the side tables' age and size); this
module holds the thread, its queue and the commits.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import logging
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import StoreError
from gateway.store.buffer import Buffer
from gateway.store.db import connect, scalar
from gateway.store.dead_letters import DeadLetters, dead_letter_bytes
from gateway.store.pacing import _STOP, MAX_GROUP_CALLS, Pacing, _Call, _Cap, _sort, _urgent
from gateway.store.records import Incoming
from gateway.store.retention import Retention, retained_bytes
from gateway.store.schema import migrate
from gateway.store.settings import StoreSettings

log = logging.getLogger("gateway.store")
T = TypeVar("T")


class _GroupAborted(Exception):
    """SQLite rolled a group commit back by itself (disk full, I/O error)."""


def _hand_out(results: list[tuple[_Call, Any, BaseException | None]]) -> None:
    """Give each call of a committed group its result or error."""
    for c, value, error in results:
        if error is None:
            c.future.set_result(value)
        else:
            c.future.set_exception(error)


class Store(Pacing, Buffer, DeadLetters, Retention):
    """The gateway's one SQLite database, written by one thread."""

    def __init__(
        self,
        path: Path,
        settings: StoreSettings | None = None,
        *,
        on_progress: Callable[[str], None] | None = None,
    ) -> None:
        """Open (creating and migrating) the database at `path` and start its writer.
        `on_progress` is told when an existing store is migrated (see migrate)."""
        s = settings or StoreSettings()
        self.path = path
        # For statvfs at each commit: pathlib's `.parent` and str() cost more than the call.
        self._dir = os.fspath(path.parent)
        # Hold a commit this long after its first packet, for later ones to share it.
        self.commit_delay_s = s.commit_delay_s
        # ... unless it has this many packets by then.
        self.commit_delay_max_packets = s.commit_delay_max_packets
        # A wait that has fewer than TRICKLE_PACKETS by then goes on up to this long
        # (no longer than commit_delay_s: not at all).
        self.commit_delay_slow_s = s.commit_delay_slow_s
        # The cap learnt from stretched waits; see TRICKLE_PACKETS.
        self._trickle_cap = _Cap()
        # The broker's cap on unacknowledged packets, as learnt; see CAP_MIN_PACKETS.
        self._broker_cap = _Cap()
        self.max_buffer_bytes = s.max_buffer_bytes
        self.on_full = s.on_full
        self.commit_max_packets = s.commit_max_packets
        self.min_free_bytes = s.min_free_bytes
        self.conn = connect(path)
        migrate(self.conn, on_progress)
        self._q = queue.SimpleQueue()
        self._held = []
        self._packet_routes = ()
        # Senders known to the writer (see Buffer._senders).
        self._senders = {}
        self._new_senders = {}
        self._senders_added = 0
        self.on_committed = None
        self.on_change = None
        self.buffer_bytes = scalar(self.conn, "SELECT COALESCE(SUM(size), 0) FROM packets")
        # Dead letters count toward max_buffer_bytes too (see DEAD_BYTES); the oldest go
        # past either limit (0: no age limit), looked at every DEAD_LETTER_TEND_S.
        self.dead_letter_max_bytes = s.dead_letter_max_bytes
        self.dead_letter_max_age_s = s.dead_letter_max_age_s
        self.dead_letter_bytes = dead_letter_bytes(self.conn)
        self._tend_at = 0.0
        # CDRs, events, modem snapshots and reports count toward max_buffer_bytes too, and
        # go after retention_s (see retention); looked at in the dead letters' turns.
        self.retained_bytes = retained_bytes(self.conn)
        self.retention_s = s.retention_s
        self.retention_check_s = s.retention_check_s
        self._retention_at = 0.0
        self._consumers = {} if s.reports is None else {"reports": s.reports}
        # Why packets are not being acknowledged right now ("" when they are): a failed
        # write (disk full, read-only file system), or the disk reserve reached.
        self.write_error = ""
        self.paused = ""
        self._failing_since_ns = 0
        # Transactions that wrote, since start: each is an fsync and a few WAL pages, the
        # store's wear on an SD card (gateway_store_commits in /metrics).
        self.commits = 0
        self._page_size = scalar(self.conn, "PRAGMA page_size")
        self._buffer_high = False
        # Packets handed over by the MQTT thread and not yet committed (see submit_packet).
        self.max_pending = max(2 * s.commit_max_packets, 1000)
        # How many of a session's latest packet rows a redelivery may reach back to (see
        # PIN_WAIT_S); `redelivery_window` sets it for tests.
        self.redelivery_window = s.redelivery_window or (
            self.max_pending + s.commit_max_packets + s.receive_maximum
        )
        # The ids of each session's last redelivery_window packet rows, oldest first: a
        # table holding one of them is pinned (see PIN_WAIT_S), since when by table.
        self._recent = self._load_recent(s.sessions)
        self._pinned_since = {}
        self._epoch_saved = self._saved_epoch()
        self._submitted = 0
        self._released = 0
        self._room = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # -- public API, any thread -------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def open(
        cls,
        state_dir: Path,
        settings: StoreSettings | None = None,
        *,
        on_progress: Callable[[str], None] | None = None,
        **overrides: Any,
    ) -> Iterator[Store]:
        """Open (creating and migrating) state_dir/gateway.db; flush and close on exit.
        `overrides`: fields of StoreSettings to change (tests, benchmarks)."""
        settings = dataclasses.replace(settings or StoreSettings(), **overrides)
        store = cls(Path(state_dir) / "gateway.db", settings, on_progress=on_progress)
        try:
            yield store
        finally:
            store.close()

    def submit_packet(self, pkt: Incoming, wait_s: float = 0.0) -> bool:
        """Queue a packet for the next group commit (called from one thread at a time:
        MQTT's, or the ingest processes' readers under IngestPool.submit_lock).

        With `wait_s`, wait up to that long while `max_pending` packets are already in
        memory uncommitted: blocking the MQTT thread stops it reading the socket, so a
        broker that sends faster than the disk commits (or ignores our Receive Maximum,
        as mosquitto 2.0.11 does after a connection's first packets) meets TCP
        backpressure instead of filling the gateway's memory. Returns False when the
        wait ran out.
        """
        room = True
        if self.pending_packets >= self.max_pending and wait_s > 0:
            with self._room:
                room = self._room.wait_for(lambda: self.pending_packets < self.max_pending, wait_s)
        # Only one submitter at a time adds to _submitted and only the writer to
        # _released, so neither needs a lock; the writer notifies `_room` under it.
        self._submitted += 1
        self._q.put(pkt)
        return room

    @property
    def pending_packets(self) -> int:
        """Packets handed over with submit_packet and not committed yet."""
        return self._submitted - self._released

    def call(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run fn(conn, *args) on the writer thread."""
        return self._enqueue(_Call(fn, args))

    def defer(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Like call, for bookkeeping that can wait: instead of ending the commit delay
        (gateway.commit_delay_ms) at once, it joins the packets' commit, so that both
        share one fsync; with no packet waiting, it waits the delay for some. For writes
        whose loss in a crash costs a resend, never a packet (a delivered batch's
        completion, new batches while delivery keeps up)."""
        return self._enqueue(_Call(fn, args, lazy=True))

    def _enqueue(self, c: _Call) -> concurrent.futures.Future[Any]:
        if self._closed:
            c.future.set_exception(StoreError("store is closed"))
        else:
            self._q.put(c)
        return c.future

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) on the writer thread and wait for it."""
        return self.call(fn, *args).result()

    def flush(self) -> None:
        """Return once every packet submitted before is committed and acknowledged."""
        self.run_sync(lambda _c: None)

    def last_epoch(self) -> int:
        """The highest connection epoch of any committed packet (see Ingest.epoch)."""
        return self.run_sync(lambda _c: self._epoch_saved)

    def close(self) -> None:
        """Commit what is queued, stop the writer and close the database; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join()
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    @property
    def writer_alive(self) -> bool:
        """Whether the writer thread is running (it ends only with close())."""
        return self._thread.is_alive()

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            timeout = 0.2 if self._held else max(0.0, self._tend_at - time.monotonic())
            try:
                first = self._q.get(timeout=timeout)
            except queue.Empty:
                first = None
            packets = list(self._held)
            was_held = len(packets)
            self._held.clear()
            calls: list[_Call] = []
            stop = False
            item = first
            while item is not None:
                stop = _sort(item, packets, calls) or stop
                if len(packets) >= self.commit_max_packets or len(calls) >= MAX_GROUP_CALLS:
                    break
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = None
            if (packets or calls) and not _urgent(calls) and not stop and self.commit_delay_s:
                # Lazy calls alone wait for packets too: committed on their own, each
                # delivered batch's completion after a quiet moment made a commit more.
                # Packets held back (buffer full, disk short) say nothing of the broker,
                # nor do those that came into a wait begun for lazy calls.
                learn = bool(packets) and not was_held
                stop = self._wait_for_more(packets, calls, learn=learn)
            if packets:
                self._commit_packets(packets, calls)
                self._watch_buffer()
                # What is still held (buffer full, write failing) stays pending.
                self._release_pending(len(packets) - len(self._held))
            else:
                self._run_calls(calls)
                # Delivery's completions free the buffer without a packet commit: a
                # buffer back below 70 % says so then, not at the next packet. (Only
                # that way: a buffer filling up is seen at the packet commits.)
                if self._buffer_high:
                    self._watch_buffer()
            if time.monotonic() >= self._tend_at and not stop:
                self._tend_dead_letters()
                self._tend_retention()
            if stop:
                # Drain anything that raced with close so no caller waits forever.
                while True:
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, Incoming):
                        self._held.append(item)
                    elif isinstance(item, _Call):
                        self._run_call(item)
                if self._held:
                    held, self._held = self._held, []
                    self._commit_packets(held)
                return

    def _run_call(self, c: _Call) -> None:
        if c.future.set_running_or_notify_cancel():
            self._run_one(c)

    def _run_one(self, c: _Call) -> None:
        changes = self.conn.total_changes
        try:
            value = c.fn(self.conn, *c.args)
            if self.conn.total_changes != changes:
                self.commits += 1
            c.future.set_result(value)
        except BaseException as exc:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            c.future.set_exception(exc)

    def _run_calls(self, calls: list[_Call]) -> None:
        """Run the queued calls in one transaction: one commit (one fsync) for all of them.

        Each call runs in a savepoint of its own, so one that fails leaves the others'
        changes; results are handed out only once the group has committed. If the group
        cannot commit, each call runs again on its own and gets its own result or error."""
        self._run_started([c for c in calls if c.future.set_running_or_notify_cancel()])

    def _calls_in_group(self, calls: list[_Call]) -> list[tuple[_Call, Any, BaseException | None]]:
        """Run calls (already marked running) inside the open transaction, each in a
        savepoint; their results, to hand out once the transaction has committed."""
        conn = self.conn
        results: list[tuple[_Call, Any, BaseException | None]] = []
        for c in calls:
            conn.execute("SAVEPOINT call")
            try:
                value = c.fn(conn, *c.args)
            except Exception as exc:
                if not conn.in_transaction:
                    raise _GroupAborted from exc
                conn.execute("ROLLBACK TO call")
                conn.execute("RELEASE call")
                results.append((c, None, exc))
            else:
                conn.execute("RELEASE call")
                results.append((c, value, None))
        return results

    def _abort_group(self, buffer_bytes: int) -> None:
        """Roll back a group that could not commit, and what its calls did to the buffer's
        byte count (release_packets), which they will do again when run on their own."""
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
        self.buffer_bytes = buffer_bytes

    def _commit_packets(self, packets: list[Incoming], calls: Sequence[_Call] = ()) -> None:
        """Commit packets and then tell the ingest to acknowledge them (on_committed).

        `calls` taken from the queue with them run in the same transaction, after the
        packets: one fsync for both. If the packets cannot be written, they are held
        and the calls run on their own; if a call brings the whole group down, the
        packets are committed alone and then each call on its own."""
        group = [c for c in calls if c.future.set_running_or_notify_cancel()]
        packets = self._admit(packets)
        if not packets:
            self._run_started(group)
            return
        conn = self.conn
        buffer_bytes = self.buffer_bytes
        results: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                written = self._write_packets(packets)
            except sqlite3.Error as exc:
                self._abort_group(buffer_bytes)
                self._write_failed(packets, exc)
                self._run_started(group)
                return
            results = self._calls_in_group(group)
            conn.execute("COMMIT")
            self.commits += 1
        except (sqlite3.Error, _GroupAborted) as exc:
            self._abort_group(buffer_bytes)
            if isinstance(exc, sqlite3.Error) and not group:
                # The COMMIT itself failed (disk full, I/O error).
                self._write_failed(packets, exc)
                return
            self._commit_packets(packets)
            for c in group:
                self._run_one(c)
            return
        self._committed(written)
        _hand_out(results)

    def _run_started(self, calls: list[_Call]) -> None:
        """_run_calls for calls already marked running (set_running_or_notify_cancel)."""
        if len(calls) == 1:
            self._run_one(calls[0])
        elif calls:
            buffer_bytes = self.buffer_bytes
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                results = self._calls_in_group(calls)
                self.conn.execute("COMMIT")
                self.commits += 1
            except (sqlite3.Error, _GroupAborted):
                self._abort_group(buffer_bytes)
                for c in calls:
                    self._run_one(c)
                return
            _hand_out(results)

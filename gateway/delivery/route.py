"""A webhook's route: its records batched by window, persisted, sent and retried.

Each webhook is a Route with its own task, cursor and in-flight limit, so one failing
receiver never slows another. A batch is persisted (with its webhook-id) before the
first attempt; it leaves the batches table only when the receiver accepted it or it was
dead-lettered, so after a crash every unfinished batch is sent again with the same id.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import itertools
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from typing import Any

from gateway import store as st
from gateway.config import WebhookConfig
from gateway.delivery import formats
from gateway.delivery.conditions import Filter
from gateway.delivery.sender import (
    Outcome,
    Sender,
    classify,
    describe,
    max_delay_s,
    new_webhook_id,
    next_delay,
)
from gateway.delivery.sources import RecordError, Row, Source, ts_ns
from gateway.store import Batch, Reject, Store

log = logging.getLogger("gateway.delivery")

# How often a retry that an earlier run persisted reads the wall clock again while it waits.
RECHECK_CLOCK_S = 1.0


def window_rows(rows: Sequence[Row], end_ns: int) -> list[Row]:
    """The rows of a batching window that ends at end_ns: the longest prefix received before
    it. A prefix, not a filter: once the clock went back, a later row can carry an earlier
    time, and taking it would move the cursor past the rows in between."""
    return list(itertools.takewhile(lambda r: ts_ns(r) < end_ns, rows))


def batch_age_s(created_ns: int, taken_ns: int, taken_mono_ns: int, mono_ns: int) -> float:
    """How long a batch has waited: its wall-clock age when this process took it up (never
    below zero), then monotonic time. The wall clock jumping while the batch is retried
    (NTP setting a board without RTC days forward, or an hour back) neither expires it at
    once nor keeps it young."""
    return (max(0, taken_ns - created_ns) + mono_ns - taken_mono_ns) / 1e9


class Route:
    """One webhook's records (packets, CDRs, events or report notices): window batching,
    persistence, sending, retries."""

    FETCH_LIMIT = 5000
    # Full batches of an open window go together at most every this-th part of the
    # window (see run); the "auto" commit delay is as long. Each take is a commit with
    # bookkeeping pages of its own: fewer takes write fewer disk bytes per packet, for
    # up to a take's interval more latency (docs/performance.md).
    TAKE_PARTS = st.TAKE_PARTS
    # Open batches beyond `concurrency`: at least 8, so that a freed request slot finds
    # one ready, and as many as hold this many records, so that a take of full batches
    # (a fifth of a window: 200 records, 20 batches, at 1,000 records/s with monoZ)
    # fits beside those still in flight; with less room such takes fill it and go at
    # once. Counted in records because each open batch holds its body while it waits
    # for a retry: a receiver outage must not fill memory with 500-record batches.
    SPARE_RECORDS = 320

    def __init__(
        self,
        cfg: WebhookConfig,
        store: Store,
        sender: Sender,
        source: Source,
        wake: asyncio.Event,
        on_result: Callable[[str, Outcome], None] | None = None,
        *,
        reader: st.Reader,
    ) -> None:
        self.cfg = cfg
        self.store = store
        # New records are read through this, not the writer's queue (see store.Reader).
        self.reader = reader
        self.sender = sender
        self.source = source
        self.wake = wake
        self.filter = Filter(cfg.when)
        # Batches created and not yet done (see SPARE_RECORDS).
        spare = max(8, self.SPARE_RECORDS // cfg.batch.max_items)
        self.max_open = max(cfg.concurrency + spare, 16)
        self.open: dict[str, asyncio.Task[None]] = {}
        # Open batches the receiver has accepted, waiting only for their bookkeeping. They
        # hold no request and no body any more, so they leave their room to new batches.
        self.finishing: set[str] = set()
        self.slots = asyncio.Semaphore(cfg.concurrency)
        self.disabled = ""
        self.on_result = on_result
        self._slot_freed = asyncio.Event()
        # The open batching window: when it closes, by the wall clock (its first record's
        # time + window_ms) and by the monotonic clock (window_ms after this process first
        # saw that record: a clock set back must not hold it open for the jump).
        self._window: tuple[int, int] | None = None
        # Records the open window took so far, and those the window before it took.
        self._window_taken = 0
        self._prev_taken = 0
        # When the open window last sent full batches early (monotonic ns).
        self._last_full_ns = 0

    async def _db(self, fn: Callable[..., Any], *args: Any, lazy: bool = False) -> Any:
        """fn(conn, *args) on the writer; `lazy`: in the next packet commit (Store.defer)."""
        submit = self.store.defer if lazy else self.store.call
        return await asyncio.wrap_future(submit(fn, *args))

    async def _db_write(self, fn: Callable[..., Any], *args: Any, lazy: bool = False) -> Any:
        """A batch's bookkeeping, retried while the store cannot write (disk full):
        giving up would send the batch again, and again, for as long as that lasts.

        `lazy`: the write may join the next packet commit (Store.defer), for writes whose
        loss in a crash only sends a batch again.

        Shielded: a clean stop cancels delivery while a write waits for the commit delay,
        and a cancelled call is skipped by the writer. A delivered batch whose completion
        was skipped so went again after the restart."""
        submit = self.store.defer if lazy else self.store.call
        while True:
            try:
                return await asyncio.shield(asyncio.wrap_future(submit(fn, *args)))
            except sqlite3.Error as exc:
                log.error("webhook %s: store error, retrying: %s", self.cfg.name, exc)  # noqa: TRY400
                await asyncio.sleep(1.0)

    # -- filling ----------------------------------------------------------------------

    def _wants(self, row: Row) -> bool:
        return self.filter.empty or self.filter(self.source.getter(row))

    def _counts_as_wanted(self, row: Row) -> bool:
        """_wants for counting an open window's batches: a record whose filter fails is
        dead-lettered by _take, so here it only needs not to raise."""
        try:
            return self._wants(row)
        except Exception:  # _take meets it again and dead-letters it
            return True

    async def run(self) -> None:
        """Keep delivering; a store write that fails (disk full) is retried, not fatal,
        and so is anything unexpected: one webhook's trouble never stops the others."""
        pause = 1.0
        while True:
            try:
                await self._run()
            except sqlite3.Error as exc:
                # Nothing is lost: batches and cursor only move in committed transactions,
                # and batches already being sent stay in `open`.
                log.error("webhook %s: store error, retrying: %s", self.cfg.name, exc)  # noqa: TRY400
                await asyncio.sleep(1.0)
            except Exception:
                # Records that cannot be handled are dead-lettered one by one (_take), so
                # this is a fault of the gateway's own; retried with growing pauses.
                log.exception(
                    "webhook %s: delivery failed unexpectedly; starting it again", self.cfg.name
                )
                await asyncio.sleep(pause)
                pause = min(pause * 2, 60.0)

    async def _run(self) -> None:
        """Resume unfinished batches, then keep turning new records into batches."""
        cursor: int = await self._db(st.ensure_route, self.cfg.name, self.source.name)
        for b in await self._db(st.load_batches, self.cfg.name, list(self.open)):
            self._spawn(b, None)
        window_ns = self.cfg.batch.window_ms * 1_000_000
        last_rescan = time.monotonic()
        # Records fetched but not taken yet (those after `cursor`, oldest first): a window
        # shorter than a fetch would otherwise read the same rows again and again.
        ahead: list[Row] = []
        self._window = None
        while True:
            if self.disabled:
                await asyncio.Event().wait()
            if time.monotonic() - last_rescan > 2.0:
                last_rescan = time.monotonic()
                # Through the reader: a store call would end the writer's commit delay,
                # a commit more every 2 s. A batch leaves `open` only once its completion
                # is committed, so the reader cannot see one that is done as open.
                exclude = list(self.open)
                for b in await self.reader.run(st.load_batches, self.cfg.name, exclude):
                    self._spawn(b, None)  # re-queued by `gateway dlq replay`
            room = self.max_open - len(self.open) + len(self.finishing)
            if room <= 0:
                self._slot_freed.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._slot_freed.wait(), 1.0)
                continue
            limit = min(self.FETCH_LIMIT, room * self.cfg.batch.max_items)
            if len(ahead) < limit:
                after = ahead[-1].id if ahead else cursor
                ahead += await self.reader.run(self.source.fetch, after, limit - len(ahead))
            if not ahead:
                self.wake.clear()
                ahead = await self.reader.run(self.source.fetch, cursor, limit)
                if not ahead:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), 1.0)
                    continue
            rows = ahead[:limit]
            if not window_ns:
                cursor = await self._take(rows, cursor, several=False)
                del ahead[: len(rows)]
                continue
            if self._window is None:
                self._window = (ts_ns(rows[0]) + window_ns, time.monotonic_ns() + window_ns)
                self._window_taken = 0
            end, end_mono = self._window
            taken = window_rows(rows, end)
            wait_ns = min(end - time.time_ns(), end_mono - time.monotonic_ns())
            if wait_ns > 0:
                # Open. Its full batches can go now: whatever else comes, they stay arrays
                # of max_items. The rest waits for the window to close.
                full = self._full_batches(taken)
                if full:
                    # A take is a commit (its webhook-ids are on disk before anything
                    # is sent), and it ends the writer's commit delay. Taken as soon as
                    # the commit before made them, full batches and commits chased each
                    # other: 50 commits a second at 1,000 records/s. So they go at most
                    # every fifth of a window (TAKE_PARTS), unless they fill the room
                    # (behind).
                    pause_ns = self._last_full_ns + window_ns // self.TAKE_PARTS
                    pause_ns -= time.monotonic_ns()
                    if pause_ns > 0 and len(full) < limit:
                        await asyncio.sleep(min(pause_ns, wait_ns) / 1e9)
                        continue
                    self._last_full_ns = time.monotonic_ns()
                    rate = self._rate(window_ns, end_mono, len(taken))
                    lazy = self._lazy_take(len(full), limit, rate)
                    cursor = await self._take(full, cursor, several=True, lazy=lazy)
                    self._window_taken += len(full)
                    del ahead[: len(full)]
                    continue
                wait_ns = min(wait_ns, self._next_look_ns(window_ns, end_mono, len(taken)))
                await asyncio.sleep(wait_ns / 1e9)
                continue
            if taken:
                # Closed. It may hold more than one fetch; every request of it is an array
                # then, and so is the rest of a window that sent full batches early.
                more = len(taken) == len(rows) == limit
                several = more or self._window_taken > 0
                cursor = await self._take(taken, cursor, several=several)
                self._window_taken += len(taken)
                del ahead[: len(taken)]
                if more:
                    continue
            self._prev_taken = self._window_taken
            self._window = None

    def _rate(self, window_ns: int, end_mono: int, seen: int) -> int:
        """Records a window, at the faster of the last window's rate and this one's so far
        (`seen` records not taken yet)."""
        elapsed = time.monotonic_ns() - (end_mono - window_ns)
        rate = self._prev_taken
        if elapsed >= window_ns // 20:
            # The record that opened the window says nothing of the rate.
            rate = max(rate, (self._window_taken + seen - 1) * window_ns // elapsed)
        return rate

    def _lazy_take(self, full: int, limit: int, rate: int) -> bool:
        """Whether `full` records of an open window's full batches can join the writer's
        next packet commit (Store.defer) instead of ending its commit delay: at 1,000
        records/s takes and packet commits otherwise alternate, with bookkeeping pages
        in each. Not when delivery is behind (they fill every free place), nor when, at
        `rate` records a window, more than a take's worth comes during the delay:
        delivery takes nothing else meanwhile, and at 5,000 records/s such waits added
        100 ms to the p99. Nor when fewer packets than a trickle (store.TRICKLE_PACKETS)
        come during the delay: the take would wait out the whole delay for them, up to
        200 ms more for a window that happened to fill a batch at monoZ's 10 records/s."""
        window_ns = self.cfg.batch.window_ms * 1_000_000
        per_delay = rate * self.store.commit_delay_s * 1e9 / window_ns
        return full < limit and st.TRICKLE_PACKETS <= per_delay < limit

    def _next_look_ns(self, window_ns: int, end_mono: int, seen: int) -> int:
        """How soon to look again at an open window that has `seen` records so far and
        no full batch: when, at the faster of the last window's rate and this one's, a
        batch will have filled (every tenth of a window at most); else once, a tenth of
        a window in, to catch a burst (the first of a run, or one after a quiet spell);
        else not before it closes. At a few records a window more looks would be CPU
        spent for nothing."""
        tenth = window_ns // 10
        elapsed = time.monotonic_ns() - (end_mono - window_ns)
        rate = self._rate(window_ns, end_mono, seen)
        n = self.cfg.batch.max_items
        if rate > n:
            return max(tenth, window_ns * n // rate)
        if elapsed < tenth // 2:
            return tenth - elapsed
        return window_ns

    def _full_batches(self, rows: Sequence[Row]) -> Sequence[Row]:
        """The longest prefix of an open window's `rows` whose wanted records fill whole
        batches: those are arrays of max_items whatever else the window gets."""
        n = self.cfg.batch.max_items
        if self.filter.empty:
            wanted, cut = len(rows), len(rows) // n * n
        else:
            cut = wanted = 0
            for i, r in enumerate(rows):
                if self._counts_as_wanted(r):
                    wanted += 1
                    if wanted % n == 0:
                        cut = i + 1
        if wanted < 2 and not self._window_taken:
            return rows[:0]  # alone so far, so maybe an object (max_items = 1)
        return rows[:cut]

    async def _take(
        self, rows: Sequence[Row], cursor: int, several: bool, *, lazy: bool = False
    ) -> int:
        """Turn `rows` into batches (`several`: other records of their window go, or went,
        in other requests, so even a batch of one is an array) and move the cursor.
        `lazy`: in the next packet commit (Store.defer), not at once.

        Each wanted record is encoded here, one by one: a record that cannot be filtered
        or encoded is dead-lettered on its own, in the same commit as the batches of the
        others, and never holds them back."""
        matched: list[Row] = []
        parts: list[tuple[bytes, bool]] = []
        rejects: list[Reject] = []
        for r in rows:
            try:
                if not self._wants(r):
                    continue
            except Exception as exc:  # a filter that fails on this record's fields
                rejects.append(self._reject(r, "unfilterable", exc))
                continue
            try:
                parts.append(self.source.encode(r, self.cfg))
            except Exception as exc:  # the format cannot hold this record
                rejects.append(self._reject(r, "unencodable", exc))
                continue
            matched.append(r)
        new_cursor = rows[-1].id
        if not matched and not rejects:
            await self._db(st.advance_cursor, self.store, self.cfg.name, new_cursor)
            return new_cursor
        single = len(matched) == 1 and not several
        n = self.cfg.batch.max_items
        now, now_mono = time.time_ns(), time.monotonic_ns()
        batches = [
            Batch(
                new_webhook_id(),
                self.cfg.name,
                tuple(r.id for r in matched[i : i + n]),
                single,
                None,
                0,
                now,
                0,
                len(matched[i : i + n]),
            )
            for i in range(0, len(matched), n)
        ]
        seqs = await self._db(
            st.create_batches,
            self.cfg.name,
            self.source.name,
            batches,
            new_cursor,
            len(matched),
            rejects,
            lazy=lazy,
        )
        batches = [dataclasses.replace(b, seq=s) for b, s in zip(batches, seqs, strict=True)]
        for i, b in enumerate(batches):
            self._spawn(b, parts[i * n : (i + 1) * n], now_mono)
        return new_cursor

    def _reject(self, row: Row, reason: str, exc: Exception) -> Reject:
        """A record's own dead letter: why, and what can be shown of it."""
        if isinstance(exc, RecordError):
            reason = exc.reason
        error = f"{exc.__class__.__name__}: {exc}"[:300]
        # One line per distinct cause: the log's repeat filter folds identical lines.
        log.warning(
            "webhook %s: a record was dead-lettered on its own (%s): %s",
            self.cfg.name,
            reason,
            error,
        )
        packet = row if isinstance(row, st.PacketRow) else None
        return Reject(
            new_webhook_id(),
            reason,
            error,
            self.source.fallback(row),
            packet.topic if packet else None,
            packet.iccid if packet else None,
            ts_ns(row),
        )

    # -- sending ----------------------------------------------------------------------

    def _spawn(
        self,
        batch: Batch,
        parts: Sequence[tuple[bytes, bool]] | None,
        created_mono_ns: int | None = None,
    ) -> None:
        """Start delivering a batch: one created here just now, with its records' encoded
        `parts` (`created_mono_ns`, the monotonic time of its `created_ns`), or one loaded
        from the store."""
        task = asyncio.create_task(
            self._deliver(batch, parts, created_mono_ns), name=f"deliver:{batch.id}"
        )
        self.open[batch.id] = task

        def done(t: asyncio.Task[None]) -> None:
            self.open.pop(batch.id, None)
            if batch.id in self.finishing:
                self.finishing.discard(batch.id)  # its room was freed already
            else:
                self._slot_freed.set()
            if not t.cancelled() and t.exception() is not None:
                # Still in the store: the next look for open batches starts it again.
                log.error("webhook %s: sending a batch failed: %r", self.cfg.name, t.exception())

        task.add_done_callback(done)

    async def _body(
        self, batch: Batch, parts: Sequence[tuple[bytes, bool]] | None
    ) -> tuple[bytes, int, int, str]:
        """(body, records, decode failures, error) for a batch; rebuilt identically after a
        restart. `error` is set when a record cannot be encoded any more (the config
        changed meanwhile): the body then holds every record in fallback form."""
        if batch.body is not None:
            return batch.body, max(batch.count, 1), 0, ""
        if parts is None:
            rows = await self.reader.run(self.source.by_ids, list(batch.item_ids))
            try:
                parts = [self.source.encode(r, self.cfg) for r in rows]
            except Exception as exc:  # dead-lettered whole by _deliver, never retried forever
                body = b"[" + b",".join(self.source.fallback(r) for r in rows) + b"]"
                return body, len(rows), 0, f"{exc.__class__.__name__}: {exc}"[:300]
        if not parts:
            return b"", 0, 0, ""
        body = self.source.assemble([p for p, _ in parts], self.cfg, batch.single)
        return body, len(parts), sum(f for _, f in parts), ""

    async def _deliver(
        self,
        batch: Batch,
        parts: Sequence[tuple[bytes, bool]] | None,
        created_mono_ns: int | None = None,
    ) -> None:
        body, records, failed, error = await self._body(batch, parts)
        if error:
            await self._dead_letter(batch, body, records, "unencodable", None, error)
            return
        if not body:
            # Every packet of this batch was evicted by drop_oldest; nothing to send.
            await self._db_write(
                st.complete_batch, self.store, self.cfg.name, self.source.name, batch, 0
            )
            return
        policy = self.cfg.retry
        attempts = batch.attempts
        if created_mono_ns is not None:
            # Created by this process: its age is monotonic from the start, so a jump of
            # the wall clock between creating and sending it does not count.
            taken_ns, taken_mono_ns = batch.created_ns, created_mono_ns
        else:
            taken_ns, taken_mono_ns = time.time_ns(), time.monotonic_ns()
        if batch.next_at_ns:
            await self._wait_for_retry(batch.next_at_ns, batch.retry_delay_ns)
        while True:
            if self.disabled:
                # Disabled by a 410 until the gateway restarts: hold the batch, send nothing.
                await asyncio.Event().wait()
            async with self.slots:
                outcome = await self.sender.post(body, batch.id)
            attempts += 1
            if self.on_result is not None:
                self.on_result(self.cfg.name, outcome)
            if outcome.redirects:
                # Joins the next commit: a count lost in a crash costs nothing else.
                self.store.defer(st.count_redirects, self.cfg.name, outcome.redirects)
            verdict = classify(policy, outcome)
            if verdict == "ok":
                self.finishing.add(batch.id)
                self._slot_freed.set()
                await self._db_write(
                    st.complete_batch,
                    self.store,
                    self.cfg.name,
                    self.source.name,
                    batch,
                    records,
                    failed if attempts == 1 else 0,
                    lazy=True,
                )
                return
            error = describe(outcome)
            if verdict == "gone":
                self.disabled = f"receiver answered 410 Gone at {formats.iso_ms(time.time_ns())}"
                log.error("webhook %s disabled: %s", self.cfg.name, self.disabled)
                await self._db_write(st.set_disabled, self.cfg.name, self.disabled)
            age_s = batch_age_s(batch.created_ns, taken_ns, taken_mono_ns, time.monotonic_ns())
            delay = next_delay(policy, attempts, outcome.retry_after_s)
            reason = ""
            if verdict in ("dead", "gone"):
                reason = "gone" if verdict == "gone" else f"http_{outcome.status}"
            elif policy.max_attempts and attempts >= policy.max_attempts:
                reason = "no_response" if outcome.status is None else "attempts_exhausted"
            elif age_s + delay > policy.max_age_s:
                reason = "expired"
            if reason:
                await self._db_write(
                    st.record_failure, self.cfg.name, batch, attempts, 0, outcome.status, error
                )
                done = dataclasses.replace(batch, attempts=attempts, next_at_ns=0, retry_delay_ns=0)
                await self._dead_letter(
                    done, body, records, reason, outcome.status, outcome.excerpt or error, error
                )
                return
            delay_ns = int(delay * 1e9)
            await self._db_write(
                st.record_failure,
                self.cfg.name,
                batch,
                attempts,
                time.time_ns() + delay_ns,
                outcome.status,
                error,
                delay_ns,
            )
            log.info(
                "webhook %s: attempt %d of batch %s failed (%s); retry in %.1f s",
                self.cfg.name,
                attempts,
                batch.id,
                error,
                delay,
            )
            await asyncio.sleep(delay)

    async def _dead_letter(
        self,
        batch: Batch,
        body: bytes,
        records: int,
        reason: str,
        status: int | None,
        excerpt: str,
        error: str = "",
    ) -> None:
        """Move a batch to the dead letters, with why (`error`, for the log line)."""
        log.warning(
            "webhook %s: batch %s (%d records) dead-lettered: %s (%s)",
            self.cfg.name,
            batch.id,
            records,
            reason,
            error or excerpt,
        )
        done = dataclasses.replace(batch, count=records)
        await self._db_write(
            st.dead_letter,
            self.store,
            self.cfg.name,
            self.source.name,
            done,
            body,
            records,
            reason,
            status,
            excerpt,
        )

    async def _wait_for_retry(self, next_at_ns: int, delay_ns: int) -> None:
        """Wait until a retry that an earlier run persisted (as wall-clock time) is due.

        The clock may have been set back since: wait no longer than the delay that was
        chosen (`delay_ns`; for rows of older versions, the policy's longest delay), and
        read the clock again every RECHECK_CLOCK_S, so that a clock set right meanwhile
        (NTP on a board without RTC) ends the wait."""
        cap_s = delay_ns / 1e9 if delay_ns > 0 else max_delay_s(self.cfg.retry)
        latest = time.monotonic() + cap_s
        while True:
            left = min((next_at_ns - time.time_ns()) / 1e9, latest - time.monotonic())
            if left <= 0:
                return
            await asyncio.sleep(min(left, RECHECK_CLOCK_S))

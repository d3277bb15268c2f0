"""Webhook delivery: batches from the store, POSTed with auth, signing and retries.

Each webhook is a Route with its own task, cursor and in-flight limit, so one failing
receiver never slows another. A batch is persisted (with its webhook-id) before the
first attempt; it leaves the batches table only when the receiver accepted it or it was
dead-lettered, so after a crash every unfinished batch is sent again with the same id.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import email.utils
import gzip
import itertools
import logging
import random
import secrets
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import aiohttp

from gateway import __version__, formats, signing, sources
from gateway import store as st
from gateway.config import RetryPolicy, WebhookConfig
from gateway.routes import Filter
from gateway.sources import RecordError, Row, Source, ts_ns
from gateway.store import Batch, Reject, Store

log = logging.getLogger("gateway.delivery")

EXCERPT_BYTES = 200
MAX_RESPONSE_READ = 64 * 1024
MAX_RETRY_AFTER_S = 24 * 3600.0
# How often a retry that an earlier run persisted reads the wall clock again while it waits.
RECHECK_CLOCK_S = 1.0


def new_webhook_id() -> str:
    """msg_ + 26 random base32 characters, as Standard Webhooks ids look."""
    return "msg_" + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one POST came to."""

    status: int | None  # None: no response (timeout, connection error)
    error: str  # "" on success
    excerpt: str = ""
    retry_after_s: float | None = None
    latency_s: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date; None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²" or other Unicode digits
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER_S)


def next_delay(policy: RetryPolicy, attempts: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff; a Retry-After, when honoured, is a lower bound."""
    cap = min(policy.backoff_max_s, policy.backoff_min_s * (2 ** min(attempts - 1, 30)))
    delay = random.uniform(0, cap) if cap > 0 else 0.0
    if retry_after is not None and policy.honour_retry_after:
        delay = max(delay, retry_after)
    return delay


def window_rows(rows: Sequence[Row], end_ns: int) -> list[Row]:
    """The rows of a batching window that ends at end_ns: the longest prefix received before
    it. A prefix, not a filter: once the clock went back, a later row can carry an earlier
    time, and taking it would move the cursor past the rows in between."""
    return list(itertools.takewhile(lambda r: ts_ns(r) < end_ns, rows))


def max_delay_s(policy: RetryPolicy) -> float:
    """The longest wait between two attempts that next_delay can ask for under `policy`."""
    return max(policy.backoff_max_s, MAX_RETRY_AFTER_S if policy.honour_retry_after else 0.0)


def batch_age_s(created_ns: int, taken_ns: int, taken_mono_ns: int, mono_ns: int) -> float:
    """How long a batch has waited: its wall-clock age when this process took it up (never
    below zero), then monotonic time. The wall clock jumping while the batch is retried
    (NTP setting a board without RTC days forward, or an hour back) neither expires it at
    once nor keeps it young."""
    return (max(0, taken_ns - created_ns) + mono_ns - taken_mono_ns) / 1e9


def classify(policy: RetryPolicy, outcome: Outcome) -> str:
    """'ok', 'retry', 'dead' or 'gone' for an outcome under a retry policy."""
    if outcome.ok:
        return "ok"
    if outcome.status == 410:
        return "gone"
    if outcome.status is None:
        return "retry"
    if outcome.status in policy.retry_on_status or (
        policy.retry_any_5xx and 500 <= outcome.status < 600
    ):
        return "retry"
    return "dead"


class Sender:
    """Turns a body into a signed, authenticated POST to one webhook."""

    def __init__(self, cfg: WebhookConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.ssl: ssl.SSLContext | bool = True
        if cfg.ca_file:
            self.ssl = ssl.create_default_context(cafile=cfg.ca_file)
        self.timeout = aiohttp.ClientTimeout(total=cfg.retry.timeout_s)
        self.base_headers = self._base_headers()

    def _base_headers(self) -> dict[str, str]:
        h = {"Content-Type": formats.CONTENT_TYPE, "User-Agent": f"edge-gateway/{__version__}"}
        a = self.cfg.auth
        if a.type == "basic":
            token = base64.b64encode(f"{a.username}:{a.password}".encode()).decode()
            h["Authorization"] = f"Basic {token}"
        elif a.type == "bearer":
            h["Authorization"] = f"Bearer {a.token}"
        elif a.type == "api_key":
            h[a.header] = a.key
        if self.cfg.gzip:
            h["Content-Encoding"] = "gzip"
        h.update(dict(self.cfg.headers))
        return h

    def headers(self, body: bytes, webhook_id: str) -> dict[str, str]:
        """All request headers for `body`, including signatures and the webhook-id."""
        h = dict(self.base_headers)
        h["webhook-id"] = webhook_id
        s = self.cfg.signing
        if s.scheme == "cdr-manager":
            h["X-CDR-Signature"] = signing.cdr_manager(s.secret, body)
        elif s.scheme == "standard-webhooks":
            ts = int(time.time())
            h["webhook-timestamp"] = str(ts)
            h["webhook-signature"] = signing.standard_webhooks(s.secret, webhook_id, ts, body)
        return h

    async def post(self, body: bytes, webhook_id: str) -> Outcome:
        """One attempt; never raises for network or HTTP errors."""
        headers = self.headers(body, webhook_id)
        data = gzip.compress(body, compresslevel=5) if self.cfg.gzip else body
        began = time.monotonic()
        try:
            async with self.session.post(
                self.cfg.url,
                data=data,
                headers=headers,
                ssl=self.ssl,
                timeout=self.timeout,
                allow_redirects=False,
            ) as resp:
                raw = await resp.content.read(MAX_RESPONSE_READ)
                excerpt = raw[:EXCERPT_BYTES].decode("utf-8", "replace")
                latency = time.monotonic() - began
                if 200 <= resp.status < 300:
                    return Outcome(resp.status, "", excerpt, latency_s=latency)
                return Outcome(
                    resp.status,
                    f"HTTP {resp.status}",
                    excerpt,
                    parse_retry_after(resp.headers.get("Retry-After")),
                    latency,
                )
        except TimeoutError:
            return Outcome(
                None,
                f"no response within {self.cfg.retry.timeout_s:g} s",
                latency_s=time.monotonic() - began,
            )
        except aiohttp.ClientError as exc:
            return Outcome(
                None, f"{exc.__class__.__name__}: {exc}"[:300], latency_s=time.monotonic() - began
            )
        except (OSError, ValueError) as exc:
            return Outcome(
                None, f"{exc.__class__.__name__}: {exc}"[:300], latency_s=time.monotonic() - began
            )


class Route:
    """One webhook's records (packets, CDRs, events or report notices): window batching,
    persistence, sending, retries."""

    FETCH_LIMIT = 5000
    # Full batches of an open window go together at most every this-th part of the
    # window (see run); the "auto" commit delay is as long. A tenth until session 17: at
    # 1,000 records/s a fifth halves the takes, and so the commits, each with its
    # bookkeeping pages (a fifth fewer disk bytes per packet), for about 200 ms more
    # latency at monoZ's 1 s window.
    TAKE_PARTS = st.TAKE_PARTS
    # Open batches beyond `concurrency`: at least 8, so that a freed request slot finds
    # one ready, and as many as hold this many records, so that a take of full batches
    # (a fifth of a window: 200 records, 20 batches, at 1,000 records/s with monoZ)
    # fits beside those still in flight. With 8 (until session 17) such takes filled
    # the room half of the time at monoZ's 10 records a batch, and so went at once.
    # Counted in records because each open batch holds its body while it waits for a
    # retry: a receiver outage must not fill memory with 500-record batches.
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
            reason = "unencodable"
            log.warning(
                "webhook %s: a batch was dead-lettered (%s): %s", self.cfg.name, reason, error
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
                None,
                error,
            )
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
            error = _describe(outcome)
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
                log.warning(
                    "webhook %s: batch %s (%d records) dead-lettered: %s (%s)",
                    self.cfg.name,
                    batch.id,
                    records,
                    reason,
                    error,
                )
                done = dataclasses.replace(
                    batch, attempts=attempts, next_at_ns=0, count=records, retry_delay_ns=0
                )
                await self._db_write(
                    st.dead_letter,
                    self.store,
                    self.cfg.name,
                    self.source.name,
                    done,
                    body,
                    records,
                    reason,
                    outcome.status,
                    outcome.excerpt or error,
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


def _describe(o: Outcome) -> str:
    if o.status is None:
        return o.error
    text = o.excerpt.strip().replace("\n", " ")
    return f"HTTP {o.status}: {text}" if text else f"HTTP {o.status}"


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    """One keep-alive session for every webhook."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=True) as session:
        yield session


async def run(
    webhooks: Sequence[WebhookConfig],
    store: Store,
    session: aiohttp.ClientSession,
    payload_encoding: str,
    wake: asyncio.Event,
    on_result: Callable[[str, Outcome], None] | None = None,
) -> None:
    """Deliver records to every webhook until cancelled."""
    reader = st.Reader(store.path)
    routes = [
        Route(
            w,
            store,
            Sender(w, session),
            sources.for_webhook(w, payload_encoding),
            wake,
            on_result,
            reader=reader,
        )
        for w in webhooks
    ]
    store.set_packet_routes(r.cfg.name for r in routes if r.cfg.source == "packets")
    orphans = await asyncio.wrap_future(store.call(st.orphan_batches, [r.cfg.name for r in routes]))
    for name, batches, records in orphans:
        log.warning(
            "webhook %s is no longer configured: its %d unsent batch(es) of %d record(s) stay"
            " in the store and are sent if it comes back (packets it alone still needed may"
            " be released meanwhile)",
            name,
            batches,
            records,
        )
    if not routes:
        await asyncio.Event().wait()
    try:
        async with asyncio.TaskGroup() as tg:
            for r in routes:
                tg.create_task(r.run(), name=f"route:{r.cfg.name}")
    finally:
        for r in routes:
            for t in list(r.open.values()):
                t.cancel()
            if r.open:
                await asyncio.gather(*r.open.values(), return_exceptions=True)
        reader.close()

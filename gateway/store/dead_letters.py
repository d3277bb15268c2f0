"""Dead letters: what could not be delivered, kept for `gateway dlq` to list, replay,
re-queue or purge.

Dead letters are bounded (gateway.dead_letter_max_mb and dead_letter_max_age) and count
toward gateway.max_buffer_mb (see DEAD_BYTES); the writer evicts the oldest past either
limit (DeadLetters._tend_dead_letters).
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Sequence
from typing import Any

from gateway.config.secrets import mask_urls
from gateway.errors import StoreError
from gateway.store.counting import COUNTED, DEAD_BYTES, _bump, _mark, _set_mark, count_received
from gateway.store.db import transaction
from gateway.store.packets import next_packet_row, sender_id
from gateway.store.records import Replay

log = logging.getLogger("gateway.store")

# What a dead letter counts for: its body, excerpt and topic, and about as much again
# for its other columns and its share of a page.
DEAD_LETTER_BYTES = (
    "(COALESCE(length({0}.body), 0) + COALESCE(length(CAST({0}.excerpt AS BLOB)), 0)"
    " + COALESCE(length(CAST({0}.topic AS BLOB)), 0) + 64)"
)
# An oversize packet's dead letter keeps this much of its payload (with its size and
# SHA-256): enough to see what sent it, while a flood of huge packets stays small.
DEAD_LETTER_PREFIX_BYTES = 1024
# The writer looks at the dead letters' limits this often, not in the packet commits.
DEAD_LETTER_TEND_S = 2.0
# At most this many dead letters are evicted per transaction; more wait for the writer's
# next turn, so that packets commit in between.
DEAD_LETTER_EVICT_ROWS = 1000


def list_dead_letters(
    conn: sqlite3.Connection, webhook: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Dead letters, newest first, without their bodies; URLs in their excerpts masked."""
    # A store `gateway dlq list` reads before the gateway migrated it has no size or hash.
    cols = {r[1] for r in conn.execute("PRAGMA table_info(dead_letters)")}
    extra = "size, sha256" if "sha256" in cols else "NULL, NULL"
    sql = (
        "SELECT id, webhook, source, webhook_id, count, reason, status, excerpt, attempts,"
        f" created_ns, topic, iccid, length(body), {extra} FROM dead_letters"
    )
    args: list[Any] = []
    if webhook is not None:
        sql += " WHERE webhook = ?"
        args.append(webhook)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    keys = (
        "id",
        "webhook",
        "source",
        "webhook_id",
        "records",
        "reason",
        "status",
        "excerpt",
        "attempts",
        "created_ns",
        "topic",
        "iccid",
        "bytes",
        "size",  # an oversize packet's payload size; `bytes` of it are kept
        "sha256",  # of an oversize packet's whole payload
    )
    rows = [dict(zip(keys, r, strict=True)) for r in conn.execute(sql, args)]
    for row in rows:
        # An error's text may quote the webhook's URL, with its token in the query.
        if row["excerpt"]:
            row["excerpt"] = mask_urls(str(row["excerpt"]))
    return rows


def replay_dead_letters(
    conn: sqlite3.Connection, webhook: str | None = None, ids: Sequence[int] = ()
) -> int:
    """requeue_dead_letters; returns how many were re-queued."""
    return requeue_dead_letters(conn, webhook, ids).requeued


def requeue_dead_letters(
    conn: sqlite3.Connection, webhook: str | None = None, ids: Sequence[int] = ()
) -> Replay:
    """Re-queue dead letters: webhook ones as batches (same body and webhook-id), rejected
    packets (too_large) back into the packets table when their letter holds the whole
    payload. One holding a prefix only cannot be delivered as it came: it is skipped and
    stays (`gateway dlq purge` removes it)."""
    sql = (
        "SELECT id, webhook, source, webhook_id, body, count, single, topic, iccid, recv_ns,"
        " size IS NOT NULL AND size != COALESCE(length(body), 0)"
        " FROM dead_letters WHERE 1=1"
    )
    args: list[Any] = []
    if webhook is not None:
        sql += " AND webhook = ?"
        args.append(webhook)
    if ids:
        sql += f" AND id IN ({','.join('?' * len(ids))})"
        args.extend(ids)
    now = time.time_ns()
    n = 0
    skipped: list[int] = []
    with transaction(conn):
        # A dead letter's batch is no longer in `batches`; this only guards against a
        # second row with its webhook-id, without a look through the table per letter.
        queued = {r[0] for r in conn.execute("SELECT id FROM batches")}
        # Replayed packets get ids like received ones, but do not count as received:
        # the mark moves past them.
        count_received(conn)
        pid, table = next_packet_row(conn)
        rows = conn.execute(sql, args).fetchall()
        for dl_id, hook, source, wid, body, count, single, topic, iccid, recv_ns, part in rows:
            if part:
                skipped.append(dl_id)
                continue
            if hook:
                if wid in queued:
                    conn.execute("DELETE FROM batches WHERE id = ?", (wid,))
                conn.execute(
                    "INSERT INTO batches(id, route, source, item_ids, first_id, count,"
                    " single, body, attempts, created_ns, next_at_ns)"
                    " VALUES (?,?,?,'[]',NULL,?,?,?,0,?,0)",
                    (wid, hook, source, count, single, body, now),
                )
                queued.add(wid)
                conn.execute(
                    "UPDATE webhook_stats SET dead = MAX(dead - ?, 0) WHERE name = ?", (count, hook)
                )
            else:
                conn.execute(
                    f"INSERT INTO {table}(id, recv_ns, sender, payload, size) VALUES (?,?,?,?,?)",
                    (
                        pid,
                        recv_ns or now,
                        sender_id(conn, topic or "", iccid or ""),
                        body,
                        len(body or b""),
                    ),
                )
                _set_mark(conn, COUNTED, pid)
                pid += 1
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (dl_id,))
            n += 1
    return Replay(n, tuple(skipped))


def dead_letter_bytes(conn: sqlite3.Connection) -> int:
    """The bytes the dead letters hold, as counted toward gateway.max_buffer_mb (see
    DEAD_BYTES); 0 for a store older than schema 11."""
    return _mark(conn, DEAD_BYTES)


def dead_letter_counts(conn: sqlite3.Connection) -> dict[str, int]:
    """How many dead letters each webhook has (letters of no webhook left out)."""
    return {
        str(name): int(n)
        for name, n in conn.execute(
            "SELECT webhook, COUNT(*) FROM dead_letters WHERE webhook != '' GROUP BY webhook"
        )
    }


def evict_dead_letters(
    conn: sqlite3.Connection, max_bytes: int, before_ns: int, limit: int
) -> tuple[int, int]:
    """Delete the oldest dead letters (by id) while they hold more than max_bytes or were
    made before before_ns, at most `limit` of them, and count them in
    dead_letters_evicted (inside the caller's transaction); returns (letters, bytes).

    Oldest by id: a letter made after the clock was set back stops the age eviction
    until it is old enough too, rather than letters being looked for across the table."""
    excess = dead_letter_bytes(conn) - max_bytes
    rows = conn.execute(
        f"SELECT id, created_ns, {DEAD_LETTER_BYTES.format('dead_letters')} FROM dead_letters"
        " ORDER BY id LIMIT ?",
        (limit,),
    )
    last = n = freed = 0
    for rid, created_ns, size in rows:
        if freed >= excess and created_ns >= before_ns:
            break
        last, n, freed = rid, n + 1, freed + size
    if n:
        conn.execute("DELETE FROM dead_letters WHERE id <= ?", (last,))
        _bump(conn, "dead_letters_evicted", n)
    return n, freed


def purge_dead_letters(
    conn: sqlite3.Connection,
    webhook: str | None = None,
    before_ns: int = 0,
    ids: Sequence[int] = (),
    *,
    everything: bool = False,
) -> int:
    """Delete the dead letters of a webhook ('' for oversize packets), made before
    before_ns, with the given ids (all the filters given at once); every one only with
    `everything`, so that a filter left out by mistake deletes nothing. Returns how many."""
    where: list[str] = []
    args: list[Any] = []
    if webhook is not None:
        where.append("webhook = ?")
        args.append(webhook)
    if before_ns:
        where.append("created_ns < ?")
        args.append(before_ns)
    if ids:
        where.append(f"id IN ({','.join('?' * len(ids))})")
        args.extend(ids)
    if not where and not everything:
        raise StoreError("no dead letters chosen to purge (a webhook, an age or ids)")
    with transaction(conn):
        cur = conn.execute(
            "DELETE FROM dead_letters" + (" WHERE " + " AND ".join(where) if where else ""),
            args,
        )
    return int(cur.rowcount)


class DeadLetters:
    """The Store's part that keeps the dead letters within their limits."""

    conn: sqlite3.Connection
    commits: int
    # The bytes the dead letters hold, as last read (see DEAD_BYTES).
    dead_letter_bytes: int
    dead_letter_max_bytes: int
    dead_letter_max_age_s: float
    # When the writer looks at the limits next (time.monotonic()).
    _tend_at: float

    def _tend_dead_letters(self) -> None:
        """Evict the oldest dead letters past dead_letter_max_bytes or older than
        dead_letter_max_age_s, at most DEAD_LETTER_EVICT_ROWS now and more on the writer's
        next turn; and take up the bytes they hold (`gateway dlq` may have changed them)."""
        now = time.monotonic()
        self._tend_at = now + DEAD_LETTER_TEND_S
        conn = self.conn
        cutoff = 0
        if self.dead_letter_max_age_s:
            cutoff = time.time_ns() - int(self.dead_letter_max_age_s * 1e9)
        try:
            self.dead_letter_bytes = dead_letter_bytes(conn)
            if self.dead_letter_bytes <= self.dead_letter_max_bytes:
                oldest = conn.execute(
                    "SELECT created_ns FROM dead_letters ORDER BY id LIMIT 1"
                ).fetchone()
                if oldest is None or oldest[0] >= cutoff:
                    return
            with transaction(conn):
                n, freed = evict_dead_letters(
                    conn, self.dead_letter_max_bytes, cutoff, DEAD_LETTER_EVICT_ROWS
                )
            self.dead_letter_bytes = dead_letter_bytes(conn)
        except sqlite3.Error as exc:
            log.warning("could not evict old dead letters: %s", exc)
            return
        if n:
            self.commits += 1
            log.warning(
                "evicted the %d oldest dead letters (%d bytes): past gateway.dead_letter_max_mb"
                " or gateway.dead_letter_max_age",
                n,
                freed,
            )
        if n == DEAD_LETTER_EVICT_ROWS:
            self._tend_at = now

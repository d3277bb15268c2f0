"""Delivery's bookkeeping: routes (a webhook's source and cursor), batches from their
creation to their end (delivered, failed for now, or dead-lettered), and webhook_stats.

Each function runs on the writer thread (Store.call or Store.defer); those that free
packets take the store (its Buffer part) to release them.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Sequence

from gateway.store.buffer import Buffer
from gateway.store.counting import _bump
from gateway.store.db import dumps, transaction
from gateway.store.events import add_event
from gateway.store.records import REJECT_REASONS, Batch, Reject, batch_item_ids

# The columns of a new webhook_stats row, and the zeros it starts with (all but name).
_STATS_COLUMNS = "name, hits, requests_ok, requests_failed, retried, delivered, dead, disabled"
_ZEROS = "0, 0, 0, 0, 0, 0, 0"


def ensure_stats(conn: sqlite3.Connection, name: str) -> None:
    """A zeroed webhook_stats row for a webhook (inside the caller's transaction)."""
    conn.execute(
        f"INSERT OR IGNORE INTO webhook_stats({_STATS_COLUMNS}) VALUES (?, {_ZEROS})", (name,)
    )


def ensure_route(conn: sqlite3.Connection, name: str, source: str) -> int:
    """The route's cursor (last record id it has taken), creating the route at 0. A
    webhook keeps the source it was first seen with, as its cursor counts in it."""
    with transaction(conn):
        ensure_stats(conn, name)
        conn.execute(
            "UPDATE webhook_stats SET disabled = 0, disabled_reason = '',"
            " source = COALESCE(source, ?) WHERE name = ?",
            (source, name),
        )
    return int(conn.execute("SELECT cursor FROM routes WHERE name = ?", (name,)).fetchone()[0])


def set_cursor(conn: sqlite3.Connection, route: str, cursor: int) -> None:
    """Move a route's cursor (inside the caller's transaction)."""
    conn.execute("UPDATE webhook_stats SET cursor = ? WHERE name = ?", (cursor, route))


def create_batches(
    conn: sqlite3.Connection,
    route: str,
    source: str,
    batches: Sequence[Batch],
    cursor: int,
    hits: int,
    rejects: Sequence[Reject] = (),
) -> list[int]:
    """Persist new batches and the dead letters of `rejects`, and advance the route's
    cursor past what they cover; returns each batch's row (Batch.seq)."""
    now = time.time_ns()
    seqs = []
    with transaction(conn):
        if rejects:
            _insert_rejects(conn, route, source, rejects, now)
        for b in batches:
            cur = conn.execute(
                "INSERT INTO batches(id, route, source, item_ids, first_id, count, single,"
                " body, attempts, created_ns, next_at_ns) VALUES (?,?,?,?,?,?,?,NULL,0,?,0)",
                (
                    b.id,
                    route,
                    source,
                    None if _consecutive(b.item_ids) else dumps(list(b.item_ids)),
                    b.item_ids[0],
                    len(b.item_ids),
                    int(b.single),
                    b.created_ns,
                ),
            )
            seqs.append(int(cur.lastrowid or 0))
        if hits:
            conn.execute(
                "UPDATE webhook_stats SET cursor = ?, hits = hits + ?, last_hit_ns = ?"
                " WHERE name = ?",
                (cursor, hits, now, route),
            )
        else:
            set_cursor(conn, route, cursor)
    return seqs


def _insert_rejects(
    conn: sqlite3.Connection, route: str, source: str, rejects: Sequence[Reject], now: int
) -> None:
    for r in rejects:
        conn.execute(
            "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, single, reason,"
            " status, excerpt, attempts, created_ns, topic, iccid, recv_ns)"
            " VALUES (?,?,?,?,1,1,?,NULL,?,0,?,?,?,?)",
            (
                route,
                source,
                r.webhook_id,
                r.body,
                r.reason,
                r.error[:300],
                now,
                r.topic,
                r.iccid,
                r.recv_ns,
            ),
        )
        _bump(conn, f"rejected_{r.reason}", 1)
    conn.execute("UPDATE webhook_stats SET dead = dead + ? WHERE name = ?", (len(rejects), route))
    if source == "packets":
        _bump(conn, "packets_dead", len(rejects))


# A batch's row: by its row number (the table has no index on webhook-id), checked
# against its webhook-id. Every Batch the gateway handles was stored or loaded with it.
_THIS_BATCH = "seq = ? AND id = ?"


def advance_cursor(conn: sqlite3.Connection, store: Buffer, route: str, cursor: int) -> None:
    """Move the cursor past records the route's filter did not want."""
    with transaction(conn):
        set_cursor(conn, route, cursor)
        store.release_packets(conn)


def orphan_batches(
    conn: sqlite3.Connection, configured: Sequence[str]
) -> list[tuple[str, int, int]]:
    """(route, batches, records) of open batches whose webhook is not configured now."""
    rows = conn.execute(
        "SELECT route, COUNT(*), COALESCE(SUM(count), 0) FROM batches GROUP BY route"
    ).fetchall()
    return [(r[0], int(r[1]), int(r[2])) for r in rows if r[0] not in set(configured)]


def _consecutive(ids: Sequence[int]) -> bool:
    return bool(ids) and ids[-1] - ids[0] == len(ids) - 1


def load_batches(conn: sqlite3.Connection, route: str, exclude: Sequence[str] = ()) -> list[Batch]:
    """Open batches of a route (after a restart, or re-queued by `dlq replay`)."""
    skip = set(exclude)
    out = []
    # Bodies (a pushed report's can be megabytes) are read only for the batches wanted:
    # delivery looks for re-queued batches every few seconds, excluding those it sends.
    for r in conn.execute(
        "SELECT id, route, item_ids, single, body IS NOT NULL, attempts, created_ns,"
        " next_at_ns, count, retry_delay_ns, seq, first_id FROM batches WHERE route = ?"
        " ORDER BY seq",
        (route,),
    ).fetchall():
        if r[0] in skip:
            continue
        body = None
        if r[4]:
            got = conn.execute("SELECT body FROM batches WHERE seq = ?", (r[10],)).fetchone()
            if got is None:
                continue  # done meanwhile
            body = got[0]
        ids = batch_item_ids(r[2], r[11], r[8])
        out.append(Batch(r[0], r[1], ids, bool(r[3]), body, r[5], r[6], r[7], r[8], r[9], r[10]))
    return out


def complete_batch(
    conn: sqlite3.Connection,
    store: Buffer,
    route: str,
    source: str,
    batch: Batch,
    records: int,
    decode_failed: int = 0,
) -> None:
    """The receiver accepted a batch: forget it, count it, release finished packets."""
    now = time.time_ns()
    with transaction(conn):
        conn.execute(f"DELETE FROM batches WHERE {_THIS_BATCH}", (batch.seq, batch.id))
        conn.execute(
            "UPDATE webhook_stats SET requests_ok = requests_ok + 1, delivered = delivered + ?,"
            " last_success_ns = ? WHERE name = ?",
            (records, now, route),
        )
        if source == "packets":
            _bump(conn, "packets_delivered", records)
        _bump(conn, "decode_failed", decode_failed)
        store.release_packets(conn)


def record_failure(
    conn: sqlite3.Connection,
    route: str,
    batch: Batch,
    attempts: int,
    next_at_ns: int,
    status: int | None,
    error: str,
    retry_delay_ns: int = 0,
) -> None:
    """One failed attempt: persist the attempt count and when (and after what delay) to
    try again."""
    now = time.time_ns()
    with transaction(conn):
        conn.execute(
            "UPDATE batches SET attempts = ?, next_at_ns = ?, retry_delay_ns = ?"
            f" WHERE {_THIS_BATCH}",
            (attempts, next_at_ns, retry_delay_ns, batch.seq, batch.id),
        )
        conn.execute(
            "UPDATE webhook_stats SET requests_failed = requests_failed + 1,"
            " retried = retried + ?, last_error_ns = ?, last_error_status = ?, last_error = ?"
            " WHERE name = ?",
            (1 if next_at_ns else 0, now, status, error[:300], route),
        )


def dead_letter(
    conn: sqlite3.Connection,
    store: Buffer,
    route: str,
    source: str,
    batch: Batch,
    body: bytes,
    records: int,
    reason: str,
    status: int | None,
    excerpt: str,
) -> None:
    """Move a batch that cannot be delivered to the dead-letter table, body and all."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, single, reason,"
            " status, excerpt, attempts, created_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                route,
                source,
                batch.id,
                body,
                records,
                int(batch.single),
                reason,
                status,
                excerpt[:300],
                batch.attempts,
                time.time_ns(),
            ),
        )
        conn.execute(f"DELETE FROM batches WHERE {_THIS_BATCH}", (batch.seq, batch.id))
        conn.execute("UPDATE webhook_stats SET dead = dead + ? WHERE name = ?", (records, route))
        if source == "packets":
            _bump(conn, "packets_dead", records)
        if reason in REJECT_REASONS:
            _bump(conn, f"rejected_{reason}", records)
        store.release_packets(conn)


def count_redirects(conn: sqlite3.Connection, route: str, hops: int) -> None:
    """Count redirects (307, 308) followed on the way to a webhook's answers."""
    conn.execute("UPDATE webhook_stats SET redirects = redirects + ? WHERE name = ?", (hops, route))


def set_disabled(conn: sqlite3.Connection, route: str, reason: str) -> None:
    """Mark a webhook disabled (410 Gone) until the gateway restarts, and say so."""
    with transaction(conn):
        conn.execute(
            "UPDATE webhook_stats SET disabled = 1, disabled_reason = ? WHERE name = ?",
            (reason, route),
        )
    add_event(conn, "webhook_disabled", {"webhook": route, "reason": reason})

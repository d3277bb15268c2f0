"""CDRs looked up one by one or by time and SIM, each with its delivery state per CDR
webhook (the local API's /api/cdrs).

The store keeps no per-record delivery log; the state is read from delivery's own
bookkeeping. For each webhook with `source = "cdrs"`:

- `pending`: the route has not taken the CDR yet (beyond its cursor), or the CDR is in a
  batch not yet accepted (retrying, or re-queued from the dead letters);
- `dead_lettered`: a dead letter of that webhook holds the CDR (its UniqueID);
- `filtered`: the webhook's `when` does not select the CDR (as configured now);
- `delivered`: taken by the route, in no open batch and no dead letter.
"""

from __future__ import annotations

import datetime as dt
import re
import sqlite3
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway.config import WebhookConfig
from gateway.delivery import formats
from gateway.delivery.conditions import Filter, lookup
from gateway.store.records import batch_item_ids

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000
# UniqueIDs as the gateway makes them; a dead letter's body is searched for these.
_UNIQUE_ID = re.compile(rb"CDR-[A-Za-z0-9]{20}")
_ICCID = re.compile(r"[0-9A-Fa-f]{1,22}")
_MAX_ID = 2**63 - 1


class BadQuery(ValueError):
    """A query parameter the API answers 400 for; the message names it."""


@dataclass(frozen=True, slots=True)
class Query:
    since_ms: int = 0
    iccid: str = ""
    after: int = 0
    limit: int = DEFAULT_LIMIT


def _since_ms(text: str) -> int:
    """Epoch milliseconds, or an ISO 8601 date or date-time (UTC unless it says)."""
    if text.isascii() and text.isdigit() and len(text) <= 15:
        return int(text)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise BadQuery(
            "since: must be epoch milliseconds or an ISO 8601 date or date-time"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return max(0, int(when.timestamp() * 1000))


def _bounded_int(name: str, text: str, lo: int, hi: int) -> int:
    if not (text.isascii() and text.isdigit() and len(text) <= 19 and lo <= int(text) <= hi):
        raise BadQuery(f"{name}: must be an integer {lo}-{hi}")
    return int(text)


def parse_query(q: Mapping[str, str]) -> Query:
    """The list query (since, iccid, after, limit); raises BadQuery."""
    unknown = sorted(set(q) - {"since", "iccid", "after", "limit"})
    if unknown:
        raise BadQuery(f"{unknown[0]}: unknown parameter (since, iccid, after, limit)")
    since = _since_ms(q["since"]) if q.get("since") else 0
    # Surrounding white space (a pasted ICCID's line end) is no part of it.
    iccid = q.get("iccid", "").strip()
    if iccid and not _ICCID.fullmatch(iccid):
        raise BadQuery("iccid: must be up to 22 digits (an ICCID)")
    after = _bounded_int("after", q["after"], 0, _MAX_ID) if "after" in q else 0
    limit = _bounded_int("limit", q["limit"], 1, MAX_LIMIT) if "limit" in q else DEFAULT_LIMIT
    return Query(since, iccid, after, limit)


_COLS = "SELECT id, unique_id, ts_ms, iccid, usage, data FROM cdrs"


def find(
    conn: sqlite3.Connection, hooks: Sequence[WebhookConfig], unique_id: str
) -> dict[str, Any] | None:
    """One CDR by its UniqueID with its delivery state, or None."""
    if len(unique_id) > 64:
        return None
    rows = conn.execute(f"{_COLS} WHERE unique_id = ?", (unique_id,)).fetchall()
    if not rows:
        return None
    return _with_delivery(conn, hooks, rows)[0]


def search(
    conn: sqlite3.Connection, hooks: Sequence[WebhookConfig], q: Query
) -> tuple[list[dict[str, Any]], int | None]:
    """A page of CDRs (oldest first) and the `after` of the next page (None: last page)."""
    sql = f"{_COLS} WHERE id > ? AND ts_ms >= ?"
    args: list[Any] = [q.after, q.since_ms]
    if q.iccid:
        sql += " AND iccid = ?"
        args.append(q.iccid)
    rows = conn.execute(sql + " ORDER BY id LIMIT ?", (*args, q.limit + 1)).fetchall()
    more = len(rows) > q.limit
    rows = rows[: q.limit]
    items = _with_delivery(conn, hooks, rows) if rows else []
    return items, int(rows[-1][0]) if more else None


def _record(text: Any) -> dict[str, Any] | None:
    try:
        rec = orjson.loads(text)
    except (orjson.JSONDecodeError, TypeError):
        return None
    return rec if isinstance(rec, dict) else None


@dataclass(slots=True)
class _Route:
    """What one webhook's bookkeeping says about the CDRs of a page."""

    cursor: int | None
    open_ids: dict[int, tuple[str, int]]  # CDR id -> (batch webhook-id, attempts)
    open_uids: dict[bytes, tuple[str, int]]  # UniqueID in a re-queued body -> same
    dead: dict[bytes, tuple[int, str]]  # UniqueID -> (dead letter id, reason)


def _route(conn: sqlite3.Connection, name: str) -> _Route:
    """The cursor, open batches and dead letters of webhook `name`. All of them: bounded
    by their time, a clock set back would hide a CDR's dead letter."""
    row = conn.execute(
        "SELECT cursor FROM webhook_stats WHERE name = ? AND source = 'cdrs'", (name,)
    ).fetchone()
    r = _Route(int(row[0]) if row else None, {}, {}, {})
    for wid, item_ids, first_id, count, body, attempts in conn.execute(
        "SELECT id, item_ids, first_id, count, body, attempts FROM batches"
        " WHERE route = ? AND source = 'cdrs'",
        (name,),
    ):
        for i in batch_item_ids(item_ids, first_id, count):
            r.open_ids[i] = (str(wid), int(attempts))
        if body is not None:
            for uid in _UNIQUE_ID.findall(bytes(body)):
                r.open_uids[uid] = (str(wid), int(attempts))
    for dl_id, reason, body in conn.execute(
        "SELECT id, reason, body FROM dead_letters WHERE webhook = ? AND source = 'cdrs'"
        " ORDER BY id",
        (name,),
    ):
        for uid in _UNIQUE_ID.findall(bytes(body or b"")):
            r.dead[uid] = (int(dl_id), str(reason))
    return r


def _wanted(f: Filter, rec: dict[str, Any] | None) -> bool:
    """Whether the webhook's `when` selects the CDR; a record it cannot judge is one
    delivery dead-letters, so it counts as selected."""
    if f.empty:
        return True
    if rec is None:
        return True
    try:
        return f(lambda name: lookup(rec, name))
    except Exception:
        return True


def _state(r: _Route, wanted: bool, cdr_id: int, unique_id: str) -> dict[str, Any]:
    uid = unique_id.encode()
    if uid in r.dead:
        dl_id, reason = r.dead[uid]
        return {"state": "dead_lettered", "dead_letter_id": dl_id, "reason": reason}
    batch = r.open_ids.get(cdr_id) or r.open_uids.get(uid)
    if batch is not None:
        return {"state": "pending", "webhook_id": batch[0], "attempts": batch[1]}
    if not wanted:
        return {"state": "filtered"}
    if r.cursor is None or cdr_id > r.cursor:
        return {"state": "pending", "attempts": 0}
    return {"state": "delivered"}


def _with_delivery(
    conn: sqlite3.Connection, hooks: Sequence[WebhookConfig], rows: Sequence[tuple[Any, ...]]
) -> list[dict[str, Any]]:
    cdr_hooks = [w for w in hooks if w.source == "cdrs"]
    routes = {w.name: _route(conn, w.name) for w in cdr_hooks}
    filters = {w.name: Filter(w.when) for w in cdr_hooks}
    out = []
    for cdr_id, uid, ts_ms, iccid, usage, data in rows:
        rec = _record(data)
        states = []
        for w in cdr_hooks:
            states.append(
                {
                    "webhook": w.name,
                    **_state(routes[w.name], _wanted(filters[w.name], rec), int(cdr_id), uid),
                }
            )
        out.append(
            {
                "id": int(cdr_id),
                "unique_id": str(uid),
                "ts_ms": int(ts_ms),
                "time": formats.iso_ms(int(ts_ms) * 1_000_000),
                "iccid": str(iccid),
                "usage": int(usage),
                "cdr": rec,
                "delivery": states,
            }
        )
    return out

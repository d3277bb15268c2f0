"""The gateway's state as plain data, read straight from the store (works while stopped)."""

from __future__ import annotations

import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from gateway import store as store_mod
from gateway.config import Config

# Less than this is a full disk: SQLite cannot add a page to its WAL.
FULL_BELOW_BYTES = 256 * 1024


def _iso(ns: int | None) -> str:
    if not ns:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def webhook_rows(conn: sqlite3.Connection, cfg: Config | None) -> list[dict[str, Any]]:
    """Per-webhook stats: hits, requests, delivered, last hit/success/error, queue, dead."""
    stats = {
        r[0]: r
        for r in conn.execute(
            "SELECT name, hits, requests_ok, requests_failed, retried, delivered, dead,"
            " last_hit_ns, last_success_ns, last_error_ns, last_error_status, last_error, disabled,"
            " disabled_reason FROM webhook_stats"
        )
    }
    names = [w.name for w in cfg.webhooks] if cfg else sorted(stats)
    sources = {w.name: w.source for w in cfg.webhooks} if cfg else {}
    dead = dict(
        conn.execute(
            "SELECT webhook, COUNT(*) FROM dead_letters WHERE webhook != '' GROUP BY webhook"
        )
    )
    in_batches = dict(
        conn.execute("SELECT route, COALESCE(SUM(count), 0) FROM batches GROUP BY route")
    )
    cursors = dict(conn.execute("SELECT name, cursor FROM routes"))
    max_packet = conn.execute("SELECT COALESCE(MAX(id), 0) FROM packets").fetchone()[0]
    rows = []
    for name in names:
        s = stats.get(name)
        source = sources.get(name, "")
        waiting = 0
        table = {"packets": "packets", "cdrs": "cdrs", "events": "events"}.get(source)
        if table is not None:
            cur = cursors.get(name, 0)
            if table != "packets" or max_packet > cur:
                waiting = conn.execute(
                    f"SELECT COUNT(*) FROM {table} WHERE id > ?", (cur,)
                ).fetchone()[0]
        rows.append(
            {
                "name": name,
                "source": source,
                "hits": s[1] if s else 0,
                "requests_ok": s[2] if s else 0,
                "requests_failed": s[3] if s else 0,
                "retried": s[4] if s else 0,
                "delivered": s[5] if s else 0,
                "dead_lettered": s[6] if s else 0,
                "dead_letters": int(dead.get(name, 0)),
                "queue_depth": int(waiting) + int(in_batches.get(name, 0)),
                "in_flight": int(in_batches.get(name, 0)),
                "last_hit": _iso(s[7]) if s else "",
                "last_success": _iso(s[8]) if s else "",
                "last_error_at": _iso(s[9]) if s else "",
                "last_error_status": s[10] if s else None,
                "last_error": (s[11] or "") if s else "",
                "disabled": bool(s[12]) if s else False,
                "disabled_reason": (s[13] or "") if s else "",
            }
        )
    return rows


def storage(conn: sqlite3.Connection, state_dir: Path, min_free_bytes: int) -> dict[str, Any]:
    """The store's file system as the gateway sees it, and the last failed-write period.

    A running gateway that cannot write cannot record that in its store; what the file
    system looks like now says it instead (full, below the reserve, read-only)."""
    out: dict[str, Any] = {"state_dir": str(state_dir), "problem": ""}
    try:
        st = os.statvfs(state_dir)
    except OSError as exc:
        out["problem"] = f"cannot inspect {state_dir}: {exc.strerror}"
    else:
        free = st.f_bavail * st.f_frsize
        out["free_bytes"] = free
        out["read_only"] = bool(st.f_flag & os.ST_RDONLY)
        if out["read_only"]:
            out["problem"] = "read-only file system: no packet can be stored or acknowledged"
        elif free < FULL_BELOW_BYTES:
            out["problem"] = f"disk full ({free} bytes free): packets are not acknowledged"
        elif free < min_free_bytes:
            out["problem"] = (
                f"{free / 1e6:.1f} MB free, less than gateway.min_free_mb: "
                "packets are not acknowledged"
            )
    row = conn.execute(
        "SELECT ts_ns, data FROM events WHERE kind = 'store_write_failed' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    if row is not None:
        data = orjson.loads(row[1])
        out["last_write_failure"] = {
            "error": data.get("error", ""),
            "since": _iso(data.get("since_ns")),
            "until": _iso(row[0]),
        }
    return out


def snapshot(conn: sqlite3.Connection, cfg: Config | None = None) -> dict[str, Any]:
    """Everything `gateway status` shows."""
    c = store_mod.counters(conn)
    pending, buffered = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM packets"
    ).fetchone()
    dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    out: dict[str, Any] = {
        "packets": {
            "received": c["packets_received"],
            "redelivered": c["packets_redelivered"],
            "pending": int(pending),
            "delivered": c["packets_delivered"],
            "dead": c["packets_dead"],
            "too_large": c["packets_too_large"],
            "dropped": c["packets_dropped"],
            "decode_failed": c["decode_failed"],
        },
        "buffer": {
            "bytes": int(buffered),
            "max_bytes": int(cfg.gateway.max_buffer_mb * 1024 * 1024) if cfg else None,
        },
        "dead_letters": int(dead),
        "cdrs": {
            "emitted": c["cdrs_emitted"],
            "pending_usage": int(
                conn.execute("SELECT COALESCE(MAX(pending), 0) FROM cdr_state").fetchone()[0]
            ),
        },
        "events": c["events_recorded"],
        "webhooks": webhook_rows(conn, cfg),
    }
    if cfg is not None:
        reserve = int(cfg.gateway.min_free_mb * 1024 * 1024)
        out["storage"] = storage(conn, cfg.gateway.state_dir, reserve)
    return out


def read(db_path: Path, cfg: Config | None = None) -> dict[str, Any]:
    """Open the store read-only and take a snapshot."""
    if not db_path.exists():
        from gateway.errors import StoreError

        raise StoreError(f"no store at {db_path} (has the gateway run with this state_dir?)")
    conn = store_mod.connect(db_path, readonly=True)
    try:
        return snapshot(conn, cfg)
    finally:
        conn.close()

"""The gateway's state as plain data, read straight from the store (works while stopped)."""

from __future__ import annotations

import datetime
import os
import sqlite3
import time
from pathlib import Path
from typing import Any

import orjson

from gateway import store as store_mod
from gateway.config import Config
from gateway.usage import budget

# Less than this is a full disk: SQLite cannot add a page to its WAL.
FULL_BELOW_BYTES = 256 * 1024
LATEST_CDRS = 20
LATEST_REPORTS = 20


def iso(ns: int | None) -> str:
    """Unix time in ns as ISO 8601 UTC to the second; '' for 0 or None."""
    if not ns:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def webhook_rows(conn: sqlite3.Connection, cfg: Config | None) -> list[dict[str, Any]]:
    """Per-webhook stats: hits, requests, delivered, last hit/success/error, queue, dead."""
    # A store `gateway status` reads before the gateway migrated it has no redirects.
    cols = {r[1] for r in conn.execute("PRAGMA table_info(webhook_stats)")}
    redirects = "redirects" if "redirects" in cols else "0"
    stats = {
        r[0]: r
        for r in conn.execute(
            "SELECT name, hits, requests_ok, requests_failed, retried, delivered, dead,"
            " last_hit_ns, last_success_ns, last_error_ns, last_error_status, last_error, disabled,"
            f" disabled_reason, {redirects} FROM webhook_stats"
        )
    }
    names = [w.name for w in cfg.webhooks] if cfg else sorted(stats)
    sources = {w.name: w.source for w in cfg.webhooks} if cfg else {}
    dead = store_mod.dead_letter_counts(conn)
    in_batches = dict(
        conn.execute("SELECT route, COALESCE(SUM(count), 0) FROM batches GROUP BY route")
    )
    cursors = dict(conn.execute("SELECT name, cursor FROM routes"))
    max_packet = store_mod.packet_span(conn)[1]
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
                "dead_letters": dead.get(name, 0),
                "queue_depth": int(waiting) + int(in_batches.get(name, 0)),
                "in_flight": int(in_batches.get(name, 0)),
                "last_hit": iso(s[7]) if s else "",
                "last_success": iso(s[8]) if s else "",
                "last_error_at": iso(s[9]) if s else "",
                "last_error_status": s[10] if s else None,
                "last_error": (s[11] or "") if s else "",
                "disabled": bool(s[12]) if s else False,
                "disabled_reason": (s[13] or "") if s else "",
                "redirects": int(s[14]) if s else 0,
            }
        )
    return rows


def with_lag(
    conn: sqlite3.Connection, rows: list[dict[str, Any]], now_ns: int
) -> list[dict[str, Any]]:
    """Each webhook row with `oldest_pending_s`: the age of its oldest record not yet
    delivered, 0 when nothing is pending (store.lag: lookups by id, no scan)."""
    for r in rows:
        try:
            r["oldest_pending_s"] = store_mod.oldest_pending_s(conn, r["name"], now_ns)
        except sqlite3.OperationalError:  # a store older than schema 9 has no routes view
            r["oldest_pending_s"] = 0.0
    return rows


def behind_text(seconds: float) -> str:
    """A webhook's lag as `gateway status` and the dashboard say it: "behind by 3 h 12 min",
    or "up to date" when nothing is pending."""
    if seconds <= 0:
        return "up to date"
    s = max(1, int(seconds))
    if s < 60:
        return f"behind by {s} s"
    if s < 3600:
        return f"behind by {s // 60} min"
    if s < 86400:
        return f"behind by {s // 3600} h {s % 3600 // 60} min"
    return f"behind by {s // 86400} d {s % 86400 // 3600} h"


def _tables(conn: sqlite3.Connection) -> set[str]:
    # A store written by an older gateway may lack the newer tables until it is migrated.
    return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}


def local_midnight_ns(now_ns: int) -> int:
    """The start of the gateway host's local day containing now_ns."""
    now = datetime.datetime.fromtimestamp(now_ns / 1e9).astimezone()
    return int(now.replace(hour=0, minute=0, second=0, microsecond=0).timestamp()) * 10**9


def bytes_since(conn: sqlite3.Connection, since_ns: int) -> int | None:
    """Modem bytes (tx + rx) counted since since_ns, from the snapshots' counters.

    A counter that goes down (modem reboot) or changes source starts again from zero, as
    the CDR builder treats it. None when there is no counter reading at all.
    """
    base = conn.execute(
        "SELECT id FROM modem_snapshots WHERE ts_ns < ? AND json_extract(data, '$.tx_bytes')"
        " IS NOT NULL ORDER BY id DESC LIMIT 1",
        (since_ns,),
    ).fetchone()
    rows = conn.execute(
        "SELECT json_extract(data, '$.tx_bytes'), json_extract(data, '$.rx_bytes'),"
        " json_extract(data, '$.counter_source') FROM modem_snapshots WHERE id >= ?"
        " AND json_extract(data, '$.tx_bytes') IS NOT NULL ORDER BY id",
        (base[0] if base else 0,),
    ).fetchall()
    if not rows:
        return None
    total = 0
    prev: tuple[int, str] | None = None
    for tx, rx, source in rows:
        value = int(tx or 0) + int(rx or 0)
        if prev is not None and str(source or "") == prev[1]:
            total += value - prev[0] if value >= prev[0] else value
        prev = (value, str(source or ""))
    return total


def quality_of(info: Any) -> str | None:
    """The plain-words signal grade of a modem reading (None when it has no RSRP/SINR)."""
    if not isinstance(info, dict):
        return None
    # The modem code is loaded only where a modem is read: a gateway without one (and
    # its memory) never pays for it.
    from gateway.modem.radio import signal_quality

    return signal_quality(info.get("rsrp_dbm"), info.get("sinr_db"))


def modem_rows(conn: sqlite3.Connection, cfg: Config | None, now_ns: int) -> dict[str, Any]:
    """The newest modem snapshot and today's bytes (local day of the gateway host)."""
    row = conn.execute(
        "SELECT ts_ns, state, data FROM modem_snapshots ORDER BY id DESC LIMIT 1"
    ).fetchone()
    info = orjson.loads(row[2]) if row else None
    from gateway.modem import recovery

    return {
        "configured": cfg.modem is not None if cfg else row is not None,
        "state": row[1] if row else "",
        "updated": iso(row[0]) if row else "",
        "info": info,
        "signal_quality": quality_of(info),
        "bytes_today": bytes_since(conn, local_midnight_ns(now_ns)),
        "recovery": recovery.status(
            conn, cfg.modem.recovery if cfg and cfg.modem else None, now_ns / 1e9
        ),
    }


def _cdr_data(text: str) -> dict[str, Any]:
    """A stored CDR's fields; a damaged row shows as such instead of failing the status."""
    try:
        data = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"damaged": "stored CDR is not valid JSON"}
    return data if isinstance(data, dict) else {"damaged": "stored CDR is not a JSON object"}


def cdr_rows(conn: sqlite3.Connection, limit: int = LATEST_CDRS) -> dict[str, Any]:
    """How many CDRs were emitted and the newest `limit` of them."""
    count = conn.execute("SELECT COUNT(*) FROM cdrs").fetchone()[0]
    latest = [
        {
            "id": r[0],
            "unique_id": r[1],
            "ts_ms": r[2],
            "time": iso(r[2] * 1_000_000),
            "iccid": r[3],
            "usage": r[4],
            "data": _cdr_data(r[5]),
        }
        for r in conn.execute(
            "SELECT id, unique_id, ts_ms, iccid, usage, data FROM cdrs ORDER BY id DESC LIMIT ?",
            (limit,),
        )
    ]
    return {"count": int(count), "latest": latest}


def report_rows(
    conn: sqlite3.Connection, now_ns: int, limit: int = LATEST_REPORTS
) -> list[dict[str, Any]]:
    """The newest report exports with their expiry; the download token is not stored."""
    return [
        {
            "id": r[0],
            "name": r[1],
            "file_name": r[2],
            "size": r[3],
            "lines": r[4],
            "created": iso(r[5]),
            "valid_until": iso(r[6]),
            "expired": now_ns >= r[6],
            "error": r[7],
        }
        for r in conn.execute(
            "SELECT id, name, file_name, size, lines, created_ns, valid_until_ns, error"
            " FROM reports ORDER BY id DESC LIMIT ?",
            (limit,),
        )
    ]


def data_budget(
    conn: sqlite3.Connection, cfg: Config | None, now_ns: int, tables: set[str]
) -> dict[str, Any] | None:
    """The billing cycle's data use against modem.data_budget_mb; None without [modem]."""
    if cfg is None or cfg.modem is None or not {"cdrs", "cdr_state"} <= tables:
        return None
    return budget.cycle_snapshot(conn, cfg.modem, now_ns)


def table_rows(
    conn: sqlite3.Connection, pending: int, buffered: int, dead: int
) -> dict[str, dict[str, int]]:
    """Rows and bytes of each table that counts toward max_buffer_mb: packets not yet
    released (payload bytes), dead letters and the retained tables (as counted, see
    store.retention)."""
    out = {
        "packets": {"rows": pending, "bytes": buffered},
        "dead_letters": {"rows": dead, "bytes": store_mod.dead_letter_bytes(conn)},
    }
    sizes = store_mod.table_sizes(conn)
    for t in store_mod.RETAINED_TABLES:
        rows, size = sizes.get(t, (0, 0))
        out[t] = {"rows": rows, "bytes": size}
    return out


def retention(c: dict[str, int], cfg: Config | None) -> dict[str, Any]:
    """gateway.retention_days and the rows it deleted, per table, since the store began."""
    return {
        "days": cfg.gateway.retention_days if cfg else None,
        "pruned": {t: c.get(f"retention_pruned_{t}", 0) for t in store_mod.RETAINED_TABLES},
    }


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
            "since": iso(data.get("since_ns")),
            "until": iso(row[0]),
        }
    return out


def snapshot(
    conn: sqlite3.Connection, cfg: Config | None = None, now_ns: int | None = None
) -> dict[str, Any]:
    """Everything `gateway status` shows."""
    now_ns = time.time_ns() if now_ns is None else now_ns
    tables = _tables(conn)
    c = store_mod.counters(conn)
    pending, buffered = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM packets"
    ).fetchone()
    dead = conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
    tables_out = table_rows(conn, int(pending), int(buffered), int(dead))
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
            # Dead letters count toward max_bytes as well as the packets' bytes.
            "dead_letter_bytes": store_mod.dead_letter_bytes(conn),
            # ... and so do CDRs, events, modem snapshots and reports (see `tables`).
            "retained_bytes": sum(tables_out[t]["bytes"] for t in store_mod.RETAINED_TABLES),
            "max_bytes": int(cfg.gateway.max_buffer_mb * 1024 * 1024) if cfg else None,
        },
        "dead_letters": int(dead),
        "rejected": {
            "too_large": c["packets_too_large"],
            **{r: c.get(f"rejected_{r}", 0) for r in store_mod.REJECT_REASONS},
        },
        "dead_letters_evicted": c["dead_letters_evicted"],
        "webhooks": with_lag(conn, webhook_rows(conn, cfg), now_ns),
        "modem": modem_rows(conn, cfg, now_ns) if "modem_snapshots" in tables else None,
        "cdrs": {
            **(cdr_rows(conn) if "cdrs" in tables else {"count": 0, "latest": []}),
            "emitted": c["cdrs_emitted"],
            "pending_usage": int(
                conn.execute("SELECT COALESCE(MAX(pending), 0) FROM cdr_state").fetchone()[0]
            )
            if "cdr_state" in tables
            else 0,
        },
        "events": c["events_recorded"],
        "reports": report_rows(conn, now_ns) if "reports" in tables else [],
        "data_budget": data_budget(conn, cfg, now_ns, tables),
        "tables": tables_out,
        "retention": retention(c, cfg),
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

"""CDR reports (the CDR Manager pattern): export a period's CDRs as a zipped CSV, serve it
behind a random token for 24 h, and announce it with a `report` notice to a webhook; or
push the notice and the zip together in one multipart POST (`delivery = "push"`)."""

from __future__ import annotations

import asyncio
import contextlib
import csv
import datetime as dt
import hashlib
import hmac
import io
import logging
import os
import secrets
import sqlite3
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import store as st
from gateway.config import Config, ReportConfig
from gateway.delivery import formats, multipart, new_webhook_id
from gateway.errors import GatewayError
from gateway.store import Store, transaction
from gateway.store.db import FILE_MODE, private_dir
from gateway.usage import cdr, periods

log = logging.getLogger("gateway.reports")

DOWNLOAD_PREFIX = "/cdr-download-files/"
VALID_FOR_NS = 24 * 3600 * 1_000_000_000
# Report files are removed this long after their link expired.
KEEP_FILES_NS = 7 * 24 * 3600 * 1_000_000_000


def token_digest(token: str) -> str:
    """The SHA-256 (hex) under which a download token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Download:
    """A report file a token points at; `expired` means answer 410 Gone."""

    path: Path
    file_name: str
    size: int
    valid_until_ns: int
    expired: bool


def find_download(conn: sqlite3.Connection, token: str, now_ns: int) -> Download | None:
    """The report a download token opens, or None (answer 404) for an unknown token.

    Only the token's SHA-256 is stored; the final comparison is constant-time anyway.
    """
    if not token or len(token) > 200:
        return None
    digest = token_digest(token)
    row = conn.execute(
        "SELECT token_sha256, path, file_name, size, valid_until_ns FROM reports"
        " WHERE token_sha256 = ? AND error = '' ORDER BY id DESC LIMIT 1",
        (digest,),
    ).fetchone()
    if row is None or not hmac.compare_digest(str(row[0]), digest):
        return None
    path = Path(row[1])
    expired = now_ns >= int(row[4]) or not path.is_file()
    return Download(path, str(row[2]), int(row[3]), int(row[4]), expired)


@dataclass(frozen=True, slots=True)
class Exported:
    """What one export produced: the notice sent (or to be sent) and the download URL."""

    notice: dict[str, Any]
    url: str
    path: Path | None


def reports_dir(cfg: Config) -> Path:
    return Path(cfg.gateway.state_dir) / "reports"


def _iso_s(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def _write_zip(path: Path, csv_name: str, rows: list[dict[str, Any]]) -> int:
    """Write the zipped CSV atomically (temp file, fsync, rename); returns its size."""
    text = io.StringIO()
    w = csv.DictWriter(text, fieldnames=cdr.FIELDS, lineterminator="\r\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: r.get(k, "") for k in cdr.FIELDS})
    # CDRs name every SIM and its usage: readable by the gateway's user only.
    private_dir(path.parent)
    tmp = path.with_suffix(".part")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    os.fchmod(fd, FILE_MODE)
    with os.fdopen(fd, "wb") as f:
        with zipfile.ZipFile(f, "w", compression=zipfile.ZIP_DEFLATED) as z:
            z.writestr(csv_name, text.getvalue())
        f.flush()
        os.fsync(f.fileno())
    tmp.replace(path)
    return path.stat().st_size


@dataclass(frozen=True, slots=True)
class PushFailure:
    """Why a report cannot be pushed: the dead letter's reason and a clear message."""

    reason: str
    message: str


def push_body(notice: dict[str, Any], path: Path | None, max_bytes: int) -> bytes | PushFailure:
    """A push's multipart body from the report file on disk (the notice alone for a
    failed export, `path` None), or why there is none: the file is over `max_bytes`
    (receivers refuse large bodies, and the body is held in the store and in memory
    while it is retried), gone, or unreadable."""
    data = None
    if path is not None:
        try:
            with path.open("rb") as f:
                size = os.fstat(f.fileno()).st_size
                if size > max_bytes:
                    return PushFailure(
                        "report_too_large",
                        f"report file {path.name} is {size} bytes, over push_max_mb"
                        f" ({max_bytes} bytes); it stays at {path}",
                    )
                data = f.read(max_bytes + 1)
        except FileNotFoundError:
            return PushFailure("report_missing", f"report file {path} is missing")
        except OSError as exc:
            return PushFailure(
                "report_unreadable", f"cannot read report file {path}: {exc.strerror or exc}"
            )
        if len(data) > max_bytes:  # grew while being read
            return PushFailure("report_too_large", f"report file {path.name} grew while read")
    return multipart.report_body(formats.report_notice(notice), str(notice["fileName"]), data)


def _queue(
    conn: sqlite3.Connection,
    rc: ReportConfig,
    notice: dict[str, Any],
    path: Path | None,
    now_ns: int,
) -> None:
    """Queue the notice (link) or the push for the report's webhook (inside the export's
    transaction); a push that cannot be built is dead-lettered and counted at once,
    with the notice (its error saying why) as the letter's body."""
    st.ensure_stats(conn, rc.webhook)
    conn.execute(
        "UPDATE webhook_stats SET hits = hits + 1, last_hit_ns = ? WHERE name = ?",
        (now_ns, rc.webhook),
    )
    body: bytes | PushFailure = formats.report_notice(notice)
    if rc.delivery == "push":
        body = push_body(notice, path, int(rc.push_max_mb * 1024 * 1024))
    if isinstance(body, PushFailure):
        log.error("report %s: not pushed: %s", rc.name, body.message)
        letter = formats.report_notice({**notice, "error": body.message})
        conn.execute(
            "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, single, reason,"
            " status, excerpt, attempts, created_ns) VALUES (?,'reports',?,?,1,1,?,NULL,?,0,?)",
            (rc.webhook, new_webhook_id(), letter, body.reason, body.message[:300], now_ns),
        )
        conn.execute("UPDATE webhook_stats SET dead = dead + 1 WHERE name = ?", (rc.webhook,))
        st.bump(conn, "report_pushes_dead", 1)
        return
    conn.execute(
        "INSERT INTO batches(id, route, source, item_ids, first_id, count, single, body,"
        " attempts, created_ns, next_at_ns) VALUES (?,?,'reports','[]',NULL,1,1,?,0,?,0)",
        (new_webhook_id(), rc.webhook, body, now_ns),
    )


def export(
    conn: sqlite3.Connection,
    cfg: Config,
    rc: ReportConfig,
    now_ns: int,
    period: periods.Period | None = None,
) -> Exported:
    """Export the report's CDRs, record it, queue its notice (or push).

    `since_last`: the CDRs since this report's last run. A calendar period: `period`, else
    the oldest complete one not exported yet (the newest complete one when all are, for
    `gateway cdr export`). The filter then selects among them.

    Runs on the store's writer (or any connection of its own): the report row and the
    notice's batch are written in one transaction, so the notice goes out exactly when the
    report exists. A failed export is recorded too, and its notice carries `error`.
    """
    last = conn.execute(
        "SELECT COALESCE(MAX(last_cdr_id), 0) FROM reports WHERE name = ?", (rc.name,)
    ).fetchone()[0]
    last_end = conn.execute(
        "SELECT COALESCE(MAX(period_end_ns), 0) FROM reports WHERE name = ?", (rc.name,)
    ).fetchone()[0]
    if rc.period != "since_last" and period is None:
        period = periods.next_period(conn, rc, now_ns) or periods.latest_complete(rc.period, now_ns)
    if rc.period == "since_last":
        period = None
    rows = periods.select_rows(conn, rc, int(last), period)
    wanted = periods.selector(rc)
    records = [r for r in cdr.sound_records(r[1] for r in rows) if wanted(r)]
    last_id = int(rows[-1][0]) if rows else int(last)
    start_ns, end_ns = period if period is not None else (int(last_end), now_ns)
    push = rc.delivery == "push"
    seq = int(conn.execute("SELECT COALESCE(MAX(id), 0) + 1 FROM reports").fetchone()[0])
    file_name = f"tx{seq:05d}.zip"
    path = reports_dir(cfg) / file_name
    token = secrets.token_urlsafe(32)
    url = cfg.web.public_url.rstrip("/") + DOWNLOAD_PREFIX + token
    valid_until = now_ns + VALID_FOR_NS
    error = ""
    size = 0
    try:
        size = _write_zip(path, f"tx{seq:05d}.csv", records)
    except OSError as exc:
        error = f"export failed: {exc.strerror or exc}"
        with contextlib.suppress(OSError):
            path.with_suffix(".part").unlink(missing_ok=True)
    notice = {
        "contentType": "application/zip",
        # Pushed, the zip is in the same request: there is nothing to fetch.
        "httpMethod": "POST" if push else "GET",
        "callbackURL": "" if error or push else url,
        "validUntil": "" if error or push else _iso_s(valid_until),
        "fileName": file_name,
        "fileSizeInBytes": size,
        "numberOfLines": len(records),
        "taskName": rc.name,
        "taskId": rc.task_id,
        "error": error,
    }
    with transaction(conn):
        conn.execute(
            "INSERT INTO reports(name, task_id, token_sha256, file_name, path, size, lines,"
            " period_start_ns, period_end_ns, created_ns, valid_until_ns, error, first_cdr_id,"
            " last_cdr_id) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (
                rc.name,
                rc.task_id,
                # A pushed report has no link: no token opens it.
                token_digest(token) if not (error or push) else "",
                file_name,
                str(path),
                size,
                len(records),
                start_ns,
                end_ns,
                now_ns,
                valid_until,
                error,
                int(rows[0][0]) if rows else 0,
                # A failed export leaves its CDRs to the next run.
                last_id if not error else int(last),
            ),
        )
        if rc.webhook:
            _queue(conn, rc, notice, None if error else path, now_ns)
    if error:
        log.error("report %s: %s (%s)", rc.name, error, path)
    else:
        log.info("report %s: %s, %d CDRs, %d bytes", rc.name, file_name, len(records), size)
    return Exported(notice, "" if error or push else url, None if error else path)


def prune_files(conn: sqlite3.Connection, now_ns: int) -> int:
    """Delete report files whose link expired more than KEEP_FILES_NS ago."""
    n = 0
    for rid, path in conn.execute(
        "SELECT id, path FROM reports WHERE valid_until_ns < ? AND path != ''",
        (now_ns - KEEP_FILES_NS,),
    ).fetchall():
        with contextlib.suppress(OSError):
            Path(path).unlink(missing_ok=True)
        conn.execute("UPDATE reports SET path = '' WHERE id = ?", (rid,))
        n += 1
    return n


def next_run_ns(rc: ReportConfig, last_ns: int, started_ns: int, now_ns: int) -> int:
    """When a report is next due. `at` (local HH:MM): the first such time after the last
    run (or after start when it never ran); `every`: last run (or start) + every."""
    if rc.at:
        hh, mm = (int(x) for x in rc.at.split(":"))
        base = dt.datetime.fromtimestamp((last_ns or started_ns) / 1e9).astimezone()
        cand = base.replace(hour=hh, minute=mm, second=0, microsecond=0)
        if cand <= base:
            cand += dt.timedelta(days=1)
        return int(cand.timestamp() * 1e9)
    due = (last_ns or started_ns) + int(rc.every_s * 1e9)
    # A clock that jumped back must not postpone a report by the size of the jump.
    return min(due, now_ns + int(rc.every_s * 1e9))


def _last_run(conn: sqlite3.Connection, name: str) -> tuple[int, int]:
    """(id, created_ns) of a report's newest run; (0, 0) when it never ran."""
    row = conn.execute(
        "SELECT id, created_ns FROM reports WHERE name = ? ORDER BY id DESC LIMIT 1", (name,)
    ).fetchone()
    return (int(row[0]), int(row[1])) if row else (0, 0)


async def run_schedule(cfg: Config, store: Store, wake: asyncio.Event | None = None) -> None:
    """Export every [[reports]] entry when due, until cancelled."""
    started = time.time_ns()
    # Per report: the run it counts from (its id) and when it is next due, in monotonic
    # seconds. An `every` report's due time is worked out from the wall clock once per run
    # (here or by `gateway cdr export`): a clock set back afterwards must not postpone it
    # by the size of the jump. An `at` report follows the wall clock: worked out each pass.
    due: dict[str, tuple[int, float]] = {}
    while True:
        now, mono = time.time_ns(), time.monotonic()
        soonest = 3600.0
        for rc in cfg.reports:
            try:
                if rc.period != "since_last":
                    # A calendar report follows the wall clock: its periods are UTC days
                    # or months, and it knows from the store which ones it exported.
                    at_ns = await asyncio.wrap_future(store.call(periods.due_ns, rc, now))
                    wait = (at_ns - now) / 1e9
                    if wait <= 0:
                        await asyncio.wrap_future(store.call(export, cfg, rc, time.time_ns()))
                        if wake is not None:
                            wake.set()
                        wait = 0.0  # a missed period may be next
                    soonest = min(soonest, wait)
                    continue
                last_id, last_ns = await asyncio.wrap_future(store.call(_last_run, rc.name))
                if rc.at or rc.name not in due or due[rc.name][0] != last_id:
                    wait = (next_run_ns(rc, last_ns, started, now) - now) / 1e9
                    due[rc.name] = (last_id, mono + wait)
                wait = due[rc.name][1] - mono
                if wait <= 0:
                    await asyncio.wrap_future(store.call(export, cfg, rc, time.time_ns()))
                    if wake is not None:
                        wake.set()
                    wait = 0.0  # the next pass counts from this run
                soonest = min(soonest, wait)
            except (GatewayError, sqlite3.Error) as exc:
                log.warning("report %s: %s", rc.name, exc)
                soonest = min(soonest, 60.0)
        try:
            await asyncio.wrap_future(store.call(prune_files, time.time_ns()))
        except (GatewayError, sqlite3.Error) as exc:
            log.warning("reports: cannot prune old files: %s", exc)
        await asyncio.sleep(max(0.05, min(soonest, 60.0)))


def list_reports(conn: sqlite3.Connection, limit: int = 100) -> list[dict[str, Any]]:
    """Recent exports, newest first (without tokens)."""
    keys = (
        "id",
        "name",
        "task_id",
        "file_name",
        "size",
        "lines",
        "created_ns",
        "valid_until_ns",
        "error",
    )
    rows = conn.execute(
        f"SELECT {', '.join(keys)} FROM reports ORDER BY id DESC LIMIT ?", (limit,)
    ).fetchall()
    return [dict(zip(keys, r, strict=True)) for r in rows]

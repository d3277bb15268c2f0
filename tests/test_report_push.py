"""CDR reports pushed as multipart (notice + zip), report filters and calendar periods,
and the check-config warning for download links no receiver can reach."""

from __future__ import annotations

import asyncio
import base64
import csv
import datetime as dt
import hashlib
import hmac
import io
import os
import sqlite3
import subprocess
import zipfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from aiohttp.base_protocol import BaseProtocol

from gateway import config
from gateway import store as st
from gateway.config import Condition
from gateway.delivery import signing
from gateway.errors import ConfigError
from gateway.usage import periods, reports
from tests.conftest import ROOT, Broker, db_rows, gateway_cmd, until, write_config
from tests.receiver import Receiver, Recorded, Reply
from tests.test_cdr import NEW, OLD, preload_cdrs

SECRET = "cdr-manager-secret"
WHSEC = "whsec_" + base64.b64encode(b"standard-webhooks-key-32-bytes!!").decode()
NOTICE_KEYS = [
    "contentType",
    "httpMethod",
    "callbackURL",
    "validUntil",
    "fileName",
    "fileSizeInBytes",
    "numberOfLines",
    "taskName",
    "taskId",
    "error",
]


@dataclass
class Push:
    """A push as its receiver sees it: parts by name, the notice, the CSV rows."""

    parts: dict[str, tuple[dict[str, str], bytes, str | None]]
    notice: dict[str, Any]
    rows: list[dict[str, str]]


async def parse_push(req: Recorded) -> Push:
    """Parse a recorded request with aiohttp's multipart reader (what an aiohttp receiver
    runs on request.multipart()), fed with the raw body the signature covers."""
    loop = asyncio.get_running_loop()
    stream = aiohttp.StreamReader(BaseProtocol(loop), 2**16, loop=loop)
    stream.feed_data(req.raw)
    stream.feed_eof()
    reader = aiohttp.MultipartReader({"Content-Type": req.headers["content-type"]}, stream)
    parts: dict[str, tuple[dict[str, str], bytes, str | None]] = {}
    while (part := await reader.next()) is not None:
        assert isinstance(part, aiohttp.BodyPartReader)
        assert part.name is not None
        parts[part.name] = (dict(part.headers), bytes(await part.read(decode=False)), part.filename)
    notice = orjson.loads(parts["notice"][1])
    rows: list[dict[str, str]] = []
    if "file" in parts:
        with zipfile.ZipFile(io.BytesIO(parts["file"][1])) as z:
            (name,) = z.namelist()
            rows = list(csv.DictReader(io.StringIO(z.read(name).decode())))
    return Push(parts, notice, rows)


def cdr_manager_ok(req: Recorded) -> bool:
    want = base64.b64encode(hmac.new(SECRET.encode(), req.raw, hashlib.sha512).digest())
    return hmac.compare_digest(req.headers["x-cdr-signature"], want.decode())


def standard_ok(req: Recorded) -> bool:
    h = req.headers
    ts = int(h["webhook-timestamp"])
    return signing.verify_standard_webhooks(
        WHSEC, h["webhook-id"], ts, req.raw, h["webhook-signature"]
    )


def push_config(
    tmp_path: Path, broker: Broker, url: str, every: str = "1s", extra: str = ""
) -> Path:
    return write_config(
        tmp_path / "gw.toml",
        broker.port,
        tmp_path / "state",
        extra=f"""
[[webhooks]]
name = "signed"
url = "{url}/signed"
source = "reports"
format = "report"
signing = {{ scheme = "cdr-manager", secret = "{SECRET}" }}
retry = {{ backoff_min_s = 0.2, backoff_max_s = 0.3 }}

[[webhooks]]
name = "standard"
url = "{url}/standard"
source = "reports"
format = "report"
signing = {{ scheme = "standard-webhooks", secret = "{WHSEC}" }}

[[reports]]
name = "Daily usage"
task_id = 7
every = "{every}"
webhook = "signed"
delivery = "push"

[[reports]]
name = "Roaming"
task_id = 8
every = "{every}"
webhook = "standard"
delivery = "push"
filter = [ {{ field = "MCC", op = "!=", value = "440" }}, {{ field = "usage", op = ">=", value = 30 }} ]
{extra}
""",
    )


async def test_a_pushed_report_reaches_the_receiver_signed_and_survives_a_500_and_a_restart(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    db = tmp_path / "state" / "gateway.db"
    cdrs = preload_cdrs(
        db, [(OLD, 100, "440"), (OLD, 2000, "440"), (NEW, 30, "222"), (NEW, 5, "222")]
    )
    restarted = False

    def behaviour(n: int, req: Recorded) -> Reply:
        # The signed webhook's receiver fails until the gateway was restarted.
        if req.path == "/signed" and not restarted:
            return Reply(500, text="try later")
        return Reply()

    receiver.behaviour = behaviour
    cfg = config.load(push_config(tmp_path, mosquitto, receiver.url.removesuffix("/hook")))
    first = await run_gateway(cfg)
    await until(
        lambda: any(r.path == "/signed" for r in receiver.requests), timeout=15, what="a push"
    )
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    restarted = True
    await run_gateway(cfg)
    signed = [r for r in receiver.requests if r.path == "/signed"]
    wid = signed[0].webhook_id
    await until(
        lambda: any(r.webhook_id == wid and r.status == 200 for r in receiver.requests),
        timeout=15,
        what="the push accepted after the restart",
    )
    tries = [r for r in receiver.requests if r.webhook_id == wid]
    assert tries[0].status == 500
    assert tries[-1].status == 200
    # Every attempt, before and after the restart, carried the same bytes and signature.
    assert {r.raw for r in tries} == {tries[0].raw}
    assert {r.headers["x-cdr-signature"] for r in tries} == {tries[0].headers["x-cdr-signature"]}
    req = tries[-1]
    assert cdr_manager_ok(req)
    assert req.headers["content-type"].startswith("multipart/form-data; boundary=")
    push = await parse_push(req)
    assert list(push.parts) == ["notice", "file"]
    assert push.parts["notice"][0]["Content-Type"] == "application/json"
    assert push.parts["file"][0]["Content-Type"] == "application/zip"
    n = push.notice
    assert list(n) == NOTICE_KEYS
    assert (n["httpMethod"], n["callbackURL"], n["validUntil"], n["error"]) == ("POST", "", "", "")
    assert (n["taskName"], n["taskId"], n["numberOfLines"]) == ("Daily usage", 7, 4)
    assert push.parts["file"][2] == n["fileName"]
    assert len(push.parts["file"][1]) == n["fileSizeInBytes"]
    assert [r["UniqueID"] for r in push.rows] == [c["UniqueID"] for c in cdrs]
    assert [int(r["Usage"]) for r in push.rows] == [100, 2000, 30, 5]
    print_receiver_view("signed", req, push, [r.status for r in tries])

    # The filtered report, signed the Standard Webhooks way: only MCC != 440 and Usage >= 30.
    std = next(r for r in receiver.ok() if r.path == "/standard")
    assert standard_ok(std)
    roaming = await parse_push(std)
    assert roaming.notice["taskName"] == "Roaming"
    assert [r["UniqueID"] for r in roaming.rows] == [cdrs[2]["UniqueID"]]


def print_receiver_view(name: str, req: Recorded, push: Push, statuses: list[int]) -> None:
    """What the receiver saw (shown with pytest -s)."""
    print(
        f"\n--- receiver {name}: {len(req.raw)} bytes, answered {statuses}, same webhook-id {req.webhook_id}"
    )
    print(f"Content-Type: {req.headers['content-type']}")
    print(f"X-CDR-Signature verified over the raw body: {cdr_manager_ok(req)}")
    for part, (headers, data, filename) in push.parts.items():
        print(f"part {part!r}: {headers['Content-Type']}, {len(data)} bytes, filename={filename!r}")
    print("notice:", orjson.dumps(push.notice).decode())
    for row in push.rows:
        print("csv:", row["UniqueID"], row["Iccid"], row["MCC"], row["Timestamp"], row["Usage"])


def _cfg_with(tmp_path: Path, broker: Broker, rc: config.ReportConfig) -> config.Config:
    cfg = config.load(push_config(tmp_path, broker, "http://127.0.0.1:9", every="24h"))
    return replace(cfg, reports=(rc,))


def test_a_report_too_large_to_push_is_dead_lettered_and_counted_and_the_next_one_goes(
    mosquitto: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "gateway.db"
    preload_cdrs(db, [(OLD, 100, "440"), (NEW, 30, "222")])
    cfg = config.load(push_config(tmp_path, mosquitto, "http://127.0.0.1:9", every="24h"))
    tiny = replace(cfg.reports[0], push_max_mb=0.0001)  # 104 bytes: less than any zip
    conn = st.connect(db)
    try:
        st.migrate(conn)
        out = reports.export(conn, cfg, tiny, 1_800_000_000_000_000_000)
        assert out.path is not None
        assert out.path.is_file()  # the report itself is written
        (letter,) = conn.execute(
            "SELECT webhook, source, reason, excerpt, body FROM dead_letters"
        ).fetchall()
        assert letter[:3] == ("signed", "reports", "report_too_large")
        assert f"over push_max_mb (104 bytes); it stays at {out.path}" in letter[3]
        assert orjson.loads(letter[4])["error"] == letter[3]
        assert conn.execute("SELECT COUNT(*) FROM batches").fetchone()[0] == 0
        assert (
            conn.execute("SELECT dead FROM webhook_stats WHERE name = 'signed'").fetchone()[0] == 1
        )
        assert st.counters(conn)["report_pushes_dead"] == 1
        # The next report of the same webhook is queued as usual.
        preload_cdrs(db, [(NEW, 40, "222")])
        reports.export(conn, cfg, cfg.reports[0], 1_800_000_100_000_000_000)
        (body,) = conn.execute("SELECT body FROM batches WHERE route = 'signed'").fetchone()
        assert body.startswith(b"--edge-gateway-report-")
    finally:
        conn.close()


def test_a_report_file_missing_or_unreadable_is_a_named_push_failure(tmp_path: Path) -> None:
    notice = {"fileName": "tx00001.zip", "error": ""}
    gone = reports.push_body(notice, tmp_path / "tx00001.zip", 1 << 20)
    assert isinstance(gone, reports.PushFailure)
    assert (gone.reason, gone.message) == (
        "report_missing",
        f"report file {tmp_path / 'tx00001.zip'} is missing",
    )
    (tmp_path / "dir.zip").mkdir()
    bad = reports.push_body(notice, tmp_path / "dir.zip", 1 << 20)
    assert isinstance(bad, reports.PushFailure)
    assert bad.reason == "report_unreadable"
    assert "cannot read report file" in bad.message
    # A failed export's notice goes alone, still multipart.
    alone = reports.push_body({**notice, "error": "export failed: disk full"}, None, 1 << 20)
    assert isinstance(alone, bytes)
    assert b'name="notice"' in alone
    assert b'name="file"' not in alone


def _ts(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp() * 1000)


def _restamp(db: Path, stamps: list[tuple[str, str]]) -> None:
    """Give stored CDRs chosen Timestamps (UniqueID, ISO UTC), in the row and the JSON."""
    conn = sqlite3.connect(db)
    with conn:
        for uid, when in stamps:
            (data,) = conn.execute("SELECT data FROM cdrs WHERE unique_id = ?", (uid,)).fetchone()
            rec = {**orjson.loads(data), "Timestamp": _ts(when)}
            conn.execute(
                "UPDATE cdrs SET ts_ms = ?, data = ? WHERE unique_id = ?",
                (_ts(when), orjson.dumps(rec).decode(), uid),
            )
    conn.close()


def _csv(path: Path | None) -> list[str]:
    assert path is not None
    with zipfile.ZipFile(path) as z:
        (name,) = z.namelist()
        return [r["UniqueID"] for r in csv.DictReader(io.StringIO(z.read(name).decode()))]


def _ns(text: str) -> int:
    return _ts(text) * 1_000_000


def test_calendar_periods_and_filters_select_the_cdrs_and_each_period_runs_once(
    mosquitto: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "gateway.db"
    c = preload_cdrs(
        db,
        [
            (OLD, 100, "440"),
            (OLD, 200, "222"),
            (NEW, 300, "222"),
            (NEW, 400, "222"),
            (NEW, 9, "222"),
        ],
    )
    _restamp(
        db,
        [
            (c[0]["UniqueID"], "2026-02-28T23:59:59.999"),  # February
            (c[1]["UniqueID"], "2026-03-01T00:00:00"),  # 1 March, first ms
            (c[2]["UniqueID"], "2026-03-01T23:59:59.999"),  # 1 March, last ms
            (c[3]["UniqueID"], "2026-03-02T00:00:00"),  # 2 March
            (c[4]["UniqueID"], "2026-03-01T12:00:00"),  # 1 March, below the filter's 10 B
        ],
    )
    day = config.ReportConfig(
        name="day",
        period="previous_day",
        filter=(Condition("Usage", ">=", 10), Condition("Iccid", "in", [OLD, NEW])),
    )
    cfg = _cfg_with(tmp_path, mosquitto, day)
    conn = st.connect(db)
    try:
        st.migrate(conn)
        now = _ns("2026-03-02T10:00:00")
        assert periods.next_period(conn, day, now) == (
            _ns("2026-03-01T00:00:00"),
            _ns("2026-03-02T00:00:00"),
        )
        # Due a minute after 1 March ended: already, at 10:00 on the 2nd.
        assert periods.due_ns(conn, day, now) == _ns("2026-03-02T00:01:00")
        out = reports.export(conn, cfg, day, now)
        assert _csv(out.path) == [c[1]["UniqueID"], c[2]["UniqueID"]]
        # Done: the store says so, to this connection and to any after a restart.
        assert periods.next_period(conn, day, now) is None
        assert periods.due_ns(conn, day, now) == _ns("2026-03-03T00:01:00")
        again = st.connect(db, readonly=True)
        assert periods.due_ns(again, day, now) == _ns("2026-03-03T00:01:00")
        again.close()
        # Two days later: the missed 2 March, then 3 March, one after the other.
        later = _ns("2026-03-04T08:00:00")
        assert _csv(reports.export(conn, cfg, day, later).path) == [c[3]["UniqueID"]]
        assert periods.next_period(conn, day, later) == (
            _ns("2026-03-03T00:00:00"),
            _ns("2026-03-04T00:00:00"),
        )
        assert _csv(reports.export(conn, cfg, day, later).path) == []
        assert periods.next_period(conn, day, later) is None

        month = config.ReportConfig(
            name="month", period="previous_month", filter=(Condition("MCC", "==", "440"),)
        )
        out = reports.export(
            conn, _cfg_with(tmp_path, mosquitto, month), month, _ns("2026-03-15T00:00:00")
        )
        assert _csv(out.path) == [c[0]["UniqueID"]]
        assert periods.next_period(conn, month, _ns("2026-03-31T23:00:00")) is None
        assert periods.due_ns(conn, month, _ns("2026-03-15T00:00:00")) == _ns("2026-04-01T00:01:00")
    finally:
        conn.close()


def test_a_report_filter_tells_two_iccids_apart_that_differ_in_the_last_digit(
    mosquitto: Broker, tmp_path: Path
) -> None:
    db = tmp_path / "state" / "gateway.db"
    a, b = "89440000000000000001", "89440000000000000002"
    c = preload_cdrs(db, [(a, 10, "222"), (b, 20, "222")])
    rc = config.ReportConfig(name="one sim", filter=(Condition("Iccid", "==", b),))
    conn = st.connect(db)
    try:
        st.migrate(conn)
        out = reports.export(
            conn, _cfg_with(tmp_path, mosquitto, rc), rc, 1_800_000_000_000_000_000
        )
        assert _csv(out.path) == [c[1]["UniqueID"]]
    finally:
        conn.close()


def test_report_settings_are_checked_when_the_config_is_loaded(tmp_path: Path) -> None:
    def problems(report: str) -> str:
        raw = f'[mqtt]\nhost = "127.0.0.1"\n[web]\nenabled = false\n[[reports]]\nname = "r"\n{report}\n'
        path = tmp_path / "gw.toml"
        path.write_text(raw)
        try:
            config.load(path)
        except ConfigError as exc:
            return str(exc)
        return ""

    assert problems('filter = [{ field = "iccid", op = "==", value = "8944" }]') == ""
    assert "reports[0].filter[0].field: is not a CDR field (one of CdrType," in problems(
        'filter = [{ field = "Bytes", op = ">", value = 1 }]'
    )
    assert "reports[0].filter[0].value: must be a string for MCC with op '==', got 222" in problems(
        'filter = [{ field = "MCC", op = "==", value = 222 }]'
    )
    assert "reports[0].filter[0].value: must be a number for Usage with op '>'" in problems(
        'filter = [{ field = "Usage", op = ">", value = "1000" }]'
    )
    assert "reports[0].filter[0].op: must be one of" in problems(
        'filter = [{ field = "Usage", op = "~", value = 1 }]'
    )
    assert (
        "reports[0].period: must be one of 'since_last', 'previous_day', 'previous_month'"
        in problems('period = "yesterday"')
    )
    assert "reports[0].every: does not go with period 'previous_day'" in problems(
        'period = "previous_day"\nevery = "1h"'
    )
    assert "reports[0].webhook: is required with delivery = 'push'" in problems('delivery = "push"')
    assert "reports[0].delivery: must be one of 'link', 'push'" in problems('delivery = "email"')


def test_check_config_warns_when_report_links_point_at_a_private_address(
    mosquitto: Broker, tmp_path: Path
) -> None:
    def link_warnings(public_url: str, delivery: str = "link") -> list[str]:
        path = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            web=f'public_url = "{public_url}"',
            extra=f"""
[[webhooks]]
name = "reports"
url = "https://crm.example/in"
source = "reports"
format = "report"

[[reports]]
name = "daily"
webhook = "reports"
delivery = "{delivery}"
""",
        )
        return [w for w in config.warnings(config.load(path)) if "download links" in w]

    for url, why in [
        ("http://127.0.0.1:8080", "a loopback address"),
        ("http://localhost:8080", "a loopback name"),
        ("https://192.168.1.20", "a private address"),
        ("https://10.0.0.5:8443", "a private address"),
        ("https://172.20.1.1", "a private address"),
        ("https://100.72.3.4", "a carrier-grade NAT address (100.64.0.0/10)"),
        ("https://169.254.10.1", "a link-local address"),
        ("https://[fd12::1]:8443", "a unique local address (fc00::/7)"),
        ("https://[::1]", "a loopback address"),
    ]:
        (w,) = link_warnings(url)
        assert f"web.public_url ({url}) is {why}: the download links of reports 'daily'" in w
    for url in ("https://203.0.113.7", "https://gw.example.com", "https://100.128.0.1"):
        assert link_warnings(url) == [], url
    assert link_warnings("http://127.0.0.1:8080", delivery="push") == []

    # check-config prints it as a warning and still succeeds.
    link_warnings("https://192.168.1.20")
    done = subprocess.run(
        gateway_cmd("check-config", "-c", str(tmp_path / "gw.toml")),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    (line,) = [x for x in done.stderr.splitlines() if "download links" in x]
    assert line.startswith("gateway: warning: web.public_url (https://192.168.1.20) is a private")
    assert "set delivery = 'push'" in line


async def test_a_previous_day_report_runs_once_on_schedule_and_not_again_after_a_restart(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    db = tmp_path / "state" / "gateway.db"
    c = preload_cdrs(db, [(OLD, 100, "440"), (NEW, 30, "222")])
    now = dt.datetime.now(dt.UTC)
    yesterday = (now - dt.timedelta(days=1)).replace(hour=12, tzinfo=None).isoformat()
    _restamp(db, [(c[0]["UniqueID"], yesterday)])
    path = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        extra=f"""
[[webhooks]]
name = "signed"
url = "{receiver.url}"
source = "reports"
format = "report"
signing = {{ scheme = "cdr-manager", secret = "{SECRET}" }}

[[reports]]
name = "daily"
period = "previous_day"
webhook = "signed"
delivery = "push"

# Runs five times a second, after "daily" in each pass of the schedule: a pass seen here is a
# pass in which "daily" was looked at too.
[[reports]]
name = "tick"
every = "0.2s"
""",
    )

    def runs(name: str) -> int:
        return int(db_rows(db, "SELECT COUNT(*) FROM reports WHERE name = ?", (name,))[0][0])

    first = await run_gateway(config.load(path))
    # In the first minute of a UTC day the run waits for periods.SETTLE_NS: up to 60 s.
    await until(lambda: receiver.ok(), timeout=90, what="the daily push")
    push = await parse_push(receiver.ok()[0])
    assert push.notice["taskName"] == "daily"
    assert [r["UniqueID"] for r in push.rows] == [c[0]["UniqueID"]]  # yesterday's only
    first.cancel()
    await asyncio.gather(first, return_exceptions=True)
    ticks = runs("tick")
    await run_gateway(config.load(path))
    await until(lambda: runs("tick") >= ticks + 2, timeout=15, what="two schedule passes")
    assert runs("daily") == 1
    assert len(receiver.requests) == 1

"""CDR reports: zipped CSV export, download token, signed notice, failure notice, schedule."""

from __future__ import annotations

import base64
import csv
import datetime as dt
import hashlib
import hmac
import io
import sqlite3
import subprocess
import time
import zipfile
from pathlib import Path
from typing import Any

import aiohttp

from gateway import config
from gateway import store as st
from gateway.config import ReportConfig
from gateway.usage import reports
from tests.conftest import ROOT, Broker, free_port, gateway_cmd, until, write_config
from tests.receiver import Receiver
from tests.test_cdr import NEW, OLD, preload_cdrs

SECRET = "cdr-manager-secret"
PUBLIC = "https://gw.example:8443/base"


def report_config(tmp_path: Path, broker: Broker, url: str, every: str = "2s") -> Path:
    return write_config(
        tmp_path / "gw.toml",
        broker.port,
        tmp_path / "state",
        extra=f"""
public_url = "{PUBLIC}"

[[webhooks]]
name = "reports"
url = "{url}"
source = "reports"
format = "report"
signing = {{ scheme = "cdr-manager", secret = "{SECRET}" }}

[[reports]]
name = "Daily usage"
task_id = 7
every = "{every}"
webhook = "reports"
""",
    )


def csv_rows(path: Path) -> list[dict[str, str]]:
    with zipfile.ZipFile(path) as z:
        (name,) = z.namelist()
        assert name.endswith(".csv")
        text = z.read(name).decode()
    return list(csv.DictReader(io.StringIO(text)))


def token_of(notice: dict[str, Any]) -> str:
    url = notice["callbackURL"]
    assert url.startswith(PUBLIC + reports.DOWNLOAD_PREFIX)
    return str(url.rsplit("/", 1)[1])


async def test_a_scheduled_report_zips_the_cdrs_and_sends_a_signed_notice(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    db = tmp_path / "state" / "gateway.db"
    cdrs = preload_cdrs(db, [(OLD, 100, "440"), (OLD, 2000, "440"), (NEW, 30, "222")])
    await run_gateway(config.load(report_config(tmp_path, mosquitto, receiver.url)))
    await until(lambda: receiver.ok(), timeout=15, what="the report notice")
    req = receiver.ok()[0]
    want_sig = base64.b64encode(hmac.new(SECRET.encode(), req.raw, hashlib.sha512).digest())
    assert req.headers["x-cdr-signature"] == want_sig.decode()
    n = req.json
    assert list(n) == [
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
    assert (n["contentType"], n["httpMethod"], n["error"]) == ("application/zip", "GET", "")
    assert (n["taskName"], n["taskId"], n["numberOfLines"]) == ("Daily usage", 7, 3)
    valid = dt.datetime.strptime(n["validUntil"], "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=dt.UTC)
    assert abs(valid.timestamp() - (time.time() + 24 * 3600)) < 120
    path = tmp_path / "state" / "reports" / n["fileName"]
    assert n["fileName"].endswith(".zip")
    assert path.stat().st_size == n["fileSizeInBytes"]
    rows = csv_rows(path)
    assert len(rows) == n["numberOfLines"]
    assert [r["UniqueID"] for r in rows] == [c["UniqueID"] for c in cdrs]
    assert [int(r["Usage"]) for r in rows] == [100, 2000, 30]
    assert list(rows[0]) == list(reports.cdr.FIELDS)

    # The token opens exactly this file for 24 hours; only its digest is stored.
    token = token_of(n)
    conn = st.connect(db, readonly=True)
    try:
        assert token not in str(conn.execute("SELECT * FROM reports").fetchall())
        found = reports.find_download(conn, token, time.time_ns())
        assert found is not None
        assert found.path == path
        assert not found.expired
        later = reports.find_download(conn, token, time.time_ns() + reports.VALID_FOR_NS + 1)
        assert later is not None
        assert later.expired
        assert reports.find_download(conn, token[:-1] + "x", time.time_ns()) is None
    finally:
        conn.close()

    # The next run covers only what came after: no CDR is reported twice.
    await until(lambda: len(receiver.ok()) >= 2, timeout=15, what="a second notice")
    assert receiver.ok()[1].json["numberOfLines"] == 0
    assert receiver.ok()[1].json["fileName"] != n["fileName"]


async def test_a_failed_export_sends_a_notice_with_the_error_and_keeps_its_cdrs(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    db = tmp_path / "state" / "gateway.db"
    preload_cdrs(db, [(OLD, 100, "440"), (OLD, 200, "440")])
    (tmp_path / "state" / "reports").write_text("not a directory")  # the export cannot write
    task = await run_gateway(config.load(report_config(tmp_path, mosquitto, receiver.url)))
    await until(lambda: receiver.ok(), timeout=15, what="the failure notice")
    n = receiver.ok()[0].json
    assert n["error"].startswith("export failed")
    assert (n["callbackURL"], n["fileSizeInBytes"], n["numberOfLines"]) == ("", 0, 2)
    assert n["fileName"].endswith(".zip")
    assert (n["taskName"], n["taskId"]) == ("Daily usage", 7)
    task.cancel()
    (tmp_path / "state" / "reports").unlink()
    # Fixed: the next export reports the two CDRs the failed one could not.
    receiver.requests.clear()
    await run_gateway(config.load(report_config(tmp_path, mosquitto, receiver.url)))
    await until(lambda: receiver.ok(), timeout=15, what="the next notice")
    assert receiver.ok()[0].json["error"] == ""
    assert receiver.ok()[0].json["numberOfLines"] == 2


def test_cdr_export_on_demand_works_while_stopped_and_the_notice_goes_out_on_start(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, gateway_proc
) -> None:
    preload_cdrs(tmp_path / "state" / "gateway.db", [(NEW, 77, "310")])
    cfg = report_config(tmp_path, mosquitto, receiver.url, every="24h")
    out = subprocess.run(
        gateway_cmd("cdr", "export", "-c", str(cfg), "--report", "Daily usage"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    ).stdout
    assert "1 CDR(s)" in out
    assert PUBLIC + reports.DOWNLOAD_PREFIX in out
    assert receiver.ok() == []
    gw = gateway_proc(cfg)
    gw.start()
    deadline = time.monotonic() + 15
    while not receiver.ok() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert receiver.ok(), gw.log()
    n = receiver.ok()[0].json
    assert n["numberOfLines"] == 1
    assert n["callbackURL"] in out
    assert gw.terminate() == 0


def test_schedule_every_and_at() -> None:
    hour = 3600 * 10**9
    now = time.time_ns()
    every = ReportConfig(name="r", every_s=3600)
    assert reports.next_run_ns(every, 0, now, now) == now + hour  # first run: start + every
    assert reports.next_run_ns(every, now - 2 * hour, now, now) == now - hour  # overdue: now
    # The clock went back a day: the report is not postponed by a day.
    assert reports.next_run_ns(every, now + 24 * hour, now, now) == now + hour
    at = ReportConfig(name="r", at="02:00")
    base = dt.datetime(2026, 3, 10, 1, 30).astimezone()
    due = reports.next_run_ns(at, int(base.timestamp() * 1e9), now, now)
    assert dt.datetime.fromtimestamp(due / 1e9).astimezone() == base.replace(hour=2, minute=0)
    late = base.replace(hour=2, minute=30)
    due = reports.next_run_ns(at, int(late.timestamp() * 1e9), now, now)
    want = (base + dt.timedelta(days=1)).replace(hour=2, minute=0)
    assert dt.datetime.fromtimestamp(due / 1e9).astimezone() == want


async def test_the_callback_url_downloads_the_zip_from_the_gateway_then_410_when_expired(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    db = tmp_path / "state" / "gateway.db"
    cdrs = preload_cdrs(db, [(OLD, 321, "440"), (NEW, 654, "310")])
    port = free_port()
    path = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        web=f'listen = "127.0.0.1:{port}"\npublic_url = "http://127.0.0.1:{port}"',
        extra=f"""
[[webhooks]]
name = "reports"
url = "{receiver.url}"
source = "reports"
format = "report"

[[reports]]
name = "daily"
every = "1s"
webhook = "reports"
""",
    )
    await run_gateway(config.load(path))
    await until(lambda: receiver.ok(), timeout=15, what="the report notice")
    n = receiver.ok()[0].json
    url = n["callbackURL"]
    assert url.startswith(f"http://127.0.0.1:{port}{reports.DOWNLOAD_PREFIX}")
    async with aiohttp.ClientSession() as http:
        async with http.get(url) as r:
            assert r.status == 200
            assert r.headers["Content-Type"] == "application/zip"
            body = await r.read()
        assert len(body) == n["fileSizeInBytes"]
        saved = tmp_path / "downloaded.zip"
        saved.write_bytes(body)
        rows = csv_rows(saved)
        assert len(rows) == n["numberOfLines"] == 2
        assert [r["UniqueID"] for r in rows] == [c["UniqueID"] for c in cdrs]
        async with http.get(url[:-2] + "xy") as r:
            assert r.status == 404
        # 24 hours later (the stored expiry moved back instead of the clock forward).
        conn = sqlite3.connect(db)
        conn.execute("UPDATE reports SET valid_until_ns = ?", (time.time_ns() - 1,))
        conn.commit()
        conn.close()
        async with http.get(url) as r:
            assert r.status == 410


def test_a_damaged_cdr_row_is_left_out_of_the_report_and_the_others_are_exported(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver
) -> None:
    db = tmp_path / "state" / "gateway.db"
    preload_cdrs(db, [(NEW, 77, "310")])
    conn = sqlite3.connect(db)
    with conn:
        conn.execute(
            "INSERT INTO cdrs(unique_id, ts_ms, iccid, usage, data, period_start_ns,"
            " period_end_ns) VALUES ('damaged', 1, ?, 5, '{\"Usage\": 5', 0, 0)",
            (NEW,),
        )
    conn.close()
    preload_cdrs(db, [(NEW, 88, "310")])
    cfg = report_config(tmp_path, mosquitto, receiver.url, every="24h")
    done = subprocess.run(
        gateway_cmd("cdr", "export", "-c", str(cfg), "--report", "Daily usage"),
        capture_output=True,
        text=True,
        cwd=ROOT,
        check=True,
    )
    assert "2 CDR(s)" in done.stdout
    assert "1 stored CDR(s) left out: their JSON is damaged" in done.stderr
    (zip_path,) = (tmp_path / "state" / "reports").glob("*.zip")
    assert [r["Usage"] for r in csv_rows(zip_path)] == ["77", "88"]

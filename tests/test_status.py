"""status.snapshot's modem, CDR and report parts, on a real store file."""

from __future__ import annotations

import json
import time
from pathlib import Path

from gateway import store as store_mod
from gateway.web import status


def store_conn(tmp_path: Path):  # type: ignore[no-untyped-def]
    conn = store_mod.connect(tmp_path / "gateway.db")
    store_mod.migrate(conn)
    return conn


def add_snapshot(conn, ts_ns: int, tx: int | None, rx: int | None, source: str = "qgdcnt") -> None:  # type: ignore[no-untyped-def]
    data = {
        "iccid": "8981100000000000012",
        "tx_bytes": tx,
        "rx_bytes": rx,
        "counter_source": source,
    }
    conn.execute(
        "INSERT INTO modem_snapshots(ts_ns, state, data) VALUES (?, 'ok', ?)",
        (ts_ns, json.dumps(data)),
    )


def test_bytes_today_counts_from_the_last_reading_before_midnight_across_a_reset(
    tmp_path: Path,
) -> None:
    conn = store_conn(tmp_path)
    now = time.time_ns()
    midnight = status.local_midnight_ns(now)
    hour = 3600 * 10**9
    add_snapshot(conn, midnight - 2 * hour, 100, 100)
    add_snapshot(conn, midnight - hour, 400, 600)  # the baseline: 1000
    add_snapshot(conn, midnight + 1, 500, 700)  # +200
    add_snapshot(conn, midnight + 2, None, None)  # a failed counter read: skipped
    add_snapshot(conn, midnight + 3, 10, 20)  # the modem rebooted: +30 from zero
    add_snapshot(conn, midnight + 4, 50, 20)  # +40
    assert status.bytes_since(conn, midnight) == 270
    snap = status.snapshot(conn, None, now)
    assert snap["modem"]["configured"] is True
    assert snap["modem"]["bytes_today"] == 270
    assert snap["modem"]["info"]["tx_bytes"] == 50


def test_a_counter_source_change_starts_a_new_baseline_and_no_readings_mean_none(
    tmp_path: Path,
) -> None:
    conn = store_conn(tmp_path)
    midnight = status.local_midnight_ns(time.time_ns())
    assert status.bytes_since(conn, midnight) is None
    add_snapshot(conn, midnight + 1, 1000, 0, "qgdcnt")  # no reading before midnight: baseline
    add_snapshot(conn, midnight + 2, 1500, 0, "qgdcnt")  # +500
    add_snapshot(conn, midnight + 3, 90_000, 0, "sysfs")  # another counter: a new baseline
    add_snapshot(conn, midnight + 4, 90_100, 0, "sysfs")  # +100
    assert status.bytes_since(conn, midnight) == 600


def test_cdrs_and_reports_are_listed_newest_first_without_tokens(tmp_path: Path) -> None:
    conn = store_conn(tmp_path)
    now = time.time_ns()
    empty = status.snapshot(conn, None, now)
    assert empty["cdrs"] == {"count": 0, "latest": [], "emitted": 0, "pending_usage": 0}
    assert empty["reports"] == []
    assert empty["modem"]["configured"] is False
    for i in range(status.LATEST_CDRS + 5):
        conn.execute(
            "INSERT INTO cdrs(unique_id, ts_ms, iccid, usage, data, period_start_ns,"
            " period_end_ns) VALUES (?, ?, '8981100000000000012', ?, ?, 0, 0)",
            (f"CDR-{i:020d}", now // 10**6, i, json.dumps({"Usage": i})),
        )
    for name, until in (("a.zip", now - 1), ("b.zip", now + 10**9)):
        conn.execute(
            "INSERT INTO reports(name, task_id, token_sha256, file_name, path, period_start_ns,"
            " period_end_ns, created_ns, valid_until_ns) VALUES ('daily', 1, 'x', ?, '/r', 0, 0,"
            " ?, ?)",
            (name, now, until),
        )
    snap = status.snapshot(conn, None, now)
    assert snap["cdrs"]["count"] == status.LATEST_CDRS + 5
    assert len(snap["cdrs"]["latest"]) == status.LATEST_CDRS
    assert snap["cdrs"]["latest"][0]["unique_id"] == f"CDR-{status.LATEST_CDRS + 4:020d}"
    assert snap["cdrs"]["latest"][0]["data"] == {"Usage": status.LATEST_CDRS + 4}
    assert [(r["file_name"], r["expired"]) for r in snap["reports"]] == [
        ("b.zip", False),
        ("a.zip", True),
    ]
    assert "token" not in json.dumps(snap["reports"])

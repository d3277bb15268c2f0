"""Retention of CDRs, events, modem snapshots and reports (gateway.retention_days), and
their bytes counted toward max_buffer_mb: a real store in tmp_path, its writer thread
pruning between commits, and `gateway status` reading what it holds."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import time
from pathlib import Path

import orjson
import pytest
import sqlite_utils

from gateway import config
from gateway import store as st
from gateway.errors import ConfigError
from gateway.store import Incoming, Store, dead_letters, transaction
from gateway.store.retention import RETAINED_TABLES, RETENTION_ROWS, measure
from gateway.store.schema import MIGRATIONS
from gateway.web import status as status_mod
from tests.conftest import ROOT, gateway_cmd, wait_for, write_config

DAY_NS = 86400 * 10**9
ICCID = "8944100000000000001"


@pytest.fixture(autouse=True)
def quick_turns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The writer's turn for dead letters and retention comes every 50 ms, not 2 s."""
    monkeypatch.setattr(dead_letters, "DEAD_LETTER_TEND_S", 0.05)


def add_cdr(conn: sqlite3.Connection, ts_ns: int, n: int) -> None:
    data = orjson.dumps({"UniqueID": f"CDR-{n:08d}", "Iccid": ICCID, "Usage": 1000 + n}).decode()
    conn.execute(
        "INSERT INTO cdrs(unique_id, ts_ms, iccid, usage, data, period_start_ns, period_end_ns)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (f"CDR-{n:08d}", ts_ns // 1_000_000, ICCID, 1000 + n, data, ts_ns, ts_ns),
    )


def add_event(conn: sqlite3.Connection, ts_ns: int, n: int) -> None:
    conn.execute(
        "INSERT INTO events(ts_ns, kind, data) VALUES (?, 'sim_changed', ?)",
        (ts_ns, json.dumps({"n": n, "iccid": ICCID})),
    )


def add_snapshot(conn: sqlite3.Connection, ts_ns: int, size: int = 300) -> None:
    conn.execute(
        "INSERT INTO modem_snapshots(ts_ns, state, data) VALUES (?, 'ok', ?)",
        (ts_ns, json.dumps({"iccid": ICCID, "pad": "x" * size})),
    )


def add_report(conn: sqlite3.Connection, name: str, created_ns: int, path: Path, last: int) -> None:
    path.write_bytes(b"PK" + bytes(500))
    conn.execute(
        "INSERT INTO reports(name, task_id, token_sha256, file_name, path, size, lines,"
        " period_start_ns, period_end_ns, created_ns, valid_until_ns, first_cdr_id,"
        " last_cdr_id) VALUES (?, 1, ?, ?, ?, 502, 3, 0, ?, ?, ?, 1, ?)",
        (name, "ab" * 32, path.name, str(path), created_ns, created_ns, created_ns + DAY_NS, last),
    )


def route(conn: sqlite3.Connection, name: str, source: str, cursor: int) -> None:
    st.ensure_route(conn, name, source)
    conn.execute("UPDATE webhook_stats SET cursor = ? WHERE name = ?", (cursor, name))


def ids(store: Store, table: str) -> list[int]:
    return [r[0] for r in store.run_sync(lambda c: c.execute(f"SELECT id FROM {table}").fetchall())]


def measured(conn: sqlite3.Connection) -> dict[str, tuple[int, int]]:
    """Each retained table's rows and bytes, counted from scratch."""
    page = int(conn.execute("PRAGMA page_size").fetchone()[0])
    return {t: measure(conn, t, page) for t in RETAINED_TABLES}


def test_rows_past_retention_go_but_those_a_webhook_has_not_taken_stay(tmp_path: Path) -> None:
    """A CDR webhook has taken CDRs 1-6; an events webhook has taken events 1-4, of which
    3 and 4 wait in an open batch. Everything is 40 days old but the newest of each:
    retention (1 day) deletes CDRs 1-6, events 1-2 and the old snapshots, and the rest
    once the webhook takes them."""
    old, now = time.time_ns() - 40 * DAY_NS, time.time_ns()

    def fill(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            for n in range(1, 11):
                add_cdr(conn, old, n)
                add_event(conn, old, n)
                add_snapshot(conn, old)
            add_cdr(conn, now, 11)
            add_event(conn, now, 11)
            add_snapshot(conn, now)
            route(conn, "cdr-hook", "cdrs", 6)
            route(conn, "ev-hook", "events", 4)
            conn.execute(
                "INSERT INTO batches(id, route, source, item_ids, first_id, count, single,"
                " body, attempts, created_ns, next_at_ns) VALUES"
                " ('msg_a', 'ev-hook', 'events', NULL, 3, 2, 0, NULL, 0, ?, 0)",
                (now,),
            )

    with Store.open(tmp_path, retention_s=86400.0, retention_check_s=0.05) as store:
        store.run_sync(fill)
        store.set_consumers("cdrs", ["cdr-hook"])
        store.set_consumers("events", ["ev-hook"])
        wait_for(lambda: ids(store, "modem_snapshots") == [11], what="old snapshots pruned")
        wait_for(lambda: ids(store, "cdrs") == list(range(7, 12)), what="taken CDRs pruned")
        wait_for(lambda: ids(store, "events") == list(range(3, 12)), what="taken events pruned")
        c = store.run_sync(st.counters)
        assert c["retention_pruned_cdrs"] == 6
        assert c["retention_pruned_events"] == 2
        assert c["retention_pruned_modem_snapshots"] == 10
        assert store.run_sync(st.table_sizes) == store.run_sync(measured)

        # The webhook takes the rest, and its batch is delivered: they go at the next turn.
        store.run_sync(lambda conn: conn.execute("UPDATE webhook_stats SET cursor = 11"))
        store.run_sync(lambda conn: conn.execute("DELETE FROM batches"))
        wait_for(lambda: ids(store, "cdrs") == [11], what="the rest of the old CDRs pruned")
        wait_for(lambda: ids(store, "events") == [11], what="the rest of the old events pruned")
        assert store.run_sync(st.table_sizes) == store.run_sync(measured)
        assert store.retained_bytes == sum(b for _r, b in store.run_sync(measured).values())


def test_a_webhook_no_longer_configured_holds_nothing_back(tmp_path: Path) -> None:
    old = time.time_ns() - 40 * DAY_NS

    def fill(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            for n in range(1, 6):
                add_event(conn, old, n)
            route(conn, "removed", "events", 0)
            route(conn, "events-hook", "events", 5)

    with Store.open(tmp_path, retention_s=86400.0, retention_check_s=0.05) as store:
        store.run_sync(fill)
        time.sleep(0.3)  # turns of the writer: the unknown consumers keep everything
        assert len(ids(store, "events")) == 5
        store.set_consumers("events", ["events-hook"])
        wait_for(lambda: ids(store, "events") == [5], what="events pruned")
        # The newest stays: the next event gets the next id, one the webhook has not taken.
        assert store.run_sync(st.add_event, "broker_disconnected", {}) == 6


def test_old_reports_go_with_their_files_but_each_reports_newest_run_stays(
    tmp_path: Path,
) -> None:
    """The newest run of each report is where its next export starts; CDRs that report
    has not exported stay too, though no webhook reads CDRs."""
    files = tmp_path / "reports"
    files.mkdir()
    old = time.time_ns() - 40 * DAY_NS

    def fill(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            for n in range(1, 6):
                add_cdr(conn, old, n)
            for i in range(3):
                add_report(conn, "daily", old + i, files / f"tx{i:05d}.zip", last=i + 1)
            add_report(conn, "monthly", old, files / "tx00003.zip", last=5)

    with Store.open(
        tmp_path, retention_s=86400.0, retention_check_s=0.05, reports=("daily", "monthly")
    ) as store:
        store.run_sync(fill)
        wait_for(lambda: len(ids(store, "reports")) == 2, what="old reports pruned")
        names = store.run_sync(lambda c: c.execute("SELECT name, path FROM reports").fetchall())
        assert sorted(n for n, _ in names) == ["daily", "monthly"]
        assert sorted(p.name for p in files.iterdir()) == ["tx00002.zip", "tx00003.zip"]
        # "daily" exported CDRs up to 3 in its newest run: 4 and 5 wait for its next.
        wait_for(lambda: ids(store, "cdrs") == [4, 5], what="exported CDRs pruned")
        assert store.run_sync(st.table_sizes) == store.run_sync(measured)
        assert store.run_sync(st.counters)["retention_pruned_reports"] == 2


def test_a_long_backlog_is_pruned_in_chunks_while_packets_keep_committing(
    tmp_path: Path,
) -> None:
    n = 3 * RETENTION_ROWS + 17
    old = time.time_ns() - 40 * DAY_NS

    def fill(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            for i in range(n):
                add_event(conn, old, i)

    committed: list[bytes] = []
    with Store.open(tmp_path, retention_s=0.0, retention_check_s=0.05) as store:
        store.on_committed = lambda ps: committed.extend(p.payload for p in ps)
        store.run_sync(fill)
        store.retention_s = 86400.0
        for i in range(20):
            store.submit_packet(Incoming("devices/x/up", f"p{i}".encode(), "", i + 1, False, 1))
            time.sleep(0.01)
        # All but the newest, which keeps the next event from taking its id again.
        wait_for(lambda: ids(store, "events") == [n], what="every old event pruned")
        wait_for(lambda: len(committed) == 20, what="20 packets committed")
        assert store.run_sync(st.counters)["retention_pruned_events"] == n - 1
        assert store.run_sync(st.table_sizes)["events"][0] == 1


def test_retained_tables_count_toward_the_buffer_and_retention_frees_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """With 40 KB of modem snapshots in a 60 KB buffer, only about 20 KB of packets are
    taken (on_full = backpressure: the rest stay unacknowledged), and the log says what
    to change; once retention deletes the old snapshots, the held packets are committed."""
    old = time.time_ns() - 40 * DAY_NS

    def fill(conn: sqlite3.Connection) -> None:
        with transaction(conn):
            for _ in range(40):
                add_snapshot(conn, old, size=950)

    committed: list[bytes] = []
    with Store.open(
        tmp_path, max_buffer_bytes=60_000, retention_s=0.0, retention_check_s=0.05
    ) as store:
        store.on_committed = lambda ps: committed.extend(p.payload for p in ps)
        store.run_sync(fill)
        wait_for(lambda: store.retained_bytes > 40_000, what="the snapshots' bytes read")
        snap = status_mod.read(tmp_path / "gateway.db")
        assert snap["tables"]["modem_snapshots"]["rows"] == 40
        assert snap["buffer"]["retained_bytes"] == store.retained_bytes
        for i in range(30):
            store.submit_packet(Incoming("devices/x/up", bytes(1000), "", i + 1, False, 1))
        wait_for(lambda: committed, what="the packets that fit")
        time.sleep(0.3)  # turns of the writer: the rest stay held
        assert 10 <= len(committed) < 30
        assert store.used_bytes + 1000 > store.max_buffer_bytes  # the next does not fit
        assert "raise max_buffer_mb or lower gateway.retention_days" in caplog.text
        store.retention_s = 86400.0
        wait_for(lambda: len(committed) == 30, what="held packets committed once freed")
        assert store.run_sync(st.table_sizes)["modem_snapshots"] == (0, 0)
        # What is left is the buffer_high and buffer_ok events this recorded.
        assert store.retained_bytes == store.run_sync(st.table_sizes)["events"][1] < 1000


def test_retention_days_is_checked_and_defaults_to_35(tmp_path: Path) -> None:
    base = {"mqtt": {"host": "127.0.0.1"}, "gateway": {"state_dir": str(tmp_path)}}
    assert config.parse(base).gateway.retention_days == 35
    for bad, why in (
        (0, "must be at least 1"),
        ("30d", "must be a number"),
        (5000, "must be at most 3650"),
    ):
        with pytest.raises(ConfigError) as err:
            config.parse({**base, "gateway": {"state_dir": str(tmp_path), "retention_days": bad}})
        assert f"gateway.retention_days: {why}" in str(err.value)


def test_an_upgraded_store_counts_its_tables_and_status_shows_them(tmp_path: Path) -> None:
    """Schema 12 counts what a store of schema 11 holds; `gateway status` (text and
    JSON) shows each table's rows and bytes."""
    state = tmp_path / "state"
    state.mkdir()
    conn = st.connect(state / "gateway.db")
    sdb = sqlite_utils.Database(conn)
    for v in range(1, 12):
        with transaction(conn):
            MIGRATIONS[v](sdb)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(v),))
    now = time.time_ns()
    with transaction(conn):
        for n in range(1, 8):
            add_cdr(conn, now, n)
            add_event(conn, now, n)
        for _ in range(3):
            add_snapshot(conn, now)
    conn.close()
    with Store.open(state) as store:
        sizes = store.run_sync(st.table_sizes)
        assert sizes == store.run_sync(measured)
        assert sizes["cdrs"][0] == 7
        assert sizes["modem_snapshots"][0] == 3
    cfg = write_config(tmp_path / "gw.toml", 1883, state)
    out = subprocess.run(
        gateway_cmd("status", "-c", str(cfg), "--json"),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    snap = json.loads(out.stdout)
    assert snap["tables"]["cdrs"] == {"rows": 7, "bytes": sizes["cdrs"][1]}
    assert snap["tables"]["events"]["rows"] == 7
    assert snap["retention"] == {
        "days": 35.0,
        "pruned": {"cdrs": 0, "events": 0, "modem_snapshots": 0, "reports": 0},
    }
    text = subprocess.run(
        gateway_cmd("status", "-c", str(cfg)),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    line = next(x for x in text.splitlines() if x.startswith("tables"))
    assert "cdrs=7 (" in line
    assert "modem_snapshots=3 (" in line

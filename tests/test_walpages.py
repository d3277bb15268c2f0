"""bench/walpages.py's reading of a WAL: the figures it prints rest on these."""

from __future__ import annotations

import shutil
import sqlite3
import sys
from pathlib import Path

from tests.conftest import ROOT

sys.path.insert(0, str(ROOT / "bench"))
import walpages


def test_each_commit_after_the_mark_is_read_and_its_pages_named_by_table(tmp_path: Path) -> None:
    """A real SQLite WAL (1 KiB pages, no checkpoint): a commit made before the mark is
    left out, every later one is found, and its pages are put down to the tables it
    changed: packet rows to `packets`, the counter to `counters`."""
    db = tmp_path / "gateway.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA page_size = 1024")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute(
        "CREATE TABLE packets_a (id INTEGER PRIMARY KEY, recv_ns INTEGER NOT NULL,"
        " sender INTEGER NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)"
    )
    conn.execute("CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER)")
    wal = tmp_path / "gateway.db-wal"
    since = (wal.read_bytes()[: walpages.WAL_HEADER], wal.stat().st_size)
    payload = b"x" * 71
    for c in range(5):
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(
            "INSERT INTO packets_a(recv_ns, sender, payload, size) VALUES (?, 1, ?, 71)",
            [(10**18 + c * 100 + i, payload) for i in range(30)],
        )
        conn.execute(
            "INSERT INTO counters VALUES ('received', 30)"
            " ON CONFLICT(name) DO UPDATE SET value = value + 30"
        )
        conn.execute("COMMIT")
    copy = tmp_path / "copy"
    copy.mkdir()
    shutil.copy(db, copy / "gateway.db")
    shutil.copy(wal, copy / "gateway.db-wal")  # the connection is still open: not checkpointed
    conn.close()

    page_size, restarted, commits = walpages.read_wal(copy / "gateway.db-wal", since)
    assert (page_size, restarted, len(commits)) == (1024, False, 5)
    view = sqlite3.connect(copy / "gateway.db")
    owners = {int(p): str(n) for n, p in view.execute("SELECT name, pageno FROM dbstat")}
    signatures = walpages.table_signatures(view)
    view.close()
    for frames in commits:
        kinds = [walpages.classify(pgno, page, owners, signatures) for pgno, page in frames]
        assert "counters" in kinds
        # 30 rows of about 95 bytes: two or three leaves of 1 KiB, and the interior page
        # above them once there is more than one.
        assert 2 <= kinds.count("packets") <= 4, kinds
        # (the counter's index entry only when the row is added, in the first commit)
        named = {"packets", "packets interior", "counters", "page 1"}
        assert set(kinds) <= named | {"index sqlite_autoindex_counters_1"}, kinds


def test_the_mark_is_where_a_restarted_wal_ends_not_the_size_of_its_file(tmp_path: Path) -> None:
    """After a checkpoint SQLite writes the WAL from its start again, and the file keeps
    the size it reached: the mark taken then (wal_end) is the end of the new round's
    frames, so the commits after it are found (with the file's size, none were)."""
    db = tmp_path / "gateway.db"
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("PRAGMA page_size = 1024")
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    conn.execute("CREATE TABLE t (id INTEGER PRIMARY KEY, body BLOB)")
    for _ in range(20):
        conn.execute("INSERT INTO t(body) VALUES (?)", (b"x" * 900,))
    conn.execute("PRAGMA wal_checkpoint(RESTART)")
    conn.execute("INSERT INTO t(body) VALUES (?)", (b"y" * 900,))  # the WAL starts over
    wal = tmp_path / "gateway.db-wal"
    data = wal.read_bytes()
    end = walpages.wal_end(data)
    assert walpages.WAL_HEADER < end < len(data)
    since = (data[: walpages.WAL_HEADER], end)
    for _ in range(3):
        conn.execute("INSERT INTO t(body) VALUES (?)", (b"z" * 900,))
    copy = tmp_path / "copy-wal"
    shutil.copy(wal, copy)
    conn.close()
    _page_size, restarted, commits = walpages.read_wal(copy, since)
    assert (restarted, len(commits)) == (False, 3)
    _page_size, _restarted, by_size = walpages.read_wal(copy, (since[0], len(data)))
    assert by_size == []

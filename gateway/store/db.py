"""Connections to the store's SQLite file: pragmas, transactions, the `meta` rows, and
read-only readers for worker threads.

A connection that writes uses `synchronous=FULL`: a commit is on disk before the ingest
is told to acknowledge its packets.

The store holds payloads and dead letters in clear: its directory is made 0700 and its
files 0600 whatever the umask of whoever opens it first.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson

from gateway.errors import StoreError

T = TypeVar("T")

# Bytes per database page for a new store (an existing one keeps its own).
PAGE_SIZE = 1024

# The writer copies the WAL into the database file once it holds this many pages (about
# 20 MB; SQLite's default is 1,000). A checkpoint writes each page once, however often
# the WAL changed it since the last one, and the packet tables' pages are freed and used
# again every second or two at 1,000 packets/s: at 1,000/s monoZ, 10,000 pages made 341
# disk bytes per packet against 383 with the default. What a checkpoint writes is then
# nearly all `inflight`, whose pages each packet id's turn changes once every 65,536
# packets: 20,000 pages (about 110,000 packets at 1,000/s) write them about half as often
# as 10,000, 226 disk bytes per packet against 239 over 300,000 packets. The WAL file
# keeps the size it reached.
WAL_CHECKPOINT_PAGES = 20_000

FILE_MODE = 0o600
DIR_MODE = 0o700
# SQLite's files beside the database; it makes them with the database file's mode.
SIDE_FILES = ("-wal", "-shm", "-journal")


def private_dir(path: Path) -> None:
    """Make `path` (and missing parents) with mode 0700 for the directories it makes; an
    existing directory keeps its mode (systemd's StateDirectoryMode= sets the service's)."""
    missing = []
    p = path
    while not p.exists() and p != p.parent:
        missing.append(p)
        p = p.parent
    path.mkdir(parents=True, exist_ok=True)
    for made in missing:
        # mkdir(mode=) is cut by the umask; chmod is not.
        made.chmod(DIR_MODE)


def private_file(path: Path) -> None:
    """Create `path` empty with mode 0600 if it is missing; take group and other bits off
    an existing one (a store made under a umask of 022 was 0644)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, FILE_MODE)
    except FileExistsError:
        st = path.stat()
        if st.st_mode & 0o077 and st.st_uid == os.geteuid():
            path.chmod(st.st_mode & 0o700)
        return
    try:
        os.fchmod(fd, FILE_MODE)
    finally:
        os.close(fd)


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the store's pragmas (WAL, busy timeout)."""
    try:
        if readonly:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            private_dir(path.parent)
            # SQLite gives -wal and -shm the database file's mode: 0600 for the lot.
            for name in (path, *(path.with_name(path.name + s) for s in SIDE_FILES)):
                if name == path or name.exists():
                    private_file(name)
            conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA busy_timeout = 10000")
        if not readonly:
            # Small pages for a new database: a commit writes whole pages to the WAL, and
            # the typical commit (one packet, its counters) changes a few hundred bytes.
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            # Debian's SQLite is built with secure_delete on: every page freed by
            # delivered packets would be zeroed and written twice more (WAL, then the
            # checkpoint). FAST still zeroes what is deleted inside pages it writes anyway.
            conn.execute("PRAGMA secure_delete = FAST")
            conn.execute(f"PRAGMA wal_autocheckpoint = {WAL_CHECKPOINT_PAGES}")
    except (sqlite3.Error, OSError) as exc:
        raise StoreError(f"cannot open store {path}: {exc}") from exc
    return conn


def scalar(conn: sqlite3.Connection, sql: str, args: Sequence[Any] = ()) -> int:
    """The first column of the first row as an int, 0 when there is none or it is NULL."""
    row = conn.execute(sql, args).fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def get_meta(conn: sqlite3.Connection, key: str, default: str = "") -> str:
    row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return str(row[0]) if row else default


def set_meta(conn: sqlite3.Connection, key: str, value: str) -> None:
    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))


@contextlib.contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE … COMMIT, rolled back on any error.

    Inside a transaction already open (the writer's group commit) it is a savepoint: on
    error only its own changes are rolled back, and they commit with the group."""
    rollback: tuple[str, ...]
    if conn.in_transaction:
        begin, commit, rollback = (
            "SAVEPOINT nested",
            "RELEASE nested",
            ("ROLLBACK TO nested", "RELEASE nested"),
        )
    else:
        begin, commit, rollback = "BEGIN IMMEDIATE", "COMMIT", ("ROLLBACK",)
    conn.execute(begin)
    try:
        yield conn
        conn.execute(commit)
    except BaseException:
        # SQLITE_FULL and I/O errors may have rolled the transaction back already; a
        # failing ROLLBACK must not replace the error that says what went wrong.
        if conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                for sql in rollback:
                    conn.execute(sql)
        raise


def dumps(value: Any) -> str:
    """Compact JSON text (for JSON columns)."""
    return orjson.dumps(value).decode()


class Reader:
    """A read-only connection to the store, used from worker threads one call at a time.

    Its reads never queue behind the writer's commits (each an fsync), as a `Store.call`
    does: the web interface's queries, and delivery's fetches of new records, which
    otherwise wait out a commit or two each at high rates. In WAL mode a read sees every
    transaction committed before it began."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(conn, *args) on the calling thread (never the event loop), in one read
        transaction so that all its queries see the same state of the store."""
        with self._lock:
            if self._conn is None:
                self._conn = connect(self.path, readonly=True)
            self._conn.execute("BEGIN")
            try:
                return fn(self._conn, *args)
            finally:
                if self._conn.in_transaction:
                    self._conn.execute("COMMIT")

    async def run(self, fn: Callable[..., T], *args: Any) -> T:
        """fn(conn, *args) in a worker thread."""
        return await asyncio.to_thread(self.run_sync, fn, *args)

    def close(self) -> None:
        """Close the connection; idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

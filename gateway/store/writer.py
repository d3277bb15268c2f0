"""SQLite store: schema, one writer thread with group commit, cursors, retries, dead letters.

Every write goes through one thread (`Store.call`, `Store.submit_packet`), so SQLite never
sees two writers and the asyncio loop never blocks on disk. Packets are committed with
`synchronous=FULL` before the ingest is told to acknowledge them; bookkeeping writes use
`NORMAL` (a power cut can only make them redo work, i.e. resend, never lose a packet).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import hashlib
import logging
import os
import queue
import sqlite3
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import orjson
import sqlite_utils

from gateway import sdnotify
from gateway.errors import StoreError

log = logging.getLogger("gateway.store")
T = TypeVar("T")

SCHEMA_VERSION = 11

COUNTERS = (
    "packets_received",
    "packets_redelivered",
    "packets_too_large",
    "packets_dropped",
    "packets_delivered",
    "packets_dead",
    "decode_failed",
    "cdrs_emitted",
    "events_recorded",
    "dead_letters_evicted",
)
KEEP_EVENTS = 10_000
# A row of `counters`, not a counter: packets with a higher id are received but not yet
# added to packets_received, and no packet id at or below it is handed out again.
COUNTED = "_packets_counted"
# Also a row of `counters`: every packet with an id at or below it has been delivered
# (or dead-lettered) wherever it had to go. Such rows may stay on disk for a while (see
# PACKET_TABLES), and nothing reads them.
RELEASED = "_packets_released"
# Packets live in two tables, each holding one range of ids. New packets go to one; once
# every packet in the other is released, that table is emptied whole (DELETE without
# WHERE), which frees its pages without writing them. Deleting delivered packets row by
# row changed every page before it was freed, and each changed page is written twice
# (WAL, checkpoint): a quarter of the WAL at 1,000 packets/s. The `packets` view shows
# both tables' unreleased rows, for people and tests; the gateway reads the tables.
PACKET_TABLES = ("packets_a", "packets_b")

# A broker redelivers (DUP=1) the packets whose PUBACK it had not had when a connection
# ended. PUBACKs go after the commit, in commit order, so those had their rows among the
# session's latest: the packets committed while their PUBACKs waited for the MQTT
# thread (at most max_pending and a commit's worth: it hands over no more while they
# wait), and those whose PUBACK was on its way, no more than the broker sends ahead
# (the Receive Maximum, when the broker keeps to it: mosquitto 2.0.11 does only for a
# connection's first packets). That many of a session's last rows are its redelivery
# window. A packet row keeps its packet id and epoch (schema 10), a delivered table
# holding one of the window's rows is not emptied (it is "pinned"), and `inflight` is
# written for the rest only: a recognised redelivery again, a packet too large to
# store, and the window's rows of a table that stayed pinned for PIN_WAIT_S (then
# emptied, which at a few packets a second is the usual way).
PIN_WAIT_S = 60.0
# A row of `meta`: the highest connection epoch of a committed packet (Store.last_epoch).
LAST_EPOCH = "last_epoch"

# Dead letters are bounded (gateway.dead_letter_max_mb and dead_letter_max_age) and count
# toward gateway.max_buffer_mb. A row of `counters`, not a counter: the bytes the dead
# letters hold (DEAD_LETTER_BYTES of each row), kept by triggers (schema 11) so that
# every writer, `gateway dlq` in a process of its own too, keeps it exact without a
# scan of the table.
DEAD_BYTES = "_dead_letter_bytes"
# What a dead letter counts for: its body, excerpt and topic, and about as much again
# for its other columns and its share of a page.
DEAD_LETTER_BYTES = (
    "(COALESCE(length({0}.body), 0) + COALESCE(length(CAST({0}.excerpt AS BLOB)), 0)"
    " + COALESCE(length(CAST({0}.topic AS BLOB)), 0) + 64)"
)
# An oversize packet's dead letter keeps this much of its payload (with its size and
# SHA-256): enough to see what sent it, while a flood of huge packets stays small.
DEAD_LETTER_PREFIX_BYTES = 1024
# The writer looks at the dead letters' limits this often, not in the packet commits.
DEAD_LETTER_TEND_S = 2.0
# At most this many dead letters are evicted per transaction; more wait for the writer's
# next turn, so that packets commit in between.
DEAD_LETTER_EVICT_ROWS = 1000


@dataclass(slots=True)
class Incoming:
    """A packet as handed over by the MQTT thread, not yet committed."""

    topic: str
    payload: bytes
    iccid: str
    mid: int
    dup: bool
    epoch: int
    recv_ns: int = field(default_factory=time.time_ns)
    too_large: bool = False
    # Which MQTT session it came on: 0 is mqtt.client_id (the only one unless
    # mqtt.ingest_processes > 1), n is its ingest process n. Packet ids are per session.
    source: int = 0
    # Set by the writer: "stored", "redelivery", "too_large" or "dropped".
    outcome: str = ""

    @property
    def inflight_key(self) -> int:
        """The `inflight` row of its packet id: the session in the bits above the 16 of a
        packet id, so that session 0 keeps the keys of stores from before sessions."""
        return self.source << 16 | self.mid

    def digest(self) -> bytes:
        return digest_of(self.topic, self.payload)


def digest_of(topic: str, payload: bytes) -> bytes:
    """What `inflight` keeps of a packet: the first 8 bytes of a 16-byte BLAKE2b of topic
    and payload. Until 8 bytes less per packet mattered it kept all 16; such a row is
    compared by its first 8, so a redelivery across the upgrade is still known."""
    h = hashlib.blake2b(topic.encode(), digest_size=16)
    h.update(b"\0")
    h.update(payload)
    return h.digest()[:8]


@dataclass(frozen=True, slots=True)
class PacketRow:
    id: int
    recv_ns: int
    topic: str
    iccid: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    """A request-to-be: its webhook-id is fixed when it is created and kept across retries."""

    id: str
    route: str
    item_ids: tuple[int, ...]
    single: bool
    body: bytes | None
    attempts: int
    created_ns: int
    next_at_ns: int
    count: int = 0  # records in the batch
    retry_delay_ns: int = 0  # the delay that set next_at_ns (0: none or not known)
    seq: int = 0  # its row in `batches` once stored (0: not stored yet)


# Why a record was dead-lettered on its own, before any request: its webhook's filter
# failed on it, its format cannot hold it, or its stored row is damaged. Each is counted
# as `rejected_<reason>`; packets too large to store are counted as packets_too_large.
REJECT_REASONS = ("unfilterable", "unencodable", "undecodable")


@dataclass(frozen=True, slots=True)
class Reject:
    """A record dead-lettered on its own: its webhook-id, why, and the body kept for it
    (the record in a form that always encodes, see Source.fallback)."""

    webhook_id: str
    reason: str
    error: str
    body: bytes
    topic: str | None = None
    iccid: str | None = None
    recv_ns: int | None = None


def _table(db: sqlite_utils.Database, name: str) -> sqlite_utils.db.Table:
    return sqlite_utils.db.Table(db, name)


def _migrate_v1(db: sqlite_utils.Database) -> None:
    _table(db, "meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    # AUTOINCREMENT: an emptied table must never hand out an id below a route's cursor.
    db.execute(
        "CREATE TABLE IF NOT EXISTS packets (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " recv_ns INTEGER NOT NULL, topic TEXT NOT NULL, iccid TEXT NOT NULL DEFAULT '',"
        " payload BLOB NOT NULL, size INTEGER NOT NULL)"
    )
    # The latest committed packet per MQTT packet id, to recognise a broker redelivery
    # (DUP=1) of a packet whose PUBACK may have been lost. At most 65535 rows.
    _table(db, "inflight").create(
        {"mid": int, "digest": bytes, "epoch": int}, pk="mid", if_not_exists=True
    )
    _table(db, "counters").create({"name": str, "value": int}, pk="name", if_not_exists=True)
    _table(db, "routes").create(
        {"name": str, "source": str, "cursor": int}, pk="name", if_not_exists=True
    )
    _table(db, "batches").create(
        {
            "id": str,
            "route": str,
            "source": str,
            "item_ids": str,
            "first_id": int,
            "count": int,
            "single": int,
            "body": bytes,
            "attempts": int,
            "created_ns": int,
            "next_at_ns": int,
        },
        pk="id",
        if_not_exists=True,
    )
    _table(db, "batches").create_index(["route"], if_not_exists=True)
    db.execute(
        "CREATE TABLE IF NOT EXISTS dead_letters (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " webhook TEXT NOT NULL, source TEXT NOT NULL, webhook_id TEXT NOT NULL, body BLOB,"
        " count INTEGER NOT NULL, single INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL,"
        " status INTEGER, excerpt TEXT, attempts INTEGER NOT NULL DEFAULT 0,"
        " created_ns INTEGER NOT NULL, topic TEXT, iccid TEXT, recv_ns INTEGER)"
    )
    _table(db, "webhook_stats").create(
        {
            "name": str,
            "hits": int,
            "requests_ok": int,
            "requests_failed": int,
            "retried": int,
            "delivered": int,
            "dead": int,
            "last_hit_ns": int,
            "last_success_ns": int,
            "last_error_ns": int,
            "last_error_status": int,
            "last_error": str,
            "disabled": int,
            "disabled_reason": str,
        },
        pk="name",
        if_not_exists=True,
    )
    _table(db, "events").create(
        {"id": int, "ts_ns": int, "kind": str, "data": str}, pk="id", if_not_exists=True
    )
    # Modem readings (identity, signal, registration, byte counters) as JSON, newest last.
    _table(db, "modem_snapshots").create(
        {"id": int, "ts_ns": int, "state": str, "data": str}, pk="id", if_not_exists=True
    )


def _migrate_v2(db: sqlite_utils.Database) -> None:
    # Usage CDRs, one row per record; `data` is the Monogoto record exactly as delivered.
    db.execute(
        "CREATE TABLE IF NOT EXISTS cdrs (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " unique_id TEXT NOT NULL UNIQUE, ts_ms INTEGER NOT NULL, iccid TEXT NOT NULL,"
        " usage INTEGER NOT NULL, data TEXT NOT NULL, period_start_ns INTEGER NOT NULL,"
        " period_end_ns INTEGER NOT NULL)"
    )
    _table(db, "cdrs").create_index(["ts_ms"], if_not_exists=True)
    # The CDR builder's memory: last counter reading and usage not yet in a CDR (one row).
    _table(db, "cdr_state").create(
        {
            "id": int,
            "iccid": str,
            "counter_source": str,
            "tx_bytes": int,
            "rx_bytes": int,
            "pending": int,
            "period_start_ns": int,
            "identity": str,
        },
        pk="id",
        if_not_exists=True,
    )
    # CDR report exports; the download token is kept only as its SHA-256.
    db.execute(
        "CREATE TABLE IF NOT EXISTS reports (id INTEGER PRIMARY KEY AUTOINCREMENT,"
        " name TEXT NOT NULL, task_id INTEGER NOT NULL, token_sha256 TEXT NOT NULL,"
        " file_name TEXT NOT NULL, path TEXT NOT NULL, size INTEGER NOT NULL DEFAULT 0,"
        " lines INTEGER NOT NULL DEFAULT 0, period_start_ns INTEGER NOT NULL,"
        " period_end_ns INTEGER NOT NULL, created_ns INTEGER NOT NULL,"
        " valid_until_ns INTEGER NOT NULL, error TEXT NOT NULL DEFAULT '',"
        " first_cdr_id INTEGER NOT NULL DEFAULT 0,"
        " last_cdr_id INTEGER NOT NULL DEFAULT 0)"
    )
    _table(db, "reports").create_index(["token_sha256"], if_not_exists=True)


def _migrate_v3(db: sqlite_utils.Database) -> None:
    # The delay chosen after a failed attempt (backoff or Retry-After), beside the
    # wall-clock time it ends (next_at_ns): after a restart a retry waits at most this
    # long, however far the clock was set back meanwhile. 0: not known (older rows).
    db.execute("ALTER TABLE batches ADD COLUMN retry_delay_ns INTEGER NOT NULL DEFAULT 0")


def _migrate_v4(db: sqlite_utils.Database) -> None:
    # packets without AUTOINCREMENT: its sqlite_sequence row was one more page in every
    # packet commit. Ids are handed out by _commit_packets instead (see next_packet_row);
    # the old sequence becomes the `_packets_counted` mark, where it carries on.
    row = db.execute("SELECT seq FROM sqlite_sequence WHERE name = 'packets'").fetchone()
    seq = int(row[0]) if row else 0
    db.execute(
        "CREATE TABLE packets_v4 (id INTEGER PRIMARY KEY, recv_ns INTEGER NOT NULL,"
        " topic TEXT NOT NULL, iccid TEXT NOT NULL DEFAULT '', payload BLOB NOT NULL,"
        " size INTEGER NOT NULL)"
    )
    db.execute(
        "INSERT INTO packets_v4 SELECT id, recv_ns, topic, iccid, payload, size FROM packets"
    )
    db.execute("DROP TABLE packets")
    db.execute("ALTER TABLE packets_v4 RENAME TO packets")
    db.execute("DELETE FROM sqlite_sequence WHERE name = 'packets'")
    # Every packet so far is in packets_received already.
    top = db.execute("SELECT COALESCE(MAX(id), 0) FROM packets").fetchone()[0]
    db.execute(
        "INSERT OR REPLACE INTO counters(name, value) VALUES (?, ?)",
        (COUNTED, max(seq, int(top))),
    )


def _migrate_v5(db: sqlite_utils.Database) -> None:
    # A packet's topic and ICCID once per sender, not in every packet row: about 50
    # bytes less per row for a topic like devices/<ICCID>/up, and each row is written
    # twice (to the WAL, then by the checkpoint).
    db.execute(
        "CREATE TABLE senders (id INTEGER PRIMARY KEY, topic TEXT NOT NULL,"
        " iccid TEXT NOT NULL, UNIQUE (topic, iccid))"
    )
    db.execute("INSERT INTO senders(topic, iccid) SELECT DISTINCT topic, iccid FROM packets")
    db.execute(
        "CREATE TABLE packets_v5 (id INTEGER PRIMARY KEY, recv_ns INTEGER NOT NULL,"
        " sender INTEGER NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)"
    )
    db.execute(
        "INSERT INTO packets_v5 SELECT p.id, p.recv_ns, s.id, p.payload, p.size"
        " FROM packets p JOIN senders s ON s.topic = p.topic AND s.iccid = p.iccid"
    )
    db.execute("DROP TABLE packets")
    db.execute("ALTER TABLE packets_v5 RENAME TO packets")


def _migrate_v6(db: sqlite_utils.Database) -> None:
    # `batches` keyed by a row number, with no index: a batch is found by its row
    # (Batch.seq), and the table holds a few dozen rows. Its TEXT primary key and
    # `route` index were two more b-trees in every commit that made or finished a batch,
    # with each new webhook-id at a random place in the first: about 2 of the 20 pages
    # of such a commit at 1,000 packets/s.
    db.execute(
        "CREATE TABLE batches_v6 (seq INTEGER PRIMARY KEY, id TEXT, route TEXT,"
        " source TEXT, item_ids TEXT, first_id INTEGER, count INTEGER, single INTEGER,"
        " body BLOB, attempts INTEGER, created_ns INTEGER, next_at_ns INTEGER,"
        " retry_delay_ns INTEGER NOT NULL DEFAULT 0)"
    )
    db.execute(
        "INSERT INTO batches_v6(id, route, source, item_ids, first_id, count, single, body,"
        " attempts, created_ns, next_at_ns, retry_delay_ns) SELECT id, route, source,"
        " item_ids, first_id, count, single, body, attempts, created_ns, next_at_ns,"
        " retry_delay_ns FROM batches ORDER BY rowid"
    )
    db.execute("DROP TABLE batches")
    db.execute("ALTER TABLE batches_v6 RENAME TO batches")


_PACKETS_VIEW = "CREATE VIEW packets AS " + " UNION ALL ".join(
    f"SELECT * FROM {t} WHERE id > "
    f"(SELECT COALESCE(MAX(value), 0) FROM counters WHERE name = '{RELEASED}')"
    for t in PACKET_TABLES
)


def _migrate_v7(db: sqlite_utils.Database) -> None:
    # Two packet tables, emptied whole in turn (see PACKET_TABLES). The rows stay where
    # they are: no packet in the old table is released yet, so no mark is needed.
    db.execute(f"ALTER TABLE packets RENAME TO {PACKET_TABLES[0]}")
    db.execute(
        f"CREATE TABLE {PACKET_TABLES[1]} (id INTEGER PRIMARY KEY, recv_ns INTEGER NOT NULL,"
        " sender INTEGER NOT NULL, payload BLOB NOT NULL, size INTEGER NOT NULL)"
    )
    db.execute(_PACKETS_VIEW)


def _migrate_v8(db: sqlite_utils.Database) -> None:
    # Nothing to change: from schema 8 on, a batch of consecutive ids keeps them as
    # first_id and count with item_ids NULL (see batch_item_ids), which an older gateway
    # would read as a batch of no records. The version keeps it from opening the store.
    del db


_STATS_COLUMNS = "name, hits, requests_ok, requests_failed, retried, delivered, dead, disabled"
_ZEROS = "0, 0, 0, 0, 0, 0, 0"
# A route: a webhook's source and cursor (schema 9 on; a table of its own before).
_ROUTES_VIEW = (
    "CREATE VIEW routes AS SELECT name, source, cursor FROM webhook_stats WHERE source IS NOT NULL"
)


def _migrate_v9(db: sqlite_utils.Database) -> None:
    # A webhook's source and cursor move into its webhook_stats row, and `routes` is a
    # view of them: a take moved the cursor and counted the hits, and so wrote a page
    # of each table, about one page in 20 of a commit at 1,000 packets/s. An older
    # gateway cannot write through the view; the version keeps it from opening the store.
    db.execute("ALTER TABLE webhook_stats ADD COLUMN source TEXT")
    db.execute("ALTER TABLE webhook_stats ADD COLUMN cursor INTEGER NOT NULL DEFAULT 0")
    db.execute(
        f"INSERT OR IGNORE INTO webhook_stats({_STATS_COLUMNS}) SELECT name, {_ZEROS} FROM routes"
    )
    db.execute(
        "UPDATE webhook_stats SET source = r.source, cursor = r.cursor"
        " FROM routes AS r WHERE r.name = webhook_stats.name"
    )
    db.execute("DROP TABLE routes")
    db.execute(_ROUTES_VIEW)


def _migrate_v10(db: sqlite_utils.Database) -> None:
    # A packet row keeps its MQTT packet id (Incoming.inflight_key) and connection epoch,
    # and `inflight` is written only for what has no row to look at (see PIN_WAIT_S):
    # writing it for every packet was about 42 disk bytes a packet, its pages changed
    # once per packet id's turn and written again by every checkpoint. Its rows so far
    # count as written at the highest packet id (a new column's constant default costs
    # no page writes): they stay in the sessions' redelivery windows until as many new
    # packets have come.
    for t in PACKET_TABLES:
        db.execute(f"ALTER TABLE {t} ADD COLUMN mid INTEGER")
        db.execute(f"ALTER TABLE {t} ADD COLUMN epoch INTEGER")
    top = max(
        int(db.execute(f"SELECT COALESCE(MAX(id), 0) FROM {t}").fetchone()[0])
        for t in PACKET_TABLES
    )
    db.execute(f"ALTER TABLE inflight ADD COLUMN at_id INTEGER NOT NULL DEFAULT {top}")
    epoch = int(db.execute("SELECT COALESCE(MAX(epoch), 0) FROM inflight").fetchone()[0])
    db.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (LAST_EPOCH, str(epoch)))


def _migrate_v11(db: sqlite_utils.Database) -> None:
    # An oversize packet's dead letter keeps a prefix of its payload in `body`, its size
    # and SHA-256 (hex) in these columns; older rows, NULL in both, keep the whole body.
    # New columns with no default rewrite no page of the rows already there.
    db.execute("ALTER TABLE dead_letters ADD COLUMN size INTEGER")
    db.execute("ALTER TABLE dead_letters ADD COLUMN sha256 TEXT")
    # The bytes dead letters hold (DEAD_BYTES), counted once here and then kept by every
    # INSERT and DELETE (dead letters are never updated).
    db.execute(
        "INSERT OR REPLACE INTO counters(name, value)"
        f" SELECT ?, COALESCE(SUM({DEAD_LETTER_BYTES.format('dead_letters')}), 0)"
        " FROM dead_letters",
        (DEAD_BYTES,),
    )
    for event, row, sign in (("INSERT", "NEW", "+"), ("DELETE", "OLD", "-")):
        db.execute(
            f"CREATE TRIGGER dead_letters_{event.lower()} AFTER {event} ON dead_letters"
            f" BEGIN UPDATE counters SET value = value {sign} {DEAD_LETTER_BYTES.format(row)}"
            f" WHERE name = '{DEAD_BYTES}'; END"
        )


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
    4: _migrate_v4,
    5: _migrate_v5,
    6: _migrate_v6,
    7: _migrate_v7,
    8: _migrate_v8,
    9: _migrate_v9,
    10: _migrate_v10,
    11: _migrate_v11,
}


# How much longer systemd is asked to wait for the start while the store is migrated.
MIGRATION_TIMEOUT_S = 1800

# gateway.commit_delay_ms waits for later packets until a commit has this many (by
# default; the service asks for half of mqtt.receive_maximum). Past the broker's receive
# maximum no packet comes until PUBACKs go, so waiting on would only stall the stream;
# below it, each packet more shares the commit's fsync and the bookkeeping pages every
# commit writes. Until session 13 it was 64, which at 1,000 packets/s made a commit
# every 64 ms instead of one per delay.
DELAY_ENOUGH_PACKETS = 500

# A broker may send fewer packets ahead of their PUBACKs than the gateway's receive
# maximum allows (AWS IoT Core: 100; EMQX's max_inflight for MQTT 3.1.1 clients: 32).
# Then every commit would wait out the whole delay for packets that cannot come. When
# two waits in a row ran out holding the same number of packets (at least
# CAP_MIN_PACKETS), none of them in the second half of the delay, that number is taken
# for the broker's cap and ends the wait like commit_delay_max_packets; it is forgotten
# after CAP_KEEP_S and learnt again if it holds.
CAP_MIN_PACKETS = 8
CAP_KEEP_S = 60.0

# A trickle: a wait of gateway.commit_delay_ms that ran out holding fewer packets than
# this (and no store call) goes on, up to the "slow" delay in all, until this many have
# come or a store call ends it. At 10 packets/s a 100 ms wait holds one or two packets,
# so nearly every packet paid for a commit of its own: an fsync, the bookkeeping pages,
# a wake-up of the writer. A broker capping unacknowledged packets below this number
# would make every wait run on for packets that cannot come; two such waits in a row
# that ran out with the same packets, all of them in the first half, teach the writer
# that number (the trickle cap), and a wait holding it is not stretched, until
# CAP_KEEP_S later.
TRICKLE_PACKETS = 8

# The writer keeps at most this many senders (topic and ICCID) in memory.
SENDER_CACHE = 10_000

# At most this many store calls share one transaction.
MAX_GROUP_CALLS = 256

# Bytes per database page for a new store (an existing one keeps its own).
PAGE_SIZE = 1024

# The writer copies the WAL into the database file once it holds this many pages (about
# 20 MB; SQLite's default is 1,000). A checkpoint writes each page once, however often
# the WAL changed it since the last one, and the packet tables' pages are freed and used
# again every second or two at 1,000 packets/s: at 1,000/s monoZ, 341 disk bytes per
# packet against 383 (session 14, 10,000 pages). What a checkpoint writes is then nearly
# all `inflight`, whose pages each packet id's turn changes once every 65,536 packets:
# 20,000 pages (about 110,000 packets at 1,000/s) write them about half as often as
# 10,000, 226 disk bytes per packet against 239 over 300,000 packets (session 17). The
# WAL file keeps the size it reached.
WAL_CHECKPOINT_PAGES = 20_000


def connect(path: Path, *, readonly: bool = False) -> sqlite3.Connection:
    """A connection with the store's pragmas (WAL, busy timeout)."""
    try:
        if readonly:
            conn = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, isolation_level=None, check_same_thread=False
            )
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
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


def migrate(conn: sqlite3.Connection) -> int:
    """Bring the schema to SCHEMA_VERSION with forward migrations; returns the version."""
    db = sqlite_utils.Database(conn)
    version = 0
    if db["meta"].exists():
        version = int(get_meta(conn, "schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is newer than this gateway ({SCHEMA_VERSION}); "
            "upgrade the gateway"
        )
    if version and version < SCHEMA_VERSION:
        # Schema 4 copies the packet table: with a large backlog on an SD card that can
        # outlast the unit's TimeoutStartSec, and a start killed midway rolls it back.
        notifier = sdnotify.Notifier.from_env()
        notifier.send(
            f"EXTEND_TIMEOUT_USEC={MIGRATION_TIMEOUT_S * 1_000_000}",
            f"STATUS=migrating the store to schema {SCHEMA_VERSION}",
        )
        notifier.close()
    for v in range(version + 1, SCHEMA_VERSION + 1):
        with transaction(conn):
            MIGRATIONS[v](db)
            set_meta(conn, "schema_version", str(v))
        log.info("store migrated to schema version %d", v)
    return SCHEMA_VERSION


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


class _GroupAborted(Exception):
    """SQLite rolled a group commit back by itself (disk full, I/O error)."""


_STOP = object()


@dataclass(slots=True)
class _Cap:
    """A count of packets the broker seems to send no more than ahead of their PUBACKs,
    learnt from two waits in a row that ran out holding it (see CAP_MIN_PACKETS and
    TRICKLE_PACKETS); kept CAP_KEEP_S, then learnt again if it still holds."""

    value: int = 0  # 0: none learnt
    seen: int = 0  # what the last wait that ran out quietly held
    until: float = 0.0

    def expire(self, now: float) -> None:
        if self.value and now > self.until:
            self.value = 0

    def observe(self, n: int, quiet: bool) -> bool:
        """A wait ran out holding n packets, none of them lately (`quiet`); returns
        whether that makes n the cap, and it was not already."""
        if not quiet:
            self.seen = 0
            return False
        new = False
        if n == self.seen:
            new = n != self.value
            self.value = n
            self.until = time.monotonic() + CAP_KEEP_S
        self.seen = n
        return new


class _Call:
    __slots__ = ("args", "fn", "future", "lazy")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], lazy: bool = False) -> None:
        self.fn = fn
        self.args = args
        # Lazy (Store.defer): may wait for the next packet commit instead of cutting the
        # commit delay short.
        self.lazy = lazy
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


def _sort(item: Any, packets: list[Incoming], calls: list[_Call]) -> bool:
    """File an item taken from the writer's queue; True for the stop marker."""
    if item is _STOP:
        return True
    if isinstance(item, Incoming):
        packets.append(item)
    else:
        calls.append(item)
    return False


def _hand_out(results: list[tuple[_Call, Any, BaseException | None]]) -> None:
    """Give each call of a committed group its result or error."""
    for c, value, error in results:
        if error is None:
            c.future.set_result(value)
        else:
            c.future.set_exception(error)


@dataclass(slots=True)
class _Written:
    """What a packet commit wrote, for after its COMMIT."""

    accepted: list[Incoming]  # stored, recognised redeliveries, too large
    stored: bool  # whether any packet row was added
    rows: list[tuple[int, int]]  # (session, id) of each row added
    epoch: int  # the highest connection epoch among the packets
    added: int  # payload bytes added to the buffer
    evicted: tuple[int, int]  # (packets, bytes) drop_oldest deleted


def _urgent(calls: list[_Call]) -> bool:
    """Whether any of the calls is one that must not wait for the commit delay."""
    return any(not c.lazy for c in calls)


class Store:
    """The gateway's one SQLite database, written by one thread."""

    def __init__(
        self,
        path: Path,
        *,
        max_buffer_bytes: int = 512 << 20,
        on_full: str = "backpressure",
        commit_max_packets: int = 2000,
        min_free_bytes: int = 0,
        commit_delay_s: float = 0.0,
        commit_delay_max_packets: int = DELAY_ENOUGH_PACKETS,
        commit_delay_slow_s: float = 0.0,
        receive_maximum: int = 1000,
        sessions: int = 1,
        redelivery_window: int = 0,
        dead_letter_max_bytes: int = 64 << 20,
        dead_letter_max_age_s: float = 30 * 86400.0,
    ) -> None:
        self.path = path
        # For statvfs at each commit: pathlib's `.parent` and str() cost more than the call.
        self._dir = os.fspath(path.parent)
        # Hold a commit this long after its first packet, for later ones to share it.
        self.commit_delay_s = commit_delay_s
        # ... unless it has this many packets by then.
        self.commit_delay_max_packets = commit_delay_max_packets
        # A wait that has fewer than TRICKLE_PACKETS by then goes on up to this long
        # (no longer than commit_delay_s: not at all).
        self.commit_delay_slow_s = commit_delay_slow_s
        # The cap learnt from stretched waits; see TRICKLE_PACKETS.
        self._trickle_cap = _Cap()
        # The broker's cap on unacknowledged packets, as learnt; see CAP_MIN_PACKETS.
        self._broker_cap = _Cap()
        self.max_buffer_bytes = max_buffer_bytes
        self.on_full = on_full
        self.commit_max_packets = commit_max_packets
        self.min_free_bytes = min_free_bytes
        self.conn = connect(path)
        migrate(self.conn)
        self._q: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._held: list[Incoming] = []
        self._packet_routes: tuple[str, ...] = ()
        # senders rows the writer knows by (topic, ICCID): committed ones, and those the
        # packet commit under way added (kept once it commits). Senders no packet refers
        # to any more are deleted once as many were added as there are packets (at
        # least SENDER_CACHE): a topic with a part of its own per message must not make
        # the table grow for ever.
        self._senders: dict[tuple[str, str], int] = {}
        self._new_senders: dict[tuple[str, str], int] = {}
        self._senders_added = 0
        self.on_committed: Callable[[list[Incoming]], None] | None = None
        self.on_change: Callable[[], None] | None = None
        self.buffer_bytes = self._scalar("SELECT COALESCE(SUM(size), 0) FROM packets")
        # Dead letters count toward max_buffer_bytes too (see DEAD_BYTES); the oldest go
        # past either limit (0: no age limit), looked at every DEAD_LETTER_TEND_S.
        self.dead_letter_max_bytes = dead_letter_max_bytes
        self.dead_letter_max_age_s = dead_letter_max_age_s
        self.dead_letter_bytes = dead_letter_bytes(self.conn)
        self._tend_at = 0.0
        # Why packets are not being acknowledged right now ("" when they are): a failed
        # write (disk full, read-only file system), or the disk reserve reached.
        self.write_error = ""
        self.paused = ""
        self._failing_since_ns = 0
        # Transactions that wrote, since start: each is an fsync and a few WAL pages, the
        # store's wear on an SD card (gateway_store_commits in /metrics).
        self.commits = 0
        self._page_size = self._scalar("PRAGMA page_size")
        self._buffer_high = False
        # Packets handed over by the MQTT thread and not yet committed (see submit_packet).
        self.max_pending = max(2 * commit_max_packets, 1000)
        # How many of a session's latest packet rows a redelivery may reach back to (see
        # PIN_WAIT_S); `redelivery_window` sets it for tests.
        self.redelivery_window = redelivery_window or (
            self.max_pending + commit_max_packets + receive_maximum
        )
        # The ids of each session's last redelivery_window packet rows, oldest first: a
        # table holding one of them is pinned (see PIN_WAIT_S), since when by table.
        self._recent = self._load_recent(sessions)
        self._pinned_since: dict[str, float] = {}
        self._epoch_saved = self._saved_epoch()
        self._submitted = 0
        self._released = 0
        self._room = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="store-writer", daemon=True)
        self._thread.start()

    # -- public API, any thread -------------------------------------------------------

    @classmethod
    @contextlib.contextmanager
    def open(cls, state_dir: Path, **kwargs: Any) -> Iterator[Store]:
        """Open (creating and migrating) state_dir/gateway.db; flush and close on exit."""
        store = cls(Path(state_dir) / "gateway.db", **kwargs)
        try:
            yield store
        finally:
            store.close()

    def submit_packet(self, pkt: Incoming, wait_s: float = 0.0) -> bool:
        """Queue a packet for the next group commit (called from one thread at a time:
        MQTT's, or the ingest processes' readers under IngestPool.submit_lock).

        With `wait_s`, wait up to that long while `max_pending` packets are already in
        memory uncommitted: blocking the MQTT thread stops it reading the socket, so a
        broker that sends faster than the disk commits (or ignores our Receive Maximum,
        as mosquitto 2.0.11 does after a connection's first packets) meets TCP
        backpressure instead of filling the gateway's memory. Returns False when the
        wait ran out.
        """
        room = True
        if self.pending_packets >= self.max_pending and wait_s > 0:
            with self._room:
                room = self._room.wait_for(lambda: self.pending_packets < self.max_pending, wait_s)
        # Only one submitter at a time adds to _submitted and only the writer to
        # _released, so neither needs a lock; the writer notifies `_room` under it.
        self._submitted += 1
        self._q.put(pkt)
        return room

    @property
    def pending_packets(self) -> int:
        """Packets handed over with submit_packet and not committed yet."""
        return self._submitted - self._released

    def call(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Run fn(conn, *args) on the writer thread."""
        return self._enqueue(_Call(fn, args))

    def defer(self, fn: Callable[..., T], *args: Any) -> concurrent.futures.Future[T]:
        """Like call, for bookkeeping that can wait: instead of ending the commit delay
        (gateway.commit_delay_ms) at once, it joins the packets' commit, so that both
        share one fsync; with no packet waiting, it waits the delay for some. For writes
        whose loss in a crash costs a resend, never a packet (a delivered batch's
        completion, new batches while delivery keeps up)."""
        return self._enqueue(_Call(fn, args, lazy=True))

    def _enqueue(self, c: _Call) -> concurrent.futures.Future[Any]:
        if self._closed:
            c.future.set_exception(StoreError("store is closed"))
        else:
            self._q.put(c)
        return c.future

    def run_sync(self, fn: Callable[..., T], *args: Any) -> T:
        """Run fn(conn, *args) on the writer thread and wait for it."""
        return self.call(fn, *args).result()

    def flush(self) -> None:
        """Return once every packet submitted before is committed and acknowledged."""
        self.run_sync(lambda _c: None)

    @property
    def broker_cap(self) -> int:
        """The broker's cap on unacknowledged packets, as learnt (0: none); see
        CAP_MIN_PACKETS."""
        return self._broker_cap.value

    @property
    def trickle_cap(self) -> int:
        """The cap learnt from stretched waits (0: none); see TRICKLE_PACKETS."""
        return self._trickle_cap.value

    def last_epoch(self) -> int:
        """The highest connection epoch of any committed packet (see Ingest.epoch)."""
        return self.run_sync(lambda _c: self._epoch_saved)

    def close(self) -> None:
        """Commit what is queued, stop the writer and close the database; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._q.put(_STOP)
        self._thread.join()
        with contextlib.suppress(sqlite3.Error):
            self.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        self.conn.close()

    @property
    def writer_alive(self) -> bool:
        """Whether the writer thread is running (it ends only with close())."""
        return self._thread.is_alive()

    @property
    def full(self) -> bool:
        return self.buffer_bytes + self.dead_letter_bytes >= self.max_buffer_bytes

    def set_packet_routes(self, names: Iterable[str]) -> None:
        """The webhooks that consume packets; a packet is kept until all of them are done."""
        self._packet_routes = tuple(names)

    def disk_shortage(self, incoming: int) -> str:
        """Why writing `incoming` payload bytes would eat into min_free_bytes, or ""."""
        if not self.min_free_bytes:
            return ""
        try:
            st = os.statvfs(self._dir)
        except OSError:
            return ""
        free = st.f_bavail * st.f_frsize
        # A packet costs more than its payload: row, index, inflight and WAL pages.
        need = 2 * incoming + 64 * 1024
        if free - need >= self.min_free_bytes:
            return ""
        # Pages freed by delivered packets are reused before the file grows.
        if self._scalar("PRAGMA freelist_count") * self._page_size >= need:
            return ""
        if (
            self._delete_released()
            and self._scalar("PRAGMA freelist_count") * self._page_size >= need
        ):
            return ""
        return (
            f"{free / 1e6:.1f} MB free on the store's file system, "
            f"less than gateway.min_free_mb ({self.min_free_bytes / 1048576:g} MB)"
        )

    def _delete_released(self) -> bool:
        """Delete released packets still on disk (see PACKET_TABLES), row by row; whether
        any were. Only for a disk short of space, where the pages they free are worth
        the writes."""
        conn = self.conn
        mark = self._unneeded_mark(conn)
        tables = [t for t, lo, _hi in packet_tables(conn) if lo <= mark]
        if not tables:
            return False
        try:
            with transaction(conn):
                for t in tables:
                    conn.execute(f"DELETE FROM {t} WHERE id <= ?", (mark,))
        except sqlite3.Error as exc:
            log.warning("could not delete delivered packets to free space: %s", exc)
            return False
        self.commits += 1
        return True

    # -- the writer thread --------------------------------------------------------------

    def _scalar(self, sql: str, args: Sequence[Any] = ()) -> int:
        row = self.conn.execute(sql, args).fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def _run(self) -> None:
        while True:
            timeout = 0.2 if self._held else max(0.0, self._tend_at - time.monotonic())
            try:
                first = self._q.get(timeout=timeout)
            except queue.Empty:
                first = None
            packets = list(self._held)
            was_held = len(packets)
            self._held.clear()
            calls: list[_Call] = []
            stop = False
            item = first
            while item is not None:
                stop = _sort(item, packets, calls) or stop
                if len(packets) >= self.commit_max_packets or len(calls) >= MAX_GROUP_CALLS:
                    break
                try:
                    item = self._q.get_nowait()
                except queue.Empty:
                    item = None
            if (packets or calls) and not _urgent(calls) and not stop and self.commit_delay_s:
                # Lazy calls alone wait for packets too: committed on their own, each
                # delivered batch's completion after a quiet moment made a commit more.
                # Packets held back (buffer full, disk short) say nothing of the broker,
                # nor do those that came into a wait begun for lazy calls.
                learn = bool(packets) and not was_held
                stop = self._wait_for_more(packets, calls, learn=learn)
            if packets:
                self._commit_packets(packets, calls)
                self._watch_buffer()
                # What is still held (buffer full, write failing) stays pending.
                self._release_pending(len(packets) - len(self._held))
            else:
                self._run_calls(calls)
            if time.monotonic() >= self._tend_at and not stop:
                self._tend_dead_letters()
            if stop:
                # Drain anything that raced with close so no caller waits forever.
                while True:
                    try:
                        item = self._q.get_nowait()
                    except queue.Empty:
                        break
                    if isinstance(item, Incoming):
                        self._held.append(item)
                    elif isinstance(item, _Call):
                        self._run_call(item)
                if self._held:
                    held, self._held = self._held, []
                    self._commit_packets(held)
                return

    def _wait_for_more(
        self, packets: list[Incoming], calls: list[_Call], *, learn: bool = True
    ) -> bool:
        """gateway.commit_delay_ms: take packets and lazy calls (Store.defer) for up to the
        delay, so that they share one commit (one fsync) with those already taken. Any
        other store call (a new batch, status) or close ends the wait at once, and so
        do commit_delay_max_packets packets, or the broker's cap on unacknowledged
        packets once learnt (see CAP_MIN_PACKETS). A trickle of packets waits on up to
        commit_delay_slow_s (see TRICKLE_PACKETS). `learn`: the packets came from the
        broker just now (not held back, nor come into a wait for lazy calls), so the
        wait says something of its pace. Returns whether close was asked for."""
        began = last = time.monotonic()
        deadline = began + self.commit_delay_s
        self._broker_cap.expire(began)
        self._trickle_cap.expire(began)
        enough = min(self.commit_max_packets, self.commit_delay_max_packets)
        if self.broker_cap:
            enough = min(enough, self.broker_cap)
        stretched = False
        while len(packets) < enough and len(calls) < MAX_GROUP_CALLS:
            left = deadline - time.monotonic()
            item = None
            if left > 0:
                with contextlib.suppress(queue.Empty):
                    item = self._q.get(timeout=left)
            if item is None:
                if not stretched and learn and self._stretches(len(packets), calls):
                    stretched = True
                    deadline = began + self.commit_delay_slow_s
                    enough = min(enough, TRICKLE_PACKETS)
                    continue
                if stretched:
                    self._learn_trickle(len(packets), quiet=deadline - last)
                elif learn:
                    self._learn_cap(len(packets), quiet=deadline - last)
                break
            if _sort(item, packets, calls):
                return True
            if isinstance(item, Incoming):
                last = time.monotonic()
            elif not item.lazy or stretched:
                break
        return False

    def _stretches(self, n: int, calls: list[_Call]) -> bool:
        """Whether a wait that ran out holding n packets and `calls` goes on (a trickle)."""
        if calls or n >= TRICKLE_PACKETS or self.commit_delay_slow_s <= self.commit_delay_s:
            return False
        return not self.trickle_cap or n < self.trickle_cap

    def _learn_trickle(self, n: int, quiet: float) -> None:
        """A stretched wait ran out holding n packets, the last `quiet` seconds before
        its end: a broker that sends no more than n until PUBACKs go, if the one before
        did too. Unlike the broker cap it only keeps waits from being stretched."""
        if self._trickle_cap.observe(n, quiet >= self.commit_delay_slow_s / 2):
            log.info(
                "commits waited on twice for more than %d packets that did not come"
                " (a broker's cap on unacknowledged packets?): a commit holding %d no"
                " longer waits on for a trickle",
                n,
                n,
            )

    def _learn_cap(self, n: int, quiet: float) -> None:
        """A wait ran out holding n packets, the last of them `quiet` seconds before its
        end: a broker that sends no more until PUBACKs go, if the one before did too."""
        steady = n >= CAP_MIN_PACKETS and quiet >= self.commit_delay_s / 2
        if self._broker_cap.observe(n, steady):
            log.info(
                "the broker sends at most %d packets ahead of their PUBACKs: a commit"
                " goes once it has them, not after gateway.commit_delay_ms",
                n,
            )

    def _release_pending(self, n: int) -> None:
        if n:
            with self._room:
                self._released += n
                self._room.notify_all()

    def _watch_buffer(self) -> None:
        """Record an event when the buffer passes 80 % full, and when it is below 70 % again."""
        used = self.buffer_bytes + self.dead_letter_bytes
        level = used / self.max_buffer_bytes if self.max_buffer_bytes else 0.0
        high = level >= 0.8 if not self._buffer_high else level >= 0.7
        if high == self._buffer_high:
            return
        self._buffer_high = high
        data = {
            "bytes": self.buffer_bytes,
            "dead_letter_bytes": self.dead_letter_bytes,
            "max_bytes": self.max_buffer_bytes,
        }
        log.warning(
            "buffer %s: %d of %d bytes (%d in dead letters)",
            "above 80 %" if high else "back below 70 %",
            used,
            self.max_buffer_bytes,
            self.dead_letter_bytes,
        )
        with contextlib.suppress(sqlite3.Error):
            add_event(self.conn, "buffer_high" if high else "buffer_ok", data)

    def _tend_dead_letters(self) -> None:
        """Evict the oldest dead letters past dead_letter_max_bytes or older than
        dead_letter_max_age_s, at most DEAD_LETTER_EVICT_ROWS now and more on the writer's
        next turn; and take up the bytes they hold (`gateway dlq` may have changed them)."""
        now = time.monotonic()
        self._tend_at = now + DEAD_LETTER_TEND_S
        conn = self.conn
        cutoff = 0
        if self.dead_letter_max_age_s:
            cutoff = time.time_ns() - int(self.dead_letter_max_age_s * 1e9)
        try:
            self.dead_letter_bytes = dead_letter_bytes(conn)
            if self.dead_letter_bytes <= self.dead_letter_max_bytes:
                oldest = conn.execute(
                    "SELECT created_ns FROM dead_letters ORDER BY id LIMIT 1"
                ).fetchone()
                if oldest is None or oldest[0] >= cutoff:
                    return
            with transaction(conn):
                n, freed = evict_dead_letters(
                    conn, self.dead_letter_max_bytes, cutoff, DEAD_LETTER_EVICT_ROWS
                )
            self.dead_letter_bytes = dead_letter_bytes(conn)
        except sqlite3.Error as exc:
            log.warning("could not evict old dead letters: %s", exc)
            return
        if n:
            self.commits += 1
            log.warning(
                "evicted the %d oldest dead letters (%d bytes): past gateway.dead_letter_max_mb"
                " or gateway.dead_letter_max_age",
                n,
                freed,
            )
        if n == DEAD_LETTER_EVICT_ROWS:
            self._tend_at = now

    def _run_call(self, c: _Call) -> None:
        if c.future.set_running_or_notify_cancel():
            self._run_one(c)

    def _run_one(self, c: _Call) -> None:
        changes = self.conn.total_changes
        try:
            value = c.fn(self.conn, *c.args)
            if self.conn.total_changes != changes:
                self.commits += 1
            c.future.set_result(value)
        except BaseException as exc:
            if self.conn.in_transaction:
                with contextlib.suppress(sqlite3.Error):
                    self.conn.execute("ROLLBACK")
            c.future.set_exception(exc)

    def _run_calls(self, calls: list[_Call]) -> None:
        """Run the queued calls in one transaction: one commit (one fsync) for all of them.

        Each call runs in a savepoint of its own, so one that fails leaves the others'
        changes; results are handed out only once the group has committed. If the group
        cannot commit, each call runs again on its own and gets its own result or error."""
        self._run_started([c for c in calls if c.future.set_running_or_notify_cancel()])

    def _calls_in_group(self, calls: list[_Call]) -> list[tuple[_Call, Any, BaseException | None]]:
        """Run calls (already marked running) inside the open transaction, each in a
        savepoint; their results, to hand out once the transaction has committed."""
        conn = self.conn
        results: list[tuple[_Call, Any, BaseException | None]] = []
        for c in calls:
            conn.execute("SAVEPOINT call")
            try:
                value = c.fn(conn, *c.args)
            except Exception as exc:
                if not conn.in_transaction:
                    raise _GroupAborted from exc
                conn.execute("ROLLBACK TO call")
                conn.execute("RELEASE call")
                results.append((c, None, exc))
            else:
                conn.execute("RELEASE call")
                results.append((c, value, None))
        return results

    def _abort_group(self, buffer_bytes: int) -> None:
        """Roll back a group that could not commit, and what its calls did to the buffer's
        byte count (release_packets), which they will do again when run on their own."""
        if self.conn.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self.conn.execute("ROLLBACK")
        self.buffer_bytes = buffer_bytes

    def _commit_packets(self, packets: list[Incoming], calls: Sequence[_Call] = ()) -> None:
        """Commit packets and then tell the ingest to acknowledge them (on_committed).

        `calls` taken from the queue with them run in the same transaction, after the
        packets: one fsync for both. If the packets cannot be written, they are held
        and the calls run on their own; if a call brings the whole group down, the
        packets are committed alone and then each call on its own."""
        group = [c for c in calls if c.future.set_running_or_notify_cancel()]
        packets = self._admit(packets)
        if not packets:
            self._run_started(group)
            return
        conn = self.conn
        buffer_bytes = self.buffer_bytes
        results: list[tuple[_Call, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                written = self._write_packets(packets)
            except sqlite3.Error as exc:
                self._abort_group(buffer_bytes)
                self._write_failed(packets, exc)
                self._run_started(group)
                return
            results = self._calls_in_group(group)
            conn.execute("COMMIT")
            self.commits += 1
        except (sqlite3.Error, _GroupAborted) as exc:
            self._abort_group(buffer_bytes)
            if isinstance(exc, sqlite3.Error) and not group:
                # The COMMIT itself failed (disk full, I/O error).
                self._write_failed(packets, exc)
                return
            self._commit_packets(packets)
            for c in group:
                self._run_one(c)
            return
        self._committed(written)
        _hand_out(results)

    def _run_started(self, calls: list[_Call]) -> None:
        """_run_calls for calls already marked running (set_running_or_notify_cancel)."""
        if len(calls) == 1:
            self._run_one(calls[0])
        elif calls:
            buffer_bytes = self.buffer_bytes
            try:
                self.conn.execute("BEGIN IMMEDIATE")
                results = self._calls_in_group(calls)
                self.conn.execute("COMMIT")
                self.commits += 1
            except (sqlite3.Error, _GroupAborted):
                self._abort_group(buffer_bytes)
                for c in calls:
                    self._run_one(c)
                return
            _hand_out(results)

    def _admit(self, packets: list[Incoming]) -> list[Incoming]:
        """The packets to write now; the rest are held in memory (not acknowledged, so the
        broker keeps them) while the buffer is full or the disk is short of space."""
        incoming_bytes = sum(len(p.payload) for p in packets if not p.too_large)
        used = self.buffer_bytes + self.dead_letter_bytes
        if used + incoming_bytes > self.max_buffer_bytes and self.on_full == "backpressure":
            # Stop acknowledging: keep them in memory (bounded by the broker's receive
            # maximum) and try again when delivery (or a dead letters' eviction) frees space.
            room = self.max_buffer_bytes - used
            fit: list[Incoming] = []
            for p in packets:
                size = 0 if p.too_large else len(p.payload)
                if size <= room or p.too_large:
                    fit.append(p)
                    room -= size
                else:
                    break
            self._held = packets[len(fit) :]
            packets = fit
            if not packets:
                return []
        shortage = self.disk_shortage(sum(len(p.payload) for p in packets))
        if shortage:
            # Keep the disk from filling up: acknowledge nothing, hold the packets (at
            # most the broker's receive maximum), try again.
            if not self.paused:
                log.error("store paused, not acknowledging packets: %s", shortage)
            self.paused = shortage
            self._held = packets + self._held
            return []
        if self.paused:
            log.warning("store resumed: disk space is back above gateway.min_free_mb")
            self.paused = ""
        return packets

    def _write_packets(self, packets: list[Incoming]) -> _Written:
        """Write packets inside the open transaction (in a savepoint of their own)."""
        conn = self.conn
        store_rows: list[tuple[int, int, bytes, int, int, int]] = []
        sessions: list[int] = []
        # `inflight` rows: what has no packet row to be recognised by (see
        # PIN_WAIT_S), written as of the highest packet id so far.
        inflight: list[tuple[int, bytes, int, int]] = []
        too_large: list[Incoming] = []
        redelivered = 0
        accepted: list[Incoming] = []
        evicted = (0, 0)
        self._new_senders.clear()  # left by a commit that was rolled back
        with transaction(conn):
            first, table = next_packet_row(conn)
            for p in packets:
                if p.dup:
                    digest = p.digest()
                    latest = self._latest_use(p)
                    if latest is not None and latest[0] == digest and latest[1] < p.epoch:
                        p.outcome = "redelivery"
                        redelivered += 1
                        accepted.append(p)
                        # Its PUBACK may be lost again, after its row has gone.
                        inflight.append((p.inflight_key, digest, latest[1], first - 1))
                        continue
                if p.too_large:
                    p.outcome = "too_large"
                    too_large.append(p)
                    inflight.append((p.inflight_key, p.digest(), p.epoch, first - 1))
                else:
                    p.outcome = "stored"
                    sender = self._sender(p.topic, p.iccid)
                    store_rows.append(
                        (p.recv_ns, sender, p.payload, len(p.payload), p.inflight_key, p.epoch)
                    )
                    sessions.append(p.source)
                accepted.append(p)
            conn.executemany(
                f"INSERT INTO {table}(id, recv_ns, sender, payload, size, mid, epoch)"
                " VALUES (?,?,?,?,?,?,?)",
                [(first + i, *row) for i, row in enumerate(store_rows)],
            )
            conn.executemany(
                "INSERT OR REPLACE INTO inflight(mid, digest, epoch, at_id) VALUES (?,?,?,?)",
                inflight,
            )
            epoch = max(p.epoch for p in packets)
            if epoch > self._epoch_saved:
                set_meta(conn, LAST_EPOCH, str(epoch))
            for p in too_large:
                # A prefix, the size and a hash: a sender of huge packets must not fill
                # the disk with them (see DEAD_LETTER_PREFIX_BYTES).
                conn.execute(
                    "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, reason,"
                    " status, excerpt, attempts, created_ns, topic, iccid, recv_ns, size,"
                    " sha256) VALUES ('', 'packets', '', ?, 1, 'too_large', 0, ?, 0, ?, ?, ?,"
                    " ?, ?, ?)",
                    (
                        p.payload[:DEAD_LETTER_PREFIX_BYTES],
                        f"payload of {len(p.payload)} bytes exceeds mqtt.max_payload_bytes",
                        time.time_ns(),
                        p.topic,
                        p.iccid,
                        p.recv_ns,
                        len(p.payload),
                        hashlib.sha256(p.payload).hexdigest(),
                    ),
                )
            added = sum(r[3] for r in store_rows)
            used = self.buffer_bytes + self.dead_letter_bytes + added
            if self.on_full == "drop_oldest" and used > self.max_buffer_bytes:
                excess = used - self.max_buffer_bytes
                evicted = self._evict_oldest(excess, first)
            # packets_received is not bumped here: it is counted from the ids (see
            # count_received), which keeps the counters page out of this commit.
            _bump(conn, "packets_redelivered", redelivered)
            _bump(conn, "packets_too_large", len(too_large))
            _bump(conn, "packets_dead", len(too_large))
            if self.write_error:
                # Written with the first commit that works again, so that `gateway
                # status` can tell what happened while nothing could be written.
                conn.execute(
                    "INSERT INTO events(ts_ns, kind, data) VALUES (?, ?, ?)",
                    (
                        time.time_ns(),
                        "store_write_failed",
                        dumps({"error": self.write_error, "since_ns": self._failing_since_ns}),
                    ),
                )
                _bump(conn, "events_recorded", 1)
        rows = [(n, first + i) for i, n in enumerate(sessions)]
        return _Written(accepted, bool(store_rows), rows, epoch, added, evicted)

    def _write_failed(self, packets: list[Incoming], exc: sqlite3.Error) -> None:
        """Disk full, read-only file system, I/O error: acknowledge nothing, keep the
        packets in memory and try again; the broker still holds them."""
        if exc.__class__.__name__ != self.write_error.split(":", 1)[0]:
            log.error("store write failed, not acknowledging packets: %s", exc)
        if not self.write_error:
            self._failing_since_ns = time.time_ns()
        self.write_error = f"{exc.__class__.__name__}: {exc}"
        for p in packets:
            p.outcome = ""
        self._held = packets + self._held
        time.sleep(0.2)

    def _sender(self, topic: str, iccid: str) -> int:
        """sender_id, from memory when the writer has seen that sender before."""
        key = (topic, iccid)
        found = self._senders.get(key) or self._new_senders.get(key)
        if found is None:
            found = self._new_senders[key] = sender_id(self.conn, topic, iccid)
        return found

    def _prune_senders(self, conn: sqlite3.Connection) -> None:
        """Delete senders no packet refers to, once enough were added (see __init__)."""
        if self._senders_added < SENDER_CACHE:
            return
        lo, hi = packet_span(conn)
        if self._senders_added < hi - lo:
            return
        # Released rows still on disk are never read again (see PACKET_TABLES), but for
        # the window's (see PIN_WAIT_S).
        held = " UNION ".join(f"SELECT sender FROM {t} WHERE id > ?" for t in PACKET_TABLES)
        keep = self._unneeded_mark(conn)
        conn.execute(f"DELETE FROM senders WHERE id NOT IN ({held})", (keep,) * len(PACKET_TABLES))
        self._senders_added = 0
        self._senders.clear()

    # -- recognising redeliveries (see PIN_WAIT_S) --------------------------------------

    def _load_recent(self, sessions: int) -> dict[int, deque[int]]:
        """Each session's last redelivery_window row ids, read from the newest row down
        until every session 0 … sessions - 1 has that many (or the rows run out)."""
        window = self.redelivery_window
        found: dict[int, list[int]] = {}
        wanted = range(sessions)
        for table, _lo, _hi in reversed(packet_tables(self.conn)):
            rows = self.conn.execute(
                f"SELECT id, mid >> 16 FROM {table} WHERE mid IS NOT NULL ORDER BY id DESC"
            )
            for rid, session in rows:
                ids = found.setdefault(session, [])
                if len(ids) < window:
                    ids.append(rid)
                    if len(ids) == window and all(len(found.get(n, ())) == window for n in wanted):
                        break
            else:
                continue
            break
        return {n: deque(reversed(ids), maxlen=window) for n, ids in found.items()}

    def _pin_bound(self) -> int:
        """The lowest id among the sessions' recent rows (sys.maxsize: none)."""
        return min((ids[0] for ids in self._recent.values() if ids), default=sys.maxsize)

    def _unneeded_mark(self, conn: sqlite3.Connection) -> int:
        """Rows at or below this id are needed by nothing: released, and older than every
        session's redelivery window."""
        return min(released_mark(conn), self._pin_bound() - 1)

    def _latest_use(self, p: Incoming) -> tuple[bytes, int] | None:
        """(digest, epoch) of the latest packet committed under p's packet id in its
        session, as far back as a redelivery may reach; None when there is none.

        The packet rows are looked at down to the session's oldest recent row, and the
        `inflight` row of the packet id if it was written no longer ago than that (its
        at_id: the highest packet id then, or the row's own when copied from one)."""
        conn = self.conn
        recent = self._recent.get(p.source)
        key = p.inflight_key
        found: tuple[bytes, int] | None = None
        row_id = -1
        if recent:
            for t in PACKET_TABLES:
                row = conn.execute(
                    f"SELECT p.id, s.topic, p.payload, p.epoch FROM {t} AS p"
                    " JOIN senders AS s ON s.id = p.sender"
                    " WHERE p.id >= ? AND p.mid = ? ORDER BY p.id DESC LIMIT 1",
                    (recent[0], key),
                ).fetchone()
                if row is not None and row[0] > row_id:
                    row_id = row[0]
                    found = (digest_of(row[1], row[2]), row[3])
        oldest = recent[0] if recent is not None and len(recent) == recent.maxlen else 0
        kept = conn.execute("SELECT digest, epoch, at_id FROM inflight WHERE mid = ?", (key,))
        row = kept.fetchone()
        if row is not None and row[2] >= max(oldest, row_id):
            found = (row[0][:8], row[1])
        return found

    def _keep_keys(self, conn: sqlite3.Connection, table: str, lo: int, hi: int) -> None:
        """Copy what `inflight` needs of the rows lo … hi of a table about to lose them."""
        rows = conn.execute(
            f"SELECT p.mid, s.topic, p.payload, p.epoch, p.id FROM {table} AS p"
            " JOIN senders AS s ON s.id = p.sender"
            " WHERE p.id >= ? AND p.id <= ? AND p.mid IS NOT NULL ORDER BY p.id",
            (lo, hi),
        )
        conn.executemany(
            "INSERT INTO inflight(mid, digest, epoch, at_id) VALUES (?,?,?,?)"
            " ON CONFLICT(mid) DO UPDATE SET digest = excluded.digest,"
            " epoch = excluded.epoch, at_id = excluded.at_id"
            " WHERE excluded.at_id >= inflight.at_id",
            [
                (key, digest_of(topic, payload), epoch, rid)
                for key, topic, payload, epoch, rid in rows
            ],
        )

    def _unpinned(self, conn: sqlite3.Connection, table: str, hi: int) -> bool:
        """Whether a released table whose rows end at `hi` may be emptied now: when none
        of them is a recent row, or, once it has waited PIN_WAIT_S, with their keys
        copied to `inflight` first."""
        bound = self._pin_bound()
        if hi < bound:
            self._pinned_since.pop(table, None)
            return True
        now = time.monotonic()
        since = self._pinned_since.setdefault(table, now)
        if now - since < PIN_WAIT_S:
            return False
        self._keep_keys(conn, table, bound, hi)
        del self._pinned_since[table]
        return True

    def _saved_epoch(self) -> int:
        """The highest connection epoch stored (see LAST_EPOCH)."""
        saved = int(get_meta(self.conn, LAST_EPOCH, "0"))
        return max(saved, self._scalar("SELECT COALESCE(MAX(epoch), 0) FROM inflight"))

    def _committed(self, written: _Written) -> None:
        """After the packets' COMMIT: count their bytes, then have them acknowledged."""
        window = self.redelivery_window
        for session, rid in written.rows:
            recent = self._recent.get(session)
            if recent is None:
                recent = self._recent[session] = deque(maxlen=window)
            recent.append(rid)
        self._epoch_saved = max(self._epoch_saved, written.epoch)
        if self._new_senders:
            if len(self._senders) + len(self._new_senders) > SENDER_CACHE:
                self._senders.clear()
            self._senders.update(self._new_senders)
            self._senders_added += len(self._new_senders)
            self._new_senders.clear()
        self.buffer_bytes += written.added - written.evicted[1]
        if written.evicted[0]:
            log.warning(
                "buffer full: dropped %d oldest packets (%d bytes)",
                written.evicted[0],
                written.evicted[1],
            )
        if self.write_error:
            log.warning("store writable again after: %s", self.write_error)
        self.write_error = ""
        if self.on_committed is not None:
            self.on_committed(written.accepted)
        if self.on_change is not None and written.stored:
            self.on_change()

    def _evict_oldest(self, excess: int, first: int) -> tuple[int, int]:
        """drop_oldest: delete the oldest packets until `excess` bytes are freed.

        Runs inside the caller's transaction; returns (packets, bytes) dropped, which
        count only once that transaction commits."""
        conn = self.conn
        count_received(conn)
        freed = 0
        dropped = 0
        after = released_mark(conn)
        for table, _lo, _hi in packet_tables(conn):
            while freed < excess:
                rows = conn.execute(
                    f"SELECT id, size FROM {table} WHERE id > ? ORDER BY id LIMIT 500", (after,)
                ).fetchall()
                if not rows:
                    break
                last = rows[-1][0]
                for rid, size in rows:
                    freed += size
                    dropped += 1
                    if freed >= excess:
                        last = rid
                        break
                # The rows of this commit (from `first` on) are recent too.
                bound = min(self._pin_bound(), first)
                if last >= bound:
                    self._keep_keys(conn, table, max(after + 1, bound), last)
                conn.execute(f"DELETE FROM {table} WHERE id > ? AND id <= ?", (after, last))
                after = last
        _bump(conn, "packets_dropped", dropped)
        return dropped, freed

    def release_packets(self, conn: sqlite3.Connection) -> int:
        """Delete packets every packet route has finished with; returns how many."""
        if not self._packet_routes:
            return 0
        marks = ",".join("?" * len(self._packet_routes))
        low = conn.execute(
            f"SELECT MIN(cursor), COUNT(*) FROM routes WHERE name IN ({marks})",
            self._packet_routes,
        ).fetchone()
        if low is None or low[1] < len(self._packet_routes):
            return 0
        bound = int(low[0])
        # Only the configured webhooks' batches hold packets back: a webhook removed from
        # the config must not keep every later packet on disk (its batches stay listed).
        open_first = conn.execute(
            "SELECT MIN(first_id) FROM batches WHERE source = 'packets' AND first_id IS NOT NULL"
            f" AND route IN ({marks})",
            self._packet_routes,
        ).fetchone()[0]
        if open_first is not None:
            bound = min(bound, int(open_first) - 1)
        mark = released_mark(conn)
        spans = packet_tables(conn)
        freed = n = 0
        for table, lo, hi in spans:
            if lo <= bound and hi > mark:
                size, count = conn.execute(
                    f"SELECT COALESCE(SUM(size), 0), COUNT(*) FROM {table}"
                    " WHERE id > ? AND id <= ?",
                    (mark, bound),
                ).fetchone()
                freed += int(size)
                n += int(count)
        if n:
            count_received(conn)
            _set_mark(conn, RELEASED, bound)
            mark = bound
        # A table is emptied only once all of it is released: row by row, SQLite would
        # write each of its pages once more before freeing it. (drop_oldest can leave a
        # table with released rows only, hence `mark`.) A pinned one waits.
        for table, _lo, hi in spans:
            if hi > mark or not self._unpinned(conn, table, hi):
                break
            conn.execute(f"DELETE FROM {table}")
        if n:
            self.buffer_bytes -= freed
            self._prune_senders(conn)
        return n


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


def _bump(conn: sqlite3.Connection, name: str, n: int) -> None:
    if n:
        conn.execute(
            "INSERT INTO counters(name, value) VALUES (?, ?)"
            " ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
            (name, n),
        )


def bump(conn: sqlite3.Connection, name: str, n: int = 1) -> None:
    """Add n to a persistent counter (inside the caller's transaction)."""
    _bump(conn, name, n)


def _mark(conn: sqlite3.Connection, name: str) -> int:
    row = conn.execute("SELECT value FROM counters WHERE name = ?", (name,)).fetchone()
    return int(row[0]) if row else 0


def _set_mark(conn: sqlite3.Connection, name: str, value: int) -> None:
    # An upsert keeps the row where it is: INSERT OR REPLACE deletes and adds it again,
    # which also rewrites its entry in the name index, one page more in each commit that
    # released packets.
    conn.execute(
        "INSERT INTO counters(name, value) VALUES (?, ?)"
        " ON CONFLICT(name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def released_mark(conn: sqlite3.Connection) -> int:
    """The RELEASED mark: packets with an id at or below it are finished with."""
    return _mark(conn, RELEASED)


# Two subqueries: with MIN and MAX in one SELECT, SQLite reads the whole table.
_SPAN = "SELECT (SELECT MIN(id) FROM {0}), (SELECT MAX(id) FROM {0})"


def packet_tables(conn: sqlite3.Connection) -> list[tuple[str, int, int]]:
    """(table, lowest id, highest id) of each packet table holding rows, oldest first.

    Their lowest rows may be released ones (see released_mark). A store not migrated to
    schema 7 yet, as `gateway status` may read it, has the one table `packets`."""
    spans = []
    names: tuple[str, ...] = PACKET_TABLES
    try:
        rows = [conn.execute(_SPAN.format(t)).fetchone() for t in names]
    except sqlite3.OperationalError as exc:
        if "no such table" not in str(exc):
            raise
        names = ("packets",)
        rows = [conn.execute(_SPAN.format("packets")).fetchone()]
    for t, (lo, hi) in zip(names, rows, strict=True):
        if lo is not None:
            spans.append((t, int(lo), int(hi)))
    spans.sort(key=lambda r: r[1])
    return spans


def packet_span(conn: sqlite3.Connection) -> tuple[int, int]:
    """(lowest, highest) id of the packets not yet released, (0, 0) when there are none.
    Ids in between may be missing (packets evicted by drop_oldest)."""
    spans = packet_tables(conn)
    if not spans:
        return 0, 0
    lo, hi = max(spans[0][1], released_mark(conn) + 1), spans[-1][2]
    return (lo, hi) if lo <= hi else (0, 0)


def _ids(conn: sqlite3.Connection) -> tuple[int, int]:
    """(highest packet id stored or 0, the COUNTED mark)."""
    spans = packet_tables(conn)
    return (spans[-1][2] if spans else 0), _mark(conn, COUNTED)


def next_packet_row(conn: sqlite3.Connection) -> tuple[int, str]:
    """The id for the next packet row, and the table it goes to (inside the caller's
    transaction).

    Ids go up by one per stored packet and are never reused, even once the tables are
    empty: a webhook's cursor is the last id it has delivered. Whatever deletes packets
    first moves the COUNTED mark up to the highest id (count_received).

    The table is the newer one while both hold packets. Once the older one has been
    emptied, the other is left to drain and new packets go to the empty one."""
    spans = packet_tables(conn)
    top = spans[-1][2] if spans else 0
    if len(spans) == 1:
        table = next(t for t in PACKET_TABLES if t != spans[0][0])
    else:
        table = spans[-1][0] if spans else PACKET_TABLES[0]
    return max(top, _mark(conn, COUNTED)) + 1, table


def count_received(conn: sqlite3.Connection) -> None:
    """Add the packets stored since the COUNTED mark to packets_received and move the
    mark to the highest id. Called (inside the caller's transaction) before packets
    are deleted, so that the rows it counts from are still there."""
    top, counted = _ids(conn)
    if top > counted:
        _bump(conn, "packets_received", top - counted)
        _set_mark(conn, COUNTED, top)


def counters(conn: sqlite3.Connection) -> dict[str, int]:
    """All persistent counters, zero for those never bumped."""
    out = dict.fromkeys(COUNTERS, 0)
    rows = {str(k): int(v) for k, v in conn.execute("SELECT name, value FROM counters")}
    counted = rows.pop(COUNTED, 0)
    rows.pop(RELEASED, None)
    rows.pop(DEAD_BYTES, None)
    out.update(rows)
    top, _ = _ids(conn)
    out["packets_received"] += max(top - counted, 0)
    return out


def add_event(conn: sqlite3.Connection, kind: str, data: dict[str, Any], ts_ns: int = 0) -> int:
    """Record a gateway event (its own transaction); returns its id.

    Events beyond the newest KEEP_EVENTS are pruned, but never one an events webhook
    has not taken yet.
    """
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO events(ts_ns, kind, data) VALUES (?, ?, ?)",
            (ts_ns or time.time_ns(), kind, dumps(data)),
        )
        eid = int(cur.lastrowid or 0)
        _bump(conn, "events_recorded", 1)
        if eid % 100 == 0 and eid > KEEP_EVENTS:
            taken = conn.execute(
                "SELECT MIN(cursor) FROM routes WHERE source = 'events'"
            ).fetchone()[0]
            bound = eid - KEEP_EVENTS
            if taken is not None:
                bound = min(bound, int(taken))
            conn.execute("DELETE FROM events WHERE id <= ?", (bound,))
    return eid


def dumps(value: Any) -> str:
    """Compact JSON text (for JSON columns)."""
    return orjson.dumps(value).decode()


# -- delivery bookkeeping: each function runs on the writer thread via Store.call ---------

_PACKET_COLS = "p.id, p.recv_ns, s.topic, s.iccid, p.payload"
_PACKETS = "{} p JOIN senders s ON s.id = p.sender"


def sender_id(conn: sqlite3.Connection, topic: str, iccid: str) -> int:
    """The `senders` row of (topic, ICCID), added if new (inside the caller's transaction)."""
    row = conn.execute(
        "SELECT id FROM senders WHERE topic = ? AND iccid = ?", (topic, iccid)
    ).fetchone()
    if row is not None:
        return int(row[0])
    return int(
        conn.execute("INSERT INTO senders(topic, iccid) VALUES (?, ?)", (topic, iccid)).lastrowid
        or 0
    )


def ensure_stats(conn: sqlite3.Connection, name: str) -> None:
    """A zeroed webhook_stats row for a webhook (inside the caller's transaction)."""
    conn.execute(
        f"INSERT OR IGNORE INTO webhook_stats({_STATS_COLUMNS}) VALUES (?, {_ZEROS})", (name,)
    )


def ensure_route(conn: sqlite3.Connection, name: str, source: str) -> int:
    """The route's cursor (last record id it has taken), creating the route at 0. A
    webhook keeps the source it was first seen with, as its cursor counts in it."""
    with transaction(conn):
        ensure_stats(conn, name)
        conn.execute(
            "UPDATE webhook_stats SET disabled = 0, disabled_reason = '',"
            " source = COALESCE(source, ?) WHERE name = ?",
            (source, name),
        )
    return int(conn.execute("SELECT cursor FROM routes WHERE name = ?", (name,)).fetchone()[0])


def set_cursor(conn: sqlite3.Connection, route: str, cursor: int) -> None:
    """Move a route's cursor (inside the caller's transaction)."""
    conn.execute("UPDATE webhook_stats SET cursor = ? WHERE name = ?", (cursor, route))


def fetch_packets(conn: sqlite3.Connection, after: int, limit: int) -> list[PacketRow]:
    """Unreleased packets with id > after, oldest first."""
    # A new route starts at 0: released rows still on disk are not for it either.
    after = max(after, released_mark(conn))
    out: list[PacketRow] = []
    for table, _lo, hi in packet_tables(conn):
        if hi <= after:
            continue
        out.extend(
            PacketRow(*r)
            for r in conn.execute(
                f"SELECT {_PACKET_COLS} FROM {_PACKETS.format(table)}"
                " WHERE p.id > ? ORDER BY p.id LIMIT ?",
                (after, limit - len(out)),
            )
        )
        if len(out) >= limit:
            break
    return out


def packets_by_ids(conn: sqlite3.Connection, ids: Sequence[int]) -> list[PacketRow]:
    """The packets still stored and unreleased among `ids` (drop_oldest may have evicted
    some), oldest first."""
    mark = released_mark(conn)
    wanted = sorted(i for i in ids if i > mark)
    out: list[PacketRow] = []
    for table, lo, hi in packet_tables(conn):
        mine = [i for i in wanted if lo <= i <= hi]
        for k in range(0, len(mine), 500):
            chunk = mine[k : k + 500]
            marks = ",".join("?" * len(chunk))
            out.extend(
                PacketRow(*r)
                for r in conn.execute(
                    f"SELECT {_PACKET_COLS} FROM {_PACKETS.format(table)}"
                    f" WHERE p.id IN ({marks}) ORDER BY p.id",
                    chunk,
                )
            )
    return out


def create_batches(
    conn: sqlite3.Connection,
    route: str,
    source: str,
    batches: Sequence[Batch],
    cursor: int,
    hits: int,
    rejects: Sequence[Reject] = (),
) -> list[int]:
    """Persist new batches and the dead letters of `rejects`, and advance the route's
    cursor past what they cover; returns each batch's row (Batch.seq)."""
    now = time.time_ns()
    seqs = []
    with transaction(conn):
        if rejects:
            _insert_rejects(conn, route, source, rejects, now)
        for b in batches:
            cur = conn.execute(
                "INSERT INTO batches(id, route, source, item_ids, first_id, count, single,"
                " body, attempts, created_ns, next_at_ns) VALUES (?,?,?,?,?,?,?,NULL,0,?,0)",
                (
                    b.id,
                    route,
                    source,
                    None if _consecutive(b.item_ids) else dumps(list(b.item_ids)),
                    b.item_ids[0],
                    len(b.item_ids),
                    int(b.single),
                    b.created_ns,
                ),
            )
            seqs.append(int(cur.lastrowid or 0))
        if hits:
            conn.execute(
                "UPDATE webhook_stats SET cursor = ?, hits = hits + ?, last_hit_ns = ?"
                " WHERE name = ?",
                (cursor, hits, now, route),
            )
        else:
            set_cursor(conn, route, cursor)
    return seqs


def _insert_rejects(
    conn: sqlite3.Connection, route: str, source: str, rejects: Sequence[Reject], now: int
) -> None:
    for r in rejects:
        conn.execute(
            "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, single, reason,"
            " status, excerpt, attempts, created_ns, topic, iccid, recv_ns)"
            " VALUES (?,?,?,?,1,1,?,NULL,?,0,?,?,?,?)",
            (
                route,
                source,
                r.webhook_id,
                r.body,
                r.reason,
                r.error[:300],
                now,
                r.topic,
                r.iccid,
                r.recv_ns,
            ),
        )
        _bump(conn, f"rejected_{r.reason}", 1)
    conn.execute("UPDATE webhook_stats SET dead = dead + ? WHERE name = ?", (len(rejects), route))
    if source == "packets":
        _bump(conn, "packets_dead", len(rejects))


# A batch's row: by its row number (the table has no index on webhook-id), checked
# against its webhook-id. Every Batch the gateway handles was stored or loaded with it.
_THIS_BATCH = "seq = ? AND id = ?"


def advance_cursor(conn: sqlite3.Connection, store: Store, route: str, cursor: int) -> None:
    """Move the cursor past records the route's filter did not want."""
    with transaction(conn):
        set_cursor(conn, route, cursor)
        store.release_packets(conn)


def orphan_batches(
    conn: sqlite3.Connection, configured: Sequence[str]
) -> list[tuple[str, int, int]]:
    """(route, batches, records) of open batches whose webhook is not configured now."""
    rows = conn.execute(
        "SELECT route, COUNT(*), COALESCE(SUM(count), 0) FROM batches GROUP BY route"
    ).fetchall()
    return [(r[0], int(r[1]), int(r[2])) for r in rows if r[0] not in set(configured)]


def _consecutive(ids: Sequence[int]) -> bool:
    return bool(ids) and ids[-1] - ids[0] == len(ids) - 1


def batch_item_ids(item_ids: str | None, first_id: int | None, count: int) -> tuple[int, ...]:
    """A batch row's record ids. Consecutive ones (a webhook without a filter) are kept as
    first_id and count only, with item_ids NULL: a JSON list of ten 7-digit ids is 80
    bytes of a 150-byte row, and about ten rows are added and deleted per commit at
    1,000 packets/s. A batch with a body and no records (a report notice, a replayed
    dead letter) has item_ids '[]'."""
    if item_ids is None:
        return tuple(range(first_id, first_id + count)) if first_id is not None else ()
    return tuple(orjson.loads(item_ids)) if item_ids else ()


def load_batches(conn: sqlite3.Connection, route: str, exclude: Sequence[str] = ()) -> list[Batch]:
    """Open batches of a route (after a restart, or re-queued by `dlq replay`)."""
    skip = set(exclude)
    out = []
    for r in conn.execute(
        "SELECT id, route, item_ids, single, body, attempts, created_ns, next_at_ns, count,"
        " retry_delay_ns, seq, first_id FROM batches WHERE route = ? ORDER BY seq",
        (route,),
    ):
        if r[0] in skip:
            continue
        ids = batch_item_ids(r[2], r[11], r[8])
        out.append(Batch(r[0], r[1], ids, bool(r[3]), r[4], r[5], r[6], r[7], r[8], r[9], r[10]))
    return out


def complete_batch(
    conn: sqlite3.Connection,
    store: Store,
    route: str,
    source: str,
    batch: Batch,
    records: int,
    decode_failed: int = 0,
) -> None:
    """The receiver accepted a batch: forget it, count it, release finished packets."""
    now = time.time_ns()
    with transaction(conn):
        conn.execute(f"DELETE FROM batches WHERE {_THIS_BATCH}", (batch.seq, batch.id))
        conn.execute(
            "UPDATE webhook_stats SET requests_ok = requests_ok + 1, delivered = delivered + ?,"
            " last_success_ns = ? WHERE name = ?",
            (records, now, route),
        )
        if source == "packets":
            _bump(conn, "packets_delivered", records)
        _bump(conn, "decode_failed", decode_failed)
        store.release_packets(conn)


def record_failure(
    conn: sqlite3.Connection,
    route: str,
    batch: Batch,
    attempts: int,
    next_at_ns: int,
    status: int | None,
    error: str,
    retry_delay_ns: int = 0,
) -> None:
    """One failed attempt: persist the attempt count and when (and after what delay) to
    try again."""
    now = time.time_ns()
    with transaction(conn):
        conn.execute(
            "UPDATE batches SET attempts = ?, next_at_ns = ?, retry_delay_ns = ?"
            f" WHERE {_THIS_BATCH}",
            (attempts, next_at_ns, retry_delay_ns, batch.seq, batch.id),
        )
        conn.execute(
            "UPDATE webhook_stats SET requests_failed = requests_failed + 1,"
            " retried = retried + ?, last_error_ns = ?, last_error_status = ?, last_error = ?"
            " WHERE name = ?",
            (1 if next_at_ns else 0, now, status, error[:300], route),
        )


def dead_letter(
    conn: sqlite3.Connection,
    store: Store,
    route: str,
    source: str,
    batch: Batch,
    body: bytes,
    records: int,
    reason: str,
    status: int | None,
    excerpt: str,
) -> None:
    """Move a batch that cannot be delivered to the dead-letter table, body and all."""
    with transaction(conn):
        conn.execute(
            "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, single, reason,"
            " status, excerpt, attempts, created_ns) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            (
                route,
                source,
                batch.id,
                body,
                records,
                int(batch.single),
                reason,
                status,
                excerpt[:300],
                batch.attempts,
                time.time_ns(),
            ),
        )
        conn.execute(f"DELETE FROM batches WHERE {_THIS_BATCH}", (batch.seq, batch.id))
        conn.execute("UPDATE webhook_stats SET dead = dead + ? WHERE name = ?", (records, route))
        if source == "packets":
            _bump(conn, "packets_dead", records)
        if reason in REJECT_REASONS:
            _bump(conn, f"rejected_{reason}", records)
        store.release_packets(conn)


def set_disabled(conn: sqlite3.Connection, route: str, reason: str) -> None:
    """Mark a webhook disabled (410 Gone) until the gateway restarts, and say so."""
    with transaction(conn):
        conn.execute(
            "UPDATE webhook_stats SET disabled = 1, disabled_reason = ? WHERE name = ?",
            (reason, route),
        )
    add_event(conn, "webhook_disabled", {"webhook": route, "reason": reason})


def list_dead_letters(
    conn: sqlite3.Connection, webhook: str | None = None, limit: int = 1000
) -> list[dict[str, Any]]:
    """Dead letters, newest first, without their bodies."""
    # A store `gateway dlq list` reads before the gateway migrated it has no size or hash.
    cols = {r[1] for r in conn.execute("PRAGMA table_info(dead_letters)")}
    extra = "size, sha256" if "sha256" in cols else "NULL, NULL"
    sql = (
        "SELECT id, webhook, source, webhook_id, count, reason, status, excerpt, attempts,"
        f" created_ns, topic, iccid, length(body), {extra} FROM dead_letters"
    )
    args: list[Any] = []
    if webhook is not None:
        sql += " WHERE webhook = ?"
        args.append(webhook)
    sql += " ORDER BY id DESC LIMIT ?"
    args.append(limit)
    keys = (
        "id",
        "webhook",
        "source",
        "webhook_id",
        "records",
        "reason",
        "status",
        "excerpt",
        "attempts",
        "created_ns",
        "topic",
        "iccid",
        "bytes",
        "size",  # an oversize packet's payload size; `bytes` of it are kept
        "sha256",  # of an oversize packet's whole payload
    )
    return [dict(zip(keys, r, strict=True)) for r in conn.execute(sql, args)]


def replay_dead_letters(
    conn: sqlite3.Connection, webhook: str | None = None, ids: Sequence[int] = ()
) -> int:
    """requeue_dead_letters; returns how many were re-queued."""
    return requeue_dead_letters(conn, webhook, ids).requeued


@dataclass(frozen=True, slots=True)
class Replay:
    requeued: int
    # Oversize packets whose letters keep only a prefix of the payload: left as they are.
    skipped: tuple[int, ...] = ()


def requeue_dead_letters(
    conn: sqlite3.Connection, webhook: str | None = None, ids: Sequence[int] = ()
) -> Replay:
    """Re-queue dead letters: webhook ones as batches (same body and webhook-id), rejected
    packets (too_large) back into the packets table when their letter holds the whole
    payload. One holding a prefix only cannot be delivered as it came: it is skipped and
    stays (`gateway dlq purge` removes it)."""
    sql = (
        "SELECT id, webhook, source, webhook_id, body, count, single, topic, iccid, recv_ns,"
        " size IS NOT NULL AND size != COALESCE(length(body), 0)"
        " FROM dead_letters WHERE 1=1"
    )
    args: list[Any] = []
    if webhook is not None:
        sql += " AND webhook = ?"
        args.append(webhook)
    if ids:
        sql += f" AND id IN ({','.join('?' * len(ids))})"
        args.extend(ids)
    now = time.time_ns()
    n = 0
    skipped: list[int] = []
    with transaction(conn):
        # A dead letter's batch is no longer in `batches`; this only guards against a
        # second row with its webhook-id, without a look through the table per letter.
        queued = {r[0] for r in conn.execute("SELECT id FROM batches")}
        # Replayed packets get ids like received ones, but do not count as received:
        # the mark moves past them.
        count_received(conn)
        pid, table = next_packet_row(conn)
        rows = conn.execute(sql, args).fetchall()
        for dl_id, hook, source, wid, body, count, single, topic, iccid, recv_ns, part in rows:
            if part:
                skipped.append(dl_id)
                continue
            if hook:
                if wid in queued:
                    conn.execute("DELETE FROM batches WHERE id = ?", (wid,))
                conn.execute(
                    "INSERT INTO batches(id, route, source, item_ids, first_id, count,"
                    " single, body, attempts, created_ns, next_at_ns)"
                    " VALUES (?,?,?,'[]',NULL,?,?,?,0,?,0)",
                    (wid, hook, source, count, single, body, now),
                )
                queued.add(wid)
                conn.execute(
                    "UPDATE webhook_stats SET dead = MAX(dead - ?, 0) WHERE name = ?", (count, hook)
                )
            else:
                conn.execute(
                    f"INSERT INTO {table}(id, recv_ns, sender, payload, size) VALUES (?,?,?,?,?)",
                    (
                        pid,
                        recv_ns or now,
                        sender_id(conn, topic or "", iccid or ""),
                        body,
                        len(body or b""),
                    ),
                )
                _set_mark(conn, COUNTED, pid)
                pid += 1
            conn.execute("DELETE FROM dead_letters WHERE id = ?", (dl_id,))
            n += 1
    return Replay(n, tuple(skipped))


def dead_letter_bytes(conn: sqlite3.Connection) -> int:
    """The bytes the dead letters hold, as counted toward gateway.max_buffer_mb (see
    DEAD_BYTES); 0 for a store older than schema 11."""
    return _mark(conn, DEAD_BYTES)


def evict_dead_letters(
    conn: sqlite3.Connection, max_bytes: int, before_ns: int, limit: int
) -> tuple[int, int]:
    """Delete the oldest dead letters (by id) while they hold more than max_bytes or were
    made before before_ns, at most `limit` of them, and count them in
    dead_letters_evicted (inside the caller's transaction); returns (letters, bytes).

    Oldest by id: a letter made after the clock was set back stops the age eviction
    until it is old enough too, rather than letters being looked for across the table."""
    excess = dead_letter_bytes(conn) - max_bytes
    rows = conn.execute(
        f"SELECT id, created_ns, {DEAD_LETTER_BYTES.format('dead_letters')} FROM dead_letters"
        " ORDER BY id LIMIT ?",
        (limit,),
    )
    last = n = freed = 0
    for rid, created_ns, size in rows:
        if freed >= excess and created_ns >= before_ns:
            break
        last, n, freed = rid, n + 1, freed + size
    if n:
        conn.execute("DELETE FROM dead_letters WHERE id <= ?", (last,))
        _bump(conn, "dead_letters_evicted", n)
    return n, freed


def purge_dead_letters(
    conn: sqlite3.Connection,
    webhook: str | None = None,
    before_ns: int = 0,
    ids: Sequence[int] = (),
    *,
    everything: bool = False,
) -> int:
    """Delete the dead letters of a webhook ('' for oversize packets), made before
    before_ns, with the given ids (all the filters given at once); every one only with
    `everything`, so that a filter left out by mistake deletes nothing. Returns how many."""
    where: list[str] = []
    args: list[Any] = []
    if webhook is not None:
        where.append("webhook = ?")
        args.append(webhook)
    if before_ns:
        where.append("created_ns < ?")
        args.append(before_ns)
    if ids:
        where.append(f"id IN ({','.join('?' * len(ids))})")
        args.extend(ids)
    if not where and not everything:
        raise StoreError("no dead letters chosen to purge (a webhook, an age or ids)")
    with transaction(conn):
        cur = conn.execute(
            "DELETE FROM dead_letters" + (" WHERE " + " AND ".join(where) if where else ""),
            args,
        )
    return int(cur.rowcount)

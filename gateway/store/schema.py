"""The store's schema: forward migrations from any older version to SCHEMA_VERSION.

Each migration runs in a transaction of its own with the version it reaches, so a
migration cut short (a power cut, a start killed) is rolled back and done again.
"""

from __future__ import annotations

import logging
import sqlite3
from collections.abc import Callable

import sqlite_utils

from gateway.errors import StoreError
from gateway.store.batches import _STATS_COLUMNS, _ZEROS
from gateway.store.counting import COUNTED, DEAD_BYTES, RELEASED
from gateway.store.db import get_meta, set_meta, transaction
from gateway.store.dead_letters import DEAD_LETTER_BYTES
from gateway.store.redelivery import LAST_EPOCH
from gateway.store.retention import RETAINED_TABLES, size_expression
from gateway.store.tables import PACKET_TABLES

log = logging.getLogger("gateway.store")

# The schema this gateway reads and writes; a store with a higher one is refused.
SCHEMA_VERSION = 12

# The longest a migration is expected to take (schema 4 copies the packet table, which
# with a large backlog on an SD card can outlast the unit's TimeoutStartSec): migrate
# says it starts one (on_progress), and the service asks systemd to wait this much longer.
MIGRATION_TIMEOUT_S = 1800


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
    # first_id and count with item_ids NULL (see records.batch_item_ids), which an older gateway
    # would read as a batch of no records. The version keeps it from opening the store.
    del db


# A route: a webhook's source and cursor, kept in its webhook_stats row (see _migrate_v9).
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


def _migrate_v12(db: sqlite_utils.Database) -> None:
    # The rows and bytes of each table under retention (see retention.size_expression),
    # counted once here and then kept by triggers, as the dead letters' bytes are: they
    # count toward max_buffer_mb, and `gateway status` shows them without a scan.
    db.execute(
        "CREATE TABLE table_sizes (name TEXT PRIMARY KEY, rows INTEGER NOT NULL,"
        " bytes INTEGER NOT NULL)"
    )
    # The page size is the store's for good (only a VACUUM could change it).
    page = int(db.execute("PRAGMA page_size").fetchone()[0])
    for table in RETAINED_TABLES:
        size = size_expression(table, page)
        db.execute(
            "INSERT INTO table_sizes(name, rows, bytes)"
            f" SELECT ?, COUNT(*), COALESCE(SUM({size.format(table)}), 0) FROM {table}",
            (table,),
        )
        add = f"rows = rows + 1, bytes = bytes + {size.format('NEW')}"
        remove = f"rows = rows - 1, bytes = bytes - {size.format('OLD')}"
        change = f"bytes = bytes - {size.format('OLD')} + {size.format('NEW')}"
        for event, sets in (("INSERT", add), ("DELETE", remove), ("UPDATE", change)):
            db.execute(
                f"CREATE TRIGGER {table}_size_{event.lower()} AFTER {event} ON {table}"
                f" BEGIN UPDATE table_sizes SET {sets} WHERE name = '{table}'; END"
            )
    # Redirects (307, 308) followed on the way to a webhook's answers.
    db.execute("ALTER TABLE webhook_stats ADD COLUMN redirects INTEGER NOT NULL DEFAULT 0")


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
    12: _migrate_v12,
}


def migrate(conn: sqlite3.Connection, on_progress: Callable[[str], None] | None = None) -> int:
    """Bring the schema to SCHEMA_VERSION with forward migrations; returns the version.

    `on_progress` is told what is being done before an existing store is migrated (not
    a new one, nor one up to date): the service passes it on to systemd, as a migration
    may take up to MIGRATION_TIMEOUT_S."""
    db = sqlite_utils.Database(conn)
    version = 0
    if db["meta"].exists():
        version = int(get_meta(conn, "schema_version", "0"))
    if version > SCHEMA_VERSION:
        raise StoreError(
            f"store schema version {version} is newer than this gateway ({SCHEMA_VERSION}); "
            "upgrade the gateway"
        )
    if version and version < SCHEMA_VERSION and on_progress is not None:
        on_progress(f"migrating the store to schema {SCHEMA_VERSION}")
    for v in range(version + 1, SCHEMA_VERSION + 1):
        with transaction(conn):
            MIGRATIONS[v](db)
            set_meta(conn, "schema_version", str(v))
        log.info("store migrated to schema version %d", v)
    return SCHEMA_VERSION

"""The SQLite store: packets in, delivery's bookkeeping, dead letters, counters, events.

What the rest of the gateway uses is named here. The modules beside this one, from the
bottom up:

- records: what goes in and comes out (Incoming, PacketRow, Batch, Reject, Replay)
- db: connections, transactions, `meta`, Reader (read-only, for worker threads)
- tables: the two packet tables and the ids each holds
- counting: the `counters` table (counters and marks)
- events: the `events` table
- packets: reading the packet tables (spans, next id, senders, fetches)
- dead_letters: the dead-letter table and its limits
- redelivery: recognising a broker's redeliveries
- pacing: when the writer commits (commit delay, broker cap, trickle)
- buffer: admitting, writing, evicting and releasing packets
- batches: delivery's bookkeeping (routes, batches, webhook_stats)
- retention: the side tables' age limit and the bytes they hold
- schema: the migrations
- settings: StoreSettings, the store's part of the configuration
- writer: the Store, its thread and group commit
"""

from gateway.store.batches import (
    advance_cursor,
    complete_batch,
    count_redirects,
    create_batches,
    dead_letter,
    ensure_route,
    ensure_stats,
    load_batches,
    orphan_batches,
    record_failure,
    set_disabled,
)
from gateway.store.counting import bump, counters
from gateway.store.db import Reader, connect, dumps, get_meta, set_meta, transaction
from gateway.store.dead_letters import (
    DEAD_LETTER_PREFIX_BYTES,
    dead_letter_bytes,
    dead_letter_counts,
    list_dead_letters,
    purge_dead_letters,
    replay_dead_letters,
    requeue_dead_letters,
)
from gateway.store.events import HEARTBEAT, add_event, add_heartbeat
from gateway.store.lag import backlog, lags, oldest_pending_s
from gateway.store.pacing import (
    CAP_MIN_PACKETS,
    TAKE_PARTS,
    TRICKLE_PACKETS,
    commit_delay_ms,
    commit_delay_slow_ms,
)
from gateway.store.packets import fetch_packets, packet_span, packets_by_ids
from gateway.store.records import REJECT_REASONS, Batch, Incoming, PacketRow, Reject, Replay
from gateway.store.retention import RETAINED_TABLES, retained_bytes, table_sizes
from gateway.store.schema import MIGRATION_TIMEOUT_S, migrate
from gateway.store.settings import StoreSettings
from gateway.store.writer import Store

__all__ = [
    "CAP_MIN_PACKETS",
    "DEAD_LETTER_PREFIX_BYTES",
    "HEARTBEAT",
    "MIGRATION_TIMEOUT_S",
    "REJECT_REASONS",
    "RETAINED_TABLES",
    "TAKE_PARTS",
    "TRICKLE_PACKETS",
    "Batch",
    "Incoming",
    "PacketRow",
    "Reader",
    "Reject",
    "Replay",
    "Store",
    "StoreSettings",
    "add_event",
    "add_heartbeat",
    "advance_cursor",
    "backlog",
    "bump",
    "commit_delay_ms",
    "commit_delay_slow_ms",
    "complete_batch",
    "connect",
    "count_redirects",
    "counters",
    "create_batches",
    "dead_letter",
    "dead_letter_bytes",
    "dead_letter_counts",
    "dumps",
    "ensure_route",
    "ensure_stats",
    "fetch_packets",
    "get_meta",
    "lags",
    "list_dead_letters",
    "load_batches",
    "migrate",
    "oldest_pending_s",
    "orphan_batches",
    "packet_span",
    "packets_by_ids",
    "purge_dead_letters",
    "record_failure",
    "replay_dead_letters",
    "requeue_dead_letters",
    "retained_bytes",
    "set_disabled",
    "set_meta",
    "table_sizes",
    "transaction",
]

"""Delivery lag from a real store: the oldest record a webhook has not delivered, from
its cursor and its open batches; heartbeats that supersede each other in the events
table."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

from gateway import store as st
from gateway.store import Incoming, Store, transaction
from gateway.store.batches import set_cursor

S = 1_000_000_000


def _route(conn: sqlite3.Connection, name: str, source: str, cursor: int) -> None:
    st.ensure_route(conn, name, source)
    with transaction(conn):
        set_cursor(conn, name, cursor)


def test_a_packet_webhooks_lag_is_its_oldest_packet_in_a_batch_or_after_its_cursor(
    tmp_path: Path,
) -> None:
    now = time.time_ns()
    with Store.open(tmp_path) as store:
        for i in range(5):  # received 50, 40, 30, 20 and 10 s ago
            store.submit_packet(
                Incoming("devices/x/up", b"p", "", i + 1, False, 1, recv_ns=now - (50 - 10 * i) * S)
            )
        store.flush()
        store.set_packet_routes(["cloud"])
        store.run_sync(_route, "cloud", "packets", 0)
        assert store.run_sync(st.oldest_pending_s, "cloud", now) == 50.0
        assert store.run_sync(st.backlog, "cloud") == 5

        # Packets 1 and 2 taken into a batch: still pending, still the oldest.
        batch = st.Batch("msg_a", "cloud", (1, 2), False, None, 0, now, 0, 2)
        (seq,) = store.run_sync(st.create_batches, "cloud", "packets", [batch], 2, 2)
        assert store.run_sync(st.oldest_pending_s, "cloud", now) == 50.0
        assert store.run_sync(st.backlog, "cloud") == 5

        # Accepted: the oldest pending one is packet 3, after the cursor.
        done = st.Batch("msg_a", "cloud", (1, 2), False, None, 0, now, 0, 2, seq=seq)
        store.run_sync(st.complete_batch, store, "cloud", "packets", done, 2)
        assert store.run_sync(st.oldest_pending_s, "cloud", now) == 30.0
        assert store.run_sync(st.backlog, "cloud") == 3

        # A clock set back makes records look newer, never "negative" lag.
        assert store.run_sync(st.oldest_pending_s, "cloud", now - 3600 * S) == 0.0

        # Everything taken and accepted: nothing pending reads 0.
        store.run_sync(st.advance_cursor, store, "cloud", 5)
        assert store.run_sync(st.oldest_pending_s, "cloud", now) == 0.0
        assert store.run_sync(st.backlog, "cloud") == 0
        assert store.run_sync(st.lags, ["cloud", "unknown"], now) == {"cloud": 0.0, "unknown": 0.0}


def _report_notice(conn: sqlite3.Connection, created_ns: int) -> None:
    with transaction(conn):
        conn.execute(
            "INSERT INTO batches(id, route, source, item_ids, first_id, count, single, body,"
            " attempts, created_ns, next_at_ns) VALUES ('msg_r', 'daily', 'reports', '[]',"
            " NULL, 1, 1, x'7b7d', 0, ?, 0)",
            (created_ns,),
        )


def test_an_events_webhooks_lag_and_a_report_notice_that_waits(tmp_path: Path) -> None:
    now = time.time_ns()
    with Store.open(tmp_path) as store:
        store.run_sync(st.add_event, "sim_changed", {}, now - 90 * S)
        store.run_sync(st.add_event, "registration_lost", {}, now - 30 * S)
        store.run_sync(_route, "ops", "events", 0)
        assert store.run_sync(st.oldest_pending_s, "ops", now) == 90.0
        store.run_sync(_route, "ops", "events", 1)
        assert store.run_sync(st.oldest_pending_s, "ops", now) == 30.0

        store.run_sync(_route, "daily", "reports", 0)
        assert store.run_sync(st.oldest_pending_s, "daily", now) == 0.0
        store.run_sync(_report_notice, now - 600 * S)
        assert store.run_sync(st.oldest_pending_s, "daily", now) == 600.0
        assert store.run_sync(st.backlog, "daily") == 1


def _heartbeats(conn: sqlite3.Connection) -> list[int]:
    return [r[0] for r in conn.execute("SELECT id FROM events WHERE kind = 'gateway_heartbeat'")]


def test_a_heartbeat_supersedes_the_earlier_ones_unless_a_batch_holds_them(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path) as store:
        store.run_sync(st.add_event, "gateway_started", {})
        recorded = store.run_sync(st.counters)["events_recorded"]
        first = store.run_sync(st.add_heartbeat, {"n": 1})
        second = store.run_sync(st.add_heartbeat, {"n": 2})
        assert store.run_sync(_heartbeats) == [second]
        # An events webhook took the second into a batch that waits for its receiver:
        # it is sent again with the same body, so its row stays until the batch is done.
        store.run_sync(_route, "ops", "events", 0)
        batch = st.Batch("msg_h", "ops", (second,), True, None, 0, time.time_ns(), 0, 1)
        store.run_sync(st.create_batches, "ops", "events", [batch], second, 1)
        third = store.run_sync(st.add_heartbeat, {"n": 3})
        assert store.run_sync(_heartbeats) == [second, third]
        # Heartbeats are not counted as recorded events, and leave the others alone.
        assert store.run_sync(st.counters)["events_recorded"] == recorded
        kinds = store.run_sync(lambda c: [r[0] for r in c.execute("SELECT kind FROM events")])
        assert kinds.count("gateway_started") == 1
        assert first not in store.run_sync(_heartbeats)

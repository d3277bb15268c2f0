"""The store's writer thread: calls queued together commit together, each on its own terms."""

from __future__ import annotations

import hashlib
import logging
import shutil
import socket
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlite_utils

from gateway import store as st
from gateway.runtime.service import migration_notice
from gateway.store import Incoming, Store, buffer, redelivery, transaction
from gateway.store.batches import set_cursor
from gateway.store.counting import COUNTED
from gateway.store.db import PAGE_SIZE
from gateway.store.packets import sender_id
from gateway.store.records import digest_of
from gateway.store.schema import MIGRATIONS, SCHEMA_VERSION
from gateway.store.tables import PACKET_TABLES
from gateway.web import status as status_mod
from tests.conftest import wait_for


def _add(conn: sqlite3.Connection, key: str) -> str:
    with transaction(conn):
        conn.execute("INSERT INTO meta(key, value) VALUES (?, 'x')", (key,))
    return key


def _add_then_fail(conn: sqlite3.Connection, key: str) -> None:
    conn.execute("INSERT INTO meta(key, value) VALUES (?, 'x')", (key,))
    raise ValueError(f"{key} failed after writing")


def _keys(db: Path) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT key FROM meta WHERE value = 'x'")}
    finally:
        conn.close()


def test_queued_calls_commit_together_and_a_failing_one_leaves_the_others(
    tmp_path: Path,
) -> None:
    db = tmp_path / "gateway.db"
    store = Store(db)
    try:
        gate = threading.Event()
        # Hold the writer so that everything below is queued while it waits: the next
        # turn of its loop takes all of it as one group.
        blocker = store.call(lambda _c: gate.wait(10))
        seen_at_result: dict[str, set[str]] = {}
        futures = []
        for i in range(20):
            key = f"k{i}"
            fn = _add_then_fail if i == 7 else _add
            fut = store.call(fn, key)
            # What another connection sees when the caller learns the result.
            fut.add_done_callback(lambda _f, k=key: seen_at_result.setdefault(k, _keys(db)))
            futures.append(fut)
        gate.set()
        assert blocker.result(10) is True
        for i, fut in enumerate(futures):
            if i == 7:
                with pytest.raises(ValueError, match="k7 failed after writing"):
                    fut.result(10)
            else:
                assert fut.result(10) == f"k{i}"
        expected = {f"k{i}" for i in range(20) if i != 7}
        # The failed call's own write is rolled back; the others' are kept.
        assert _keys(db) == expected
        # Each caller hears back only once its change is committed (visible elsewhere).
        # (Callbacks run on the writer thread, possibly after result() has returned here.)
        wait_for(lambda: len(seen_at_result) == 20, 10, "the done callbacks")
        for i in range(20):
            if i != 7:
                assert f"k{i}" in seen_at_result[f"k{i}"]
    finally:
        store.close()


def test_a_group_that_cannot_commit_runs_its_calls_one_by_one(tmp_path: Path) -> None:
    db = tmp_path / "gateway.db"
    store = Store(db)
    try:
        gate = threading.Event()
        blocker = store.call(lambda _c: gate.wait(10))

        def end_the_transaction(conn: sqlite3.Connection) -> str:
            # Ends the group's transaction under it, as SQLite does on an I/O error: the
            # group cannot commit, so every call is run again on its own.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
                raise sqlite3.OperationalError("disk I/O error")
            return "alone"

        first = store.call(_add, "before")
        middle = store.call(end_the_transaction)
        last = store.call(_add, "after")
        gate.set()
        assert blocker.result(10) is True
        assert first.result(10) == "before"
        assert middle.result(10) == "alone"
        assert last.result(10) == "after"
        assert _keys(db) == {"before", "after"}
    finally:
        store.close()


def _packet(i: int) -> Incoming:
    return Incoming("devices/x/up", f"p{i}".encode(), "", i + 1, False, 1)


def _stored(conn: sqlite3.Connection) -> int:
    return int(conn.execute("SELECT COUNT(*) FROM packets").fetchone()[0])


def test_commit_delay_lets_later_packets_share_a_commit_and_a_store_call_ends_it(
    tmp_path: Path,
) -> None:
    """gateway.commit_delay_ms: packets that come within the delay are committed (and
    acknowledged) together; delivery or status asking the store does not wait for it."""
    with Store.open(tmp_path, commit_delay_s=30.0) as store:
        groups: list[list[bytes]] = []
        store.on_committed = lambda ps: groups.append([p.payload for p in ps])
        for i in range(3):
            store.submit_packet(_packet(i))
        began = time.monotonic()
        assert store.run_sync(_stored) == 3  # committed before the call ran
        assert time.monotonic() - began < 15  # far from the 30 s delay
        assert groups == [[b"p0", b"p1", b"p2"]]

    # Once a commit has commit_delay_max_packets (the service asks for half the MQTT
    # receive maximum: no more would come before PUBACKs), it goes without waiting out
    # the delay.
    with Store.open(tmp_path / "many", commit_delay_s=30.0, commit_delay_max_packets=20) as store:
        groups.clear()
        store.on_committed = lambda ps: groups.append([p.payload for p in ps])
        began = time.monotonic()
        for i in range(21):
            store.submit_packet(_packet(i))
        wait_for(lambda: groups, what="a commit before the delay ran out")
        assert time.monotonic() - began < 15
        assert len(groups[0]) >= 20

    with Store.open(tmp_path / "short", commit_delay_s=0.2) as store:
        committed_at: list[float] = []
        store.on_committed = lambda ps: committed_at.append(time.monotonic())
        submitted = time.monotonic()
        store.submit_packet(_packet(0))
        wait_for(lambda: committed_at, what="a lone packet committed once the delay ran out")
        assert committed_at[0] - submitted >= 0.19


def _feed_capped(store: Store, cap: int, rounds: int) -> list[float]:
    """Feeds the store like a broker that sends at most `cap` packets ahead of their
    PUBACKs: each round sends `cap` and waits until all of them are committed. Returns
    how long each round took."""
    committed = threading.Semaphore(0)
    store.on_committed = lambda ps: [committed.release() for _ in ps]
    took = []
    for r in range(rounds):
        began = time.monotonic()
        for i in range(cap):
            store.submit_packet(_packet(r * cap + i))
        for _ in range(cap):  # their PUBACKs: only then does the broker send more
            assert committed.acquire(timeout=20)
        took.append(time.monotonic() - began)
    return took


def test_a_broker_that_sends_no_more_until_pubacks_go_does_not_hold_every_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """AWS IoT Core sends a client at most 100 packets ahead of their PUBACKs, EMQX an
    MQTT 3.1.1 client `max_inflight` (32 by default): fewer than the commit delay waits
    for. A feeder does the same here with 12: the first two commits wait out the delay, the later ones go as soon as
    they have the 12 packets that can come."""
    caplog.set_level(logging.INFO, logger="gateway.store")
    cap, rounds = 12, 6
    with Store.open(tmp_path, commit_delay_s=2.0) as store:
        took = _feed_capped(store, cap, rounds)
        assert store.broker_cap == cap
        assert store.run_sync(_stored) == cap * rounds
    assert all(t >= 1.9 for t in took[:2]), took
    assert all(t < 1.0 for t in took[2:]), took
    assert "the broker sends at most 12 packets ahead of their PUBACKs" in caplog.text


def test_a_steady_stream_a_trickle_or_a_full_buffer_is_not_taken_for_a_broker_cap(
    tmp_path: Path,
) -> None:
    """Waits that run out with packets still coming, or with a few packets, or with the
    packets a full buffer holds back, teach the writer nothing: it keeps waiting out the
    delay for more."""
    with Store.open(tmp_path, commit_delay_s=0.1) as store:
        for i in range(150):  # 1.5 s at 100 packets/s: each commit's last packet is late in it
            store.submit_packet(_packet(i))
            time.sleep(0.01)
        for i in range(3):  # a trickle: 2 packets every 0.3 s
            store.submit_packet(_packet(i))
            store.submit_packet(_packet(i))
            time.sleep(0.3)
        store.flush()
        assert store.broker_cap == 0

    with Store.open(tmp_path / "full", commit_delay_s=0.1, max_buffer_bytes=20) as store:
        for i in range(30):  # 10 fit; 20 are held back, and tried again every round
            store.submit_packet(_packet(i))
        wait_for(lambda: store.run_sync(_stored) == 10, what="the buffer full")
        # Five rounds of the writer or so, more than the two that would teach it a cap.
        # (Nothing else may reach the store meanwhile: a store call ends a wait early.)
        time.sleep(1.5)
        assert store.broker_cap == 0
        assert store.run_sync(_stored) == 10


def test_a_trickle_of_packets_waits_on_for_more_to_share_its_commit(tmp_path: Path) -> None:
    """gateway.commit_delay_ms = "auto" at 10 packets/s: a 100 ms wait held one or two
    packets, so nearly each paid for a commit (an fsync, the bookkeeping pages). A wait
    that runs out holding fewer than TRICKLE_PACKETS goes on, up to the slow delay in
    all, until that many have come; a store call, deferred or not, ends it at once."""
    with Store.open(tmp_path, commit_delay_s=0.1, commit_delay_slow_s=1.0) as store:
        groups: list[tuple[float, list[bytes]]] = []
        store.on_committed = lambda ps: groups.append((time.monotonic(), [p.payload for p in ps]))
        began = time.monotonic()
        for i in range(3):  # one every 0.3 s: each well past the 100 ms delay
            store.submit_packet(_packet(i))
            time.sleep(0.3)
        wait_for(lambda: groups, what="the trickle's commit")
        assert [g for _, g in groups] == [[b"p0", b"p1", b"p2"]]
        assert groups[0][0] - began >= 0.95
        assert store.commits == 1

        # TRICKLE_PACKETS packets end the stretched wait: no need to wait on.
        groups.clear()
        began = time.monotonic()
        store.submit_packet(_packet(0))
        time.sleep(0.3)
        for i in range(1, st.TRICKLE_PACKETS):
            store.submit_packet(_packet(i))
        wait_for(lambda: groups, what="a commit of a trickle's worth")
        assert len(groups[0][1]) == st.TRICKLE_PACKETS
        assert groups[0][0] - began < 0.8

        # A store call ends it, and so does a deferred one (a batch taken lazily must
        # not wait for a trickle); a deferred call alone waits the 100 ms only.
        for key, submit in (("called", store.call), ("deferred", store.defer)):
            groups.clear()
            began = time.monotonic()
            store.submit_packet(_packet(0))
            time.sleep(0.3)
            assert submit(_add, key).result(10) == key
            assert time.monotonic() - began < 0.8
            assert [g for _, g in groups] == [[b"p0"]]
        began = time.monotonic()
        assert store.defer(_add, "alone").result(10) == "alone"
        assert time.monotonic() - began < 0.8

    # A delay set in the config (commit_delay_slow_s not above it) is not stretched.
    with Store.open(tmp_path / "set", commit_delay_s=0.1) as store:
        committed_at: list[float] = []
        store.on_committed = lambda ps: committed_at.append(time.monotonic())
        began = time.monotonic()
        store.submit_packet(_packet(0))
        wait_for(lambda: committed_at, what="a lone packet's commit")
        assert committed_at[0] - began < 0.8


def test_a_broker_capping_below_a_trickle_does_not_stretch_every_commit(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """mosquitto's max_inflight_messages may be set to a few, or to 1 to keep order: the
    broker then sends no more until PUBACKs go, and every stretched wait would stall the
    stream. Two stretched waits that ran out holding the same packets, all in their
    first half, teach the writer that number: a commit holding it waits the plain delay."""
    caplog.set_level(logging.INFO, logger="gateway.store")
    cap, rounds = 3, 6
    with Store.open(tmp_path, commit_delay_s=0.1, commit_delay_slow_s=1.0) as store:
        took = _feed_capped(store, cap, rounds)
        assert store.trickle_cap == cap
        assert store.broker_cap == 0  # below CAP_MIN_PACKETS: the plain delay still holds
    assert all(t >= 0.95 for t in took[:2]), took
    assert all(t < 0.6 for t in took[2:]), took
    assert "a commit holding 3 no longer waits on for a trickle" in caplog.text


def test_deferred_bookkeeping_joins_the_packets_commit_without_ending_its_delay(
    tmp_path: Path,
) -> None:
    """Store.defer (a delivered batch's completion, new batches): while packets wait for
    the commit delay, the call waits with them and commits in the same transaction (one
    fsync for both). With no packet waiting it waits the delay for packets to share its
    commit, and no longer."""
    db = tmp_path / "gateway.db"
    with Store.open(tmp_path, commit_delay_s=0.5) as store:
        at_commit: list[set[str]] = []
        store.on_committed = lambda _ps: at_commit.append(_keys(db))
        began = time.monotonic()
        store.submit_packet(_packet(0))
        # Most likely the writer is waiting out the delay by now, and the call comes in
        # during the wait (it must not end it); if not, both are taken at once.
        time.sleep(0.1)
        done = store.defer(_add, "completed")
        assert done.result(10) == "completed"
        # It did not cut the packet's delay short, as a store call does …
        assert time.monotonic() - began >= 0.45
        # … and its write was committed with the packet: visible when the packet was
        # acknowledged, not in a commit of its own after it.
        wait_for(lambda: at_commit, what="the packet's commit")
        assert at_commit == [{"completed"}]
        assert store.run_sync(_stored) == 1

    db = tmp_path / "alone" / "gateway.db"
    with Store.open(db.parent, commit_delay_s=1.0) as store:
        at_commit.clear()
        store.on_committed = lambda _ps: at_commit.append(_keys(db))
        commits = store.commits
        began = time.monotonic()
        done = store.defer(_add, "alone")
        time.sleep(0.2)
        store.submit_packet(_packet(1))
        assert done.result(10) == "alone"
        # One commit for both, after the delay the call began …
        assert 0.9 <= time.monotonic() - began < 5
        assert at_commit == [{"alone"}]
        assert store.commits == commits + 1
        # … and with no packet coming, no longer than the delay either.
        began = time.monotonic()
        assert store.defer(_add, "quiet").result(10) == "quiet"
        assert 0.9 <= time.monotonic() - began < 5


def test_a_deferred_call_that_fails_costs_the_packets_of_its_commit_nothing(
    tmp_path: Path,
) -> None:
    db = tmp_path / "gateway.db"

    def end_the_transaction(conn: sqlite3.Connection) -> str:
        # As SQLite does on an I/O error: the whole group is rolled back under it.
        if conn.in_transaction:
            conn.execute("ROLLBACK")
            raise sqlite3.OperationalError("disk I/O error")
        return "alone"

    def add_then_fail(conn: sqlite3.Connection, key: str) -> None:
        with transaction(conn):
            conn.execute("INSERT INTO meta(key, value) VALUES (?, 'x')", (key,))
            raise ValueError(f"{key} failed after writing")

    with Store.open(tmp_path, commit_delay_s=0.3) as store:
        acked: list[bytes] = []
        store.on_committed = lambda ps: acked.extend(p.payload for p in ps)
        store.submit_packet(_packet(0))
        failing = store.defer(add_then_fail, "failing")
        store.submit_packet(_packet(1))
        aborting = store.defer(end_the_transaction)
        store.submit_packet(_packet(2))
        with pytest.raises(ValueError, match="failing failed after writing"):
            failing.result(10)
        # The group could not commit: the packets were committed on their own, then
        # the call ran again alone.
        assert aborting.result(10) == "alone"
        wait_for(lambda: len(acked) == 3, what="all three packets acknowledged")
        assert sorted(acked) == [b"p0", b"p1", b"p2"]
        assert store.run_sync(_stored) == 3
    assert _keys(db) == set()


def _store_at_schema(db: Path, version: int) -> sqlite3.Connection:
    """A store as a gateway of that schema version left it."""
    conn = st.connect(db)
    sdb = sqlite_utils.Database(conn)
    for v in range(1, version + 1):
        with transaction(conn):
            MIGRATIONS[v](sdb)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(v),))
    return conn


def test_a_schema_2_store_is_migrated_keeping_its_open_batches(tmp_path: Path) -> None:
    """An upgrade from schema 2: the open batch stays, with no stored retry delay (a
    restart then caps its wait by the retry policy, as schema 2 did)."""
    db = tmp_path / "gateway.db"
    conn = _store_at_schema(db, 2)
    with transaction(conn):
        conn.execute(
            "INSERT INTO batches(id, route, source, item_ids, first_id, count, single, body,"
            " attempts, created_ns, next_at_ns)"
            " VALUES ('msg_old', 'cloud', 'packets', '[]', NULL, 1, 1, x'7b7d', 2, 1, 5)"
        )
    conn.close()

    with Store.open(tmp_path) as store:
        assert store.run_sync(
            lambda c: c.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        ) == (str(SCHEMA_VERSION),)
        (b,) = store.run_sync(st.load_batches, "cloud")
    assert (b.id, b.attempts, b.next_at_ns, b.retry_delay_ns) == ("msg_old", 2, 5, 0)


def test_a_schema_3_store_keeps_its_packets_ids_and_count_across_the_migration(
    tmp_path: Path,
) -> None:
    """Schema 4 drops AUTOINCREMENT from `packets`: the rows, the count of received
    packets and the ids already handed out (a webhook's cursor) carry over."""
    conn = _store_at_schema(tmp_path / "gateway.db", 3)
    with transaction(conn):
        for i in range(10):  # as schema 3 stored them: the counter bumped with each
            conn.execute(
                "INSERT INTO packets(recv_ns, topic, iccid, payload, size)"
                " VALUES (?, 't', '', ?, 2)",
                (i, f"p{i}".encode()),
            )
        st.bump(conn, "packets_received", 10)
        conn.execute("DELETE FROM packets WHERE id > 7")  # 8-10 delivered and released
    conn.close()

    with Store.open(tmp_path) as store:
        rows = store.run_sync(lambda c: c.execute("SELECT id, payload FROM packets").fetchall())
        assert rows == [(i + 1, f"p{i}".encode()) for i in range(7)]
        assert store.run_sync(st.counters)["packets_received"] == 10
        sql = store.run_sync(
            lambda c: c.execute("SELECT sql FROM sqlite_schema WHERE name = 'packets'").fetchone()
        )[0]
        assert "AUTOINCREMENT" not in sql
        store.submit_packet(_packet(0))
        store.flush()
        # Id 11: 8-10 were handed out before, and a cursor may stand at 10.
        assert store.run_sync(lambda c: c.execute("SELECT MAX(id) FROM packets").fetchone()) == (
            11,
        )
        assert store.run_sync(st.counters)["packets_received"] == 11


def test_a_schema_4_store_keeps_each_packets_topic_and_iccid_across_the_migration(
    tmp_path: Path,
) -> None:
    """Schema 5 keeps topic and ICCID once per sender: every packet still reads back
    with its own, under its own id, and the open batch still finds its packets."""
    conn = _store_at_schema(tmp_path / "gateway.db", 4)
    senders = [("devices/8981100000000000012/up", "8981100000000000012"), ("legacy/x", "")]
    with transaction(conn):
        for i in range(6):
            topic, iccid = senders[i % 2]
            conn.execute(
                "INSERT INTO packets(id, recv_ns, topic, iccid, payload, size)"
                " VALUES (?, ?, ?, ?, ?, 2)",
                (i + 3, 1000 + i, topic, iccid, f"p{i}".encode()),
            )
    conn.close()

    with Store.open(tmp_path) as store:
        rows = store.run_sync(st.fetch_packets, 0, 100)
        assert [(r.id, r.recv_ns, r.topic, r.iccid, r.payload) for r in rows] == [
            (i + 3, 1000 + i, *senders[i % 2], f"p{i}".encode()) for i in range(6)
        ]
        assert [r.id for r in store.run_sync(st.packets_by_ids, [4, 6])] == [4, 6]
        assert store.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM senders").fetchone()) == (
            2,
        )
        # A new packet from a known sender takes that sender's row.
        store.submit_packet(Incoming(senders[0][0], b"new", senders[0][1], 1, False, 1))
        store.flush()
        assert store.run_sync(st.fetch_packets, 8, 10)[0].topic == senders[0][0]
        assert store.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM senders").fetchone()) == (
            2,
        )


def test_a_schema_5_store_keeps_its_open_batches_in_order_and_finds_each_by_its_row(
    tmp_path: Path,
) -> None:
    """Schema 6 keys `batches` by a row number, with no index on webhook-id or route:
    open batches carry over in the order they were made, with their retry state, and a
    retry, a completion and a new batch each touch their own row only."""
    conn = _store_at_schema(tmp_path / "gateway.db", 5)
    with transaction(conn):
        for wid, attempts, next_at in (("msg_c", 0, 0), ("msg_a", 3, 77), ("msg_b", 0, 0)):
            conn.execute(
                "INSERT INTO batches(id, route, source, item_ids, first_id, count, single,"
                " body, attempts, created_ns, next_at_ns, retry_delay_ns)"
                " VALUES (?, 'cloud', 'reports', '[]', NULL, 1, 1, x'7b7d', ?, 1, ?, ?)",
                (wid, attempts, next_at, next_at),
            )
    conn.close()

    with Store.open(tmp_path) as store:
        c, a, b = store.run_sync(st.load_batches, "cloud")
        assert [x.id for x in (c, a, b)] == ["msg_c", "msg_a", "msg_b"]
        assert (a.attempts, a.next_at_ns, a.retry_delay_ns, a.body) == (3, 77, 77, b"{}")
        assert len({c.seq, a.seq, b.seq}) == 3
        indexes = store.run_sync(
            lambda c: c.execute(
                "SELECT name FROM sqlite_schema WHERE type = 'index' AND tbl_name = 'batches'"
            ).fetchall()
        )
        assert indexes == []

        store.run_sync(st.record_failure, "cloud", b, 1, 99, 500, "HTTP 500", 99)
        store.run_sync(st.complete_batch, store, "cloud", "reports", c, 1)
        new = st.Batch("msg_new", "cloud", (5,), True, None, 0, 2, 0, 1)
        (seq,) = store.run_sync(st.create_batches, "cloud", "packets", [new], 5, 1)
        after = store.run_sync(st.load_batches, "cloud")
    assert [(x.id, x.attempts, x.next_at_ns) for x in after] == [
        ("msg_a", 3, 77),
        ("msg_b", 1, 99),
        ("msg_new", 0, 0),
    ]
    assert after[-1].seq == seq > b.seq


def test_a_batch_of_consecutive_records_keeps_no_id_list_and_loads_whole(
    tmp_path: Path,
) -> None:
    """Schema 8: a batch of consecutive ids (any webhook without a filter) is kept as its
    first id and count, 80 bytes less per row for ten 7-digit ids; one with gaps (a
    filter) keeps its list, and so do the batches of a schema 7 store."""
    conn = _store_at_schema(tmp_path / "gateway.db", 7)
    with transaction(conn):
        conn.execute(
            "INSERT INTO batches(id, route, source, item_ids, first_id, count, single,"
            " body, attempts, created_ns, next_at_ns) VALUES"
            " ('msg_old', 'cloud', 'packets', '[7,8,9]', 7, 3, 0, NULL, 0, 1, 0)"
        )
    conn.close()
    run = [1_000_001 + i for i in range(10)]
    gaps = (1_000_011, 1_000_013, 1_000_020)
    with Store.open(tmp_path) as store:
        made = [
            st.Batch(wid, "cloud", ids, False, None, 0, 2, 0, len(ids))
            for wid, ids in (("msg_run", tuple(run)), ("msg_gaps", gaps), ("msg_one", (5,)))
        ]
        store.run_sync(st.create_batches, "cloud", "packets", made, 1_000_020, 14)
        lists = store.run_sync(
            lambda c: c.execute("SELECT id, item_ids FROM batches ORDER BY seq").fetchall()
        )
    assert lists == [
        ("msg_old", "[7,8,9]"),
        ("msg_run", None),
        ("msg_gaps", "[1000011,1000013,1000020]"),
        ("msg_one", None),
    ]
    with Store.open(tmp_path) as store:
        loaded = store.run_sync(st.load_batches, "cloud")
    assert [(b.id, b.item_ids, b.count) for b in loaded] == [
        ("msg_old", (7, 8, 9), 3),
        ("msg_run", tuple(run), 10),
        ("msg_gaps", gaps, 3),
        ("msg_one", (5,), 1),
    ]


def _release_up_to(store: Store, cursor: int) -> int:
    """What a webhook does once it has delivered every packet up to `cursor`."""
    store.set_packet_routes(["cloud"])

    def release(conn: sqlite3.Connection) -> int:
        with transaction(conn):
            st.ensure_route(conn, "cloud", "packets")
            set_cursor(conn, "cloud", cursor)
            return store.release_packets(conn)

    return store.run_sync(release)


def _wal_frames(store: Store, fn: Callable[[], object]) -> int:
    """Pages the store wrote to its WAL while fn ran."""
    store.run_sync(lambda c: c.execute("PRAGMA wal_autocheckpoint = 0"))
    store.run_sync(lambda c: c.execute("PRAGMA wal_checkpoint(TRUNCATE)"))
    fn()
    wal = store.path.with_name(store.path.name + "-wal")
    return (wal.stat().st_size - 32) // (PAGE_SIZE + 24)


def test_delivered_packets_are_freed_without_writing_their_pages_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every packet in a table is delivered, the table is emptied whole: the release
    writes a few pages, not each page of packets once more (SD card wear). (The last
    ten rows' keys go to `inflight` on the way: they are the redelivery window, and
    their table has waited long enough, PIN_WAIT_S = 0.)"""
    monkeypatch.setattr(redelivery, "PIN_WAIT_S", 0.0)
    with Store.open(tmp_path, redelivery_window=10) as store:
        for i in range(2000):
            store.submit_packet(Incoming("devices/x/up", bytes(71), "", i + 1, False, 1))
        store.flush()
        frames = _wal_frames(store, lambda: _release_up_to(store, 2000))
        assert store.run_sync(_stored) == 0
        free = store.run_sync(lambda c: c.execute("PRAGMA freelist_count").fetchone()[0])
    # 2,000 rows of 71-byte payloads fill about 180 pages; row by row, each was written.
    assert free > 150
    assert frames < 15, f"{frames} WAL pages to release 2,000 packets"


def test_released_packets_left_on_disk_are_never_read_again(tmp_path: Path) -> None:
    """Delivered packets wait on disk until the rest of their table is delivered too:
    no route (not even a new one), count or restart may see them."""
    payload = bytes(10)
    with Store.open(tmp_path) as store:
        for first in (0, 10):  # two commits: the second one goes to the other table
            for i in range(first, first + 10):
                store.submit_packet(Incoming("devices/x/up", payload, "", i + 1, False, 1))
            store.flush()
        assert _release_up_to(store, 5) == 5
        # A webhook added now starts at 0, after the packets delivered already.
        assert [r.id for r in store.run_sync(st.fetch_packets, 0, 100)] == list(range(6, 21))
        assert [r.id for r in store.run_sync(st.fetch_packets, 0, 3)] == [6, 7, 8]
        assert [r.id for r in store.run_sync(st.packets_by_ids, [2, 7, 15])] == [7, 15]
        assert store.run_sync(_stored) == 15
        assert store.buffer_bytes == 15 * len(payload)
        assert store.run_sync(st.packet_span) == (6, 20)
    assert status_mod.read(tmp_path / "gateway.db")["packets"]["pending"] == 15

    with Store.open(tmp_path) as store:
        assert store.buffer_bytes == 15 * len(payload)
        assert store.run_sync(st.counters)["packets_received"] == 20
        assert _release_up_to(store, 12) == 7
        # The first table is emptied; the second one drains while new packets go back
        # to the first.
        store.submit_packet(Incoming("devices/x/up", payload, "", 21, False, 1))
        store.flush()
        assert [r.id for r in store.run_sync(st.fetch_packets, 10, 100)] == list(range(13, 22))
        assert _release_up_to(store, 21) == 9
        assert store.run_sync(_stored) == 0
        assert store.buffer_bytes == 0
        store.submit_packet(Incoming("devices/x/up", payload, "", 22, False, 1))
        store.flush()
        assert [r.id for r in store.run_sync(st.fetch_packets, 0, 100)] == [22]
        assert store.run_sync(st.counters)["packets_received"] == 22


def test_a_store_short_of_disk_space_deletes_released_packets_it_still_holds(
    tmp_path: Path,
) -> None:
    """The disk reserve frees the pages of delivered packets waiting for the rest of
    their table before it stops acknowledging (but for the last ones, which a broker may
    still redeliver: the redelivery window, of 10 here)."""
    with Store.open(tmp_path, redelivery_window=10) as store:
        for first, n in ((0, 1500), (1500, 1)):  # two commits, one table each
            for i in range(first, first + n):
                store.submit_packet(Incoming("devices/x/up", bytes(71), "", i + 1, False, 1))
            store.flush()
        assert _release_up_to(store, 1499) == 1499  # all of the first table but one
        store.min_free_bytes = shutil.disk_usage(tmp_path).free + (1 << 30)
        store.submit_packet(Incoming("devices/x/up", bytes(71), "", 1502, False, 1))
        store.flush()
        assert store.paused == ""
        assert [r.id for r in store.run_sync(st.fetch_packets, 0, 10)] == [1500, 1501, 1502]


def test_a_schema_6_store_keeps_its_packets_and_their_ids(tmp_path: Path) -> None:
    """Schema 7 splits `packets` in two tables: stored packets carry over under their ids,
    and are delivered and released like new ones."""
    conn = _store_at_schema(tmp_path / "gateway.db", 6)
    with transaction(conn):
        sender = sender_id(conn, "devices/x/up", "")
        for i in range(4, 9):
            conn.execute(
                "INSERT INTO packets(id, recv_ns, sender, payload, size) VALUES (?, 1, ?, ?, 2)",
                (i, sender, f"p{i}".encode()),
            )
        conn.execute("INSERT OR REPLACE INTO counters(name, value) VALUES (?, 8)", (COUNTED,))
    conn.close()

    with Store.open(tmp_path) as store:
        assert [r.payload for r in store.run_sync(st.fetch_packets, 0, 10)] == [
            f"p{i}".encode() for i in range(4, 9)
        ]
        assert store.buffer_bytes == 10
        store.submit_packet(_packet(0))
        store.flush()
        assert _release_up_to(store, 6) == 3
        assert [r.id for r in store.run_sync(st.fetch_packets, 0, 10)] == [7, 8, 9]
        assert _release_up_to(store, 9) == 3
        assert store.run_sync(_stored) == 0
        assert store.run_sync(st.counters)["packets_received"] == 1


def test_a_schema_8_store_keeps_each_webhooks_cursor_and_counts(tmp_path: Path) -> None:
    """Schema 9 keeps a webhook's source and cursor in its webhook_stats row (`routes`
    is a view of them): every cursor and count carries over, a route with no stats row
    gets a zeroed one, and a report webhook's stats row (no route) stays out of the view."""
    conn = _store_at_schema(tmp_path / "gateway.db", 8)
    with transaction(conn):
        conn.executemany(
            "INSERT INTO routes(name, source, cursor) VALUES (?, ?, ?)",
            [("cloud", "packets", 7), ("audit", "events", 3), ("old", "cdrs", 2)],
        )
        for name in ("cloud", "audit", "reports"):
            st.ensure_stats(conn, name)
        conn.execute("UPDATE webhook_stats SET hits = 5, delivered = 4 WHERE name = 'cloud'")
    conn.close()

    def routes(c: sqlite3.Connection) -> list[tuple[str, str, int]]:
        return c.execute("SELECT name, source, cursor FROM routes ORDER BY name").fetchall()

    with Store.open(tmp_path) as store:
        assert store.run_sync(routes) == [
            ("audit", "events", 3),
            ("cloud", "packets", 7),
            ("old", "cdrs", 2),
        ]
        stats = store.run_sync(
            lambda c: c.execute(
                "SELECT name, hits, delivered FROM webhook_stats ORDER BY name"
            ).fetchall()
        )
        assert stats == [("audit", 0, 0), ("cloud", 5, 4), ("old", 0, 0), ("reports", 0, 0)]
        # A route keeps its cursor and its source; moving it moves the view's row.
        assert store.run_sync(st.ensure_route, "cloud", "cdrs") == 7
        store.run_sync(lambda c: set_cursor(c, "cloud", 9))
        assert store.run_sync(routes)[1] == ("cloud", "packets", 9)
        # A new webhook and a report webhook that becomes a route start at 0.
        assert store.run_sync(st.ensure_route, "new", "packets") == 0
        assert store.run_sync(st.ensure_route, "reports", "cdrs") == 0
        assert len(store.run_sync(routes)) == 5


def test_a_broker_redelivery_is_known_by_its_digest_also_one_kept_before_schema_5(
    tmp_path: Path,
) -> None:
    """A DUP packet with the packet id, topic and payload of one committed on an earlier
    connection is acknowledged, not stored again; `inflight` keeps 8 bytes of its digest
    now, and a row from before that kept 16 still recognises it."""

    def dup(payload: bytes, mid: int, epoch: int) -> Incoming:
        return Incoming("devices/x/up", payload, "", mid, True, epoch)

    with Store.open(tmp_path) as store:
        outcomes: list[str] = []
        store.on_committed = lambda ps: outcomes.extend(p.outcome for p in ps)
        store.submit_packet(Incoming("devices/x/up", b"a", "", 5, False, 1))
        store.flush()
        store.submit_packet(dup(b"a", 5, 2))  # its PUBACK was lost: the same packet
        store.submit_packet(dup(b"b", 6, 2))  # never committed under id 6: new
        store.flush()
        # A row written before schema 5: the whole 16-byte digest.
        h = hashlib.blake2b(b"devices/x/up", digest_size=16)
        h.update(b"\0")
        h.update(b"c")
        store.run_sync(
            lambda c: c.execute(
                "INSERT OR REPLACE INTO inflight(mid, digest, epoch) VALUES (7, ?, 1)",
                (h.digest(),),
            )
        )
        store.submit_packet(dup(b"c", 7, 2))
        store.submit_packet(dup(b"d", 7, 3))  # the same id, other content: new
        store.flush()
        assert outcomes == ["stored", "redelivery", "stored", "redelivery", "stored"]
        assert [r.payload for r in store.run_sync(st.fetch_packets, 0, 10)] == [b"a", b"b", b"d"]
        assert store.run_sync(st.counters)["packets_redelivered"] == 2


def _on_disk(conn: sqlite3.Connection) -> int:
    """Packet rows in the tables, released ones too."""
    return sum(int(conn.execute(f"SELECT COUNT(*) FROM {t}").fetchone()[0]) for t in PACKET_TABLES)


def _outcomes(store: Store, packets: list[Incoming]) -> list[str]:
    """Commit packets (one commit) and say what became of each."""
    seen: list[str] = []
    store.on_committed = lambda ps: seen.extend(p.outcome for p in ps)
    for p in packets:
        store.submit_packet(p)
    store.flush()
    return seen


def test_a_redelivery_is_known_from_its_row_and_once_the_row_has_gone_from_inflight(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A packet row keeps its packet id: a delivered table holding one of the session's
    last redelivery_window rows (the packets a broker may still redeliver) waits, and
    once it has waited PIN_WAIT_S it is emptied with those rows' keys kept in
    `inflight`. Either way a DUP copy of such a packet is acknowledged, not stored."""

    def pkt(mid: int, epoch: int, dup: bool = False) -> Incoming:
        return Incoming("devices/x/up", f"p{mid}".encode(), "", mid, dup, epoch)

    monkeypatch.setattr(redelivery, "PIN_WAIT_S", 3600.0)
    with Store.open(tmp_path, redelivery_window=3) as store:
        assert _outcomes(store, [pkt(m, 1) for m in range(1, 6)]) == ["stored"] * 5
        assert _release_up_to(store, 5) == 5
        assert store.run_sync(_stored) == 0
        # Rows 3, 4 and 5 are recent: their table stays.
        assert store.run_sync(_on_disk) >= 3
        assert _outcomes(store, [pkt(5, 2, dup=True)]) == ["redelivery"]

        monkeypatch.setattr(redelivery, "PIN_WAIT_S", 0.0)
        assert _release_up_to(store, 5) == 0
        assert store.run_sync(_on_disk) == 0
        # Rows 3-5 copied (5 once: its redelivery was written there already).
        assert store.run_sync(lambda c: c.execute("SELECT mid FROM inflight").fetchall()) == [
            (3,),
            (4,),
            (5,),
        ]
        outcomes = _outcomes(
            store,
            [
                pkt(4, 3, dup=True),  # known from inflight
                pkt(5, 3, dup=True),  # known again: its PUBACK may have been lost twice
                Incoming("devices/x/up", b"other", "", 3, True, 3),  # id 3, other content
            ],
        )
        assert outcomes == ["redelivery", "redelivery", "stored"]
        assert [r.payload for r in store.run_sync(st.fetch_packets, 0, 10)] == [b"other"]
        assert store.run_sync(st.counters)["packets_redelivered"] == 3


def test_a_schema_9_store_still_knows_the_redeliveries_of_what_it_committed(
    tmp_path: Path,
) -> None:
    """An upgrade to schema 10 after a crash: the old gateway's `inflight` rows still
    recognise the broker's redeliveries, and the next connection's epoch is above
    theirs; its packets, without a packet id in their rows, are delivered as before."""
    db = tmp_path / "gateway.db"
    conn = _store_at_schema(db, 9)
    with transaction(conn):
        sender = sender_id(conn, "devices/x/up", "")
        for i in range(1, 4):
            conn.execute(
                "INSERT INTO packets_a(id, recv_ns, sender, payload, size) VALUES (?, 1, ?, ?, 2)",
                (i, sender, f"p{i}".encode()),
            )
            conn.execute(
                "INSERT INTO inflight(mid, digest, epoch) VALUES (?, ?, 4)",
                (40 + i, digest_of("devices/x/up", f"p{i}".encode())),
            )
    conn.close()
    with Store.open(tmp_path) as store:
        assert store.last_epoch() == 4
        again = [Incoming("devices/x/up", f"p{i}".encode(), "", 40 + i, True, 5) for i in (3, 1)]
        assert _outcomes(store, [*again, _packet(9)]) == ["redelivery", "redelivery", "stored"]
        assert [r.payload for r in store.run_sync(st.fetch_packets, 0, 10)] == [
            b"p1",
            b"p2",
            b"p3",
            b"p9",
        ]


def test_after_a_restart_the_recent_rows_are_still_known_and_so_is_the_last_epoch(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """What a crashed gateway committed is recognised when the broker redelivers it to
    the restarted one, and the new connection's epoch is above every stored packet's,
    from the rows themselves (`inflight` holds none of them)."""
    monkeypatch.setattr(redelivery, "PIN_WAIT_S", 3600.0)
    packets = [Incoming(f"devices/{m}/up", b"x", "", m, False, 7) for m in range(1, 5)]
    with Store.open(tmp_path, redelivery_window=2, sessions=2) as store:
        assert _outcomes(store, packets) == ["stored"] * 4
        other = Incoming("devices/1/up", b"x", "", 1, False, 7, source=1)
        assert _outcomes(store, [other]) == ["stored"]
        assert _release_up_to(store, 5) == 5
    with Store.open(tmp_path, redelivery_window=2, sessions=2) as store:
        assert store.last_epoch() == 7
        assert (
            store.run_sync(lambda c: c.execute("SELECT COUNT(*) FROM inflight").fetchone())[0] == 0
        )
        # Session 0's last two rows are 3 and 4; session 1's is its only one. Row 1 is
        # out of session 0's window: a broker that keeps to a Receive Maximum of 2 has
        # had its PUBACK, so a copy of it with DUP set can only be a new packet.
        again = [
            Incoming(f"devices/{m}/up", b"x", "", m, True, 8, source=s)
            for s, m in ((0, 4), (0, 3), (1, 1), (0, 1))
        ]
        assert _outcomes(store, again) == ["redelivery", "redelivery", "redelivery", "stored"]
        assert store.last_epoch() == 8


def test_senders_no_packet_refers_to_are_deleted_once_enough_were_added(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A topic with a part of its own per message (a message id) makes a new sender for
    every packet: once delivered, those must not stay on disk for ever."""
    monkeypatch.setattr(buffer, "SENDER_CACHE", 10)

    def senders(c: sqlite3.Connection) -> int:
        return int(c.execute("SELECT COUNT(*) FROM senders").fetchone()[0])

    # The senders of the last five packets stay anyway (a redelivery is recognised by
    # topic and payload): the redelivery window.
    with Store.open(tmp_path, redelivery_window=5) as store:
        store.set_packet_routes(["cloud"])

        def deliver_up_to(conn: sqlite3.Connection, cursor: int) -> int:
            with transaction(conn):
                st.ensure_route(conn, "cloud", "packets")
                set_cursor(conn, "cloud", cursor)
                return store.release_packets(conn)

        for i in range(25):
            store.submit_packet(Incoming(f"devices/d/msg/{i}", b"x", "", i + 1, False, 1))
        store.flush()
        assert store.run_sync(senders) == 25
        # Delivered but for the last five: the senders of those twenty go.
        assert store.run_sync(deliver_up_to, 20) == 20
        assert store.run_sync(senders) == 5
        kept = store.run_sync(st.fetch_packets, 0, 100)
        assert [r.topic for r in kept] == [f"devices/d/msg/{i}" for i in range(20, 25)]
        # A sender seen before the prune gets a row again, with its own topic.
        store.submit_packet(Incoming("devices/d/msg/3", b"y", "", 99, False, 1))
        store.flush()
        assert store.run_sync(st.fetch_packets, 25, 10)[0].topic == "devices/d/msg/3"
        # Fewer added since than SENDER_CACHE: the next delivery prunes nothing.
        assert store.run_sync(deliver_up_to, 25) == 5
        assert store.run_sync(senders) == 6


def test_packet_ids_are_never_reused_and_every_packet_is_counted_once(tmp_path: Path) -> None:
    """packets_received is counted from the ids, not bumped in each packet commit; an
    emptied table, a replayed dead letter or a restart must not throw that off."""
    with Store.open(tmp_path) as store:
        store.set_packet_routes(["cloud"])
        for i in range(5):
            store.submit_packet(_packet(i))
        store.flush()
        assert store.run_sync(st.counters)["packets_received"] == 5

        def deliver_all(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                st.ensure_route(conn, "cloud", "packets")
                set_cursor(conn, "cloud", 5)
                return store.release_packets(conn)

        assert store.run_sync(deliver_all) == 5
        assert store.run_sync(_stored) == 0
        assert store.run_sync(st.counters)["packets_received"] == 5
    with Store.open(tmp_path) as store:
        store.submit_packet(_packet(5))
        store.flush()
        assert store.run_sync(lambda c: c.execute("SELECT id FROM packets").fetchall()) == [(6,)]

        # A dead letter put back into the packets table: a new id, not a new reception.
        def dead_letter(conn: sqlite3.Connection) -> int:
            with transaction(conn):
                conn.execute(
                    "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, reason,"
                    " created_ns, topic) VALUES ('', 'packets', '', x'00', 1, 'too_large', 0, 't')"
                )
            return st.replay_dead_letters(conn)

        assert store.run_sync(dead_letter) == 1
        store.submit_packet(_packet(6))
        store.flush()
        ids = store.run_sync(lambda c: c.execute("SELECT id FROM packets ORDER BY id").fetchall())
        assert ids == [(6,), (7,), (8,)]
        assert store.run_sync(st.counters)["packets_received"] == 7


def test_a_reader_sees_committed_packets_while_the_writer_is_busy(tmp_path: Path) -> None:
    """Delivery fetches new packets through a Reader: a fetch must not wait for the
    writer's next commit (or a slow call), and it must see every commit before it."""
    with Store.open(tmp_path) as store:
        for i in range(3):
            store.submit_packet(_packet(i))
        store.flush()
        reader = st.Reader(store.path)
        running, release = threading.Event(), threading.Event()

        def hold(_c: sqlite3.Connection) -> bool:
            running.set()
            return release.wait(30)

        busy = store.call(hold)
        assert running.wait(10)
        store.submit_packet(_packet(3))  # the writer is in `hold`: not committed yet
        try:
            rows = reader.run_sync(st.fetch_packets, 0, 100)
            assert [r.payload for r in rows] == [_packet(i).payload for i in range(3)]
            assert not busy.done()
        finally:
            release.set()
        busy.result(10)
        store.flush()
        assert len(reader.run_sync(st.fetch_packets, 0, 100)) == 4
        reader.close()


def test_a_migration_asks_systemd_for_more_time_to_start(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Schema 4 copies the packet table, which can outlast TimeoutStartSec with a large
    backlog: the service manager is told before (EXTEND_TIMEOUT_USEC), and only then."""
    manager = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    manager.bind(str(tmp_path / "notify"))
    manager.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify"))
    _store_at_schema(tmp_path / "gateway.db", 3).close()
    with Store.open(tmp_path, on_progress=migration_notice):
        pass
    message = manager.recv(4096).decode()
    assert f"EXTEND_TIMEOUT_USEC={st.MIGRATION_TIMEOUT_S * 1_000_000}" in message
    assert f"schema {SCHEMA_VERSION}" in message
    with Store.open(tmp_path, on_progress=migration_notice):  # up to date: nothing to say
        pass
    with Store.open(
        tmp_path / "new", on_progress=migration_notice
    ):  # a new store: nothing to migrate from
        pass
    manager.settimeout(0.5)
    with pytest.raises(TimeoutError):
        manager.recv(4096)
    manager.close()

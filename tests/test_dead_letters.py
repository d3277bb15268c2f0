"""Hostile input is normal input: an oversize packet's dead letter keeps a prefix, its size
and hash, not the packet; dead letters are bounded by size and age (oldest first, counted)
and count toward max_buffer_mb; `gateway dlq purge` deletes what an operator chooses."""

from __future__ import annotations

import hashlib
import json
import sqlite3
import subprocess
import threading
import time
import tomllib
from pathlib import Path

import pytest
import sqlite_utils

from gateway import config
from gateway import store as st
from gateway.errors import ConfigError
from gateway.store import Incoming, Store, dead_letters, transaction
from gateway.store.db import PAGE_SIZE
from gateway.store.dead_letters import DEAD_LETTER_BYTES
from gateway.store.schema import MIGRATIONS, SCHEMA_VERSION
from tests.conftest import Broker, db_rows, gateway_cmd, publish, wait_for, write_config

ICCID = "8981100000000000012"
TOPIC = f"devices/{ICCID}/up"
HOUR_NS = 3600 * 10**9


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(gateway_cmd(*args), capture_output=True, text=True, timeout=60)


def oversize(i: int, size: int = 5000) -> Incoming:
    payload = f"{i:05d}".encode().ljust(size, b"#")
    return Incoming(TOPIC, payload, ICCID, i + 1, False, 1, too_large=True)


def letter_ids(store: Store) -> list[int]:
    rows = store.run_sync(lambda c: c.execute("SELECT id FROM dead_letters ORDER BY id").fetchall())
    return [int(r[0]) for r in rows]


def add_letter(conn: sqlite3.Connection, webhook: str, created_ns: int, body: bytes = b"{}") -> int:
    """A dead letter as delivery leaves it (a batch a webhook rejected)."""
    with transaction(conn):
        cur = conn.execute(
            "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, reason, status,"
            " excerpt, attempts, created_ns) VALUES (?, 'packets', ?, ?, 1, 'http_400', 400,"
            " 'bad request', 1, ?)",
            (webhook, f"msg_{created_ns}", body, created_ns),
        )
    return int(cur.lastrowid or 0)


# -- an oversize packet -------------------------------------------------------------------


def test_an_oversize_packets_dead_letter_keeps_its_topic_size_hash_and_a_prefix_only(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    """A 50 KB packet over mqtt.max_payload_bytes (and within the Maximum Packet Size the
    gateway announces) is acknowledged and leaves a dead letter
    of about 1 KiB; `dlq replay` cannot bring such a packet back and says so."""
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        mqtt_extra="max_payload_bytes = 2000",
    )
    db = tmp_path / "state" / "gateway.db"
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway to subscribe")
    huge = bytes(range(256)) * 200
    publish(mosquitto.port, [(TOPIC, huge), (TOPIC, b"ok")])
    wait_for(
        lambda: db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 1,
        what="the oversize packet dead-lettered",
    )
    reason, body, size, sha256, topic = db_rows(
        db, "SELECT reason, body, size, sha256, topic FROM dead_letters"
    )[0]
    assert reason == "too_large"
    assert body == huge[: st.DEAD_LETTER_PREFIX_BYTES]
    assert size == len(huge)
    assert sha256 == hashlib.sha256(huge).hexdigest()
    assert topic == TOPIC
    assert gw.terminate() == 0

    listed = json.loads(cli("dlq", "list", "--json", "-c", str(cfg)).stdout)
    assert [(r["bytes"], r["size"], r["sha256"]) for r in listed] == [
        (1024, len(huge), hashlib.sha256(huge).hexdigest())
    ]
    done = cli("dlq", "replay", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    assert "re-queued 0 dead letter(s)" in done.stdout
    assert "skipped 1 oversize packet(s)" in done.stdout
    assert "first 1024 bytes" in done.stdout
    # Left as it was: no truncated packet among the stored ones.
    assert db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 1
    assert [r[0] for r in db_rows(db, "SELECT payload FROM packets")] == [b"ok"]


def test_a_replay_re_queues_the_letters_it_can_and_skips_the_truncated_ones(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path) as store:
        store.submit_packet(oversize(0, size=3000))
        store.flush()
        made = time.time_ns()
        store.run_sync(add_letter, "cloud", made)
        done = store.run_sync(st.requeue_dead_letters, None, ())
        assert (done.requeued, len(done.skipped)) == (1, 1)
        # The webhook's batch is queued again under its webhook-id; the truncated packet
        # stays a dead letter.
        assert [b.id for b in store.run_sync(st.load_batches, "cloud")] == [f"msg_{made}"]
        assert letter_ids(store) == list(done.skipped)
        assert store.run_sync(st.fetch_packets, 0, 10) == []


# -- limits ----------------------------------------------------------------------------------


def test_dead_letters_past_their_size_limit_are_evicted_oldest_first_and_counted(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path) as store:
        for i in range(10):
            store.submit_packet(oversize(i))
        store.flush()
        first = letter_ids(store)
        assert len(first) == 10
        each = store.run_sync(st.dead_letter_bytes) // 10
        # Room for four: the six oldest go, on the writer's own time.
        store.dead_letter_max_bytes = 4 * each + each // 2
        wait_for(lambda: len(letter_ids(store)) == 4, what="the six oldest dead letters evicted")
        assert letter_ids(store) == first[6:]
        assert store.run_sync(st.counters)["dead_letters_evicted"] == 6
        assert store.run_sync(st.dead_letter_bytes) == 4 * each
        assert store.dead_letter_bytes == 4 * each
    # Persistent: the count survives a restart.
    with Store.open(tmp_path) as store:
        assert store.run_sync(st.counters)["dead_letters_evicted"] == 6


def test_dead_letters_older_than_their_age_limit_are_evicted_and_counted(tmp_path: Path) -> None:
    now = time.time_ns()
    with Store.open(tmp_path, dead_letter_max_age_s=3600) as store:
        old = [store.run_sync(add_letter, "cloud", now - h * HOUR_NS) for h in (5, 3, 2)]
        young = [store.run_sync(add_letter, "cloud", now - m * 60 * 10**9) for m in (30, 1)]
        wait_for(lambda: letter_ids(store) == young, what="the three old dead letters evicted")
        assert old[-1] < young[0]
        assert store.run_sync(st.counters)["dead_letters_evicted"] == 3


def test_a_big_backlog_of_dead_letters_is_evicted_a_bounded_batch_at_a_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past its limits by far (a lowered limit, a long stop), the eviction goes a batch
    at a time and packets still commit in between."""
    monkeypatch.setattr(dead_letters, "DEAD_LETTER_EVICT_ROWS", 10)
    now = time.time_ns()
    with Store.open(tmp_path, dead_letter_max_age_s=3600) as store:

        def backlog(conn: sqlite3.Connection) -> None:
            with transaction(conn):
                for i in range(95):
                    add_letter(conn, "cloud", now - 2 * HOUR_NS + i)

        store.run_sync(backlog)
        wait_for(lambda: not letter_ids(store), what="all 95 old dead letters evicted")
        assert store.run_sync(st.counters)["dead_letters_evicted"] == 95


# -- the disk budget -----------------------------------------------------------------------


class Acks:
    """Stands in for ingest: counts the packets the store let it acknowledge."""

    def __init__(self, store: Store) -> None:
        self.n = 0
        self._lock = threading.Lock()
        store.on_committed = self._committed

    def _committed(self, packets: list[Incoming]) -> None:
        with self._lock:
            self.n += len(packets)


def test_dead_letters_count_toward_max_buffer_and_a_purge_frees_their_room(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path) as store:
        for i in range(5):
            store.submit_packet(oversize(i))
        store.flush()
        dead = store.run_sync(st.dead_letter_bytes)
        assert dead > 5 * st.DEAD_LETTER_PREFIX_BYTES
    # Room for the dead letters and ten packets of 100 bytes.
    with Store.open(tmp_path, max_buffer_bytes=dead + 1000) as store:
        acks = Acks(store)
        for i in range(15):
            store.submit_packet(
                Incoming(TOPIC, f"{i:05d}".encode().ljust(100, b"."), "", i, False, 2)
            )
        wait_for(lambda: acks.n == 10, what="ten packets in the room the dead letters leave")
        assert store.full
        store.flush()
        assert acks.n == 10  # the other five wait unacknowledged; the broker keeps them
        assert store.run_sync(lambda c: st.purge_dead_letters(c, webhook="")) == 5
        wait_for(lambda: acks.n == 15, what="the held packets committed once purged")
        assert store.dead_letter_bytes == 0


def test_status_shows_dead_letter_bytes_and_evictions_of_a_running_gateway(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    """gateway.dead_letter_max_mb of a real gateway: a flood of oversize packets leaves
    only the newest letters, and `gateway status` says how many went."""
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        mqtt_extra="max_payload_bytes = 2000",
        # About four letters of 1 KiB and a bit.
        gateway_extra='dead_letter_max_mb = 0.0046\ndead_letter_max_age = "7d"',
    )
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway to subscribe")
    publish(mosquitto.port, [(TOPIC, f"{i:03d}".encode().ljust(5000, b"#")) for i in range(12)])

    def status() -> dict[str, object]:
        done = cli("status", "--json", "-c", str(cfg))
        assert done.returncode == 0, done.stderr
        return dict(json.loads(done.stdout))

    wait_for(
        lambda: status()["dead_letters_evicted"] == 8, what="the eight oldest dead letters evicted"
    )
    snap = status()
    assert snap["dead_letters"] == 4
    buffer = snap["buffer"]
    assert 4 * st.DEAD_LETTER_PREFIX_BYTES < buffer["dead_letter_bytes"] <= 0.0046 * 1048576  # type: ignore[index]
    kept = json.loads(cli("dlq", "list", "--json", "-c", str(cfg)).stdout)
    assert sorted(r["id"] for r in kept) == [9, 10, 11, 12]
    text = cli("status", "-c", str(cfg)).stdout
    assert "4 letter(s), 8 evicted" in text
    assert gw.terminate() == 0


# -- gateway dlq purge -----------------------------------------------------------------------


@pytest.fixture
def letters(tmp_path: Path) -> tuple[Path, dict[str, int]]:
    """A config and a store holding dead letters of two webhooks and of an oversize
    packet, some made two hours ago."""
    cfg = write_config(tmp_path / "gw.toml", 1883, tmp_path / "state")
    now = time.time_ns()
    with Store.open(tmp_path / "state") as store:
        ids = {
            "cloud_old": store.run_sync(add_letter, "cloud", now - 2 * HOUR_NS),
            "cloud_new": store.run_sync(add_letter, "cloud", now),
            "other_old": store.run_sync(add_letter, "other", now - 2 * HOUR_NS),
            "other_new": store.run_sync(add_letter, "other", now),
        }
        store.submit_packet(oversize(0))
        store.flush()
        ids["ingest"] = max(letter_ids(store))
    return cfg, ids


def remaining(cfg: Path) -> set[int]:
    return {
        int(r[0])
        for r in db_rows(cfg.parent / "state" / "gateway.db", "SELECT id FROM dead_letters")
    }  # type: ignore[call-overload]


def test_purge_by_webhook_age_and_id(letters: tuple[Path, dict[str, int]]) -> None:
    cfg, ids = letters
    done = cli("dlq", "purge", "--webhook", "cloud", "--older-than", "1h", "-c", str(cfg))
    assert (done.returncode, done.stdout.strip()) == (0, "purged 1 dead letter(s)")
    assert remaining(cfg) == set(ids.values()) - {ids["cloud_old"]}

    done = cli("dlq", "purge", "--older-than", "90m", "-c", str(cfg))
    assert done.stdout.strip() == "purged 1 dead letter(s)"
    assert ids["other_old"] not in remaining(cfg)

    done = cli("dlq", "purge", "--id", str(ids["ingest"]), str(ids["other_new"]), "-c", str(cfg))
    assert done.stdout.strip() == "purged 2 dead letter(s)"
    assert remaining(cfg) == {ids["cloud_new"]}

    done = cli("dlq", "purge", "--webhook", "cloud", "-c", str(cfg))
    assert done.stdout.strip() == "purged 1 dead letter(s)"
    assert remaining(cfg) == set()


def test_purge_all_needs_all_and_bad_input_is_one_line_and_exit_2(
    letters: tuple[Path, dict[str, int]],
) -> None:
    cfg, ids = letters
    for args, says in [
        ((), "nothing chosen to purge"),
        (("--older-than", "soon"), "--older-than: must be a duration"),
        (("--older-than", "0"), "--older-than: must be"),
        (("--id", "7x"), "--id: must be a dead letter's id"),
        (("--all", "--webhook", "cloud"), "--all purges every dead letter"),
    ]:
        done = cli("dlq", "purge", *args, "-c", str(cfg))
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert says in done.stderr
        assert remaining(cfg) == set(ids.values())
    done = cli("dlq", "purge", "--all", "-c", str(cfg))
    assert (done.returncode, done.stdout.strip()) == (0, "purged 5 dead letter(s)")
    assert remaining(cfg) == set()
    snap = json.loads(cli("status", "--json", "-c", str(cfg)).stdout)
    assert snap["buffer"]["dead_letter_bytes"] == 0


# -- upgrade ---------------------------------------------------------------------------------


def test_a_schema_10_store_keeps_its_dead_letters_and_rewrites_none_of_their_pages(
    tmp_path: Path,
) -> None:
    """The upgrade adds columns and triggers only: the WAL it leaves is a few pages,
    whatever the dead letters hold. Their bytes are counted, and an oversize packet's
    letter from before, which holds the whole payload, can still be replayed."""
    db = tmp_path / "gateway.db"
    conn = st.connect(db)
    sdb = sqlite_utils.Database(conn)
    for v in range(1, 11):
        with transaction(conn):
            MIGRATIONS[v](sdb)
            conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(v),))
    now = time.time_ns()
    with transaction(conn):
        for i in range(200):
            add_letter(conn, "cloud", now, body=bytes([i % 256]) * 2000)
        conn.execute(
            "INSERT INTO dead_letters(webhook, source, webhook_id, body, count, reason,"
            " excerpt, created_ns, topic, iccid, recv_ns) VALUES ('', 'packets', '', ?, 1,"
            " 'too_large', 'payload of 3000 bytes exceeds mqtt.max_payload_bytes', ?, ?, ?, 5)",
            (b"p" * 3000, now, TOPIC, ICCID),
        )
    expected = sum(
        int(r[0])
        for r in conn.execute(
            f"SELECT {DEAD_LETTER_BYTES.format('dead_letters')} FROM dead_letters"
        )
    )
    conn.close()  # the last connection: its WAL is checkpointed and removed
    assert not db.with_name("gateway.db-wal").exists()

    with Store.open(tmp_path) as store:
        wal = db.with_name("gateway.db-wal").stat().st_size
        assert store.run_sync(lambda c: st.get_meta(c, "schema_version")) == str(SCHEMA_VERSION)
        # Schema 12's table and triggers are in it too: still far below the 400 pages
        # the dead letters take.
        assert (wal - 32) // (24 + PAGE_SIZE) < 40, f"{wal} bytes of WAL"
        assert store.dead_letter_bytes == expected > 200 * 2000
        listed = store.run_sync(st.list_dead_letters, None, 1000)
        assert len(listed) == 201
        assert listed[0]["size"] is None
        assert listed[0]["sha256"] is None
        done = store.run_sync(st.requeue_dead_letters, "", ())
        assert (done.requeued, done.skipped) == (1, ())
        assert [r.payload for r in store.run_sync(st.fetch_packets, 0, 10)] == [b"p" * 3000]
        assert store.run_sync(st.dead_letter_bytes) == expected - (
            3000 + len("payload of 3000 bytes exceeds mqtt.max_payload_bytes") + len(TOPIC) + 64
        )


# -- config ----------------------------------------------------------------------------------


def gateway_section(extra: str) -> config.GatewaySection:
    return config.parse(tomllib.loads(f'[gateway]\n{extra}\n[mqtt]\nhost = "h"\n'), {}).gateway


def test_dead_letter_limits_have_defaults_and_take_durations_and_0_for_no_age_limit() -> None:
    g = gateway_section("")
    assert (g.dead_letter_max_mb, g.dead_letter_max_age) == (64.0, 30 * 86400.0)
    g = gateway_section('dead_letter_max_mb = 8\ndead_letter_max_age = "12h"')
    assert (g.dead_letter_max_mb, g.dead_letter_max_age) == (8.0, 12 * 3600.0)
    assert gateway_section("dead_letter_max_age = 0").dead_letter_max_age == 0
    # A buffer too small for the default: dead letters get a quarter of it.
    assert gateway_section("max_buffer_mb = 40").dead_letter_max_mb == 10.0


@pytest.mark.parametrize(
    ("extra", "says"),
    [
        ("dead_letter_max_mb = 0", "gateway.dead_letter_max_mb: must be greater than 0, got 0"),
        ('dead_letter_max_mb = "64"', "gateway.dead_letter_max_mb: must be a number"),
        (
            "max_buffer_mb = 32\ndead_letter_max_mb = 32",
            "gateway.dead_letter_max_mb: must be less than gateway.max_buffer_mb (32)",
        ),
        ('dead_letter_max_age = "a month"', "gateway.dead_letter_max_age: must be a duration"),
        ("dead_letter_max_age = -1", "or 0 for none, got -1"),
    ],
)
def test_bad_dead_letter_limits_are_named(extra: str, says: str) -> None:
    with pytest.raises(ConfigError) as info:
        gateway_section(extra)
    assert any(says in p for p in info.value.problems), info.value.problems

"""The store never fills the disk: max_buffer_mb with its on_full policy, the min_free_mb
reserve, and a disk that is full anyway: nothing is acknowledged that is not stored, and
everything is delivered once there is space again."""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway import store as st
from gateway.store import Incoming, Store
from tests.conftest import Broker, db_rows, gateway_cmd, publish, wait_for, write_config
from tests.receiver import Reply

ICCID = "8981100000000000012"


class Acks:
    """Stands in for ingest: records which packets the store let it acknowledge."""

    def __init__(self, store: Store) -> None:
        self.packets: list[Incoming] = []
        self._lock = threading.Lock()
        store.on_committed = self._committed

    def _committed(self, packets: list[Incoming]) -> None:
        with self._lock:
            self.packets.extend(packets)

    def __len__(self) -> int:
        with self._lock:
            return len(self.packets)


def submit(store: Store, n: int, size: int = 100, start: int = 0) -> None:
    for i in range(start, start + n):
        payload = f"{i:05d}".encode().ljust(size, b".")
        store.submit_packet(Incoming("devices/x/up", payload, "x", i + 1, False, 1))


def stored_payload_ids(store: Store) -> list[int]:
    rows = store.run_sync(lambda c: c.execute("SELECT payload FROM packets ORDER BY id").fetchall())
    return [int(r[0][:5]) for r in rows]


def test_backpressure_stops_acknowledging_at_max_buffer_and_resumes_when_delivery_frees_room(
    tmp_path: Path,
) -> None:
    with Store.open(tmp_path, max_buffer_bytes=1000, on_full="backpressure") as store:
        acks = Acks(store)
        submit(store, 15)
        wait_for(lambda: len(acks) == 10, what="10 packets of 100 bytes in a 1000-byte buffer")
        assert store.full
        assert stored_payload_ids(store) == list(range(10))
        assert len(acks) == 10  # the other 5 wait unacknowledged; the broker keeps them

        # A webhook takes the first 8; releasing them makes room for the 5 held back.
        store.set_packet_routes(["hook"])
        store.run_sync(st.ensure_route, "hook", "packets")
        store.run_sync(st.advance_cursor, store, "hook", 8)
        wait_for(lambda: len(acks) == 15, what="the held packets committed")
        assert stored_payload_ids(store) == list(range(8, 15))
        assert store.buffer_bytes == 700


def test_drop_oldest_keeps_the_newest_packets_and_counts_what_it_dropped(tmp_path: Path) -> None:
    with Store.open(tmp_path, max_buffer_bytes=1000, on_full="drop_oldest") as store:
        acks = Acks(store)
        submit(store, 15)
        wait_for(lambda: len(acks) == 15, what="all 15 acknowledged")
        assert stored_payload_ids(store) == list(range(5, 15))
        assert store.buffer_bytes == 1000
        assert store.run_sync(st.counters)["packets_dropped"] == 5


def test_a_dropped_packet_redelivered_by_the_broker_is_not_stored_again(tmp_path: Path) -> None:
    """drop_oldest deletes packets a broker may still redeliver (the redelivery window,
    the last 12 here): their keys go to `inflight` first, so a DUP copy of one is
    acknowledged as a redelivery instead of coming back as a new packet."""
    with Store.open(
        tmp_path, max_buffer_bytes=1000, on_full="drop_oldest", redelivery_window=12
    ) as store:
        acks = Acks(store)
        submit(store, 15)
        wait_for(lambda: len(acks) == 15, what="all 15 acknowledged")
        assert store.run_sync(st.counters)["packets_dropped"] == 5
        outcomes: list[str] = []
        store.on_committed = lambda ps: outcomes.extend(p.outcome for p in ps)
        for i in (4, 6, 1):  # dropped (in the window), kept, dropped (before it)
            payload = f"{i:05d}".encode().ljust(100, b".")
            store.submit_packet(Incoming("devices/x/up", payload, "x", i + 1, True, 2))
        store.flush()
        assert outcomes == ["redelivery", "redelivery", "stored"]


def test_disk_reserve_pauses_acknowledgements_until_there_is_space_again(tmp_path: Path) -> None:
    free = shutil.disk_usage(tmp_path).free
    with Store.open(tmp_path, min_free_bytes=free + (1 << 30)) as store:
        acks = Acks(store)
        submit(store, 5)
        wait_for(lambda: store.paused, what="the store to pause")
        assert "less than gateway.min_free_mb" in store.paused
        store.run_sync(lambda _c: None)  # the writer has been round its loop since
        assert len(acks) == 0
        assert stored_payload_ids(store) == []
        store.min_free_bytes = 1 << 20
        wait_for(lambda: len(acks) == 5, what="the held packets committed")
        assert store.paused == ""
        assert stored_payload_ids(store) == list(range(5))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """An 8 MB tmpfs of our own (root only), unmounted at the end whatever happens."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("needs root and mount(8) to mount a small tmpfs")
    mnt = tmp_path / "small"
    mnt.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m,mode=0755", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


def fill(path: Path, leave_bytes: int) -> Path:
    """A filler file that leaves about `leave_bytes` free on path's file system."""
    filler = path / "filler"
    free = shutil.disk_usage(path).free
    with filler.open("wb") as f:
        remaining = max(0, free - leave_bytes)
        chunk = b"\0" * (1 << 20)
        while remaining > 0:
            f.write(chunk[: min(len(chunk), remaining)])
            remaining -= len(chunk)
    return filler


def peek_session(port: int, client_id: str, expect: int) -> list[bytes]:
    """Everything the broker holds for a persistent session, taken without acknowledging."""
    got: list[bytes] = []
    lock = threading.Lock()

    def on_message(_c: object, _u: object, msg: mqtt.MQTTMessage) -> None:
        with lock:
            got.append(bytes(msg.payload))

    c = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    c.on_message = on_message
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = 3600
    props.ReceiveMaximum = 65535
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    try:
        wait_for(lambda: len(got) >= expect, what=f"the broker's {expect} held packets")
    finally:
        c.disconnect()
        c.loop_stop()
    return got


def stored_count(db: Path) -> int:
    try:
        return int(db_rows(db, "SELECT COUNT(*) FROM packets")[0][0])  # type: ignore[call-overload]
    except sqlite3.OperationalError:
        return 0


def status(cfg: Path) -> dict[str, object]:
    out = subprocess.run(
        gateway_cmd("status", "--json", "-c", str(cfg)), capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out)


def test_a_full_disk_stops_acknowledgements_and_everything_is_delivered_once_space_is_back(
    mosquitto: Broker, tmp_path: Path, small_fs: Path, gateway_proc, receiver
) -> None:
    total = 800
    receiver.behaviour = lambda n, r: Reply(503)
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        small_fs / "state",
        gateway_extra="min_free_mb = 0",  # no reserve: let the disk really fill up
        extra=f'[[webhooks]]\nname = "cloud"\nurl = "{receiver.url}"\n'
        "batch = { window_ms = 0, max_items = 50 }\nretry = { backoff_max_s = 0.3 }\n",
    )
    db = small_fs / "state" / "gateway.db"
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway to subscribe")
    sent = [f"{i:04d}".encode().ljust(1000, b"#") for i in range(total)]
    # The first 100 are stored before the disk fills up. Without them, a gateway that took
    # all 800 into its first commit stored none: that group never fits in 300 KB.
    publish(mosquitto.port, [(f"devices/{ICCID}/up", p) for p in sent[:100]])
    wait_for(lambda: stored_count(db) == 100, what="the first 100 packets stored")
    filler = fill(small_fs, leave_bytes=300 * 1024)
    publish(mosquitto.port, [(f"devices/{ICCID}/up", p) for p in sent[100:]])
    wait_for(lambda: "store write failed" in gw.log(), what="the disk to fill up")
    assert gw.terminate() == 0

    # What the gateway stored plus what the broker still holds is every packet, once.
    stored = [bytes(r[0]) for r in db_rows(db, "SELECT payload FROM packets")]  # type: ignore[arg-type]
    assert 0 < len(stored) < total
    held = peek_session(mosquitto.port, "gw-test", total - len(stored))
    assert len(stored) + len(set(held)) == total
    assert set(stored) | set(held) == set(sent)
    storage = status(cfg)["storage"]
    assert "disk full" in storage["problem"]  # type: ignore[index]

    # Space comes back while the gateway runs: it stores, acknowledges and delivers it all.
    gw.start()
    wait_for(lambda: gw.log().count("store write failed") >= 2, what="writes failing again")
    filler.unlink()
    receiver.behaviour = lambda n, r: Reply()
    wait_for(
        lambda: {rec["Payload"] for rec in receiver.delivered()} >= {p.decode() for p in sent},
        timeout=60,
        what=f"all {total} packets delivered",
    )
    assert "store writable again" in gw.log()
    assert gw.terminate() == 0
    storage = status(cfg)["storage"]
    assert storage["problem"] == ""  # type: ignore[index]
    last = storage["last_write_failure"]  # type: ignore[index]
    assert "disk is full" in last["error"]
    assert stored_count(db) == 0

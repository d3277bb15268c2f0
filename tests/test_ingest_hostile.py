"""Hostile input is normal input: what a broker forwards that it should not, packets
bigger than the gateway takes, and a paho whose private parts differ from those the
gateway's fast paths were written against. The gateway stores and acknowledges, or the
broker keeps back; paho's network thread and the store writer go on either way.

mosquitto refuses to take a topic that is not UTF-8 from a publisher, so such packets
come from HostilePeer: a TCP server on 127.0.0.1 speaking just enough MQTT to be the
gateway's broker."""

from __future__ import annotations

import logging
import socket
import struct
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

import gateway.ingest.client as ingest_mod
from gateway.config import MqttSection
from gateway.ingest.client import PUBLISH_ROOM, Throttled
from gateway.ingest.session import Ingest
from gateway.store import DEAD_LETTER_PREFIX_BYTES, Store
from tests.conftest import Broker, publish, wait_for

ICCID = "8981100000000000012"
GOOD = f"devices/{ICCID}/up"
BAD = b"devices/\xff\xfe" + ICCID.encode() + b"/up"  # not UTF-8
BAD_AS_STORED = "devices/\ufffd\ufffd" + ICCID + "/up"
BAD_ICCID = "\ufffd\ufffd" + ICCID  # the topic's ICCID level, as the topic has it


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


class HostilePeer:
    """An MQTT 3.1.1/5 "broker" on a free loopback port. Each connection gets a CONNACK
    and a SUBACK (QoS 1 granted); the first to subscribe then gets `publishes`, QoS 1,
    packet ids from 1, exactly as given (topics need not be UTF-8). It records every
    CONNECT's protocol level and properties, and the packet ids of the PUBACKs."""

    def __init__(self, publishes: list[tuple[bytes, bytes]]) -> None:
        self.publishes = publishes
        self.connects: list[tuple[int, Properties | None]] = []
        self.pubacks: list[int] = []
        self.lock = threading.Lock()
        self.server = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.server.getsockname()[1])
        self.conns: list[socket.socket] = []
        self.publishing: socket.socket | None = None
        self.v5 = False
        self.next_mid = 1
        self.threads = [threading.Thread(target=self._accept, daemon=True)]
        self.threads[0].start()

    def _accept(self) -> None:
        for _ in range(20):  # bounded: the tests connect a few times at most
            try:
                conn, _addr = self.server.accept()
            except OSError:
                return
            with self.lock:
                self.conns.append(conn)
            t = threading.Thread(target=self._serve, args=(conn,), daemon=True)
            self.threads.append(t)
            t.start()

    @staticmethod
    def _exact(conn: socket.socket, n: int) -> bytes:
        data = b""
        while len(data) < n:
            chunk = conn.recv(n - len(data))
            if not chunk:
                raise ConnectionError("closed")
            data += chunk
        return data

    def _packet(self, conn: socket.socket) -> tuple[int, bytes]:
        header = self._exact(conn, 1)[0]
        length, mult = 0, 1
        for _ in range(4):
            byte = self._exact(conn, 1)[0]
            length += (byte & 0x7F) * mult
            mult *= 128
            if not byte & 0x80:
                break
        return header, self._exact(conn, length)

    def _serve(self, conn: socket.socket) -> None:
        try:
            while True:
                header, body = self._packet(conn)
                kind = header & 0xF0
                if kind == 0x10:  # CONNECT
                    self._connect(conn, body)
                elif kind == 0x80:  # SUBSCRIBE
                    self._subscribe(conn, body)
                elif kind == 0x40:  # PUBACK
                    with self.lock:
                        self.pubacks.append(struct.unpack_from("!H", body)[0])
                elif kind == 0xA0:  # UNSUBSCRIBE
                    conn.sendall(
                        b"\xb0" + _varint(3 if self.v5 else 2) + body[:2] + b"\x00"[: self.v5]
                    )
                elif kind == 0xC0:  # PINGREQ
                    conn.sendall(b"\xd0\x00")
                elif kind == 0xE0:  # DISCONNECT
                    return
        except OSError:
            return
        finally:
            conn.close()

    def _connect(self, conn: socket.socket, body: bytes) -> None:
        at = 2 + struct.unpack_from("!H", body)[0]
        level = body[at]
        props = None
        if level == 5:
            props, _n = Properties(PacketTypes.CONNECT).unpack(body[at + 4 :])
        with self.lock:
            self.v5 = level == 5
            self.connects.append((level, props))
        conn.sendall(b"\x20\x03\x00\x00\x00" if level == 5 else b"\x20\x02\x00\x00")

    def _subscribe(self, conn: socket.socket, body: bytes) -> None:
        pid = body[:2]
        at = 2
        if self.v5:
            at += 1 + body[2]  # property length (one byte here) and properties
        filters = 0
        while at < len(body):
            at += 2 + struct.unpack_from("!H", body, at)[0] + 1  # filter and options
            filters += 1
        rest = (b"\x00" if self.v5 else b"") + b"\x01" * filters
        conn.sendall(b"\x90" + _varint(2 + len(rest)) + pid + rest)
        with self.lock:
            if self.publishing is not None:
                return
            self.publishing = conn
        self.send(self.publishes)

    def send(self, publishes: list[tuple[bytes, bytes]]) -> None:
        """PUBLISH (QoS 1) on the connection that got the first ones, all in one write."""
        out = b""
        for topic, payload in publishes:
            with self.lock:
                mid, self.next_mid = self.next_mid, self.next_mid + 1
            body = struct.pack("!H", len(topic)) + topic + struct.pack("!H", mid)
            body += (b"\x00" if self.v5 else b"") + payload
            out += b"\x32" + _varint(len(body)) + body
        assert self.publishing is not None
        self.publishing.sendall(out)

    def close(self) -> None:
        try:
            self.server.shutdown(socket.SHUT_RDWR)  # wakes the accept() under way
        except OSError:
            pass
        self.server.close()
        with self.lock:
            conns = list(self.conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            c.close()
        for t in self.threads:
            t.join(5)


@pytest.fixture(autouse=True)
def fresh_logging(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test starts with the log throttle and the fast-path line not yet used."""
    monkeypatch.setattr(ingest_mod, "throttled", Throttled())
    monkeypatch.setattr(ingest_mod, "_logged_off", set())


@pytest.fixture
def peer() -> Iterator[Callable[[list[tuple[bytes, bytes]]], HostilePeer]]:
    peers: list[HostilePeer] = []

    def make(publishes: list[tuple[bytes, bytes]]) -> HostilePeer:
        peers.append(HostilePeer(publishes))
        return peers[-1]

    yield make
    for p in peers:
        p.close()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Store]:
    with Store.open(tmp_path / "state") as s:
        yield s


@pytest.fixture
def ingest() -> Iterator[Callable[..., Ingest]]:
    """Start an Ingest (paho thread, real store) for a broker port; stopped at teardown."""
    started: list[Ingest] = []

    def make(port: int, store: Store, *, start: bool = True, **cfg: Any) -> Ingest:
        section = MqttSection(
            host="127.0.0.1",
            port=port,
            client_id="gw-hostile",
            reconnect_min_s=0.2,
            reconnect_max_s=1,
            **cfg,
        )
        ing = Ingest(section, store)
        if start:
            ing.start()
        started.append(ing)
        return ing

    yield make
    for ing in started:
        ing.stop()


def rows(store: Store, sql: str) -> list[tuple[Any, ...]]:
    return store.run_sync(lambda c: c.execute(sql).fetchall())


def stored(store: Store) -> list[tuple[Any, ...]]:
    return rows(
        store,
        "SELECT s.topic, s.iccid, p.payload FROM packets p"
        " JOIN senders s ON s.id = p.sender ORDER BY p.id",
    )


@pytest.mark.parametrize("protocol", ["5", "3.1.1"])
def test_a_topic_that_is_not_utf8_is_stored_with_replacement_characters_and_acknowledged(
    protocol: str, peer, store: Store, ingest, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, "gateway.ingest")
    hostile = peer([(BAD, b"bad-1"), (BAD, b"bad-2"), (BAD, b"bad-3"), (GOOD.encode(), b"good")])
    ing = ingest(hostile.port, store, protocol=protocol)
    wait_for(lambda: len(stored(store)) == 4, what="4 packets stored")
    wait_for(lambda: sorted(hostile.pubacks) == [1, 2, 3, 4], what="4 PUBACKs")
    assert stored(store) == [
        (BAD_AS_STORED, BAD_ICCID, b"bad-1"),
        (BAD_AS_STORED, BAD_ICCID, b"bad-2"),
        (BAD_AS_STORED, BAD_ICCID, b"bad-3"),
        (GOOD, ICCID, b"good"),
    ]
    # The same connection all along: paho's thread lives, nothing was left to come again.
    assert ing.alive
    assert len(hostile.connects) == 1
    assert ing.stats.bad_topics == 3
    hostile.send([(BAD, b"bad-4"), (GOOD.encode(), b"good-2")])
    wait_for(lambda: sorted(hostile.pubacks) == [1, 2, 3, 4, 5, 6], what="2 more PUBACKs")
    assert [r[2] for r in stored(store)][4:] == [b"bad-4", b"good-2"]
    # One line for them all, not one per packet.
    lines = [r.getMessage() for r in caplog.records if "not valid UTF-8" in r.getMessage()]
    assert len(lines) == 1, lines
    assert BAD_AS_STORED in lines[0]


def test_mqtt5_connect_announces_a_maximum_packet_size_of_the_payload_limit_and_room(
    peer, store: Store, ingest
) -> None:
    hostile = peer([])
    ingest(hostile.port, store, max_payload_bytes=5000)
    wait_for(lambda: hostile.connects, what="CONNECT")
    level, props = hostile.connects[0]
    assert level == 5
    assert props is not None
    assert props.MaximumPacketSize == 5000 + PUBLISH_ROOM
    assert PUBLISH_ROOM > 65535 + 4  # any topic fits besides a payload of the limit


def test_the_broker_keeps_back_a_packet_beyond_the_announced_size_and_sends_the_next(
    mosquitto: Broker, store: Store, ingest
) -> None:
    ing = ingest(mosquitto.port, store, max_payload_bytes=1000)
    wait_for(lambda: ing.stats.subscribed, what="the subscription")
    huge = b"h" * (1000 + PUBLISH_ROOM + 1)  # over the Maximum Packet Size by its topic too
    big = b"b" * 2000  # over max_payload_bytes, within the Maximum Packet Size
    publish(mosquitto.port, [(GOOD, huge), (GOOD, big), (GOOD, b"ok")])
    dead = "SELECT reason, body FROM dead_letters"
    wait_for(lambda: stored(store) and rows(store, dead), what="the packets after the huge one")
    # mosquitto sends one connection's packets in order: once the later ones are here,
    # the huge one is not coming.
    assert stored(store) == [(GOOD, ICCID, b"ok")]
    assert rows(store, dead) == [("too_large", big[:DEAD_LETTER_PREFIX_BYTES])]
    assert ing.alive
    assert ing.stats.received == 2


def test_a_paho_with_other_private_parts_runs_on_paho_s_own_code_with_one_log_line(
    monkeypatch: pytest.MonkeyPatch, peer, store: Store, ingest, caplog
) -> None:
    caplog.set_level(logging.WARNING, "gateway.ingest")
    plain_publish = mqtt.Client._handle_publish
    plain_socket = mqtt.Client._create_socket
    plain_queue = mqtt.Client._packet_queue
    decoded_by_paho: list[int] = []

    # What a later paho might have: the same parts, taking other parameters.
    def _handle_publish(self: mqtt.Client, strict: bool = True) -> Any:
        decoded_by_paho.append(1)
        return plain_publish(self)

    def _create_socket(self: mqtt.Client, timeout: float | None = None) -> Any:
        return plain_socket(self)

    def _packet_queue(
        self: mqtt.Client, command: int, packet: bytes, mid: int, qos: int, info=None, prio=0
    ) -> Any:
        return plain_queue(self, command, packet, mid, qos, info)

    monkeypatch.setattr(mqtt.Client, "_handle_publish", _handle_publish)
    monkeypatch.setattr(mqtt.Client, "_create_socket", _create_socket)
    monkeypatch.setattr(mqtt.Client, "_packet_queue", _packet_queue)
    sent = [(GOOD.encode(), f"p{i}".encode()) for i in range(20)] + [(BAD, b"bad")]
    hostile = peer(sent)
    ing = ingest(hostile.port, store)
    wait_for(lambda: len(stored(store)) == 21, what="21 packets stored")
    wait_for(lambda: sorted(hostile.pubacks) == list(range(1, 22)), what="21 PUBACKs")
    assert [r[2] for r in stored(store)] == [p for _, p in sent]
    assert stored(store)[-1][0] == BAD_AS_STORED
    assert len(decoded_by_paho) == 21
    assert not isinstance(getattr(ing.client, "_sock", None), ingest_mod.BufferedSocket)
    assert ing.alive
    off = [r.getMessage() for r in caplog.records if "fast paths off" in r.getMessage()]
    assert len(off) == 1, off
    for path in ("buffered reads", "own PUBLISH decoding", "one-write PUBACKs"):
        assert path in off[0]
    assert "_handle_publish(strict) is not _handle_publish()" in off[0]


def test_an_error_in_the_one_write_pubacks_falls_back_to_paho_s_ack_and_the_writer_goes_on(
    peer, store: Store, ingest, caplog
) -> None:
    caplog.set_level(logging.WARNING, "gateway.ingest")
    hostile = peer([(GOOD.encode(), f"p{i}".encode()) for i in range(20)])
    ing = ingest(hostile.port, store, start=False)
    client = ing.client
    plain_queue = client._packet_queue
    failed: list[int] = []

    def broken_queue(command: int, packet: bytes, mid: int, qos: int, info: Any = None) -> Any:
        if command == mqtt.PUBACK and len(packet) > 4:  # several PUBACKs: send_pubacks'
            failed.append(len(packet) // 4)
            raise RuntimeError("queue broken")
        return plain_queue(command, packet, mid, qos, info)

    client._packet_queue = broken_queue
    ing.start()
    wait_for(lambda: sorted(hostile.pubacks) == list(range(1, 21)), what="20 PUBACKs")
    assert failed, "no commit group of several packets"
    assert len(stored(store)) == 20
    # The writer lives: later packets are stored and acknowledged too.
    hostile.send([(GOOD.encode(), b"later-1"), (GOOD.encode(), b"later-2")])
    wait_for(lambda: len(stored(store)) == 22, what="2 more packets stored")
    wait_for(lambda: sorted(hostile.pubacks) == list(range(1, 23)), what="2 more PUBACKs")
    assert len(failed) == 1  # the fast path is off from the first error on
    assert ing.alive
    lines = [r.getMessage() for r in caplog.records if "one-write PUBACKs off" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "queue broken" in lines[0]


def test_an_error_inside_on_message_never_ends_paho_s_thread(
    monkeypatch: pytest.MonkeyPatch, peer, store: Store, ingest, caplog
) -> None:
    """A bug while reading a packet (here: the ICCID pattern) still stores it, in its
    plain form; a packet that cannot be handed over at all stays unacknowledged for
    the broker to send again, and paho's thread goes on with the next."""
    caplog.set_level(logging.WARNING, "gateway.ingest")
    hostile = peer([(GOOD.encode(), b"first")])
    ing = ingest(hostile.port, store)
    wait_for(lambda: hostile.pubacks == [1], what="the first PUBACK")

    class Broken:
        def match(self, _topic: str) -> None:
            raise ValueError("pattern broken")

    monkeypatch.setattr(ing, "_iccid", Broken())
    hostile.send([(GOOD.encode(), b"second")])
    wait_for(lambda: hostile.pubacks == [1, 2], what="the second PUBACK")
    assert stored(store)[-1] == (GOOD, "", b"second")  # no ICCID: the plain form
    plain_submit = store.submit_packet
    refused: list[bytes] = []

    def submit(pkt: Any, wait_s: float = 0.0) -> bool:
        if pkt.payload == b"third":
            refused.append(pkt.payload)
            raise OSError("store unavailable")
        return plain_submit(pkt, wait_s)

    monkeypatch.setattr(store, "submit_packet", submit)
    hostile.send([(GOOD.encode(), b"third"), (GOOD.encode(), b"fourth")])
    wait_for(lambda: 4 in hostile.pubacks, what="the fourth PUBACK")
    assert refused == [b"third"]
    assert 3 not in hostile.pubacks  # left for the broker to send again
    assert [r[2] for r in stored(store)] == [b"first", b"second", b"fourth"]
    assert ing.alive
    assert len(hostile.connects) == 1
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "pattern broken" in text
    assert "store unavailable" in text


def test_ingest_processes_store_a_topic_that_is_not_utf8_and_keep_running(
    peer, store: Store
) -> None:
    from gateway.ingest.pool import IngestPool

    hostile = peer([(BAD, b"bad"), (GOOD.encode(), b"good")])
    cfg = MqttSection(
        host="127.0.0.1",
        port=hostile.port,
        client_id="gw-hostile",
        reconnect_min_s=0.2,
        reconnect_max_s=1,
        ingest_processes=2,
    )
    pool = IngestPool(cfg, store)
    pool.start()
    try:
        wait_for(lambda: sorted(hostile.pubacks) == [1, 2], what="2 PUBACKs")
        assert stored(store) == [(BAD_AS_STORED, BAD_ICCID, b"bad"), (GOOD, ICCID, b"good")]
        wait_for(lambda: pool.stats.bad_topics == 1, what="the count in the process's stats")
        assert pool.alive
        # Each process connected once (the second may still be on its way under
        # load): none ended and was restarted.
        wait_for(lambda: len(hostile.connects) >= 2, what="both processes connected")
        assert len(hostile.connects) == 2
        assert all(p.ended() is None for p in pool.procs)
    finally:
        pool.stop()

"""Durable ingest: a packet is committed before its PUBACK, and survives kill -9."""

from __future__ import annotations

import json
import socket
import sqlite3
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest
import trustme
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.ingest.client import BufferedSocket, _Client
from tests.conftest import (
    Broker,
    GatewayProc,
    db_rows,
    free_port,
    gateway_cmd,
    publish,
    wait_for,
    write_config,
)

ICCID = "8981100000000000012"


def stored(db: Path) -> list[tuple[object, ...]]:
    return db_rows(
        db,
        "SELECT s.topic, s.iccid, p.payload, p.size"
        " FROM packets p JOIN senders s ON s.id = p.sender ORDER BY p.id",
    )


def count(db: Path) -> int:
    try:
        return int(db_rows(db, "SELECT COUNT(*) FROM packets")[0][0])  # type: ignore[call-overload]
    except sqlite3.OperationalError:
        return 0  # no file yet, or the file before its schema


def connected(
    gateway_proc: Callable[..., GatewayProc], mosquitto: Broker, tmp_path: Path, **config: str
) -> GatewayProc:
    """A gateway with the tests' config (state in tmp_path/state), once it is connected."""
    cfg = write_config(tmp_path / "gw.toml", mosquitto.port, tmp_path / "state", **config)
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway to subscribe")
    return gw


def test_every_published_packet_is_stored_with_topic_iccid_and_exact_bytes(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    gw = connected(gateway_proc, mosquitto, tmp_path, mqtt_extra="receive_maximum = 300")
    db = tmp_path / "state" / "gateway.db"
    messages = [
        (f"devices/{ICCID}/up", b'{"temp": 21.5}'),
        (f"devices/{ICCID}/up", bytes(range(256))),  # binary, not UTF-8
        ("devices/8981100000000000020/up", b""),  # empty payload is still a packet
        ("devices/8981100000000000020/up", "température".encode()),
    ]
    publish(mosquitto.port, messages)
    wait_for(lambda: count(db) == 4, what="4 packets in the store")
    rows = stored(db)
    assert [(r[0], r[2]) for r in rows] == messages
    assert [r[1] for r in rows] == [ICCID, ICCID, "8981100000000000020", "8981100000000000020"]
    assert [r[3] for r in rows] == [len(p) for _, p in messages]
    # No packet webhook: the "auto" commit delay is its upper bound, and the log says so,
    # with its stretch for a trickle and the packets that end it early: half of what the
    # broker may send unacknowledged.
    assert "commit delay 200 ms (auto; 500 ms for fewer than 8) or 150 packets" in gw.log()
    assert gw.terminate() == 0


def test_the_broker_connection_is_read_in_one_recv_and_served_from_the_buffer() -> None:
    a, b = socket.socketpair()
    with a, b:
        data = b"\x30\x04\x00\x01tx" * 50 + b"\x30\x7f" + bytes(127)
        a.sendall(data)
        wait_for(lambda: len(b.recv(len(data), socket.MSG_PEEK)) == len(data), what="data")
        sock = BufferedSocket(b)
        # paho's reads: the type byte, the length byte, then the rest of the packet
        got = [sock.recv(1)]
        assert sock.pending() == len(data) - 1  # one recv() took everything there was
        b.setblocking(False)
        while True:
            got.append(length := sock.recv(1))
            got.append(sock.recv(length[0]))
            if not sock.pending():
                break
            got.append(sock.recv(1))
        assert b"".join(got) == data
        with pytest.raises(BlockingIOError):
            sock.recv(1)


def test_the_gateways_client_reads_publishes_as_plain_paho_does(mosquitto: Broker) -> None:
    # _Client skips paho's property parsing for QoS 1 packets without properties; every
    # field a subscriber sees must stay what plain paho gives, with and without them.
    def subscriber(cls: type[mqtt.Client], got: list[tuple[object, ...]]) -> mqtt.Client:
        c = cls(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5, manual_ack=True)

        def on_message(c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
            props = m.properties.json() if m.properties is not None else None
            got.append((m.topic, m.payload, m.qos, m.retain, m.dup, m.mid > 0, props))
            c.ack(m.mid, m.qos)

        c.on_message = on_message
        c.connect("127.0.0.1", mosquitto.port)
        c.subscribe("t/#", qos=2)
        c.loop_start()
        return c

    def props(**values: object) -> Properties:
        p = Properties(PacketTypes.PUBLISH)
        for k, v in values.items():
            setattr(p, k, v)
        return p

    pub = mqtt.Client(CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", mosquitto.port)
    pub.loop_start()
    pub.publish("t/retained", b"kept", qos=1, retain=True).wait_for_publish(10)
    ours: list[tuple[object, ...]] = []
    plain: list[tuple[object, ...]] = []
    clients = [subscriber(_Client, ours), subscriber(mqtt.Client, plain)]
    try:
        wait_for(lambda: len(ours) == len(plain) == 1, what="the retained message")
        sent = [
            ("t/a", b"plain", 1, None),
            ("t/b", bytes(range(256)), 1, None),
            ("t/" + "x" * 300, b"", 1, None),  # a long topic, an empty payload
            ("t/c", b'{"v":1}', 1, props(ContentType="application/json")),
            ("t/d", b"\x01", 1, props(UserProperty=[("k", "v"), ("k", "w")])),
            ("t/e", b"fmt", 1, props(PayloadFormatIndicator=1, MessageExpiryInterval=60)),
            ("t/f", b"q0", 0, None),
            ("t/g", b"q2", 2, None),
            ("t/h", b"q2p", 2, props(ContentType="text/plain")),
        ]
        for topic, payload, qos, p in sent:
            pub.publish(topic, payload, qos=qos, properties=p).wait_for_publish(10)
        n = 1 + len(sent)
        wait_for(lambda: len(ours) == len(plain) == n, what=f"{n} messages each")
    finally:
        for c in [*clients, pub]:
            c.disconnect()
            c.loop_stop()
    assert ours == plain
    assert [(m[0], m[1], m[2]) for m in ours[1:]] == [(t, p, q) for t, p, q, _ in sent]
    assert ours[0][3] is True  # the retained one
    assert ours[4][6] == {"ContentType": "application/json"}


@pytest.mark.parametrize("transport", ["tcp", "tls"])
def test_a_burst_of_small_and_large_packets_is_stored_whole_and_in_order(
    transport: str, tmp_path: Path, gateway_proc
) -> None:
    # The gateway reads the broker connection through a 64 KiB buffer (BufferedSocket):
    # many packets per read, and packets larger than the buffer or split over TLS records.
    d = tmp_path / "broker"
    d.mkdir()
    tls_port = free_port()
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    server = ca.issue_cert("127.0.0.1")
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    broker = Broker(
        free_port(),
        d,
        extra_conf=f"listener {tls_port} 127.0.0.1\ncertfile {d / 'cert.pem'}\n"
        f"keyfile {d / 'key.pem'}\n",
    )
    broker.start()
    try:
        tls = f'tls = true\nca_file = "{tmp_path / "ca.pem"}"' if transport == "tls" else ""
        cfg = write_config(tmp_path / "gw.toml", broker.port, tmp_path / "state", mqtt_extra=tls)
        if transport == "tls":
            cfg.write_text(cfg.read_text().replace(f"port = {broker.port}", f"port = {tls_port}"))
        gw = gateway_proc(cfg)
        gw.start()
        wait_for(lambda: "subscribed to" in gw.log(), what="gateway to subscribe")
        sizes = [40] * 300 + [16_000, 70_000, 40, 200_000, 3] + [60] * 200
        messages = [(f"devices/{ICCID}/up", bytes([i % 256]) * n) for i, n in enumerate(sizes)]
        publish(broker.port, messages)
        db = tmp_path / "state" / "gateway.db"
        wait_for(lambda: count(db) == len(messages), what=f"{len(messages)} packets stored")
        assert [(r[0], r[2]) for r in stored(db)] == messages
        assert gw.terminate() == 0
    finally:
        broker.stop()


def test_two_identical_packets_from_a_device_are_both_kept(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    gw = connected(gateway_proc, mosquitto, tmp_path)
    publish(mosquitto.port, [(f"devices/{ICCID}/up", b"same")] * 2)
    db = tmp_path / "state" / "gateway.db"
    wait_for(lambda: count(db) == 2, what="both identical packets stored")
    gw.terminate()


def test_packet_survives_kill9_of_the_gateway_twice_during_a_stream(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    total = 5000
    gw = connected(gateway_proc, mosquitto, tmp_path)
    db = tmp_path / "state" / "gateway.db"

    def stream() -> None:
        for start in range(0, total, 250):
            publish(
                mosquitto.port,
                [(f"devices/{ICCID}/up", f"pkt-{i}".encode()) for i in range(start, start + 250)],
            )
            time.sleep(0.02)

    publisher = threading.Thread(target=stream)
    publisher.start()
    for threshold in (total // 5, total // 2):
        wait_for(lambda t=threshold: count(db) >= t, what=f"{threshold} packets stored")
        gw.kill9()
        gw.start()
    publisher.join(60)
    wait_for(lambda: count(db) >= total, timeout=60, what=f"all {total} packets stored")
    gw.terminate()
    payloads = [r[2] for r in stored(db)]
    assert len(payloads) == total, f"{len(payloads) - len(set(payloads))} duplicates"
    assert set(payloads) == {f"pkt-{i}".encode() for i in range(total)}
    status = json.loads(
        subprocess.run(
            gateway_cmd("status", "--json", "-c", str(gw.config)),
            capture_output=True,
            check=True,
            text=True,
        ).stdout
    )
    assert status["packets"]["received"] == total
    assert status["packets"]["pending"] == total


def test_broker_restart_in_the_middle_of_a_stream_loses_nothing(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    gw = connected(gateway_proc, mosquitto, tmp_path)
    db = tmp_path / "state" / "gateway.db"
    publish(mosquitto.port, [(f"devices/{ICCID}/up", f"a-{i}".encode()) for i in range(500)])
    mosquitto.restart()
    publish(mosquitto.port, [(f"devices/{ICCID}/up", f"b-{i}".encode()) for i in range(500)])
    wait_for(lambda: count(db) >= 1000, timeout=30, what="1000 packets after broker restart")
    gw.terminate()
    payloads = {r[2] for r in stored(db)}
    assert len(payloads) == 1000
    assert count(db) == 1000


def test_oversized_payload_is_dead_lettered_with_its_reason_and_acknowledged(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    gw = connected(gateway_proc, mosquitto, tmp_path, mqtt_extra="max_payload_bytes = 100")
    publish(mosquitto.port, [(f"devices/{ICCID}/up", b"x" * 101), (f"devices/{ICCID}/up", b"ok")])
    db = tmp_path / "state" / "gateway.db"
    wait_for(lambda: count(db) == 1, what="the small packet stored")
    wait_for(
        lambda: db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 1,
        what="the oversized packet dead-lettered",
    )
    reason, body, topic = db_rows(db, "SELECT reason, body, topic FROM dead_letters")[0]
    assert reason == "too_large"
    assert body == b"x" * 101
    assert topic == f"devices/{ICCID}/up"
    assert gw.terminate() == 0
    # Acknowledged: a restarted gateway on the same session gets nothing again.
    gw.start()
    wait_for(lambda: gw.log().count("connected to") >= 2, what="reconnect")
    publish(mosquitto.port, [(f"devices/{ICCID}/up", b"marker")])
    wait_for(lambda: count(db) == 2, what="marker stored")
    assert db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 1
    out = subprocess.run(
        gateway_cmd("dlq", "list", "-c", str(gw.config)), capture_output=True, text=True, check=True
    ).stdout
    assert "too_large" in out
    gw.terminate()


def test_sigterm_stops_within_5_seconds_with_exit_code_0(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    gw = connected(gateway_proc, mosquitto, tmp_path)
    publish(mosquitto.port, [(f"devices/{ICCID}/up", b"x")] * 200)
    began = time.monotonic()
    assert gw.terminate(timeout=5) == 0
    assert time.monotonic() - began < 5


def test_status_reads_the_store_while_the_gateway_is_stopped(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    gw = connected(gateway_proc, mosquitto, tmp_path)
    publish(mosquitto.port, [(f"devices/{ICCID}/up", b"x")] * 7)
    wait_for(lambda: count(tmp_path / "state" / "gateway.db") == 7, what="7 stored")
    gw.terminate()
    out = subprocess.run(
        gateway_cmd("status", "--json", "-c", str(gw.config)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    snap = json.loads(out)
    assert snap["packets"]["received"] == 7
    assert snap["packets"]["pending"] == 7
    assert snap["packets"]["delivered"] == 0
    assert snap["packets"]["dead"] == 0
    table = subprocess.run(
        gateway_cmd("status", "-c", str(gw.config)), capture_output=True, text=True, check=True
    ).stdout
    assert "received=7" in table


def test_a_store_that_falls_behind_holds_the_mqtt_thread_instead_of_filling_memory(
    tmp_path: Path,
) -> None:
    """submit_packet waits while max_pending packets are uncommitted (the broker then
    meets TCP backpressure), gives up after wait_s so keepalives still go out, and
    resumes as soon as the writer catches up; every packet is committed."""
    from gateway.store import Incoming, Store

    with Store.open(tmp_path) as store:
        gate, inside = threading.Event(), threading.Event()

        def busy(_c: object) -> None:
            inside.set()
            gate.wait(10)

        blocked = store.call(busy)
        assert inside.wait(5)  # the writer is busy from here on

        def pkt(i: int) -> Incoming:
            return Incoming("devices/x/up", f"p{i}".encode(), "", i % 65535 + 1, False, 1)

        for i in range(store.max_pending):
            assert store.submit_packet(pkt(i), wait_s=1.0)
        began = time.monotonic()
        assert not store.submit_packet(pkt(store.max_pending), wait_s=0.3)  # full: waited
        assert time.monotonic() - began >= 0.3
        gate.set()
        blocked.result(5)
        began = time.monotonic()
        assert store.submit_packet(pkt(store.max_pending + 1), wait_s=10)
        assert time.monotonic() - began < 5
        n = store.max_pending + 2

        def committed() -> bool:
            return store.run_sync(
                lambda c: c.execute("SELECT COUNT(*) FROM packets").fetchone()[0] == n
            )

        wait_for(committed, timeout=10, what=f"{n} packets committed")


@pytest.mark.parametrize("protocol", [mqtt.MQTTv5, mqtt.MQTTv311], ids=["v5", "v3.1.1"])
def test_pubacks_sent_in_one_write_acknowledge_every_packet_to_the_broker(
    mosquitto: Broker, protocol: int
) -> None:
    """The gateway acknowledges a commit group with one write of all its PUBACKs. The
    broker must take each of them: a session resumed after a clean disconnect gets
    nothing again, while the packets left unacknowledged come back."""
    from gateway.ingest.client import send_pubacks

    total = 60
    topic = "devices/acks/up"

    def session(expect: int, ack: int) -> list[int]:
        """Resume the session, take what arrives, acknowledge the first `ack` at once."""
        got: list[int] = []
        v5 = protocol == mqtt.MQTTv5
        c = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id="acks",
            protocol=protocol,
            clean_session=None if v5 else False,
            manual_ack=True,
        )
        c.on_message = lambda _c, _u, m: got.append(m.mid)
        kwargs: dict[str, object] = {}
        if v5:
            props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
            props.SessionExpiryInterval = 3600
            props.ReceiveMaximum = 1000
            kwargs = {"clean_start": False, "properties": props}
        c.connect("127.0.0.1", mosquitto.port, **kwargs)  # type: ignore[arg-type]
        c.loop_start()
        c.subscribe(topic, qos=1)
        wait_for(lambda: len(got) >= expect, what=f"{expect} packets")
        time.sleep(0.5)  # anything beyond `expect` (a redelivery) has time to show
        send_pubacks(c, got[:ack])
        # A fence: the broker handles a connection's packets in order, so once it has
        # acknowledged this one it has taken the PUBACKs before it. (A disconnect right
        # after them can make mosquitto drop the ones it has not read yet.)
        c.publish("fence/acks", b"", qos=1).wait_for_publish(10)
        c.disconnect()
        c.loop_stop()
        return got

    session(0, 0)  # the persistent session, subscribed
    publish(mosquitto.port, [(topic, f"p{i}".encode()) for i in range(total)])
    first = session(total, total - 10)
    assert len(first) == total
    again = session(10, 10)
    assert sorted(again) == sorted(first[total - 10 :])  # only the unacknowledged ones
    assert session(0, 0) == []


def test_a_topic_removed_from_the_config_is_unsubscribed_from_the_persistent_session(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    topics = 'topics = ["devices/+/up", "legacy/+/data"]'
    gw = connected(gateway_proc, mosquitto, tmp_path, mqtt_extra=topics)
    db = tmp_path / "state" / "gateway.db"
    publish(mosquitto.port, [("legacy/1/data", b"old")])
    wait_for(lambda: count(db) == 1, what="the legacy topic taken while configured")
    assert gw.terminate() == 0
    gw.config.write_text(gw.config.read_text().replace(topics, 'topics = ["devices/+/up"]'))
    gw.start()
    wait_for(lambda: "unsubscribed from legacy/+/data" in gw.log(), what="the unsubscribe")
    wait_for(lambda: "subscribed to devices/+/up" in gw.log(), what="the subscription")
    # One publisher, in this order: had the session kept legacy/+/data, its packet
    # would be stored before the device's.
    publish(mosquitto.port, [("legacy/2/data", b"new"), (f"devices/{ICCID}/up", b"up")])
    wait_for(lambda: count(db) >= 2, what="the device packet")
    assert [r[0] for r in stored(db)] == ["legacy/1/data", f"devices/{ICCID}/up"]
    # Once the new subscription is granted, the store no longer lists the old filter.
    meta = "SELECT value FROM meta WHERE key = 'subscriptions'"
    wait_for(lambda: db_rows(db, meta) == [('["devices/+/up"]',)], what="meta.subscriptions")
    assert gw.terminate() == 0

"""firmware_sim fleet and sink against real parts: mosquitto, paho, aiohttp, trustme."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gzip
import json
import os
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections import defaultdict
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import aiohttp
import cbor2
import paho.mqtt.client as mqtt
import pytest
import trustme

from firmware_sim import devices, luhn
from firmware_sim.devices import Fleet, make_iccid
from firmware_sim.sink import Sink, detect_shape
from gateway.delivery import signing
from tests.conftest import ROOT, Broker, free_port, wait_for, wait_port

MONOZ_TS = "2023-10-16T09:17:32.123Z"
WHSEC = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


class Subscriber:
    """A paho QoS 1 subscriber with a persistent session, collecting (topic, payload)."""

    def __init__(self, port: int, topic: str = "devices/+/up") -> None:
        self.topic = topic
        self.messages: list[tuple[str, bytes]] = []
        self.subscribed = threading.Event()
        self.client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"test-sub-{port}",
            protocol=mqtt.MQTTv311,
            clean_session=False,
        )
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = lambda *_: self.subscribed.set()
        self.client.on_message = lambda _c, _u, m: self.messages.append((m.topic, m.payload))
        self.client.reconnect_delay_set(1, 2)
        self.client.connect_async("127.0.0.1", port, keepalive=10)
        self.client.loop_start()
        assert self.subscribed.wait(10), "subscriber never got its SUBACK"

    def _on_connect(self, client: mqtt.Client, *_: Any) -> None:
        client.subscribe(self.topic, qos=1)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()

    def counters(self) -> dict[str, set[int]]:
        """Reading counters received per ICCID (any encoding)."""
        out: dict[str, set[int]] = defaultdict(set)
        for topic, payload in list(self.messages):
            iccid = topic.split("/")[1]
            out[iccid].add(_decode_any(payload)["counter"])
        return out


def _decode_any(payload: bytes) -> dict[str, Any]:
    if payload[:1] == b"{":
        return json.loads(payload)
    if len(payload) == 27 and payload[0] == 1:
        return {"counter": struct.unpack(">I", payload[1:5])[0]}
    return cbor2.loads(payload)


@pytest.fixture
def subscriber(mosquitto: Broker) -> Iterator[Subscriber]:
    sub = Subscriber(mosquitto.port)
    yield sub
    sub.close()


@pytest.fixture
def in_thread() -> Iterator[Any]:
    """Run fleets in a worker thread; any still running at teardown is stopped."""
    fleets: list[Fleet] = []
    with ThreadPoolExecutor(max_workers=2) as pool:

        def start(fleet: Fleet, **kw: Any) -> Future[devices.FleetStats]:
            fleets.append(fleet)
            return pool.submit(fleet.run, **kw)

        yield start
        for f in fleets:
            f.stop()


# ---------------------------------------------------------------- identities and layout


def test_iccids_are_19_digit_8981_numbers_with_a_valid_luhn_digit() -> None:
    iccids = [make_iccid(i) for i in range(500)]
    assert len(set(iccids)) == 500
    for iccid in iccids:
        assert len(iccid) == 19
        assert iccid.startswith("8981")
        assert luhn.is_valid(iccid)
    assert luhn.is_valid("79927398713")  # the textbook Luhn example
    assert not luhn.is_valid("79927398710")
    # A 19-digit ICCID still fits in a signed 64-bit JSON number (monoZ sends it as one).
    assert int(make_iccid(10**12 - 1)) < 2**63


def test_binary_payload_is_27_big_endian_bytes_in_the_documented_layout() -> None:
    reading = devices.Reading(7, 1_700_000_000_123, -3.25, 48.5, 3987, 35.6812345, -139.7671234)
    payload = devices.encode(reading, "binary")
    assert len(payload) == 27
    assert struct.unpack(">BIQhHHii", payload) == (
        1, 7, 1_700_000_000_123, -325, 4850, 3987, 356812345, -1397671234,
    )  # fmt: skip
    assert devices.decode(payload, "binary") == reading.as_dict()


# ---------------------------------------------------------------- fleet on a real broker


@pytest.mark.parametrize("encoding", ["json", "cbor", "binary", "mixed"])
def test_fleet_publishes_decodable_readings_for_each_encoding(
    mosquitto: Broker, subscriber: Subscriber, encoding: str
) -> None:
    fleet = Fleet("127.0.0.1", mosquitto.port, devices=3, rate=50, encoding=encoding, seed=1)
    stats = fleet.run(duration=10, count=8)
    assert (stats.generated, stats.published, stats.acked) == (24, 24, 24)
    assert (stats.dropped, stats.unacked) == (0, 0)
    wait_for(lambda: len(subscriber.messages) >= 24, 10, "24 messages at the subscriber")

    kinds = {d.iccid: d.kind for d in fleet.devices}
    expected = ["json", "cbor", "binary"] if encoding == "mixed" else [encoding] * 3
    assert list(kinds.values()) == expected
    per_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    now_ms = time.time() * 1000
    for topic, payload in subscriber.messages:
        prefix, iccid, suffix = topic.split("/")
        assert (prefix, suffix) == ("devices", "up")
        assert luhn.is_valid(iccid)
        assert len(iccid) == 19
        assert iccid.startswith("8981")
        kind = kinds[iccid]
        if kind == "json":
            reading = json.loads(payload)
        elif kind == "cbor":
            reading = cbor2.loads(payload)
            assert payload[0] == 0xA7  # a CBOR map of 7 pairs, not JSON text
        else:
            fields = struct.unpack(">BIQhHHii", payload)
            assert fields[0] == 1
            reading = {
                "counter": fields[1], "ts": fields[2], "temperature": fields[3] / 100,
                "humidity": fields[4] / 100, "battery_mv": fields[5],
                "lat": fields[6] / 1e7, "lon": fields[7] / 1e7,
            }  # fmt: skip
        assert set(reading) == {"counter", "ts", "temperature", "humidity", "battery_mv",
                                "lat", "lon"}  # fmt: skip
        assert now_ms - 60_000 < reading["ts"] <= now_ms + 1000
        assert -20 <= reading["temperature"] <= 50
        assert 5 <= reading["humidity"] <= 95
        assert 3300 <= reading["battery_mv"] <= 4200
        assert 35.5 < reading["lat"] < 35.9
        assert 139.6 < reading["lon"] < 140.0
        per_device[iccid].append(reading)
    assert set(per_device) == set(kinds)
    for readings in per_device.values():
        assert sorted(r["counter"] for r in readings) == list(range(8))
        stamps = [r["ts"] for r in sorted(readings, key=lambda r: r["counter"])]
        assert stamps == sorted(stamps)


def test_fleet_reconnects_after_a_broker_restart_and_loses_nothing(
    mosquitto: Broker, subscriber: Subscriber, in_thread: Any
) -> None:
    fleet = Fleet("127.0.0.1", mosquitto.port, devices=3, rate=20, encoding="mixed", seed=2)
    run = in_thread(fleet, duration=30)
    wait_for(lambda: fleet.stats().acked >= 15, 10, "the first PUBACKs")
    mosquitto.restart()
    wait_for(lambda: fleet.stats().connects >= 6, 15, "all 3 devices to reconnect")
    acked = fleet.stats().acked
    wait_for(lambda: fleet.stats().acked >= acked + 15, 10, "PUBACKs after the reconnect")
    fleet.stop()
    stats = run.result(timeout=20)

    assert stats.disconnects >= 3
    assert (stats.dropped, stats.unacked) == (0, 0)
    assert stats.acked == stats.published == stats.generated
    made = {d.iccid: set(range(d.counter)) for d in fleet.devices}
    wait_for(lambda: subscriber.counters() == made, 15, "every reading at the subscriber")


def test_fleet_buffers_while_the_broker_is_down_and_drops_only_the_oldest_beyond_it(
    mosquitto: Broker, subscriber: Subscriber, in_thread: Any
) -> None:
    fleet = Fleet(
        "127.0.0.1", mosquitto.port, devices=2, rate=25, encoding="json", seed=3, buffer=5
    )
    run = in_thread(fleet, duration=30)
    wait_for(lambda: fleet.stats().acked >= 10, 10, "the first PUBACKs")
    mosquitto.stop()
    wait_for(lambda: all(d.dropped >= 3 for d in fleet.devices), 10, "ring buffers to overflow")
    mosquitto.start()
    wait_for(lambda: fleet.stats().connects >= 4, 15, "both devices to reconnect")
    fleet.stop()
    stats = run.result(timeout=20)

    assert stats.unacked == 0
    assert stats.generated == stats.acked + stats.dropped
    wait_for(
        lambda: sum(map(len, subscriber.counters().values())) >= stats.acked,
        15,
        "every acknowledged reading at the subscriber",
    )
    received = subscriber.counters()
    for dev in fleet.devices:
        missing = sorted(set(range(dev.counter)) - received[dev.iccid])
        assert len(missing) == dev.dropped
        # Drop-oldest: the lost readings are one run, older than the 5 that waited.
        assert missing == list(range(missing[0], missing[0] + dev.dropped))
        assert set(range(missing[-1] + 1, missing[-1] + 6)) <= received[dev.iccid]


def test_fleet_refuses_a_broker_that_is_not_loopback(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="not a loopback address"):
        Fleet("192.0.2.10", 1883)
    assert devices.main(["--broker", "mqtt.example.com:1883", "--count", "1"]) == 2
    assert "'mqtt.example.com' is not a loopback address" in capsys.readouterr().err
    assert devices.main(["--broker", "127.0.0.1:notaport"]) == 2


def test_fleet_cli_prints_a_one_line_summary(mosquitto: Broker, subscriber: Subscriber) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "firmware_sim", "fleet", "--broker",
         f"127.0.0.1:{mosquitto.port}", "--devices", "2", "--rate", "50", "--count", "3",
         "--encoding", "binary", "--seed", "4"],
        cwd=ROOT, capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("fleet: generated=6 published=6 acked=6 buffered_dropped=0")
    assert len(out.stdout.splitlines()) == 1
    wait_for(lambda: len(subscriber.messages) >= 6, 10, "6 messages")


# ---------------------------------------------------------------- sink


def monoz_body(n: int = 1) -> bytes:
    obj = {"ICCID": int(make_iccid(1)), "Timestamp": MONOZ_TS, "Payload": "ABC"}
    return json.dumps(obj if n == 1 else [obj] * n).encode()


def monogoto_cdr(**override: Any) -> dict[str, Any]:
    cdr = {
        "CdrType": "DATA", "UniqueID": "CDR-AYGGEWKNrXqt4AT20SP9", "Iccid": make_iccid(1),
        "IMSI": "440101234567890", "MSISDN": "", "IMEI": "359110060403437", "MNO": "44010",
        "MnoName": "NTT DOCOMO", "MCC": "440", "MNC": "10", "ThingName": "ICCID x",
        "ThingId": "ThingId_ICCID_x", "ThingsGroupId": "", "ThingsGroupName": "",
        "Timestamp": 1655811695222, "Usage": 7308, "APN": "data.mono",
    }  # fmt: skip
    cdr.update(override)
    return cdr


REPORT = {
    "contentType": "application/zip", "httpMethod": "GET",
    "callbackURL": "http://127.0.0.1:8080/reports/abc", "validUntil": "2023-01-10T11:20:09Z",
    "fileName": "tx00001.zip", "fileSizeInBytes": 100000, "numberOfLines": 100,
    "taskName": "daily", "taskId": 1, "error": "",
}  # fmt: skip


@pytest.mark.parametrize(
    ("body", "shape", "error"),
    [
        (json.loads(monoz_body()), "monoz", None),
        ({"Topic": "devices/x/up", "Timestamp": MONOZ_TS, "Payload": {"t": 1}}, "monoz", None),
        (json.loads(monoz_body(10)), "monoz", None),
        (json.loads(monoz_body(11)), "monoz", "at most 10"),
        ({"ICCID": 1, "Timestamp": "2023-10-16T09:17:32.1233516Z", "Payload": ""}, "monoz",
         "Timestamp"),
        ({"ICCID": 1, "Timestamp": MONOZ_TS, "Payload": "", "x": 1}, "monoz", "unexpected"),
        ([monogoto_cdr(), monogoto_cdr(Usage=0)], "monogoto", None),
        ([monogoto_cdr(Usage="7308")], "monogoto", "Usage: expected a number"),
        ([{**monogoto_cdr(), "Extra": ""}], "monogoto", "unexpected ['Extra']"),
        ([monogoto_cdr(UniqueID="CDR-short")], "monogoto", "UniqueID"),
        ({"cdr": monogoto_cdr(), "meta": {"event": "big"}, "name": "cloud"}, "envelope", None),
        ({"packet": {}, "meta": {}, "name": 3}, "envelope", "name must be text"),
        (REPORT, "report", None),
        ({**REPORT, "taskId": "1"}, "report", "taskId"),
        (monogoto_cdr(), "flat", None),
        ({"Topic": "t", "ICCID": 1, "Timestamp": MONOZ_TS, "Payload": "p"}, "flat", None),
        ([], "array", "empty"),
        (3, "scalar", "not an object"),
    ],
)  # fmt: skip
def test_shape_detection(body: Any, shape: str, error: str | None) -> None:
    got_shape, got_error, _ = detect_shape(body)
    assert got_shape == shape
    if error is None:
        assert got_error is None
    else:
        assert got_error is not None
        assert error in got_error


async def test_sink_verifies_cdr_manager_signatures() -> None:
    body = monoz_body(2)
    async with Sink(secret="s3cret") as sink, aiohttp.ClientSession() as http:
        good = {"X-CDR-Signature": signing.cdr_manager("s3cret", body)}
        bad = {"X-CDR-Signature": signing.cdr_manager("other", body)}
        for headers, want in [(good, 200), (bad, 401), ({}, 401)]:
            async with http.post(f"{sink.url}/cdr", data=body, headers=headers) as resp:
                assert resp.status == want
    ok, wrong, missing = sink.requests
    assert (ok["signature_ok"], ok["shape"], ok["items"], ok["path"]) == (True, "monoz", 2, "/cdr")
    assert (wrong["signature_ok"], wrong["status"]) == (False, 401)
    assert missing["reason"] == "missing X-CDR-Signature"
    assert sink.counters["ok"] == 1
    assert sink.counters["unauthorized"] == 2


async def test_sink_verifies_standard_webhooks_signatures_including_rotation() -> None:
    body = monoz_body()
    ts = int(time.time())
    other = "whsec_" + base64.b64encode(b"x" * 32).decode()

    def headers(secrets: str, stamp: int = ts, msg_id: str = "msg_1") -> dict[str, str]:
        sig = signing.standard_webhooks(secrets, msg_id, stamp, body)
        return {"webhook-id": msg_id, "webhook-timestamp": str(stamp), "webhook-signature": sig}

    cases = [
        (headers(WHSEC), 200),
        (headers(f"{other} {WHSEC}"), 200),  # several signatures: any match will do
        (headers(other), 401),
        (headers(WHSEC, stamp=ts - 3600), 401),  # outside the 5 min tolerance
        ({**headers(WHSEC), "webhook-id": "msg_2"}, 401),  # id is part of what is signed
    ]
    async with (
        Sink(secret=WHSEC, scheme="standard-webhooks") as sink,
        aiohttp.ClientSession() as http,
    ):
        for hdrs, want in cases:
            async with http.post(sink.url, data=body, headers=hdrs) as resp:
                assert resp.status == want, await resp.text()
    assert [r["signature_ok"] for r in sink.requests] == [True, True, False, False, False]
    assert "more than 300 s off" in sink.requests[3]["reason"]


async def test_sink_records_shapes_and_strict_mode_rejects_shape_errors() -> None:
    bad = json.dumps([monogoto_cdr(Timestamp="1655811695222")]).encode()
    async with aiohttp.ClientSession() as http:
        async with Sink() as sink:
            for body in (monoz_body(), bad, json.dumps(REPORT).encode(), b"not json"):
                async with http.post(sink.url, data=body) as resp:
                    assert resp.status == 200
        shapes = [(r["shape"], bool(r["shape_error"])) for r in sink.requests]
        assert shapes == [("monoz", False), ("monogoto", True), ("report", False),
                          ("non-json", True)]  # fmt: skip
        assert sink.counters["shape_errors"] == 2
        async with Sink(strict=True) as strict, http.post(strict.url, data=bad) as resp:
            assert resp.status == 400
            assert "Timestamp: expected a number" in (await resp.json())["reason"]


async def test_sink_fail_rate_is_deterministic_with_a_seed_and_429_sends_retry_after() -> None:
    statuses: list[list[int]] = []
    async with aiohttp.ClientSession() as http:
        for _ in range(2):
            async with Sink(fail_rate=0.5, fail_status=429, retry_after=7, seed=42) as sink:
                seen = []
                for _ in range(20):
                    async with http.post(sink.url, data=monoz_body()) as resp:
                        seen.append(resp.status)
                        if resp.status == 429:
                            assert resp.headers["Retry-After"] == "7"
                statuses.append(seen)
    assert statuses[0] == statuses[1]
    assert set(statuses[0]) == {200, 429}
    assert sink.counters["http_429"] == statuses[0].count(429)


async def test_sink_runtime_knobs_change_failures_and_delay() -> None:
    async with Sink() as sink, aiohttp.ClientSession() as http:
        sink.fail_status, sink.fail_next = 503, 2
        got = []
        for _ in range(3):
            async with http.post(sink.url, data=monoz_body()) as resp:
                got.append((resp.status, resp.headers.get("Retry-After")))
        assert got == [(503, "1"), (503, "1"), (200, None)]

        sink.delay_ms = 300
        began = time.monotonic()
        async with http.post(sink.url, data=monoz_body()) as resp:
            assert resp.status == 200
        assert time.monotonic() - began >= 0.3

        sink.delay_ms, sink.fail_status, sink.fail_next = 0, 0, 1
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with http.post(sink.url, data=monoz_body()):
                pass
        assert sink.requests[-1]["status"] == 0
        assert sink.counters["closed"] == 1


async def test_sink_gunzips_bodies_and_checks_the_signature_over_the_plain_body() -> None:
    body = monoz_body(3)
    sig = {"X-CDR-Signature": signing.cdr_manager("k", body), "Content-Encoding": "gzip"}
    async with Sink(secret="k") as sink, aiohttp.ClientSession() as http:
        async with http.post(sink.url, data=gzip.compress(body), headers=sig) as resp:
            assert resp.status == 200
        async with http.post(sink.url, data=b"\x1f\x8b\x08broken", headers=sig) as resp:
            assert resp.status == 400
    ok, broken = sink.requests
    assert ok["body"] == body.decode()
    assert ok["signature_ok"] is True
    assert ok["wire_bytes"] != ok["body_bytes"] == len(body)
    assert broken["reason"].startswith("bad gzip body")


async def test_sink_checks_basic_bearer_and_api_key_auth() -> None:
    async with aiohttp.ClientSession() as http:
        async with Sink(basic="u:p", api_key="K") as sink:
            good = {"Authorization": "Basic " + base64.b64encode(b"u:p").decode(), "x-api-key": "K"}
            for headers, want in [(good, 200), ({**good, "x-api-key": "no"}, 401), ({}, 401)]:
                async with http.post(sink.url, data=b"{}", headers=headers) as resp:
                    assert resp.status == want
        bearer = {"Authorization": "Bearer tok"}
        async with Sink(bearer="tok") as sink, http.post(sink.url, headers=bearer) as resp:
            assert resp.status == 200


async def test_sink_writes_one_json_line_per_request_and_marks_duplicates(
    tmp_path: Path,
) -> None:
    record = tmp_path / "rec" / "sink.jsonl"
    async with Sink(record=record) as sink, aiohttp.ClientSession() as http:
        for data in (monoz_body(), monoz_body(), b"\x00\xff binary"):
            async with http.post(f"{sink.url}/in?x=1", data=data,
                                 headers={"webhook-id": "msg_dup"}) as resp:  # fmt: skip
                assert resp.status == 200
    lines = [json.loads(line) for line in record.read_text().splitlines()]
    assert lines == sink.requests
    first, second, binary = lines
    assert {"time", "method", "path", "query", "headers", "body", "shape", "shape_error",
            "signature_ok", "status", "webhook_id", "duplicate"} <= set(first)  # fmt: skip
    assert (first["path"], first["query"], first["method"]) == ("/in", "x=1", "POST")
    assert first["headers"]["webhook-id"] == "msg_dup"
    assert (first["duplicate"], second["duplicate"]) == (False, True)
    assert base64.b64decode(binary["body_b64"]) == b"\x00\xff binary"
    assert "body" not in binary
    assert sink.counters["duplicates"] == 2


async def test_sink_serves_https_with_a_test_ca() -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    async with Sink(ssl_context=server_ctx) as sink, aiohttp.ClientSession() as http:
        assert sink.url.startswith("https://127.0.0.1:")
        async with http.post(sink.url, data=monoz_body(), ssl=client_ctx) as resp:
            assert resp.status == 200
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            await http.post(sink.url, data=monoz_body())  # default trust store: refused
    assert len(sink.requests) == 1


def test_sink_cli_records_and_stops_cleanly_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    record = tmp_path / "sink.jsonl"
    proc = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "sink", "--port", str(port), "--secret", "k",
         "--record", str(record)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        wait_port(port)
        body = monoz_body()

        async def post() -> int:
            hdrs = {"X-CDR-Signature": signing.cdr_manager("k", body)}
            url = f"http://127.0.0.1:{port}/x"
            async with (
                aiohttp.ClientSession() as http,
                http.post(url, data=body, headers=hdrs) as r,
            ):
                return r.status

        assert asyncio.run(post()) == 200
        os.kill(proc.pid, signal.SIGTERM)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    assert " POST /x 200 monoz sig=ok " in out
    assert "requests=1 ok=1" in err
    assert json.loads(record.read_text())["signature_ok"] is True


# -- the modem's radio, reboots, power cycles and the faults they clear --------------------


def _at(url: str, timeout: float = 1.0) -> Any:
    from gateway.modem.at import AtChannel

    ch = AtChannel.open(url, timeout=timeout)
    ch.init()
    return ch


def _registration(ch: Any) -> str:
    return str(ch.command("AT+CEREG?")[0].split(",")[1])


def test_emulated_radio_cycle_clears_lost_registration_and_stops_counting_while_off() -> None:
    from firmware_sim.modem import ModemEmulator

    with ModemEmulator("quectel", urcs=False) as emu:
        ch = _at(emu.start_tcp())
        try:
            emu.set_fault("unregistered")
            assert _registration(ch) == "2"  # searching, and staying so
            emu.add_traffic(10, 10)
            assert _registration(ch) == "2"
            ch.command("AT+CFUN=0")
            assert ch.command("AT+CFUN?") == ["+CFUN: 0"]
            assert _registration(ch) == "0"
            before = emu.counters()
            emu.tx_rate = emu.rx_rate = 1e6
            time.sleep(0.05)
            assert emu.counters() == before  # radio off: no traffic
            ch.command("AT+CFUN=1")
            assert _registration(ch) == "1"
            assert emu.state()["faults"] == []
            emu.set_fault("unregistered_until_reset")
            ch.command("AT+CFUN=0")
            ch.command("AT+CFUN=1")
            assert _registration(ch) == "2"  # a radio cycle does not clear this one
        finally:
            ch.close()


@pytest.mark.parametrize("command", ["AT+CFUN=1,1", "AT#REBOOT"])
def test_emulated_reset_drops_the_tcp_port_and_boots_with_echo_on_and_zero_counters(
    command: str,
) -> None:
    from firmware_sim.modem import ModemEmulator
    from gateway.modem.at import PortError

    with ModemEmulator(
        "telit", urcs=False, counter_start=5000, reboot_s=1.0, faults=("unregistered_until_reset",)
    ) as emu:
        url = emu.start_tcp()
        ch = _at(url)
        ch.command("AT+CMEE=2")
        ch.command(command, bare=True)
        with pytest.raises(PortError):
            ch.wait_boot(5)  # the port goes away under the open channel
        state = emu.state()
        ch.close()
        assert state["booting"]
        assert (state["tx_bytes"], state["rx_bytes"], state["reboots"]) == (0, 0, 1)
        host, port = url.removeprefix("socket://").rsplit(":", 1)

        def back() -> socket.socket | None:
            try:
                return socket.create_connection((host, int(port)), timeout=5)
            except OSError:
                return None

        # A plain socket: AtChannel.open flushes what is waiting, as a host does.
        with wait_for(back, 5, "the port to listen again") as raw:  # type: ignore[union-attr]
            seen = b""
            while b"RDY" not in seen:
                chunk = raw.recv(4096)
                assert chunk, f"closed before RDY: {seen!r}"
                seen += chunk
        assert emu.echo
        assert emu.cmee == 0
        ch = _at(url)
        try:
            assert ch.command("AT+CMEE?") == ["+CMEE: 1"]
            assert _registration(ch) == "1"  # the reset cleared the fault
        finally:
            ch.close()


def test_hung_modem_obeys_only_a_reset_and_unresponsive_only_a_power_cycle_from_a_shell(
    tmp_path: Path,
) -> None:
    from firmware_sim.control import ControlServer
    from firmware_sim.modem import ModemEmulator
    from gateway.modem.at import AtTimeout

    link = tmp_path / "ttyModem"
    with ModemEmulator("quectel", urcs=False, link=link, reboot_s=0.2) as emu:
        emu.start_pty()
        server = ControlServer(("127.0.0.1", 0), emu)
        threading.Thread(target=server.serve_forever, args=(0.1,), daemon=True).start()
        control = f"127.0.0.1:{server.server_address[1]}"
        try:
            ch = _at(str(link), timeout=0.3)
            emu.set_fault("hung")
            with pytest.raises(AtTimeout):
                ch.command("AT")  # no answer, no echo
            with pytest.raises(AtTimeout):
                ch.command("AT+CFUN=0")
            assert emu.power.cfun == 1  # nothing but a reset is obeyed
            with contextlib.suppress(Exception):
                ch.command("AT+CFUN=1,1", bare=True)
            ch.close()
            wait_for(lambda: emu.state()["reboots"] == 1 and link.exists(), 5, "the reboot")
            wait_for(lambda: not emu.power.booting, 5, "the boot")
            ch = _at(str(link), timeout=0.3)
            emu.set_fault("unresponsive")
            with contextlib.suppress(Exception):
                ch.command("AT+CFUN=1,1", bare=True)
            ch.close()
            assert emu.state()["reboots"] == 1  # not even a reset is heard
            run = subprocess.run(
                [sys.executable, "-m", "firmware_sim", "modem-control", control, "power_cycle"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert (run.returncode, run.stdout.strip()) == (0, "ok")
            assert emu.state()["power_cycles"] == 1
            wait_for(lambda: not emu.power.booting and link.exists(), 5, "the power cycle")
            ch = _at(str(link), timeout=0.3)
            assert _registration(ch) == "1"
            ch.close()
            bad = subprocess.run(
                [sys.executable, "-m", "firmware_sim", "modem-control", control, "explode"],
                capture_output=True,
                text=True,
                timeout=30,
                check=False,
            )
            assert bad.returncode == 1
            assert bad.stdout.startswith("error: unknown command")
        finally:
            server.shutdown()
            server.server_close()

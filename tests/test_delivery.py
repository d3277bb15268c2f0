"""Webhook delivery end to end: real mosquitto, real gateway, real aiohttp receivers."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import sqlite3
import ssl
import subprocess
import time
from collections import defaultdict
from pathlib import Path

import aiohttp
import psutil
import pytest
import trustme

from gateway import config
from tests.conftest import (
    ROOT,
    Broker,
    db_rows,
    free_port,
    gateway_cmd,
    publish,
    register_session,
    until,
    wait_for,
    wait_port,
    write_config,
)
from tests.receiver import Receiver, Reply

ICCID = "8981100000000000012"
TOPIC = f"devices/{ICCID}/up"


def gw_config(tmp_path: Path, broker: Broker, webhooks: str) -> config.Config:
    """The tests' config. The gateway's session and subscription are made here, so
    that the broker keeps whatever is published from now on, whether or not the
    gateway has subscribed yet."""
    path = write_config(tmp_path / "gw.toml", broker.port, tmp_path / "state", extra=webhooks)
    cfg = config.load(path)
    register_session(broker.port, cfg.mqtt.client_id, cfg.mqtt.topics[0])
    return cfg


def hook(url: str, **fields: str) -> str:
    lines = ["[[webhooks]]", 'name = "cloud"', f'url = "{url}"']
    lines += [f"{k} = {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


async def pub(broker: Broker, messages: list[tuple[str, bytes]]) -> None:
    await asyncio.to_thread(publish, broker.port, messages)


def pending(tmp_path: Path) -> int:
    try:
        return int(db_rows(tmp_path / "state" / "gateway.db", "SELECT COUNT(*) FROM packets")[0][0])  # type: ignore[arg-type]
    except sqlite3.OperationalError:
        return 0  # no file yet, or the file before its schema


async def connected(tmp_path: Path) -> None:
    """The gateway has started (its session exists already: see gw_config)."""
    await asyncio.sleep(0)
    await until(lambda: (tmp_path / "state" / "gateway.db").exists(), what="store created")


async def test_a_window_of_21_packets_is_sent_as_arrays_of_10_10_and_1_with_auth_and_headers(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    cfg = gw_config(
        tmp_path,
        mosquitto,
        hook(
            receiver.url,
            batch="{ window_ms = 1500, max_items = 10 }",
            auth='{ type = "basic", username = "test", password = "123456789" }',
            headers='{ "1_Area" = "Tokyo" }',
        ),
    )
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, f"p{i}".encode()) for i in range(21)])
    await until(lambda: len(receiver.delivered()) == 21, what="21 packets delivered")
    sizes = sorted(len(r.json) for r in receiver.ok())
    assert sizes == [1, 10, 10]
    assert all(isinstance(r.json, list) for r in receiver.ok())  # the lone one too
    r0 = receiver.ok()[0]
    assert r0.headers["authorization"] == "Basic " + base64.b64encode(b"test:123456789").decode()
    assert r0.headers["1_area"] == "Tokyo"
    assert r0.headers["content-type"] == "application/json; charset=utf-8"
    rec = receiver.delivered()[0]
    assert rec["ICCID"] == int(ICCID)
    assert rec["Timestamp"].endswith("Z")
    assert len(rec["Timestamp"]) == 24
    assert sorted(x["Payload"] for x in receiver.delivered()) == sorted(f"p{i}" for i in range(21))
    assert len({r.webhook_id for r in receiver.ok()}) == 3
    await until(lambda: pending(tmp_path) == 0, what="delivered packets removed from the store")


async def test_a_busy_windows_full_batches_go_before_it_closes_and_the_rest_after(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    """A full batch of max_items goes as soon as delivery sees it, and delivery looks again
    within an open window (a tenth of the way in, and then when, at the rate seen, a
    batch has filled), not only when it closes: at thousands of packets a second,
    waiting would add the whole window to each. That holds for the first window of a
    run too, with no window before it to tell the rate."""
    window_s = 4.0
    cfg = gw_config(
        tmp_path, mosquitto, hook(receiver.url, batch="{ window_ms = 4000, max_items = 10 }")
    )
    await run_gateway(cfg)
    await connected(tmp_path)
    published = time.monotonic()
    # One packet opens the window; the burst comes once it is stored (so, nearly always,
    # after delivery's first look).
    await pub(mosquitto, [(TOPIC, b"a0")])
    await until(lambda: pending(tmp_path) == 1, what="the first packet stored")
    await pub(mosquitto, [(TOPIC, f"a{i}".encode()) for i in range(1, 42)])
    await until(lambda: len(receiver.delivered()) == 42, what="the first window", timeout=20)
    # Its batches of 10 went at delivery's look a tenth of the way in, or later if it
    # had not seen them all then; the other 2 at the close.
    first = receiver.ok()
    assert sorted(len(r.json) for r in first) == [2, 10, 10, 10, 10]
    full = [r.at - published for r in first if len(r.json) == 10]
    rest = next(r.at - published for r in first if len(r.json) == 2)
    assert max(full) < window_s / 2, f"first window: full batches {full} s after publishing"
    assert rest >= window_s - 0.5, f"first window: the rest {rest} s after publishing"

    published = time.monotonic()
    await pub(mosquitto, [(TOPIC, f"b{i}".encode()) for i in range(23)])
    await until(lambda: len(receiver.delivered()) == 65, what="the second window", timeout=20)
    second = receiver.ok()[len(first) :]
    assert sorted(len(r.json) for r in second) == [3, 10, 10]
    full = [r.at - published for r in second if len(r.json) == 10]
    rest = next(r.at - published for r in second if len(r.json) == 3)
    assert max(full) < window_s / 2, f"full batches {full} s after publishing"
    assert rest >= window_s - 0.5, f"the rest {rest} s after publishing"
    assert all(isinstance(r.json, list) for r in second)
    assert sorted(x["Payload"] for x in receiver.delivered()) == sorted(
        [f"a{i}" for i in range(42)] + [f"b{i}" for i in range(23)]
    )


async def test_at_a_steady_rate_full_batches_go_a_fifth_of_a_window_apart(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    """Full batches of an open window go together at most every fifth of the window, not
    each as soon as it fills: each take is a commit (its webhook-ids are on disk before
    anything is sent) that ends the writer's commit delay, and taking them at once made
    takes and commits chase each other. gateway_store_commits counts them."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    path = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        extra=hook(receiver.url, batch="{ window_ms = 2000, max_items = 10 }"),
        web=f'listen = "{listen}"',
    )
    cfg = config.load(path)
    register_session(mosquitto.port, cfg.mqtt.client_id, cfg.mqtt.topics[0])
    await run_gateway(cfg)
    await connected(tmp_path)
    await asyncio.to_thread(wait_port, port)

    async def commits() -> int:
        async with aiohttp.ClientSession() as http, http.get(f"http://{listen}/api/status") as r:
            return int((await r.json())["gateway"]["store"]["commits"])

    before = await commits()
    messages = [(TOPIC, f"s{i}".encode()) for i in range(1500)]
    await asyncio.to_thread(publish, mosquitto.port, messages, rate=1000.0)
    await until(lambda: len(receiver.delivered()) == 1500, what="1500 records", timeout=30)
    n = await commits() - before
    # A packet commit per commit delay (200 ms here) at most, a take every 0.4 s, and
    # the batches' completions joining the packet commits: 11 to 15 commits on a
    # 2-core machine; taking each full batch at once would make 64 to 70.
    assert n <= 20, f"{n} commits for 1500 packets in 150 batches"
    assert all(isinstance(r.json, list) and len(r.json) == 10 for r in receiver.ok())


async def test_one_packet_alone_in_its_window_is_one_object(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    cfg = gw_config(tmp_path, mosquitto, hook(receiver.url, batch="{ window_ms = 200 }"))
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"\x00\x01binary")])
    await until(lambda: receiver.ok(), what="one request")
    body = receiver.ok()[0].json
    assert isinstance(body, dict)
    assert body["Payload"] == base64.b64encode(b"\x00\x01binary").decode()


async def test_signatures_verify_with_an_independent_implementation(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    other = Receiver().start()
    try:
        key = b"k" * 32
        whsec = "whsec_" + base64.b64encode(key).decode()
        cfg = gw_config(
            tmp_path,
            mosquitto,
            hook(
                receiver.url,
                batch="{ window_ms = 100 }",
                signing='{ scheme = "cdr-manager", secret = "s3cret" }',
            )
            + hook(
                other.url,
                batch="{ window_ms = 100 }",
                signing=f'{{ scheme = "standard-webhooks", secret = "{whsec}" }}',
            ).replace('name = "cloud"', 'name = "std"'),
        )
        await run_gateway(cfg)
        await connected(tmp_path)
        await pub(mosquitto, [(TOPIC, b"hello")])
        await until(lambda: receiver.ok() and other.ok(), what="both webhooks")
        r = receiver.ok()[0]
        want = base64.b64encode(hmac.new(b"s3cret", r.raw, hashlib.sha512).digest()).decode()
        assert r.headers["x-cdr-signature"] == want
        s = other.ok()[0]
        signed = f"{s.headers['webhook-id']}.{s.headers['webhook-timestamp']}.".encode() + s.raw
        mac = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
        assert s.headers["webhook-signature"] == f"v1,{mac}"
        assert abs(int(s.headers["webhook-timestamp"]) - time.time()) < 60
    finally:
        other.stop()


async def test_durable_retries_500_and_429_with_the_same_webhook_id_honouring_retry_after(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    def behaviour(n: int, _r: object) -> Reply:
        if n == 0:
            return Reply(500, text="boom")
        if n == 1:
            return Reply(429, headers={"Retry-After": "1"})
        return Reply(200)

    receiver.behaviour = behaviour
    cfg = gw_config(
        tmp_path,
        mosquitto,
        hook(
            receiver.url,
            batch="{ window_ms = 50 }",
            retry='{ preset = "durable", backoff_min_s = 0.05, backoff_max_s = 0.2 }',
        ),
    )
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"x")])
    await until(lambda: receiver.ok(), timeout=15, what="delivery after retries")
    reqs = receiver.requests
    assert [r.status for r in reqs] == [500, 429, 200]
    assert len({r.webhook_id for r in reqs}) == 1
    assert reqs[2].at - reqs[1].at >= 0.95  # Retry-After: 1 honoured
    snap = json.loads(
        subprocess.run(
            gateway_cmd("status", "--json", "-c", str(cfg.path)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    w = snap["webhooks"][0]
    assert (w["requests_ok"], w["requests_failed"], w["delivered"], w["hits"]) == (1, 2, 1, 1)
    assert w["last_error_status"] == 429


async def test_a_400_is_dead_lettered_at_once_and_replay_delivers_it_with_the_same_id(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    receiver.behaviour = lambda n, r: Reply(400, text="bad request: field X")
    cfg = gw_config(tmp_path, mosquitto, hook(receiver.url, batch="{ window_ms = 50 }"))
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"x")])
    db = tmp_path / "state" / "gateway.db"
    await until(
        lambda: db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 1, what="dead letter"
    )
    assert len(receiver.requests) == 1
    reason, status, excerpt = db_rows(db, "SELECT reason, status, excerpt FROM dead_letters")[0]
    assert (reason, status) == ("http_400", 400)
    assert "bad request: field X" in str(excerpt)
    listed = json.loads(
        subprocess.run(
            gateway_cmd("dlq", "list", "--json", "-c", str(cfg.path)),
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert listed[0]["webhook"] == "cloud"
    assert listed[0]["records"] == 1
    receiver.behaviour = lambda n, r: Reply(200)
    out = subprocess.run(
        gateway_cmd("dlq", "replay", "--webhook", "cloud", "-c", str(cfg.path)),
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert "re-queued 1" in out
    await until(lambda: receiver.ok(), timeout=10, what="replayed dead letter delivered")
    assert receiver.ok()[0].webhook_id == receiver.requests[0].webhook_id
    assert receiver.ok()[0].body == receiver.requests[0].body


async def test_a_clean_stop_just_after_a_delivery_records_it_and_sends_it_once(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    """A delivered batch's completion waits for the commit delay (to share the packets'
    commit); a stop meanwhile still records it, so the batch does not go again after
    the restart."""
    path = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        extra=hook(receiver.url, batch="{ window_ms = 50 }"),
        gateway_extra="commit_delay_ms = 1000",
    )
    cfg = config.load(path)
    register_session(mosquitto.port, cfg.mqtt.client_id, cfg.mqtt.topics[0])
    task = await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"first")])
    await until(lambda: receiver.ok(), timeout=15, what="the first packet delivered")
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    db = tmp_path / "state" / "gateway.db"
    assert db_rows(db, "SELECT COUNT(*) FROM batches") == [(0,)]
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"second")])
    await until(lambda: len(receiver.ok()) >= 2, timeout=15, what="the second packet delivered")
    assert sorted(r.body for r in receiver.ok()) == sorted({r.body for r in receiver.ok()})
    assert len(receiver.ok()) == 2


async def test_410_disables_the_webhook_and_status_says_so(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    receiver.behaviour = lambda n, r: Reply(410, text="gone")
    cfg = gw_config(tmp_path, mosquitto, hook(receiver.url, batch="{ window_ms = 50 }"))
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"x")])

    def disabled() -> bool:
        snap = json.loads(
            subprocess.run(
                gateway_cmd("status", "--json", "-c", str(cfg.path)),
                capture_output=True,
                text=True,
                check=True,
            ).stdout
        )
        return bool(snap["webhooks"][0]["disabled"])

    await until(disabled, what="webhook disabled")
    await pub(mosquitto, [(TOPIC, b"y")])
    await asyncio.sleep(0.5)
    assert len(receiver.requests) == 1  # nothing more sent to a gone receiver


@pytest.mark.parametrize("failure", ["timeout", "refused", "500"])
async def test_monoz_preset_retries_twice_on_no_response_and_never_on_an_error_response(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway, failure: str
) -> None:
    url = receiver.url
    if failure == "timeout":
        receiver.behaviour = lambda n, r: Reply(200, delay_s=2.0)
    elif failure == "500":
        receiver.behaviour = lambda n, r: Reply(500)
    else:
        from tests.conftest import free_port

        url = f"http://127.0.0.1:{free_port()}/hook"
    cfg = gw_config(
        tmp_path,
        mosquitto,
        hook(
            url,
            batch="{ window_ms = 50 }",
            retry='{ preset = "monoz", timeout_s = 0.3, backoff_min_s = 0.05, backoff_max_s = 0.1 }',
        ),
    )
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"x")])
    db = tmp_path / "state" / "gateway.db"
    await until(
        lambda: db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 1,
        timeout=15,
        what="dead letter",
    )
    reason, attempts = db_rows(db, "SELECT reason, attempts FROM dead_letters")[0]
    if failure == "500":
        assert (reason, attempts, len(receiver.requests)) == ("http_500", 1, 1)
    else:
        assert (reason, attempts) == ("no_response", 3)
        if failure == "timeout":
            assert len(receiver.requests) == 3


async def test_https_verifies_certificates_and_accepts_a_private_ca_file(
    mosquitto: Broker, tmp_path: Path, run_gateway
) -> None:
    ca = trustme.CA()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(server_ctx)
    ca_file = tmp_path / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    trusted, untrusted = Receiver(server_ctx).start(), Receiver(server_ctx).start()
    try:
        cfg = gw_config(
            tmp_path,
            mosquitto,
            hook(trusted.url, batch="{ window_ms = 50 }", ca_file=f'"{ca_file}"')
            + hook(
                untrusted.url,
                batch="{ window_ms = 50 }",
                retry='{ preset = "durable", backoff_min_s = 0.05, backoff_max_s = 0.1 }',
            ).replace('name = "cloud"', 'name = "no-ca"'),
        )
        await run_gateway(cfg)
        await connected(tmp_path)
        await pub(mosquitto, [(TOPIC, b"tls")])
        await until(lambda: trusted.ok(), what="delivery over verified TLS")
        db = tmp_path / "state" / "gateway.db"
        await until(
            lambda: db_rows(db, "SELECT last_error FROM webhook_stats WHERE name='no-ca'")[0][0],
            what="certificate error recorded",
        )
        err = db_rows(db, "SELECT last_error FROM webhook_stats WHERE name='no-ca'")[0][0]
        assert "certificate" in str(err).lower()
        assert not untrusted.requests  # the handshake failed; nothing was sent in clear
    finally:
        trusted.stop()
        untrusted.stop()


async def test_when_conditions_select_packets_by_decoded_payload_and_topic(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    cfg = gw_config(
        tmp_path,
        mosquitto,
        hook(
            receiver.url,
            batch="{ window_ms = 300, max_items = 10 }",
            when='[{ field = "payload.temp", op = ">", value = 30 }, { field = "topic", op = "startswith", value = "devices/" }]',
        ),
    )
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(
        mosquitto,
        [
            (TOPIC, b'{"temp": 31}'),
            (TOPIC, b'{"temp": 20}'),
            ("other/x", b'{"temp": 40}'),
            (TOPIC, b"not json"),
            (TOPIC, b'{"temp": 45.5}'),
        ],
    )
    await until(lambda: len(receiver.delivered()) == 2, what="2 matching packets")
    await asyncio.sleep(0.6)
    assert sorted(json.loads(r["Payload"])["temp"] for r in receiver.delivered()) == [31, 45.5]
    await until(lambda: pending(tmp_path) == 0, what="unmatched packets released too")


async def test_gzip_body_decompresses_to_the_signed_json(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    cfg = gw_config(
        tmp_path,
        mosquitto,
        hook(
            receiver.url,
            batch="{ window_ms = 50 }",
            gzip="true",
            signing='{ scheme = "cdr-manager", secret = "s" }',
        ),
    )
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"zip me " * 200)])
    await until(lambda: receiver.ok(), what="gzip request")
    r = receiver.ok()[0]
    assert r.headers["content-encoding"] == "gzip"
    assert r.json["Payload"] == "zip me " * 200
    assert int(r.headers["content-length"]) < len(r.body) / 5  # compressed on the wire
    assert (
        r.headers["x-cdr-signature"]
        == base64.b64encode(hmac.new(b"s", r.body, hashlib.sha512).digest()).decode()
    )


def test_kill9_in_the_middle_of_a_20000_packet_backlog_delivers_everything_duplicates_keep_their_id(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, gateway_proc
) -> None:
    total = 20_000
    receiver.behaviour = lambda n, r: Reply(200, delay_s=0.01)
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        extra=hook(receiver.url, batch="{ window_ms = 50, max_items = 100 }", concurrency="2"),
    )
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway subscribed")
    publish(mosquitto.port, [(TOPIC, f"{i}".encode()) for i in range(total)])
    wait_for(
        lambda: len(receiver.delivered()) >= total // 4, timeout=60, what="a quarter delivered"
    )
    gw.kill9()
    gw.start()
    wait_for(
        lambda: len({r["Payload"] for r in receiver.delivered()}) >= total,
        timeout=120,
        what="every packet delivered after the restart",
    )
    ids: dict[str, set[str]] = defaultdict(set)
    for req in receiver.ok():
        for rec in req.records:
            ids[rec["Payload"]].add(req.webhook_id)
    assert set(ids) == {str(i) for i in range(total)}
    assert all(len(v) == 1 for v in ids.values()), "a re-sent packet came with a new webhook-id"
    dups = len(receiver.delivered()) - total
    assert dups <= 2 * 4 * 100  # at most the batches that were open at the kill
    gw.terminate()


def test_receiver_outage_backlog_stays_on_disk_memory_flat_then_everything_arrives(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    receiver = Receiver().start()
    port = receiver.port
    receiver.stop()  # down from the start
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        extra=hook(
            f"http://127.0.0.1:{port}/hook",
            batch="{ window_ms = 50, max_items = 500 }",
            retry='{ preset = "durable", backoff_min_s = 0.1, backoff_max_s = 0.5 }',
        ),
    )
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway subscribed")
    assert gw.proc is not None
    proc = psutil.Process(gw.proc.pid)
    payload = b"x" * 200
    publish(mosquitto.port, [(TOPIC, payload)] * 5_000)
    wait_for(lambda: pending(tmp_path) >= 5_000, what="first backlog stored")
    rss_small = proc.memory_info().rss
    for _ in range(5):
        publish(mosquitto.port, [(TOPIC, payload)] * 10_000)
    wait_for(lambda: pending(tmp_path) >= 55_000, timeout=60, what="large backlog stored")
    rss_large = proc.memory_info().rss
    # 50,000 more packets (10 MB of payload) must not live in memory.
    assert rss_large - rss_small < 8 * 1024 * 1024, (rss_small, rss_large)
    back = Receiver()
    back.port = port
    back.start()
    try:
        wait_for(lambda: len(back.delivered()) >= 55_000, timeout=120, what="backlog delivered")
        wait_for(lambda: pending(tmp_path) == 0, what="store emptied")
    finally:
        gw.terminate()
        back.stop()


def test_dlq_replay_works_while_the_gateway_is_stopped(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, gateway_proc
) -> None:
    receiver.behaviour = lambda n, r: Reply(422, text="nope")
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        extra=hook(receiver.url, batch="{ window_ms = 50 }"),
    )
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway subscribed")
    publish(mosquitto.port, [(TOPIC, b"a"), (TOPIC, b"b")])
    db = tmp_path / "state" / "gateway.db"
    wait_for(
        lambda: db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] >= 1, what="dead letters"
    )
    gw.terminate()
    receiver.behaviour = lambda n, r: Reply(200)
    r = subprocess.run(
        gateway_cmd("dlq", "replay", "-c", str(cfg)), capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 0
    assert "re-queued" in r.stdout
    gw.start()
    wait_for(
        lambda: sorted(x["Payload"] for x in receiver.delivered()) == ["a", "b"],
        what="replayed packets delivered after start",
    )
    gw.terminate()


async def test_a_webhook_removed_from_the_config_does_not_pin_packets_on_disk(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway, caplog
) -> None:
    failing = Receiver().start()
    failing.behaviour = lambda n, r: Reply(503)
    try:
        both = hook(receiver.url, batch="{ window_ms = 100 }") + hook(
            failing.url, batch="{ window_ms = 100 }"
        ).replace('name = "cloud"', 'name = "gone"')
        task = await run_gateway(gw_config(tmp_path, mosquitto, both))
        await connected(tmp_path)
        await pub(mosquitto, [(TOPIC, f"a{i}".encode()) for i in range(20)])
        await until(lambda: len(receiver.delivered()) == 20, what="20 delivered to cloud")
        await until(lambda: failing.requests, what="the failing webhook tried")
        assert pending(tmp_path) == 20  # held for "gone"
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    finally:
        failing.stop()
    # "gone" is removed from the config: its open batches must not hold packets back.
    await run_gateway(
        gw_config(tmp_path, mosquitto, hook(receiver.url, batch="{ window_ms = 100 }"))
    )
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, f"b{i}".encode()) for i in range(20)])
    await until(lambda: len(receiver.delivered()) == 40, what="40 delivered to cloud")
    await until(lambda: pending(tmp_path) == 0, what="every packet released")
    assert "webhook gone is no longer configured" in caplog.text

"""Hostile records end to end: real mosquitto, real gateway, real aiohttp receivers.

A record that cannot be filtered, decoded or encoded is dead-lettered on its own or
delivered in a safe form; it never stops its batch-mates, its webhook or the gateway.
"""

from __future__ import annotations

import asyncio
import base64
import json
import sqlite3
import time
from pathlib import Path

import cbor2
import pytest

from gateway import config
from gateway.web import status
from tests.conftest import (
    Broker,
    db_rows,
    publish,
    register_session,
    until,
    wait_for,
    write_config,
)
from tests.receiver import Receiver

ICCID = "8981100000000000012"
TOPIC = f"devices/{ICCID}/up"
BIGNUM = cbor2.dumps({"n": 10**5000})  # about 2,100 bytes: a CBOR positive bignum


def hook(name: str, url: str, **fields: str) -> str:
    lines = ["[[webhooks]]", f'name = "{name}"', f'url = "{url}/{name}"']
    lines += [f"{k} = {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def bodies(receiver: Receiver, name: str) -> list[bytes]:
    return [r.body for r in receiver.ok() if r.path.endswith(f"/{name}")]


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def strict_json(body: bytes) -> object:
    """Parse strict JSON (no NaN or Infinity), keeping big integers exact."""
    return json.loads(body, parse_constant=_no_constant)


def records(receiver: Receiver, name: str) -> list[dict[str, object]]:
    out = []
    for body in bodies(receiver, name):
        value = strict_json(body)  # every body is valid JSON, or this raises
        out += value if isinstance(value, list) else [value]
    return out


def test_a_cbor_bignum_under_a_payload_condition_stops_neither_the_gateway_nor_its_batch(
    mosquitto: Broker, tmp_path: Path, gateway_proc, receiver: Receiver
) -> None:
    window = "{ window_ms = 300, max_items = 10 }"
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        mqtt_extra='payload_encoding = "cbor-json"',
        extra=hook(
            "when",
            receiver.url,
            batch=window,
            when='[{ field = "payload.n", op = ">=", value = 0 }]',
        )
        + hook("all", receiver.url, batch=window),
    )
    register_session(mosquitto.port, "gw-test", "devices/+/up")
    good = [cbor2.dumps({"n": i}) for i in range(3)]
    # The bad packet in the middle of one window: its batch-mates go in the same array.
    publish(mosquitto.port, [(TOPIC, good[0]), (TOPIC, BIGNUM), (TOPIC, good[1]), (TOPIC, good[2])])
    gw = gateway_proc(cfg)
    gw.start()
    assert gw.proc is not None
    pid = gw.proc.pid
    wait_for(lambda: len(records(receiver, "all")) == 4, 30, "all four packets at 'all'")
    wait_for(lambda: len(records(receiver, "when")) == 3, 30, "the three good ones at 'when'")
    assert [r["Payload"] for r in records(receiver, "when")] == [{"n": 0}, {"n": 1}, {"n": 2}]
    # Without a condition the bignum goes too, as base64 of its bytes (a decode failure).
    everything = [r["Payload"] for r in records(receiver, "all")]
    assert everything == [{"n": 0}, base64.b64encode(BIGNUM).decode(), {"n": 1}, {"n": 2}]
    # Good packets after the bad one still flow, through the same process.
    publish(mosquitto.port, [(TOPIC, cbor2.dumps({"n": 7}))])
    wait_for(lambda: {"n": 7} in [r["Payload"] for r in records(receiver, "when")], 30, "n=7")
    assert gw.proc.poll() is None  # the process started above, never restarted
    assert gw.proc.pid == pid
    db = tmp_path / "state" / "gateway.db"
    wait_for(lambda: db_rows(db, "SELECT COUNT(*) FROM packets")[0][0] == 0, 30, "all released")
    assert db_rows(db, "SELECT value FROM counters WHERE name = 'decode_failed'") == [(1,)]
    assert "Traceback" not in gw.log()


async def test_iccid_levels_that_are_no_json_number_go_out_as_text_in_valid_json(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    hooks = (
        hook("monoz", receiver.url, batch="{ window_ms = 300, max_items = 10 }")
        + hook("envelope", receiver.url, format='"envelope"')
        + hook("flat", receiver.url, format='"flat"')
    )
    path = write_config(tmp_path / "gw.toml", mosquitto.port, tmp_path / "state", extra=hooks)
    cfg = config.load(path)
    register_session(mosquitto.port, cfg.mqtt.client_id, cfg.mqtt.topics[0])
    levels = [
        "٣٣٣٣",  # Arabic-Indic digits: str.isdigit() says yes, JSON says no
        "1" * 23,  # one digit more than any ICCID
        "9" * 5000,  # thousands of digits: int() of it would refuse
        "0898110000000000001",  # a leading zero is kept as text
        "89811000000000000123",  # 20 digits: a number (monoZ:Link sends them so)
    ]
    await run_gateway(cfg)
    await asyncio.to_thread(publish, mosquitto.port, [(f"devices/{lv}/up", b"x") for lv in levels])
    for name in ("monoz", "envelope", "flat"):
        await until(lambda n=name: len(records(receiver, n)) == len(levels), what=f"{name} bodies")
    monoz = records(receiver, "monoz")
    assert [r["ICCID"] for r in monoz] == [*levels[:4], int(levels[4])]
    # envelope and flat carry a number only within 64 bits (what orjson and most
    # receivers read); a 20-digit ICCID beyond that stays text there.
    for name in ("envelope", "flat"):
        got = [
            r["packet"]["ICCID"] if name == "envelope" else r["ICCID"]
            for r in records(receiver, name)
        ]
        assert got == levels


def _corrupt_cdrs(db: Path, rows: list[str]) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        with conn:
            for i, data in enumerate(rows):
                conn.execute(
                    "INSERT INTO cdrs(unique_id, ts_ms, iccid, usage, data, period_start_ns,"
                    " period_end_ns) VALUES (?,?,?,?,?,?,?)",
                    (f"u{i}", 1, ICCID, 10, data, time.time_ns(), time.time_ns()),
                )
    finally:
        conn.close()


async def test_damaged_cdr_rows_are_dead_lettered_on_their_own_and_the_rest_delivered(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    hooks = hook(
        "cdrs", receiver.url, source='"cdrs"', format='"monogoto"', batch="{ window_ms = 200 }"
    )
    path = write_config(tmp_path / "gw.toml", mosquitto.port, tmp_path / "state", extra=hooks)
    cfg = config.load(path)
    db = tmp_path / "state" / "gateway.db"
    await run_gateway(cfg)
    await until(
        lambda: (
            db.exists()
            and db_rows(db, "SELECT COUNT(*) FROM sqlite_master WHERE name = 'cdrs'")[0][0]
        ),
        what="store",
    )
    deep = '{"a":' * 300 + "1" + "}" * 300  # valid JSON nested deeper than the encoder goes
    _corrupt_cdrs(db, ['{"Usage": 1}', "{not json", deep, "[1, 2]", '{"Usage": 2}'])
    await until(lambda: len(records(receiver, "cdrs")) == 2, what="the two sound CDRs")
    await asyncio.sleep(0.5)  # a window more: nothing else comes
    assert records(receiver, "cdrs") == [{"Usage": 1}, {"Usage": 2}]
    letters = db_rows(
        db, "SELECT webhook, reason, count, excerpt, body FROM dead_letters ORDER BY id"
    )
    assert [(w, r, c) for w, r, c, _e, _b in letters] == [
        ("cdrs", "undecodable", 1),
        ("cdrs", "unencodable", 1),
        ("cdrs", "undecodable", 1),
    ]
    assert "Recursion limit" in str(letters[1][3])
    for *_rest, body in letters:
        strict_json(body)  # a replay would send valid JSON
    snap = status.read(db)
    assert snap["rejected"] == {
        "too_large": 0,
        "unfilterable": 0,
        "unencodable": 1,
        "undecodable": 2,
    }
    assert snap["webhooks"][0]["dead_lettered"] == 3


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (BIGNUM, base64.b64encode(BIGNUM).decode()),
        (cbor2.dumps(-(10**5000)), base64.b64encode(cbor2.dumps(-(10**5000))).decode()),
        # arrays nested 400 deep: more than a JSON body can nest
        (b"\x81" * 400 + b"\x01", base64.b64encode(b"\x81" * 400 + b"\x01").decode()),
        (
            cbor2.dumps({"b": b"\x00\xff", 1: "int key", (1, 2): "array key", None: "null key"}),
            {"b": "AP8=", "1": "int key", "[1,2]": "array key", "null": "null key"},
        ),
        (
            cbor2.dumps(cbor2.CBORTag(99999, [1, {"x": float("nan")}])),
            {"tag": 99999, "value": [1, {"x": None}]},
        ),
        (
            cbor2.dumps([cbor2.undefined, float("inf"), float("-inf"), cbor2.CBORSimpleValue(99)]),
            [None, None, None, 99],
        ),
        (b"", ""),
        (b"\xff\xfe", "//4="),
    ],
    ids=[
        "bignum",
        "negative-bignum",
        "deep",
        "bytes-keys",
        "tag-nan",
        "undefined",
        "empty",
        "junk",
    ],
)
async def test_any_cbor_payload_makes_a_valid_monoz_body_and_the_route_goes_on(
    mosquitto: Broker,
    tmp_path: Path,
    receiver: Receiver,
    run_gateway,
    payload: bytes,
    expected: object,
) -> None:
    hooks = hook("monoz", receiver.url, batch="{ window_ms = 100, max_items = 10 }")
    path = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        extra=hooks,
        mqtt_extra='payload_encoding = "cbor-json"',
    )
    cfg = config.load(path)
    register_session(mosquitto.port, cfg.mqtt.client_id, cfg.mqtt.topics[0])
    await run_gateway(cfg)
    after = cbor2.dumps({"n": "after"})
    await asyncio.to_thread(publish, mosquitto.port, [(TOPIC, payload), (TOPIC, after)])
    await until(lambda: len(records(receiver, "monoz")) == 2, what="both packets")
    first, second = records(receiver, "monoz")  # parsed: every body is valid JSON
    assert (first["Payload"], second["Payload"]) == (expected, {"n": "after"})

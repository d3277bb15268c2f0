"""Property test end to end: hostile topics and payloads through a real mosquitto to one
running gateway process with several routes, every body checked at real receivers.

Each example publishes a few generated packets and then a good one (the sentinel); once
the sentinel has reached every route, the whole run so far must add up: every packet
delivered or dead-lettered exactly once, every body valid JSON, the same process alive.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import cbor2
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from tests.conftest import (
    Broker,
    GatewayProc,
    db_rows,
    publish,
    register_session,
    wait_for,
    write_config,
)
from tests.receiver import Receiver
from tests.test_formats import _cbor_bytes, _cbor_values

MAX_PAYLOAD = 4096
ROUTES = ("all", "envelope", "flat", "when")

# A topic level mosquitto passes on: no separators or wildcards, no NUL, no control or
# non-characters (mosquitto refuses those in a topic), no lone surrogates.
_level_chars = hs.characters(
    blacklist_categories=("Cs", "Cc", "Cn", "Co"), blacklist_characters="/+#"
)
levels = (
    hs.text(_level_chars, min_size=1, max_size=30)
    | hs.text("0123456789", min_size=1, max_size=40)  # ICCIDs, too long ones, leading zeros
    | hs.text("٠١٢٣٤٥٦٧٨٩۰۱۲३", min_size=1, max_size=22)  # digits of other scripts
)


def _deep_json(depth: int) -> bytes:
    return b'{"n":' * depth + b"1" + b"}" * depth


payloads = (
    hs.binary(max_size=64)
    | _cbor_values.map(_cbor_bytes)
    | hs.builds(lambda v: cbor2.dumps({"n": v}), hs.integers() | hs.floats() | hs.text(max_size=5))
    | hs.integers(200, 2000).map(_deep_json)
    | hs.integers(4300, 6000).map(lambda d: cbor2.dumps(10**d))  # huge numbers
    | hs.just(b"")
    | hs.integers(MAX_PAYLOAD + 1, MAX_PAYLOAD + 2000).map(lambda n: b"x" * n)  # too large
)


@dataclass
class Run:
    broker: Broker
    receiver: Receiver
    gateway: GatewayProc
    db: Path
    pid: int
    sent: Counter[str] = field(default_factory=Counter)  # topics that must arrive
    too_large: int = 0
    sentinels: int = 0


@pytest.fixture
def run(mosquitto: Broker, tmp_path: Path, receiver: Receiver, gateway_proc) -> Run:
    window = "{ window_ms = 100, max_items = 10 }"

    def hook(name: str, extra: str) -> str:
        return f'[[webhooks]]\nname = "{name}"\nurl = "{receiver.url}/{name}"\n{extra}\n'

    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        mqtt_extra=f'payload_encoding = "cbor-json"\nmax_payload_bytes = {MAX_PAYLOAD}',
        extra=hook("all", f"batch = {window}")
        + hook("envelope", 'format = "envelope"')
        + hook("flat", 'format = "flat"')
        + hook(
            "when",
            f'batch = {window}\nwhen = [{{ field = "payload.n", op = ">=", value = 0 }}]',
        ),
    )
    register_session(mosquitto.port, "gw-test", "devices/+/up")
    gw = gateway_proc(cfg)
    gw.start()
    assert gw.proc is not None
    return Run(mosquitto, receiver, gw, tmp_path / "state" / "gateway.db", gw.proc.pid)


def _no_constant(name: str) -> object:
    raise ValueError(f"{name} is not JSON")


def delivered(receiver: Receiver, route: str) -> list[dict[str, object]]:
    out = []
    for r in receiver.ok():
        if r.path.endswith(f"/{route}"):
            value = json.loads(r.body, parse_constant=_no_constant)  # strict JSON, or raises
            out += value if isinstance(value, list) else [value]
    return out


def _at_least_zero(n: int | float | str) -> bool:
    try:
        return float(n) >= 0
    except (ValueError, OverflowError):
        return str(n) >= "0"


def topic_of(route: str, rec: dict[str, object]) -> str:
    inner = rec["packet"] if route == "envelope" else rec
    return str(inner["Topic"])  # type: ignore[index]


@settings(
    max_examples=int(os.environ.get("HOSTILE_EXAMPLES", "25")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(packets=hs.lists(hs.tuples(levels, payloads), min_size=1, max_size=6))
def test_hostile_packets_are_each_delivered_or_dead_lettered_once_and_good_ones_flow_on(
    run: Run, packets: list[tuple[str, bytes]]
) -> None:
    run.sentinels += 1
    sentinel = f"devices/sentinel-{run.sentinels}/up"
    messages = [(f"devices/{level}/up", payload) for level, payload in packets]
    messages.append((sentinel, cbor2.dumps({"n": 0})))
    publish(run.broker.port, messages)
    for topic, payload in messages:
        if len(payload) > MAX_PAYLOAD:
            run.too_large += 1
        else:
            run.sent[topic] += 1

    def sentinel_everywhere() -> bool:
        got = {route: delivered(run.receiver, route) for route in ROUTES}
        return (
            all(
                any(r.get("Topic", "") == sentinel for r in got["flat"]) and len(got[route]) > 0
                for route in ROUTES
            )
            and sum(1 for r in got["when"] if r.get("Payload") == {"n": 0}) >= run.sentinels
        )

    wait_for(sentinel_everywhere, 30, f"the good packet after the hostile ones ({sentinel})")
    assert run.gateway.proc is not None
    assert run.gateway.proc.poll() is None, run.gateway.log()[-3000:]
    assert run.gateway.proc.pid == run.pid
    assert "Traceback" not in run.gateway.log()

    # Per-record routes name each packet's topic: exactly the packets sent, once each.
    for route in ("envelope", "flat"):
        wait_for(
            lambda r=route: Counter(topic_of(r, x) for x in delivered(run.receiver, r)) == run.sent,
            30,
            f"every packet once at {route}",
        )
    # monoZ arrays: one record for each packet, whatever its payload.
    wait_for(
        lambda: len(delivered(run.receiver, "all")) == sum(run.sent.values()), 30, "monoz count"
    )
    # The condition route holds only packets whose decoded payload has n >= 0: as numbers
    # when n is one (or numeric text), else as text (see docs/hostile-input.md).
    for rec in delivered(run.receiver, "when"):
        payload = rec["Payload"]
        assert isinstance(payload, dict), rec
        n = payload["n"]
        assert isinstance(n, int | float | str), rec
        assert _at_least_zero(n), rec
    # Too large: dead-lettered once each, on no webhook, never sent.
    letters = db_rows(run.db, "SELECT COUNT(*) FROM dead_letters WHERE reason = 'too_large'")
    assert letters[0][0] == run.too_large
    for rec in delivered(run.receiver, "all"):
        payload = rec["Payload"]
        # base64 (a payload that did not decode) is the longest form a payload takes
        if isinstance(payload, str) and len(payload) > (MAX_PAYLOAD + 2) // 3 * 4:
            pytest.fail(f"a payload over max_payload_bytes was delivered: {payload[:40]}")

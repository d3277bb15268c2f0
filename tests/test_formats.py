"""Golden bodies for the wire formats and signatures checked by independent code."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import json
import math

import cbor2
import orjson
from hypothesis import given, settings
from hypothesis import strategies as hs

from gateway.config import RETRY_PRESETS
from gateway.delivery import formats, signing
from gateway.delivery.formats import PayloadOptions
from gateway.delivery.sender import Outcome, classify, next_delay, parse_retry_after
from gateway.store import PacketRow

# 2023-10-16T09:17:32.123Z, the design's example time.
T = int(dt.datetime(2023, 10, 16, 9, 17, 32, tzinfo=dt.UTC).timestamp()) * 10**9 + 123_456_789


def row(
    payload: bytes, iccid: str = "897612653856781234", topic: str = "devices/x/up", i: int = 1
) -> PacketRow:
    return PacketRow(i, T, topic, iccid, payload)


def test_one_packet_in_the_window_is_one_object_exactly_as_the_design_shows() -> None:
    body, failed = formats.monoz([row(b"ABC")], PayloadOptions(), single=True)
    assert (
        body
        == b'{"ICCID":897612653856781234,"Timestamp":"2023-10-16T09:17:32.123Z","Payload":"ABC"}'
    )
    assert failed == 0


def test_several_packets_make_an_array_and_a_lone_leftover_is_still_an_array() -> None:
    body, _ = formats.monoz([row(b"A"), row(b"B")], PayloadOptions(), single=False)
    assert orjson.loads(body) == [
        {"ICCID": 897612653856781234, "Timestamp": "2023-10-16T09:17:32.123Z", "Payload": "A"},
        {"ICCID": 897612653856781234, "Timestamp": "2023-10-16T09:17:32.123Z", "Payload": "B"},
    ]
    leftover, _ = formats.monoz([row(b"Z")], PayloadOptions(), single=False)
    assert orjson.loads(leftover) == [
        {"ICCID": 897612653856781234, "Timestamp": "2023-10-16T09:17:32.123Z", "Payload": "Z"}
    ]


def test_iccid_is_a_number_when_all_digits_even_beyond_64_bits_and_text_otherwise() -> None:
    body, _ = formats.monoz(
        [row(b"x", iccid="89324102234690160476")], PayloadOptions(), single=True
    )
    assert body.startswith(b'{"ICCID":89324102234690160476,')
    assert json.loads(body)["ICCID"] == 89324102234690160476  # orjson would round to a float
    hexy, _ = formats.monoz([row(b"x", iccid="8988303000000F12345")], PayloadOptions(), single=True)
    assert orjson.loads(hexy)["ICCID"] == "8988303000000F12345"
    forced, _ = formats.monoz([row(b"x")], PayloadOptions(iccid_as="string"), single=True)
    assert orjson.loads(forced)["ICCID"] == "897612653856781234"


def test_topic_mode_puts_the_mqtt_topic_first() -> None:
    body, _ = formats.monoz(
        [row(b"x", topic="devices/abc/up")], PayloadOptions(id_field="Topic"), single=True
    )
    assert (
        body == b'{"Topic":"devices/abc/up","Timestamp":"2023-10-16T09:17:32.123Z","Payload":"x"}'
    )


def test_binary_payload_is_base64_and_hex_and_base64_modes_apply() -> None:
    raw = bytes([0, 255, 1, 128])
    auto, failed = formats.monoz([row(raw)], PayloadOptions(), single=True)
    assert orjson.loads(auto)["Payload"] == base64.b64encode(raw).decode()
    assert failed == 0  # auto never "fails": binary is simply base64
    hx, _ = formats.monoz([row(raw)], PayloadOptions(encoding="hex"), single=True)
    assert orjson.loads(hx)["Payload"] == "00ff0180"
    b64, _ = formats.monoz([row(b"text")], PayloadOptions(encoding="base64"), single=True)
    assert orjson.loads(b64)["Payload"] == "dGV4dA=="
    _, failed = formats.monoz([row(raw)], PayloadOptions(encoding="utf8"), single=True)
    assert failed == 1


def test_cbor_payload_is_decoded_into_json_and_invalid_cbor_falls_back_to_base64() -> None:
    raw = cbor2.dumps({"temp": 21.5, "bat": 98, "raw": b"\x01\x02", "tags": [1, "a"]})
    body, failed = formats.monoz([row(raw)], PayloadOptions(encoding="cbor-json"), single=True)
    assert orjson.loads(body)["Payload"] == {
        "temp": 21.5,
        "bat": 98,
        "raw": "AQI=",
        "tags": [1, "a"],
    }
    assert failed == 0
    bad = b"\xff\xfe\xfd"
    body, failed = formats.monoz([row(bad)], PayloadOptions(encoding="cbor-json"), single=True)
    assert orjson.loads(body)["Payload"] == base64.b64encode(bad).decode()
    assert failed == 1
    trailing = cbor2.dumps(1) + b"junk"
    _, failed = formats.monoz([row(trailing)], PayloadOptions(encoding="cbor-json"), single=True)
    assert failed == 1


cbor_values = hs.recursive(
    hs.none()
    | hs.booleans()
    | hs.integers(-(2**70), 2**70)
    | hs.floats()
    | hs.text(max_size=10)
    | hs.binary(max_size=10),
    lambda inner: (
        hs.lists(inner, max_size=4) | hs.dictionaries(hs.text(max_size=5), inner, max_size=4)
    ),
    max_leaves=15,
)


def expected_json(v: object) -> object:
    if isinstance(v, bool) or v is None or isinstance(v, str):
        return v
    if isinstance(v, int):
        return v if -(2**63) <= v < 2**63 else str(v)
    if isinstance(v, float):
        return v if math.isfinite(v) else None
    if isinstance(v, bytes):
        return base64.b64encode(v).decode()
    if isinstance(v, list):
        return [expected_json(x) for x in v]
    assert isinstance(v, dict)
    return {k: expected_json(x) for k, x in v.items()}


@settings(max_examples=300, deadline=None)
@given(cbor_values)
def test_any_cbor_value_a_device_sends_arrives_as_the_documented_json(value: object) -> None:
    body, failed = formats.monoz(
        [row(cbor2.dumps(value))], PayloadOptions(encoding="cbor-json"), single=True
    )
    assert failed == 0
    assert orjson.loads(body)["Payload"] == expected_json(value)


def test_cdr_manager_signature_matches_an_independent_hmac_sha512() -> None:
    body = b'[{"ICCID":1}]'
    secret = "my-shared-secret"
    # PHP: base64_encode(hash_hmac('sha512', $body, $secret, true)) is the raw digest, base64.
    expected = base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha512).digest()).decode()
    assert signing.cdr_manager(secret, body) == expected
    # Known vector from `openssl dgst -sha512 -hmac key -binary | base64` (what PHP computes).
    assert signing.cdr_manager("key", b"The quick brown fox jumps over the lazy dog") == (
        "tCrwkFe6weLUFwjkipAuCbX/fxKrQopP6GZTxz3SSPuC+UilSfe3kaW0GRXuTR7Dk1NX5OIxclDQNyr6Lr7rOg=="
    )


def test_standard_webhooks_signature_and_rotation() -> None:
    key1, key2 = b"0123456789abcdef0123456789abcdef", b"fedcba9876543210fedcba9876543210"
    s1 = "whsec_" + base64.b64encode(key1).decode()
    s2 = "whsec_" + base64.b64encode(key2).decode()
    body = b'{"a":1}'
    header = signing.standard_webhooks(f"{s1} {s2}", "msg_1", 1700000000, body)
    parts = header.split()
    assert len(parts) == 2
    for key, part in zip((key1, key2), parts, strict=True):
        mac = hmac.new(key, b"msg_1.1700000000." + body, hashlib.sha256).digest()
        assert part == "v1," + base64.b64encode(mac).decode()
    assert signing.verify_standard_webhooks(s2, "msg_1", 1700000000, body, header)
    assert not signing.verify_standard_webhooks(s1, "msg_1", 1700000000, body + b" ", header)


def test_retry_classification_per_preset() -> None:
    durable, monoz = RETRY_PRESETS["durable"], RETRY_PRESETS["monoz"]
    for status in (408, 425, 429, 500, 502, 503, 599):
        assert classify(durable, Outcome(status, "e")) == "retry"
        assert classify(monoz, Outcome(status, "e")) == "dead"
    for status in (400, 401, 403, 404, 422):
        assert classify(durable, Outcome(status, "e")) == "dead"
    assert classify(durable, Outcome(410, "e")) == "gone"
    assert classify(monoz, Outcome(None, "timeout")) == "retry"
    assert classify(durable, Outcome(204, "")) == "ok"


def test_backoff_is_full_jitter_capped_and_retry_after_is_a_floor() -> None:
    p = RETRY_PRESETS["durable"]
    delays = [next_delay(p, 20, None) for _ in range(200)]
    assert all(0 <= d <= 300 for d in delays)
    assert max(delays) > 100  # jitter spreads over the whole range
    assert all(next_delay(p, 1, 7.0) >= 7.0 for _ in range(20))


def test_retry_after_accepts_seconds_and_http_dates_and_ignores_garbage() -> None:
    assert parse_retry_after("120") == 120
    now = 1_700_000_000.0
    date = dt.datetime.fromtimestamp(now + 30, dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
    assert parse_retry_after(date, now) == 30
    assert parse_retry_after("soon") is None
    assert parse_retry_after("") is None
    assert parse_retry_after("99999999999") == 24 * 3600


def test_auto_sends_text_with_control_characters_as_base64_but_keeps_newlines_and_unicode() -> None:
    for raw, expected in [
        (b"\x01\x02\x03\x04", base64.b64encode(b"\x01\x02\x03\x04").decode()),
        (b"line1\nline2\ttab\r\n", "line1\nline2\ttab\r\n"),
        ("température 21°".encode(), "température 21°"),
    ]:
        body, _ = formats.monoz([row(raw)], PayloadOptions(), single=True)
        assert orjson.loads(body)["Payload"] == expected


CDR = {
    "CdrType": "DATA",
    "UniqueID": "CDR-abcdefghij0123456789",
    "Iccid": "8944500000000000013",
    "IMSI": "440101234567890",
    "MSISDN": "+819012345678",
    "IMEI": "356938035643809",
    "MNO": "44010",
    "MnoName": "NTT DOCOMO",
    "MCC": "440",
    "MNC": "10",
    "ThingName": "ICCID 8944500000000000013",
    "ThingId": "ThingId_ICCID_8944500000000000013",
    "ThingsGroupId": "",
    "ThingsGroupName": "",
    "Timestamp": 1697447852123,
    "Usage": 5555,
    "APN": "iot.example",
}
CDR_JSON = (
    b'{"CdrType":"DATA","UniqueID":"CDR-abcdefghij0123456789","Iccid":"8944500000000000013",'
    b'"IMSI":"440101234567890","MSISDN":"+819012345678","IMEI":"356938035643809","MNO":"44010",'
    b'"MnoName":"NTT DOCOMO","MCC":"440","MNC":"10","ThingName":"ICCID 8944500000000000013",'
    b'"ThingId":"ThingId_ICCID_8944500000000000013","ThingsGroupId":"","ThingsGroupName":"",'
    b'"Timestamp":1697447852123,"Usage":5555,"APN":"iot.example"}'
)


def test_golden_cdr_bodies_monogoto_envelope_and_flat() -> None:
    assert formats.monogoto([CDR, CDR]) == b"[" + CDR_JSON + b"," + CDR_JSON + b"]"
    assert formats.monogoto([CDR]) == b"[" + CDR_JSON + b"]"  # an array even for one
    assert formats.flat(CDR) == CDR_JSON
    assert (
        formats.envelope(CDR, {"event": "big usage"}, "noc", "cdr")
        == b'{"cdr":' + CDR_JSON + b',"meta":{"event":"big usage"},"name":"noc"}'
    )


def test_golden_report_notice() -> None:
    notice = {
        "contentType": "application/zip",
        "httpMethod": "GET",
        "callbackURL": "https://gw.example/cdr-download-files/tok",
        "validUntil": "2023-01-10T10:02:27Z",
        "fileName": "tx00001.zip",
        "fileSizeInBytes": 100000,
        "numberOfLines": 100,
        "taskName": "Example task",
        "taskId": 1,
        "error": "",
    }
    assert formats.report_notice(notice) == (
        b'{"contentType":"application/zip","httpMethod":"GET",'
        b'"callbackURL":"https://gw.example/cdr-download-files/tok",'
        b'"validUntil":"2023-01-10T10:02:27Z","fileName":"tx00001.zip","fileSizeInBytes":100000,'
        b'"numberOfLines":100,"taskName":"Example task","taskId":1,"error":""}'
    )


def _strict(body: bytes) -> object:
    def no_constant(name: str) -> object:
        raise ValueError(f"{name} is not JSON")

    return json.loads(body, parse_constant=no_constant)


# CBOR items of every kind a device may send: huge integers, bytes, non-text map keys,
# tags, undefined, simple values, NaN and infinities, nested lists and maps.
_cbor_scalars = (
    hs.integers(min_value=-(2**64), max_value=2**64)
    | hs.integers(64, 12000).map(lambda bits: 2**bits - 1)
    # beyond Python's 4,300-digit str() limit; drawn by exponent, so that hypothesis
    # never has to print such a number itself
    | hs.integers(1, 3).map(lambda k: 7 ** (6000 * k))
    | hs.binary(max_size=20)
    | hs.text(max_size=10)
    | hs.floats(allow_nan=True, allow_infinity=True)
    | hs.none()
    | hs.booleans()
    | hs.just(cbor2.undefined)
    | hs.integers(0, 19).map(cbor2.CBORSimpleValue)
    | hs.integers(32, 255).map(cbor2.CBORSimpleValue)
)
_cbor_values = hs.recursive(
    _cbor_scalars,
    lambda inner: (
        hs.lists(inner, max_size=4)
        | hs.dictionaries(
            hs.integers() | hs.text(max_size=5) | hs.binary(max_size=4), inner, max_size=4
        )
        | hs.builds(cbor2.CBORTag, hs.integers(6, 20) | hs.integers(1000, 2**32), inner)
    ),
    max_leaves=20,
)


def _cbor_bytes(value: object) -> bytes:
    try:
        return cbor2.dumps(value)
    except Exception:  # a tag number cbor2 itself refuses to write
        return b"\xff"


@settings(max_examples=300, deadline=None)
@given(
    payload=hs.one_of(_cbor_values.map(_cbor_bytes), hs.binary(max_size=64)),
    iccid=hs.text(max_size=30),
    topic=hs.text(max_size=30),
    encoding=hs.sampled_from(["auto", "utf8", "base64", "hex", "cbor-json"]),
)
def test_any_payload_iccid_and_topic_make_valid_json_in_every_packet_format(
    payload: bytes, iccid: str, topic: str, encoding: str
) -> None:
    opts = PayloadOptions(encoding)
    r = row(payload, iccid=iccid, topic=topic)
    body, _ = formats.monoz([r, r], opts, single=False)
    assert len(_strict(body)) == 2  # type: ignore[arg-type]
    rec, _ = formats.packet_record(r, opts)
    _strict(formats.envelope(rec, {}, "w", "packet"))
    _strict(formats.flat(rec))
    got = _strict(formats.monoz_object(row(payload, iccid=iccid), opts)[0])
    if iccid and not formats.iccid_is_number(iccid):
        assert got["ICCID"] == iccid  # type: ignore[index]


@settings(max_examples=300, deadline=None)
@given(payload=_cbor_values.map(_cbor_bytes), want=hs.integers() | hs.text(max_size=5))
def test_conditions_on_any_cbor_payload_answer_without_raising(
    payload: bytes, want: object
) -> None:
    from gateway.config import Condition
    from gateway.delivery.conditions import Filter
    from gateway.delivery.sources import PacketSource

    get = PacketSource(PayloadOptions("cbor-json")).getter(row(payload))
    for op in (">", ">=", "==", "!=", "contains", "startswith", "regex", "in"):
        value = [want] if op == "in" else ("x" if op == "regex" else want)
        for field in ("payload", "payload.0", "payload.tag", "payload.value.0"):
            assert Filter([Condition(field, op, value)])(get) in (True, False)


def test_ordering_conditions_never_match_null_booleans_lists_or_objects() -> None:
    from gateway.config import Condition
    from gateway.delivery.conditions import Filter
    from gateway.delivery.sources import PacketSource

    at_least_zero = Filter([Condition("payload.n", ">=", 0)])

    def matches(n: object) -> bool:
        get = PacketSource(PayloadOptions("cbor-json")).getter(row(cbor2.dumps({"n": n})))
        return at_least_zero(get)

    assert [matches(v) for v in (None, True, False, [1], {"a": 1}, float("nan"))] == [False] * 6
    assert [matches(v) for v in (0, 5, 2.5, "7", 10**30)] == [True] * 5
    assert [matches(v) for v in (-1, "-3")] == [False, False]

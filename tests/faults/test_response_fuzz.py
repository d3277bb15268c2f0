"""Webhook responses from a hostile or broken receiver.

Huge bodies, bodies that drip, broken status lines and headers, lies about the length,
silence and garbage Retry-After values: the gateway neither crashes nor hangs nor grows,
and keeps delivering. Retry-After parsing is pure, so hypothesis checks it directly.
"""

from __future__ import annotations

import email.utils
import os
import time
from pathlib import Path

import psutil
import pytest
from hypothesis import example, given
from hypothesis import strategies as st

from gateway.delivery.sender import MAX_RETRY_AFTER_S, parse_retry_after
from tests.conftest import Broker, db_rows, wait_for
from tests.faults.rawhttp import (
    RawReceiver,
    Scripted,
    drip,
    huge,
    raw,
    reply,
    slow_headers,
)
from tests.faults.support import (
    Publisher,
    Tally,
    delivered_all,
    durable,
    seeded,
    status,
)
from tests.receiver import Recorded

TOTAL = 2_000
RATE = 200
TIMEOUT_S = 1.0

# Retry-After values that are not a number of seconds nor an HTTP date, or are harmless
# ones (0, past dates): each must leave the normal backoff in charge. (A valid but huge
# value is honoured, up to a day: that is for the pure tests below, not for this run.)
GARBAGE_RETRY_AFTER = [
    b"-1",
    b"1.5",
    b"NaN",
    b"inf",
    b"0x10",
    b"",
    b"   ",
    b"0",
    b"0000000000000000000000000000000",
    b"today",
    b"1, 2",
    b"Wed, 99 Foo 2020 00:00:00 GMT",
    b"Mon, 01 Jan 10000 00:00:00 GMT",
    b"Mon, 01 Jan 1990 00:00:00 GMT",
    b"Fri, 31 Dec 9999 23:59:59",
    b"\xff\xfe\x00garbage",
    b"\xc2\xb2",  # UTF-8 of a superscript two: str.isdigit() says yes, float() says no
    b"x" * 7000,  # a header line almost as long as aiohttp accepts
]

ANSWERS = {
    "ok": Scripted(200, reply(200)),
    "huge 200": Scripted(200, huge(200, 32 << 20)),
    "huge 500": Scripted(500, huge(500, 32 << 20)),
    "drip 200": Scripted(200, drip(200, 200, 0.05)),
    "drip headers": Scripted(0, slow_headers(200, 0.05)),
    "garbage": Scripted(0, raw(os.urandom(512))),
    "bad status line": Scripted(0, raw(b"HTTP/1.1 2OO OK\r\nContent-Length: 0\r\n\r\n")),
    "huge header": Scripted(0, raw(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")),
    "short body": Scripted(200, raw(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly ten b")),
    "bad chunk": Scripted(
        200, raw(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nZZZ\r\nxx\r\n")
    ),
    "silence": Scripted(0, raw(b"")),
}


def garbage_retry_after(value: bytes) -> Scripted:
    return Scripted(503, reply(503, b"busy", b"Retry-After: " + value + b"\r\n"))


def test_hostile_responses_neither_crash_hang_nor_grow_the_gateway_and_delivery_goes_on(
    mosquitto: Broker, tmp_path: Path, launch, record_property
) -> None:
    seed, rng = seeded(record_property)
    fuzzing = True
    kinds: list[str] = []

    def script(_n: int, _r: Recorded) -> Scripted:
        if not fuzzing or rng.random() < 0.3:
            kinds.append("ok")
            return ANSWERS["ok"]
        if rng.random() < 0.3:
            value = rng.choice(GARBAGE_RETRY_AFTER)
            kinds.append("retry-after")
            return garbage_retry_after(value)
        kind = rng.choice([k for k in ANSWERS if k != "ok"])
        kinds.append(kind)
        return ANSWERS[kind]

    receiver = RawReceiver(script).start()
    try:
        gw = launch(
            receiver.url, batch="{ window_ms = 50, max_items = 10 }", retry=durable(0.3, TIMEOUT_S)
        )
        assert gw.proc is not None
        proc = psutil.Process(gw.proc.pid)
        pub = Publisher(mosquitto.port, TOTAL, RATE).start()
        wait_for(lambda: len(receiver.requests) >= 40, what="some requests")
        rss_warm = proc.memory_info().rss
        rss_peak = rss_warm
        while len(pub.acked) < TOTAL:
            rss_peak = max(rss_peak, proc.memory_info().rss)
            assert gw.proc.poll() is None, gw.log()[-2000:]
            time.sleep(0.1)
        pub.join(30)
        fuzzing = False
        wait_for(
            delivered_all(TOTAL, receiver), timeout=60, what="every packet delivered at the end"
        )
        rss_peak = max(rss_peak, proc.memory_info().rss)
        record_property("requests", len(receiver.requests))
        record_property("answers", {k: kinds.count(k) for k in sorted(set(kinds))})
        record_property("rss_warm_mb", round(rss_warm / 1e6, 1))
        record_property("rss_peak_mb", round(rss_peak / 1e6, 1))
        wait_for(lambda: status(gw)["packets"]["pending"] == 0, what="store emptied")
        dead = db_rows(tmp_path / "state-gw" / "gateway.db", "SELECT COUNT(*) FROM dead_letters")
        assert gw.terminate() == 0
    finally:
        receiver.stop()
    t = Tally.of(receiver)
    assert t.missing(TOTAL) == [], f"seed {seed}"
    assert t.seqs_with_several_ids() == {}
    assert dead[0][0] == 0
    # 32 MB bodies were offered; the gateway reads 64 KB of a response at most.
    assert rss_peak - rss_warm < 25e6, (
        f"seed {seed}: RSS {rss_warm / 1e6:.0f} → {rss_peak / 1e6:.0f} MB"
    )
    assert "failed: " not in gw.log(), "a batch task ended with an exception"


@given(st.text(alphabet=st.characters(codec="ascii")))
@example("9" * 5000)
@example("Fri, 31 Dec 9999 23:59:59 GMT")
@example("Mon, 01 Jan 0001 00:00:00 GMT")
def test_retry_after_parsing_never_raises_and_stays_within_a_day(value: str) -> None:
    got = parse_retry_after(value, now=1_700_000_000.0)
    assert got is None or 0.0 <= got <= MAX_RETRY_AFTER_S


@given(st.integers(0, 10**6), st.floats(0, 2e9))
def test_retry_after_seconds_and_http_dates_mean_the_same_wait(seconds: int, now: float) -> None:
    assert parse_retry_after(str(seconds)) == min(seconds, MAX_RETRY_AFTER_S)
    date = email.utils.formatdate(int(now) + seconds, usegmt=True)
    assert parse_retry_after(date, now=int(now)) == min(seconds, MAX_RETRY_AFTER_S)


@pytest.mark.parametrize("value", ["²", "³", "¹"])
def test_retry_after_with_a_non_ascii_digit_is_ignored_not_an_error(value: str) -> None:
    assert parse_retry_after(value) is None


def test_a_400_with_a_non_ascii_digit_retry_after_is_dead_lettered_at_once(
    mosquitto: Broker, tmp_path: Path, launch
) -> None:
    receiver = RawReceiver(
        lambda n, r: Scripted(400, reply(400, b"no", "Retry-After: ²\r\n".encode()))
    ).start()
    try:
        gw = launch(receiver.url, batch="{ window_ms = 50 }", retry=durable(0.1))
        Publisher(mosquitto.port, 1, 100).start().join(10)
        db = tmp_path / "state-gw" / "gateway.db"
        wait_for(
            lambda: (
                len(receiver.requests) >= 2
                or db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0]
            ),
            what="a retry or a dead letter",
        )
        time.sleep(0.3)
        gw.terminate()
    finally:
        receiver.stop()
    assert len(receiver.requests) == 1
    assert db_rows(db, "SELECT reason FROM dead_letters") == [("http_400",)]

"""The gateway's wall clock jumps an hour back, then two days forward, then back to the
real time, while packets stream in, batches are being retried and reports run every second.

The gateway runs under libfaketime (tests/faults/faketime.py): only its CLOCK_REALTIME
moves, as with `date -s`, or NTP stepping the clock of a board without RTC. Every packet
arrives, in publish order within each request, nothing is dead-lettered, retries and
reports keep their pace, and /api/status keeps sane rates and uptime. Report links expire
by the wall clock: two days ahead, a link made before is 410; back at the real time it
opens again.
"""

from __future__ import annotations

import datetime as dt
import itertools
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest

from tests.conftest import Broker, GatewayProc, db_rows, free_port, wait_for, write_config
from tests.faults.faketime import WallClock, library
from tests.faults.support import (
    Publisher,
    Tally,
    delivered_all,
    parse,
    register_session,
    status,
)
from tests.receiver import Receiver, Recorded, Reply

TOTAL = 1_200
RATE = 50
BACKOFF_MAX_S = 1.0
REPORT_EVERY_S = 1.0
HOUR = 3600.0
DAYS_2 = 2 * 86400.0
# The clock is set to `offset` `when` seconds after publishing began. The packets'
# receiver answers 500 from FAIL_BEFORE_S before each jump to FAIL_AFTER_S after it, so
# that batches are being retried, and a backlog of several windows waits, at the jump.
JUMPS = [(5.5, "-3600"), (12.5, "+2d"), (19.5, "+0")]
FAIL_BEFORE_S = 2.5
FAIL_AFTER_S = 1.5


@pytest.fixture
def wall_clock(tmp_path: Path) -> WallClock:
    lib = library()
    if lib is None:
        pytest.skip(
            "libfaketime is not installed: apt-get install libfaketime (scripts/bootstrap does, as root)"
        )
    clock = WallClock(tmp_path / "clock", lib)
    # The library works here: the wall clock moves, the monotonic clock does not.
    clock.set("-3600")
    wall, mono = clock.probe()
    clock.set("+0")
    assert abs(wall + HOUR) < 5, wall
    assert abs(mono) < 5, mono
    return clock


def config(tmp_path: Path, broker: Broker, web_port: int, hooks: str, reports: str) -> Path:
    extra = f"""
[[webhooks]]
name = "cloud"
url = "{hooks}"
batch = {{ window_ms = 200, max_items = 20 }}
concurrency = 1
retry = {{ preset = "durable", backoff_min_s = 0.05, backoff_max_s = {BACKOFF_MAX_S}, max_age_s = {HOUR:g} }}

[[webhooks]]
name = "reports"
url = "{reports}"
source = "reports"
format = "report"

[[reports]]
name = "usage"
every = "{REPORT_EVERY_S:g}s"
webhook = "reports"
"""
    return write_config(
        tmp_path / "gw.toml",
        broker.port,
        tmp_path / "state",
        extra=extra,
        mqtt_extra="session_expiry_s = 3600",
        client_id="gw",
        web=f'listen = "127.0.0.1:{web_port}"\n'
        f'public_url = "http://127.0.0.1:{web_port}"\nsample_s = 0.2',
    )


def get(url: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(url, timeout=10) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, b""


def api_status(port: int) -> dict[str, Any]:
    code, body = get(f"http://127.0.0.1:{port}/api/status")
    assert code == 200
    return orjson.loads(body)  # type: ignore[no-any-return]


def unix(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def test_clock_jumps_break_neither_delivery_nor_retries_nor_reports(
    mosquitto: Broker,
    tmp_path: Path,
    gateway_proc: Callable[..., GatewayProc],
    wall_clock: WallClock,
    record_property: Callable[[str, object], None],
) -> None:
    failing = threading.Event()
    hooks, notices = Receiver(), Receiver()
    hooks.behaviour = lambda n, r: Reply(500, text="down") if failing.is_set() else Reply(200)
    hooks.start()
    notices.start()
    try:
        web_port = free_port()
        register_session(mosquitto.port, "gw", "devices/+/up")
        cfg = config(tmp_path, mosquitto, web_port, hooks.url, notices.url)
        gw = gateway_proc(cfg, env=wall_clock.env())
        gw.start()
        wait_for(lambda: "subscribed to" in gw.log(), what="gateway subscribed")

        began = time.monotonic()
        pub = Publisher(mosquitto.port, TOTAL, RATE).start()
        jumped: dict[str, float] = {}  # when the clock was set to each offset (monotonic)
        downloads: dict[str, int] = {}
        wait_for(lambda: notices.ok(), what="a report before the jumps")
        link = notices.ok()[0].json["callbackURL"]
        downloads["before"] = get(link)[0]
        statuses = [api_status(web_port)]

        def at(t: float) -> None:
            time.sleep(max(0.0, began + t - time.monotonic()))

        def count(table: str) -> int:
            (row,) = db_rows(tmp_path / "state" / "gateway.db", f"SELECT COUNT(*) FROM {table}")
            return int(str(row[0]))

        def reports_made() -> int:
            return count("reports")

        made: dict[str, tuple[int, int]] = {}  # reports made by each jump, and 4.5 s later
        for when, offset in JUMPS:
            at(when - FAIL_BEFORE_S)
            failing.set()
            at(when)
            wall_clock.set(offset)
            jumped[offset] = time.monotonic()
            at_jump = reports_made()
            at(when + FAIL_AFTER_S)
            failing.clear()
            downloads[offset] = get(link)[0]
            statuses.append(api_status(web_port))
            at(when + 7 - FAIL_BEFORE_S)
            made[offset] = (at_jump, reports_made())
        pub.join(60)
        all_there = delivered_all(TOTAL, hooks)
        wait_for(
            lambda: all_there() or count("dead_letters"),
            timeout=30,
            what="every packet delivered",
            interval=0.2,
        )
        assert count("dead_letters") == 0, "a jump expired a batch"
        wait_for(lambda: status(gw)["packets"]["pending"] == 0, what="store emptied")
        statuses.append(api_status(web_port))
        wait_for(lambda: len(notices.ok()) >= reports_made(), what="every report notice sent")
        snap = status(gw)
        gw.terminate()
    finally:
        hooks.stop()
        notices.stop()

    t = Tally.of(hooks)
    ok = hooks.ok()
    failed = [r for r in hooks.requests if r.status == 500]
    record_property("requests", {"ok": len(ok), "failed": len(failed)})
    record_property("reports", made)
    record_property("downloads", downloads)
    record_property("runtime_s", round(time.monotonic() - began, 1))

    # Every packet, each in one batch (no crash here: nothing is sent twice).
    assert t.missing(TOTAL) == []
    assert t.seqs_with_several_ids() == {}
    assert snap["dead_letters"] == 0
    # Within a request, packets in publish order.
    for req in ok:
        seqs = [parse(rec["Payload"])[0] for rec in req.records]
        assert seqs == sorted(seqs), seqs
    # The gateway's clock really moved: packet Timestamps follow it.
    stamps = [unix(rec["Timestamp"]) for req in ok for rec in req.records]
    now = time.time()
    assert any(now - HOUR - 120 < s < now - HOUR + 60 for s in stamps)
    assert any(now + DAYS_2 - 120 < s < now + DAYS_2 + 60 for s in stamps)

    # Retries went on at the policy's pace through every jump, after the jump back too.
    assert len(failed) >= 3 * 2
    by_id: dict[str, list[Recorded]] = {}
    for req in hooks.requests:
        by_id.setdefault(req.webhook_id, []).append(req)
    gaps = [b.at - a.at for tries in by_id.values() for a, b in itertools.pairwise(tries)]
    # A gap is the backoff plus the wait for one of the webhook's request slots behind
    # other batches' attempts (a few seconds on a loaded machine); a retry held back by
    # a jump would wait for the jump: an hour.
    assert max(gaps) < BACKOFF_MAX_S + 5.0, max(gaps)
    back = jumped["-3600"]
    assert any(r.at > back and by_id[r.webhook_id][0].at < back for r in ok), (
        "no batch failing at the jump back was retried after it"
    )

    # Reports kept coming (every second; the export's fsync makes it 1-2 s here) after
    # each jump, instead of waiting for the clock to catch up with the last one.
    assert all(after - before >= 2 for before, after in made.values()), made
    # A link made before the jumps: valid an hour back; expired by the wall clock two
    # days ahead (410); valid again once the clock is back.
    assert downloads == {"before": 200, "-3600": 200, "+2d": 410, "+0": 200}

    # The dashboard: uptime never went back, rates stayed near the publish rate.
    uptimes = [s["gateway"]["uptime_s"] for s in statuses]
    assert uptimes == sorted(uptimes), uptimes
    assert uptimes[0] >= 0, uptimes
    assert all(s["rates"]["received_per_s"] < RATE * 5 for s in statuses), [
        s["rates"] for s in statuses
    ]

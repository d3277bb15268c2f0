"""A wall clock that jumps (set back, or forward by days) breaks neither batching, retries,
the dashboard's rates nor the report schedule.

Each test runs one gateway component on a real store and, where it sends, to a real
receiver. Some preload records stamped as a moved clock leaves them; the others give the
component's module a wall clock that a test can move while monotonic time runs on, as
`date -s` does. tests/faults/test_clock_jumps.py moves the clock of a whole gateway
process with libfaketime.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from gateway import config, delivery
from gateway import store as st
from gateway.config import WebhookConfig
from gateway.delivery import route, sources
from gateway.delivery.route import Route, window_rows
from gateway.delivery.sender import Sender
from gateway.store import Incoming, Store
from gateway.usage import reports
from gateway.web import app as web
from gateway.web import throughput
from tests.conftest import free_port, until, write_config
from tests.receiver import Receiver, Reply

HOUR_NS = 3600 * 10**9
TOPIC = "devices/8981100000000000012/up"


class Clock:
    """The time module as one gateway module sees it: time() and time_ns() are off by
    `offset_s`, which a test sets; monotonic time and everything else are the real ones."""

    def __init__(self) -> None:
        self.offset_s = 0.0

    def time(self) -> float:
        return time.time() + self.offset_s

    def time_ns(self) -> int:
        return time.time_ns() + int(self.offset_s * 1e9)

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[Any], Clock]:
    """clock(module): give a gateway module a wall clock the test can move."""

    def give(module: Any) -> Clock:
        c = Clock()
        monkeypatch.setattr(module, "time", c)
        return c

    return give


def gateway_config(tmp_path: Path, **sections: str) -> config.Config:
    """The tests' config (no broker is reached) with write_config's `extra`, `web`..."""
    return config.load(write_config(tmp_path / "gw.toml", 1883, tmp_path / "state", **sections))


def webhook(tmp_path: Path, url: str, **fields: str) -> WebhookConfig:
    lines = ["[[webhooks]]", 'name = "cloud"', f'url = "{url}"']
    lines += [f"{k} = {v}" for k, v in fields.items()]
    return gateway_config(tmp_path, extra="\n".join(lines)).webhooks[0]


def preload(store: Store, stamps_ns: list[int]) -> None:
    """Packets p0, p1, ... received (by the gateway's clock) at the given times."""
    for i, ts in enumerate(stamps_ns):
        store.submit_packet(Incoming(TOPIC, f"p{i}".encode(), "x", i + 1, False, 1, ts))
    until_sync(lambda: len(store.run_sync(st.fetch_packets, 0, 100)) == len(stamps_ns))


def until_sync(predicate: Callable[[], object], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "store did not commit the preloaded packets"
        time.sleep(0.02)


class Running:
    """A Route of webhook `cfg` delivering from `store`, until the context ends."""

    def __init__(self, cfg: WebhookConfig, store: Store) -> None:
        self.cfg = cfg
        self.store = store

    async def __aenter__(self) -> Route:
        self.session = delivery.client_session()
        self.http = await self.session.__aenter__()
        self.store.set_packet_routes([self.cfg.name])
        self.reader = st.Reader(self.store.path)
        route = Route(
            self.cfg,
            self.store,
            Sender(self.cfg, self.http),
            sources.for_webhook(self.cfg, "auto"),
            asyncio.Event(),
            reader=self.reader,
        )
        self.route = route
        self.task = asyncio.create_task(route.run())
        return route

    async def __aexit__(self, *exc: object) -> None:
        tasks = [self.task, *self.route.open.values()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.reader.close()
        await self.session.__aexit__(None, None, None)


@pytest.fixture
def store(tmp_path: Path) -> Any:
    with Store.open(tmp_path / "state") as s:
        yield s


def payloads(receiver: Receiver) -> list[str]:
    return [rec["Payload"] for rec in receiver.delivered()]


def dead_letters(store: Store) -> list[dict[str, Any]]:
    return store.run_sync(st.list_dead_letters, None, 100)


# -- batching windows ---------------------------------------------------------------------


def test_a_window_takes_the_rows_before_the_first_one_stamped_after_it(store: Store) -> None:
    t = time.time_ns() - 60 * 10**9
    # p1 came after p0's window; then the clock went back an hour, and p2 came.
    preload(store, [t, t + 10**9, t - HOUR_NS])
    rows = store.run_sync(st.fetch_packets, 0, 100)
    assert [r.id for r in window_rows(rows, t + 200_000_000)] == [rows[0].id]
    assert window_rows(rows, t) == []
    assert window_rows(rows, t + 2 * 10**9) == rows


async def test_a_packet_stamped_before_a_jump_back_is_not_skipped_by_the_window_after_it(
    tmp_path: Path, store: Store, receiver: Receiver
) -> None:
    t = time.time_ns() - 60 * 10**9
    preload(store, [t, t + 10**9, t - HOUR_NS])
    cfg = webhook(tmp_path, receiver.url, batch="{ window_ms = 200 }")
    async with Running(cfg, store):
        await until(lambda: len(payloads(receiver)) == 3, timeout=5, what="all three packets")
        await until(lambda: not store.run_sync(st.fetch_packets, 0, 10), what="store drained")
    assert payloads(receiver) == ["p0", "p1", "p2"]


async def test_a_window_opened_before_the_clock_went_back_closes_after_one_window(
    tmp_path: Path, store: Store, receiver: Receiver
) -> None:
    # Received an hour "ahead": the clock was set back an hour since.
    ahead = time.time_ns() + HOUR_NS
    preload(store, [ahead, ahead + 1_000_000])
    cfg = webhook(tmp_path, receiver.url, batch="{ window_ms = 200 }")
    began = time.monotonic()
    async with Running(cfg, store):
        await until(lambda: len(payloads(receiver)) == 2, timeout=5, what="the window sent")
    assert time.monotonic() - began < 3
    assert payloads(receiver) == ["p0", "p1"]
    assert len(receiver.ok()) == 1


# -- retries ------------------------------------------------------------------------------


async def delivered_within_an_hour(tmp_path: Path, store: Store, receiver: Receiver) -> list[int]:
    """One packet through a webhook whose batches expire after an hour (max_age_s), not
    dead-lettered; returns the statuses of the attempts it took."""
    preload(store, [time.time_ns() - 10**9])
    cfg = webhook(
        tmp_path,
        receiver.url,
        batch="{ window_ms = 50 }",
        retry='{ preset = "durable", backoff_min_s = 0.05, backoff_max_s = 0.2, max_age_s = 3600 }',
    )
    async with Running(cfg, store):
        await until(lambda: receiver.ok() or dead_letters(store), timeout=10, what="an outcome")
    assert not dead_letters(store)
    return [r.status for r in receiver.requests]


async def test_a_clock_jumping_days_forward_does_not_expire_a_batch_being_retried(
    tmp_path: Path, store: Store, receiver: Receiver, clock: Callable[[Any], Clock]
) -> None:
    wall = clock(route)

    def behaviour(n: int, _r: object) -> Reply:
        if n == 0:
            wall.offset_s = 2 * 86400  # NTP sets the clock of a board without RTC
        return Reply(500) if n < 3 else Reply(200)

    receiver.behaviour = behaviour
    assert await delivered_within_an_hour(tmp_path, store, receiver) == [500, 500, 500, 200]


async def test_a_clock_set_forward_while_a_new_batch_is_written_does_not_expire_it(
    tmp_path: Path,
    store: Store,
    receiver: Receiver,
    clock: Callable[[Any], Clock],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The batch's creation time is read before its row is written, its sending starts
    after: a jump in between (seen once in CI) must not count as the batch's age."""
    wall = clock(route)
    create = st.create_batches

    def create_while_ntp_sets_the_clock(*args: Any) -> Any:
        wall.offset_s = 2 * 86400
        return create(*args)

    monkeypatch.setattr(st, "create_batches", create_while_ntp_sets_the_clock)
    receiver.behaviour = lambda n, _r: Reply(500) if n == 0 else Reply(200)
    assert await delivered_within_an_hour(tmp_path, store, receiver) == [500, 200]


async def test_a_batch_created_before_the_clock_went_back_still_expires_after_max_age(
    tmp_path: Path, store: Store, receiver: Receiver
) -> None:
    receiver.behaviour = lambda n, r: Reply(500)
    # Created, by the clock of the time, an hour later than the clock now says it is.
    stored_batch(store, time.time_ns() + HOUR_NS)
    cfg = webhook(
        tmp_path,
        receiver.url,
        retry='{ preset = "durable", backoff_min_s = 0.05, backoff_max_s = 0.2, max_age_s = 1 }',
    )
    async with Running(cfg, store):
        await until(lambda: dead_letters(store), timeout=5, what="the batch to expire")
    (dl,) = dead_letters(store)
    assert dl["reason"] == "expired"


def stored_batch(
    store: Store, created_ns: int, attempts: int = 0, next_at_ns: int = 0, delay_ns: int = 0
) -> None:
    """A batch with its body, as a gateway stopped meanwhile left it (`delay_ns` 0: as a
    gateway before schema version 3 left it, without the delay it chose)."""

    def insert(conn: Any) -> None:
        with st.transaction(conn):
            conn.execute(
                "INSERT INTO batches(id, route, source, item_ids, first_id, count, single, body,"
                " attempts, created_ns, next_at_ns, retry_delay_ns)"
                " VALUES ('msg_stored', 'cloud', 'packets', '[]', NULL, 1, 1, ?, ?, ?, ?, ?)",
                (b'{"x":1}', attempts, created_ns, next_at_ns, delay_ns),
            )

    store.run_sync(insert)


@pytest.mark.parametrize(
    ("set_back_ns", "delay_ns", "retry"),
    [
        # An older row, without its delay: the policy's longest wait (0.5 s) caps it.
        (HOUR_NS, 0, "backoff_max_s = 0.5, honour_retry_after = false"),
        # Retry-After is honoured, so the policy's longest wait is a day: only the delay
        # stored with the batch (a Retry-After of 0.1 s) keeps this one short.
        (86400 * 10**9, 100_000_000, "backoff_max_s = 0.5"),
    ],
    ids=["an-hour-back-policy-cap", "a-day-back-stored-delay"],
)
async def test_a_retry_persisted_before_the_clock_went_back_is_not_stretched_by_it(
    tmp_path: Path, store: Store, receiver: Receiver, set_back_ns: int, delay_ns: int, retry: str
) -> None:
    # Stopped with a retry due in 0.1 s; the clock was set back meanwhile.
    stored_batch(store, time.time_ns(), 1, time.time_ns() + set_back_ns + 100_000_000, delay_ns)
    cfg = webhook(
        tmp_path,
        receiver.url,
        retry=f'{{ preset = "durable", backoff_min_s = 0.05, {retry} }}',
    )
    began = time.monotonic()
    async with Running(cfg, store):
        await until(lambda: receiver.ok(), timeout=5, what="the retry")
    assert time.monotonic() - began < 2


async def test_a_failed_attempt_stores_the_delay_it_chose_beside_the_time(
    tmp_path: Path, store: Store, receiver: Receiver
) -> None:
    receiver.behaviour = lambda n, r: Reply(503, headers={"Retry-After": "30"})
    stored_batch(store, time.time_ns())
    cfg = webhook(tmp_path, receiver.url, retry='{ preset = "durable" }')
    async with Running(cfg, store):
        await until(lambda: receiver.requests, timeout=5, what="the first attempt")
        await until(
            lambda: store.run_sync(st.load_batches, "cloud")[0].attempts == 1,
            timeout=5,
            what="the failure recorded",
        )
    (b,) = store.run_sync(st.load_batches, "cloud")
    assert b.retry_delay_ns == 30 * 10**9
    assert abs(b.next_at_ns - time.time_ns() - 30 * 10**9) < 5 * 10**9


async def test_a_retry_after_a_restart_is_sent_once_the_clock_is_set_right(
    tmp_path: Path, store: Store, receiver: Receiver, clock: Callable[[Any], Clock]
) -> None:
    # A board without RTC boots a day behind; its retry (which may honour a Retry-After
    # of up to a day) looks a day away until NTP sets the clock.
    wall = clock(route)
    wall.offset_s = -86400
    stored_batch(store, time.time_ns(), 1, time.time_ns() + 100_000_000)
    cfg = webhook(
        tmp_path,
        receiver.url,
        retry='{ preset = "durable", backoff_min_s = 0.05, backoff_max_s = 0.5 }',
    )
    async with Running(cfg, store):
        await asyncio.sleep(0.5)
        assert not receiver.requests
        wall.offset_s = 0
        began = time.monotonic()
        await until(lambda: receiver.ok(), timeout=5, what="the retry")
    assert time.monotonic() - began < 2


def bump_received(conn: Any, n: int) -> None:
    with st.transaction(conn):
        st.bump(conn, "packets_received", n)


# -- dashboard ----------------------------------------------------------------------------


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def test_uptime_and_rates_survive_the_clock_going_back_an_hour(
    tmp_path: Path, store: Store, http: aiohttp.ClientSession, clock: Callable[[Any], Clock]
) -> None:
    wall, chart = clock(web), clock(throughput)  # the status and its chart: one clock
    cfg = gateway_config(tmp_path, web=f'listen = "127.0.0.1:{free_port()}"\nsample_s = 0.1')
    w = web.Web(cfg, store, http)
    try:
        samples = []
        for i in range(4):
            store.run_sync(bump_received, 100)
            samples.append(w.reader.run_sync(throughput.take_sample))
            w.throughput.add(samples[-1])
            await asyncio.sleep(0.2)
            if i == 1:
                wall.offset_s = chart.offset_s = -3600
        snap = await asyncio.to_thread(w.status_sync)
    finally:
        w.reader.close()
    assert 0 < snap["gateway"]["uptime_s"] < 60
    assert 0 < snap["rates"]["received_per_s"] < 2_000  # 100 every 0.2 s
    xs = [p[0] for p in snap["throughput"]["points"]]
    assert xs == sorted(xs)
    assert all(p[3] < 2_000 for p in snap["throughput"]["points"])
    # The chart is drawn against the gateway's clock as it reads now.
    assert abs(xs[-1] - wall.time()) < 5


# -- reports ------------------------------------------------------------------------------


async def test_scheduled_reports_keep_coming_after_the_clock_went_back_an_hour(
    tmp_path: Path, store: Store, clock: Callable[[Any], Clock]
) -> None:
    wall = clock(reports)
    cfg = gateway_config(tmp_path, extra='[[reports]]\nname = "r"\nevery = "0.3s"\n')

    def made() -> int:
        return len(store.run_sync(reports.list_reports))

    task = asyncio.create_task(reports.run_schedule(cfg, store))
    try:
        await until(lambda: made() >= 2, timeout=5, what="two reports")
        wall.offset_s = -3600
        before = made()
        await until(lambda: made() >= before + 3, timeout=5, what="reports after the jump")
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

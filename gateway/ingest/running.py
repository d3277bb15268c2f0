"""The asyncio side of the ingest: start it for the gateway's lifetime, in this process
or in `mqtt.ingest_processes` processes, and keep the broker's subscriptions and
sessions in line with the config."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import AsyncIterator
from typing import Protocol

import orjson

from gateway import store as st
from gateway.config import MqttSection
from gateway.ingest.pool import IngestPool, retire_sessions
from gateway.ingest.session import Ingest, IngestStats
from gateway.store import Store

log = logging.getLogger("gateway.ingest")


RETIRE_TIMEOUT_S = 60.0


async def _retire_sessions(cfg: MqttSection, store: Store, stale: list[str]) -> None:
    """When mqtt.ingest_processes went down, end the sessions no longer used (see
    gateway.ingest.pool.retire_sessions) before ingest starts. `meta.ingest_sessions` is the
    number the store was last run with; it goes down only once they are ended."""

    before = int(await asyncio.wrap_future(store.call(st.get_meta, "ingest_sessions", "1")))
    now = cfg.ingest_processes
    if before > now:
        gone = range(now, before)
        log.warning(
            "mqtt.ingest_processes went from %d to %d: taking what the broker holds for "
            "sessions %s and ending them",
            before,
            now,
            ", ".join(cfg.session_client_id(n) for n in gone),
        )
        if not await asyncio.to_thread(retire_sessions, cfg, store, gone, RETIRE_TIMEOUT_S, stale):
            log.error(
                "could not end every retired session within %g s; trying again at the next start",
                RETIRE_TIMEOUT_S,
            )
            return
    if before != now:
        await asyncio.wrap_future(store.call(st.set_meta, "ingest_sessions", str(now)))


class Taker(Protocol):
    """What the gateway sees of its ingest: an Ingest, or an IngestPool of processes."""

    first_attempt: threading.Event

    @property
    def stats(self) -> IngestStats: ...

    @property
    def alive(self) -> bool: ...

    def sessions(self) -> list[tuple[str, int, IngestStats]]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@contextlib.asynccontextmanager
async def running(cfg: MqttSection, store: Store) -> AsyncIterator[Taker]:
    """Run the ingest for the duration of the context: in this process, or in
    `mqtt.ingest_processes` processes of its own."""

    # `meta.subscriptions`: every filter a session of this store may hold at the broker.
    # Those not in the config now are unsubscribed on connect, then dropped from it.
    was = orjson.loads(await asyncio.wrap_future(store.call(st.get_meta, "subscriptions", "[]")))
    now = cfg.subscriptions()
    stale = [t for t in was if t not in now]
    if was != now:
        await _set_subscriptions(store, now + stale)
    await _retire_sessions(cfg, store, stale)
    ingest: Taker
    if cfg.ingest_processes > 1:
        ingest = IngestPool(cfg, store, stale=stale)
    else:
        ingest = Ingest(cfg, store, stale=stale)
    ingest.start()
    forget = asyncio.create_task(_forget_stale(store, ingest, now)) if stale else None
    try:
        yield ingest
    finally:
        if forget is not None:
            forget.cancel()
        await asyncio.to_thread(ingest.stop)


async def _set_subscriptions(store: Store, filters: list[str]) -> None:

    value = orjson.dumps(filters).decode()
    await asyncio.wrap_future(store.call(st.set_meta, "subscriptions", value))


async def _forget_stale(store: Store, ingest: Taker, now: list[str]) -> None:
    """Once every session has been granted its subscriptions, on the connection that
    unsubscribed the stale filters first, the broker holds only `now`."""

    # The stats come from paho's thread, or from the ingest processes' reports: there is
    # no event to await, and this ends at the first connection that works.
    while not ingest.stats.subscribed:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    await _set_subscriptions(store, now)

"""The delivery engine: one Route per webhook, each in its own task, until cancelled."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Sequence

import aiohttp

from gateway import store as st
from gateway.config import WebhookConfig
from gateway.delivery import sources
from gateway.delivery.route import Route
from gateway.delivery.sender import Outcome, Sender
from gateway.store import Store

log = logging.getLogger("gateway.delivery")


async def run(
    webhooks: Sequence[WebhookConfig],
    store: Store,
    session: aiohttp.ClientSession,
    payload_encoding: str,
    wake: asyncio.Event,
    on_result: Callable[[str, Outcome], None] | None = None,
) -> None:
    """Deliver records to every webhook until cancelled."""
    reader = st.Reader(store.path)
    routes = [
        Route(
            w,
            store,
            Sender(w, session),
            sources.for_webhook(w, payload_encoding),
            wake,
            on_result,
            reader=reader,
        )
        for w in webhooks
    ]
    store.set_packet_routes(r.cfg.name for r in routes if r.cfg.source == "packets")
    for source in ("cdrs", "events"):
        store.set_consumers(source, (r.cfg.name for r in routes if r.cfg.source == source))
    orphans = await asyncio.wrap_future(store.call(st.orphan_batches, [r.cfg.name for r in routes]))
    for name, batches, records in orphans:
        log.warning(
            "webhook %s is no longer configured: its %d unsent batch(es) of %d record(s) stay"
            " in the store and are sent if it comes back (packets it alone still needed may"
            " be released meanwhile)",
            name,
            batches,
            records,
        )
    if not routes:
        await asyncio.Event().wait()
    try:
        async with asyncio.TaskGroup() as tg:
            for r in routes:
                tg.create_task(r.run(), name=f"route:{r.cfg.name}")
    finally:
        for r in routes:
            for t in list(r.open.values()):
                t.cancel()
            if r.open:
                await asyncio.gather(*r.open.values(), return_exceptions=True)
        reader.close()

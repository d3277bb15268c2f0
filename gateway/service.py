"""run(config): the gateway's lifecycle in one asyncio process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal

from gateway import delivery, ingest
from gateway.config import Config
from gateway.store import Store

log = logging.getLogger("gateway.service")


async def run(cfg: Config) -> None:
    """Run until cancelled; on the way out commit and acknowledge what was taken."""
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    async with contextlib.AsyncExitStack() as stack:
        store = stack.enter_context(
            Store.open(
                cfg.gateway.state_dir,
                max_buffer_bytes=int(cfg.gateway.max_buffer_mb * 1024 * 1024),
                on_full=cfg.gateway.on_full,
                commit_max_packets=cfg.gateway.commit_max_packets,
            )
        )

        def wake_delivery() -> None:
            loop.call_soon_threadsafe(wake.set)

        store.on_change = wake_delivery
        http = await stack.enter_async_context(delivery.client_session())
        site = None
        if cfg.web.enabled:
            from gateway import web

            # Before ingest: a port already in use stops the gateway before it takes packets.
            site = await stack.enter_async_context(web.serve(cfg, store, http))
        taker = await stack.enter_async_context(ingest.running(cfg.mqtt, store))
        if site is not None:
            site.ingest = taker
        log.info("gateway started: store %s, %d webhook(s)", cfg.db_path, len(cfg.webhooks))
        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                delivery.run(
                    cfg.webhooks,
                    store,
                    http,
                    cfg.mqtt.payload_encoding,
                    wake,
                    on_result=site.on_result if site is not None else None,
                ),
                name="delivery",
            )
            if cfg.modem is not None:
                from gateway.modem import poller

                tg.create_task(poller.run(cfg.modem, store), name="modem")
    log.info("gateway stopped")


def main(cfg: Config) -> int:
    """Run the service with SIGTERM/SIGINT handled as a clean stop; returns the exit code."""

    async def runner() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await run(cfg)

    asyncio.run(runner())
    return 0

"""run(config): the gateway's lifecycle in one asyncio process."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Coroutine, Sequence
from typing import Any

from gateway import __version__, delivery, ingest
from gateway import store as st
from gateway.config import Config, WebhookConfig
from gateway.runtime import alerts as alerts_mod
from gateway.runtime import heartbeat, sdnotify
from gateway.runtime.supervisor import Supervisor
from gateway.store import Store, StoreSettings, commit_delay_ms, commit_delay_slow_ms
from gateway.usage import cdr, reports

log = logging.getLogger("gateway.service")


async def run(cfg: Config, sd: Supervisor | None = None) -> None:
    """Run until cancelled; on the way out commit and acknowledge what was taken."""
    loop = asyncio.get_running_loop()
    started_mono = time.monotonic()
    wake = asyncio.Event()
    sd = sd or Supervisor(cfg)  # systemd: READY/STATUS/WATCHDOG, SIGHUP reload
    async with contextlib.AsyncExitStack() as stack:
        store = stack.enter_context(
            Store.open(
                cfg.gateway.state_dir,
                StoreSettings.from_config(cfg),
                on_progress=migration_notice,
            )
        )

        def wake_delivery() -> None:
            # Already set: nothing to do, and no event-loop wake-up for every commit. A
            # route clears it before it looks for new rows, and a commit comes before
            # this check, so a route that saw it set still finds the rows.
            if not wake.is_set():
                loop.call_soon_threadsafe(wake.set)

        store.on_change = wake_delivery
        http = await stack.enter_async_context(delivery.client_session())
        site = None
        if cfg.web.enabled:
            from gateway.web import app as web

            # Before ingest: a port already in use stops the gateway before it takes packets.
            site = await stack.enter_async_context(web.serve(cfg, store, http))
        taker = await stack.enter_async_context(ingest.running(cfg.mqtt, store))
        if site is not None:
            site.ingest = taker
        log.info(
            "gateway started: store %s, %d webhook(s), commit delay %g ms%s or %d packets",
            cfg.db_path,
            len(cfg.webhooks),
            store.commit_delay_s * 1000,
            _trickle_note(store) if cfg.gateway.commit_delay_ms is None else "",
            store.commit_delay_max_packets,
        )
        _record(store, "gateway_started")
        stack.callback(_record, store, "gateway_stopped")
        # Pipeline events and the heartbeat read the store through a reader of their own.
        reader = st.Reader(store.path)
        stack.callback(reader.close)
        alerts = alerts_mod.Alerts(
            lambda: sd.cfg.webhooks,
            cfg.gateway.flap_interval_s,
            f"{cfg.mqtt.host}:{cfg.mqtt.port}",
        )

        def on_result(name: str, outcome: delivery.Outcome) -> None:
            try:
                alerts.on_result(name, outcome)
            except Exception:  # counting must never cost a batch its delivery
                log.exception("pipeline events: counting a request's result failed")
            if site is not None:
                site.on_result(name, outcome)

        def start_delivery(hooks: Sequence[WebhookConfig]) -> Coroutine[Any, Any, None]:
            if site is not None:
                site.set_webhooks(hooks)  # the dashboard shows what is delivered
            # "auto" follows the packet webhooks' windows, reloaded ones too.
            store.commit_delay_s = commit_delay_ms(cfg.gateway, hooks) / 1000
            store.commit_delay_slow_s = commit_delay_slow_ms(cfg.gateway, hooks) / 1000
            return delivery.run(
                hooks,
                store,
                http,
                cfg.mqtt.payload_encoding,
                wake,
                on_result=on_result,
            )

        async with asyncio.TaskGroup() as tg:
            tg.create_task(
                # systemd: a SIGHUP that changes the webhooks restarts delivery with them.
                sd.run_delivery(start_delivery),
                name="delivery",
            )
            if cfg.modem is not None:
                from gateway.modem import poller

                tg.create_task(poller.run(cfg.modem, store, cdr_cfg=cfg.cdr), name="modem")
                tg.create_task(cdr.run(cfg.cdr, store, wake), name="cdr")
            if cfg.reports:
                tg.create_task(reports.run_schedule(cfg, store, wake), name="reports")
            tg.create_task(sd.run(store, taker), name="systemd")  # systemd: notify, watchdog
            tg.create_task(alerts_mod.run(alerts, store, taker, reader), name="alerts")
            if cfg.gateway.heartbeat_s:
                tg.create_task(
                    heartbeat.run(cfg, lambda: sd.cfg.webhooks, store, reader, taker, started_mono),
                    name="heartbeat",
                )
    log.info("gateway stopped")


def migration_notice(status: str) -> None:
    """Store.open's on_progress: a store migration may outlast the unit's
    TimeoutStartSec (and a start killed midway rolls it back), so systemd is asked to
    wait MIGRATION_TIMEOUT_S longer, and told why."""
    notifier = sdnotify.Notifier.from_env()
    notifier.send(
        f"EXTEND_TIMEOUT_USEC={st.MIGRATION_TIMEOUT_S * 1_000_000}",
        f"STATUS={status}",
    )
    notifier.close()


def _trickle_note(store: Store) -> str:
    """How the start-up line names an "auto" commit delay, and its stretch for a trickle."""
    if store.commit_delay_slow_s <= store.commit_delay_s:
        return " (auto)"
    return f" (auto; {store.commit_delay_slow_s * 1000:g} ms for fewer than {st.TRICKLE_PACKETS})"


def _record(store: Store, kind: str) -> None:
    """gateway_started/_stopped (delivered to events webhooks); a full disk must not stop
    the gateway from starting or stopping."""
    try:
        store.run_sync(st.add_event, kind, {"version": __version__})
    except Exception as exc:
        log.warning("cannot record the %s event: %s", kind, exc)


def main(cfg: Config) -> int:
    """Run the service with SIGTERM/SIGINT handled as a clean stop; returns the exit code."""

    async def runner() -> None:
        task = asyncio.current_task()
        assert task is not None
        loop = asyncio.get_running_loop()
        sd = Supervisor(cfg)  # systemd: STOPPING=1 on the way out, SIGHUP reload
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, sd.stop, task)
        sd.add_signal_handlers(loop)
        try:
            with contextlib.suppress(asyncio.CancelledError):
                await run(cfg, sd)
        finally:
            sd.notify_stopping()

    asyncio.run(runner())
    return 0

"""The running service under systemd: readiness, status line, watchdog, reload, stop.

`service.run` hands the supervisor the open store and the started ingest. It then
- says READY=1 once the store is open and the first MQTT connection attempt is over;
- keeps a short STATUS= line (MQTT, stored backlog, last delivery, store problems);
- pings WATCHDOG=1 every WATCHDOG_USEC/2 from an asyncio task, and only while the parts
  make progress: a blocked event loop, a store writer that does not answer or a dead
  MQTT network thread stop the pings, and systemd restarts the gateway;
- on SIGHUP re-reads the config file (RELOADING=1 … READY=1): the log level and the
  webhooks take effect (delivery restarts with the new list; ingest keeps running), a
  bad file is logged and the running configuration kept;
- says STOPPING=1 when asked to stop.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import signal
import sqlite3
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from gateway import config as config_mod
from gateway import logs
from gateway import store as store_mod
from gateway.config import Config, WebhookConfig
from gateway.errors import ConfigError, GatewayError
from gateway.ingest import Taker
from gateway.runtime.sdnotify import Notifier, monotonic_usec, watchdog_interval_s
from gateway.store import Store

log = logging.getLogger("gateway.supervisor")

STATUS_INTERVAL_S = 5.0
# READY=1 goes out after this even if the broker never answers: ingest keeps retrying,
# and a gateway that waits for its broker must not be killed by TimeoutStartSec.
FIRST_ATTEMPT_TIMEOUT_S = 20.0
# The store writer may take this long for one answer before the watchdog stops pinging.
MIN_STALL_S = 10.0
# Sections a reload cannot change in a running gateway.
RESTART_SECTIONS = ("gateway", "mqtt", "modem", "cdr", "reports", "web")

DeliveryStarter = Callable[[Sequence[WebhookConfig]], Coroutine[Any, Any, None]]


@dataclass(frozen=True, slots=True)
class Figures:
    """What the status line shows from the store: packets stored, last delivery."""

    stored: int = 0
    last_delivery_ns: int = 0


def _figures(conn: sqlite3.Connection) -> Figures:
    # Packets are stored and released in id order, so the unreleased ones are one id
    # range: a few index lookups instead of a COUNT(*) over the whole backlog.
    lo, hi = store_mod.packet_span(conn)
    last = conn.execute("SELECT MAX(last_success_ns) FROM webhook_stats").fetchone()[0]
    return Figures(hi - lo + 1 if hi else 0, int(last or 0))


def _load(path: Path | None) -> Config:
    if path is None:
        raise ConfigError(["the gateway was started without a config file"])
    return config_mod.load(path)


class Supervisor:
    """systemd's view of one running gateway; does nothing visible without systemd."""

    def __init__(self, cfg: Config, notifier: Notifier | None = None) -> None:
        self.cfg = cfg
        self.notifier = notifier if notifier is not None else Notifier.from_env()
        self.watchdog_s = watchdog_interval_s()
        self.stall_s = max(self.watchdog_s or 0.0, MIN_STALL_S)
        self.stopping = False
        self._store: Store | None = None
        self._ingest: Taker | None = None
        self._figures = Figures()
        self._probe: concurrent.futures.Future[Figures] | None = None
        self._probe_started = 0.0
        self._hooks_changed = asyncio.Event()
        self._reload_task: asyncio.Task[None] | None = None
        self._reload_again = False

    # -- signals (installed by service.main) ------------------------------------------

    def add_signal_handlers(self, loop: asyncio.AbstractEventLoop) -> None:
        """SIGHUP reloads; with GATEWAY_TEST_HOOKS=1, SIGUSR2 blocks the event loop."""
        loop.add_signal_handler(signal.SIGHUP, self.request_reload)
        if os.environ.get("GATEWAY_TEST_HOOKS") == "1":
            loop.add_signal_handler(signal.SIGUSR2, self._freeze_loop)

    def stop(self, task: asyncio.Task[Any]) -> None:
        """SIGTERM/SIGINT: STOPPING=1, then cancel the service (it drains and flushes)."""
        self.notify_stopping()
        task.cancel()

    def notify_stopping(self) -> None:
        if not self.stopping:
            self.stopping = True
            self.notifier.send("STOPPING=1", "STATUS=stopping")
            log.info("stopping: committing and acknowledging what was taken")

    def _freeze_loop(self) -> None:
        seconds = float(os.environ.get("GATEWAY_TEST_FREEZE_S", "3"))
        log.warning("test hook: blocking the event loop", extra={"seconds": seconds})
        time.sleep(seconds)  # on purpose: the watchdog pings must stop meanwhile
        log.warning("test hook: event loop runs again")

    # -- the running service ----------------------------------------------------------

    async def run(self, store: Store, ingest: Taker) -> None:
        """READY=1 after the first MQTT attempt, then status and watchdog until cancelled."""
        self._store, self._ingest = store, ingest
        async with asyncio.TaskGroup() as tg:
            if self.watchdog_s:
                tg.create_task(self._watchdog(self.watchdog_s / 2), name="watchdog")
            deadline = time.monotonic() + FIRST_ATTEMPT_TIMEOUT_S
            # A threading.Event set by paho's thread: polled, so that a stop cancels it.
            while not ingest.first_attempt.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
                await asyncio.sleep(0.05)
            self._figures = await asyncio.wrap_future(store.call(_figures))
            line = self.status_line()
            self.notifier.send("READY=1", f"STATUS={line}")
            log.info("ready: %s", line)
            tg.create_task(self._status_loop(), name="status")

    async def _status_loop(self) -> None:
        while True:
            await asyncio.sleep(STATUS_INTERVAL_S)
            self._start_probe()
            logs.flush_repeats()
            self.notifier.send(f"STATUS={self.status_line()}")

    async def _watchdog(self, interval_s: float) -> None:
        # An asyncio task on purpose: when the event loop is blocked, the pings stop.
        while True:
            self._start_probe()
            problem = self.problem()
            if problem:
                log.error("watchdog: not telling systemd all is well: %s", problem)
            else:
                self.notifier.send("WATCHDOG=1")
            await asyncio.sleep(interval_s)

    def _start_probe(self) -> None:
        """Ask the store writer for fresh figures, unless the last question is still open."""
        if self._store is None:
            return
        probe = self._probe
        if probe is not None:
            if not probe.done():
                return
            if probe.exception() is None:
                self._figures = probe.result()
        self._probe = self._store.call(_figures)
        self._probe_started = time.monotonic()

    def problem(self) -> str:
        """Why the gateway is stuck, or "" when it makes progress or waits for a good reason."""
        probe = self._probe
        stalled = time.monotonic() - self._probe_started > self.stall_s
        if probe is not None and not probe.done() and stalled:
            return f"the store writer has not answered for more than {self.stall_s:g} s"
        # The supervisor runs only while ingest does: ingest stops after it on the way out.
        if self._ingest is not None and not self._ingest.alive:
            return "the MQTT network thread has ended"
        # A broker that is down, a receiver that fails or a full disk are waited out:
        # a restart would not help, and the status line says what is going on.
        return ""

    def status_line(self) -> str:
        """One short line for `systemctl status`."""
        parts = []
        if self._ingest is not None:
            stats = self._ingest.stats
            if stats.connected:
                parts.append("mqtt connected")
            else:
                parts.append(f"mqtt not connected ({stats.last_error or 'connecting'})")
        parts.append(f"backlog {self._figures.stored}")
        if self._figures.last_delivery_ns:
            at = time.strftime("%H:%M:%SZ", time.gmtime(self._figures.last_delivery_ns / 1e9))
            parts.append(f"last delivery {at}")
        elif not self.cfg.webhooks:
            parts.append("no webhooks")
        store = self._store
        if store is not None:
            if store.write_error:
                parts.append(f"NOT ACKNOWLEDGING: store write failed ({store.write_error})")
            elif store.paused:
                parts.append(f"NOT ACKNOWLEDGING: {store.paused}")
            elif store.full and store.on_full == "backpressure":
                parts.append("NOT ACKNOWLEDGING: buffer full (max_buffer_mb)")
        return ", ".join(parts)

    # -- delivery, restartable --------------------------------------------------------

    async def run_delivery(self, start: DeliveryStarter) -> None:
        """Run `start(webhooks)`; restart it when a reload changes the webhooks."""
        while True:
            self._hooks_changed.clear()
            task = asyncio.create_task(start(self.cfg.webhooks), name="delivery")
            changed = asyncio.create_task(self._hooks_changed.wait(), name="webhooks-changed")
            try:
                await asyncio.wait({task, changed}, return_when=asyncio.FIRST_COMPLETED)
            except asyncio.CancelledError:
                task.cancel()
                changed.cancel()
                await asyncio.wait({task, changed})
                raise
            changed.cancel()
            if task.done():
                await task  # delivery's own error, if any, ends the service
                return
            # Batches in flight are in the store with their webhook-ids: the new
            # delivery resends them with the same ids.
            task.cancel()
            await asyncio.wait({task})
            if not task.cancelled() and task.exception() is not None:
                await task
            names = ", ".join(w.name for w in self.cfg.webhooks) or "none"
            log.info("delivery restarted with the reloaded webhooks: %s", names)

    # -- reload -----------------------------------------------------------------------

    def request_reload(self) -> None:
        """SIGHUP: reload now, or once more after the reload in progress."""
        if self._reload_task is not None and not self._reload_task.done():
            self._reload_again = True
            return
        self._reload_task = asyncio.get_running_loop().create_task(
            self._reload_until_settled(), name="reload"
        )

    async def _reload_until_settled(self) -> None:
        while True:
            self._reload_again = False
            await self.reload()
            if not self._reload_again:
                return

    async def reload(self) -> None:
        """Re-read the config file and apply what can change while running."""
        self.notifier.send(
            "RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}", "STATUS=reloading configuration"
        )
        outcome = "reload failed, running configuration kept"
        try:
            new = await asyncio.to_thread(_load, self.cfg.path)
            outcome = self.apply(new)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload rejected, running configuration kept: %s", problem)  # noqa: TRY400
        except (GatewayError, OSError) as exc:
            log.error("reload failed, running configuration kept: %s", exc)  # noqa: TRY400
        finally:
            self.notifier.send("READY=1", f"STATUS={outcome}; {self.status_line()}")

    def apply(self, new: Config) -> str:
        """Take the log level and webhooks of `new`; name what needs a restart."""
        old = self.cfg
        logs.add_secrets(logs.secret_values(new))
        logs.apply_config_level(new.gateway.log_level)
        later = [
            name
            for name in RESTART_SECTIONS
            if getattr(new, name)
            != (
                replace(old.gateway, log_level=new.gateway.log_level)
                if name == "gateway"
                else getattr(old, name)
            )
        ]
        self.cfg = replace(
            old,
            webhooks=new.webhooks,
            gateway=replace(old.gateway, log_level=new.gateway.log_level),
        )
        if later:
            log.warning("reload: changes to [%s] take effect after a restart", "], [".join(later))
        if new.webhooks != old.webhooks:
            self._hooks_changed.set()
            return "configuration reloaded, webhooks changed"
        log.info("configuration reloaded; webhooks unchanged")
        return "configuration reloaded"

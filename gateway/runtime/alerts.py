"""Pipeline events: the broker connection lost and back, a webhook failing and
recovered, a webhook lagging and caught up. They go to the events table like every
event, and so to events webhooks.

Nothing here runs on the packet path. paho's thread only counts disconnections in the
session's IngestStats (an ingest process sends its stats to the gateway process, which
sees them as its own); delivery's per-attempt callback only counts failures in memory.
One asyncio task looks at both every TICK_S and writes the events.

Each bad/good pair of kinds is rate-limited by a Pair: at most one event of each kind
per `gateway.flap_interval_s`. A change that cannot be told yet is told once the
interval is over, if it still holds, so the last event of a pair always says how things
are; flaps in between are not told one by one but counted (`suppressed`) in the next
event of the pair.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from gateway import store as st
from gateway.config import WebhookConfig
from gateway.delivery import formats
from gateway.delivery.sender import Outcome
from gateway.errors import GatewayError
from gateway.ingest import Taker
from gateway.store import Store

log = logging.getLogger("gateway.alerts")

TICK_S = 0.5
# How often the lag of webhooks with lag_alert_s is read (a few lookups each).
LAG_CHECK_S = 1.0
# meta: webhooks told failing or lagging (name -> since, Unix ns), so that a restart
# neither repeats the event nor forgets to say when it is over.
META_KEY = "pipeline_alerts"

Event = tuple[str, dict[str, Any]]


def iso(ns: int) -> str:
    return formats.iso_ms(ns) if ns else ""


@dataclass(slots=True)
class Pair:
    """A bad/good pair of event kinds with at most one event of each kind per
    `interval_s` (monotonic seconds)."""

    bad_kind: str
    good_kind: str
    interval_s: float
    bad: bool = False  # how things are
    told_bad: bool = False  # what the last event said
    suppressed: int = 0  # flaps (bad and good again) not told
    data: dict[str, Any] = field(default_factory=dict)
    sent: dict[str, float] = field(default_factory=dict)

    def set(self, bad: bool, data: dict[str, Any], now: float) -> list[Event]:
        """Things changed (or not): the events to raise now."""
        if bad != self.bad:
            self.bad = bad
            self.data = data
            if bad == self.told_bad:
                self.suppressed += 1
        return self.poll(now)

    def poll(self, now: float) -> list[Event]:
        """The event held back by the rate limit, once it may go and still holds."""
        if self.bad == self.told_bad:
            return []
        kind = self.bad_kind if self.bad else self.good_kind
        last = self.sent.get(kind)
        if last is not None and now - last < self.interval_s:
            return []
        self.sent[kind] = now
        self.told_bad = self.bad
        data = {**self.data, "suppressed": self.suppressed}
        self.suppressed = 0
        return [(kind, data)]


@dataclass(slots=True)
class _Hook:
    failing: Pair
    lagging: Pair
    failures: int = 0  # failed attempts in a row
    first_failure_ns: int = 0
    last_error: str = ""
    lagging_since_ns: int = 0


class Alerts:
    """The pipeline's state as events; `webhooks` gives the current webhook list (a
    reload may change it)."""

    def __init__(
        self,
        webhooks: Callable[[], Sequence[WebhookConfig]],
        flap_interval_s: float,
        broker: str,
    ) -> None:
        self.webhooks = webhooks
        self.interval_s = flap_interval_s
        self.broker = broker
        self.pending: list[Event] = []
        self.hooks: dict[str, _Hook] = {}
        self.broker_pair = Pair("broker_disconnected", "broker_connected", flap_interval_s)
        # None until the first connection attempt is over: the first connection raises
        # nothing (gateway_started says the gateway is there); a first attempt that
        # fails raises broker_disconnected.
        self._up: bool | None = None
        self._down_since_ns = 0
        self._disconnects = 0
        self._started_ns = time.time_ns()
        self._saved = ""

    # -- webhooks -------------------------------------------------------------------------

    def _hook(self, name: str) -> _Hook:
        h = self.hooks.get(name)
        if h is None:
            h = _Hook(
                Pair("webhook_failing", "webhook_recovered", self.interval_s),
                Pair("webhook_lagging", "webhook_caught_up", self.interval_s),
            )
            self.hooks[name] = h
        return h

    def _config(self, name: str) -> WebhookConfig | None:
        return next((w for w in self.webhooks() if w.name == name), None)

    def on_result(self, name: str, outcome: Outcome) -> None:
        """Delivery's callback after every attempt (event loop): counts, nothing more."""
        cfg = self._config(name)
        if cfg is None or not cfg.failing_after:
            return
        h = self._hook(name)
        now = time.monotonic()
        if outcome.ok:
            if h.failing.bad:
                data = {
                    "webhook": name,
                    "failed_attempts": h.failures,
                    "failing_s": _seconds(time.time_ns() - h.first_failure_ns)
                    if h.first_failure_ns
                    else None,
                }
                self.pending += h.failing.set(False, data, now)
            h.failures = 0
            h.first_failure_ns = 0
            return
        if not h.failures:
            h.first_failure_ns = time.time_ns()
        h.failures += 1
        h.last_error = outcome.error or f"HTTP {outcome.status}"
        if h.failures >= cfg.failing_after and not h.failing.bad:
            data = {
                "webhook": name,
                "attempts": h.failures,
                "status": outcome.status,
                "error": h.last_error[:300],
                "since": iso(h.first_failure_ns),
            }
            self.pending += h.failing.set(True, data, now)

    def on_lags(self, lags: dict[str, float], backlogs: dict[str, int]) -> None:
        """The lag of each webhook with lag_alert_s: webhook_lagging once it is past
        lag_alert_s, webhook_caught_up once it is back under half of it (hysteresis: a
        lag that hovers at the limit raises no more events)."""
        now = time.monotonic()
        for name, lag in lags.items():
            cfg = self._config(name)
            if cfg is None or not cfg.lag_alert_s:
                continue
            h = self._hook(name)
            if not h.lagging.bad and lag >= cfg.lag_alert_s:
                h.lagging_since_ns = time.time_ns() - int(lag * 1e9)
                data = {
                    "webhook": name,
                    "oldest_pending_s": lag,
                    "lag_alert_s": cfg.lag_alert_s,
                    "backlog": backlogs.get(name, 0),
                }
                self.pending += h.lagging.set(True, data, now)
            elif h.lagging.bad and lag <= cfg.lag_alert_s / 2:
                data = {
                    "webhook": name,
                    "oldest_pending_s": lag,
                    "lag_alert_s": cfg.lag_alert_s,
                    "lagging_s": _seconds(time.time_ns() - h.lagging_since_ns)
                    if h.lagging_since_ns
                    else None,
                }
                self.pending += h.lagging.set(False, data, now)

    def lag_watched(self) -> list[str]:
        return [w.name for w in self.webhooks() if w.lag_alert_s]

    # -- broker ---------------------------------------------------------------------------

    def on_ingest(self, taker: Taker) -> None:
        """Compare the ingest's connection with what was seen last (every TICK_S). A
        connection lost and back between two looks still counts (`disconnects`)."""
        stats = taker.stats
        now = time.monotonic()
        lost = stats.disconnects > self._disconnects
        self._disconnects = stats.disconnects
        if self._up is None:
            if stats.connected:
                self._up = True
            elif taker.first_attempt.is_set():
                self._up = False
                self._down_since_ns = self._started_ns
                self._broker_down(stats.last_error or "cannot connect", now)
            return
        if self._up and (lost or not stats.connected):
            self._down_since_ns = stats.last_disconnect_ns if lost else time.time_ns()
            reason = stats.last_disconnect_reason if lost else ""
            self._broker_down(reason or stats.last_error or "connection lost", now)
            self._up = False
        if not self._up and stats.connected:
            down_ns = max(0, (stats.last_connect_ns or time.time_ns()) - self._down_since_ns)
            data = {"broker": self.broker, "down_s": _seconds(down_ns)}
            self.pending += self.broker_pair.set(False, data, now)
            self._up = True

    def _broker_down(self, reason: str, now: float) -> None:
        data = {"broker": self.broker, "reason": reason[:300], "since": iso(self._down_since_ns)}
        self.pending += self.broker_pair.set(True, data, now)

    # -- persisted state ------------------------------------------------------------------

    def poll(self) -> list[Event]:
        """Events due now (raised, or held back by the rate limit until now)."""
        now = time.monotonic()
        out, self.pending = self.pending, []
        out += self.broker_pair.poll(now)
        for h in self.hooks.values():
            out += h.failing.poll(now) + h.lagging.poll(now)
        return out

    def state(self) -> str:
        """What META_KEY keeps: the webhooks last told failing or lagging."""
        return orjson.dumps(
            {
                "webhook_failing": {
                    n: h.first_failure_ns for n, h in self.hooks.items() if h.failing.told_bad
                },
                "webhook_lagging": {
                    n: h.lagging_since_ns for n, h in self.hooks.items() if h.lagging.told_bad
                },
            }
        ).decode()

    def restore(self, text: str) -> None:
        """Take up the state an earlier run left: a webhook told failing stays so until
        a request works (webhook_recovered), one told lagging until its lag is back
        under half the limit (webhook_caught_up); neither is raised again meanwhile."""
        try:
            saved = orjson.loads(text)
            failing = dict(saved.get("webhook_failing", {}))
            lagging = dict(saved.get("webhook_lagging", {}))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            log.warning("the stored pipeline alert state is damaged; starting afresh")
            return
        for name, since in failing.items():
            cfg = self._config(str(name))
            if cfg is None or not cfg.failing_after:
                continue
            h = self._hook(str(name))
            h.failing.bad = h.failing.told_bad = True
            h.failures = cfg.failing_after
            h.first_failure_ns = int(since) if isinstance(since, int) else 0
        for name, since in lagging.items():
            cfg = self._config(str(name))
            if cfg is None or not cfg.lag_alert_s:
                continue
            h = self._hook(str(name))
            h.lagging.bad = h.lagging.told_bad = True
            h.lagging_since_ns = int(since) if isinstance(since, int) else 0
        self._saved = self.state()

    def changed_state(self) -> str | None:
        """The state to save, when it differs from the one saved last."""
        now = self.state()
        if now == self._saved:
            return None
        self._saved = now
        return now


def _seconds(ns: int) -> float:
    return round(max(0, ns) / 1e9, 1)


async def run(alerts: Alerts, store: Store, taker: Taker, reader: st.Reader) -> None:
    """Look at the ingest and the webhooks every TICK_S and record what changed, until
    cancelled. A store that cannot write (disk full) loses these events, not the gateway."""
    try:
        alerts.restore(await asyncio.wrap_future(store.call(st.get_meta, META_KEY, "{}")))
    except (sqlite3.Error, GatewayError) as exc:
        log.warning("cannot read the pipeline alert state: %s", exc)
    next_lag = 0.0
    while True:
        try:
            next_lag = await _tick(alerts, store, taker, reader, next_lag)
        except Exception:
            # A fault of the gateway's own: it must not stop ingest or delivery.
            log.exception("pipeline events: looking at the pipeline failed; trying again")
            await asyncio.sleep(5.0)
        await asyncio.sleep(TICK_S)


async def _tick(
    alerts: Alerts, store: Store, taker: Taker, reader: st.Reader, next_lag: float
) -> float:
    """One look at the ingest and the webhooks; returns when to read the lag next."""
    alerts.on_ingest(taker)
    watched = alerts.lag_watched()
    if watched and time.monotonic() >= next_lag:
        next_lag = time.monotonic() + LAG_CHECK_S
        try:
            lags, backlogs = await reader.run(_lags, watched, time.time_ns())
        except (sqlite3.Error, GatewayError) as exc:
            log.warning("cannot read the delivery lag: %s", exc)
        else:
            alerts.on_lags(lags, backlogs)
    for kind, data in alerts.poll():
        log.warning("%s: %s", kind, orjson.dumps(data).decode())
        await _record(store, kind, data)
    state = alerts.changed_state()
    if state is not None:
        await _record_state(store, state)
    return next_lag


def _lags(
    conn: sqlite3.Connection, names: list[str], now_ns: int
) -> tuple[dict[str, float], dict[str, int]]:
    return st.lags(conn, names, now_ns), {n: st.backlog(conn, n) for n in names}


async def _record(store: Store, kind: str, data: dict[str, Any]) -> None:
    try:
        await asyncio.wrap_future(store.call(st.add_event, kind, data))
    except (sqlite3.Error, GatewayError) as exc:
        log.warning("cannot record the %s event: %s", kind, exc)


def _save(conn: sqlite3.Connection, value: str) -> None:
    with st.transaction(conn):
        st.set_meta(conn, META_KEY, value)


async def _record_state(store: Store, value: str) -> None:
    try:
        await asyncio.wrap_future(store.call(_save, value))
    except (sqlite3.Error, GatewayError) as exc:
        log.warning("cannot save the pipeline alert state: %s", exc)

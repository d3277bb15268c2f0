"""The fleet heartbeat: every `gateway.heartbeat_s` a `gateway_heartbeat` event with what
an operator of many sites wants on one screen, delivered by the events webhooks like
every event. A receiver can watch a fleet without logging in to each gateway, and a site
whose heartbeats stop is a site to look at.

The first goes once the first MQTT connection attempt is over (so that it says whether
the broker is reachable), the next every heartbeat_s. A heartbeat supersedes the earlier
ones in the events table (store.add_heartbeat).
"""

from __future__ import annotations

import asyncio
import logging
import os
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway import __version__
from gateway import store as st
from gateway.config import Config, WebhookConfig
from gateway.errors import GatewayError
from gateway.ingest import IngestStats, Taker
from gateway.store import Store
from gateway.usage import budget

log = logging.getLogger("gateway.heartbeat")

# The first heartbeat waits at most this long for the first MQTT connection attempt.
FIRST_WAIT_S = 20.0


@dataclass(frozen=True, slots=True)
class WebhookFigures:
    name: str
    source: str
    backlog: int
    oldest_pending_s: float
    dead_letters: int
    disabled: bool


@dataclass(frozen=True, slots=True)
class HeartbeatParts:
    """What a heartbeat is made of, gathered by `parts`."""

    version: str
    uptime_s: float
    mqtt: IngestStats
    webhooks: Sequence[WebhookFigures]
    dead_letters: int
    free_bytes: int | None
    # The modem poller's state (None without a [modem] section): state, info.
    modem: dict[str, Any] | None
    # The billing cycle's data use (usage.budget.cycle_snapshot; None without [modem]).
    data_cycle: dict[str, Any] | None = None


def build(p: HeartbeatParts) -> dict[str, Any]:
    """The heartbeat event's data from its parts. Every field of a heartbeat is added
    here, and only from a value that was read: no placeholders."""
    data: dict[str, Any] = {
        "version": p.version,
        "uptime_s": round(p.uptime_s, 1),
        "mqtt": {"connected": p.mqtt.connected, "last_error": p.mqtt.last_error},
        "webhooks": {
            w.name: {
                "source": w.source,
                "backlog": w.backlog,
                "oldest_pending_s": w.oldest_pending_s,
                "dead_letters": w.dead_letters,
                "disabled": w.disabled,
            }
            for w in p.webhooks
        },
        "dead_letters": p.dead_letters,
    }
    if p.free_bytes is not None:
        data["disk_free_bytes"] = p.free_bytes
    if p.modem is not None:
        # Imported with [modem] only: a gateway without one never loads the modem code.
        from gateway.modem import radio

        info = p.modem.get("info") or {}
        data["modem"] = {
            "state": p.modem.get("state", ""),
            "registration": info.get("registration", ""),
            "operator": info.get("operator", ""),
            "csq": info.get("csq"),
            "signal_dbm": info.get("signal_dbm"),
            "access_technology": info.get("access_technology"),
            "rsrp_dbm": info.get("rsrp_dbm"),
            "rsrq_db": info.get("rsrq_db"),
            "sinr_db": info.get("sinr_db"),
            "signal_quality": radio.signal_quality(info.get("rsrp_dbm"), info.get("sinr_db")),
        }
    if p.data_cycle is not None:
        data["data_cycle"] = {
            k: p.data_cycle.get(k)
            for k in ("used_bytes", "budget_bytes", "percent", "cycle_start", "cycle_end")
        }
    return data


def _store_figures(
    conn: sqlite3.Connection, hooks: Sequence[WebhookConfig], now_ns: int
) -> tuple[list[WebhookFigures], int]:
    dead = st.dead_letter_counts(conn)
    disabled = dict(conn.execute("SELECT name, disabled FROM webhook_stats"))
    figures = [
        WebhookFigures(
            w.name,
            w.source,
            st.backlog(conn, w.name),
            st.oldest_pending_s(conn, w.name, now_ns),
            dead.get(w.name, 0),
            bool(disabled.get(w.name, 0)),
        )
        for w in hooks
    ]
    total = int(conn.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0])
    return figures, total


def _free_bytes(state_dir: Path) -> int | None:
    try:
        vfs = os.statvfs(state_dir)
    except OSError:
        return None
    return vfs.f_bavail * vfs.f_frsize


async def parts(
    cfg: Config,
    hooks: Sequence[WebhookConfig],
    reader: st.Reader,
    taker: Taker,
    started_mono: float,
) -> HeartbeatParts:
    """Gather a heartbeat's parts: the store through the read-only reader, the rest
    from memory."""
    now_ns = time.time_ns()
    figures, dead = await reader.run(_store_figures, list(hooks), now_ns)
    modem = data_cycle = None
    if cfg.modem is not None:
        from gateway.modem import poller

        modem = poller.STATE.as_dict()
        data_cycle = await reader.run(budget.cycle_snapshot, cfg.modem, now_ns)
    return HeartbeatParts(
        version=__version__,
        uptime_s=time.monotonic() - started_mono,
        mqtt=taker.stats,
        webhooks=figures,
        dead_letters=dead,
        free_bytes=await asyncio.to_thread(_free_bytes, cfg.gateway.state_dir),
        modem=modem,
        data_cycle=data_cycle,
    )


async def run(
    cfg: Config,
    hooks: Callable[[], Sequence[WebhookConfig]],
    store: Store,
    reader: st.Reader,
    taker: Taker,
    started_mono: float,
) -> None:
    """Record a heartbeat every cfg.gateway.heartbeat_s until cancelled."""
    interval = cfg.gateway.heartbeat_s
    deadline = time.monotonic() + FIRST_WAIT_S
    # A threading.Event set by paho's thread: polled, so that a stop cancels the wait.
    while not taker.first_attempt.is_set() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)
    due = time.monotonic()
    while True:
        try:
            data = build(await parts(cfg, hooks(), reader, taker, started_mono))
            await asyncio.wrap_future(store.call(st.add_heartbeat, data))
        except (sqlite3.Error, GatewayError, OSError) as exc:
            log.warning("cannot record a heartbeat: %s", exc)
        except Exception:
            # A fault of the gateway's own: it must not stop ingest or delivery.
            log.exception("cannot build a heartbeat")
        due += interval
        await asyncio.sleep(max(0.0, due - time.monotonic()))

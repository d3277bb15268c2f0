"""Delivery lag and pipeline events end to end: a real mosquitto (stopped and started on
its port), real aiohttp receivers switched between 503 and 200, the real store and web
server; the events reach a real events receiver through an events webhook."""

from __future__ import annotations

import asyncio
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from firmware_sim.modem import ModemEmulator
from gateway import __version__, config
from gateway.errors import ConfigError
from gateway.runtime.alerts import Alerts, Pair
from gateway.web import status
from tests.conftest import (
    ROOT,
    Broker,
    db_rows,
    free_port,
    gateway_cmd,
    publish,
    register_session,
    until,
    wait_for,
    wait_port,
    write_config,
)
from tests.receiver import Receiver, Reply
from tests.test_data_budget import status_of

TOPIC = "devices/8981100000000000012/up"


def events(rx: Receiver, *kinds: str) -> list[dict[str, Any]]:
    """The events an envelope events webhook delivered, oldest first (of `kinds`)."""
    out = [r.json["event"] for r in rx.ok()]
    return [e for e in out if not kinds or e["event"] in kinds]


def kinds(rx: Receiver) -> list[str]:
    return [e["event"] for e in events(rx)]


def events_hook(url: str) -> str:
    return f"""
[[webhooks]]
name = "ops"
url = "{url}"
source = "events"
format = "envelope"
"""


def lag_of(db_cfg: config.Config, name: str) -> float:
    row = next(w for w in status.read(db_cfg.db_path, db_cfg)["webhooks"] if w["name"] == name)
    return float(row["oldest_pending_s"])


def metric(text: str, name: str, **labels: str) -> float:
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    raise AssertionError(f"{want} not in /metrics")


async def test_lag_grows_during_an_outage_and_falls_after_with_its_events_and_a_heartbeat(
    mosquitto: Broker, tmp_path: Path, run_gateway
) -> None:
    rx, ev = Receiver().start(), Receiver().start()
    down = True
    rx.behaviour = lambda n, r: Reply(503, text="maintenance") if down else Reply()
    listen = f"127.0.0.1:{free_port()}"
    try:
        path = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            gateway_extra="max_buffer_mb = 0.05\nheartbeat_s = 10\nflap_interval_s = 1",
            web=f'listen = "{listen}"',
            extra=f"""
[[webhooks]]
name = "cloud"
url = "{rx.url}"
batch = {{ window_ms = 200, max_items = 10 }}
lag_alert_s = 2
failing_after = 3
retry = {{ backoff_min_s = 0.2, backoff_max_s = 0.4 }}
"""
            + events_hook(ev.url),
        )
        cfg = config.load(path)
        register_session(mosquitto.port, cfg.mqtt.client_id, cfg.mqtt.topics[0])
        await run_gateway(cfg)

        # The first heartbeat goes once the first connection attempt is over.
        await until(lambda: events(ev, "gateway_heartbeat"), what="the first heartbeat")
        beat = events(ev, "gateway_heartbeat")[0]["data"]
        assert beat["version"] == __version__
        assert beat["uptime_s"] >= 0
        assert beat["mqtt"]["connected"] is True
        assert beat["webhooks"]["cloud"] == {
            "source": "packets",
            "backlog": 0,
            "oldest_pending_s": 0.0,
            "dead_letters": 0,
            "disabled": False,
        }
        assert set(beat["webhooks"]) == {"cloud", "ops"}
        assert beat["dead_letters"] == 0
        assert beat["disk_free_bytes"] > 0
        assert "modem" not in beat  # no [modem] section: nothing made up
        assert lag_of(cfg, "cloud") == 0.0

        # 45 packets of 1 kB fill the 52 kB buffer past 80 % while the receiver is down.
        sent_at = time.time()
        await asyncio.to_thread(
            publish, mosquitto.port, [(TOPIC, bytes([65 + i % 26]) * 1000) for i in range(45)]
        )
        samples: list[tuple[float, float]] = []

        def sample() -> float:
            lag = lag_of(cfg, "cloud")
            samples.append((time.time(), lag))
            return lag

        await until(lambda: sample() >= 1.0, what="a lag of 1 s", interval=0.25)
        await until(lambda: sample() >= 2.5, what="a lag of 2.5 s", interval=0.25)
        # The age of the oldest packet, which was published just before `sent_at`.
        assert samples[-1][1] <= time.time() - sent_at + 0.5
        assert [lag for _, lag in samples] == sorted(lag for _, lag in samples)
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://{listen}/metrics") as resp:
                text = await resp.text()
            async with http.get(f"http://{listen}/api/status") as resp:
                api = await resp.json()
        assert metric(text, "gateway_webhook_oldest_pending_seconds", webhook="cloud") >= 2.5
        assert metric(text, "gateway_webhook_oldest_pending_seconds", webhook="ops") < 2
        row = next(w for w in api["webhooks"] if w["name"] == "cloud")
        assert row["oldest_pending_s"] >= 2.5
        assert status.behind_text(row["oldest_pending_s"]).startswith("behind by ")
        out = await asyncio.to_thread(
            subprocess.run,
            gateway_cmd("status", "-c", str(path)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        line = next(x for x in out.stdout.splitlines() if x.startswith("cloud "))
        assert re.search(r"behind by \d+ s", line), line
        await until(
            lambda: {"buffer_high", "webhook_failing", "webhook_lagging"} <= set(kinds(ev)),
            what="buffer_high, webhook_failing and webhook_lagging",
        )
        (failing,) = events(ev, "webhook_failing")
        assert failing["data"]["webhook"] == "cloud"
        assert failing["data"]["attempts"] == 3
        assert failing["data"]["status"] == 503
        (lagging,) = events(ev, "webhook_lagging")
        assert lagging["data"]["webhook"] == "cloud"
        assert lagging["data"]["oldest_pending_s"] >= 2
        assert lagging["data"]["backlog"] == 45
        (high,) = events(ev, "buffer_high")
        assert high["data"]["bytes"] >= 0.8 * high["data"]["max_bytes"]

        down = False
        await until(lambda: len(rx.delivered()) == 45, what="the backlog delivered")
        await until(lambda: sample() == 0.0, what="the lag back at 0", interval=0.25)
        await until(
            lambda: {"buffer_ok", "webhook_recovered", "webhook_caught_up"} <= set(kinds(ev)),
            what="buffer_ok, webhook_recovered and webhook_caught_up",
        )
        (recovered,) = events(ev, "webhook_recovered")
        assert recovered["data"]["webhook"] == "cloud"
        assert recovered["data"]["failed_attempts"] >= 3
        assert recovered["data"]["failing_s"] > 0
        (caught_up,) = events(ev, "webhook_caught_up")
        assert caught_up["data"]["oldest_pending_s"] <= 1
        assert caught_up["data"]["lagging_s"] > 0
        order = kinds(ev)
        assert order.index("webhook_failing") < order.index("webhook_recovered")
        assert order.index("webhook_lagging") < order.index("webhook_caught_up")
        assert order.index("buffer_high") < order.index("buffer_ok")
        # Printed for the record (pytest -s): the lag during the outage and after.
        for at, lag in samples:
            print(f"lag {time.strftime('%H:%M:%S', time.gmtime(at))}.{int(at % 1 * 10)} {lag} s")
        for e in events(ev):
            print("event", e["Timestamp"], e["event"], e["data"])
    finally:
        rx.stop()
        ev.stop()


async def test_a_broker_restart_raises_disconnected_then_connected_and_flaps_are_rate_limited(
    mosquitto: Broker, tmp_path: Path, run_gateway
) -> None:
    ev = Receiver().start()
    try:
        path = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            gateway_extra="flap_interval_s = 5",
            extra=events_hook(ev.url),
        )
        cfg = config.load(path)
        register_session(mosquitto.port, cfg.mqtt.client_id, cfg.mqtt.topics[0])
        await run_gateway(cfg)
        db = cfg.db_path
        sent = 0

        async def connected_again() -> None:
            # A packet stored proves the gateway is connected and subscribed again.
            nonlocal sent
            sent += 1
            await asyncio.to_thread(publish, mosquitto.port, [(TOPIC, b"x")])
            await until(
                lambda: db.exists() and db_rows(db, "SELECT COUNT(*) FROM packets")[0][0] == sent,
                what=f"packet {sent} stored",
            )

        await connected_again()
        await until(lambda: "gateway_started" in kinds(ev), what="gateway_started")

        stopped = time.time()
        await asyncio.to_thread(mosquitto.stop)
        await until(lambda: "broker_disconnected" in kinds(ev), what="broker_disconnected")
        await asyncio.sleep(1.0)  # down a while longer: down_s must cover it
        await asyncio.to_thread(mosquitto.start)
        await until(lambda: "broker_connected" in kinds(ev), what="broker_connected")
        back = time.time()
        (gone,) = events(ev, "broker_disconnected")
        (came,) = events(ev, "broker_connected")
        assert gone["data"]["broker"] == f"127.0.0.1:{mosquitto.port}"
        assert gone["data"]["reason"]  # paho's reason, such as "Server shutting down"
        assert gone["data"]["since"]
        assert gone["data"]["suppressed"] == 0
        assert 1.0 <= came["data"]["down_s"] <= back - stopped + 0.5
        await connected_again()

        # Two more restarts at once: inside flap_interval_s they raise nothing of their own.
        for _ in range(2):
            await asyncio.to_thread(mosquitto.restart)
            await connected_again()
        # Past the interval, one more: its event counts the flaps not told.
        await asyncio.sleep(5.0)
        broker = ("broker_disconnected", "broker_connected")
        before = len(events(ev, *broker))
        await asyncio.to_thread(mosquitto.restart)
        await connected_again()
        await until(lambda: len(events(ev, *broker)) >= before + 2, what="the last restart's pair")
        told = events(ev, "broker_disconnected")
        suppressed = sum(e["data"]["suppressed"] for e in events(ev, *broker))
        assert len(told) < 4  # four restarts
        assert len(told) + suppressed == 4  # every one either told or counted
        seq = [e["event"] for e in events(ev, *broker)]
        assert seq == [k for _ in range(len(seq) // 2) for k in broker]
        for e in events(ev, *broker):
            print("event", e["Timestamp"], e["event"], e["data"])
    finally:
        ev.stop()


async def test_broker_events_of_ingest_processes_reach_the_events_webhook(
    mosquitto: Broker, tmp_path: Path, run_gateway
) -> None:
    ev = Receiver().start()
    listen = f"127.0.0.1:{free_port()}"
    try:
        path = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            mqtt_extra='ingest_processes = 2\nshared_group = "gw"',
            web=f'listen = "{listen}"',
            extra=events_hook(ev.url),
        )
        await run_gateway(config.load(path))
        await asyncio.to_thread(wait_port, int(listen.rsplit(":", 1)[1]))

        async with aiohttp.ClientSession() as http:

            async def sessions_up() -> list[bool]:
                async with http.get(f"http://{listen}/api/status") as resp:
                    doc = await resp.json()
                return [s["connected"] for s in doc["gateway"]["mqtt"]["sessions"]]

            deadline = time.monotonic() + 20
            while await sessions_up() != [True, True]:
                assert time.monotonic() < deadline, "the two ingest sessions did not connect"
                await asyncio.sleep(0.1)
        await until(lambda: "gateway_started" in kinds(ev), what="gateway_started")
        await asyncio.to_thread(mosquitto.restart)
        broker = ("broker_disconnected", "broker_connected")
        await until(
            lambda: [e["event"] for e in events(ev, *broker)] == list(broker),
            what="broker_disconnected, then broker_connected",
        )
        gone, came = events(ev, *broker)
        assert gone["data"]["reason"]
        assert came["data"]["down_s"] >= 0
    finally:
        ev.stop()


def test_a_pair_tells_each_kind_at_most_once_an_interval_and_counts_the_flaps() -> None:
    p = Pair("down", "up", interval_s=60)
    assert p.set(True, {"n": 1}, now=0) == [("down", {"n": 1, "suppressed": 0})]
    assert p.set(False, {"n": 2}, now=1) == [("up", {"n": 2, "suppressed": 0})]
    # Flaps inside the minute: not told one by one.
    assert p.set(True, {"n": 3}, now=2) == []
    assert p.set(False, {"n": 4}, now=3) == []
    assert p.set(True, {"n": 5}, now=4) == []
    # Down it stays: told once the minute is over, with the flaps it stands for.
    assert p.poll(now=59) == []
    assert p.poll(now=60) == [("down", {"n": 5, "suppressed": 1})]
    assert p.set(False, {"n": 6}, now=61) == [("up", {"n": 6, "suppressed": 0})]


def _hook_cfg(**fields: Any) -> config.WebhookConfig:
    return config.WebhookConfig(name="cloud", url="http://127.0.0.1:9/hook", **fields)


def test_a_restart_does_not_repeat_webhook_lagging_and_still_says_when_it_caught_up() -> None:
    hooks = [_hook_cfg(lag_alert_s=10.0)]
    before = Alerts(lambda: hooks, 60, "b")
    before.on_lags({"cloud": 12.0}, {"cloud": 5})
    assert [k for k, _ in before.poll()] == ["webhook_lagging"]
    saved = before.changed_state()
    assert saved is not None

    after = Alerts(lambda: hooks, 60, "b")
    after.restore(saved)
    after.on_lags({"cloud": 30.0}, {"cloud": 9})
    assert after.poll() == []  # still lagging: not told again
    after.on_lags({"cloud": 6.0}, {"cloud": 1})
    assert after.poll() == []  # under the limit, not under half of it: hysteresis
    after.on_lags({"cloud": 4.0}, {"cloud": 1})
    (caught_up,) = after.poll()
    assert caught_up[0] == "webhook_caught_up"
    assert caught_up[1]["lagging_s"] > 0

    damaged = Alerts(lambda: hooks, 60, "b")
    damaged.restore("[not json")
    damaged.on_lags({"cloud": 12.0}, {"cloud": 5})
    assert [k for k, _ in damaged.poll()] == ["webhook_lagging"]


@pytest.mark.parametrize(
    ("gateway", "hook", "problem"),
    [
        ({"heartbeat_s": 5}, {}, "gateway.heartbeat_s: must be at least 10 s, or 0 for no"),
        ({"heartbeat_s": "soon"}, {}, "gateway.heartbeat_s: must be a duration"),
        ({"flap_interval_s": 0.5}, {}, "gateway.flap_interval_s: must be between 1 s and 1 day"),
        ({}, {"lag_alert_s": -3}, "webhooks[0].lag_alert_s: must be a duration"),
        ({}, {"failing_after": "five"}, "webhooks[0].failing_after: must be"),
        ({}, {"failing_after": -1}, "webhooks[0].failing_after: must be 0-1000000"),
    ],
)
def test_pipeline_settings_are_checked_with_their_key_path(
    gateway: dict[str, Any], hook: dict[str, Any], problem: str
) -> None:
    raw = {
        "mqtt": {"host": "127.0.0.1"},
        "gateway": gateway,
        "webhooks": [{"name": "cloud", "url": "https://example.com/hook", **hook}],
    }
    with pytest.raises(ConfigError) as err:
        config.parse(raw)
    assert any(p.startswith(problem) for p in err.value.problems), err.value.problems


def test_pipeline_settings_default_to_off_and_take_durations() -> None:
    cfg = config.parse(
        {"mqtt": {"host": "127.0.0.1"}, "webhooks": [{"name": "c", "url": "https://e.com/h"}]}
    )
    assert cfg.gateway.heartbeat_s == 0
    assert cfg.gateway.flap_interval_s == 60
    assert cfg.webhooks[0].lag_alert_s == 0
    assert cfg.webhooks[0].failing_after == 5
    cfg = config.parse(
        {
            "mqtt": {"host": "127.0.0.1"},
            "gateway": {"heartbeat_s": "5m", "flap_interval_s": "2m"},
            "webhooks": [{"name": "c", "url": "https://e.com/h", "lag_alert_s": "1h"}],
        }
    )
    assert cfg.gateway.heartbeat_s == 300
    assert cfg.gateway.flap_interval_s == 120
    assert cfg.webhooks[0].lag_alert_s == 3600


def test_a_heartbeat_carries_the_radio_its_grade_and_the_data_used_this_cycle(
    mosquitto: Broker, tmp_path: Path, gateway_proc: Any
) -> None:
    emu = ModemEmulator("quectel", urcs=False, seed=5)
    for s in ("rat lte-m", "rsrp -95", "rsrq -11", "sinr 25"):
        assert emu.control(f"radio {s}") == "ok"
    rx = Receiver().start()
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    try:
        cfg = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            web=f'listen = "127.0.0.1:{port}"',
            gateway_extra="heartbeat_s = 10",
            extra=f"""
[modem]
port = "{emu.start_pty()}"
poll_interval_s = 0.2
data_budget_mb = 0.01

[cdr]
interval_s = 1
"""
            + events_hook(rx.url),
        )
        gw = gateway_proc(cfg)
        gw.start()

        def reading() -> bool:
            s = status_of(base)
            return bool(s and (s["modem"]["info"] or {}).get("rsrp_dbm") == -95.0)

        wait_for(reading, 20, "the modem's first reading with its radio")
        emu.add_traffic(1000, 2000)

        def counted() -> bool:
            s = status_of(base)
            return bool(s and s["data_budget"]["used_bytes"] == 3000)

        wait_for(counted, 20, "3000 bytes this cycle")

        def beat() -> dict[str, Any] | None:
            for e in reversed(events(rx, "gateway_heartbeat")):
                if e["data"].get("data_cycle", {}).get("used_bytes") == 3000:
                    return e["data"]  # type: ignore[no-any-return]
            return None

        wait_for(beat, 30, "a heartbeat that has the 3000 bytes")
        data = beat()
        assert data is not None
        m = data["modem"]
        assert (m["state"], m["access_technology"], m["rsrp_dbm"], m["sinr_db"]) == (
            "ok",
            "lte-m",
            -95.0,
            25.0,
        )
        assert m["rsrq_db"] == -11.0
        assert m["signal_quality"] == "fair"  # RSRP -95 fair, SINR 25 excellent: the worse
        cycle = data["data_cycle"]
        assert (cycle["budget_bytes"], cycle["percent"]) == (10486, 28.6)
        assert cycle["cycle_start"] < cycle["cycle_end"]
    finally:
        rx.stop()
        emu.stop()

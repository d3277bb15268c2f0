"""Under systemd: READY/STATUS/WATCHDOG/RELOADING/STOPPING over $NOTIFY_SOCKET, a SIGHUP
reload of the webhooks, watchdog pings that stop while the event loop is blocked."""

from __future__ import annotations

import itertools
import json
import os
import signal
import socket
import threading
import time
import urllib.request
import uuid
from pathlib import Path

import pytest

from gateway import config as config_mod
from gateway.ingest import Ingest
from gateway.runtime.sdnotify import Notifier, socket_address, watchdog_interval_s
from gateway.runtime.supervisor import Supervisor
from gateway.store import Store
from tests.conftest import Broker, free_port, publish, wait_for, write_config
from tests.receiver import Receiver

ICCID = "8981100000000000012"


class NotifySocket:
    """The service manager's end of $NOTIFY_SOCKET: every datagram, with its arrival time."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(socket_address(address))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, dict[str, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            try:
                data = self.sock.recv(4096)
            except TimeoutError:
                continue
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append((time.monotonic(), fields))

    def having(self, key: str, after: float = 0.0) -> list[tuple[float, dict[str, str]]]:
        return [(t, m) for t, m in list(self.messages) if key in m and t >= after]

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self.sock.close()


@pytest.fixture
def notify_socket() -> object:
    s = NotifySocket(f"@edge-gateway-test-{uuid.uuid4().hex}")
    yield s
    s.close()


def hooks_toml(*receivers: Receiver) -> str:
    return "".join(
        f'\n[[webhooks]]\nname = "r{i}"\nurl = "{r.url}"\n'
        "batch = { window_ms = 0, max_items = 10 }\nretry = { backoff_max_s = 0.5 }\n"
        for i, r in enumerate(receivers)
    )


def payloads(r: Receiver) -> set[str]:
    return {rec["Payload"] for rec in r.delivered()}


def test_gateway_speaks_sd_notify_reloads_webhooks_on_sighup_and_stops_pinging_when_frozen(
    mosquitto: Broker, tmp_path: Path, gateway_proc, notify_socket: NotifySocket, receiver
) -> None:
    second = Receiver().start()
    try:
        cfg_path = tmp_path / "gw.toml"
        creds = 'username = "gw"\npassword = "s3cret-mqtt-pw"'
        write_config(
            cfg_path,
            mosquitto.port,
            tmp_path / "state",
            extra=hooks_toml(receiver),
            mqtt_extra=creds,
        )
        gw = gateway_proc(
            cfg_path,
            env={
                "NOTIFY_SOCKET": notify_socket.address,
                "WATCHDOG_USEC": "1000000",
                "GATEWAY_TEST_HOOKS": "1",
                "GATEWAY_TEST_FREEZE_S": "3",
            },
            args=("--log-format", "json"),
        )
        gw.start()

        # READY=1 once the store is open and the first MQTT attempt is over, with a status.
        (_, ready), *_ = wait_for(lambda: notify_socket.having("READY"), what="READY=1")
        assert ready["READY"] == "1"
        assert ready["STATUS"].startswith("mqtt connected, backlog 0")
        began = time.monotonic()
        wait_for(lambda: len(notify_socket.having("WATCHDOG", began)) >= 3, what="3 pings")

        publish(mosquitto.port, [(f"devices/{ICCID}/up", f"a{i}".encode()) for i in range(3)])
        wait_for(lambda: payloads(receiver) == {"a0", "a1", "a2"}, what="delivery to r0")

        # SIGHUP with a second webhook: RELOADING=1 (with a time), READY=1, and it delivers.
        write_config(
            cfg_path,
            mosquitto.port,
            tmp_path / "state",
            extra=hooks_toml(receiver, second),
            mqtt_extra=creds,
        )
        hup = time.monotonic()
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        (t_reload, reloading), *_ = wait_for(
            lambda: notify_socket.having("RELOADING", hup), what="RELOADING=1"
        )
        assert int(reloading["MONOTONIC_USEC"]) > 0
        (_, again), *_ = wait_for(
            lambda: notify_socket.having("READY", t_reload), what="READY=1 after the reload"
        )
        assert again["STATUS"].startswith("configuration reloaded, webhooks changed")
        publish(mosquitto.port, [(f"devices/{ICCID}/up", f"b{i}".encode()) for i in range(3)])
        wait_for(lambda: {"b0", "b1", "b2"} <= payloads(second), what="delivery to new r1")
        wait_for(lambda: {"b0", "b1", "b2"} <= payloads(receiver), what="r0 still delivers")

        # A broken file is refused; the running configuration stays and still delivers.
        cfg_path.write_text(cfg_path.read_text().replace(f"port = {mosquitto.port}", "port = 0"))
        hup = time.monotonic()
        gw.proc.send_signal(signal.SIGHUP)
        (_, refused), *_ = wait_for(
            lambda: notify_socket.having("READY", hup), what="READY=1 after a bad reload"
        )
        assert refused["STATUS"].startswith("reload failed, running configuration kept")
        publish(mosquitto.port, [(f"devices/{ICCID}/up", b"c0")])
        wait_for(lambda: "c0" in payloads(second), what="delivery after the refused reload")

        # A blocked event loop sends no pings; they come back when it runs again.
        frozen_at = time.monotonic()
        gw.proc.send_signal(signal.SIGUSR2)
        wait_for(lambda: "event loop runs again" in gw.log(), what="the freeze to end")
        wait_for(
            lambda: len(notify_socket.having("WATCHDOG", frozen_at + 3)) >= 2,
            what="pings after the freeze",
        )
        times = [t for t, _ in notify_socket.having("WATCHDOG", frozen_at - 1)]
        gaps = [b - a for a, b in itertools.pairwise(times)]
        assert max(gaps) >= 2.5, f"pings went on while the loop was blocked: {gaps}"

        stop = time.monotonic()
        assert gw.terminate() == 0
        assert notify_socket.having("STOPPING", stop)
    finally:
        second.stop()

    # --log-format json: every line is one JSON object, and no secret leaks.
    lines = [json.loads(line) for line in gw.log().splitlines()]
    assert {"ts", "level", "component", "msg"} <= set(lines[0])
    rejected = [d for d in lines if d["msg"].startswith("reload rejected")]
    assert [d["level"] for d in rejected] == ["error"]
    assert rejected[0]["msg"].endswith("mqtt.port: must be 1-65535, got 0")
    assert "s3cret-mqtt-pw" not in gw.log()


def test_watchdog_holds_back_while_the_store_writer_or_the_mqtt_thread_is_stuck(
    tmp_path: Path,
) -> None:
    cfg = config_mod.parse({"mqtt": {"host": "127.0.0.1", "port": 1}}, env={})
    with Store.open(tmp_path) as store:
        sd = Supervisor(cfg, Notifier(None))
        sd.stall_s = 0.3
        sd._store = store
        sd._start_probe()
        wait_for(lambda: sd._probe is not None and sd._probe.done(), what="a probe answer")
        assert sd.problem() == ""

        release = threading.Event()
        store.call(lambda _c: release.wait(10))  # the writer is busy with something endless
        sd._start_probe()
        try:
            wait_for(lambda: "store writer" in sd.problem(), timeout=5, what="a stall")
        finally:
            release.set()
        wait_for(lambda: sd.problem() == "", timeout=5, what="the writer to answer again")

        # paho's network thread is not running (never started, here): no pings either.
        sd._ingest = Ingest(cfg.mqtt, store)
        assert sd.problem() == "the MQTT network thread has ended"


def test_notify_socket_and_watchdog_come_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert socket_address("@abc") == b"\0abc"
    assert socket_address("/run/systemd/notify") == "/run/systemd/notify"
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    silent = Notifier.from_env()
    assert not silent.enabled
    assert silent.send("READY=1") is False
    monkeypatch.setenv("WATCHDOG_USEC", "30000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert watchdog_interval_s() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", "1")  # meant for another process
    assert watchdog_interval_s() is None
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    monkeypatch.setenv("WATCHDOG_USEC", "0")
    assert watchdog_interval_s() is None


def test_a_reload_that_adds_a_webhook_shows_it_on_the_dashboard_and_its_test_button_works(
    mosquitto: Broker, tmp_path: Path, gateway_proc, receiver: Receiver
) -> None:
    second = Receiver().start()
    try:
        cfg_path = tmp_path / "gw.toml"
        base = f"http://127.0.0.1:{free_port()}"
        web = f'listen = "{base.removeprefix("http://")}"'

        def configure(*receivers: Receiver) -> None:
            write_config(
                cfg_path, mosquitto.port, tmp_path / "state", extra=hooks_toml(*receivers), web=web
            )

        def names() -> list[str]:
            try:
                with urllib.request.urlopen(base + "/api/status", timeout=5) as r:
                    return [w["name"] for w in json.load(r)["webhooks"]]
            except OSError:
                return []  # not listening yet

        configure(receiver)
        gw = gateway_proc(cfg_path)
        gw.start()
        wait_for(lambda: names() == ["r0"], what="the dashboard with r0")
        configure(receiver, second)
        assert gw.proc is not None
        gw.proc.send_signal(signal.SIGHUP)
        wait_for(lambda: names() == ["r0", "r1"], what="r1 on the dashboard after SIGHUP")
        test = urllib.request.Request(
            base + "/api/webhooks/r1/test",
            data=b"{}",
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        with urllib.request.urlopen(test, timeout=30) as r:
            assert json.load(r)["ok"] is True
        wait_for(lambda: second.requests, what="the test request at the new receiver")
        assert gw.terminate() == 0
    finally:
        second.stop()

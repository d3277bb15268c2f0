"""Shared fixtures: a real mosquitto on a free loopback port, real receivers, temp stores."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import settings

ROOT = Path(__file__).resolve().parent.parent

# Property tests draw new examples on every run; under CI (CI set, as .ci/run does) they
# draw the same ones each time, so that a failure there can be reproduced.
settings.register_profile("ci", derandomize=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(
    predicate: Callable[[], object],
    timeout: float = 20.0,
    what: str = "condition",
    interval: float = 0.05,
) -> object:
    """Poll until predicate() is truthy or the deadline passes (then fail the test)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(interval)


def wait_port(port: int, timeout: float = 10.0) -> None:
    def up() -> bool:
        with socket.socket() as s:
            s.settimeout(0.2)
            return s.connect_ex(("127.0.0.1", port)) == 0

    wait_for(up, timeout, f"port {port} to listen")


@dataclass
class Broker:
    """A mosquitto process on 127.0.0.1:port with persistence in its own directory."""

    port: int
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    extra_conf: str = ""  # more mosquitto.conf lines, such as a TLS listener

    def start(self) -> None:
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.workdir}/\n"
            "autosave_interval 1\n"
            "max_queued_messages 0\n"
            "max_inflight_messages 0\n"
            "max_queued_bytes 0\n"
            "log_dest stderr\n"
            "log_type error\n"
            "log_type warning\n"
            + ("user root\n" if os.geteuid() == 0 else "")
            # As root, mosquitto drops to user 'mosquitto' and cannot write our temp dir.
            + self.extra_conf
        )
        with (self.workdir / "mosquitto.log").open("ab") as log:
            self.proc = subprocess.Popen(["mosquitto", "-c", str(conf)], stdout=log, stderr=log)
        wait_port(self.port)

    def stop(self, kill: bool = False) -> None:
        if self.proc is None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(10)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Broker]:
    """A real mosquitto on a free loopback port (persistence on)."""
    if shutil.which("mosquitto") is None:
        pytest.fail("mosquitto is not installed: apt-get install mosquitto")
    d = tmp_path / "broker"
    d.mkdir()
    broker = Broker(free_port(), d)
    broker.start()
    yield broker
    broker.stop()


def gateway_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "gateway", *args]


def publish(
    port: int,
    messages: list[tuple[str, bytes]],
    *,
    qos: int = 1,
    client_id: str = "",
    timeout: float = 30.0,
    rate: float = 0.0,
) -> None:
    """Publish with a separate paho MQTT 5 client and wait until the broker has them all.
    With `rate`, at about that many a second, 10 at a time; else all at once."""
    import paho.mqtt.client as mqtt

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.max_inflight_messages_set(1000)
    c.max_queued_messages_set(0)
    c.connect("127.0.0.1", port)
    c.loop_start()
    try:
        start = time.monotonic()
        infos = []
        for i in range(0, len(messages), 10):
            infos += [c.publish(t, p, qos=qos) for t, p in messages[i : i + 10]]
            if rate:
                time.sleep(max(0.0, start + (i + 10) / rate - time.monotonic()))
        deadline = time.monotonic() + timeout
        for info in infos:
            info.wait_for_publish(max(0.1, deadline - time.monotonic()))
            assert info.is_published(), "broker did not acknowledge a publish in time"
    finally:
        c.disconnect()
        c.loop_stop()


def register_session(port: int, client_id: str, topic: str, expiry_s: int = 3600) -> None:
    """Create the gateway's persistent session and subscription before it first runs,
    so that nothing published before its SUBACK is dropped by the broker."""
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.SessionExpiryInterval = expiry_s
    c.connect("127.0.0.1", port, clean_start=False, properties=props)
    c.loop_start()
    try:
        done = threading.Event()
        c.on_subscribe = lambda *_a: done.set()
        c.subscribe(topic, qos=1)
        assert done.wait(10), f"no SUBACK for {topic}"
    finally:
        c.disconnect()
        c.loop_stop()


def write_config(
    path: Path,
    broker_port: int,
    state_dir: Path,
    extra: str = "",
    mqtt_extra: str = "",
    client_id: str = "gw-test",
    gateway_extra: str = "",
    web: str = "enabled = false",
) -> Path:
    """A gateway TOML for tests: loopback broker, state in tmp, web off unless `web` says."""
    path.write_text(
        f"""
[gateway]
state_dir = "{state_dir}"
{gateway_extra}

[mqtt]
host = "127.0.0.1"
port = {broker_port}
client_id = "{client_id}"
reconnect_min_s = 0.2
reconnect_max_s = 1
{mqtt_extra}

[web]
{web}
{extra}
"""
    )
    return path


class GatewayProc:
    """`python -m gateway run -c CONFIG` as a child process."""

    def __init__(
        self,
        config: Path,
        log_path: Path,
        env: dict[str, str] | None = None,
        args: tuple[str, ...] = (),
    ) -> None:
        self.config = config
        self.log_path = log_path
        self.env = env
        self.args = args
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        env = {**os.environ, **(self.env or {})}
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                gateway_cmd("run", "-c", str(self.config), *self.args),
                stdout=log,
                stderr=log,
                env=env,
                cwd=ROOT,
            )

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)
        self.proc = None

    def terminate(self, timeout: float = 10.0) -> int:
        assert self.proc is not None
        self.proc.terminate()
        rc = self.proc.wait(timeout)
        self.proc = None
        return rc

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@pytest.fixture
def gateway_proc(tmp_path: Path) -> Iterator[Callable[..., GatewayProc]]:
    """Factory for gateway subprocesses; all are killed at teardown."""
    procs: list[GatewayProc] = []

    def make(
        config: Path, env: dict[str, str] | None = None, args: tuple[str, ...] = ()
    ) -> GatewayProc:
        g = GatewayProc(config, tmp_path / f"gateway-{len(procs)}.log", env, args)
        procs.append(g)
        return g

    yield make
    for g in procs:
        if g.proc is not None:
            g.proc.kill()
            g.proc.wait(10)


def db_rows(db: Path, sql: str, args: tuple[object, ...] = ()) -> list[tuple[object, ...]]:
    """Query a store file read-only (the gateway may be running)."""
    import sqlite3

    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


async def until(
    predicate: Callable[[], object],
    timeout: float = 20.0,
    what: str = "condition",
    interval: float = 0.05,
) -> object:
    """Async twin of wait_for, for tests whose gateway runs on the test's event loop."""
    import asyncio

    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(interval)


@pytest.fixture
def receiver() -> Iterator[object]:
    """A real aiohttp webhook receiver on a free loopback port."""
    from tests.receiver import Receiver

    r = Receiver().start()
    yield r
    r.stop()


@pytest.fixture
async def run_gateway() -> object:
    """Start gateway.service.run(cfg) on the test's loop; cancelled at teardown."""
    import asyncio

    from gateway.runtime import service

    tasks: list[asyncio.Task[None]] = []

    async def start(cfg: object) -> asyncio.Task[None]:
        task = asyncio.create_task(service.run(cfg))  # type: ignore[arg-type]
        tasks.append(task)
        return task

    yield start
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


@pytest.fixture
async def http() -> AsyncIterator[object]:
    """An aiohttp client session that keeps cookies set by an IP-address host (the
    dashboard's login and CSRF cookies on 127.0.0.1)."""
    import aiohttp

    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as s:
        yield s

"""Shared fixtures: a real mosquitto on a free loopback port, real receivers, temp stores."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], object], timeout: float = 20.0, what: str = "condition",
             interval: float = 0.05) -> object:
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
            # As root, mosquitto drops to user 'mosquitto' and cannot write our temp dir.
            + ("user root\n" if os.geteuid() == 0 else "")
        )
        log = (self.workdir / "mosquitto.log").open("ab")
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

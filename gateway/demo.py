"""`gateway demo`: broker, simulated fleet, webhook sink and gateway, all on loopback.

Every part is a child process on a free loopback port, in a temporary directory that is
removed at the end. Ctrl-C or --duration ends it cleanly.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from gateway import status as status_mod
from gateway.errors import GatewayError

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, proc: subprocess.Popen[bytes], what: str, log: Path) -> None:
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise GatewayError(f"{what} exited at start; see {log}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise GatewayError(f"{what} did not listen on 127.0.0.1:{port} within 15 s")


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int | float):
        return repr(v)
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    assert isinstance(v, dict)
    return "{ " + ", ".join(f'"{k}" = {_toml_value(x)}' for k, x in v.items()) + " }"


def _dump_toml(doc: dict[str, Any]) -> str:
    out: list[str] = []
    for key, value in doc.items():
        if isinstance(value, dict):
            out.append(f"[{key}]")
            out += [f'"{k}" = {_toml_value(v)}' for k, v in value.items()]
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for item in value:
                out.append(f"[[{key}]]")
                out += [f'"{k}" = {_toml_value(v)}' for k, v in item.items()]
        out.append("")
    return "\n".join(out)


def demo_config(base: Path, workdir: Path, broker_port: int, sink_port: int, web_port: int) -> Path:
    """config/demo.toml with the demo's ports and a temporary state directory."""
    doc = tomllib.loads(base.read_text(encoding="utf-8"))
    doc.setdefault("gateway", {})["state_dir"] = str(workdir / "state")
    doc["mqtt"]["port"] = broker_port
    for hook in doc.get("webhooks", []):
        hook["url"] = hook["url"].replace("127.0.0.1:9000", f"127.0.0.1:{sink_port}")
    doc.setdefault("web", {})["listen"] = f"127.0.0.1:{web_port}"
    doc["web"]["public_url"] = f"http://127.0.0.1:{web_port}"
    doc.pop("modem", None)  # the modem emulator joins the demo with the modem issue
    path = workdir / "gateway.toml"
    path.write_text(_dump_toml(doc), encoding="utf-8")
    return path


class Demo:
    """Starts and stops the demo's processes."""

    def __init__(self, workdir: Path, devices: int, rate: float) -> None:
        self.workdir = workdir
        self.devices = devices
        self.rate = rate
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=f, cwd=ROOT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def start(self) -> tuple[Path, int, int]:
        broker_port, sink_port, web_port = free_port(), free_port(), free_port()
        mosquitto = shutil.which("mosquitto") or (
            "/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None
        )
        if mosquitto is None:
            raise GatewayError("the demo needs a broker: apt-get install mosquitto")
        conf = self.workdir / "mosquitto.conf"
        conf.write_text(
            f"listener {broker_port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
            f"persistence_location {self.workdir}/\nmax_queued_messages 0\n"
            "max_inflight_messages 1000\n" + ("user root\n" if os.geteuid() == 0 else "")
        )
        broker = self.spawn("mosquitto", [mosquitto, "-c", str(conf)])
        _wait_port(broker_port, broker, "mosquitto", self.workdir / "mosquitto.log")
        py = sys.executable
        sink = self.spawn(
            "sink",
            [
                py,
                "-m",
                "firmware_sim",
                "sink",
                "--port",
                str(sink_port),
                "--basic",
                "demo:demo-password",
                "--quiet",
                "--record",
                str(self.workdir / "requests.jsonl"),
            ],
        )
        _wait_port(sink_port, sink, "sink", self.workdir / "sink.log")
        cfg = demo_config(
            ROOT / "config" / "demo.toml", self.workdir, broker_port, sink_port, web_port
        )
        self.spawn("gateway", [py, "-m", "gateway", "run", "-c", str(cfg)])
        time.sleep(1.0)  # the gateway subscribes before the fleet publishes
        self.spawn(
            "fleet",
            [
                py,
                "-m",
                "firmware_sim",
                "fleet",
                "--broker",
                f"127.0.0.1:{broker_port}",
                "--devices",
                str(self.devices),
                "--rate",
                str(self.rate),
                "--encoding",
                "mixed",
                "--duration",
                "86400",
            ],
        )
        return cfg, web_port, sink_port

    def stop(self) -> None:
        # The fleet first, the gateway next (it commits and acknowledges), the broker last.
        order = {"fleet": 0, "gateway": 1, "sink": 2, "mosquitto": 3}
        for _name, proc in sorted(self.procs, key=lambda p: order.get(p[0], 9)):
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextlib.contextmanager
def _workdir(keep: bool) -> Iterator[Path]:
    d = Path(tempfile.mkdtemp(prefix="edge-gateway-demo-"))
    try:
        yield d
    finally:
        if keep:
            print(f"demo files kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


def run(duration: float | None, devices: int, rate: float, keep: bool = False) -> int:
    """Run the demo until Ctrl-C or `duration` seconds; print progress and a summary."""
    with _workdir(keep) as workdir:
        demo = Demo(workdir, devices, rate)
        try:
            cfg_path, web_port, sink_port = demo.start()
            print(f"demo running in {workdir}")
            print(f"  broker, {devices} devices at {rate}/s each, sink on :{sink_port}")
            print(f"  dashboard: http://127.0.0.1:{web_port}/  (also /metrics and /api/status)")
            print(f"  requests the sink received: {workdir}/requests.jsonl   (Ctrl-C to stop)")
            from gateway import config as config_mod

            cfg = config_mod.load(cfg_path)
            began = time.monotonic()
            last_delivered, last_t = 0, began
            snap: dict[str, Any] = {}
            while duration is None or time.monotonic() - began < duration:
                time.sleep(2.0)
                for name, proc in demo.procs:
                    if proc.poll() is not None and name != "fleet":
                        raise GatewayError(f"{name} exited; see {workdir}/{name}.log")
                if not cfg.db_path.exists():
                    continue
                with contextlib.suppress(Exception):
                    snap = status_mod.read(cfg.db_path, cfg)
                if not snap:
                    continue
                p = snap["packets"]
                now = time.monotonic()
                rps = (p["delivered"] - last_delivered) / (now - last_t)
                last_delivered, last_t = p["delivered"], now
                print(
                    f"\r{now - began:6.0f}s  received {p['received']:>7}  delivered "
                    f"{p['delivered']:>7}  in flight {p['pending']:>5}  dead {p['dead']:>3}"
                    f"  {rps:7.1f} packets/s",
                    end="",
                    flush=True,
                )
        except KeyboardInterrupt:
            pass
        finally:
            print()
            demo.stop()
        if snap:
            print("summary")
            for k, v in snap["packets"].items():
                print(f"  packets.{k:<14} {v}")
            for w in snap["webhooks"]:
                print(
                    f"  webhook {w['name']}: hits {w['hits']}, delivered {w['delivered']}, "
                    f"requests ok {w['requests_ok']}, failed {w['requests_failed']}, "
                    f"dead letters {w['dead_letters']}"
                )
    return 0

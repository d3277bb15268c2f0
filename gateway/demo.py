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
from collections import deque
from collections.abc import Iterator
from importlib import resources
from pathlib import Path
from typing import Any

from gateway.errors import GatewayError
from gateway.web import status as status_mod

# The directory gateway and firmware_sim are imported from (a checkout or site-packages):
# the demo's children run as `python -m` from there.
ROOT = Path(__file__).resolve().parent.parent
# Package data, so that an installed wheel runs the demo without a checkout.
DEMO_TOML = "demo.toml"
# Progress when stdout is not a terminal (a log or a pipe): one line this often.
LOG_EVERY_S = 5.0
# Rates are averaged over this long: several batch windows (the packets webhook batches
# per second), so a sample never falls between two batches and reads 0.
RATE_WINDOW_S = 10.0


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


SECRET = "demo-secret"
BASIC = "demo:demo-password"


def demo_config(
    base: str,
    workdir: Path,
    ports: dict[str, int],
    *,
    modem_port: str,
    mqtt_protocol: str = "5",
    cdr_interval_s: float | None = None,
    report_every_s: float | None = None,
) -> Path:
    """The demo config (TOML text) with the demo's ports, modem and a temporary state
    directory, written to workdir/gateway.toml."""
    doc = tomllib.loads(base)
    doc.setdefault("gateway", {})["state_dir"] = str(workdir / "state")
    doc["mqtt"]["port"] = ports["broker"]
    doc["mqtt"]["protocol"] = mqtt_protocol
    for hook in doc.get("webhooks", []):
        hook["url"] = hook["url"].replace("127.0.0.1:9000", f"127.0.0.1:{ports['sink']}")
    doc.setdefault("web", {})["listen"] = f"127.0.0.1:{ports['web']}"
    doc["web"]["public_url"] = f"http://127.0.0.1:{ports['web']}"
    doc.setdefault("modem", {})["port"] = modem_port
    if cdr_interval_s is not None:
        doc.setdefault("cdr", {})["interval_s"] = cdr_interval_s
    if report_every_s is not None:
        for rep in doc.get("reports", []):
            rep.pop("at", None)
            rep["every"] = report_every_s
    path = workdir / "gateway.toml"
    path.write_text(_dump_toml(doc), encoding="utf-8")
    return path


def find_mosquitto(path: str | None = None, sbin: Path = Path("/usr/sbin")) -> str | None:
    """Debian's mosquitto: on PATH, or in /usr/sbin (not on a normal user's PATH)."""
    found = shutil.which("mosquitto", path=path)
    if found is None and (sbin / "mosquitto").is_file():
        found = str(sbin / "mosquitto")
    return found


class Demo:
    """Starts and stops the demo's processes."""

    def __init__(
        self,
        workdir: Path,
        devices: int,
        rate: float,
        broker: str = "auto",
        cdr_interval_s: float | None = None,
        report_every_s: float | None = None,
    ) -> None:
        self.workdir = workdir
        self.devices = devices
        self.rate = rate
        self.broker = broker
        self.cdr_interval_s = cdr_interval_s
        self.report_every_s = report_every_s
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []
        self.ports: dict[str, int] = {}
        self.broker_kind = ""

    def spawn(self, name: str, cmd: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        with log.open("ab") as f:
            proc = subprocess.Popen(cmd, stdout=f, stderr=f, cwd=ROOT, start_new_session=True)
        self.procs.append((name, proc))
        return proc

    def _start_broker(self) -> None:
        port = self.ports["broker"]
        mosquitto = find_mosquitto() if self.broker in ("auto", "mosquitto") else None
        if self.broker == "mosquitto" and mosquitto is None:
            raise GatewayError("--broker mosquitto: not installed (apt-get install mosquitto)")
        if mosquitto is not None:
            conf = self.workdir / "mosquitto.conf"
            conf.write_text(
                f"listener {port} 127.0.0.1\nallow_anonymous true\npersistence true\n"
                f"persistence_location {self.workdir}/\nmax_queued_messages 0\n"
                "max_inflight_messages 1000\n" + ("user root\n" if os.geteuid() == 0 else "")
            )
            proc = self.spawn("mosquitto", [mosquitto, "-c", str(conf)])
            self.broker_kind = "mosquitto"
        else:
            # No mosquitto (or asked for): the embedded amqtt broker, MQTT 3.1.1, no root.
            cmd = [sys.executable, "-m", "firmware_sim", "broker", "--port", str(port)]
            proc = self.spawn("mosquitto", cmd)
            self.broker_kind = "amqtt"
        _wait_port(port, proc, self.broker_kind, self.workdir / "mosquitto.log")

    def start(self) -> Path:
        self.ports = {k: free_port() for k in ("broker", "sink", "web", "modem_control")}
        self._start_broker()
        py = sys.executable
        sink = self.spawn(
            "sink",
            [py, "-m", "firmware_sim", "sink", "--port", str(self.ports["sink"]),
             "--basic", BASIC, "--secret", SECRET, "--scheme", "cdr-manager", "--quiet",
             "--record", str(self.workdir / "requests.jsonl")],
        )  # fmt: skip
        _wait_port(self.ports["sink"], sink, "sink", self.workdir / "sink.log")
        link = self.workdir / "modem"
        modem = self.spawn(
            "modem",
            [py, "-m", "firmware_sim", "modem", "--vendor", "quectel", "--pty",
             "--link", str(link), "--control", f"127.0.0.1:{self.ports['modem_control']}",
             "--tx-rate", "150", "--rx-rate", "450", "--no-urcs"],
        )  # fmt: skip
        _wait_port(self.ports["modem_control"], modem, "modem emulator", self.workdir / "modem.log")
        cfg = demo_config(
            resources.files("gateway").joinpath(DEMO_TOML).read_text(encoding="utf-8"),
            self.workdir,
            self.ports,
            modem_port=str(link),
            mqtt_protocol="3.1.1" if self.broker_kind == "amqtt" else "5",
            cdr_interval_s=self.cdr_interval_s,
            report_every_s=self.report_every_s,
        )
        gw = self.spawn("gateway", [py, "-m", "gateway", "run", "-c", str(cfg)])
        self._wait_log("gateway", gw, "connected to", 20)  # subscribed before the fleet starts
        self.spawn(
            "fleet",
            [py, "-m", "firmware_sim", "fleet", "--broker", f"127.0.0.1:{self.ports['broker']}",
             "--devices", str(self.devices), "--rate", str(self.rate), "--encoding", "mixed",
             "--duration", "86400"],
        )  # fmt: skip
        return cfg

    def _wait_log(
        self, name: str, proc: subprocess.Popen[bytes], text: str, timeout: float
    ) -> None:
        log = self.workdir / f"{name}.log"
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise GatewayError(f"{name} exited at start; see {log}")
            if text in log.read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise GatewayError(f"{name}: no {text!r} within {timeout:g} s; see {log}")

    def modem_traffic(self, tx: int, rx: int) -> None:
        """A burst of traffic on the emulated modem (its control port)."""
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", self.ports["modem_control"]), timeout=2) as s,
        ):
            s.sendall(f"traffic {tx} {rx}\n".encode())
            s.recv(100)

    def stop_one(self, name: str) -> None:
        for n, proc in self.procs:
            if n == name and proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def stop(self) -> None:
        # The fleet first, the gateway next (it commits and acknowledges), the broker last.
        for name in ("fleet", "gateway", "modem", "sink", "mosquitto"):
            self.stop_one(name)


@contextlib.contextmanager
def _workdir(keep: bool, given: Path | None) -> Iterator[Path]:
    if given is not None:
        given.mkdir(parents=True, exist_ok=True)
        yield given
        return
    d = Path(tempfile.mkdtemp(prefix="edge-gateway-demo-"))
    try:
        yield d
    finally:
        if keep:
            print(f"demo files kept in {d}")
        else:
            shutil.rmtree(d, ignore_errors=True)


class RateWindow:
    """A count's rate of change per second over the last `window` seconds of samples."""

    def __init__(self, window: float, t0: float, count0: int = 0) -> None:
        self.window = window
        self.samples: deque[tuple[float, int]] = deque([(t0, count0)])

    def add(self, t: float, count: int) -> float:
        """Record the count at time t; the rate since the oldest sample in the window."""
        self.samples.append((t, count))
        # Keep one sample at or before the window's start, so the span covers the window.
        while len(self.samples) > 2 and self.samples[1][0] <= t - self.window:
            self.samples.popleft()
        t_old, count_old = self.samples[0]
        return (count - count_old) / (t - t_old) if t > t_old else 0.0


def _progress(snap: dict[str, Any], elapsed: float, rps: float) -> str:
    p = snap["packets"]
    return (
        f"{elapsed:6.0f}s  received {p['received']:>7}  delivered {p['delivered']:>7}"
        f"  in flight {p['pending']:>5}  dead letters {snap['dead_letters']:>3}"
        f"  CDRs {snap.get('cdrs', {}).get('emitted', 0):>3}  {rps:6.1f} requests/s"
    )


def _summary(snap: dict[str, Any]) -> None:
    print("summary")
    for k, v in snap["packets"].items():
        print(f"  packets.{k:<14} {v}")
    cols = ("name", "source", "hits", "delivered", "requests_ok", "requests_failed",
            "queue_depth", "dead_letters")  # fmt: skip
    rows = [[str(w[c]) for c in cols] for w in snap["webhooks"]]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print("  " + "  ".join(c.ljust(w) for c, w in zip(cols, widths, strict=True)))
    for r in rows:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)))


def _drain(cfg: Any, timeout: float) -> None:
    """Give the gateway a moment to deliver what it has before it stops."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(Exception):
            if status_mod.read(cfg.db_path, cfg)["packets"]["pending"] == 0:
                return
        time.sleep(0.2)


def run(
    duration: float | None,
    devices: int,
    rate: float,
    keep: bool = False,
    *,
    broker: str = "auto",
    workdir: Path | None = None,
    cdr_interval_s: float | None = None,
    report_every_s: float | None = None,
    burst_every_s: float = 20.0,
) -> int:
    """Run the demo until Ctrl-C or `duration` seconds; print progress and a summary."""
    from gateway import config as config_mod

    with _workdir(keep, workdir) as wd:
        demo = Demo(wd, devices, rate, broker, cdr_interval_s, report_every_s)
        snap: dict[str, Any] = {}
        cfg = None
        try:
            cfg_path = demo.start()
            cfg = config_mod.load(cfg_path)
            print(f"demo running in {wd} (broker: {demo.broker_kind})")
            sink = demo.ports["sink"]
            print(f"  {devices} devices at {rate}/s each, modem emulator, sink on :{sink}")
            web = demo.ports["web"]
            print(f"  dashboard: http://127.0.0.1:{web}/  (also /metrics and /api/status)")
            print(f"  requests the sink received: {wd}/requests.jsonl   (Ctrl-C to stop)")
            # A terminal gets one line rewritten every second; a log or a pipe gets a new
            # line every LOG_EVERY_S, without carriage returns.
            interactive = sys.stdout.isatty()
            line_every = 1.0 if interactive else LOG_EVERY_S
            began = time.monotonic()
            end = began + duration if duration is not None else float("inf")
            next_burst = began + min(5.0, burst_every_s)
            next_line = began + line_every
            rates = RateWindow(RATE_WINDOW_S, began)
            while time.monotonic() < end:
                t = time.monotonic()
                time.sleep(max(0.05, min(1.0, end - t, next_line - t)))
                for name, proc in demo.procs:
                    if proc.poll() is not None and name != "fleet":
                        raise GatewayError(f"{name} exited; see {wd}/{name}.log")
                now = time.monotonic()
                if now >= next_burst:
                    demo.modem_traffic(30_000, 60_000)  # a heavy period: big-usage fires
                    next_burst += burst_every_s
                if now < next_line or not cfg.db_path.exists():
                    continue
                next_line += line_every * (int((now - next_line) // line_every) + 1)
                with contextlib.suppress(Exception):
                    snap = status_mod.read(cfg.db_path, cfg)
                if not snap:
                    continue
                requests = sum(w["requests_ok"] + w["requests_failed"] for w in snap["webhooks"])
                line = _progress(snap, now - began, rates.add(now, requests))
                if interactive:
                    print("\r" + line, end="", flush=True)
                else:
                    print(line, flush=True)
        except KeyboardInterrupt:
            pass
        finally:
            if sys.stdout.isatty():
                print()  # ends the line the progress rewrote
            demo.stop_one("fleet")
            if cfg is not None:
                _drain(cfg, 5.0)
            demo.stop()
        if cfg is not None:
            with contextlib.suppress(Exception):
                snap = status_mod.read(cfg.db_path, cfg)
        if snap:
            _summary(snap)
    return 0

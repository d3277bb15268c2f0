"""A cellular modem emulator that speaks AT commands on a pty or a loopback TCP port.

    python -m firmware_sim modem --vendor quectel --pty [--link PATH]
    python -m firmware_sim modem --vendor huawei --tcp 127.0.0.1:7000 --control 127.0.0.1:7001

``--pty`` prints the pty path (or ``--link``, a symlink kept pointing at the current pty, like
a udev by-id link) on stdout, one flushed line; ``--tcp`` prints the ``socket://`` URL. It
serves until SIGTERM/SIGINT. Vendors: generic, quectel, ublox, simcom, telit, huawei; each
answers its own ICCID and byte-counter commands with that vendor's quirks.

Like a real modem it starts with echo ON (until ATE0) and numeric-less ``ERROR`` (until
AT+CMEE=1), sends URCs at random moments and inside answers (``--no-urcs`` or ``--seed`` for
determinism), and its byte counters grow with simulated traffic (``--tx-rate``/``--rx-rate``
bytes/s while registered).

Fault switches (``--fault NAME``, repeatable, or at runtime):
    no_sim      +CME ERROR: 10 for SIM commands, not registered, no traffic
    sim_busy    +CME ERROR: 14 for SIM commands
    slow        every answer is delayed by --slow-s seconds (default 2)
    silence     input is read and ignored; nothing is sent
    garbage     bursts of garbage bytes between and inside answers and at random moments
    disconnect  the port goes away (pty closed, TCP listener closed); off plugs it back in
    unregistered, unregistered_until_reset, hung, unresponsive: cleared by a radio cycle,
                a reset or a power cycle as firmware_sim.modem_power describes
Actions: reset_counters (counters to 0), reboot (counters to 0, echo on, boot URCs, at once
and without dropping the port), power_cycle (the port goes away for --reboot-s, as after
AT+CFUN=1,1; see firmware_sim.modem_power).

Runtime control of the subprocess form: ``--control HOST:PORT`` listens for text commands,
one per line, each answered with ``ok``, ``error: …`` or (``state``) a JSON line:
    fault NAME on|off · reset_counters · reboot · power_cycle · traffic TX RX
    swap_sim ICCID [IMSI] · registration home|roaming|searching|denied|not_registered
    csq N · state
    radio rat gsm|umts|lte|lte-m|nb-iot|5g-nr · radio rsrp|rsrq|sinr|rscp|ecno N (pins it)
    radio cell_id|tac HEX · radio band|earfcn|pci N · radio on|off (answer radio commands)
From a shell: ``python -m firmware_sim modem-control HOST:PORT COMMAND …``.
In-process (tests): ``ModemEmulator(...).start_pty()`` / ``.start_tcp()`` and the methods of
the same names.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import select
import socket
import sys
import threading
import time
import tty
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from firmware_sim.modem_power import POWER_FAULTS, Power
from firmware_sim.radio import RadioSim

VENDORS = ("generic", "quectel", "ublox", "simcom", "telit", "huawei")
FAULTS = ("no_sim", "sim_busy", "slow", "silence", "garbage", "disconnect", *POWER_FAULTS)
REG_STATES = {
    "not_registered": 0,
    "home": 1,
    "searching": 2,
    "denied": 3,
    "unknown": 4,
    "roaming": 5,
}


@dataclass(frozen=True, slots=True)
class Identity:
    """What the emulated modem and SIM report."""

    iccid: str = "8981100000123456789"
    imsi: str = "440101234567890"
    imei: str = "490154203237518"
    msisdn: str = "+819012345678"
    operator: str = "NTT DOCOMO"
    plmn: str = "44010"
    apn: str = "internet"
    csq: int = 20
    registration: str = "home"


@dataclass(frozen=True, slots=True)
class VendorSpec:
    manufacturer: str
    model: str
    revision: str


SPECS = {
    "generic": VendorSpec("Generic", "LTE Modem", "1.0.0"),
    "quectel": VendorSpec("Quectel", "EC25", "EC25EFAR06A06M4G"),
    "ublox": VendorSpec("u-blox", "SARA-R410M-02B", "L0.0.00.00.05.08"),
    "simcom": VendorSpec("SIMCOM INCORPORATED", "SIMCOM_SIM7600E-H", "LE20B04SIM7600M22"),
    "telit": VendorSpec("Telit", "LE910C1-EUX", "25.21.660"),
    "huawei": VendorSpec("huawei", "ME909s-120", "11.617.01.00.00"),
}

CME_TEXT = {10: "SIM not inserted", 14: "SIM busy", 4: "operation not supported"}
_GARBAGE = bytes([*range(0x00, 0x09), *range(0x0E, 0x20), *range(0x80, 0x100)])
_JUNK = "!$%&'()*;<=>?@[]_{|}~"


def swap_nibbles(iccid: str) -> str:
    """EF_ICCID as the SIM stores it: F-padded to 20 digits, each digit pair swapped."""
    s = iccid.upper().ljust(20, "F")
    return "".join(s[i + 1] + s[i] for i in range(0, 20, 2))


class ModemEmulator:
    """One emulated modem served by a background thread on a pty or a TCP port."""

    def __init__(
        self,
        vendor: str = "quectel",
        *,
        identity: Identity | None = None,
        urcs: bool = True,
        seed: int | None = None,
        urc_interval: float = 1.0,
        tx_rate: float = 0.0,
        rx_rate: float = 0.0,
        counter_start: int = 0,
        slow_s: float = 2.0,
        link: Path | str | None = None,
        faults: tuple[str, ...] = (),
        reboot_s: float = 0.5,
    ) -> None:
        if vendor not in SPECS:
            raise ValueError(f"unknown vendor {vendor!r}; choose from {', '.join(VENDORS)}")
        self.vendor = vendor
        self.spec = SPECS[vendor]
        self.identity = identity or Identity()
        self.urcs_enabled = urcs
        self.urc_interval = urc_interval
        self.tx_rate = tx_rate
        self.rx_rate = rx_rate
        self.slow_s = slow_s
        self.link = Path(link) if link else None
        self.commands: deque[str] = deque(maxlen=2000)
        self.faults: set[str] = set()
        for f in faults:
            self._check_fault(f)
            self.faults.add(f)
        self.echo = True
        self.cmee = 0
        self.cops_format = 0
        self._rng = random.Random(seed)
        self.radio = RadioSim(vendor, seed)
        self._lock = threading.RLock()
        self._tx = float(counter_start)
        self._rx = float(counter_start)
        # Bytes counted since start, across counter resets: what a carrier would bill.
        self.counted = 0.0
        self.power = Power(self, reboot_s)
        self._accrued_at = time.monotonic()
        self._session_start = time.monotonic()
        self._out: list[tuple[float, bytes]] = []
        self._inbuf = bytearray()
        self._next_urc = time.monotonic() + self._urc_gap()
        self._next_garbage = time.monotonic()
        self._transport = ""
        self._master: int | None = None
        self._slave: int | None = None
        self._pty_path = ""
        self._listener: socket.socket | None = None
        self._client: socket.socket | None = None
        self._tcp_addr: tuple[str, int] = ("127.0.0.1", 0)
        self._calls: deque[tuple[Callable[[], None], threading.Event]] = deque()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_w, False)
        self._stop = False
        self._thread: threading.Thread | None = None

    # -- starting and stopping -----------------------------------------------------------

    def start_pty(self) -> str:
        """Serve on a new pty; returns its path (the link when one was given)."""
        self._transport = "pty"
        if "disconnect" not in self.faults:
            self._plug()
        self._start_thread()
        return self.url

    def start_tcp(self, host: str = "127.0.0.1", port: int = 0) -> str:
        """Serve on a TCP port (one client at a time); returns the socket:// URL."""
        self._transport = "tcp"
        self._tcp_addr = (host, port)
        self._plug()
        if "disconnect" in self.faults:
            self._unplug()
        self._start_thread()
        return self.url

    @property
    def url(self) -> str:
        """What to give pyserial: the pty path (or link), or socket://host:port."""
        if self._transport == "tcp":
            return f"socket://{self._tcp_addr[0]}:{self._tcp_addr[1]}"
        return str(self.link) if self.link else self._pty_path

    def stop(self) -> None:
        """Stop serving and release the pty or socket; idempotent."""
        self._stop = True
        self._wake()
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(5)
        self._thread = None
        self._unplug()
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> ModemEmulator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _start_thread(self) -> None:
        self._thread = threading.Thread(
            target=self._serve, name=f"modem-{self.vendor}", daemon=True
        )
        self._thread.start()

    # -- runtime control (any thread) -----------------------------------------------------

    def set_fault(self, name: str, on: bool = True) -> None:
        """Switch a fault on or off (no_sim, sim_busy, slow, silence, garbage, disconnect)."""
        self._check_fault(name)
        self._in_thread(lambda: self._set_fault(name, on))

    def clear_fault(self, name: str) -> None:
        """Switch a fault off."""
        self.set_fault(name, False)

    def clear_faults(self) -> None:
        """Switch every fault off."""
        for name in list(self.faults):
            self.set_fault(name, False)

    def power_cycle(self) -> None:
        """Power off and on: the port goes away for reboot_s, then the modem boots."""
        self._in_thread(self.power.power_cycle)

    def reset_counters(self) -> None:
        """Byte counters back to zero, as after a modem reboot."""
        with self._lock:
            self._accrue()
            self._tx = self._rx = 0.0
            self._session_start = time.monotonic()

    def reboot(self) -> None:
        """A modem reboot: counters to zero, echo on, verbose errors off, boot URCs."""
        with self._lock:
            self.reset_counters()
            self.echo = True
            self.cmee = 0
            self.cops_format = 0
            self.radio.reboot()
            for line in self._boot_urcs():
                self._emit(f"\r\n{line}\r\n".encode())
        self._wake()

    def add_traffic(self, tx: int, rx: int) -> None:
        """Count tx and rx bytes as if they had been sent and received."""
        with self._lock:
            self._accrue()
            self._tx += tx
            self._rx += rx
            self.counted += tx + rx

    def counters(self) -> tuple[int, int]:
        """The current (tx, rx) byte counters."""
        with self._lock:
            self._accrue()
            return int(self._tx), int(self._rx)

    def swap_sim(self, iccid: str, imsi: str | None = None) -> None:
        """A SIM hot-swap: new ICCID (and IMSI), announced with +CPIN URCs."""
        with self._lock:
            self.identity = replace(self.identity, iccid=iccid, imsi=imsi or self.identity.imsi)
            self._emit(b"\r\n+CPIN: NOT READY\r\n")
            self._emit(b"\r\n+CPIN: READY\r\n")
        self._wake()

    def set_registration(self, state: str) -> None:
        """Change the registration state and announce it with +CREG/+CEREG URCs."""
        if state not in REG_STATES:
            raise ValueError(f"unknown registration {state!r}; choose from {list(REG_STATES)}")
        with self._lock:
            self._accrue()
            self.identity = replace(self.identity, registration=state)
            stat = self._stat()
            cereg = self.radio.cereg_urc(stat, self._registered())
            self._emit(f"\r\n+CREG: {stat}\r\n\r\n{cereg}\r\n".encode())
        self._wake()

    def set_csq(self, csq: int) -> None:
        """Change the signal quality (0-31, 99 unknown)."""
        with self._lock:
            self.identity = replace(self.identity, csq=csq)

    def state(self) -> dict[str, Any]:
        """The emulator's state as plain data."""
        tx, rx = self.counters()
        with self._lock:
            return {
                "vendor": self.vendor,
                "url": self.url,
                "faults": sorted(self.faults),
                "echo": self.echo,
                "cmee": self.cmee,
                **self.power.state(),
                "tx_bytes": tx,
                "rx_bytes": rx,
                "identity": asdict(self.identity),
                "radio": self.radio.state(),
            }

    def control(self, line: str) -> str:
        """Apply one control-channel command; returns the reply line."""
        words = line.split()
        try:
            if not words:
                return "error: empty command"
            cmd, args = words[0].lower(), words[1:]
            if cmd == "fault" and len(args) == 2 and args[1] in ("on", "off"):
                self.set_fault(args[0], args[1] == "on")
            elif cmd == "reset_counters" and not args:
                self.reset_counters()
            elif cmd == "reboot" and not args:
                self.reboot()
            elif cmd == "power_cycle" and not args:
                self.power_cycle()
            elif cmd == "traffic" and len(args) == 2:
                self.add_traffic(int(args[0]), int(args[1]))
            elif cmd == "swap_sim" and len(args) in (1, 2):
                self.swap_sim(args[0], args[1] if len(args) == 2 else None)
            elif cmd == "registration" and len(args) == 1:
                self.set_registration(args[0])
            elif cmd == "csq" and len(args) == 1:
                self.set_csq(int(args[0]))
            elif cmd == "radio" and len(args) in (1, 2):
                with self._lock:
                    self.radio.set(args[0], args[1] if len(args) == 2 else "")
            elif cmd == "state" and not args:
                return json.dumps(self.state())
            else:
                return f"error: unknown command {line.strip()!r}"
        except ValueError as exc:
            return f"error: {exc}"
        return "ok"

    @staticmethod
    def _check_fault(name: str) -> None:
        if name not in FAULTS:
            raise ValueError(f"unknown fault {name!r}; choose from {', '.join(FAULTS)}")

    def _in_thread(self, fn: Callable[[], None]) -> None:
        """Run fn on the serving thread (it owns the file descriptors) and wait for it."""
        if self._thread is None or not self._thread.is_alive():
            fn()
            return
        done = threading.Event()
        self._calls.append((fn, done))
        self._wake()
        if not done.wait(5):
            raise TimeoutError("modem emulator thread did not respond within 5 s")

    def _set_fault(self, name: str, on: bool) -> None:
        with self._lock:
            self._accrue()
            was = name in self.faults
            if on:
                self.faults.add(name)
            else:
                self.faults.discard(name)
            if was == on:
                return
            if name == "disconnect":
                if on:
                    self._unplug()
                elif self._transport:
                    self._plug()
            elif name == "no_sim":
                self._emit(b"\r\n+CPIN: NOT INSERTED\r\n" if on else b"\r\n+CPIN: READY\r\n")
            elif name.startswith("unregistered"):
                stat = self._stat()
                cereg = self.radio.cereg_urc(stat, self._registered())
                self._emit(f"\r\n+CREG: {stat}\r\n\r\n{cereg}\r\n".encode())

    # -- transport (serving thread) -------------------------------------------------------

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def _plug(self) -> None:
        if self._transport == "pty":
            master, slave = os.openpty()
            # No line discipline on the modem's side: no kernel echo, no CR/LF translation.
            tty.setraw(slave)
            os.set_blocking(master, False)
            self._master, self._slave = master, slave
            self._pty_path = os.ttyname(slave)
            if self.link is not None:
                tmp = self.link.with_name(self.link.name + ".tmp")
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
                tmp.symlink_to(self._pty_path)
                tmp.replace(self.link)
        elif self._transport == "tcp":
            lsock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            lsock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            lsock.bind(self._tcp_addr)
            lsock.listen(4)
            lsock.setblocking(False)
            self._tcp_addr = (self._tcp_addr[0], lsock.getsockname()[1])
            self._listener = lsock

    def _unplug(self) -> None:
        for fd in (self._master, self._slave):
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self._master = self._slave = None
        if self.link is not None and self._transport == "pty":
            with contextlib.suppress(FileNotFoundError):
                self.link.unlink()
        for sock in (self._client, self._listener):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.close()
        self._client = self._listener = None
        self._inbuf.clear()
        self._out.clear()

    def _send(self, data: bytes) -> None:
        # A modem whose host does not read loses output; it never blocks on it.
        try:
            if self._master is not None:
                os.write(self._master, data)
            elif self._client is not None:
                self._client.send(data)
        except BlockingIOError:
            pass
        except OSError:
            self._drop_client()

    def _drop_client(self) -> None:
        if self._client is not None:
            with contextlib.suppress(OSError):
                self._client.close()
            self._client = None

    def _serve(self) -> None:
        while not self._stop:
            while self._calls:
                fn, done = self._calls.popleft()
                try:
                    fn()
                finally:
                    done.set()
            now = time.monotonic()
            with self._lock:
                wait = 0.2
                if self._out:
                    wait = min(wait, max(0.0, self._out[0][0] - now))
                if self.urcs_enabled:
                    wait = min(wait, max(0.0, self._next_urc - now))
                due = self.power.next_due()
                if due is not None:
                    wait = min(wait, max(0.0, due - now))
            rlist = [self._wake_r]
            for fd in (self._master, self._listener, self._client):
                if fd is not None:
                    rlist.append(fd)  # type: ignore[arg-type]
            try:
                ready, _, _ = select.select(rlist, [], [], wait)
            except (OSError, ValueError):
                ready = []  # an fd closed under us by a stop(); loop re-checks
            for r in ready:
                self._readable(r)
            with self._lock:
                self._tick(time.monotonic())

    def _readable(self, r: Any) -> None:
        if r == self._wake_r:
            with contextlib.suppress(OSError):
                os.read(self._wake_r, 4096)
            return
        if self._master is not None and r == self._master:
            try:
                data = os.read(self._master, 4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return  # EIO: nobody has the slave side open; we hold it, so rare
            self._received(data)
        elif self._listener is not None and r is self._listener:
            try:
                conn, _ = self._listener.accept()
            except OSError:
                return
            conn.setblocking(False)
            self._drop_client()  # one host per modem: the newest connection wins
            self._client = conn
            self._inbuf.clear()
        elif self._client is not None and r is self._client:
            try:
                data = self._client.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                data = b""
            if not data:
                self._drop_client()
                return
            self._received(data)

    # -- the modem ------------------------------------------------------------------------

    def _received(self, data: bytes) -> None:
        with self._lock:
            if "silence" in self.faults or not self.power.hears():
                return
            if self.echo:
                self._emit(data)
            self._inbuf += data
            while True:
                i = self._inbuf.find(b"\r")
                if i < 0:
                    if len(self._inbuf) > 4096:
                        self._inbuf.clear()
                    break
                raw = bytes(self._inbuf[:i])
                del self._inbuf[: i + 1]
                line = raw.decode("latin-1").replace("\n", "").strip()
                if not line.upper().startswith("AT"):
                    continue
                if self.power.mute():
                    self.power.heard_while_hung(line)
                else:
                    self._command(line)

    def _emit(self, data: bytes, delay: float = 0.0) -> None:
        if "silence" in self.faults or self.power.mute():
            return
        due = time.monotonic() + delay
        if self._out:
            due = max(due, self._out[-1][0])
        self._out.append((due, data))

    def _tick(self, now: float) -> None:
        while self._out and self._out[0][0] <= now:
            self._send(self._out.pop(0)[1])
        self.power.tick(now)
        if "silence" in self.faults or self.power.mute():
            return
        if self.urcs_enabled and now >= self._next_urc:
            self._next_urc = now + self._urc_gap()
            self._emit(f"\r\n{self._random_urc()}\r\n".encode())
        if "garbage" in self.faults and now >= self._next_garbage:
            self._next_garbage = now + self._rng.uniform(0.1, 0.5)
            self._emit(self._garbage_burst())

    def _urc_gap(self) -> float:
        return self._rng.uniform(0.3, 1.7) * self.urc_interval

    def _garbage_burst(self) -> bytes:
        burst = bytes(self._rng.choice(_GARBAGE) for _ in range(self._rng.randint(1, 24)))
        if self._rng.random() < 0.3:
            junk = "".join(self._rng.choice(_JUNK) for _ in range(self._rng.randint(1, 12)))
            burst += f"\r\n{junk}\r\n".encode()
        return burst

    def _command(self, line: str) -> None:
        self.commands.append(line)
        info, final = self._answer(line.upper(), line)
        if self.urcs_enabled and self._rng.random() < 0.3:
            info.insert(self._rng.randint(0, len(info)), self._random_urc())
        parts = [f"\r\n{x}\r\n".encode() for x in [*info, final]]
        if "garbage" in self.faults:
            parts = [self._garble(p) for p in parts]
        delay = self.slow_s if "slow" in self.faults else 0.0
        self._emit(b"".join(parts), delay)

    def _garble(self, part: bytes) -> bytes:
        if self._rng.random() < 0.5:
            part = self._garbage_burst() + part
        if self._rng.random() < 0.3 and len(part) > 4:
            # Non-printable bytes inside a line: stripped by the host, line stays intact.
            i = self._rng.randint(2, len(part) - 2)
            noise = bytes(self._rng.choice(_GARBAGE) for _ in range(3))
            part = part[:i] + noise + part[i:]
        return part

    # -- state helpers ------------------------------------------------------------------

    def _sim_error(self) -> int | None:
        if "no_sim" in self.faults:
            return 10
        if "sim_busy" in self.faults:
            return 14
        return None

    def _registered(self) -> bool:
        return self._stat() in (REG_STATES["home"], REG_STATES["roaming"])

    def _stat(self) -> int:
        if self._sim_error() == 10:
            return 0
        forced = self.power.stat()
        return forced if forced is not None else REG_STATES[self.identity.registration]

    def _accrue(self) -> None:
        now = time.monotonic()
        dt = now - self._accrued_at
        self._accrued_at = now
        if self._registered():
            self._tx += self.tx_rate * dt
            self._rx += self.rx_rate * dt
            self.counted += (self.tx_rate + self.rx_rate) * dt

    def _cme(self, code: int) -> str:
        if self.cmee == 0:
            return "ERROR"
        # Huawei firmware answers in words once +CME errors are on.
        if self.cmee == 2 or self.vendor == "huawei":
            return f"+CME ERROR: {CME_TEXT.get(code, 'unknown')}"
        return f"+CME ERROR: {code}"

    def _boot_urcs(self) -> list[str]:
        lines = ["RDY", "+CFUN: 1"]
        lines.append("+CPIN: NOT INSERTED" if self._sim_error() == 10 else "+CPIN: READY")
        if self.vendor == "quectel":
            lines += ["+QUSIM: 1", "+QIND: SMS DONE", "+QIND: PB DONE"]
        elif self.vendor == "huawei":
            lines += ["^SYSSTART"]
        elif self.vendor == "simcom":
            lines += ["SMS DONE", "PB DONE"]
        return lines

    def _random_urc(self) -> str:
        ident = self.identity
        stat = self._stat()
        cereg = self.radio.cereg_urc(stat, self._registered())
        common = [f"+CREG: {stat}", cereg, "+CGEV: ME PDN ACT 1", "RING", "+CFUN: 1"]
        if self._sim_error() is None:
            common.append("+CPIN: READY")
        extra = {
            "quectel": [f'+QIND: "csq",{ident.csq},99', "+QIND: SMS DONE", "+QIND: PB DONE"],
            "ublox": ['+UUPSDA: 0,"10.64.0.2"', "+CIEV: 2,3"],
            "simcom": ["SMS DONE", "PB DONE", "+CGEV: NW MODIFY 1,0"],
            "telit": ["#QSS: 1", "+CIEV: signal,3"],
            "huawei": [
                f"^RSSI: {ident.csq}",
                self.radio.hcsq_urc(self._registered()),
                "^DSFLOWRPT: 0000003C,00000000,00000000,0000000000001F40,"
                "0000000000002EE0,0003E800,0003E800",
                "^MODE: 17,17",
            ],
            "generic": [],
        }[self.vendor]
        return self._rng.choice(common + extra)

    # -- commands -------------------------------------------------------------------------

    def _answer(self, u: str, raw: str) -> tuple[list[str], str]:
        """(information lines, final result code) for one command line."""
        ident = self.identity
        v = self.vendor
        sim = self._sim_error()
        radio = self.radio.answer(u, self._stat(), self._registered(), ident.plmn)
        if radio is not None:
            return radio
        if u == "AT":
            return [], "OK"
        if u in ("ATE0", "ATE1", "ATE"):
            self.echo = u != "ATE0"
            return [], "OK"
        if u in ("ATV0", "ATV1", "ATZ", "AT&F"):
            return [], "OK"
        if u.startswith("AT+CMEE="):
            value = u.removeprefix("AT+CMEE=")
            if value not in ("0", "1", "2"):
                return [], "ERROR"
            self.cmee = int(value)
            return [], "OK"
        if u == "AT+CMEE?":
            return [f"+CMEE: {self.cmee}"], "OK"
        if u == "ATI":
            return [
                self.spec.manufacturer,
                self.spec.model,
                f"Revision: {self.spec.revision}",
            ], "OK"
        if u in ("AT+CGMI", "AT+GMI"):
            return [self.spec.manufacturer], "OK"
        if u in ("AT+CGMM", "AT+GMM"):
            return [self.spec.model], "OK"
        if u in ("AT+CGMR", "AT+GMR"):
            return [self.spec.revision], "OK"
        if u == "AT+CGSN":
            if v == "generic":
                return [], "ERROR"  # only the 3GPP Rel-11 AT+CGSN=1 form
            if v == "telit":
                return [f"+CGSN: {ident.imei}"], "OK"
            return [ident.imei], "OK"
        if u == "AT+CGSN=1":
            return [f'+CGSN: "{ident.imei}"'], "OK"
        power = self.power.answer(u)
        if power is not None:
            return power
        if u == "AT+CPIN?":
            return ([], self._cme(sim)) if sim else (["+CPIN: READY"], "OK")
        if u == "AT+CIMI":
            return ([], self._cme(sim)) if sim else ([ident.imsi], "OK")
        if u == "AT+CNUM":
            if sim:
                return [], self._cme(sim)
            if not ident.msisdn:
                return [], "OK"
            kind = 145 if ident.msisdn.startswith("+") else 129
            return [f'+CNUM: "","{ident.msisdn}",{kind}'], "OK"
        if u.startswith("AT+COPS=3,"):
            fmt = u.removeprefix("AT+COPS=3,")
            if fmt not in ("0", "1", "2"):
                return [], "ERROR"
            self.cops_format = int(fmt)
            return [], "OK"
        if u == "AT+COPS?":
            if not self._registered():
                return ["+COPS: 0"], "OK"
            oper = ident.plmn if self.cops_format == 2 else ident.operator
            return [f'+COPS: 0,{self.cops_format},"{oper}"{self.radio.cops_act}'], "OK"
        if u == "AT+CSQ":
            sep = ", " if v == "huawei" else ","
            return [f"+CSQ: {ident.csq}{sep}99"], "OK"
        if u in ("AT+CREG?", "AT+CGREG?", "AT+CEREG?"):
            name = u[2:-1]
            if v == "quectel" and name == "+CREG":
                return [f'{name}: 2,{self._stat()},"1A2B","01C3D4E",7'], "OK"
            return [f"{name}: 0,{self._stat()}"], "OK"
        if u == "AT+CGDCONT?":
            return [
                f'+CGDCONT: 1,"IP","{ident.apn}","0.0.0.0",0,0',
                '+CGDCONT: 2,"IPV4V6","ims","0.0.0.0",0,0',
            ], "OK"
        if u == "AT+CGACT?":
            return [f"+CGACT: 1,{int(self._registered())}", "+CGACT: 2,0"], "OK"
        if u == "AT+CRSM=176,12258,0,0,10":
            if sim:
                return [], self._cme(sim)
            return [f'+CRSM: 144,0,"{swap_nibbles(ident.iccid)}"'], "OK"
        vendor_answer = self._vendor_answer(u)
        if vendor_answer is not None:
            return vendor_answer
        return [], "ERROR"

    def _vendor_answer(self, u: str) -> tuple[list[str], str] | None:
        ident = self.identity
        v = self.vendor
        sim = self._sim_error()
        iccid_cmd = {
            "quectel": "AT+QCCID",
            "ublox": "AT+CCID",
            "simcom": "AT+CICCID",
            "telit": "AT#CCID",
            "huawei": "AT^ICCID?",
        }.get(v)
        if u == iccid_cmd:
            if sim:
                return [], self._cme(sim)
            padded = ident.iccid.upper().ljust(20, "F")
            line = {
                "quectel": f"+QCCID: {padded}",
                "ublox": f'+CCID: "{ident.iccid}",""',
                "simcom": f"+ICCID: {ident.iccid}",
                "telit": f"#CCID: {ident.iccid}",
                "huawei": f"^ICCID: {swap_nibbles(ident.iccid)}",
            }[v]
            return [line], "OK"
        self._accrue()
        tx, rx = int(self._tx), int(self._rx)
        if v == "quectel" and u == "AT+QGDCNT?":
            return [f"+QGDCNT: {tx},{rx}"], "OK"
        if v == "ublox" and u == "AT+UGCNTRD=?":
            return [], "OK"
        if v == "ublox" and u == "AT+UGCNTRD":
            return [f"+UGCNTRD: 1,{tx},{rx},{tx},{rx}"], "OK"
        if v == "telit" and u == "AT#GDATAVOL=2":
            return [f"#GDATAVOL: 1,{tx + rx},{tx},{rx}", "#GDATAVOL: 2,0,0,0"], "OK"
        if v == "huawei" and u == "AT^DSFLOWQRY":
            secs = int(time.monotonic() - self._session_start)
            return [
                f"^DSFLOWQRY:{secs:08X},{tx:016X},{rx:016X},{secs:08X},{tx:016X},{rx:016X}"
            ], "OK"
        return None


# -- the subprocess form (firmware_sim.modem_cli) -------------------------------------------


def main(argv: list[str]) -> int:
    """``python -m firmware_sim modem …``: see firmware_sim.modem_cli."""
    from firmware_sim.modem_cli import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The emulated modem's power and radio: AT+CFUN, reboots and the faults only they clear.

    AT+CFUN?          +CFUN: <fun>
    AT+CFUN=0 / =4    radio off: not registered, no traffic (clears the `unregistered` fault)
    AT+CFUN=1         radio on: registered again unless a fault holds it off
    AT+CFUN=1,1       reboot; also the vendors' own reset commands (u-blox AT+CFUN=16/15,
                      SIMCom AT+CRESET, Telit AT#REBOOT, Huawei AT^RESET)

A reboot answers OK, then the modem goes away for `reboot_s` seconds: a TCP port stops
listening and a pty with a link is closed (the link removed), then both come back (a new
pty, the link pointing at it); a pty without a link cannot be found again under a new
name, so it stays and is deaf and silent instead. Back up, the modem has echo on,
AT+CMEE=0 and its byte counters at zero, and sends its boot URCs (RDY …): over TCP to the
first host that connects, on a pty at once (where, as on a USB modem, a host that opens
the port later misses them). `power_cycle` (a control
command, standing in for a USB power switch) does the same at once, whatever the modem is
doing.

Faults only these clear:
    unregistered              not registered (searching) until a radio cycle, reboot or
                              power cycle
    unregistered_until_reset  not registered until a reboot or power cycle
    hung                      reads commands, answers none (no echo, no URCs), but still
                              obeys a reset command; a power cycle clears it too
    unresponsive              reads nothing, answers nothing, until a power cycle
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from firmware_sim.modem import ModemEmulator

POWER_FAULTS = ("unregistered", "unregistered_until_reset", "hung", "unresponsive")
# What each way of restarting the modem clears.
CLEARED_BY_RADIO = frozenset({"unregistered"})
CLEARED_BY_REBOOT = frozenset({"unregistered", "unregistered_until_reset", "hung"})
CLEARED_BY_POWER = frozenset(POWER_FAULTS)
VENDOR_RESETS = {
    "ublox": ("AT+CFUN=16", "AT+CFUN=15"),
    "simcom": ("AT+CRESET",),
    "telit": ("AT#REBOOT",),
    "huawei": ("AT^RESET",),
}
_CFUN_SET = re.compile(r"AT\+CFUN=(\d{1,2})(?:,([01]))?")
# Between the reset command's OK and the port going away: the OK reaches the host first.
DOWN_AFTER_S = 0.05


class Power:
    """Radio state, reboots and power cycles of one ModemEmulator (its lock held)."""

    def __init__(self, emu: ModemEmulator, reboot_s: float) -> None:
        self.emu = emu
        self.reboot_s = reboot_s
        self.cfun = 1
        self.booting = False
        self.reboots = 0
        self.power_cycles = 0
        self._unplugged = False
        self._announce = False  # boot URCs still to send
        self._timers: list[tuple[float, Callable[[], None]]] = []

    # -- what the rest of the emulator asks -------------------------------------------------

    def hears(self) -> bool:
        """False while nothing sent to the modem is read at all."""
        return not self.booting and "unresponsive" not in self.emu.faults

    def mute(self) -> bool:
        """True while the modem sends nothing (echo, answers, URCs)."""
        faults = self.emu.faults
        return self.booting or "hung" in faults or "unresponsive" in faults

    def stat(self) -> int | None:
        """The registration status a fault or the radio forces (None: the identity's)."""
        if self.booting or self.cfun != 1:
            return 0
        if "unregistered" in self.emu.faults or "unregistered_until_reset" in self.emu.faults:
            return 2  # searching, and never finding
        return None

    def is_reset(self, u: str) -> bool:
        """Whether the command line (upper case) reboots the modem."""
        if u in VENDOR_RESETS.get(self.emu.vendor, ()):
            return True
        m = _CFUN_SET.fullmatch(u)
        return m is not None and m.group(2) == "1"

    def answer(self, u: str) -> tuple[list[str], str] | None:
        """The answer to an AT+CFUN or reset command; None for any other command."""
        if u == "AT+CFUN?":
            return [f"+CFUN: {self.cfun}"], "OK"
        if self.is_reset(u):
            self.reboot()
            return [], "OK"
        m = _CFUN_SET.fullmatch(u)
        if m is None:
            return None
        fun = int(m.group(1))
        if fun not in (0, 1, 4):
            return [], self.emu._cme(4)
        self.set_cfun(fun)
        return [], "OK"

    def heard_while_hung(self, line: str) -> None:
        """A hung modem obeys a reset command, silently."""
        if self.is_reset(line.strip().upper()):
            self.reboot()

    # -- changes ------------------------------------------------------------------------

    def set_cfun(self, fun: int) -> None:
        emu = self.emu
        emu._accrue()
        self.cfun = fun
        if fun != 1:
            emu.faults -= CLEARED_BY_RADIO
        cereg = emu.radio.cereg_urc(emu._stat(), emu._registered())
        emu._emit(f"\r\n+CFUN: {fun}\r\n\r\n{cereg}\r\n".encode())

    def reboot(self) -> None:
        """A reboot asked for by a command: down after its OK, up after reboot_s."""
        self.reboots += 1
        self._at(time.monotonic() + DOWN_AFTER_S, lambda: self._down(CLEARED_BY_REBOOT))

    def power_cycle(self) -> None:
        """Power off and on again (serving thread): down now, up after reboot_s."""
        with self.emu._lock:
            self.power_cycles += 1
            self._timers.clear()
            self._down(CLEARED_BY_POWER)

    def state(self) -> dict[str, Any]:
        """The power side of the emulator's state."""
        return {
            "cfun": self.cfun,
            "booting": self.booting,
            "reboots": self.reboots,
            "power_cycles": self.power_cycles,
            "counted_bytes": int(self.emu.counted),
        }

    def movable_port(self) -> bool:
        """Whether a reboot can take the port away and bring it back where the host finds
        it: a TCP port, or a pty behind a link."""
        emu = self.emu
        return emu._transport == "tcp" or (emu._transport == "pty" and emu.link is not None)

    def tick(self, now: float) -> None:
        """Run the timers that are due (serving thread, lock held)."""
        while self._timers and self._timers[0][0] <= now:
            _, fn = self._timers.pop(0)
            fn()
        emu = self.emu
        # A TCP port's boot URCs go to the first host that connects after the boot.
        if self._announce and (emu._transport != "tcp" or emu._client is not None):
            self._announce = False
            for line in emu._boot_urcs():
                emu._emit(f"\r\n{line}\r\n".encode())

    def next_due(self) -> float | None:
        return self._timers[0][0] if self._timers else None

    def _at(self, due: float, fn: Callable[[], None]) -> None:
        self._timers.append((due, fn))
        self._timers.sort(key=lambda t: t[0])

    def _down(self, clears: frozenset[str]) -> None:
        emu = self.emu
        emu._accrue()
        emu.faults -= clears
        emu.reset_counters()
        emu.echo = True
        emu.cmee = 0
        emu.cops_format = 0
        emu.radio.reboot()
        self.cfun = 1
        self.booting = True
        self._announce = False
        emu._out.clear()
        emu._inbuf.clear()
        if self.movable_port() and not self._unplugged:
            emu._unplug()
            self._unplugged = True
        self._at(time.monotonic() + self.reboot_s, self._up)

    def _up(self) -> None:
        emu = self.emu
        emu._accrue()  # nothing counted while it was down
        self.booting = False
        if self._unplugged and "disconnect" not in emu.faults:
            emu._plug()
        self._unplugged = False
        self._announce = True

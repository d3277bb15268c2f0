"""AT command channel over pyserial: serialised commands, echo/URC/garbage-tolerant parsing.

The parser never relies on line positions. Every received line is classified on its own:
the echo of the pending command, a final result code, an unsolicited result code (URC),
an answer line, or noise. A command that expects ``+XYZ:`` answers (``AT+XYZ?``) only ever
collects lines starting with ``+XYZ:``; a "bare" command (``AT+CIMI``, ``AT+CGSN``, ``ATI``)
collects every line that is not a known URC. URCs go to ``AtChannel.urcs`` and ``on_urc``.
"""

from __future__ import annotations

import collections
import contextlib
import errno
import logging
import re
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from enum import Enum
from typing import Any, Protocol

import serial

from gateway.errors import ModemError

log = logging.getLogger("gateway.modem.at")

# Read granularity: short enough that a close() or a deadline is noticed quickly.
READ_SLICE_S = 0.05
# A line without a terminator longer than this is a garbage flood, not an answer.
MAX_LINE = 4096
INIT_COMMANDS = ("AT", "ATE0", "ATV1", "AT+CMEE=1")


class AtTimeout(ModemError):
    """The modem did not finish answering a command in time."""

    def __init__(self, command: str, timeout: float, partial: list[str] | None = None) -> None:
        self.command = command
        self.timeout = timeout
        self.partial = list(partial or [])
        super().__init__(f"modem did not answer {command} within {timeout:g} s")


class AtCommandError(ModemError):
    """The modem answered a command with ERROR, +CME ERROR, +CMS ERROR or NO CARRIER."""

    def __init__(self, command: str, final: str) -> None:
        self.command = command
        self.final = final
        self.code, self.text = parse_error(final)
        super().__init__(f"{command}: {final}")

    @property
    def is_cme(self) -> bool:
        return self.final.upper().startswith("+CME ERROR")


class AtParseError(ModemError):
    """The modem answered, but not in a form the gateway understands."""


class PortError(ModemError):
    """The serial port cannot be opened, read or written (unplugged, wrong URL, closed)."""


class PortBusy(PortError):
    """Another process holds the port's exclusive lock (a running gateway's poller)."""


# 3GPP TS 27.007 §9.2: numeric +CME ERROR codes and their verbose (AT+CMEE=2) texts.
CME_TEXTS: dict[str, int] = {
    "phone failure": 0,
    "no connection to phone": 1,
    "operation not allowed": 3,
    "operation not supported": 4,
    "ph-sim pin required": 5,
    "sim not inserted": 10,
    "sim pin required": 11,
    "sim puk required": 12,
    "sim failure": 13,
    "sim busy": 14,
    "sim wrong": 15,
    "incorrect password": 16,
    "sim pin2 required": 17,
    "sim puk2 required": 18,
    "memory full": 20,
    "invalid index": 21,
    "not found": 22,
    "memory failure": 23,
    "no network service": 30,
    "network timeout": 31,
    "network not allowed - emergency calls only": 32,
    "unknown": 100,
}
CME_SIM_NOT_INSERTED = 10
CME_SIM_BUSY = 14

_ERROR_WORDS = frozenset({"ERROR", "NO CARRIER", "NO DIALTONE", "BUSY", "NO ANSWER", "ABORTED"})

# Known unsolicited result codes (the part before ':'), upper case.
URC_PREFIXES = frozenset(
    {
        "+CFUN",
        "+CPIN",
        "+QIND",
        "+QUSIM",
        "+QSTAT",
        "+QNITZ",
        "+QSIMSTAT",
        "+CREG",
        "+CEREG",
        "+CGREG",
        "+C5GREG",
        "+CGEV",
        "+CRING",
        "+CMTI",
        "+CMT",
        "+CDSI",
        "+CBM",
        "+CDS",
        "+CUSD",
        "+CIEV",
        "+CTZV",
        "+CTZE",
        "+CTZDST",
        "+CCWA",
        "+CLIP",
        "+UUPSDA",
        "+UUPSDD",
        "+UUSORD",
        "+UUSOCL",
        "+UUSIMSTAT",
        "+UUSTATE",
        "+UMWI",
        "+CPINR",
        "+STIN",
        "+PACSP",
        "+NITZ",
        "*PSUTTZ",
        "*PSNWID",
        "*PSSMINI",
        "#QSS",
        "#NITZ",
        "#STN",
        "^RSSI",
        "^HCSQ",
        "^DSFLOWRPT",
        "^MODE",
        "^SRVST",
        "^SIMST",
        "^STIN",
        "^NDISSTAT",
        "^NDISEND",
        "^CEND",
        "^CONN",
        "^ORIG",
        "^CONF",
        "^BOOT",
        "^SYSSTART",
        "^NWTIME",
        "^RFSWITCH",
        "^EONS",
    }
)
# URCs that are a whole line without a ':'.
URC_WORDS = frozenset(
    {
        "RDY",
        "RING",
        "SMS DONE",
        "PB DONE",
        "CALL READY",
        "SMS READY",
        "^SYSSTART",
        "+PACSP0",
        "+PACSP1",
        "POWERED DOWN",
        "NORMAL POWER DOWN",
    }
)
# URCs a modem sends when it has (re)booted, with echo on and settings at defaults.
_BOOT_URCS = frozenset({"RDY", "^SYSSTART", "+PACSP0", "+PACSP1"})
# Registration queries answer "<n>,<stat>[,...]"; the unsolicited forms are "<stat>" or
# "<stat>,"<lac>",...", so a single field or a quoted second field means a URC.
_REG_PREFIXES = frozenset({"+CREG", "+CEREG", "+CGREG", "+C5GREG"})

_HEAD_RE = re.compile(r"([+^#$%*][A-Za-z0-9_]+)\s*:")
_URC_ANYWHERE_RE = re.compile(
    "(" + "|".join(re.escape(p) for p in sorted(URC_PREFIXES, key=len, reverse=True)) + r")\s*:",
    re.IGNORECASE,
)
_CMD_NAME_RE = re.compile(r"^AT([+^#$%*][A-Za-z0-9_]+)", re.IGNORECASE)
# Everything but printable ASCII is line noise once lines are split on CR/LF.
_DELETE = bytes(b for b in range(256) if not 0x20 <= b <= 0x7E)


class Kind(Enum):
    """What a received line is, relative to the pending command."""

    NOISE = "noise"
    ECHO = "echo"
    FINAL_OK = "ok"
    FINAL_ERROR = "error"
    URC = "urc"
    ANSWER = "answer"


@dataclass(frozen=True, slots=True)
class Pending:
    """The command being answered: what its echo and its answer lines look like."""

    command: str
    prefix: str | None = None
    bare: bool = False
    numeric: bool = False


def expected_prefix(command: str) -> str | None:
    """The answer prefix of an extended command: AT+CSQ -> '+CSQ', ATE0 -> None."""
    m = _CMD_NAME_RE.match(command.strip())
    return m.group(1).upper() if m else None


def parse_error(final: str) -> tuple[int | None, str]:
    """(code, text) of a final error line; the code is looked up for verbose +CME texts."""
    upper = final.upper()
    for head in ("+CME ERROR", "+CMS ERROR"):
        if upper.startswith(head):
            rest = final[len(head) :].lstrip(" :").strip().strip('"')
            if rest.isdigit():
                return int(rest), rest
            code = CME_TEXTS.get(rest.lower()) if head == "+CME ERROR" else None
            return code, rest
    return None, final


def clean(raw: bytes) -> str:
    """A received line without NULs, control characters, bytes >= 0x80 and outer blanks."""
    return raw.translate(None, _DELETE).decode("ascii").strip()


def _is_final(line: str) -> Kind | None:
    upper = line.upper()
    if upper == "OK":
        return Kind.FINAL_OK
    if upper in _ERROR_WORDS or upper.startswith(("+CME ERROR", "+CMS ERROR")):
        return Kind.FINAL_ERROR
    return None


def _reg_answer_form(payload: str) -> bool:
    fields = [f.strip() for f in payload.split(",")]
    return len(fields) >= 2 and fields[1].isdigit()


def classify(line: str, pending: Pending | None) -> tuple[Kind, str]:
    """Classify one cleaned line; returns the kind and the line as it should be kept."""
    if not line:
        return Kind.NOISE, line
    upper = line.upper()
    final = _is_final(line)
    if pending is None:
        if final is not None:
            return Kind.NOISE, line  # a stale result of a command that timed out
    else:
        if pending.numeric and upper in ("0", "4"):
            return (Kind.FINAL_OK if upper == "0" else Kind.FINAL_ERROR), line
        if final is not None:
            return final, line
    m = _HEAD_RE.match(line)
    head = m.group(1).upper() if m else None
    want = pending.prefix if pending is not None else None
    if m is not None and head == want:
        if head in _REG_PREFIXES and not _reg_answer_form(line[m.end() :]):
            return Kind.URC, line
        return Kind.ANSWER, line
    if head in URC_PREFIXES or upper in URC_WORDS:
        return Kind.URC, line
    # The echo of the command, possibly with garbage glued in front of it.
    if pending is not None and upper.endswith(pending.command.upper()):
        return Kind.ECHO, line
    if head is None:
        # A known URC behind leading garbage is still a URC, never an answer.
        found = _URC_ANYWHERE_RE.search(line)
        if found is not None and found.group(1).upper() != want:
            return Kind.URC, line[found.start() :]
    if pending is not None and pending.bare:
        return Kind.ANSWER, line
    # An unknown "+XYZ:" line that nobody asked for is unsolicited; anything else is noise.
    return (Kind.URC if head is not None else Kind.NOISE), line


class SerialLike(Protocol):
    """The part of pyserial's Serial the channel uses (tests substitute an in-memory one)."""

    timeout: float | None

    def read(self, size: int = 1) -> bytes: ...

    def write(self, data: bytes, /) -> int | None: ...

    @property
    def in_waiting(self) -> int: ...

    def close(self) -> None: ...


class AtChannel:
    """One modem port: commands are serialised by a lock and may come from any thread."""

    def __init__(
        self,
        port: SerialLike,
        *,
        name: str = "modem",
        timeout: float = 5.0,
        on_urc: Callable[[str], None] | None = None,
    ) -> None:
        self.port = port
        self.name = name
        self.timeout = timeout
        self.on_urc = on_urc
        self.urcs: collections.deque[str] = collections.deque(maxlen=256)
        self.noise_lines = 0
        # Set when the modem shows it lost its settings (echo again, RDY after a reboot).
        self.needs_init = True
        self._buf = bytearray()
        self._lock = threading.Lock()
        self._closing = False
        self._closed = False

    @classmethod
    def open(
        cls,
        url: str,
        *,
        baudrate: int = 115200,
        timeout: float = 5.0,
        on_urc: Callable[[str], None] | None = None,
        exclusive: bool = False,
    ) -> AtChannel:
        """Open a pyserial URL (a tty, a pty path, socket://, rfc2217://) as an AT channel.

        exclusive: hold an flock on a tty while it is open (socket:// ignores it); opening
        one another process holds so raises PortBusy."""
        try:
            port = serial.serial_for_url(
                url,
                baudrate=baudrate,
                timeout=READ_SLICE_S,
                write_timeout=timeout,
                do_not_open=True,
                exclusive=exclusive or None,
            )
        except (serial.SerialException, OSError, ValueError) as exc:
            raise PortError(f"cannot open modem port {url}: {exc}") from exc
        try:
            port.open()
        except (serial.SerialException, OSError, ValueError) as exc:
            # pyserial leaves a half-open port (a socket:// one whose peer went away during
            # open) to the garbage collector; close what it holds now.
            _discard(port)
            if exclusive and getattr(exc, "errno", None) in (errno.EAGAIN, errno.EWOULDBLOCK):
                raise PortBusy(f"modem port {url} is in use by another process") from exc
            raise PortError(f"cannot open modem port {url}: {exc}") from exc
        ch = cls(port, name=url, timeout=timeout, on_urc=on_urc)
        try:
            port.reset_input_buffer()
        except (serial.SerialException, OSError, AttributeError):
            pass  # a socket:// port may not support it; init() drains anyway
        return ch

    # -- lifecycle ------------------------------------------------------------------------

    def close(self) -> None:
        """Close the port; never blocks: a command in progress closes it when it ends."""
        self._closing = True
        if self._lock.acquire(blocking=False):
            try:
                self._close_port()
            finally:
                self._lock.release()

    def __enter__(self) -> AtChannel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _close_port(self) -> None:
        if self._closed:
            return
        self._closed = True
        _discard(self.port)

    # -- commands -------------------------------------------------------------------------

    def init(self) -> None:
        """Synchronise, turn echo off, verbose result codes and numeric +CME errors on."""
        for attempt in range(3):
            try:
                self.command("AT", timeout=min(self.timeout, 1.0), numeric=True)
                break
            except AtTimeout:
                if attempt == 2:
                    raise
            except AtCommandError:
                break  # it answered: good enough to go on
        self.command("ATE0", numeric=True)
        self.command("ATV1", numeric=True)
        try:
            self.command("AT+CMEE=1")
        except AtCommandError as exc:
            log.debug("%s: %s", self.name, exc)
        self.needs_init = False

    def command(
        self,
        cmd: str,
        *,
        prefix: str | None = None,
        bare: bool = False,
        timeout: float | None = None,
        numeric: bool = False,
    ) -> list[str]:
        """Send cmd; return its answer lines (prefix mode: only lines with the prefix).

        Without prefix and bare, the prefix is derived from the command (AT+CSQ -> +CSQ).
        """
        if prefix is None and not bare:
            prefix = expected_prefix(cmd)
        pending = Pending(
            cmd.strip(), prefix.rstrip(":").upper() if prefix else None, bare, numeric
        )
        limit = self.timeout if timeout is None else timeout
        with self._lock:
            try:
                return self._transact(pending, limit)
            finally:
                if self._closing:
                    self._close_port()

    def poll_urcs(self) -> list[str]:
        """Read whatever is pending without sending anything; return the URCs found."""
        with self._lock:
            try:
                return self._drain()
            finally:
                if self._closing:
                    self._close_port()

    def wait_boot(self, seconds: float) -> bool:
        """Listen without sending for up to `seconds`: True once the modem announces a
        (re)boot (RDY, ^SYSSTART), False when it does not; PortError when the port goes
        away, as a rebooting USB modem's does."""
        with self._lock:
            try:
                self._check_open()
                deadline = time.monotonic() + seconds
                while (line := self._next_line(deadline)) is not None:
                    kind, text = classify(line, None)
                    if kind is Kind.URC:
                        self._urc(text)
                        if text.upper() in _BOOT_URCS:
                            return True
                return False
            finally:
                if self._closing:
                    self._close_port()

    def _transact(self, pending: Pending, limit: float) -> list[str]:
        self._check_open()
        self._drain()
        self._write((pending.command + "\r").encode("ascii", "replace"))
        deadline = time.monotonic() + limit
        answer: list[str] = []
        while True:
            line = self._next_line(deadline)
            if line is None:
                raise AtTimeout(pending.command, limit, answer)
            kind, text = classify(line, pending)
            if kind is Kind.ANSWER:
                answer.append(text)
            elif kind is Kind.FINAL_OK:
                return answer
            elif kind is Kind.FINAL_ERROR:
                raise AtCommandError(pending.command, text)
            elif kind is Kind.URC:
                self._urc(text)
            elif kind is Kind.ECHO:
                if pending.command.upper() not in INIT_COMMANDS:
                    self.needs_init = True
            elif kind is Kind.NOISE:
                self.noise_lines += 1
                log.debug("%s: ignored %r while waiting for %s", self.name, text, pending.command)

    def _drain(self) -> list[str]:
        """Route URCs that arrived between commands; drop stale answer lines."""
        found: list[str] = []
        self._check_open()
        try:
            # Bounded: a port that floods us must not keep the drain going forever.
            for _ in range(16):
                waiting = self.port.in_waiting
                if not waiting:
                    break
                self._buf += self.port.read(min(waiting, 4096))
        except (serial.SerialException, OSError, ValueError, TypeError) as exc:
            raise PortError(f"cannot read modem port {self.name}: {exc}") from exc
        while (line := self._pop_line()) is not None:
            kind, text = classify(line, None)
            if kind is Kind.URC:
                self._urc(text)
                found.append(text)
            elif line:
                self.noise_lines += 1
        return found

    def _urc(self, line: str) -> None:
        if line.upper() in _BOOT_URCS:
            self.needs_init = True
        self.urcs.append(line)
        if self.on_urc is not None:
            try:
                self.on_urc(line)
            except Exception:
                log.exception("%s: URC callback failed for %r", self.name, line)

    def _check_open(self) -> None:
        if self._closing or self._closed:
            raise PortError(f"modem port {self.name} is closed")

    def _write(self, data: bytes) -> None:
        try:
            self.port.write(data)
        except (serial.SerialException, OSError, ValueError, TypeError) as exc:
            raise PortError(f"cannot write modem port {self.name}: {exc}") from exc

    def _pop_line(self) -> str | None:
        buf = self._buf
        cr, lf = buf.find(b"\r"), buf.find(b"\n")
        ends = [i for i in (cr, lf) if i >= 0]
        if ends:
            i = min(ends)
            raw = bytes(buf[:i])
            del buf[: i + 1]
            return clean(raw)
        if len(buf) > MAX_LINE:
            self.noise_lines += 1
            del buf[:]
        return None

    def _next_line(self, deadline: float) -> str | None:
        """The next non-empty line, or None when the deadline passes first."""
        while True:
            line = self._pop_line()
            while line is not None:
                if line:
                    return line
                line = self._pop_line()
            if self._closing:
                raise PortError(f"modem port {self.name} is closed")
            if time.monotonic() >= deadline:
                return None
            self._buf += self._read()

    def _read(self) -> bytes:
        try:
            waiting = self.port.in_waiting
            return self.port.read(max(1, min(waiting, 4096)))
        except (serial.SerialException, OSError, ValueError, TypeError) as exc:
            raise PortError(f"cannot read modem port {self.name}: {exc}") from exc


def _discard(port: Any) -> None:
    """Close a port, and the socket a socket:// port holds: pyserial skips closing it when
    shutdown() fails (the peer already gone) or when open() failed half-way, and leaves
    it to the garbage collector."""
    sock = getattr(port, "_socket", None)
    with contextlib.suppress(serial.SerialException, OSError, AttributeError):
        port.close()
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.close()


def values(lines: list[str], prefix: str) -> list[str]:
    """The payloads of lines starting with prefix ('+CSQ' -> '20,99'), in order."""
    out: list[str] = []
    want = prefix.rstrip(":").upper()
    for line in lines:
        m = _HEAD_RE.match(line)
        if m is not None and m.group(1).upper() == want:
            out.append(line[m.end() :].strip())
    return out


def split_fields(payload: str) -> list[str]:
    """Comma-separated fields; commas inside double quotes do not split; quotes are kept."""
    fields: list[str] = []
    cur: list[str] = []
    quoted = False
    for ch in payload:
        if ch == '"':
            quoted = not quoted
            cur.append(ch)
        elif ch == "," and not quoted:
            fields.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    fields.append("".join(cur).strip())
    return fields


def unquote(field: str) -> str:
    """A field without its surrounding double quotes."""
    field = field.strip()
    if len(field) >= 2 and field[0] == field[-1] == '"':
        return field[1:-1]
    return field.strip('"')


def describe(exc: BaseException) -> str:
    """A one-line description of an error for logs and snapshots."""
    lines = str(exc).splitlines()
    return lines[0] if lines else type(exc).__name__

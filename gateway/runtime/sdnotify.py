"""The sd_notify protocol: datagrams of `KEY=value` lines to the socket in $NOTIFY_SOCKET.

No libsystemd: the protocol is one `sendto` on an AF_UNIX datagram socket. A path that
starts with `@` names a socket in the abstract namespace. Without $NOTIFY_SOCKET (not
started by systemd) every call does nothing.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("gateway.sdnotify")


def socket_address(value: str) -> str | bytes:
    """$NOTIFY_SOCKET as an address for sendto: `@name` is the abstract `\\0name`."""
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


class Notifier:
    """Sends state changes to the service manager; never raises."""

    def __init__(self, address: str | bytes | None) -> None:
        self.address = address
        self._sock: socket.socket | None = None
        self._failed = False
        if address is not None:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.setblocking(False)

    @classmethod
    def from_env(cls) -> Notifier:
        """A notifier for $NOTIFY_SOCKET (only unix paths and abstract names are supported)."""
        value = os.environ.get("NOTIFY_SOCKET", "")
        if not value or not value.startswith(("/", "@")):
            return cls(None)
        return cls(socket_address(value))

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, *lines: str) -> bool:
        """One datagram with `lines` (e.g. "READY=1", "STATUS=…"); False if not delivered."""
        if self._sock is None or self.address is None:
            return False
        data = "\n".join(line.replace("\n", " ") for line in lines).encode()
        try:
            self._sock.sendto(data, self.address)
        except OSError as exc:
            if not self._failed:
                log.warning("cannot notify the service manager at %r: %s", self.address, exc)
            self._failed = True
            return False
        self._failed = False
        return True

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def watchdog_interval_s() -> float | None:
    """$WATCHDOG_USEC in seconds when the watchdog is meant for this process, else None."""
    usec = os.environ.get("WATCHDOG_USEC", "")
    pid = os.environ.get("WATCHDOG_PID", "")
    if pid and pid != str(os.getpid()):
        return None
    try:
        value = int(usec)
    except ValueError:
        return None
    return value / 1e6 if value > 0 else None


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, as RELOADING=1 wants it in MONOTONIC_USEC."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

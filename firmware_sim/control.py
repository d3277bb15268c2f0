"""The modem emulator's control port, and a client that sends it one command.

    python -m firmware_sim modem-control 127.0.0.1:7001 power_cycle
    python -m firmware_sim modem-control 127.0.0.1:7001 fault hung on

Prints the reply; exits 0 for ``ok`` or a state line, 1 for an error reply, 2 when the
emulator cannot be reached. It stands in for a power switch's tool (uhubctl, a GPIO
relay) in a gateway's modem.recovery.power_cycle_command.
"""

from __future__ import annotations

import socket
import socketserver
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from firmware_sim.modem import ModemEmulator

TIMEOUT_S = 5.0


class _Handler(socketserver.StreamRequestHandler):
    def handle(self) -> None:
        emu: ModemEmulator = self.server.emulator  # type: ignore[attr-defined]
        for raw in self.rfile:
            reply = emu.control(raw.decode("utf-8", "replace"))
            self.wfile.write(reply.encode() + b"\n")
            self.wfile.flush()


class ControlServer(socketserver.ThreadingTCPServer):
    """The emulator's control port: one text command a line, one reply line each."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: tuple[str, int], emulator: ModemEmulator) -> None:
        super().__init__(address, _Handler)
        self.emulator = emulator


def main(argv: list[str]) -> int:
    if len(argv) < 2:
        print(
            "usage: python -m firmware_sim modem-control HOST:PORT COMMAND [ARGS…]", file=sys.stderr
        )
        return 2
    host, sep, port = argv[0].rpartition(":")
    if not sep or not port.isdigit():
        print(f"modem-control: expected HOST:PORT, got {argv[0]!r}", file=sys.stderr)
        return 2
    try:
        with socket.create_connection((host or "127.0.0.1", int(port)), timeout=TIMEOUT_S) as s:
            f = s.makefile("rw", encoding="utf-8", newline="\n")
            f.write(" ".join(argv[1:]) + "\n")
            f.flush()
            reply = f.readline().strip()
    except OSError as exc:
        print(f"modem-control: cannot reach {argv[0]}: {exc}", file=sys.stderr)
        return 2
    print(reply)
    return 1 if not reply or reply.startswith("error") else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""The cellular modem: AT channel, vendor profiles, poller and `modem info`."""

from __future__ import annotations

from gateway.modem.at import AtChannel, AtCommandError, AtParseError, AtTimeout, PortError
from gateway.modem.profiles import ModemInfo

__all__ = [
    "AtChannel",
    "AtCommandError",
    "AtParseError",
    "AtTimeout",
    "ModemInfo",
    "PortError",
]

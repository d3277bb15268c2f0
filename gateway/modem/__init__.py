"""The cellular modem: AT channel, vendor profiles, poller, recovery ladder, and the
`modem info` and `modem reset` commands."""

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

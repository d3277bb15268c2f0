"""`gateway modem info`: open the port, read everything once, print it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from gateway.errors import ModemError
from gateway.modem.at import AtChannel
from gateway.modem.profiles import SYSFS_NET, ModemInfo, detect, make_profile, read_all


def read(
    port: str,
    profile: str = "auto",
    *,
    timeout: float = 5.0,
    interface: str = "wwan0",
    baudrate: int = 115200,
    sysfs_root: Path = SYSFS_NET,
) -> ModemInfo:
    """Open port, initialise the modem, detect or apply the profile and read everything."""
    if profile != "auto":
        make_profile(profile)  # a typo is reported before the port is touched
    with AtChannel.open(port, baudrate=baudrate, timeout=timeout) as ch:
        ch.init()
        prof = detect(ch, profile, interface=interface, sysfs_root=sysfs_root)
        return read_all(ch, prof)


def _show(value: Any) -> str:
    return "-" if value is None or value == "" else str(value)


def format_text(info: ModemInfo) -> str:
    """A readable 'key: value' list, one field per line; failures at the end."""
    d = info.to_dict()
    failed: dict[str, str] = d.pop("failed")
    width = max(len(k) for k in d)
    lines = [f"{k + ':':<{width + 1}} {_show(v)}" for k, v in d.items()]
    for step, reason in failed.items():
        lines.append(f"{'failed:':<{width + 1}} {step}: {reason}")
    return "\n".join(lines)


def command(
    port: str,
    profile: str = "auto",
    as_json: bool = False,
    timeout: float = 5.0,
    interface: str = "wwan0",
    *,
    baudrate: int = 115200,
    sysfs_root: Path = SYSFS_NET,
) -> int:
    """Print the modem's identity, signal, registration and counters; 2 on a modem error."""
    try:
        info = read(
            port,
            profile,
            timeout=timeout,
            interface=interface,
            baudrate=baudrate,
            sysfs_root=sysfs_root,
        )
    except ModemError as exc:
        print(f"modem info: {exc}", file=sys.stderr)
        return 2
    if as_json:
        print(json.dumps(info.to_dict(), indent=2))
    else:
        print(format_text(info))
    return 0

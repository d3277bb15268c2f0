"""A wall clock that a test sets for one gateway process, with libfaketime.

Debian's libfaketime is preloaded into the process and reads a relative offset ("+0",
"-3600", "+2d") from a file the test rewrites; every read of the clock reads the file
again. Only CLOCK_REALTIME moves (FAKETIME_DONT_FAKE_MONOTONIC=1), as with `date -s` or
NTP stepping the clock; file times are left alone (NO_FAKE_STAT=1), as they are then too.
"""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

LIBRARY_GLOB = "/usr/lib/*/faketime/libfaketime.so.1"

# libfaketime 0.9.10 (Debian 12) with FAKETIME_DONT_FAKE_MONOTONIC=1 passes the kernel a
# negative time for clock_nanosleep(CLOCK_MONOTONIC, TIMER_ABSTIME), which is how
# time.sleep() sleeps since Python 3.11: it raises EINVAL (libfaketime issue #426).
# The gateway's process gets a time.sleep() that waits in select(), which libfaketime
# leaves alone; nothing else in it changes.
SITECUSTOMIZE = '''\
"""Test-only: time.sleep() through select(), for libfaketime issue #426."""
import select
import time


def _sleep(seconds):
    if seconds < 0:
        raise ValueError("sleep length must be non-negative")
    deadline = time.monotonic() + seconds
    while (left := deadline - time.monotonic()) > 0:
        select.select([], [], [], left)


time.sleep = _sleep
'''


def library() -> Path | None:
    """libfaketime.so.1 from Debian's package, or None when it is not installed."""
    found = sorted(glob.glob(LIBRARY_GLOB))
    return Path(found[0]) if found else None


class WallClock:
    """The offset of a gateway process's wall clock from the real one; starts at "+0"."""

    def __init__(self, workdir: Path, lib: Path) -> None:
        self.lib = lib
        self.file = workdir / "faketime.offset"
        self.shim = workdir / "faketime-shim"
        self.shim.mkdir(parents=True, exist_ok=True)
        (self.shim / "sitecustomize.py").write_text(SITECUSTOMIZE)
        self.set("+0")

    def env(self) -> dict[str, str]:
        """Environment variables that put a process on this clock."""
        path = [str(self.shim), *filter(None, [os.environ.get("PYTHONPATH")])]
        return {
            "LD_PRELOAD": str(self.lib),
            "FAKETIME_TIMESTAMP_FILE": str(self.file),
            "FAKETIME_DONT_FAKE_MONOTONIC": "1",
            "FAKETIME_NO_CACHE": "1",
            "NO_FAKE_STAT": "1",
            "PYTHONPATH": os.pathsep.join(path),
        }

    def set(self, offset: str) -> None:
        """Move the clock: a relative offset in libfaketime's syntax ("-3600", "+2d")."""
        tmp = self.file.with_name(self.file.name + ".tmp")
        tmp.write_text(offset + "\n")
        tmp.replace(self.file)  # a reader never sees a half-written file

    def probe(self) -> tuple[float, float]:
        """(wall clock, monotonic clock) offsets in seconds, as a process on this clock
        reads them (after a time.sleep, to show that it works there)."""
        code = "import json, time; time.sleep(0.01); print(json.dumps([time.time(), time.monotonic()]))"
        out = subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, **self.env()},
            capture_output=True,
            text=True,
            check=True,
            timeout=30,
        ).stdout
        wall, mono = json.loads(out)
        return wall - time.time(), mono - time.monotonic()

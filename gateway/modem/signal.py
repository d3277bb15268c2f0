"""`gateway modem signal`: the radio over time, from the modem snapshots in the store.

Every poll stores a snapshot with the radio fields, so an installer turning an antenna
can see what each position gave: one row per snapshot, oldest first.
"""

from __future__ import annotations

import json
import sqlite3
import time
from typing import Any

import orjson

from gateway.modem.radio import signal_quality

# Rows printed at most (the newest ones); about 14 days of 60 s polls is 20,000.
MAX_ROWS = 5000
# (heading, key in a row, width); None shows as '-'.
COLUMNS = (
    ("time (UTC)", "time", 20),
    ("state", "state", 11),
    ("tech", "access_technology", 6),
    ("rsrp", "rsrp_dbm", 6),
    ("rsrq", "rsrq_db", 6),
    ("sinr", "sinr_db", 6),
    ("rscp", "rscp_dbm", 6),
    ("ecno", "ecno_db", 6),
    ("csq dBm", "signal_dbm", 7),
    ("cell", "cell_id", 10),
    ("tac", "tac", 8),
    ("quality", "signal_quality", 9),
)
_KEYS = (
    *("access_technology", "rsrp_dbm", "rsrq_db", "sinr_db", "rscp_dbm", "ecno_db"),
    *("signal_dbm", "cell_id", "tac", "band", "earfcn", "pci"),
)


def _iso(ns: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ns / 1e9))


def history(conn: sqlite3.Connection, since_ns: int, limit: int = MAX_ROWS) -> list[dict[str, Any]]:
    """The radio fields of the snapshots taken since since_ns, oldest first (at most limit,
    the newest); a snapshot that is not a JSON object is skipped."""
    rows = conn.execute(
        "SELECT ts_ns, state, data FROM modem_snapshots WHERE ts_ns >= ? ORDER BY id DESC LIMIT ?",
        (since_ns, limit),
    ).fetchall()
    out: list[dict[str, Any]] = []
    for ts_ns, state, data in reversed(rows):
        try:
            d = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(d, dict):
            continue
        row: dict[str, Any] = {"time": _iso(int(ts_ns)), "state": str(state)}
        row.update({k: d.get(k) for k in _KEYS})
        row["signal_quality"] = signal_quality(d.get("rsrp_dbm"), d.get("sinr_db"))
        out.append(row)
    return out


def _cell(v: Any) -> str:
    if v is None or v == "":
        return "-"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def format_table(rows: list[dict[str, Any]]) -> str:
    """Fixed-width columns, one line per snapshot."""
    lines = ["  ".join(f"{h:<{w}}" for h, _k, w in COLUMNS).rstrip()]
    for r in rows:
        lines.append("  ".join(f"{_cell(r.get(k))[:w]:<{w}}" for _h, k, w in COLUMNS).rstrip())
    return "\n".join(lines)


def summary(info: dict[str, Any], quality: Any) -> str:
    """One line for `gateway status`: technology, levels, cell and grade ('' when nothing)."""
    parts = []
    if info.get("access_technology"):
        parts.append(str(info["access_technology"]))
    for key, label, unit in (
        ("rsrp_dbm", "RSRP", "dBm"),
        ("rsrq_db", "RSRQ", "dB"),
        ("sinr_db", "SINR", "dB"),
        ("rscp_dbm", "RSCP", "dBm"),
        ("ecno_db", "Ec/No", "dB"),
    ):
        if info.get(key) is not None:
            parts.append(f"{label} {_cell(info[key])} {unit}")
    if info.get("cell_id") is not None:
        parts.append(f"cell {info['cell_id']} TAC {_cell(info.get('tac'))}")
    if quality:
        parts.append(f"quality {quality}")
    return "  ".join(parts)


def command(conn: sqlite3.Connection, since_ns: int, as_json: bool) -> int:
    """Print the radio history since since_ns as a table (or JSON rows)."""
    rows = history(conn, since_ns)
    if as_json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no modem snapshots since {_iso(since_ns)}")
    else:
        print(format_table(rows))
    return 0

"""Usage CDRs from the modem's byte counters (Monogoto DATA CDR fields).

Every counter reading the poller stores is accounted in the same transaction as its
snapshot (`account`): the delta since the previous reading is added to the usage not yet
reported, and the reading becomes the new baseline. Both live in `cdr_state`, so a
restart neither loses nor double-counts. Every `cdr.interval_s` the pending usage becomes
one CDR (`close_period`). A counter that goes down (modem reboot, NVM not saved) counts
from zero; a new ICCID closes the old SIM's CDR at once and starts a new one.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import sqlite3
import string
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import store as st
from gateway.config import CDR_FIELDS, CdrSection
from gateway.errors import GatewayError
from gateway.store import Store, transaction

log = logging.getLogger("gateway.cdr")

# The field order of a Monogoto DATA CDR; also the CSV columns of a report.
FIELDS = CDR_FIELDS
_ALPHANUM = string.ascii_uppercase + string.ascii_lowercase + string.digits
IDENTITY_KEYS = ("iccid", "imsi", "msisdn", "imei", "operator", "mcc", "mnc", "apn")


def unique_id() -> str:
    """'CDR-' followed by 20 random alphanumerics."""
    return "CDR-" + "".join(secrets.choice(_ALPHANUM) for _ in range(20))


@dataclass(frozen=True, slots=True)
class Reading:
    """One counter reading and the identity it was taken with."""

    iccid: str
    source: str
    tx: int
    rx: int
    identity: Mapping[str, str]

    @classmethod
    def from_snapshot(cls, data: Mapping[str, Any]) -> Reading | None:
        """The reading in a poller snapshot, or None when it has no ICCID or counters."""
        tx, rx = data.get("tx_bytes"), data.get("rx_bytes")
        iccid = str(data.get("iccid") or "")
        failed = data.get("failed") or {}
        if not iccid or not isinstance(tx, int) or not isinstance(rx, int) or "counters" in failed:
            return None
        if tx < 0 or rx < 0:
            return None
        ident = {k: str(data.get(k) or "") for k in IDENTITY_KEYS}
        return cls(iccid, str(data.get("counter_source") or ""), tx, rx, ident)


@dataclass(slots=True)
class State:
    """The persisted accounting state (table cdr_state, one row)."""

    iccid: str = ""
    source: str = ""
    tx: int = 0
    rx: int = 0
    pending: int = 0
    period_start_ns: int = 0
    identity: dict[str, str] | None = None


def load_state(conn: sqlite3.Connection) -> State | None:
    row = conn.execute(
        "SELECT iccid, counter_source, tx_bytes, rx_bytes, pending, period_start_ns, identity"
        " FROM cdr_state WHERE id = 1"
    ).fetchone()
    if row is None:
        return None
    ident = orjson.loads(row[6]) if row[6] else {}
    return State(row[0], row[1], int(row[2]), int(row[3]), int(row[4]), int(row[5]), ident)


def _save_state(conn: sqlite3.Connection, s: State) -> None:
    conn.execute(
        "INSERT OR REPLACE INTO cdr_state(id, iccid, counter_source, tx_bytes, rx_bytes, pending,"
        " period_start_ns, identity) VALUES (1, ?, ?, ?, ?, ?, ?, ?)",
        (s.iccid, s.source, s.tx, s.rx, s.pending, s.period_start_ns, st.dumps(s.identity or {})),
    )


def record(ident: Mapping[str, str], cfg: CdrSection, usage: int, ts_ms: int) -> dict[str, Any]:
    """A Monogoto DATA CDR with exactly the documented fields and types."""
    iccid = ident.get("iccid", "")
    mcc, mnc = ident.get("mcc", ""), ident.get("mnc", "")
    rec: dict[str, Any] = {
        "CdrType": "DATA",
        "UniqueID": unique_id(),
        "Iccid": iccid,
        "IMSI": ident.get("imsi", ""),
        "MSISDN": ident.get("msisdn", ""),
        "IMEI": ident.get("imei", ""),
        "MNO": f"{mcc}{mnc}" if mcc and mnc else "",
        "MnoName": ident.get("operator", ""),
        "MCC": mcc,
        "MNC": mnc,
        "ThingName": cfg.thing_name.replace("{iccid}", iccid),
        "ThingId": cfg.thing_id.replace("{iccid}", iccid),
        "ThingsGroupId": cfg.things_group_id.replace("{iccid}", iccid),
        "ThingsGroupName": cfg.things_group_name.replace("{iccid}", iccid),
        "Timestamp": ts_ms,
        "Usage": usage,
        "APN": ident.get("apn", ""),
    }
    return {k: rec[k] for k in FIELDS}


def _emit(
    conn: sqlite3.Connection, s: State, cfg: CdrSection, now_ns: int
) -> dict[str, Any] | None:
    """Turn the pending usage into a CDR row (inside the caller's transaction)."""
    if not s.iccid or (s.pending == 0 and not cfg.emit_zero_usage):
        return None
    rec = record({**(s.identity or {}), "iccid": s.iccid}, cfg, s.pending, now_ns // 1_000_000)
    conn.execute(
        "INSERT INTO cdrs(unique_id, ts_ms, iccid, usage, data, period_start_ns, period_end_ns)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (
            rec["UniqueID"],
            rec["Timestamp"],
            s.iccid,
            s.pending,
            st.dumps(rec),
            s.period_start_ns,
            now_ns,
        ),
    )
    st.bump(conn, "cdrs_emitted", 1)
    return rec


def account(conn: sqlite3.Connection, cfg: CdrSection, reading: Reading, now_ns: int) -> int:
    """Add one counter reading to the pending usage (inside the caller's transaction);
    returns the bytes it added, billed to the SIM of the previous reading."""
    s = load_state(conn)
    if s is None or not s.iccid:
        # The first reading ever is the baseline: what the counters held before the
        # gateway watched them is not this gateway's to report.
        s = State(
            reading.iccid, reading.source, reading.tx, reading.rx, 0, now_ns, dict(reading.identity)
        )
        _save_state(conn, s)
        return 0
    delta = 0
    if reading.source != s.source:
        # Another counter (AT ↔ kernel interface): a new baseline, no delta across the two.
        log.info("cdr: counter source %r -> %r, new baseline", s.source, reading.source)
        s.source, s.tx, s.rx = reading.source, reading.tx, reading.rx
    else:
        for now_v, before in ((reading.tx, s.tx), (reading.rx, s.rx)):
            # A counter that went down was reset (modem reboot): it counts from zero.
            delta += now_v - before if now_v >= before else now_v
        s.pending += delta
        s.tx, s.rx = reading.tx, reading.rx
    if reading.iccid != s.iccid:
        # SIM swap: what was counted up to here belongs to the old SIM.
        log.info("cdr: SIM changed %s -> %s; closing the old SIM's CDR", s.iccid, reading.iccid)
        _emit(conn, s, cfg, now_ns)
        s.iccid, s.pending, s.period_start_ns = reading.iccid, 0, now_ns
    s.identity = dict(reading.identity)
    _save_state(conn, s)
    return delta


def close_period(conn: sqlite3.Connection, cfg: CdrSection, now_ns: int) -> dict[str, Any] | None:
    """End the current period: emit its CDR (unless empty and skipped), start the next."""
    with transaction(conn):
        s = load_state(conn)
        if s is None:
            return None
        rec = _emit(conn, s, cfg, now_ns)
        s.pending, s.period_start_ns = 0, now_ns
        _save_state(conn, s)
    return rec


def period_start(conn: sqlite3.Connection) -> int:
    s = load_state(conn)
    return s.period_start_ns if s is not None else 0


def list_cdrs(
    conn: sqlite3.Connection, since_ms: int = 0, limit: int = 1000
) -> list[dict[str, Any]]:
    """CDRs with Timestamp >= since_ms, oldest first (the newest `limit`)."""
    rows = conn.execute(
        "SELECT data FROM (SELECT id, data FROM cdrs WHERE ts_ms >= ? ORDER BY id DESC LIMIT ?)"
        " ORDER BY id",
        (since_ms, limit),
    ).fetchall()
    return sound_records(r[0] for r in rows)


def sound_records(texts: Iterable[str]) -> list[dict[str, Any]]:
    """Stored CDRs as records, leaving out (and logging) rows whose JSON is damaged: one
    bad row must not stop a report or a listing of all the others."""
    out = []
    damaged = 0
    for text in texts:
        try:
            rec = orjson.loads(text)
        except orjson.JSONDecodeError:
            rec = None
        if isinstance(rec, dict):
            out.append(rec)
        else:
            damaged += 1
    if damaged:
        log.warning("%d stored CDR(s) left out: their JSON is damaged", damaged)
    return out


async def run(cfg: CdrSection, store: Store, wake: asyncio.Event | None = None) -> None:
    """Close a CDR period every `interval_s` until cancelled (readings come via the poller)."""
    interval_ns = int(cfg.interval_s * 1e9)
    while True:
        try:
            start = await asyncio.wrap_future(store.call(period_start))
        except (GatewayError, sqlite3.Error) as exc:
            log.warning("cdr: cannot read state: %s", exc)
            await asyncio.sleep(min(cfg.interval_s, 30.0))
            continue
        now = time.time_ns()
        # A start in the future means the clock went back: do not wait for it to catch up.
        due = start + interval_ns if start and start <= now else now + interval_ns
        if start and start > now:
            await asyncio.wrap_future(store.call(_restart_period, now))
        if due > now:
            await asyncio.sleep((due - now) / 1e9)
            continue
        try:
            rec = await asyncio.wrap_future(store.call(close_period, cfg, time.time_ns()))
        except (GatewayError, sqlite3.Error) as exc:
            log.warning("cdr: cannot close the period: %s", exc)
            await asyncio.sleep(min(cfg.interval_s, 30.0))
            continue
        if rec is not None:
            log.info("cdr %s: ICCID %s, %d bytes", rec["UniqueID"], rec["Iccid"], rec["Usage"])
            if wake is not None:
                wake.set()


def _restart_period(conn: sqlite3.Connection, now_ns: int) -> None:
    with transaction(conn):
        conn.execute("UPDATE cdr_state SET period_start_ns = ? WHERE id = 1", (now_ns,))

"""What a webhook route reads: packets, CDRs, events or report notices.

A Source knows its table (fetch records after a cursor, or by id after a restart), the
fields a `when` condition can address, and how its records become request bodies in each
format it supports. The delivery engine (delivery.py) is the same for every source.
"""

from __future__ import annotations

import socket
import sqlite3
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from gateway import formats
from gateway import store as st
from gateway.config import WebhookConfig
from gateway.formats import PayloadOptions
from gateway.routes import MISSING, lookup
from gateway.store import PacketRow


@dataclass(frozen=True, slots=True)
class RecordRow:
    """A CDR or an event: its id, when it happened, and the record as delivered."""

    id: int
    ts_ns: int
    record: dict[str, Any]


Row = PacketRow | RecordRow


def ts_ns(row: Row) -> int:
    return row.recv_ns if isinstance(row, PacketRow) else row.ts_ns


class Source:
    """Base: a source with no table of its own (report notices come as prebuilt batches)."""

    name = "reports"
    envelope_key = "report"

    def fetch(self, conn: sqlite3.Connection, after: int, limit: int) -> list[Row]:
        return []

    def by_ids(self, conn: sqlite3.Connection, ids: Sequence[int]) -> list[Row]:
        return []

    def getter(self, row: Row) -> Callable[[str], Any]:
        """name -> value for `when` conditions (MISSING when the record has no such field)."""
        record = row.record if isinstance(row, RecordRow) else {}
        return lambda name: lookup(record, name)

    def body(self, rows: Sequence[Row], cfg: WebhookConfig, single: bool) -> tuple[bytes, int]:
        """(request body, payload decode failures) for one batch."""
        recs = [r.record for r in rows if isinstance(r, RecordRow)]
        if cfg.format == "monogoto":
            return formats.monogoto(recs), 0
        if cfg.format == "envelope":
            return formats.envelope(recs[0], cfg.meta, cfg.name, self.envelope_key), 0
        return formats.flat(recs[0]), 0


class PacketSource(Source):
    name = "packets"
    envelope_key = "packet"

    def __init__(self, opts: PayloadOptions) -> None:
        self.opts = opts

    def fetch(self, conn: sqlite3.Connection, after: int, limit: int) -> list[Row]:
        return list(st.fetch_packets(conn, after, limit))

    def by_ids(self, conn: sqlite3.Connection, ids: Sequence[int]) -> list[Row]:
        return list(st.packets_by_ids(conn, ids))

    def getter(self, row: Row) -> Callable[[str], Any]:
        assert isinstance(row, PacketRow)
        decoded: Any = MISSING
        enc = self.opts.encoding

        def get(name: str) -> Any:
            nonlocal decoded
            if name == "topic":
                return row.topic
            if name == "iccid":
                return row.iccid
            if name == "size":
                return len(row.payload)
            if name == "payload":
                return formats.encode_payload(row.payload, enc)[0]
            if name.startswith("payload."):
                if decoded is MISSING:
                    decoded = formats.decoded_payload(row.payload, enc)
                return lookup(decoded, name[8:]) if decoded is not None else MISSING
            return MISSING

        return get

    def body(self, rows: Sequence[Row], cfg: WebhookConfig, single: bool) -> tuple[bytes, int]:
        packets = [r for r in rows if isinstance(r, PacketRow)]
        if cfg.format == "monoz":
            return formats.monoz(packets, self.opts, single=single)
        rec, failed = formats.packet_record(packets[0], self.opts)
        if cfg.format == "envelope":
            return formats.envelope(rec, cfg.meta, cfg.name, "packet"), int(failed)
        return formats.flat(rec), int(failed)


class TableSource(Source):
    """Records stored one per row in a table of their own (`_COLS` selects id, time, …)."""

    _COLS = ""

    def _row(self, r: tuple[Any, ...]) -> RecordRow:
        raise NotImplementedError

    def fetch(self, conn: sqlite3.Connection, after: int, limit: int) -> list[Row]:
        rows = conn.execute(f"{self._COLS} WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return [self._row(r) for r in rows]

    def by_ids(self, conn: sqlite3.Connection, ids: Sequence[int]) -> list[Row]:
        marks = ",".join("?" * len(ids))
        rows = conn.execute(f"{self._COLS} WHERE id IN ({marks}) ORDER BY id", tuple(ids))
        return [self._row(r) for r in rows]


class CdrSource(TableSource):
    name = "cdrs"
    envelope_key = "cdr"
    _COLS = "SELECT id, period_end_ns, data FROM cdrs"

    def _row(self, r: tuple[Any, ...]) -> RecordRow:
        return RecordRow(r[0], r[1], orjson.loads(r[2]))


_HOST = socket.gethostname()


def event_record(eid: int, ts: int, kind: str, data: str) -> dict[str, Any]:
    """An event as delivered: what happened, when, on which gateway, and its details."""
    return {
        "id": eid,
        "event": kind,
        "Timestamp": formats.iso_ms(ts),
        "gateway": _HOST,
        "data": orjson.loads(data) if data else {},
    }


class EventSource(TableSource):
    name = "events"
    envelope_key = "event"
    _COLS = "SELECT id, ts_ns, kind, data FROM events"

    def _row(self, r: tuple[Any, ...]) -> RecordRow:
        return RecordRow(r[0], r[1], event_record(*r))


def for_webhook(cfg: WebhookConfig, payload_encoding: str) -> Source:
    """The source a webhook reads."""
    if cfg.source == "packets":
        return PacketSource(PayloadOptions(payload_encoding, cfg.id_field, cfg.iccid_as))
    if cfg.source == "cdrs":
        return CdrSource()
    if cfg.source == "events":
        return EventSource()
    return Source()

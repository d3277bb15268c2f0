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

from gateway import store as st
from gateway.config import WebhookConfig
from gateway.delivery import formats
from gateway.delivery.conditions import MISSING, lookup
from gateway.delivery.formats import PayloadOptions
from gateway.store import PacketRow


@dataclass(frozen=True, slots=True)
class RecordRow:
    """A CDR or an event: its id, when it happened, and the record as delivered.

    `error` says why a stored row could not be read back as a record (its JSON is
    damaged); such a row is dead-lettered on its own (RecordError), `raw` is its text."""

    id: int
    ts_ns: int
    record: dict[str, Any]
    error: str = ""
    raw: str = ""


class RecordError(Exception):
    """One record cannot be filtered or encoded; `reason` names the dead letter's cause."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


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
        record = _readable(row).record if isinstance(row, RecordRow) else {}
        return lambda name: lookup(record, name)

    def encode(self, row: Row, cfg: WebhookConfig) -> tuple[bytes, bool]:
        """What one record puts in a body (an array element, or the whole body of a
        per-record format), and whether its payload failed to decode. Raises for a
        record that cannot be encoded at all."""
        rec = _readable(row).record if isinstance(row, RecordRow) else {}
        if cfg.format == "monogoto":
            return orjson.dumps(rec), False
        if cfg.format == "envelope":
            return formats.envelope(rec, cfg.meta, cfg.name, self.envelope_key), False
        return formats.flat(rec), False

    def assemble(self, parts: Sequence[bytes], cfg: WebhookConfig, single: bool) -> bytes:
        """A batch's body from its records' encode() parts."""
        if cfg.format == "monogoto":
            return b"[" + b",".join(parts) + b"]"
        return parts[0]

    def body(self, rows: Sequence[Row], cfg: WebhookConfig, single: bool) -> tuple[bytes, int]:
        """(request body, payload decode failures) for one batch."""
        encoded = [self.encode(r, cfg) for r in rows]
        body = self.assemble([p for p, _ in encoded], cfg, single)
        return body, sum(f for _, f in encoded)

    def fallback(self, row: Row) -> bytes:
        """JSON for a record dead-lettered on its own: what can be shown of it, always
        encodable (the stored text of a damaged row)."""
        if isinstance(row, RecordRow):
            try:
                return orjson.dumps(row.record) if not row.error else _raw(row)
            except TypeError:
                return _raw(row)
        return formats.fallback_record(row)


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

    def encode(self, row: Row, cfg: WebhookConfig) -> tuple[bytes, bool]:
        assert isinstance(row, PacketRow)
        if cfg.format == "monoz":
            return formats.monoz_object(row, self.opts)
        rec, failed = formats.packet_record(row, self.opts)
        if cfg.format == "envelope":
            return formats.envelope(rec, cfg.meta, cfg.name, "packet"), failed
        return formats.flat(rec), failed

    def assemble(self, parts: Sequence[bytes], cfg: WebhookConfig, single: bool) -> bytes:
        if cfg.format == "monoz" and not (single and len(parts) == 1):
            return b"[" + b",".join(parts) + b"]"
        return parts[0]


class TableSource(Source):
    """Records stored one per row in a table of their own (`_COLS` selects id, time, …)."""

    _COLS = ""

    def _row(self, r: tuple[Any, ...]) -> RecordRow:
        raise NotImplementedError

    def fetch(self, conn: sqlite3.Connection, after: int, limit: int) -> list[Row]:
        rows = conn.execute(f"{self._COLS} WHERE id > ? ORDER BY id LIMIT ?", (after, limit))
        return [self._safe_row(r) for r in rows]

    def by_ids(self, conn: sqlite3.Connection, ids: Sequence[int]) -> list[Row]:
        marks = ",".join("?" * len(ids))
        rows = conn.execute(f"{self._COLS} WHERE id IN ({marks}) ORDER BY id", tuple(ids))
        return [self._safe_row(r) for r in rows]

    def _safe_row(self, r: tuple[Any, ...]) -> RecordRow:
        """The row as a record; a damaged one (not JSON, a CDR not an object) as a RecordRow
        with `error`, so that it is dead-lettered alone instead of stopping the fetch."""
        try:
            row = self._row(r)
        except (ValueError, TypeError) as exc:
            ts = r[1] if isinstance(r[1], int) else 0
            raw = r[-1] if isinstance(r[-1], str) else repr(r[-1])
            # The error names no row: the log folds identical lines, one per cause.
            return RecordRow(int(r[0]), ts, {}, f"stored row is damaged: {exc}", raw)
        return row


class CdrSource(TableSource):
    name = "cdrs"
    envelope_key = "cdr"
    _COLS = "SELECT id, period_end_ns, data FROM cdrs"

    def _row(self, r: tuple[Any, ...]) -> RecordRow:
        record = orjson.loads(r[2])
        if not isinstance(record, dict):
            raise TypeError("a CDR is not a JSON object")
        return RecordRow(r[0], r[1], record)


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


def _readable(row: RecordRow) -> RecordRow:
    if row.error:
        raise RecordError("undecodable", row.error)
    return row


def _raw(row: RecordRow) -> bytes:
    text = formats.clean_text(row.raw[:4096])
    return orjson.dumps({"id": row.id, "error": row.error, "stored": text})


def for_webhook(cfg: WebhookConfig, payload_encoding: str) -> Source:
    """The source a webhook reads."""
    if cfg.source == "packets":
        return PacketSource(PayloadOptions(payload_encoding, cfg.id_field, cfg.iccid_as))
    if cfg.source == "cdrs":
        return CdrSource()
    if cfg.source == "events":
        return EventSource()
    return Source()

"""Pure encoders for the wire formats: monoz, monogoto, envelope, flat, report.

Nothing here does I/O; every function maps records to the exact bytes that are POSTed.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import decimal
import fractions
import functools
import io
import math
import re
import time
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import cbor2
import orjson

from gateway.store.records import PacketRow

CONTENT_TYPE = "application/json; charset=utf-8"
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_INT64 = 2**63 - 1
# An ICCID is 19 or 20 digits (ITU-T E.118 allows up to 22 with an extended prefix);
# a topic level of more digits is no ICCID and goes out as text.
ICCID_MAX_DIGITS = 22
# orjson refuses to encode more than 255 levels of nesting, and a body wraps the payload
# in two or three levels of its own (array, object, envelope): deeper CBOR is left as
# base64 rather than make a body that cannot be encoded.
MAX_DEPTH = 200
# Python refuses to turn an int of more than 4,300 digits into text (a conversion that
# grows with the square of its length); the bound keeps below that whatever the setting.
_MAX_INT_BITS = 14_000


@dataclass(frozen=True, slots=True)
class PayloadOptions:
    encoding: str = "auto"
    id_field: str = "ICCID"
    iccid_as: str = "auto"


@functools.lru_cache(maxsize=256)
def _iso_seconds(secs: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs))


def iso_ms(ns: int) -> str:
    """UTC ISO 8601 with milliseconds and Z: 2023-10-16T09:17:32.123Z."""
    secs, rem = divmod(ns, 1_000_000_000)
    # Records of one batch mostly share their second: format it once.
    return f"{_iso_seconds(secs)}.{rem // 1_000_000:03d}Z"


class DecodeFailed(ValueError):
    """The payload is not valid in the configured encoding."""


def cbor_to_json(value: Any, depth: int = 0) -> Any:
    """Map a decoded CBOR value to JSON, as the README documents.

    bytes → base64 text; datetime/date → ISO 8601 text; a tag without a native type →
    {"tag": n, "value": v}; undefined → null; simple values → their number; NaN and
    infinities → null; integers beyond 64 bits → decimal text; map keys → text.
    DecodeFailed for what JSON cannot carry: nesting deeper than MAX_DEPTH, an integer
    too long to write out.
    """
    if value is None or isinstance(value, bool | str):
        return value
    if isinstance(value, int):
        if -_INT64 - 1 <= value <= _INT64:
            return value
        return _big_int_text(value)
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray | memoryview):
        return base64.b64encode(bytes(value)).decode()
    if depth >= MAX_DEPTH and isinstance(
        value, Mapping | list | tuple | set | frozenset | cbor2.CBORTag
    ):
        raise DecodeFailed(f"nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, Mapping):
        return {_json_key(k): cbor_to_json(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [cbor_to_json(v, depth + 1) for v in value]
    if isinstance(value, set | frozenset):
        return [cbor_to_json(v, depth + 1) for v in sorted(value, key=repr)]
    if isinstance(value, dt.datetime | dt.date):
        return value.isoformat()
    if isinstance(value, decimal.Decimal | fractions.Fraction):
        try:
            f = float(value)
        except (OverflowError, ValueError):
            return None
        return f if math.isfinite(f) else None
    if isinstance(value, uuid.UUID):
        return str(value)
    if isinstance(value, cbor2.CBORTag):
        return {"tag": cbor_to_json(value.tag), "value": cbor_to_json(value.value, depth + 1)}
    if isinstance(value, cbor2.CBORSimpleValue):
        return int(value.value)
    if value is cbor2.undefined:
        return None
    return str(value)


def _big_int_text(value: int) -> str:
    if value.bit_length() > _MAX_INT_BITS:
        raise DecodeFailed(f"an integer of {value.bit_length()} bits is too long for JSON")
    return str(value)


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray):
        return base64.b64encode(bytes(key)).decode()
    if isinstance(key, bool):
        return "true" if key else "false"
    if isinstance(key, int):
        return _big_int_text(key)
    if isinstance(key, float):
        return str(key)
    return orjson.dumps(cbor_to_json(key, MAX_DEPTH - 8)).decode()


def decode_cbor(payload: bytes) -> Any:
    """Decode exactly one CBOR item as JSON; anything that fails → DecodeFailed."""
    stream = io.BytesIO(payload)
    try:
        value = cbor2.CBORDecoder(stream).decode()
    except Exception as exc:  # cbor2 raises many types on hostile input
        raise DecodeFailed(f"not valid CBOR: {_short(exc)}") from exc
    if stream.tell() != len(payload):
        raise DecodeFailed("not valid CBOR: trailing bytes after the first item")
    try:
        return cbor_to_json(value)
    except DecodeFailed:
        raise
    except Exception as exc:  # a type or size JSON cannot carry; never a crash
        raise DecodeFailed(f"CBOR value not expressible as JSON: {_short(exc)}") from exc


def _short(exc: BaseException) -> str:
    return f"{exc.__class__.__name__}: {exc}"[:200]


def encode_payload(payload: bytes, encoding: str) -> tuple[Any, bool]:
    """The Payload value for `encoding`, and whether decoding failed. A payload that
    fails to decode, in any way, goes out as base64 text."""
    try:
        return _encode_payload(payload, encoding)
    except Exception:  # whatever the payload holds, the record still goes
        return base64.b64encode(payload).decode(), True


def _encode_payload(payload: bytes, encoding: str) -> tuple[Any, bool]:
    if encoding == "base64":
        return base64.b64encode(payload).decode(), False
    if encoding == "hex":
        return binascii.hexlify(payload).decode(), False
    if encoding == "cbor-json":
        try:
            return decode_cbor(payload), False
        except DecodeFailed:
            return base64.b64encode(payload).decode(), True
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError:
        return base64.b64encode(payload).decode(), encoding == "utf8"
    # A packed binary struct of small numbers is valid UTF-8 too; "auto" only calls it
    # text when it has no control characters besides tab, CR and LF.
    if encoding == "auto" and not text.isprintable() and _CONTROL.search(text):
        return base64.b64encode(payload).decode(), False
    return text, False


def decoded_payload(payload: bytes, encoding: str) -> Any:
    """The payload as a structured value for `when` conditions (JSON or CBOR), else None."""
    if encoding == "cbor-json":
        try:
            return decode_cbor(payload)
        except DecodeFailed:
            return None
    if payload[:1] in (b"{", b"["):
        try:
            return orjson.loads(payload)
        except orjson.JSONDecodeError:  # also what nests deeper than orjson reads
            return None
    return None


def iccid_is_number(iccid: str) -> bool:
    """Whether an ICCID goes out as a JSON number: 1 to ICCID_MAX_DIGITS ASCII digits
    without a leading zero. `str.isdigit` alone also takes other scripts' digits ("٣"),
    which are no JSON number."""
    return (
        0 < len(iccid) <= ICCID_MAX_DIGITS
        and iccid.isascii()
        and iccid.isdigit()
        and not (len(iccid) > 1 and iccid[0] == "0")
    )


def iccid_json(iccid: str, iccid_as: str) -> bytes:
    """ICCID as a JSON number when it is one (as monoZ:Link sends it), else as text."""
    if iccid_as != "string" and iccid_is_number(iccid):
        return iccid.encode()
    return orjson.dumps(iccid)


def monoz_object(row: PacketRow, opts: PayloadOptions) -> tuple[bytes, bool]:
    """One monoZ:Link object as JSON bytes, and whether its payload failed to decode."""
    payload, failed = encode_payload(row.payload, opts.encoding)
    if opts.id_field == "Topic":
        head = b'{"Topic":' + orjson.dumps(row.topic)
    else:
        head = b'{"ICCID":' + iccid_json(row.iccid, opts.iccid_as)
    return (
        head
        + b',"Timestamp":"'
        + iso_ms(row.recv_ns).encode()
        + b'","Payload":'
        + orjson.dumps(payload)
        + b"}",
        failed,
    )


def monoz(rows: Sequence[PacketRow], opts: PayloadOptions, *, single: bool) -> tuple[bytes, int]:
    """A monoZ:Link body: one object when `single`, else an array; and decode failures."""
    parts = [monoz_object(r, opts) for r in rows]
    failed = sum(f for _, f in parts)
    if single and len(parts) == 1:
        return parts[0][0], failed
    return b"[" + b",".join(p for p, _ in parts) + b"]", failed


def packet_record(row: PacketRow, opts: PayloadOptions) -> tuple[dict[str, Any], bool]:
    """A packet as a plain record for envelope and flat formats."""
    payload, failed = encode_payload(row.payload, opts.encoding)
    rec: dict[str, Any] = {"Topic": row.topic, "Timestamp": iso_ms(row.recv_ns), "Payload": payload}
    if row.iccid:
        as_number = opts.iccid_as != "string" and iccid_is_number(row.iccid)
        # orjson (and many receivers) stop at 64 bits; a 20-digit ICCID stays text here.
        rec["ICCID"] = int(row.iccid) if as_number and int(row.iccid) <= _INT64 else row.iccid
    return rec, failed


def fallback_record(row: PacketRow) -> bytes:
    """A packet as JSON that always encodes: the body kept for a packet dead-lettered
    because its own format could not be made. Text with what is not UTF-8 replaced,
    the payload in base64."""
    return orjson.dumps(
        {
            "Topic": clean_text(row.topic),
            "ICCID": clean_text(row.iccid),
            "Timestamp": iso_ms(row.recv_ns),
            "Payload": base64.b64encode(row.payload).decode(),
            "PayloadEncoding": "base64",
        }
    )


def clean_text(text: str) -> str:
    """`text` with what JSON cannot carry (lone surrogates) replaced by "?"."""
    return text.encode("utf-8", "replace").decode("utf-8")


def envelope(record: Mapping[str, Any], meta: Mapping[str, Any], name: str, kind: str) -> bytes:
    """{"cdr"|"packet"|"event": record, "meta": meta, "name": webhook name}."""
    return orjson.dumps({kind: dict(record), "meta": dict(meta), "name": name})


def flat(record: Mapping[str, Any]) -> bytes:
    """The record's fields at the top level."""
    return orjson.dumps(dict(record))


def monogoto(cdrs: Iterable[Mapping[str, Any]]) -> bytes:
    """A JSON array of Monogoto DATA CDRs."""
    return orjson.dumps([dict(c) for c in cdrs])


def report_notice(fields: Mapping[str, Any]) -> bytes:
    """The CDR Manager report notice object."""
    return orjson.dumps(dict(fields))

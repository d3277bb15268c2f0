"""A pushed report's body: multipart/form-data (RFC 7578) with a `notice` part (the
CDR Manager notice, JSON) and a `file` part (the zip).

The body is built once, when the report is exported, and stored with its batch: every
attempt, after a restart too, sends the same bytes, so a signature over the raw body and
the webhook-id stay valid for a receiver that deduplicates. The boundary names itself
(BOUNDARY_PREFIX), which is how the sender knows the Content-Type of a stored body: a
JSON notice never starts with "--".
"""

from __future__ import annotations

import re
import secrets

BOUNDARY_PREFIX = "edge-gateway-report-"
_BOUNDARY = re.compile(rb"--(" + BOUNDARY_PREFIX.encode() + rb"[0-9a-f]{32})\r\n")


def _safe_name(name: str) -> str:
    """A file name for the Content-Disposition header: printable ASCII, no quotes."""
    return "".join(c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name)


def report_body(notice: bytes, file_name: str, data: bytes | None) -> bytes:
    """The multipart body: the notice, then the zip unless `data` is None (a failed
    export's notice goes alone). Ends with CRLF after the closing boundary."""
    while True:
        boundary = (BOUNDARY_PREFIX + secrets.token_hex(16)).encode()
        # 128 random bits: a zip holding the delimiter is as good as impossible, but a
        # body whose part holds its own delimiter would be cut there by every parser.
        if data is None or b"--" + boundary not in data:
            break
    parts = [
        b"--" + boundary + b"\r\n"
        b'Content-Disposition: form-data; name="notice"\r\n'
        b"Content-Type: application/json\r\n\r\n" + notice + b"\r\n"
    ]
    if data is not None:
        parts.append(
            b"--" + boundary + b"\r\n"
            b'Content-Disposition: form-data; name="file"; filename="'
            + _safe_name(file_name).encode()
            + b'"\r\nContent-Type: application/zip\r\n\r\n'
            + data
            + b"\r\n"
        )
    return b"".join(parts) + b"--" + boundary + b"--\r\n"


def content_type(body: bytes) -> str | None:
    """The Content-Type of a report body built here, or None for any other body."""
    m = _BOUNDARY.match(body[: len(BOUNDARY_PREFIX) + 40])
    if m is None:
        return None
    return "multipart/form-data; boundary=" + m.group(1).decode()

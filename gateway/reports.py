"""CDR reports (the CDR Manager pattern): export a period's CDRs as a zipped CSV, serve it
behind a random token for 24 h, and announce it with a `report` notice to a webhook."""

from __future__ import annotations

import hashlib
import hmac
import sqlite3
from dataclasses import dataclass
from pathlib import Path

DOWNLOAD_PREFIX = "/cdr-download-files/"
VALID_FOR_NS = 24 * 3600 * 1_000_000_000


def token_digest(token: str) -> str:
    """The SHA-256 (hex) under which a download token is stored."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Download:
    """A report file a token points at; `expired` means answer 410 Gone."""

    path: Path
    file_name: str
    size: int
    valid_until_ns: int
    expired: bool


def find_download(conn: sqlite3.Connection, token: str, now_ns: int) -> Download | None:
    """The report a download token opens, or None (answer 404) for an unknown token.

    Only the token's SHA-256 is stored; the final comparison is constant-time anyway.
    """
    if not token or len(token) > 200:
        return None
    digest = token_digest(token)
    row = conn.execute(
        "SELECT token_sha256, path, file_name, size, valid_until_ns FROM reports"
        " WHERE token_sha256 = ? AND error = '' ORDER BY id DESC LIMIT 1",
        (digest,),
    ).fetchone()
    if row is None or not hmac.compare_digest(str(row[0]), digest):
        return None
    path = Path(row[1])
    expired = now_ns >= int(row[4]) or not path.is_file()
    return Download(path, str(row[2]), int(row[3]), int(row[4]), expired)

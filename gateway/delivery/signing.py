"""Request signatures: CDR Manager (X-CDR-Signature) and Standard Webhooks."""

from __future__ import annotations

import base64
import hashlib
import hmac


def cdr_manager(secret: str, body: bytes) -> str:
    """base64(HMAC-SHA512(secret, body)), as PHP's base64_encode(hash_hmac('sha512', …, true))."""
    return base64.b64encode(hmac.new(secret.encode(), body, hashlib.sha512).digest()).decode()


def _whsec_key(secret: str) -> bytes:
    raw = secret.removeprefix("whsec_")
    return base64.b64decode(raw + "=" * (-len(raw) % 4))


def standard_webhooks(secrets: str, msg_id: str, timestamp: int, body: bytes) -> str:
    """`v1,<sig>` for each space-separated `whsec_` secret (several during rotation)."""
    signed = f"{msg_id}.{timestamp}.".encode() + body
    sigs = []
    for secret in secrets.split():
        mac = hmac.new(_whsec_key(secret), signed, hashlib.sha256).digest()
        sigs.append("v1," + base64.b64encode(mac).decode())
    return " ".join(sigs)


def verify_standard_webhooks(
    secret: str, msg_id: str, timestamp: int, body: bytes, header: str
) -> bool:
    """True when any v1 signature in `header` matches `secret` (for the sink and tests)."""
    want = standard_webhooks(secret, msg_id, timestamp, body).split(",", 1)[1]
    return any(
        hmac.compare_digest(part.split(",", 1)[1], want)
        for part in header.split()
        if part.startswith("v1,")
    )

"""A webhook's redirects: which are followed (307, 308), which mean the webhook's URL
must change (301, 302, 303), where a Location may lead, and which headers go along.

307 and 308 keep the method and the body, so the POST is sent again as it was, at most
MAX_REDIRECTS times. 301, 302 and 303 let (or make) a client turn a POST into a GET
that carries no body: the records would be lost, so the batch fails with the Location
named instead. Across origins the auth headers stay behind, as browsers do: the
receiver's new host never sees the old one's credentials.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from gateway.config import WebhookConfig, is_secret_name, mask_url

# Hops followed for one request; the next redirect fails the attempt.
MAX_REDIRECTS = 3
FOLLOWED = frozenset({307, 308})
MOVED = {301: "moved permanently", 302: "found elsewhere", 303: "see other"}
# A longer Location is taken as hostile rather than followed or quoted.
MAX_LOCATION_CHARS = 2048
# Headers a receiver on another origin must not see. The signature headers stay: they
# are made from the body and the webhook's secret, and reveal neither.
ALWAYS_DROPPED = frozenset({"authorization", "proxy-authorization", "cookie"})
SIGNATURE_HEADERS = frozenset(
    {"x-cdr-signature", "webhook-signature", "webhook-timestamp", "webhook-id"}
)


@dataclass(frozen=True, slots=True)
class Hop:
    """Where a redirect leads (url), or why it is not followed (error)."""

    url: str = ""
    error: str = ""


def origin(url: str) -> tuple[str, str, int | None]:
    """(scheme, host, port) with the scheme's default port filled in."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    port = parts.port or {"http": 80, "https": 443}.get(scheme)
    return scheme, (parts.hostname or "").lower(), port


def _shown(location: str) -> str:
    """A Location as quoted in errors: query values masked, control characters out."""
    text = "".join(c if c.isprintable() else "?" for c in location[:300])
    return mask_url(text) + ("…" if len(location) > 300 else "")


def resolve(current: str, status: int, location: str | None) -> Hop:
    """The absolute URL a redirect's Location points at from `current`, or why it is
    not one to follow: missing, too long, not http(s), https to plain http."""
    if not location or not location.strip():
        return Hop(error=f"HTTP {status} redirect without a Location header")
    location = location.strip()
    if len(location) > MAX_LOCATION_CHARS:
        return Hop(error=f"HTTP {status} redirect with a Location of {len(location)} characters")
    if not location.isprintable() or not location.isascii():
        return Hop(error=f"HTTP {status} redirect to a malformed Location {_shown(location)}")
    try:
        # A relative reference is resolved against the URL that answered (RFC 9110 10.2.2).
        url = urllib.parse.urljoin(current, location)
        parts = urllib.parse.urlsplit(url)
        _ = parts.port  # raises for a port that is not a number or out of range
    except ValueError:
        return Hop(error=f"HTTP {status} redirect to a malformed Location {_shown(location)}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return Hop(error=f"HTTP {status} redirect to {_shown(location)}: not an http(s) URL")
    if origin(current)[0] == "https" and parts.scheme == "http":
        return Hop(
            error=f"HTTP {status} redirect from https to plain http ({_shown(url)}): not followed"
        )
    return Hop(url=url)


def moved_message(status: int, location: str | None) -> str:
    """What a 301/302/303 says to the operator: where the receiver went."""
    what = MOVED.get(status, "redirected")
    if not location or not location.strip():
        return f"receiver {what} ({status}) without a Location; check the webhook url"
    return f"receiver {what} ({status}) to {_shown(location.strip())}; update the webhook url"


def auth_header_names(cfg: WebhookConfig) -> frozenset[str]:
    """The lower-case names of the headers that carry the webhook's credentials: its
    auth (Authorization, or the API key's header) and custom headers with secret-like
    names (X-Auth-Token, …); never the signature headers."""
    names = set(ALWAYS_DROPPED)
    if cfg.auth.type == "api_key":
        names.add(cfg.auth.header.lower())
    names.update(name.lower() for name, _ in cfg.headers if is_secret_name(name))
    return frozenset(names - SIGNATURE_HEADERS)


def without(headers: Mapping[str, str], names: Iterable[str]) -> dict[str, str]:
    """`headers` without those named (case-insensitive)."""
    drop = {n.lower() for n in names}
    return {k: v for k, v in headers.items() if k.lower() not in drop}

"""One webhook's requests: a body turned into a signed, authenticated POST, and what
each attempt came to (Outcome), with the retry policy's verdicts and delays."""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import email.utils
import gzip
import logging
import random
import secrets
import ssl
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass

import aiohttp

from gateway import __version__
from gateway.config import RetryPolicy, WebhookConfig, mask_url, mask_urls
from gateway.delivery import formats, multipart, redirects, signing

log = logging.getLogger("gateway.delivery")

EXCERPT_BYTES = 200
MAX_RESPONSE_READ = 64 * 1024
MAX_RETRY_AFTER_S = 24 * 3600.0


def new_webhook_id() -> str:
    """msg_ + 26 random base32 characters, as Standard Webhooks ids look."""
    return "msg_" + base64.b32encode(secrets.token_bytes(16)).decode().rstrip("=").lower()


@dataclass(frozen=True, slots=True)
class Outcome:
    """What one POST came to."""

    status: int | None  # None: no response (timeout, connection error)
    error: str  # "" on success
    excerpt: str = ""
    retry_after_s: float | None = None
    latency_s: float = 0.0
    redirects: int = 0  # 307/308 hops followed on the way to this answer

    @property
    def ok(self) -> bool:
        return self.status is not None and 200 <= self.status < 300


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Retry-After as seconds: delta-seconds or an HTTP-date; None when absent or invalid."""
    if not value:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():  # not "²" or other Unicode digits
        return min(float(value), MAX_RETRY_AFTER_S)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when is None or when.tzinfo is None:
        return None
    delta = when.timestamp() - (time.time() if now is None else now)
    return min(max(delta, 0.0), MAX_RETRY_AFTER_S)


def next_delay(policy: RetryPolicy, attempts: int, retry_after: float | None) -> float:
    """Full-jitter exponential backoff; a Retry-After, when honoured, is a lower bound."""
    cap = min(policy.backoff_max_s, policy.backoff_min_s * (2 ** min(attempts - 1, 30)))
    delay = random.uniform(0, cap) if cap > 0 else 0.0
    if retry_after is not None and policy.honour_retry_after:
        delay = max(delay, retry_after)
    return delay


def max_delay_s(policy: RetryPolicy) -> float:
    """The longest wait between two attempts that next_delay can ask for under `policy`."""
    return max(policy.backoff_max_s, MAX_RETRY_AFTER_S if policy.honour_retry_after else 0.0)


def classify(policy: RetryPolicy, outcome: Outcome) -> str:
    """'ok', 'retry', 'dead' or 'gone' for an outcome under a retry policy."""
    if outcome.ok:
        return "ok"
    if outcome.status == 410:
        return "gone"
    if outcome.status is None:
        return "retry"
    if outcome.status in policy.retry_on_status or (
        policy.retry_any_5xx and 500 <= outcome.status < 600
    ):
        return "retry"
    return "dead"


class Sender:
    """Turns a body into a signed, authenticated POST to one webhook."""

    def __init__(self, cfg: WebhookConfig, session: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.session = session
        self.ssl: ssl.SSLContext | bool = True
        if cfg.ca_file:
            self.ssl = ssl.create_default_context(cafile=cfg.ca_file)
        self.timeout = aiohttp.ClientTimeout(total=cfg.retry.timeout_s)
        self.base_headers = self._base_headers()
        # Left behind when a redirect leads to another origin.
        self.auth_headers = redirects.auth_header_names(cfg)

    def _base_headers(self) -> dict[str, str]:
        h = {"Content-Type": formats.CONTENT_TYPE, "User-Agent": f"edge-gateway/{__version__}"}
        a = self.cfg.auth
        if a.type == "basic":
            token = base64.b64encode(f"{a.username}:{a.password}".encode()).decode()
            h["Authorization"] = f"Basic {token}"
        elif a.type == "bearer":
            h["Authorization"] = f"Bearer {a.token}"
        elif a.type == "api_key":
            h[a.header] = a.key
        if self.cfg.gzip:
            h["Content-Encoding"] = "gzip"
        h.update(dict(self.cfg.headers))
        return h

    def headers(self, body: bytes, webhook_id: str) -> dict[str, str]:
        """All request headers for `body`, including signatures and the webhook-id."""
        h = dict(self.base_headers)
        h["webhook-id"] = webhook_id
        if self.cfg.source == "reports":
            pushed = multipart.content_type(body)
            if pushed is not None:
                h["Content-Type"] = pushed
        s = self.cfg.signing
        if s.scheme == "cdr-manager":
            h["X-CDR-Signature"] = signing.cdr_manager(s.secret, body)
        elif s.scheme == "standard-webhooks":
            ts = int(time.time())
            h["webhook-timestamp"] = str(ts)
            h["webhook-signature"] = signing.standard_webhooks(s.secret, webhook_id, ts, body)
        return h

    async def post(self, body: bytes, webhook_id: str) -> Outcome:
        """One attempt, following 307/308 redirects (see redirects); never raises for
        network or HTTP errors."""
        headers = self.headers(body, webhook_id)
        data = gzip.compress(body, compresslevel=5) if self.cfg.gzip else body
        began = time.monotonic()
        url = self.cfg.url
        seen = {url}
        hops = 0
        try:
            while True:
                outcome, location = await self._attempt(url, data, headers, began)
                status = outcome.status
                if status in redirects.MOVED:
                    text = redirects.moved_message(status, location)
                    return dataclasses.replace(outcome, error=text, excerpt=text, redirects=hops)
                if status not in redirects.FOLLOWED:
                    return dataclasses.replace(outcome, redirects=hops)
                hop = redirects.resolve(url, status, location)
                error = hop.error
                if not error and hops >= redirects.MAX_REDIRECTS:
                    error = (
                        f"more than {redirects.MAX_REDIRECTS} redirects"
                        f" (the next to {mask_url(hop.url)})"
                    )
                elif not error and hop.url in seen:
                    error = f"redirect loop: HTTP {status} back to {mask_url(hop.url)}"
                if error:
                    return dataclasses.replace(
                        outcome, error=error, excerpt=error, retry_after_s=None, redirects=hops
                    )
                if redirects.origin(hop.url) != redirects.origin(url):
                    # As browsers do: the new origin never sees the old one's credentials.
                    headers = redirects.without(headers, self.auth_headers)
                url = hop.url
                seen.add(url)
                hops += 1
        except TimeoutError:
            return Outcome(
                None,
                f"no response within {self.cfg.retry.timeout_s:g} s",
                latency_s=time.monotonic() - began,
                redirects=hops,
            )
        except aiohttp.ClientError as exc:
            return Outcome(
                None, _error_text(exc), latency_s=time.monotonic() - began, redirects=hops
            )
        except (OSError, ValueError) as exc:
            return Outcome(
                None, _error_text(exc), latency_s=time.monotonic() - began, redirects=hops
            )

    async def _attempt(
        self, url: str, data: bytes, headers: dict[str, str], began: float
    ) -> tuple[Outcome, str | None]:
        """One POST to `url`: what it came to, and its Location header (redirects)."""
        async with self.session.post(
            url,
            data=data,
            headers=headers,
            ssl=self.ssl,
            timeout=self.timeout,
            allow_redirects=False,
        ) as resp:
            location = resp.headers.get("Location")
            if resp.status in redirects.FOLLOWED or resp.status in redirects.MOVED:
                # A redirect's body says nothing the gateway uses.
                latency = time.monotonic() - began
                return Outcome(resp.status, f"HTTP {resp.status}", latency_s=latency), location
            raw = await resp.content.read(MAX_RESPONSE_READ)
            excerpt = raw[:EXCERPT_BYTES].decode("utf-8", "replace")
            latency = time.monotonic() - began
            if 200 <= resp.status < 300:
                return Outcome(resp.status, "", excerpt, latency_s=latency), location
            return Outcome(
                resp.status,
                f"HTTP {resp.status}",
                excerpt,
                parse_retry_after(resp.headers.get("Retry-After")),
                latency,
            ), location


def _error_text(exc: Exception) -> str:
    """An exception as a webhook's last error: aiohttp's quote the URL, query and all."""
    return mask_urls(f"{exc.__class__.__name__}: {exc}")[:300]


def describe(o: Outcome) -> str:
    """An outcome in words for the webhook's last error: the status and the reply's start."""
    if o.status is None:
        return o.error
    # A reply may quote the URL it was called at, query token and all.
    text = mask_urls(o.excerpt.strip().replace("\n", " "))
    return f"HTTP {o.status}: {text}" if text else f"HTTP {o.status}"


@contextlib.asynccontextmanager
async def client_session() -> AsyncIterator[aiohttp.ClientSession]:
    """One keep-alive session for every webhook."""
    connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(connector=connector, auto_decompress=True) as session:
        yield session

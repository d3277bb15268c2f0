"""What stands between the network and the web handlers.

- `safe_next`: where /login may send a browser afterwards (same-origin paths only).
- `LoginLimiter`: growing delays after wrong tokens, per client address.
- `HostCheck`: the Host header must name this gateway (DNS rebinding answers 421).
- `Csrf`: the HTML login form's token, tied to a cookie; every other state-changing
  request must be application/json, which a cross-site form cannot send.
- `tls_context`: HTTPS for the dashboard from web.tls_cert and web.tls_key.

docs/security.md explains what each of them stops and what it does not.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import math
import secrets
import ssl
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

from aiohttp import web

from gateway.config import WebSection

UNSAFE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
CSRF_COOKIE = "gateway_csrf"
CSRF_FIELD = "csrf"
# The parsed form of a urlencoded request, which the guard reads before the handler.
FORM: web.RequestKey[dict[str, str]] = web.RequestKey("form", dict)
MAX_NEXT_CHARS = 2000
# How long browsers remember to use HTTPS only (one year, the usual preload value).
HSTS = "max-age=31536000"


# -- where to go after /login -------------------------------------------------------------


def _path_is_plain(value: str) -> bool:
    # Printable ASCII only: a browser strips tabs and newlines from a URL and reads a
    # backslash as a slash, so "/\t/evil.example" or "/\\evil.example" is "//evil.example",
    # another origin. Leading "//" is such an origin as written.
    if not value.startswith("/") or value.startswith("//"):
        return False
    if "\\" in value or "//" in value:
        return False
    return all(0x21 <= ord(c) <= 0x7E for c in value)


def safe_next(value: str) -> str:
    """`value` when it is a path on this site, else "/"."""
    if len(value) > MAX_NEXT_CHARS:
        return "/"
    text = value
    # Each percent-decoding must be a plain path too ("/%2F%2Fevil" and "/%5Cevil" are not):
    # a proxy or a browser may decode once more than we do.
    for _ in range(4):
        if not _path_is_plain(text):
            return "/"
        try:
            decoded = unquote(text, errors="strict")
        except UnicodeDecodeError:
            return "/"
        if decoded == text:
            break
        text = decoded
    else:
        return "/"
    parts = urlsplit(value)
    if parts.scheme or parts.netloc:
        return "/"
    return value


# -- login rate limit ---------------------------------------------------------------------


@dataclass(slots=True)
class _Attempts:
    failures: int
    locked_until: float
    last: float


class LoginLimiter:
    """Wrong tokens per client: after `free` of them, each one more locks the client out
    of /login for base_s, then twice as long each time, up to cap_s. Holds at most
    max_clients addresses (the longest quiet is forgotten first) and forgets a client
    quiet for forget_s."""

    def __init__(
        self,
        *,
        free: int = 3,
        base_s: float = 1.0,
        cap_s: float = 300.0,
        forget_s: float = 3600.0,
        max_clients: int = 4096,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.free = free
        self.base_s = base_s
        self.cap_s = cap_s
        self.forget_s = forget_s
        self.max_clients = max_clients
        self.clock = clock
        self._clients: OrderedDict[str, _Attempts] = OrderedDict()

    def __len__(self) -> int:
        return len(self._clients)

    @staticmethod
    def key(remote: str | None) -> str:
        """The client: its address, or its /64 for IPv6 (one host holds a whole /64)."""
        text = remote or "?"
        try:
            addr = ipaddress.ip_address(text)
        except ValueError:
            return text
        if isinstance(addr, ipaddress.IPv6Address):
            if addr.ipv4_mapped is not None:
                return str(addr.ipv4_mapped)
            return str(ipaddress.IPv6Network((addr, 64), strict=False))
        return str(addr)

    def _get(self, client: str, now: float) -> _Attempts | None:
        a = self._clients.get(client)
        if a is not None and now - a.last > self.forget_s:
            del self._clients[client]
            return None
        return a

    def retry_after(self, client: str) -> float:
        """Seconds until `client` may try again; 0 when it may now."""
        now = self.clock()
        a = self._get(client, now)
        return max(0.0, a.locked_until - now) if a is not None else 0.0

    def failed(self, client: str) -> float:
        """Count a wrong token; the seconds the client is now locked out for."""
        now = self.clock()
        a = self._get(client, now)
        if a is None:
            while len(self._clients) >= self.max_clients:
                self._clients.popitem(last=False)
            a = self._clients[client] = _Attempts(0, 0.0, now)
        a.failures += 1
        a.last = now
        self._clients.move_to_end(client)
        over = a.failures - self.free
        delay = 0.0 if over < 0 else min(self.cap_s, self.base_s * 2.0 ** min(over, 64))
        a.locked_until = now + delay
        return delay

    def succeeded(self, client: str) -> None:
        self._clients.pop(client, None)


def retry_after_header(seconds: float) -> str:
    return str(max(1, math.ceil(seconds)))


# -- Host header --------------------------------------------------------------------------


def host_name(header: str) -> str:
    """The host of a Host header: lower case, without port or IPv6 brackets."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:].partition("]")[0]
    if text.count(":") == 1:
        text = text.partition(":")[0]
    return text.rstrip(".")


class HostCheck:
    """The names a request may address this gateway by: the listen address, localhost,
    public_url's host and web.allowed_hosts, plus the address the client actually
    connected to (a literal address cannot be rebound: its origin is the gateway itself,
    which also covers a 0.0.0.0 listen reached by one of the machine's addresses)."""

    def __init__(self, cfg: WebSection) -> None:
        listen_host = cfg.listen.rpartition(":")[0].strip("[]").lower()
        names = {"localhost", listen_host, *cfg.allowed_hosts}
        public = urlsplit(cfg.public_url).hostname
        if public:
            names.add(public.lower())
        self.names = frozenset(n.rstrip(".") for n in names if n)

    def allows(self, request: web.Request) -> bool:
        header = request.headers.get("Host", "")
        if not header:
            return False
        name = host_name(header)
        if name in self.names:
            return True
        try:
            addr = ipaddress.ip_address(name)
        except ValueError:
            return False
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        if not sockname:
            return False
        try:
            return addr == ipaddress.ip_address(str(sockname[0]).partition("%")[0])
        except ValueError:
            return False


# -- CSRF ---------------------------------------------------------------------------------


class Csrf:
    """The login form's hidden field is an HMAC of a random cookie under a key of this
    process: a page on another site can neither read the field nor forge it, even if it
    manages to set the cookie."""

    def __init__(self) -> None:
        self._key = secrets.token_bytes(32)

    @staticmethod
    def new_cookie() -> str:
        return secrets.token_urlsafe(24)

    @staticmethod
    def cookie_of(request: web.Request) -> str:
        value = request.cookies.get(CSRF_COOKIE, "")
        ok = (
            16 <= len(value) <= 64
            and value.isascii()
            and value.replace("-", "").replace("_", "").isalnum()
        )
        return value if ok else ""

    def field(self, cookie: str) -> str:
        return hmac.new(self._key, f"csrf {cookie}".encode(), hashlib.sha256).hexdigest()

    def valid(self, request: web.Request, given: str) -> bool:
        cookie = self.cookie_of(request)
        return bool(cookie) and hmac.compare_digest(given.encode(), self.field(cookie).encode())


def form_fields(body: bytes) -> dict[str, str]:
    """An application/x-www-form-urlencoded body; the first value of each name."""
    out: dict[str, str] = {}
    for k, v in parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True):
        out.setdefault(k, v)
    return out


# -- HTTPS --------------------------------------------------------------------------------


def tls_context(cfg: WebSection) -> ssl.SSLContext | None:
    """The server's TLS context when web.tls_cert and web.tls_key are set."""
    if not (cfg.tls_cert and cfg.tls_key):
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(cfg.tls_cert, cfg.tls_key)
    return ctx

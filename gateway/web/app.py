"""The web interface: dashboard, JSON API, Prometheus metrics, health and report downloads.

Handlers read the store through their own read-only SQLite connection in a worker thread
(`store.Reader`), so a slow query never stalls the event loop, and write only through the
store's writer (`Store.call`). With `web.token` set, every page and API call needs
`Authorization: Bearer <token>` or the session cookie from /login; /healthz and report
downloads (whose URL token is the credential) stay open. Whatever the token, the rules of
gateway.web.guard come first: the Host header must name this gateway, and a request that
changes state must be JSON or carry the login form's CSRF field.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import html
import importlib.resources
import logging
import secrets
import sqlite3
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar

import aiohttp
import orjson
from aiohttp import web

from gateway import __version__
from gateway import store as st
from gateway.config import Config, WebhookConfig
from gateway.config.secrets import mask_urls
from gateway.delivery import Outcome, Sender, new_webhook_id
from gateway.errors import GatewayError
from gateway.ingest import IngestStats, Taker
from gateway.store import Store
from gateway.usage import lookup, reports
from gateway.web import guard, metrics, openapi, status
from gateway.web.testsend import TEST_ICCID as TEST_ICCID
from gateway.web.testsend import test_body
from gateway.web.throughput import Throughput, take_sample

log = logging.getLogger("gateway.web")
T = TypeVar("T")

SESSION_COOKIE = "gateway_session"
SESSION_TTL_S = 12 * 3600
HEALTH_TIMEOUT_S = 5.0
MAX_REPLAY_IDS = 10_000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def store_bytes(db_path: Path) -> int:
    """The store's size on disk: the database and its WAL."""
    total = 0
    for suffix in ("", "-wal"):
        with contextlib.suppress(OSError):
            total += Path(f"{db_path}{suffix}").stat().st_size
    return total


def _iso_s(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def _dashboard_html() -> str:
    return importlib.resources.files("gateway.web").joinpath("dashboard.html").read_text("utf-8")


LOGIN_PAGE = """<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>edge-gateway: sign in</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style nonce="__NONCE__">
body{font:15px system-ui,sans-serif;background:#f4f5f7;color:#1d2330;display:flex;
justify-content:center;padding-top:12vh}
form{background:#fff;padding:24px 28px;border-radius:8px;box-shadow:0 1px 4px #0002;width:320px}
h1{font-size:18px;margin:0 0 14px}input{width:100%;box-sizing:border-box;padding:8px;
margin:6px 0 12px;font:inherit}button{padding:8px 16px;font:inherit}
.err{color:#b3261e;margin:0 0 10px}
</style></head><body>
<form method="post" action="/login">
<h1>edge-gateway</h1>__ERROR__
<label for="token">Dashboard token (<code>web.token</code>)</label>
<input id="token" name="token" type="password" autocomplete="current-password" autofocus>
<input type="hidden" name="next" value="__NEXT__">
<input type="hidden" name="csrf" value="__CSRF__">
<button id="sign-in" type="submit">Sign in</button>
</form></body></html>
"""


def _csp(nonce: str) -> str:
    return (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}';"
        " connect-src 'self'; img-src 'self' data:; form-action 'self';"
        " frame-ancestors 'none'; base-uri 'none'"
    )


def _page(text: str, status: int = 200) -> web.Response:
    nonce = secrets.token_urlsafe(16)
    return web.Response(
        text=text.replace("__NONCE__", nonce),
        status=status,
        content_type="text/html",
        headers={"Content-Security-Policy": _csp(nonce), "Cache-Control": "no-store"},
    )


def _json(value: Any, status: int = 200) -> web.Response:
    return web.Response(
        body=orjson.dumps(value),
        status=status,
        content_type="application/json",
        headers={"Cache-Control": "no-store"},
    )


def _error(status: int, message: str) -> web.Response:
    return _json({"error": message}, status)


def _ids(value: Any) -> list[int] | None:
    """Dead-letter ids from JSON (2.0 is an integer there too); None when any is not one."""
    if not isinstance(value, list) or len(value) > MAX_REPLAY_IDS:
        return None
    out = []
    for i in value:
        if isinstance(i, float) and i.is_integer():
            i = int(i)
        if type(i) is not int or not 1 <= i < 2**63:
            return None
        out.append(i)
    return out


def _ingest_state(stats: IngestStats) -> dict[str, Any]:
    """What /api/status shows of the ingest as a whole, and of each MQTT session."""
    return {
        "connected": stats.connected,
        "subscribed": stats.subscribed,
        "received": stats.received,
        "acknowledged": stats.acked,
        "bad_topics": stats.bad_topics,
        "last_error": stats.last_error,
    }


class Web:
    """The aiohttp application and what it reads: store, ingest, throughput, metrics."""

    def __init__(self, cfg: Config, store: Store, http: aiohttp.ClientSession) -> None:
        self.cfg = cfg
        self.store = store
        self.http = http
        self.ingest: Taker | None = None
        self.reader = st.Reader(store.path)
        self.started = time.time()
        self.started_mono = time.monotonic()
        self.throughput = Throughput(cfg.web.sample_s)
        self.metrics = metrics.Metrics(self.status_sync, ())
        self.hooks: dict[str, WebhookConfig] = {}
        self.set_webhooks(cfg.webhooks)
        self.token = cfg.web.token.encode()
        self.hosts = guard.HostCheck(cfg.web)
        self.csrf = guard.Csrf()
        self.limiter = guard.LoginLimiter()
        self.html = _dashboard_html()
        self.app = self._app()

    def set_webhooks(self, hooks: Sequence[WebhookConfig]) -> None:
        """The webhooks (at start and after a reload): status, test buttons, replay and
        metrics follow."""
        self.cfg = replace(self.cfg, webhooks=tuple(hooks))
        self.hooks = {w.name: w for w in hooks}
        self.metrics.add_webhooks(self.hooks)

    # -- feeding ------------------------------------------------------------------------

    def on_result(self, webhook: str, outcome: Outcome) -> None:
        """delivery's callback after every POST: feeds the latency histogram."""
        self.metrics.observe(webhook, outcome.latency_s)

    async def sample_forever(self) -> None:
        """Take a throughput sample every web.sample_s until cancelled."""
        while True:
            try:
                self.throughput.add(await self.reader.run(take_sample))
            except (GatewayError, OSError, sqlite3.Error) as exc:
                log.warning("web: cannot sample the store: %s", exc)
            await asyncio.sleep(self.cfg.web.sample_s)

    # -- status -------------------------------------------------------------------------

    def status_sync(self) -> dict[str, Any]:
        """The /api/status document (reads the store: call it off the event loop)."""
        snap = self.reader.run_sync(status.snapshot, self.cfg)
        ing = self.ingest
        stats = ing.stats if ing is not None else IngestStats()
        snap["gateway"] = {
            "version": __version__,
            "auth": bool(self.token),
            "started": _iso_s(self.started),
            "started_s": round(self.started, 3),
            "uptime_s": round(time.monotonic() - self.started_mono, 1),
            "store": {
                "bytes": store_bytes(self.store.path),
                "writable": not self.store.write_error,
                "write_error": self.store.write_error,
                "commits": self.store.commits,
                # Packets the broker sends ahead of their PUBACKs, as the writer learnt
                # it (0: no cap seen); see store.CAP_MIN_PACKETS.
                "broker_cap": self.store.broker_cap,
                # Packets below which a commit no longer waits on for a trickle, as the
                # writer learnt it (0: none); see store.TRICKLE_PACKETS.
                "trickle_cap": self.store.trickle_cap,
            },
            "mqtt": {
                "broker": f"{self.cfg.mqtt.host}:{self.cfg.mqtt.port}",
                "alive": bool(ing and ing.alive),
                **_ingest_state(stats),
                "last_packet": status.iso(stats.last_packet_ns),
                # One per MQTT session: several with mqtt.ingest_processes.
                "sessions": [
                    {"client_id": client_id, "pid": pid, **_ingest_state(one)}
                    for client_id, pid, one in (ing.sessions() if ing is not None else [])
                ],
            },
        }
        snap["rates"] = self.throughput.rates()
        snap["throughput"] = {
            "interval_s": self.cfg.web.sample_s,
            "window_s": self.throughput.window_s,
            "points": self.throughput.points(),
        }
        if self.cfg.modem is not None and snap.get("modem") is not None:
            from gateway.modem import poller

            live = poller.STATE
            if live.updated_ns:
                snap["modem"]["state"] = live.state
                snap["modem"]["last_error"] = live.last_error
                snap["modem"]["updated"] = status.iso(live.updated_ns)
                if live.info is not None:
                    snap["modem"]["info"] = live.info.to_dict()
                    snap["modem"]["signal_quality"] = status.quality_of(snap["modem"]["info"])
        return snap

    # -- auth ---------------------------------------------------------------------------

    def _session_value(self, expires: int) -> str:
        sig = hmac.new(self.token, f"edge-gateway session {expires}".encode(), hashlib.sha256)
        return f"{expires}.{sig.hexdigest()}"

    def authorized(self, request: web.Request) -> bool:
        """A bearer token or a valid, unexpired session cookie; constant-time comparisons."""
        if not self.token:
            return True
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return hmac.compare_digest(auth[7:].strip().encode(), self.token)
        cookie = request.cookies.get(SESSION_COOKIE, "")
        expires, _, _sig = cookie.partition(".")
        if not (expires.isascii() and expires.isdigit() and len(expires) <= 12):
            return False
        if int(expires) < time.time():
            return False
        return hmac.compare_digest(cookie.encode(), self._session_value(int(expires)).encode())

    @web.middleware
    async def _guard(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        path = request.path
        open_path = path in ("/healthz", "/login") or path.startswith(reports.DOWNLOAD_PREFIX)
        refused: web.StreamResponse | None = None
        # /healthz answers whatever the Host: monitors and container probes address the
        # gateway by names the config cannot list, and it shows nothing worth rebinding for.
        if path != "/healthz" and not self.hosts.allows(request):
            refused = _error(
                421, "this gateway does not answer to that Host name (see web.allowed_hosts)"
            )
        elif not (open_path or self.authorized(request)):
            if path.startswith("/api/") or path == "/metrics":
                refused = _error(401, "missing or wrong token (Authorization: Bearer <web.token>)")
                refused.headers["WWW-Authenticate"] = 'Bearer realm="edge-gateway"'
            else:
                refused = self._login_page(request, path, "", 401)
        elif request.method in guard.UNSAFE_METHODS:
            refused = await self._cross_site(request)
        resp = refused if refused is not None else await handler(request)
        resp.headers.setdefault("X-Content-Type-Options", "nosniff")
        # Download URLs carry their token: never leak it in a Referer.
        resp.headers.setdefault("Referrer-Policy", "no-referrer")
        resp.headers.setdefault("Cache-Control", "no-store")
        if request.secure:
            resp.headers.setdefault("Strict-Transport-Security", guard.HSTS)
        return resp

    async def _cross_site(self, request: web.Request) -> web.StreamResponse | None:
        """Why a state-changing request is refused, or None. A page on another site can
        post a form (urlencoded, multipart or text/plain) without asking; it cannot send
        application/json without a CORS preflight, which this server never grants."""
        try:
            async with asyncio.timeout(self.cfg.web.read_timeout_s):
                body = await request.read()
        except TimeoutError:
            resp = _error(408, "the request body did not arrive in time")
            resp.force_close()
            return resp
        if request.content_type == "application/json":
            return None
        if request.content_type == "application/x-www-form-urlencoded":
            form = guard.form_fields(body)
            request[guard.FORM] = form
            if self.csrf.valid(request, form.get(guard.CSRF_FIELD, "")):
                return None
            if request.path == "/login":
                expired = "The sign-in form expired: please sign in again."
                return self._login_page(request, form.get("next", "/"), expired, 403)
            return _error(403, "a form post needs the login form's csrf field; send JSON instead")
        return _error(415, "send the body as application/json")

    def _login_page(
        self, request: web.Request, next_path: str, error: str, status_code: int
    ) -> web.Response:
        cookie = self.csrf.cookie_of(request) or self.csrf.new_cookie()
        text = LOGIN_PAGE.replace("__NEXT__", html.escape(guard.safe_next(next_path), quote=True))
        text = text.replace("__CSRF__", self.csrf.field(cookie))
        err = f'<p class="err" id="login-error">{html.escape(error)}</p>' if error else ""
        resp = _page(text.replace("__ERROR__", err), status_code)
        resp.set_cookie(
            guard.CSRF_COOKIE,
            cookie,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            # "/": every login page a browser fetches (a favicon's 401 too) must reuse the
            # cookie, or the last page's field would no longer match the form shown.
            path="/",
        )
        return resp

    async def login_form(self, request: web.Request) -> web.StreamResponse:
        if not self.token:
            raise web.HTTPSeeOther("/")
        return self._login_page(request, request.query.get("next", "/"), "", 200)

    async def login(self, request: web.Request) -> web.StreamResponse:
        """The login form (urlencoded, with its csrf field) or JSON {"token", "next"}."""
        if not self.token:
            raise web.HTTPSeeOther("/")
        form = request.get(guard.FORM)
        if form is None:
            try:
                doc = orjson.loads(await request.read())
            except orjson.JSONDecodeError:
                doc = None
            if not isinstance(doc, dict):
                return _error(400, 'body: must be {"token": TOKEN, "next": PATH}')
            fields = {k: v for k, v in doc.items() if isinstance(v, str)}
        else:
            fields = form
        next_path = guard.safe_next(fields.get("next", "/"))
        client = guard.LoginLimiter.key(request.remote)
        wait = self.limiter.retry_after(client)
        if wait > 0:
            msg = f"Too many wrong tokens: try again in {guard.retry_after_header(wait)} s."
            resp = self._login_page(request, next_path, msg, 429) if form else _error(429, msg)
            resp.headers["Retry-After"] = guard.retry_after_header(wait)
            return resp
        given = fields.get("token", "").strip().encode()
        if not hmac.compare_digest(given, self.token):
            locked = self.limiter.failed(client)
            log.warning(
                "web: wrong token at /login from %s%s",
                request.remote,
                f" (locked out for {locked:g} s)" if locked else "",
            )
            if form is None:
                return _error(401, "wrong token")
            return self._login_page(request, next_path, "Wrong token.", 401)
        self.limiter.succeeded(client)
        resp = web.Response(status=303, headers={"Location": next_path})
        expires = int(time.time()) + SESSION_TTL_S
        resp.set_cookie(
            SESSION_COOKIE,
            self._session_value(expires),
            max_age=SESSION_TTL_S,
            httponly=True,
            samesite="Strict",
            secure=request.secure,
            path="/",
        )
        return resp

    async def logout(self, request: web.Request) -> web.StreamResponse:
        resp = web.Response(status=303, headers={"Location": "/login"})
        resp.del_cookie(SESSION_COOKIE, path="/")
        return resp

    # -- pages and API ------------------------------------------------------------------

    async def dashboard(self, request: web.Request) -> web.StreamResponse:
        return _page(self.html)

    async def api_status(self, request: web.Request) -> web.StreamResponse:
        return _json(await asyncio.to_thread(self.status_sync))

    async def api_openapi(self, request: web.Request) -> web.StreamResponse:
        return _json(openapi.document())

    async def list_dead_letters(self, request: web.Request) -> web.StreamResponse:
        webhook = request.query.get("webhook")
        raw_limit = request.query.get("limit", "1000")
        digits = raw_limit.isascii() and raw_limit.isdigit() and len(raw_limit) <= 5
        if not (digits and 1 <= int(raw_limit) <= 10_000):
            return _error(400, "limit: must be an integer 1-10000")
        rows = await asyncio.wrap_future(
            self.store.call(st.list_dead_letters, webhook, int(raw_limit))
        )
        for r in rows:
            r["created"] = status.iso(r["created_ns"])
        return _json({"dead_letters": rows})

    async def replay_dead_letters(self, request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return _error(415, "send the body as application/json")
        try:
            body = orjson.loads(await request.read())
        except orjson.JSONDecodeError:
            return _error(400, "body: not valid JSON")
        if not isinstance(body, dict) or set(body) - {"webhook", "ids"}:
            return _error(400, 'body: must be {"webhook": NAME, "ids": [ID, ...]}')
        webhook = body.get("webhook")
        ids = _ids(body.get("ids", []))
        if not isinstance(webhook, str):
            return _error(400, "webhook: must be a string")
        if ids is None:
            return _error(400, f"ids: must be a list of at most {MAX_REPLAY_IDS} dead-letter ids")
        if webhook not in self.hooks:
            return _error(404, f"no webhook named {webhook!r} in the configuration")
        n = await asyncio.wrap_future(self.store.call(st.replay_dead_letters, webhook, ids))
        if n:
            log.info("web: re-queued %d dead letter(s) of webhook %s", n, webhook)
        return _json({"replayed": n})

    async def get_cdr(self, request: web.Request) -> web.StreamResponse:
        """One CDR by UniqueID with its delivery state per CDR webhook."""
        uid = request.match_info["unique_id"]
        found = await self.reader.run(lookup.find, list(self.hooks.values()), uid)
        if found is None:
            return _error(404, f"no CDR with UniqueID {uid[:64]!r}")
        return _json(found)

    async def list_cdrs(self, request: web.Request) -> web.StreamResponse:
        """CDRs by time and ICCID, oldest first, a page at a time (`after`)."""
        try:
            q = lookup.parse_query(request.query)
        except lookup.BadQuery as exc:
            return _error(400, str(exc))
        items, after = await self.reader.run(lookup.search, list(self.hooks.values()), q)
        return _json({"cdrs": items, "next_after": after})

    async def test_webhook(self, request: web.Request) -> web.StreamResponse:
        hook = self.hooks.get(request.match_info["name"])
        if hook is None:
            return _error(
                404, f"no webhook named {request.match_info['name']!r} in the configuration"
            )
        webhook_id = new_webhook_id()
        body = test_body(hook, self.cfg, time.time_ns())
        outcome = await Sender(hook, self.http).post(body, webhook_id)
        log.info(
            "web: test request to webhook %s: %s",
            hook.name,
            outcome.status if outcome.status is not None else outcome.error,
        )
        return _json(
            {
                "webhook": hook.name,
                "webhook_id": webhook_id,
                "ok": outcome.ok,
                "status": outcome.status,
                "latency_ms": round(outcome.latency_s * 1000, 1),
                # A receiver may quote the URL it was called at, query token and all.
                "excerpt": mask_urls(outcome.excerpt),
                "error": outcome.error,
            }
        )

    async def prometheus(self, request: web.Request) -> web.StreamResponse:
        body = await asyncio.to_thread(self.metrics.render)
        return web.Response(body=body, headers={"Content-Type": metrics.CONTENT_TYPE})

    async def healthz(self, request: web.Request) -> web.StreamResponse:
        problems = []
        if self.store.write_error:
            problems.append(f"store not writable: {self.store.write_error}")
        elif not self.store.writer_alive:
            problems.append("store writer stopped")
        else:
            try:
                await asyncio.wait_for(
                    asyncio.wrap_future(self.store.call(lambda _c: None)), HEALTH_TIMEOUT_S
                )
            except TimeoutError:
                problems.append(f"store writer busy for more than {HEALTH_TIMEOUT_S:g} s")
            except GatewayError as exc:
                problems.append(str(exc))
        if self.ingest is None or not self.ingest.alive:
            problems.append("ingest not running")
        if problems:
            return web.Response(text="\n".join(problems) + "\n", status=503)
        return web.Response(text="ok\n")

    async def download(self, request: web.Request) -> web.StreamResponse:
        token = request.match_info["token"]
        found = await self.reader.run(reports.find_download, token, time.time_ns())
        if found is None:
            return web.Response(status=404, text="no such report\n")
        if found.expired:
            return web.Response(status=410, text="this report link has expired\n")
        name = "".join(
            c if c.isascii() and c.isprintable() and c not in '"\\' else "_"
            for c in found.file_name
        )
        return web.FileResponse(
            found.path,
            headers={
                "Content-Type": "application/zip",
                "Content-Disposition": f'attachment; filename="{name}"',
                "Cache-Control": "no-store",
            },
        )

    # -- wiring -------------------------------------------------------------------------

    def _app(self) -> web.Application:
        app = web.Application(middlewares=[self._guard], client_max_size=1 << 20)
        r = app.router
        r.add_get("/", self.dashboard)
        r.add_get("/login", self.login_form)
        r.add_post("/login", self.login)
        r.add_post("/logout", self.logout)
        r.add_get("/healthz", self.healthz)
        r.add_get("/metrics", self.prometheus)
        r.add_get("/api/status", self.api_status)
        r.add_get("/api/openapi.json", self.api_openapi)
        r.add_get("/api/dead-letters", self.list_dead_letters)
        r.add_post("/api/dead-letters", self.replay_dead_letters)
        r.add_post("/api/webhooks/{name}/test", self.test_webhook)
        r.add_get("/api/cdrs", self.list_cdrs)
        r.add_get("/api/cdrs/{unique_id}", self.get_cdr)
        r.add_get(reports.DOWNLOAD_PREFIX + "{token}", self.download)
        return app


@contextlib.asynccontextmanager
async def serve(cfg: Config, store: Store, http: aiohttp.ClientSession) -> AsyncIterator[Web]:
    """Listen on web.listen for the duration of the context."""
    site_ = Web(cfg, store, http)
    host, _, port = cfg.web.listen.rpartition(":")
    try:
        tls = guard.tls_context(cfg.web)
    except (OSError, ssl.SSLError) as exc:
        raise GatewayError(f"web.tls_cert: cannot load the certificate and key: {exc}") from exc
    # keepalive_timeout also bounds how long a new connection may take to send its
    # request's headers: aiohttp closes a connection still waiting for them by then.
    # lingering_time bounds how long it drains an unread body after answering (the
    # guard's 408 for a body that stalls).
    runner = web.AppRunner(
        site_.app,
        access_log=None,
        shutdown_timeout=2.0,
        keepalive_timeout=cfg.web.read_timeout_s,
        lingering_time=cfg.web.read_timeout_s,
    )
    await runner.setup()
    try:
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port), ssl_context=tls).start()
        except OSError as exc:
            raise GatewayError(
                f"web.listen: cannot listen on {cfg.web.listen}: {exc.strerror or exc}"
            ) from exc
        sampler = asyncio.create_task(site_.sample_forever(), name="web-sampler")
        scheme = "https" if tls else "http"
        log.info("dashboard on %s://%s/", scheme, cfg.web.listen)
        if tls is None and not cfg.web.loopback:
            log.warning(
                "web: the dashboard listens on %s without TLS: its token and session"
                " cookie cross the network in clear text (set web.tls_cert and web.tls_key)",
                cfg.web.listen,
            )
        try:
            yield site_
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    finally:
        await runner.cleanup()
        site_.reader.close()

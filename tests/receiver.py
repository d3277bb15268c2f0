"""A real aiohttp webhook receiver on loopback, in its own thread, with scripted replies."""

from __future__ import annotations

import asyncio
import gc
import gzip
import ssl
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web


@dataclass
class Recorded:
    at: float
    path: str
    headers: dict[str, str]
    raw: bytes
    body: bytes
    status: int = 0

    @property
    def json(self) -> Any:
        return orjson.loads(self.body)

    @property
    def records(self) -> list[Any]:
        value = self.json
        return value if isinstance(value, list) else [value]

    @property
    def webhook_id(self) -> str:
        return self.headers.get("webhook-id", "")


@dataclass
class Reply:
    status: int = 200
    delay_s: float = 0.0
    headers: dict[str, str] = field(default_factory=dict)
    text: str = "ok"


Behaviour = Callable[[int, Recorded], Reply]


class Receiver:
    """Records every request; `behaviour(n, request)` decides each reply (n counts from 0)."""

    def __init__(self, ssl_context: ssl.SSLContext | None = None) -> None:
        self.ssl_context = ssl_context
        self.requests: list[Recorded] = []
        self.behaviour: Behaviour = lambda n, r: Reply()
        self.port = 0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def url(self) -> str:
        scheme = "https" if self.ssl_context else "http"
        return f"{scheme}://127.0.0.1:{self.port}/hook"

    def ok(self) -> list[Recorded]:
        """Requests answered with 2xx."""
        return [r for r in list(self.requests) if 200 <= r.status < 300]

    def delivered(self) -> list[Any]:
        """Every record in every 2xx request, in arrival order."""
        return [rec for r in self.ok() for rec in r.records]

    async def _handle(self, request: web.Request) -> web.Response:
        # aiohttp's server already inflates Content-Encoding: gzip; the raw wire size
        # stays visible in Content-Length.
        body = await request.read()
        raw = gzip.decompress(body) if body[:2] == b"\x1f\x8b" else body
        rec = Recorded(
            time.monotonic(),
            request.path,
            {k.lower(): v for k, v in request.headers.items()},
            body,
            raw,
        )
        with self._lock:
            n = len(self.requests)
            self.requests.append(rec)
        reply = self.behaviour(n, rec)
        if reply.delay_s:
            await asyncio.sleep(reply.delay_s)
        rec.status = reply.status
        return web.Response(status=reply.status, text=reply.text, headers=reply.headers)

    def start(self) -> Receiver:
        ready = threading.Event()

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            app = web.Application(client_max_size=64 * 1024 * 1024)
            app.router.add_post("/{tail:.*}", self._handle)
            self._runner = web.AppRunner(app, access_log=None)
            loop.run_until_complete(self._runner.setup())
            site = web.TCPSite(self._runner, "127.0.0.1", self.port, ssl_context=self.ssl_context)
            loop.run_until_complete(site.start())
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._shutdown())
            loop.close()
            # A TLS handshake the client rejected (the test of an untrusted CA) leaves a
            # server-side transport that aiohttp's runner never saw; it is ours, not the
            # gateway's, so collect it here without a ResourceWarning.
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", ResourceWarning)
                gc.collect()

        self._thread = threading.Thread(target=serve, name="receiver", daemon=True)
        self._thread.start()
        ready.wait(10)
        return self

    async def _shutdown(self) -> None:
        assert self._runner is not None
        await self._runner.shutdown()
        await self._runner.cleanup()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # Closed transports finish on the next loop iterations; let them, then close.
        await asyncio.sleep(0.1)

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(10)
            self._thread = None

    def restart(self) -> None:
        """Stop and listen again on the same port (an outage, then recovery)."""
        self.stop()
        self.start()

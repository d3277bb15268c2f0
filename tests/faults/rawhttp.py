"""A webhook receiver written on asyncio streams, so that it can answer with anything:
huge or dripping bodies, broken status lines, oversized headers, lies, silence."""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from tests.receiver import Recorded

# An answer writes to the connection and says whether it can carry another request.
Answer = Callable[[asyncio.StreamWriter], Awaitable[bool]]


@dataclass(frozen=True)
class Scripted:
    """What to answer: the status the receiver counts the request as, and the bytes."""

    status: int
    answer: Answer


def reply(status: int, body: bytes = b"ok", headers: bytes = b"") -> Answer:
    """A well-formed answer, keep-alive."""

    async def write(w: asyncio.StreamWriter) -> bool:
        w.write(
            b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n%s\r\n" % (status, len(body), headers) + body
        )
        await w.drain()
        return True

    return write


def raw(data: bytes) -> Answer:
    """These bytes, then close."""

    async def write(w: asyncio.StreamWriter) -> bool:
        w.write(data)
        await w.drain()
        return False

    return write


def huge(status: int, size: int) -> Answer:
    """A body of `size` bytes, written as fast as the client takes it."""

    async def write(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, size))
        chunk = b"x" * 65536
        for _ in range(size // len(chunk)):
            w.write(chunk)
            await w.drain()
        return False

    return write


def drip(status: int, size: int, every_s: float) -> Answer:
    """Headers, then the body one byte at a time."""

    async def write(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, size))
        for _ in range(size):
            await w.drain()
            await asyncio.sleep(every_s)
            w.write(b"x")
        return False

    return write


def slow_headers(count: int, every_s: float) -> Answer:
    """A status line, then a header one byte at a time."""

    async def write(w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.1 200 OK\r\nX-Slow: ")
        for _ in range(count):
            await w.drain()
            await asyncio.sleep(every_s)
            w.write(b"a")
        w.write(b"\r\nContent-Length: 0\r\n\r\n")
        await w.drain()
        return False

    return write


class RawReceiver:
    """Records each request like tests.receiver.Receiver; `script(n, request)` answers."""

    def __init__(self, script: Callable[[int, Recorded], Scripted]) -> None:
        self.script = script
        self.requests: list[Recorded] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._serve, name="raw-receiver", daemon=True)
        self._ready = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def ok(self) -> list[Recorded]:
        return [r for r in list(self.requests) if 200 <= r.status < 300]

    def start(self) -> RawReceiver:
        self._thread.start()
        assert self._ready.wait(10)
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _serve(self) -> None:
        asyncio.set_event_loop(self._loop)
        server = self._loop.run_until_complete(
            asyncio.start_server(self._conn, "127.0.0.1", 0, limit=1 << 20)
        )
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        self._loop.run_forever()
        self._loop.run_until_complete(self._shutdown(server))
        self._loop.close()

    async def _shutdown(self, server: asyncio.Server) -> None:
        server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()

    async def _conn(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                lines = head.decode("latin-1").split("\r\n")
                path = lines[0].split(" ")[1]
                headers = {
                    k.strip().lower(): v.strip()
                    for k, _, v in (line.partition(":") for line in lines[1:] if line)
                }
                body = await reader.readexactly(int(headers.get("content-length", "0")))
                rec = Recorded(time.monotonic(), path, headers, body, body)
                n = len(self.requests)
                self.requests.append(rec)
                scripted = self.script(n, rec)
                rec.status = scripted.status
                if not await scripted.answer(writer):
                    break
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # the client gave up on us: that is what these answers are for
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

"""An ingest process (`python -m gateway.ingest.process FD`): an `Ingest` whose packets
go to the gateway process over a socket pair (Forwarder) instead of to a store."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway import logs
from gateway.config import MqttSection
from gateway.ingest.client import new_client
from gateway.ingest.session import Ingest
from gateway.ingest.wire import (
    COMMITTED,
    HELLO,
    STATS,
    STOP,
    encode_packet,
    frame,
    read_frames,
    unpack_ids,
)
from gateway.store.records import Incoming

log = logging.getLogger("gateway.ingest")

STOP_WAIT_S = 20.0  # for a process to commit what it sent and disconnect
DRAIN_QUIET_S = 2.0  # a retired session is drained when nothing came for this long
SEND_GATHER_S = 0.001  # a process's packets wait this long to go to the gateway together


class Forwarder:
    """An ingest process's packet sink: the gateway process, over the socket pair."""

    def __init__(self, sock: socket.socket, max_pending: int, epoch: int) -> None:
        self.sock = sock
        self.max_pending = max_pending
        self.on_committed: Callable[[list[Incoming]], None] | None = None  # not used here
        self._epoch = epoch
        self._out: list[bytes] = []
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._settled = threading.Condition()
        self._sent = 0  # packets taken (paho's thread only)
        self._done = 0  # packets the gateway said it committed (the reader only)
        self.closed = False

    def last_epoch(self) -> int:
        return self._epoch

    def submit_packet(self, pkt: Incoming, wait_s: float = 0.0) -> bool:
        room = True
        if self.unsettled >= self.max_pending and wait_s > 0:
            with self._settled:
                room = self._settled.wait_for(
                    lambda: self.closed or self.unsettled < self.max_pending, wait_s
                )
        parts = encode_packet(pkt)
        with self._lock:
            self._out += parts
        self._sent += 1
        if not self._wake.is_set():
            self._wake.set()
        return room

    @property
    def unsettled(self) -> int:
        """Packets sent to the gateway and not yet committed."""
        return self._sent - self._done

    def flush(self) -> None:
        """Wait until the gateway has committed every packet sent (or is gone)."""
        self._wake.set()
        with self._settled:
            self._settled.wait_for(lambda: self.closed or self.unsettled <= 0, STOP_WAIT_S)

    def send_loop(self, state: Callable[[], tuple[Any, ...]], stats: Callable[[], bytes]) -> None:
        """Send what paho's thread queued, in few writes, and the stats (when `state`
        changes, and every second); until closed."""
        last: tuple[Any, ...] = ()
        next_stats = 0.0
        while not self.closed:
            if self._wake.wait(0.5):
                # Let a few more packets come: a write and a wake-up per packet cost
                # both processes more than this adds to latency.
                time.sleep(SEND_GATHER_S)
            self._wake.clear()
            with self._lock:
                out, self._out = self._out, []
            now = time.monotonic()
            st = state()
            if st != last or now >= next_stats:
                last, next_stats = st, now + 1.0
                out.append(frame(STATS, stats()))
            if not out:
                continue
            try:
                self.sock.sendall(b"".join(out))
            except OSError:
                self.close()

    def read_loop(
        self, on_committed: Callable[[int, list[int]], None], on_stop: Callable[[], None]
    ) -> None:
        for kind, body in read_frames(self.sock):
            if kind == COMMITTED:
                epoch, mids = unpack_ids(body)
                on_committed(epoch, mids)
                with self._settled:
                    self._done += len(mids)
                    self._settled.notify_all()
            elif kind == STOP:
                on_stop()
        self.close()

    def close(self) -> None:
        with self._settled:
            self.closed = True
            self._settled.notify_all()
        self._wake.set()
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)


def process_main(fd: int) -> int:
    """`python -m gateway.ingest.process FD`: one ingest process, FD its socket pair end."""
    sock = socket.socket(fileno=fd)
    kind, body = next(read_frames(sock), (0, memoryview(b"")))
    if kind != HELLO:
        return 2
    hello = orjson.loads(bytes(body))
    raw = hello["mqtt"]
    cfg = MqttSection(**{**raw, "topics": tuple(raw["topics"])})
    logs.setup(hello["log_level"], hello["log_format"], secret_values=[cfg.password])
    fwd = Forwarder(sock, hello["max_pending"], hello["epoch"])
    ingest = Ingest(
        cfg,
        fwd,
        client_id=hello["client_id"],
        source=hello["source"],
        drain=hello["drain"],
        stale=hello["stale"],
    )
    stopping = threading.Event()

    def finish() -> None:
        ingest.stop()  # waits for the gateway's answers about the last packets
        if ingest.drain:
            end_session(cfg, ingest.client_id)
        fwd.close()

    def stop() -> None:
        if not stopping.is_set():
            stopping.set()
            # Off the reader: it must go on taking the gateway's answers meanwhile.
            threading.Thread(target=finish, daemon=True).start()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # reloads are the gateway process's

    def state() -> tuple[Any, ...]:
        """What the gateway must hear of at once (cheap: read at every send)."""
        if not stopping.is_set() and not ingest.alive:
            # paho's thread ended (an exception in a callback): exit, to be restarted.
            log.error("%s: MQTT network thread ended", ingest.client_id)
            fwd.close()
        st = ingest.stats
        return (
            st.connected,
            st.subscribed,
            st.connects,
            st.disconnects,
            st.last_error,
            ingest.first_attempt.is_set(),
        )

    def stats() -> bytes:
        return orjson.dumps(
            {**dataclasses.asdict(ingest.stats), "first_attempt": ingest.first_attempt.is_set()}
        )

    ingest.start()
    sender = threading.Thread(target=fwd.send_loop, args=(state, stats), daemon=True)
    sender.start()
    if ingest.drain:
        threading.Thread(target=_drain, args=(ingest, fwd, stop), daemon=True).start()
    fwd.read_loop(ingest.ack_mids, stop)
    if not stopping.is_set():
        ingest.stop()  # the gateway went away: nothing more is committed or acknowledged
        return 1
    sender.join(5)
    return 0


def _drain(ingest: Ingest, fwd: Forwarder, stop: Callable[[], None]) -> None:
    """A retired session: once unsubscribed, take packets until none came for
    DRAIN_QUIET_S and the gateway has committed them all; then stop (and end it)."""
    ingest.unsubscribed.wait()
    quiet_since = time.monotonic()
    seen = ingest.stats.received
    while not fwd.closed:
        time.sleep(0.1)
        now = time.monotonic()
        if ingest.stats.received != seen or fwd.unsettled:
            seen, quiet_since = ingest.stats.received, now
        elif now - quiet_since >= DRAIN_QUIET_S:
            log.info("%s: took %d queued packets; ending the session", ingest.client_id, seen)
            stop()
            return


def end_session(cfg: MqttSection, client_id: str) -> None:
    """Discard the broker's session of `client_id` (and its place in the shared group):
    connect with a clean start and no session expiry, then disconnect."""
    client = new_client(cfg, client_id, clean=True)
    try:
        if cfg.protocol == "5":
            client.connect(cfg.host, cfg.port, clean_start=True)
        else:
            client.connect(cfg.host, cfg.port)
        client.loop_start()
        deadline = time.monotonic() + 10
        while not client.is_connected() and time.monotonic() < deadline:
            time.sleep(0.05)
        client.disconnect()
        client.loop_stop()
    except OSError as exc:
        log.error("%s: cannot end the session: %s", client_id, exc)  # noqa: TRY400


# -- the gateway process --------------------------------------------------------------------


if __name__ == "__main__":
    raise SystemExit(process_main(int(sys.argv[1])))

"""`mqtt.ingest_processes`: MQTT ingest in processes of its own, into the one store.

paho parses every packet in Python while it holds the interpreter lock, and in one
process paho's thread is the gateway's ceiling (README, Performance). With
`ingest_processes = N` (2 or more) the gateway starts N processes
(`python -m gateway.ingest.process FD`). Each runs an `Ingest` with a persistent session
of its own in `mqtt.shared_group`, so the broker hands each packet to one of them.
They do not write SQLite: a process forwards its packets over a socket pair to the
gateway process, whose one store writer commits them as before and answers which are
committed; the process then sends their PUBACKs. So a packet is still committed
before its PUBACK, and the store still has one writer.

Session n is client `<client_id>-n`, except session 0, which keeps `<client_id>`.
The frames are in gateway/ingest/wire.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence

import orjson

from gateway import logs
from gateway.config import MqttSection
from gateway.ingest import client as client_mod
from gateway.ingest.client import fault
from gateway.ingest.session import IngestStats
from gateway.ingest.wire import (
    COMMITTED,
    HELLO,
    PACKET,
    STATS,
    STOP,
    decode_packet,
    frame,
    pack_ids,
    read_frames,
)
from gateway.store import Incoming, Store

log = logging.getLogger("gateway.ingest")

STOP_WAIT_S = 20.0  # for a process to commit what it sent and disconnect
RESTART_MAX_S = 30.0
# A process sends its stats every second: silence this long, while the gateway is not
# holding its reader back, means it hangs (stopped, deadlocked); it is killed and restarted.
HUNG_S = 10.0


class _Process:
    """One ingest process as the gateway sees it; restarted by IngestPool when it ends."""

    def __init__(self, pool: IngestPool, source: int) -> None:
        self.pool = pool
        self.source = source
        self.client_id = pool.cfg.session_client_id(source)
        self.stats = IngestStats()
        self.first_attempt = False
        self.proc: subprocess.Popen[bytes] | None = None
        self.sock: socket.socket | None = None
        self.reader: threading.Thread | None = None
        self._send_lock = threading.Lock()
        self.restart_at = 0.0
        self.backoff = 1.0
        self.started = 0.0
        # When its last frame came, and whether the reader is waiting for the store.
        self.heard = 0.0
        self.submitting = False
        # Counts of earlier processes of this session, so that the totals do not drop.
        self._before = IngestStats()

    def spawn(self, epoch: int) -> None:
        ours, theirs = socket.socketpair()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "gateway.ingest.process", str(theirs.fileno())],
            pass_fds=[theirs.fileno()],
            stdin=subprocess.DEVNULL,
        )
        theirs.close()
        self.sock = ours
        self.started = self.heard = time.monotonic()
        level, fmt = logs.settings()
        hello = {
            "mqtt": dataclasses.asdict(self.pool.cfg),
            "client_id": self.client_id,
            "source": self.source,
            "epoch": epoch,
            "max_pending": self.pool.store.max_pending,
            "drain": self.pool.drain,
            "stale": self.pool.stale,
            "log_level": level,
            "log_format": fmt,
        }
        self.send(HELLO, orjson.dumps(hello))
        self.reader = threading.Thread(
            target=self._read, args=(ours,), name=f"ingest-{self.source}", daemon=True
        )
        self.reader.start()

    def send(self, kind: int, body: bytes) -> None:
        sock = self.sock
        if sock is None:
            return
        with self._send_lock, contextlib.suppress(OSError):
            sock.sendall(frame(kind, body))

    def committed(self, epoch: int, mids: list[int]) -> None:
        self.send(COMMITTED, pack_ids(epoch, mids))

    def _read(self, sock: socket.socket) -> None:
        store = self.pool.store
        submit_lock = self.pool.submit_lock
        wait_s = self.pool.cfg.store_wait_s
        source = self.source
        for kind, body in read_frames(sock):
            self.heard = time.monotonic()
            if kind == PACKET:
                pkt = decode_packet(body, source)
                self.submitting = True
                # The store takes packets from one thread at a time (see submit_packet).
                with submit_lock:
                    store.submit_packet(pkt, wait_s=wait_s)
                self.submitting = False
            elif kind == STATS:
                raw = orjson.loads(bytes(body))
                self.first_attempt = bool(raw.pop("first_attempt", False))
                self.stats = IngestStats(**raw)
        self.stats.connected = self.stats.subscribed = False
        sock.close()

    def totals(self) -> IngestStats:
        s, b = self.stats, self._before
        return dataclasses.replace(
            s,
            connects=b.connects + s.connects,
            disconnects=b.disconnects + s.disconnects,
            received=b.received + s.received,
            acked=b.acked + s.acked,
            bad_topics=b.bad_topics + s.bad_topics,
        )

    def ended(self) -> int | None:
        """The exit code of the process if it has ended, else None."""
        return None if self.proc is None else self.proc.poll()

    def kill_if_hung(self, now: float) -> None:
        """Kill the process if it has sent nothing for HUNG_S (the watcher then
        restarts it): a stopped or deadlocked process would hold its session's share
        of the packets, unacknowledged, with no error anywhere."""
        if self.proc is None or self.submitting or now - self.heard < HUNG_S:
            return
        silent = now - self.heard
        log.error("%s: ingest process sent nothing for %.0f s; killing it", self.client_id, silent)
        self.heard = now  # once
        with contextlib.suppress(OSError):
            self.proc.kill()

    def reap(self) -> None:
        """After the process ended: its reader is done, its counts kept."""
        if self.reader is not None:
            self.reader.join(self.pool.cfg.keepalive_s)
        self._before = self.totals()
        self.stats = IngestStats(last_error=self.stats.last_error)
        self.proc = self.sock = self.reader = None


class IngestPool:
    """`ingest_processes` ingest processes, offered to the gateway as one `Ingest`.

    With `drain`, the processes of `sessions` retire theirs instead (see
    retire_sessions) and are not started again when they end."""

    def __init__(
        self,
        cfg: MqttSection,
        store: Store,
        sessions: range | None = None,
        *,
        drain: bool = False,
        stale: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.drain = drain
        self.stale = list(stale)  # filters to unsubscribe (see Ingest.stale)
        self.first_attempt = threading.Event()
        self.submit_lock = threading.Lock()
        self._stopping = threading.Event()
        sessions = sessions if sessions is not None else range(cfg.ingest_processes)
        self.procs = [_Process(self, n) for n in sessions]
        self._by_source = {p.source: p for p in self.procs}
        self._watcher = threading.Thread(target=self._watch, name="ingest-procs", daemon=True)
        store.on_committed = self._acknowledge

    @property
    def stats(self) -> IngestStats:
        """All processes together: connected only when every one is."""
        each = [p.totals() for p in self.procs]
        latest = max(each, key=lambda s: s.last_disconnect_ns)
        return IngestStats(
            connected=all(s.connected for s in each),
            subscribed=all(s.subscribed for s in each),
            connects=sum(s.connects for s in each),
            received=sum(s.received for s in each),
            acked=sum(s.acked for s in each),
            last_error="; ".join(
                f"{p.client_id}: {s.last_error}"
                for p, s in zip(self.procs, each, strict=True)
                if s.last_error
            ),
            last_packet_ns=max(s.last_packet_ns for s in each),
            last_connect_ns=max(s.last_connect_ns for s in each),
            bad_topics=sum(s.bad_topics for s in each),
            disconnects=sum(s.disconnects for s in each),
            last_disconnect_ns=latest.last_disconnect_ns,
            last_disconnect_reason=latest.last_disconnect_reason,
        )

    @property
    def alive(self) -> bool:
        """Whether the pool is running (it restarts a process that ends)."""
        return not self._stopping.is_set() and self._watcher.is_alive()

    def sessions(self) -> list[tuple[str, int, IngestStats]]:
        """(client id, process id or 0 while none runs, stats) of each."""
        return [
            (p.client_id, p.proc.pid if p.proc and p.ended() is None else 0, p.totals())
            for p in self.procs
        ]

    def start(self) -> None:
        epoch = self.store.last_epoch()
        for p in self.procs:
            p.spawn(epoch)
        self._watcher.start()

    def _acknowledge(self, packets: list[Incoming]) -> None:
        """Store writer: tell each process which of its packets are committed."""
        groups: dict[tuple[int, int], list[int]] = {}
        for pkt in packets:
            groups.setdefault((pkt.source, pkt.epoch), []).append(pkt.mid)
        for (source, epoch), mids in groups.items():
            try:
                self._by_source[source].committed(epoch, mids)
            except Exception as exc:
                # The store writer's commit callback: raised on, it would end the writer.
                # Unacknowledged, the packets come again on the process's next connection.
                client_mod.throttled(
                    fault(exc),
                    logging.ERROR,
                    "session %d: cannot pass on committed packets: %s: %s",
                    source,
                    type(exc).__name__,
                    exc,
                )

    def _watch(self) -> None:
        while not self._stopping.wait(0.2):
            if all(p.first_attempt for p in self.procs):
                self.first_attempt.set()
            for p in self.procs:
                code = p.ended()
                now = time.monotonic()
                if code is None and not self._stopping.is_set():
                    p.kill_if_hung(now)
                if code is None or self._stopping.is_set() or self.drain:
                    continue
                if not p.restart_at:
                    if now - p.started > 60:
                        p.backoff = 1.0  # it had been running well: not a crash loop
                    p.restart_at = now + p.backoff
                    p.stats.last_error = f"ingest process exited with code {code}"
                    log.error(
                        "%s: ingest process exited with code %s; restarting in %g s",
                        p.client_id,
                        code,
                        p.backoff,
                    )
                    p.first_attempt = True  # READY=1 need not wait for it
                elif now >= p.restart_at:
                    p.reap()
                    # Its last packets are committed before the epoch is read, so the new
                    # process's connections rank above every one of the old process.
                    p.spawn(self.store.last_epoch())
                    p.restart_at = 0.0
                    p.backoff = min(RESTART_MAX_S, p.backoff * 2)

    def wait_ended(self, timeout_s: float) -> bool:
        """Wait until every process has ended with exit code 0."""
        deadline = time.monotonic() + timeout_s
        for p in self.procs:
            assert p.proc is not None
            try:
                if p.proc.wait(max(0.0, deadline - time.monotonic())) != 0:
                    return False
            except subprocess.TimeoutExpired:
                return False
        return True

    def stop(self) -> None:
        """Every process stops taking packets, waits for its last ones to be committed
        and acknowledged, and disconnects; then the store has committed them all."""
        self._stopping.set()
        if self._watcher.is_alive():
            self._watcher.join()
        for p in self.procs:
            p.send(STOP, b"")
        deadline = time.monotonic() + STOP_WAIT_S + 5
        for p in self.procs:
            if p.proc is None:
                continue
            try:
                p.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("%s: ingest process did not stop; killing it", p.client_id)  # noqa: TRY400
                p.proc.kill()
                p.proc.wait()
            if p.reader is not None:
                p.reader.join(self.cfg.keepalive_s)
        self.store.flush()


def retire_sessions(
    cfg: MqttSection, store: Store, sessions: range, timeout_s: float, stale: Sequence[str] = ()
) -> bool:
    """Sessions of an earlier, higher `ingest_processes`: while they live, the broker
    keeps handing each its turn of the shared group's packets, for nobody. Each is
    taken up once more: it unsubscribes, its queued packets are committed and
    acknowledged, and the session is ended. True when all of them are done."""
    pool = IngestPool(cfg, store, sessions, drain=True, stale=stale)
    pool.start()
    try:
        return pool.wait_ended(timeout_s)
    finally:
        pool.stop()

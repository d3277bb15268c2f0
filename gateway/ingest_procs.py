"""`mqtt.ingest_processes`: MQTT ingest in processes of its own, into the one store.

paho parses every packet in Python while it holds the interpreter lock, and in one
process paho's thread is the gateway's ceiling (README, Performance). With
`ingest_processes = N` (2 or more) the gateway starts N processes
(`python -m gateway.ingest_procs FD`). Each runs an `Ingest` with a persistent session
of its own in `mqtt.shared_group`, so the broker hands each packet to one of them.
They do not write SQLite: a process forwards its packets over a socket pair to the
gateway process, whose one store writer commits them as before and answers which are
committed; the process then sends their PUBACKs. So a packet is still committed
before its PUBACK, and the store still has one writer.

Session n is client `<client_id>-n`, except session 0, which keeps `<client_id>`.

Frames, both ways: type (1 byte), body length (4 bytes), body.
  gateway → process
    H  hello, JSON: mqtt section, client id, session number, epoch, max_pending, logging
    A  committed: connection epoch (4 bytes), then the packet ids (2 bytes each) of
       every packet of that connection the store has taken, in order
    Q  stop: take no more packets, wait until the gateway has committed those sent,
       disconnect and exit
  process → gateway
    P  a packet: epoch (4), packet id (2), flags (1: dup, too large), receive time in
       ns (8), lengths of topic, ICCID and payload (2, 2, 4), then those bytes
    S  stats, JSON: the process's IngestStats and whether its first connection
       attempt is over (sent on a change of state, and every second)
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import orjson

from gateway import logs
from gateway.config import MqttSection
from gateway.ingest import Ingest, IngestStats, fault, new_client, throttled
from gateway.store import Incoming, Store

log = logging.getLogger("gateway.ingest")

_HEAD = struct.Struct("!BI")
_FIXED = struct.Struct("!IHBQHHI")  # a packet's fixed fields
_PKT = struct.Struct("!BI" + _FIXED.format[1:])  # _HEAD and _FIXED in one
HELLO, COMMITTED, STOP, PACKET, STATS = (ord(c) for c in "HAQPS")
_DUP, _TOO_LARGE = 1, 2
STOP_WAIT_S = 20.0  # for a process to commit what it sent and disconnect
DRAIN_QUIET_S = 2.0  # a retired session is drained when nothing came for this long
RESTART_MAX_S = 30.0
SEND_GATHER_S = 0.001  # a process's packets wait this long to go to the gateway together
# A process sends its stats every second: silence this long, while the gateway is not
# holding its reader back, means it hangs (stopped, deadlocked); it is killed and restarted.
HUNG_S = 10.0


def frame(kind: int, body: bytes) -> bytes:
    return _HEAD.pack(kind, len(body)) + body


def read_frames(sock: socket.socket) -> Iterator[tuple[int, memoryview]]:
    """The frames from `sock` until it is closed. A body is only valid until the next."""
    rest = b""
    while True:
        try:
            data = sock.recv(1 << 18)
        except OSError:
            return
        if not data:
            return
        buf = rest + data if rest else data
        view = memoryview(buf)
        pos = 0
        while len(buf) - pos >= _HEAD.size:
            kind, length = _HEAD.unpack_from(buf, pos)
            end = pos + _HEAD.size + length
            if end > len(buf):
                break
            yield kind, view[pos + _HEAD.size : end]
            pos = end
        rest = buf[pos:]


def encode_packet(pkt: Incoming) -> tuple[bytes, bytes, bytes, bytes]:
    """A P frame, in parts: fixed fields, topic, ICCID, payload."""
    topic, iccid, payload = pkt.topic.encode(), pkt.iccid.encode(), pkt.payload
    head = _PKT.pack(
        PACKET,
        _FIXED.size + len(topic) + len(iccid) + len(payload),
        pkt.epoch,
        pkt.mid,
        (_DUP if pkt.dup else 0) | (_TOO_LARGE if pkt.too_large else 0),
        pkt.recv_ns,
        len(topic),
        len(iccid),
        len(payload),
    )
    return head, topic, iccid, payload


def decode_packet(body: memoryview, source: int) -> Incoming:
    """A P frame's body, as the packet of session `source`."""
    epoch, mid, flags, recv_ns, lt, li, lp = _FIXED.unpack_from(body)
    at = _FIXED.size
    # The process sends what it decoded (message_topic), so these are UTF-8; leniently
    # decoded all the same, as an error here would end the reader of every packet.
    return Incoming(
        topic=str(body[at : at + lt], "utf-8", "replace"),
        iccid=str(body[at + lt : at + lt + li], "utf-8", "replace"),
        payload=bytes(body[at + lt + li : at + lt + li + lp]),
        mid=mid,
        dup=bool(flags & _DUP),
        epoch=epoch,
        recv_ns=recv_ns,
        too_large=bool(flags & _TOO_LARGE),
        source=source,
    )


def pack_ids(epoch: int, mids: list[int]) -> bytes:
    """An A frame's body: the connection epoch, then the packet ids."""
    return struct.pack(f"!I{len(mids)}H", epoch, *mids)


def unpack_ids(body: memoryview) -> tuple[int, list[int]]:
    epoch, *mids = struct.unpack(f"!I{(len(body) - 4) // 2}H", body)
    return epoch, mids


# -- the ingest process -------------------------------------------------------------------


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
    """`python -m gateway.ingest_procs FD`: one ingest process, FD its socket pair end."""
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
            [sys.executable, "-m", "gateway.ingest_procs", str(theirs.fileno())],
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
                throttled(
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


if __name__ == "__main__":
    raise SystemExit(process_main(int(sys.argv[1])))

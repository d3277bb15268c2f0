"""MQTT ingest: paho thread → store writer; the PUBACK goes out only after the commit.

paho's network loop runs in its own thread. `on_message` only hands the packet to the
store's writer queue (no asyncio round trip per packet: at 20k packets/s that hop would
cost more than the commit). The writer commits a group of packets with synchronous=FULL
and then calls `_acknowledge`, which sends the PUBACKs in arrival order, all of a group
in one write (`send_pubacks`).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import os
import random
import re
import socket
import ssl
import struct
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import orjson
import paho.mqtt as paho_mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttSection
from gateway.store import Incoming, Store

log = logging.getLogger("gateway.ingest")


class PacketSink(Protocol):
    """Where Ingest hands packets: the Store, or in an ingest process the pipe to it."""

    max_pending: int
    on_committed: Callable[[list[Incoming]], None] | None

    def submit_packet(self, pkt: Incoming, wait_s: float = 0.0) -> bool: ...

    def last_epoch(self) -> int: ...

    def flush(self) -> None: ...


def iccid_matcher(template: str) -> re.Pattern[str] | None:
    """Compile `devices/{iccid}/up` into a regex capturing the ICCID level."""
    if not template:
        return None
    head, _, tail = template.partition("{iccid}")
    return re.compile("^" + re.escape(head) + "(?P<iccid>[^/]+)" + re.escape(tail) + "$")


_PUBACK = struct.Struct("!BBH")  # fixed header 0x40, remaining length 2, packet id

# What a PUBLISH carries besides its payload, for the Maximum Packet Size the gateway
# announces over MQTT 5: the largest topic (65535 bytes and its 2-byte length), the
# packet id (2), the fixed header (5 at most) and 4 KiB of properties. A packet whose
# payload fits max_payload_bytes is then never dropped by the broker for its topic, and
# its properties share the room its (short) topic leaves; anything bigger the broker
# drops instead of sending, so paho never holds more than this in memory for a packet.
PUBLISH_ROOM = 65535 + 2 + 2 + 5 + 4096
MQTT_MAX_PACKET = 268_435_455 + 5  # the largest remaining length MQTT can encode, + header


class Throttled:
    """Log lines about one cause at most once per `every_s`, saying how many were held
    back: a broker that forwards a bad packet usually forwards many, and one line per
    packet would fill the disk the store needs. Thread-safe (paho's and the writer's)."""

    MAX_CAUSES = 64  # beyond this many distinct causes the table starts afresh

    def __init__(self, every_s: float = 60.0) -> None:
        self.every_s = every_s
        self._lock = threading.Lock()
        self._causes: dict[object, list[float]] = {}  # cause: [next line at, held back]

    def __call__(self, cause: object, level: int, msg: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            seen = self._causes.get(cause)
            if seen is not None and now < seen[0]:
                seen[1] += 1
                return
            if seen is None and len(self._causes) >= self.MAX_CAUSES:
                self._causes.clear()
            held = int(seen[1]) if seen else 0
            self._causes[cause] = [now + self.every_s, 0]
        if held:
            msg += " (%d more like it in the last %g s)"
            args = (*args, held, self.every_s)
        log.log(level, msg, *args)


throttled = Throttled()


def fault(exc: BaseException) -> tuple[str, str, int]:
    """An exception's cause for Throttled: its type and the line that raised it (not
    its message, which may name the packet)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = (tb.tb_frame.f_code.co_filename, tb.tb_lineno) if tb is not None else ("", 0)
    return (type(exc).__name__, *where)


def message_topic(msg: mqtt.MQTTMessage) -> tuple[str, bool]:
    """The topic of `msg`, and whether its bytes were not valid UTF-8; such a topic
    comes with U+FFFD in place of each bad sequence.

    MQTT requires UTF-8 topics, but a broker may forward one that is not, and paho
    decodes the topic strictly on every read of `.topic`. The packet must still be
    stored and acknowledged: left unacknowledged it comes back after every restart.
    The decode error carries the raw bytes, so no private part of paho is needed."""
    try:
        return msg.topic, False
    except UnicodeDecodeError as exc:
        return bytes(exc.object).decode("utf-8", "replace"), True


def _lenient_topic(msg: mqtt.MQTTMessage) -> str:
    """The topic of `msg` however it can be had, for a packet that failed otherwise."""
    try:
        return message_topic(msg)[0]
    except Exception:
        raw = getattr(msg, "_topic", b"")  # paho's private bytes: a last resort
        return bytes(raw).decode("utf-8", "replace") if isinstance(raw, bytes) else ""


def _params(fn: object) -> list[str] | None:
    """The parameter names of a callable (bound: without self), or None if it has none
    to show."""
    if not callable(fn):
        return None
    try:
        return list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        return None


def _differs(obj: object, name: str, params: list[str]) -> str:
    """Why obj.<name> is not the callable the fast paths were written against, or ""."""
    got = _params(getattr(obj, name, None))
    if got is None:
        return f"no {name}()"
    if got != params:
        return f"{name}({', '.join(got)}) is not {name}({', '.join(params)})"
    return ""


# The private paho part send_pubacks calls, with the parameters it has in the paho
# versions pyproject.toml allows (_Client checks the other fast paths' the same way).
_PUBACKS_NEEDS = ("_packet_queue", ["command", "packet", "mid", "qos", "info"])


def _pubacks_off(client: mqtt.Client) -> str:
    return _differs(client, *_PUBACKS_NEEDS)


def send_pubacks(client: mqtt.Client, mids: list[int]) -> None:
    """Queue the PUBACKs of a commit group as one write instead of one per packet.

    `client.ack()` queues each PUBACK on its own and wakes the network thread for it,
    which then sends it with a syscall of its own: at 10k packets/s that is most of what
    acknowledging costs. The bytes are what paho sends for each, in the same order (a
    v5 PUBACK with reason Success may leave out the reason code). paho has no public
    call for several: its private queue is used when it is the one checked for (once
    per client), and on any error the PUBACKs go through `ack()`, one by one."""
    fast = getattr(client, "fast_pubacks", None)
    if fast is None:
        fast = not _pubacks_off(client)
        setattr(client, "fast_pubacks", fast)  # noqa: B010 (not an attribute paho declares)
    if fast and len(mids) > 1:
        try:
            client._packet_queue(
                mqtt.PUBACK, b"".join([_PUBACK.pack(mqtt.PUBACK, 2, m) for m in mids]), 0, 0
            )
            return
        except Exception as exc:
            # Runs in the store writer's commit callback: an exception would end the
            # writer. paho's own ack() is the sound way. Should the queue have taken the
            # PUBACKs before it failed, the broker gets them twice: for an id with no
            # message in flight it only logs (mosquitto), and the broker's ids come
            # round again only some 65535 packets later.
            setattr(client, "fast_pubacks", False)  # noqa: B010
            throttled(
                fault(exc),
                logging.ERROR,
                "one-write PUBACKs off, using paho's ack(): %s: %s",
                type(exc).__name__,
                exc,
            )
    for mid in mids:
        client.ack(mid, 1)


class BufferedSocket:
    """The broker connection with a read buffer: paho reads a packet in three or more
    recv() calls (the type byte, each byte of the length, then the rest), each a syscall
    that also lets go of the GIL. Here one recv() takes what the kernel has, up to
    `size`, and the small reads are served from it. `pending()` is what paho already asks
    an SSL socket for, so that it does not wait in select() while bytes are buffered.
    Everything else goes to the socket itself.

    `on_fault` is called with any exception of the buffering itself (not the socket's
    OSError, which paho handles); the read then fails as a lost connection, so that paho
    reconnects (the broker sends the unacknowledged packets again) instead of its
    network thread ending."""

    def __init__(
        self, sock: Any, size: int = 65536, on_fault: Callable[[Exception], None] | None = None
    ) -> None:
        self._sock = sock
        self._size = size
        self._buf = b""
        self._pos = 0
        self._on_fault = on_fault

    def recv(self, n: int) -> bytes:
        try:
            return self._recv(n)
        except OSError:
            raise
        except Exception as exc:
            if self._on_fault is not None:
                self._on_fault(exc)
            raise ConnectionError("read buffer failed") from exc

    def _recv(self, n: int) -> bytes:
        if self._pos >= len(self._buf):
            data: bytes = self._sock.recv(max(n, self._size))
            if len(data) <= n:
                return data
            self._buf, self._pos = data, 0
        end = self._pos + n
        out = self._buf[self._pos : end]
        self._pos = min(end, len(self._buf))
        return out

    def buffered(self) -> int:
        return len(self._buf) - self._pos

    def pending(self) -> int:
        inner = self._sock.pending() if hasattr(self._sock, "pending") else 0
        return self.buffered() + int(inner)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._sock, name)


_logged_off: set[str] = set()  # the fast-path lines logged by this process


class _Client(mqtt.Client):
    """paho's client with three fast paths, each on private parts of paho:

    - buffered reads: the connection is read through a BufferedSocket, and every
      buffered packet is taken each time paho reads (paho's own loop_read() takes one
      packet per select() when no outgoing QoS message is in flight, as for a
      subscriber);
    - own PUBLISH decoding (`_handle_publish`);
    - one-write PUBACKs (`send_pubacks`).

    paho stays a dependency: at construction each fast path checks the private parts it
    calls (names, parameters); one that differs is off, with one log line, and paho's
    own code runs instead. An exception inside a fast path turns it off the same way
    and never reaches paho's network thread or the store writer. The overrides take
    any arguments, so that a paho whose own calls to them changed still works."""

    MAX_PACKETS_PER_READ = 1000  # then paho's loop writes queued PUBACKs before reading on

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        paho = super()  # what the overrides below call
        off: list[str] = []

        def check(path: str, *why: str) -> bool:
            reasons = [w for w in why if w]
            if reasons:
                off.append(f"{path} ({'; '.join(reasons)})")
            return not reasons

        self.buffered_reads = check(
            "buffered reads",
            _differs(paho, "_create_socket", []),
            _differs(paho, "loop_read", ["max_packets"]),
            "" if hasattr(self, "_sock") else "no _sock",
        )
        in_packet = getattr(self, "_in_packet", None)
        self._own_publish = check(
            "own PUBLISH decoding",
            _differs(paho, "_handle_publish", []),
            _differs(self, "_handle_on_message", ["message"]),
            "" if isinstance(in_packet, dict) and "packet" in in_packet else "no _in_packet",
            "" if hasattr(self, "_protocol") else "no _protocol",
            "" if hasattr(self, "_manual_ack") else "no _manual_ack",
            "" if _params(mqtt.MQTTMessage) == ["mid", "topic"] else "MQTTMessage(mid, topic)",
            "" if callable(getattr(mqtt, "time_func", None)) else "no time_func",
        ) and bool(self._protocol == mqtt.MQTTv5 and self._manual_ack)
        self.fast_pubacks = check("one-write PUBACKs", _pubacks_off(self))
        # Ingest.alive asks paho's thread attribute; without it, the thread recorded by
        # loop_forever below.
        self.paho_thread_attr = check(
            "network thread watch by _thread", "" if hasattr(self, "_thread") else "no _thread"
        )
        self.loop_thread: threading.Thread | None = None
        if off:
            line = "; ".join(off)
            if line not in _logged_off:
                _logged_off.add(line)
                log.warning(
                    "paho-mqtt %s: fast paths off, paho's own code used instead: %s",
                    getattr(paho_mqtt, "__version__", "?"),
                    line,
                )

    def _fast_path_failed(self, path: str, exc: Exception) -> None:
        throttled(
            ("fast path", path),
            logging.ERROR,
            "%s off, paho's own code used instead: %s: %s",
            path,
            type(exc).__name__,
            exc,
        )

    def _buffer_failed(self, exc: Exception) -> None:
        self.buffered_reads = False  # the next connection reads the plain socket
        self._fast_path_failed("buffered reads", exc)

    def _create_socket(self, *args: Any, **kwargs: Any) -> Any:
        sock = super()._create_socket(*args, **kwargs)
        if self.buffered_reads and isinstance(sock, socket.socket):
            return BufferedSocket(sock, on_fault=self._buffer_failed)
        return sock

    def loop_forever(self, *args: Any, **kwargs: Any) -> Any:
        self.loop_thread = threading.current_thread()
        return super().loop_forever(*args, **kwargs)

    def loop_read(self, *args: Any, **kwargs: Any) -> Any:
        rc = super().loop_read(*args, **kwargs)
        sock = getattr(self, "_sock", None)
        n = 1
        while (
            rc == mqtt.MQTT_ERR_SUCCESS
            and isinstance(sock, BufferedSocket)
            and sock.buffered()
            and self._sock is sock
            and n < self.MAX_PACKETS_PER_READ
        ):
            rc = super().loop_read(*args, **kwargs)
            n += 1
        return rc

    def _handle_publish(self, *args: Any, **kwargs: Any) -> Any:
        """paho's, minus the MQTT 5 property parsing of a QoS 1 PUBLISH that has none.

        paho builds a `Properties` for every PUBLISH, whose constructor fills two tables
        of some thirty entries and whose `unpack` first clears each name by string
        replacement: about a fifth of the gateway's CPU in a backlog drain. Packets
        without properties (the property length is 0) get one empty `Properties`,
        shared and never filled; everything else (properties, QoS 0 or 2, MQTT 3.1.1,
        automatic acks, a packet too short to be sound) goes to paho as before."""
        if not self._own_publish or args or kwargs:
            return super()._handle_publish(*args, **kwargs)
        try:
            message = self._decode_publish()
        except Exception as exc:
            self._own_publish = False
            self._fast_path_failed("own PUBLISH decoding", exc)
            message = None
        if message is None:
            return super()._handle_publish()
        try:
            self._handle_on_message(message)
        except Exception as exc:
            # Ingest's on_message catches its own; this is paho's dispatch. Raised on,
            # it would end paho's network thread; the packet stays unacknowledged
            # and comes again on the next connection.
            throttled(
                fault(exc),
                logging.ERROR,
                "paho could not hand a PUBLISH over: %s: %s",
                type(exc).__name__,
                exc,
            )
        return mqtt.MQTT_ERR_SUCCESS  # the PUBACK is sent by hand, after the commit

    def _decode_publish(self) -> mqtt.MQTTMessage | None:
        """The PUBLISH paho has read, if it is one for the fast path; else None."""
        pkt = self._in_packet
        if not isinstance(pkt, dict):
            return None
        header, data = pkt.get("command"), pkt.get("packet")
        if not isinstance(header, int) or (header & 0x06) != 0x02 or not data:
            return None
        at = 2 + ((data[0] << 8) | data[1]) if len(data) >= 2 else 0  # after the topic
        if not at or len(data) < at + 3 or data[at + 2] != 0:
            return None
        message = mqtt.MQTTMessage(mid=(data[at] << 8) | data[at + 1], topic=bytes(data[2:at]))
        message.dup = bool(header & 0x08)
        message.qos = 1
        message.retain = bool(header & 0x01)
        message.properties = self._NO_PROPERTIES
        message.payload = bytes(data[at + 3 :])
        message.timestamp = mqtt.time_func()
        return message

    _NO_PROPERTIES = Properties(PacketTypes.PUBLISH)  # type: ignore[no-untyped-call]


def new_client(cfg: MqttSection, client_id: str, *, clean: bool) -> mqtt.Client:
    """A paho client for the broker of `cfg` (login, TLS), acknowledging by hand. Over
    MQTT 3.1.1 `clean` is the clean session flag; over 5 it goes with connect()."""
    v5 = cfg.protocol == "5"
    client = _Client(
        CallbackAPIVersion.VERSION2,
        client_id=client_id,
        protocol=mqtt.MQTTv5 if v5 else mqtt.MQTTv311,
        clean_session=None if v5 else clean,
        manual_ack=True,
    )
    if cfg.username:
        client.username_pw_set(cfg.username, cfg.password or None)
    if cfg.tls:
        ctx = ssl.create_default_context(cafile=cfg.ca_file or None)
        if cfg.cert_file:
            ctx.load_cert_chain(cfg.cert_file, cfg.key_file or None)
        client.tls_set_context(ctx)
    return client


@dataclass(slots=True)
class IngestStats:
    connected: bool = False
    # The broker granted every subscription of the current connection.
    subscribed: bool = False
    connects: int = 0
    received: int = 0
    acked: int = 0
    last_error: str = ""
    last_packet_ns: int = 0
    last_connect_ns: int = 0
    # Packets whose topic was not valid UTF-8, stored with U+FFFD in its place.
    bad_topics: int = 0


class Ingest:
    """One MQTT client feeding the store; start() / stop() from any thread."""

    def __init__(
        self,
        cfg: MqttSection,
        store: PacketSink,
        client_id: str = "",
        source: int = 0,
        *,
        drain: bool = False,
        stale: Sequence[str] = (),
    ) -> None:
        self.cfg = cfg
        self.store = store
        self.client_id = client_id or cfg.client_id
        self.source = source
        # drain: a session being retired unsubscribes instead, and takes what is queued.
        self.drain = drain
        # Filters an earlier config subscribed this session to, no longer wanted: the
        # broker keeps a persistent session's subscriptions until they are unsubscribed.
        self.stale = list(stale)
        self.unsubscribed = threading.Event()
        # Log lines name the client when there are several (mqtt.ingest_processes).
        self._who = f"{self.client_id}: " if client_id else ""
        self.stats = IngestStats()
        self.first_attempt = threading.Event()
        self._iccid = iccid_matcher(cfg.iccid_from_topic)
        self._stop = threading.Event()
        self._accepting = True
        self._slow_store_logged = False
        # Each connection gets a higher epoch; PUBACKs are only sent on the connection the
        # packet came in on, and a DUP packet matches only packets of an earlier connection.
        self.epoch = store.last_epoch()
        self.client = self._make_client()
        store.on_committed = self._acknowledge

    def _make_client(self) -> mqtt.Client:
        client = new_client(self.cfg, self.client_id, clean=False)
        client.max_inflight_messages_set(65535)
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_message = self._on_message
        client.on_subscribe = self._on_subscribe
        client.on_unsubscribe = self._on_unsubscribe
        client.on_connect_fail = self._on_connect_fail
        return client

    # -- paho thread ----------------------------------------------------------------------

    def _on_connect(
        self, client: mqtt.Client, _u: object, _f: object, rc: object, props: object = None
    ) -> None:
        if getattr(rc, "is_failure", False):
            self.stats.last_error = f"broker refused connection: {rc}"
            self.first_attempt.set()
            log.error(
                "%sbroker %s:%s refused connection: %s", self._who, self.cfg.host, self.cfg.port, rc
            )
            return
        self.epoch += 1
        self.stats.connected = True
        self.stats.connects += 1
        self.stats.last_connect_ns = time.time_ns()
        self.stats.last_error = ""
        log.info(
            "%sconnected to %s:%s (session present: %s)",
            self._who,
            self.cfg.host,
            self.cfg.port,
            getattr(_f, "session_present", "?"),
        )
        self.first_attempt.set()
        if self.drain:
            client.unsubscribe(self.cfg.subscriptions() + self.stale)
            return
        if self.stale:
            # Sent first on the same connection: the broker has dropped them by the time
            # it grants the subscriptions below (stats.subscribed).
            client.unsubscribe(self.stale)
        client.subscribe([(t, self.cfg.qos) for t in self.cfg.subscriptions()])

    def _on_connect_fail(self, _c: mqtt.Client, _u: object) -> None:
        self.stats.last_error = f"cannot connect to {self.cfg.host}:{self.cfg.port}"
        log.warning("%s%s; retrying", self._who, self.stats.last_error)
        self.first_attempt.set()

    def _on_subscribe(
        self, _c: mqtt.Client, _u: Any, _mid: int, codes: list[ReasonCode], _p: Properties
    ) -> None:
        refused = False
        for code, topic in zip(codes, self.cfg.subscriptions(), strict=False):
            if getattr(code, "is_failure", False):
                refused = True
                self.stats.last_error = f"subscription to {topic!r} refused: {code}"
                log.error("%ssubscription to %r refused: %s", self._who, topic, code)
        self.stats.subscribed = not refused
        if not refused:
            log.info("%ssubscribed to %s", self._who, ", ".join(self.cfg.subscriptions()))

    def _on_unsubscribe(self, *_a: object) -> None:
        if self.stale and not self.drain:
            gone = ", ".join(self.stale)
            log.info("%sunsubscribed from %s (no longer in mqtt.topics)", self._who, gone)
            self.stale = []
        self.unsubscribed.set()

    def _on_disconnect(
        self, _c: mqtt.Client, _u: object, _f: object, rc: object, _p: object = None
    ) -> None:
        self.stats.connected = False
        self.stats.subscribed = False
        if not self._stop.is_set():
            self.stats.last_error = f"disconnected: {rc}"
            log.warning("%sdisconnected from broker: %s", self._who, rc)

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        if not self._accepting:
            return  # not acknowledged: the broker keeps it for the next session
        # paho's network thread: an exception raised from here ends it (paho re-raises
        # what a callback raises), and with it the connection, for good. So none does.
        try:
            pkt = self._incoming(msg)
        except Exception as exc:
            self._trouble(exc, "reading a packet")
            try:
                pkt = self._incoming(msg, safe=True)
            except Exception as exc2:
                # Nothing to hand over: unacknowledged, the broker sends it again on
                # the next connection.
                self._trouble(exc2, "reading a packet, even in its plain form")
                return
        try:
            room = self.store.submit_packet(pkt, wait_s=self.cfg.store_wait_s)
        except Exception as exc:
            self._trouble(exc, "handing a packet to the store")
            return
        if not room and not self._slow_store_logged:
            self._slow_store_logged = True
            log.warning(
                "%sstore is not keeping up (%d packets waiting to be committed); taking more",
                self._who,
                self.store.max_pending,
            )

    def _incoming(self, msg: mqtt.MQTTMessage, *, safe: bool = False) -> Incoming:
        """The packet of `msg` for the store. `safe`: after an error, the least that
        makes a packet (topic decoded leniently, no ICCID)."""
        if safe:
            topic = _lenient_topic(msg)
            m = None
        else:
            topic, bad = message_topic(msg)
            if bad:
                self.stats.bad_topics += 1
                throttled(
                    ("bad topic", self._who),
                    logging.WARNING,
                    "%sa topic is not valid UTF-8; stored as %r (%d such packets so far)",
                    self._who,
                    topic,
                    self.stats.bad_topics,
                )
            m = self._iccid.match(topic) if self._iccid else None
        payload = bytes(msg.payload)
        now = time.time_ns()
        self.stats.received += 1
        self.stats.last_packet_ns = now
        return Incoming(
            topic=topic,
            payload=payload,
            iccid=m.group("iccid") if m else "",
            mid=msg.mid if msg.qos else 0,
            dup=bool(msg.dup),
            epoch=self.epoch,
            recv_ns=now,
            too_large=len(payload) > self.cfg.max_payload_bytes,
            source=self.source,
        )

    def _trouble(self, exc: Exception, doing: str) -> None:
        self.stats.last_error = f"{doing}: {type(exc).__name__}: {exc}"
        throttled(
            fault(exc),
            logging.ERROR,
            "%serror %s: %s: %s",
            self._who,
            doing,
            type(exc).__name__,
            exc,
        )

    # -- writer thread --------------------------------------------------------------------

    def _acknowledge(self, packets: list[Incoming]) -> None:
        epoch = self.epoch
        self.ack_mids(epoch, [p.mid for p in packets if p.epoch == epoch])

    def ack_mids(self, epoch: int, mids: list[int]) -> None:
        """PUBACK committed packets, if they came on the current connection (`epoch`):
        the broker sends those of an earlier one again, with the same or another id."""
        if epoch != self.epoch:
            return
        mids = [m for m in mids if m]
        if not mids:
            return
        try:
            send_pubacks(self.client, mids)
        except Exception as exc:
            # Called by the store writer after a commit (or by an ingest process's
            # reader): raised on, it would end that thread. Unacknowledged, the packets
            # come again on the next connection.
            self._trouble(exc, "acknowledging packets")
            return
        self.stats.acked += len(mids)

    # -- lifecycle ------------------------------------------------------------------------

    def _connect_props(self) -> Properties | None:
        if self.cfg.protocol != "5":
            return None
        props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        props.SessionExpiryInterval = self.cfg.session_expiry_s
        # Without this Mosquitto caps a manual-ack subscriber at 20 unacknowledged packets.
        props.ReceiveMaximum = self.cfg.receive_maximum
        # The broker drops what is bigger instead of sending it (PUBLISH_ROOM). Between
        # max_payload_bytes and this a packet still comes, and is stored as too large.
        props.MaximumPacketSize = min(self.cfg.max_payload_bytes + PUBLISH_ROOM, MQTT_MAX_PACKET)
        return props

    def sessions(self) -> list[tuple[str, int, IngestStats]]:
        """(client id, process id, stats) of each MQTT session: here just this one."""
        return [(self.client_id, os.getpid(), self.stats)]

    def start(self) -> None:
        """Connect in paho's network thread; it reconnects by itself with backoff."""
        # paho doubles the delay from min to max; a random start keeps a fleet of
        # gateways from reconnecting to a restarted broker in lockstep.
        lo = self.cfg.reconnect_min_s * random.uniform(1.0, 2.0)
        self.client.reconnect_delay_set(max(1, round(lo)), max(1, round(self.cfg.reconnect_max_s)))
        kwargs: dict[str, Any] = {"keepalive": self.cfg.keepalive_s}
        if self.cfg.protocol == "5":
            kwargs["clean_start"] = False
            kwargs["properties"] = self._connect_props()
        self.client.connect_async(self.cfg.host, self.cfg.port, **kwargs)
        self.client.loop_start()

    @property
    def alive(self) -> bool:
        """Whether paho's network thread is running (it reconnects by itself while it is)."""
        # paho keeps its loop_start() thread in a private attribute and offers no public
        # way to ask; an exception in a callback ends that thread, and nothing else says so.
        # Without that attribute (_Client checks), the thread that entered loop_forever(),
        # taken as running until it has.
        client = self.client
        if getattr(client, "paho_thread_attr", True):
            thread = getattr(client, "_thread", None)
        else:
            thread = getattr(client, "loop_thread", None)
            if thread is None:
                return not self._stop.is_set()
        return not self._stop.is_set() and thread is not None and thread.is_alive()

    def stop(self) -> None:
        """Stop taking packets, commit and acknowledge what was handed over, disconnect."""
        self._accepting = False
        # Everything queued before this point is committed and acknowledged when it returns.
        self.store.flush()
        self._stop.set()
        with contextlib.suppress(Exception):
            self.client.disconnect()
        self.client.loop_stop()


RETIRE_TIMEOUT_S = 60.0


async def _retire_sessions(cfg: MqttSection, store: Store, stale: list[str]) -> None:
    """When mqtt.ingest_processes went down, end the sessions no longer used (see
    ingest_procs.retire_sessions) before ingest starts. `meta.ingest_sessions` is the
    number the store was last run with; it goes down only once they are ended."""
    import asyncio

    from gateway import store as st

    before = int(await asyncio.wrap_future(store.call(st.get_meta, "ingest_sessions", "1")))
    now = cfg.ingest_processes
    if before > now:
        from gateway.ingest_procs import retire_sessions

        gone = range(now, before)
        log.warning(
            "mqtt.ingest_processes went from %d to %d: taking what the broker holds for "
            "sessions %s and ending them",
            before,
            now,
            ", ".join(cfg.session_client_id(n) for n in gone),
        )
        if not await asyncio.to_thread(retire_sessions, cfg, store, gone, RETIRE_TIMEOUT_S, stale):
            log.error(
                "could not end every retired session within %g s; trying again at the next start",
                RETIRE_TIMEOUT_S,
            )
            return
    if before != now:
        await asyncio.wrap_future(store.call(st.set_meta, "ingest_sessions", str(now)))


class Taker(Protocol):
    """What the gateway sees of its ingest: an Ingest, or an IngestPool of processes."""

    first_attempt: threading.Event

    @property
    def stats(self) -> IngestStats: ...

    @property
    def alive(self) -> bool: ...

    def sessions(self) -> list[tuple[str, int, IngestStats]]: ...

    def start(self) -> None: ...

    def stop(self) -> None: ...


@contextlib.asynccontextmanager
async def running(cfg: MqttSection, store: Store) -> AsyncIterator[Taker]:
    """Run the ingest for the duration of the context: in this process, or in
    `mqtt.ingest_processes` processes of its own."""
    import asyncio

    from gateway import store as st

    # `meta.subscriptions`: every filter a session of this store may hold at the broker.
    # Those not in the config now are unsubscribed on connect, then dropped from it.
    was = orjson.loads(await asyncio.wrap_future(store.call(st.get_meta, "subscriptions", "[]")))
    now = cfg.subscriptions()
    stale = [t for t in was if t not in now]
    if was != now:
        await _set_subscriptions(store, now + stale)
    await _retire_sessions(cfg, store, stale)
    ingest: Taker
    if cfg.ingest_processes > 1:
        from gateway.ingest_procs import IngestPool

        ingest = IngestPool(cfg, store, stale=stale)
    else:
        ingest = Ingest(cfg, store, stale=stale)
    ingest.start()
    forget = asyncio.create_task(_forget_stale(store, ingest, now)) if stale else None
    try:
        yield ingest
    finally:
        if forget is not None:
            forget.cancel()
        await asyncio.to_thread(ingest.stop)


async def _set_subscriptions(store: Store, filters: list[str]) -> None:
    import asyncio

    from gateway import store as st

    value = orjson.dumps(filters).decode()
    await asyncio.wrap_future(store.call(st.set_meta, "subscriptions", value))


async def _forget_stale(store: Store, ingest: Taker, now: list[str]) -> None:
    """Once every session has been granted its subscriptions, on the connection that
    unsubscribed the stale filters first, the broker holds only `now`."""
    import asyncio

    # The stats come from paho's thread, or from the ingest processes' reports: there is
    # no event to await, and this ends at the first connection that works.
    while not ingest.stats.subscribed:  # noqa: ASYNC110
        await asyncio.sleep(0.5)
    await _set_subscriptions(store, now)

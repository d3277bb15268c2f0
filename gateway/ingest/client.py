"""The paho client the ingest runs, in the gateway and in ingest processes alike.

paho's network loop reads the broker's packets in its own thread. The client here reads
through a buffer (BufferedSocket), decodes a plain QoS 1 PUBLISH itself, and sends a
commit group's PUBACKs in one write (send_pubacks): the fast paths of a backlog drain.
Each uses private parts of paho, checked when the client is built; one that differs,
or fails, is turned off and paho's own code runs instead.
"""

from __future__ import annotations

import inspect
import logging
import socket
import ssl
import struct
import threading
import time
from collections.abc import Callable
from typing import Any

import paho.mqtt as paho_mqtt
import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from gateway.config import MqttSection

log = logging.getLogger("gateway.ingest")

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


# Reads of a non-blocking socket that found nothing yet: not errors.
_WOULD_BLOCK = (BlockingIOError, ssl.SSLWantReadError, ssl.SSLWantWriteError)


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
        self,
        sock: Any,
        size: int = 65536,
        on_fault: Callable[[Exception], None] | None = None,
        on_error: Callable[[OSError], None] | None = None,
    ) -> None:
        self._sock = sock
        self._size = size
        self._buf = b""
        self._pos = 0
        self._on_fault = on_fault
        self._on_error = on_error

    def recv(self, n: int) -> bytes:
        try:
            return self._recv(n)
        except OSError as exc:
            # Told what ended the connection (a TLS alert such as "certificate required"),
            # which paho reports as an unspecified error; not a read that would block.
            if self._on_error is not None and not isinstance(exc, _WOULD_BLOCK):
                self._on_error(exc)
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
    # What last failed on the broker connection's socket ("" since it connected): paho
    # reports a TLS alert as an unspecified error (see tls_problem).
    last_socket_error = ""

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

    def _socket_failed(self, exc: OSError) -> None:
        self.last_socket_error = f"{type(exc).__name__}: {exc}"

    def _create_socket(self, *args: Any, **kwargs: Any) -> Any:
        try:
            sock = super()._create_socket(*args, **kwargs)
        except OSError as exc:
            # The TLS handshake happens here: its alerts say why paho could not connect.
            self._socket_failed(exc)
            raise
        self.last_socket_error = ""
        if self.buffered_reads and isinstance(sock, socket.socket):
            return BufferedSocket(sock, on_fault=self._buffer_failed, on_error=self._socket_failed)
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


def tls_problem(cfg: MqttSection, error: str) -> str:
    """What a failed TLS connection asks the operator to do, from the socket's error;
    "" when it is not about certificates."""
    low = error.lower()
    if "certificate required" in low or "certificate_required" in low:
        if not cfg.cert_file:
            return (
                "the broker requires a client certificate: set mqtt.cert_file and"
                " mqtt.key_file (AWS IoT Core and Azure IoT Hub need one)"
            )
        return f"the broker did not get the client certificate mqtt.cert_file ({error})"
    if "alert" in low and ("certificate" in low or "unknown ca" in low or "unknown_ca" in low):
        what = f"the client certificate {cfg.cert_file}" if cfg.cert_file else "the connection"
        return f"the broker refused {what} ({error}): check mqtt.cert_file and the broker's CA"
    if "certificate verify failed" in low:
        return f"the broker's certificate is not trusted ({error}): check mqtt.ca_file"
    return ""


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

"""One MQTT session feeding the store: paho's callbacks hand packets to the store writer,
which commits them and then has their PUBACKs sent (`Ingest._acknowledge`).

`on_message` only hands the packet to the writer's queue: no asyncio round trip per
packet (at 20k packets/s that hop would cost more than the commit). The writer commits
a group with synchronous=FULL and then calls back, and the PUBACKs go out in arrival
order, all of a group in one write.
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode

from gateway.config import MqttSection
from gateway.ingest import client as client_mod
from gateway.ingest.client import (
    MQTT_MAX_PACKET,
    PUBLISH_ROOM,
    _lenient_topic,
    fault,
    message_topic,
    new_client,
    send_pubacks,
)
from gateway.store.records import Incoming

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
    # Connections lost (not counting a stop), the last one's time and paho's reason:
    # the gateway raises broker_disconnected/_connected from these (runtime.alerts),
    # so paho's thread only sets three fields.
    disconnects: int = 0
    last_disconnect_ns: int = 0
    last_disconnect_reason: str = ""


def disconnect_reason(flags: object, rc: object) -> str:
    """A lost connection as an operator reads it: paho reports a connection that just
    dropped (socket closed, keepalive missed) as "Unspecified error"."""
    if getattr(flags, "is_disconnect_packet_from_server", False):
        return f"the broker sent DISCONNECT: {rc}"
    text = str(rc)
    return "connection lost" if text in ("", "Unspecified error", "Success") else text


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

    def _socket_problem(self, client: mqtt.Client) -> str:
        """Why the connection's socket failed, in the operator's terms ("" unknown)."""
        error = str(getattr(client, "last_socket_error", ""))
        if not error:
            return ""
        return client_mod.tls_problem(self.cfg, error) or error

    def _on_connect_fail(self, client: mqtt.Client, _u: object) -> None:
        self.stats.last_error = f"cannot connect to {self.cfg.host}:{self.cfg.port}"
        problem = self._socket_problem(client)
        if problem:
            self.stats.last_error += f": {problem}"
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
        self, client: mqtt.Client, _u: object, _f: object, rc: object, _p: object = None
    ) -> None:
        self.stats.connected = False
        self.stats.subscribed = False
        if not self._stop.is_set():
            problem = self._socket_problem(client)
            why = f"{rc}: {problem}" if problem else str(rc)
            self.stats.last_error = f"disconnected: {why}"
            reason = disconnect_reason(_f, rc)
            self.stats.last_disconnect_reason = f"{reason}: {problem}" if problem else reason
            self.stats.last_disconnect_ns = time.time_ns()
            self.stats.disconnects += 1
            log.warning("%sdisconnected from broker: %s", self._who, why)

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
                client_mod.throttled(
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
        client_mod.throttled(
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

"""When the writer commits: how it takes packets and calls from its queue, the commit
delay (gateway.commit_delay_ms) that lets later packets share a commit's fsync, and what
it learns of the broker's pace; and the delays "auto" works out from the webhooks."""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from gateway.store.records import Incoming

if TYPE_CHECKING:
    from gateway.config import GatewaySection, WebhookConfig

log = logging.getLogger("gateway.store")

# gateway.commit_delay_ms waits for later packets until a commit has this many (by
# default; the service asks for half of mqtt.receive_maximum). Past the broker's receive
# maximum no packet comes until PUBACKs go, so waiting on would only stall the stream;
# below it, each packet more shares the commit's fsync and the bookkeeping pages every
# commit writes. A small number (64) would make a commit every 64 ms at 1,000 packets/s
# instead of one per delay.
DELAY_ENOUGH_PACKETS = 500

# A broker may send fewer packets ahead of their PUBACKs than the gateway's receive
# maximum allows (AWS IoT Core: 100; EMQX's max_inflight for MQTT 3.1.1 clients: 32).
# Then every commit would wait out the whole delay for packets that cannot come. When
# two waits in a row ran out holding the same number of packets (at least
# CAP_MIN_PACKETS), none of them in the second half of the delay, that number is taken
# for the broker's cap and ends the wait like commit_delay_max_packets; it is forgotten
# after CAP_KEEP_S and learnt again if it holds.
CAP_MIN_PACKETS = 8
CAP_KEEP_S = 60.0

# A trickle: a wait of gateway.commit_delay_ms that ran out holding fewer packets than
# this (and no store call) goes on, up to the "slow" delay in all, until this many have
# come or a store call ends it. At 10 packets/s a 100 ms wait holds one or two packets,
# so unstretched nearly every packet would pay for a commit of its own: an fsync, the
# bookkeeping pages, a wake-up of the writer. A broker capping unacknowledged packets
# below this number would make every wait run on for packets that cannot come; two such
# waits in a row that ran out with the same packets, all of them in the first half,
# teach the writer that number (the trickle cap), and a wait holding it is not
# stretched, until CAP_KEEP_S later.
TRICKLE_PACKETS = 8

# At most this many store calls share one transaction.
MAX_GROUP_CALLS = 256

# The most "auto" holds a commit for later packets to share it (gateway.commit_delay_ms).
AUTO_COMMIT_DELAY_MAX_MS = 200.0

# Delivery takes an open window's full batches at most every this-th part of the window
# (delivery.Route.TAKE_PARTS), and "auto" holds a commit for as long: a packet waits for
# the next take anyway.
TAKE_PARTS = 5

# The most "auto" holds a trickle of packets (see TRICKLE_PACKETS).
AUTO_COMMIT_DELAY_SLOW_MAX_MS = 500.0


def commit_delay_ms(gateway: GatewaySection, webhooks: Sequence[WebhookConfig]) -> float:
    """gateway.commit_delay_ms as set; for "auto" (the default) a fifth of the shortest
    batching window of the packet webhooks, at most 200 ms. So 0 when one of them sends
    at once (`window_ms = 0`), and 200 ms for monoZ's 1 s window, where a packet waits
    for its window, or for delivery's next take of full batches (every fifth of a
    window, TAKE_PARTS), anyway; 200 ms also with no packet webhook."""
    return _auto_delay_ms(gateway, webhooks, AUTO_COMMIT_DELAY_MAX_MS, TAKE_PARTS)


def commit_delay_slow_ms(gateway: GatewaySection, webhooks: Sequence[WebhookConfig]) -> float:
    """How long a commit holding a trickle of packets waits in all (TRICKLE_PACKETS):
    for "auto", half the shortest batching window of the packet webhooks, at most 500 ms
    (0 with `window_ms = 0`). A packet that waits so misses at most its window's close
    and goes with the next, whose close counts from the packet's arrival, so it still
    reaches the webhook about a window after it came. A delay set in the config is
    never stretched."""
    return _auto_delay_ms(gateway, webhooks, AUTO_COMMIT_DELAY_SLOW_MAX_MS, 2)


def _auto_delay_ms(
    gateway: GatewaySection, webhooks: Sequence[WebhookConfig], most: float, parts: int
) -> float:
    """gateway.commit_delay_ms as set; for "auto", the shortest batching window of
    the packet webhooks divided by `parts`, at most `most` ms."""
    if gateway.commit_delay_ms is not None:
        return gateway.commit_delay_ms
    windows = [w.batch.window_ms for w in webhooks if w.source == "packets"]
    return min([most, *(w / parts for w in windows)])


# What the writer's queue holds: packets (Incoming), calls (_Call), and this marker,
# put there by Store.close.
_STOP = object()


@dataclass(slots=True)
class _Cap:
    """A count of packets the broker seems to send no more than ahead of their PUBACKs,
    learnt from two waits in a row that ran out holding it (see CAP_MIN_PACKETS and
    TRICKLE_PACKETS); kept CAP_KEEP_S, then learnt again if it still holds."""

    value: int = 0  # 0: none learnt
    seen: int = 0  # what the last wait that ran out quietly held
    until: float = 0.0

    def expire(self, now: float) -> None:
        if self.value and now > self.until:
            self.value = 0

    def observe(self, n: int, quiet: bool) -> bool:
        """A wait ran out holding n packets, none of them lately (`quiet`); returns
        whether that makes n the cap, and it was not already."""
        if not quiet:
            self.seen = 0
            return False
        new = False
        if n == self.seen:
            new = n != self.value
            self.value = n
            self.until = time.monotonic() + CAP_KEEP_S
        self.seen = n
        return new


class _Call:
    """A store call queued for the writer: fn(conn, *args), answered through `future`."""

    __slots__ = ("args", "fn", "future", "lazy")

    def __init__(self, fn: Callable[..., Any], args: tuple[Any, ...], lazy: bool = False) -> None:
        self.fn = fn
        self.args = args
        # Lazy (Store.defer): may wait for the next packet commit instead of cutting the
        # commit delay short.
        self.lazy = lazy
        self.future: concurrent.futures.Future[Any] = concurrent.futures.Future()


def _sort(item: Any, packets: list[Incoming], calls: list[_Call]) -> bool:
    """File an item taken from the writer's queue; True for the stop marker."""
    if item is _STOP:
        return True
    if isinstance(item, Incoming):
        packets.append(item)
    else:
        calls.append(item)
    return False


def _urgent(calls: list[_Call]) -> bool:
    """Whether any of the calls is one that must not wait for the commit delay."""
    return any(not c.lazy for c in calls)


class Pacing:
    """The Store's part that decides how long a commit waits, and what it takes."""

    _q: queue.SimpleQueue[Any]
    commit_max_packets: int
    # Hold a commit this long after its first packet, for later ones to share it ...
    commit_delay_s: float
    # ... unless it has this many packets by then.
    commit_delay_max_packets: int
    # A wait that has fewer than TRICKLE_PACKETS by then goes on up to this long.
    commit_delay_slow_s: float
    # The cap learnt from stretched waits; see TRICKLE_PACKETS.
    _trickle_cap: _Cap
    # The broker's cap on unacknowledged packets, as learnt; see CAP_MIN_PACKETS.
    _broker_cap: _Cap
    # Notified as packets handed over with submit_packet are committed (_released).
    _room: threading.Condition
    _released: int

    @property
    def broker_cap(self) -> int:
        """The broker's cap on unacknowledged packets, as learnt (0: none); see
        CAP_MIN_PACKETS."""
        return self._broker_cap.value

    @property
    def trickle_cap(self) -> int:
        """The cap learnt from stretched waits (0: none); see TRICKLE_PACKETS."""
        return self._trickle_cap.value

    def _wait_for_more(
        self, packets: list[Incoming], calls: list[_Call], *, learn: bool = True
    ) -> bool:
        """gateway.commit_delay_ms: take packets and lazy calls (Store.defer) for up to the
        delay, so that they share one commit (one fsync) with those already taken. Any
        other store call (a new batch, status) or close ends the wait at once, and so
        do commit_delay_max_packets packets, or the broker's cap on unacknowledged
        packets once learnt (see CAP_MIN_PACKETS). A trickle of packets waits on up to
        commit_delay_slow_s (see TRICKLE_PACKETS). `learn`: the packets came from the
        broker just now (not held back, nor come into a wait for lazy calls), so the
        wait says something of its pace. Returns whether close was asked for."""
        began = last = time.monotonic()
        deadline = began + self.commit_delay_s
        self._broker_cap.expire(began)
        self._trickle_cap.expire(began)
        enough = min(self.commit_max_packets, self.commit_delay_max_packets)
        if self.broker_cap:
            enough = min(enough, self.broker_cap)
        stretched = False
        while len(packets) < enough and len(calls) < MAX_GROUP_CALLS:
            left = deadline - time.monotonic()
            item = None
            if left > 0:
                with contextlib.suppress(queue.Empty):
                    item = self._q.get(timeout=left)
            if item is None:
                if not stretched and learn and self._stretches(len(packets), calls):
                    stretched = True
                    deadline = began + self.commit_delay_slow_s
                    enough = min(enough, TRICKLE_PACKETS)
                    continue
                if stretched:
                    self._learn_trickle(len(packets), quiet=deadline - last)
                elif learn:
                    self._learn_cap(len(packets), quiet=deadline - last)
                break
            if _sort(item, packets, calls):
                return True
            if isinstance(item, Incoming):
                last = time.monotonic()
            elif not item.lazy or stretched:
                break
        return False

    def _stretches(self, n: int, calls: list[_Call]) -> bool:
        """Whether a wait that ran out holding n packets and `calls` goes on (a trickle)."""
        if calls or n >= TRICKLE_PACKETS or self.commit_delay_slow_s <= self.commit_delay_s:
            return False
        return not self.trickle_cap or n < self.trickle_cap

    def _learn_trickle(self, n: int, quiet: float) -> None:
        """A stretched wait ran out holding n packets, the last `quiet` seconds before
        its end: a broker that sends no more than n until PUBACKs go, if the one before
        did too. Unlike the broker cap it only keeps waits from being stretched."""
        if self._trickle_cap.observe(n, quiet >= self.commit_delay_slow_s / 2):
            log.info(
                "commits waited on twice for more than %d packets that did not come"
                " (a broker's cap on unacknowledged packets?): a commit holding %d no"
                " longer waits on for a trickle",
                n,
                n,
            )

    def _learn_cap(self, n: int, quiet: float) -> None:
        """A wait ran out holding n packets, the last of them `quiet` seconds before its
        end: a broker that sends no more until PUBACKs go, if the one before did too."""
        steady = n >= CAP_MIN_PACKETS and quiet >= self.commit_delay_s / 2
        if self._broker_cap.observe(n, steady):
            log.info(
                "the broker sends at most %d packets ahead of their PUBACKs: a commit"
                " goes once it has them, not after gateway.commit_delay_ms",
                n,
            )

    def _release_pending(self, n: int) -> None:
        if n:
            with self._room:
                self._released += n
                self._room.notify_all()

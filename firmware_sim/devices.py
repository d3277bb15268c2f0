"""A simulated fleet of cellular IoT devices publishing readings over MQTT (QoS 1).

Each device has its own ICCID (19 digits, ``8981…``, valid Luhn digit), its own MQTT
client (client id ``sim-<iccid>``) and publishes to ``devices/<iccid>/up``. ``--rate`` is
readings per second *per device*, so the fleet offers ``devices * rate`` packets/s;
devices are phase-shifted so the load is spread evenly. ``--count`` is readings per device.

Payload kinds (``mixed`` assigns json, cbor, binary round-robin by device index):

* ``json``: ``{"counter": 7, "ts": 1700000000123, "temperature": 21.53, "humidity": 48.25,
  "battery_mv": 3987, "lat": 35.6812345, "lon": 139.7671234}``
* ``cbor``: the same map encoded with cbor2, as a constrained device would.
* ``binary``: 27 bytes, big-endian, ``struct`` format ``>BIQhHHii``:

  ====== ==== ===================================================
  offset type field
  ====== ==== ===================================================
  0      u8   layout version (1)
  1      u32  counter
  5      u64  device timestamp, ms since the Unix epoch (UTC)
  13     i16  temperature, centi-degrees Celsius
  15     u16  relative humidity, centi-percent
  17     u16  battery, millivolts
  19     i32  latitude, 1e-7 degrees
  23     i32  longitude, 1e-7 degrees
  ====== ==== ===================================================

The counter starts at 0 and grows by one per reading, so a receiver can find gaps.
Like real firmware, a device keeps unsent readings in a ring buffer (``--buffer``, 100 by
default): while the broker is away they wait there and, once it is full, the oldest reading
is dropped and counted. Readings already handed to the MQTT client (at most ``WINDOW`` per
device) stay there and are retransmitted after the reconnect, so nothing beyond the
buffer is lost.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import ipaddress
import json
import math
import queue
import random
import signal
import struct
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import cbor2
import paho.mqtt.client as mqtt

from firmware_sim import luhn

KINDS = ("json", "cbor", "binary")
ENCODINGS = (*KINDS, "mixed")
BINARY_FORMAT = ">BIQhHHii"
BINARY_VERSION = 1
BINARY_SIZE = struct.calcsize(BINARY_FORMAT)
WINDOW = 10
DEFAULT_TOPIC = "devices/{iccid}/up"
ICCID_PREFIX = "898100"  # 89 telecom, 81 Japan, 00 issuer: 6 + 12 serial + 1 check = 19
MAX_DEVICES = 1000  # one paho network thread per device


def make_iccid(i: int) -> str:
    """The 19-digit ICCID of device `i`: 898100, a 12-digit serial, a Luhn check digit."""
    if not 0 <= i < 10**12:
        raise ValueError(f"device index must be 0..999999999999, got {i}")
    body = f"{ICCID_PREFIX}{i:012d}"
    return body + luhn.check_digit(body)


def kind_for(encoding: str, i: int) -> str:
    """The payload kind of device `i` under `encoding` (mixed is round-robin)."""
    return KINDS[i % len(KINDS)] if encoding == "mixed" else encoding


def is_loopback(host: str) -> bool:
    """True for localhost and loopback IP literals: the only brokers the simulator talks to."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Reading:
    """One sample, already quantised to what the binary layout can carry."""

    counter: int
    ts: int
    temperature: float
    humidity: float
    battery_mv: int
    lat: float
    lon: float

    def as_dict(self) -> dict[str, Any]:
        """The JSON/CBOR map."""
        return {
            "counter": self.counter,
            "ts": self.ts,
            "temperature": self.temperature,
            "humidity": self.humidity,
            "battery_mv": self.battery_mv,
            "lat": self.lat,
            "lon": self.lon,
        }


def encode(reading: Reading, kind: str) -> bytes:
    """The payload bytes of `reading` for a `kind` device."""
    if kind == "json":
        return json.dumps(reading.as_dict(), separators=(",", ":")).encode()
    if kind == "cbor":
        return bytes(cbor2.dumps(reading.as_dict()))
    if kind == "binary":
        return struct.pack(
            BINARY_FORMAT,
            BINARY_VERSION,
            reading.counter,
            reading.ts,
            round(reading.temperature * 100),
            round(reading.humidity * 100),
            reading.battery_mv,
            round(reading.lat * 1e7),
            round(reading.lon * 1e7),
        )
    raise ValueError(f"unknown payload kind {kind!r}; expected one of {', '.join(KINDS)}")


def decode(payload: bytes, kind: str) -> dict[str, Any]:
    """Inverse of encode(): the reading's map (for tests and receivers)."""
    if kind == "json":
        return dict(json.loads(payload))
    if kind == "cbor":
        return dict(cbor2.loads(payload))
    if kind == "binary":
        version, counter, ts, temp, hum, bat, lat, lon = struct.unpack(BINARY_FORMAT, payload)
        if version != BINARY_VERSION:
            raise ValueError(f"binary layout version {version}, expected {BINARY_VERSION}")
        return {
            "counter": counter,
            "ts": ts,
            "temperature": temp / 100,
            "humidity": hum / 100,
            "battery_mv": bat,
            "lat": lat / 1e7,
            "lon": lon / 1e7,
        }
    raise ValueError(f"unknown payload kind {kind!r}; expected one of {', '.join(KINDS)}")


class Sensors:
    """Plausible, slowly drifting readings for one device."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.temperature = rng.uniform(15.0, 25.0)
        self.humidity = rng.uniform(35.0, 65.0)
        self.battery = rng.uniform(3850.0, 4150.0)
        # Around Tokyo Station, a few km apart.
        self.lat = 35.6812 + rng.uniform(-0.05, 0.05)
        self.lon = 139.7671 + rng.uniform(-0.05, 0.05)

    def sample(self, counter: int) -> Reading:
        """The next reading, a small random walk from the last one."""
        r = self.rng
        self.temperature = min(50.0, max(-20.0, self.temperature + r.gauss(0, 0.1)))
        self.humidity = min(95.0, max(5.0, self.humidity + r.gauss(0, 0.3)))
        self.battery = max(3300.0, self.battery - r.uniform(0.0, 0.2))
        self.lat = min(89.0, max(-89.0, self.lat + r.gauss(0, 0.00002)))
        self.lon = min(179.0, max(-179.0, self.lon + r.gauss(0, 0.00002)))
        return Reading(
            counter=counter & 0xFFFFFFFF,
            ts=time.time_ns() // 1_000_000,
            temperature=round(self.temperature, 2),
            humidity=round(self.humidity, 2),
            battery_mv=round(self.battery),
            lat=round(self.lat, 7),
            lon=round(self.lon, 7),
        )


@dataclass(frozen=True, slots=True)
class FleetStats:
    """Counters for a fleet run (all devices together)."""

    generated: int = 0
    published: int = 0
    acked: int = 0
    dropped: int = 0
    unacked: int = 0
    connects: int = 0
    disconnects: int = 0
    elapsed_s: float = 0.0

    def summary(self) -> str:
        """The one-line summary the CLI prints."""
        return (
            f"fleet: generated={self.generated} published={self.published} "
            f"acked={self.acked} buffered_dropped={self.dropped} unacked={self.unacked} "
            f"connects={self.connects} disconnects={self.disconnects} "
            f"elapsed={self.elapsed_s:.1f}s"
        )


@dataclass(eq=False)
class Device:
    """One simulated device: its identity, sensors, ring buffer and in-flight readings."""

    index: int
    iccid: str
    kind: str
    topic: str
    sensors: Sensors
    buffer_size: int
    client: mqtt.Client | None = None
    connected: bool = False
    counter: int = 0
    buffer: collections.deque[Reading] = field(default_factory=collections.deque)
    inflight: dict[int, Reading] = field(default_factory=dict)
    generated: int = 0
    published: int = 0
    acked: int = 0
    dropped: int = 0
    connects: int = 0
    disconnects: int = 0

    def add(self, reading: Reading) -> None:
        """Buffer a new reading, evicting (and counting) the oldest when full."""
        self.generated += 1
        if len(self.buffer) >= self.buffer_size:
            self.buffer.popleft()
            self.dropped += 1
        self.buffer.append(reading)

    @property
    def idle(self) -> bool:
        """Nothing buffered and nothing waiting for a PUBACK."""
        return not self.buffer and not self.inflight


class Fleet:
    """N simulated devices on one loopback broker; run() blocks, stop() ends it early."""

    def __init__(
        self,
        broker_host: str = "127.0.0.1",
        port: int = 1883,
        devices: int = 20,
        rate: float = 5.0,
        encoding: str = "mixed",
        seed: int | None = None,
        *,
        topic_template: str = DEFAULT_TOPIC,
        buffer: int = 100,
        first: int = 0,
        keepalive: int = 10,
    ) -> None:
        if not is_loopback(broker_host):
            raise ValueError(
                f"broker host {broker_host!r} is not a loopback address; "
                "the simulator only publishes to a local broker"
            )
        if not 1 <= port <= 65535:
            raise ValueError(f"broker port must be 1-65535, got {port}")
        if not 1 <= devices <= MAX_DEVICES:
            raise ValueError(f"devices must be 1-{MAX_DEVICES}, got {devices}")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a positive number of readings/s, got {rate}")
        if encoding not in ENCODINGS:
            raise ValueError(f"encoding must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
        if buffer < 1:
            raise ValueError(f"buffer must be at least 1 reading, got {buffer}")
        self.host = broker_host.strip("[]")
        self.port = port
        self.rate = rate
        self.keepalive = keepalive
        self._events: queue.SimpleQueue[tuple[str, int, int]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._started = 0.0
        self._finished: float | None = None
        master = random.Random(seed)
        self.devices: list[Device] = []
        for n in range(devices):
            i = first + n
            iccid = make_iccid(i)
            kind = kind_for(encoding, i)
            try:
                topic = topic_template.format(iccid=iccid, index=i, kind=kind)
            except (KeyError, IndexError, ValueError) as exc:
                raise ValueError(
                    f"topic template {topic_template!r}: only {{iccid}}, {{index}} and "
                    f"{{kind}} are known ({exc})"
                ) from exc
            rng = random.Random(master.getrandbits(64))
            self.devices.append(Device(i, iccid, kind, topic, Sensors(rng), buffer))

    # paho callbacks run on each client's network thread; they only queue an event so
    # that all device state is owned by the thread inside run().
    def _on_connect(self, _c: mqtt.Client, dev: Device, _f: Any, reason: Any, _p: Any) -> None:
        if not reason.is_failure:
            self._events.put(("connect", dev.index, 0))

    def _on_disconnect(self, _c: mqtt.Client, dev: Device, _f: Any, _reason: Any, _p: Any) -> None:
        self._events.put(("disconnect", dev.index, 0))

    def _on_publish(self, _c: mqtt.Client, dev: Device, mid: int, _reason: Any, _p: Any) -> None:
        self._events.put(("puback", dev.index, mid))

    def stop(self) -> None:
        """Stop generating readings for good; run() then drains and returns. Thread-safe."""
        self._stop.set()

    def stats(self) -> FleetStats:
        """A snapshot of the counters (safe to call from another thread while running)."""
        devs = list(self.devices)
        end = self._finished if self._finished is not None else time.monotonic()
        return FleetStats(
            generated=sum(d.generated for d in devs),
            published=sum(d.published for d in devs),
            acked=sum(d.acked for d in devs),
            dropped=sum(d.dropped for d in devs),
            unacked=sum(len(d.buffer) + len(d.inflight) for d in devs),
            connects=sum(d.connects for d in devs),
            disconnects=sum(d.disconnects for d in devs),
            elapsed_s=end - self._started if self._started else 0.0,
        )

    def _client(self, dev: Device) -> mqtt.Client:
        client = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=f"sim-{dev.iccid}",
            userdata=dev,
            protocol=mqtt.MQTTv311,
            clean_session=True,
        )
        client.on_connect = self._on_connect
        client.on_disconnect = self._on_disconnect
        client.on_publish = self._on_publish
        client.max_inflight_messages_set(WINDOW)
        # Short, capped backoff: a simulated device should be back soon after the broker.
        client.reconnect_delay_set(min_delay=1, max_delay=4)
        client.connect_async(self.host, self.port, keepalive=self.keepalive)
        return client

    def _pump(self, dev: Device) -> None:
        """Hand buffered readings to the MQTT client while connected and under WINDOW."""
        assert dev.client is not None
        while dev.connected and dev.buffer and len(dev.inflight) < WINDOW:
            reading = dev.buffer.popleft()
            info = dev.client.publish(dev.topic, encode(reading, dev.kind), qos=1)
            if info.rc not in (mqtt.MQTT_ERR_SUCCESS, mqtt.MQTT_ERR_NO_CONN):
                # Refused outright (not queued by paho): keep it and retry on the next event.
                dev.buffer.appendleft(reading)
                return
            # NO_CONN: paho keeps the message and sends it after the reconnect.
            dev.inflight[info.mid] = reading
            dev.published += 1

    def _handle(self, event: tuple[str, int, int], first: int) -> None:
        kind, index, mid = event
        dev = self.devices[index - first]
        if kind == "connect":
            dev.connected = True
            dev.connects += 1
        elif kind == "disconnect":
            if dev.connected:
                dev.disconnects += 1
            dev.connected = False
        elif kind == "puback" and dev.inflight.pop(mid, None) is not None:
            dev.acked += 1
        self._pump(dev)

    def _wait_events(self, until: float, first: int) -> None:
        """Handle paho events until the monotonic deadline `until`."""
        while True:
            timeout = until - time.monotonic()
            try:
                if timeout > 0:
                    event = self._events.get(timeout=timeout)
                else:
                    event = self._events.get_nowait()
            except queue.Empty:
                return
            self._handle(event, first)

    def run(
        self, duration: float | None = None, count: int | None = None, drain: float = 10.0
    ) -> FleetStats:
        """Publish until `duration` s pass or every device made `count` readings (None or
        0: no bound), then wait up to `drain` s for outstanding PUBACKs."""
        first = self.devices[0].index
        self._started = time.monotonic()
        self._finished = None
        interval = 1.0 / self.rate
        n = len(self.devices)
        # Spread device phases over one interval so the broker sees a steady stream.
        due = [(self._started + interval * k / n, k) for k in range(n)]
        # No duration means until count, or until stop() (the CLI's Ctrl-C).
        end = self._started + (duration or math.inf)
        for dev in self.devices:
            dev.client = self._client(dev)
            dev.client.loop_start()
        try:
            while due and not self._stop.is_set():
                # Short slices, so stop() is seen soon even at very low rates.
                self._wait_events(min(min(due)[0], end, time.monotonic() + 0.25), first)
                now = time.monotonic()
                if now >= end:
                    break
                for slot, (t, k) in enumerate(due):
                    if t > now:
                        continue
                    dev = self.devices[k]
                    dev.add(dev.sensors.sample(dev.counter))
                    dev.counter += 1
                    self._pump(dev)
                    # A scheduler that fell far behind skips ahead rather than bursting.
                    nxt = t + interval if t + interval > now - 1.0 else now + interval
                    due[slot] = (nxt, k)
                if count:
                    due = [(t, k) for t, k in due if self.devices[k].counter < count]
            drain_end = time.monotonic() + drain
            while not all(d.idle for d in self.devices) and time.monotonic() < drain_end:
                self._wait_events(min(drain_end, time.monotonic() + 0.1), first)
        finally:
            for dev in self.devices:
                if dev.client is not None:
                    dev.client.disconnect()
            for dev in self.devices:
                if dev.client is not None:
                    dev.client.loop_stop()
            self._finished = time.monotonic()
        return self.stats()

    async def run_async(
        self, duration: float | None = None, count: int | None = None, drain: float = 10.0
    ) -> FleetStats:
        """run() in a worker thread; cancelling stops the fleet and waits for it to close."""
        task = asyncio.ensure_future(asyncio.to_thread(self.run, duration, count, drain))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            self.stop()
            with contextlib.suppress(Exception):
                await task
            raise


def parse_broker(value: str) -> tuple[str, int]:
    """HOST[:PORT] (IPv6 in brackets) → (host, port); port defaults to 1883."""
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port_text = rest.removeprefix(":") or "1883"
    elif value.count(":") == 1:
        host, port_text = value.split(":")
    else:
        host, port_text = value, "1883"
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"--broker {value!r}: port {port_text!r} is not a number") from None
    return host, port


def _non_negative(kind: type[int] | type[float]) -> Any:
    def parse(text: str) -> int | float:
        value = kind(text)
        if value < 0:
            raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
        return value

    parse.__name__ = kind.__name__  # argparse names the type in "invalid int value" errors
    return parse


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m firmware_sim fleet",
        description="Simulated devices publishing readings to a loopback MQTT broker (QoS 1).",
    )
    p.add_argument("--broker", default="127.0.0.1:1883", help="HOST[:PORT], loopback only")
    p.add_argument("--devices", type=int, default=20)
    p.add_argument("--rate", type=float, default=5.0, help="readings/s per device")
    p.add_argument("--encoding", choices=ENCODINGS, default="mixed")
    p.add_argument(
        "--duration", type=_non_negative(float), default=60.0, help="seconds; 0 = no limit"
    )
    p.add_argument(
        "--count", type=_non_negative(int), default=0, help="readings per device; 0 = no limit"
    )
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--topic-template", default=DEFAULT_TOPIC, help="{iccid} {index} {kind}")
    p.add_argument("--buffer", type=int, default=100, help="ring buffer per device")
    p.add_argument("--first", type=int, default=0, help="index of the first device")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for PUBACKs")
    return p.parse_args(argv)


@contextlib.contextmanager
def _signals_stop(fleet: Fleet) -> Iterator[None]:
    """SIGINT/SIGTERM end the run gracefully (drain, summary) instead of a traceback."""
    old = {s: signal.signal(s, lambda *_: fleet.stop()) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


def main(argv: list[str]) -> int:
    """CLI entry: python -m firmware_sim fleet …"""
    args = _args(argv)
    try:
        host, port = parse_broker(args.broker)
        fleet = Fleet(
            host,
            port,
            args.devices,
            args.rate,
            args.encoding,
            args.seed,
            topic_template=args.topic_template,
            buffer=args.buffer,
            first=args.first,
        )
    except ValueError as exc:
        print(f"fleet: {exc}", file=sys.stderr)
        return 2
    print(
        f"fleet: {args.devices} devices ({args.encoding}) → {host}:{port}, "
        f"{args.rate:g}/s each, {args.devices * args.rate:g}/s total",
        file=sys.stderr,
    )
    with _signals_stop(fleet):
        stats = fleet.run(args.duration, args.count, args.drain)
    print(stats.summary())
    return 0 if stats.unacked == 0 else 1

"""Parts the fault tests share: numbered packets, a publisher that outlives its broker,
a gateway started on a registered session, and a tally of what the receivers got."""

from __future__ import annotations

import collections
import contextlib
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as mqtt

from tests.conftest import (
    ROOT,
    GatewayProc,
    gateway_cmd,
    register_session,
    wait_for,
    write_config,
)
from tests.receiver import Recorded

ICCID = "8981100000000000012"
TOPIC = f"devices/{ICCID}/up"


def packet(seq: int, copy: int = 0) -> bytes:
    """The payload of packet `seq`; `copy` > 0 marks a re-publish by the test's publisher."""
    return b"seq-%07d/%d" % (seq, copy)


def parse(payload: str) -> tuple[int, int]:
    """(seq, copy) from a record's Payload."""
    head, _, copy = payload.partition("/")
    return int(head[4:]), int(copy)


class Publisher:
    """Publishes packets first..first+total-1 at `rate` per second from a thread, at QoS 1.

    It outlives its broker: when the connection drops, every packet without a PUBACK is
    published again (as a new copy) on a new connection. `acked` maps a packet to the wall-clock time its (last) PUBACK was
    seen, at most a few ms late."""

    def __init__(
        self,
        port: int,
        total: int,
        rate: float,
        *,
        first: int = 0,
        client_id: str = "",
        timeout: float = 120,
    ) -> None:
        self.port = port
        self.first = first
        self.total = total
        self.rate = rate
        self.client_id = client_id
        self.timeout = timeout
        self.acked: dict[int, float] = {}
        self.copies: collections.Counter[int] = collections.Counter()
        self.reconnects = 0
        self.published = 0
        self.error: BaseException | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._main, name="publisher", daemon=True)

    def start(self) -> Publisher:
        self._thread.start()
        return self

    def first_ack_at(self) -> float:
        """Wall-clock time of the earliest PUBACK seen (inf before any)."""
        with self._lock:
            return min(self.acked.values(), default=float("inf"))

    def acked_before(self, t: float) -> list[int]:
        """Packets whose PUBACK was seen before wall-clock time t."""
        with self._lock:
            return sorted(s for s, at in self.acked.items() if at < t)

    def join(self, timeout: float) -> None:
        """Wait until every packet has its PUBACK; fail the test if that takes too long."""
        self._thread.join(timeout)
        if self._thread.is_alive():
            self._stop.set()
            self._thread.join(5)
            raise AssertionError(f"publisher not done after {timeout:.0f} s: {self.progress()}")
        if self.error is not None:
            raise AssertionError(f"publisher failed: {self.error!r}")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(10)

    def progress(self) -> str:
        return f"{len(self.acked)}/{self.total} acknowledged, {self.reconnects} reconnects"

    def _connect(self, deadline: float) -> mqtt.Client:
        while True:
            c = mqtt.Client(
                mqtt.CallbackAPIVersion.VERSION2,
                client_id=self.client_id,
                protocol=mqtt.MQTTv5,
                reconnect_on_failure=False,
            )
            c.max_inflight_messages_set(1000)
            c.max_queued_messages_set(0)
            with contextlib.suppress(OSError):
                c.connect("127.0.0.1", self.port, keepalive=10)
                c.loop_start()
                until = time.monotonic() + 5
                while not c.is_connected() and time.monotonic() < until:
                    time.sleep(0.01)
                if c.is_connected():
                    return c
                c.loop_stop()
            if time.monotonic() > deadline or self._stop.is_set():
                raise TimeoutError("cannot connect to the broker")
            time.sleep(0.1)

    def _main(self) -> None:
        try:
            self._run()
        except BaseException as exc:  # handed to join()
            self.error = exc

    def _run(self) -> None:
        began = time.monotonic()
        deadline = began + self.timeout
        todo = collections.deque(range(self.first, self.first + self.total))
        inflight: dict[int, mqtt.MQTTMessageInfo] = {}
        client = self._connect(deadline)
        while (todo or inflight) and not self._stop.is_set():
            if time.monotonic() > deadline:
                raise TimeoutError(self.progress())
            if not client.is_connected():
                client.loop_stop()
                lost = sorted(s for s, info in inflight.items() if not _published(info))
                with self._lock:
                    for s, info in inflight.items():
                        if _published(info):
                            self.acked[s] = time.time()
                inflight.clear()
                todo.extendleft(reversed(lost))
                self.reconnects += 1
                client = self._connect(deadline)
            budget = int((time.monotonic() - began) * self.rate) - self.published
            for _ in range(min(budget, len(todo), 1000 - len(inflight))):
                seq = todo.popleft()
                copy = self.copies[seq]
                self.copies[seq] += 1
                inflight[seq] = client.publish(TOPIC, packet(seq, copy), qos=1)
                self.published += 1
            with self._lock:
                for s in [s for s, info in inflight.items() if _published(info)]:
                    del inflight[s]
                    self.acked[s] = time.time()
            time.sleep(0.005)
        client.disconnect()
        client.loop_stop()


def _published(info: mqtt.MQTTMessageInfo) -> bool:
    """Whether the broker acknowledged it; a publish made while the connection was down
    says so by raising."""
    try:
        return info.is_published()
    except (RuntimeError, ValueError):
        return False


def seeded(record_property: Callable[[str, object], None]) -> tuple[int, random.Random]:
    """A random generator for a run's faults; FAULTS_SEED=<n> repeats a run."""
    seed = int(os.environ.get("FAULTS_SEED", random.randrange(1 << 30)))
    record_property("seed", seed)
    return seed, random.Random(seed)


def durable(backoff_max_s: float, timeout_s: float | None = None) -> str:
    """The durable retry preset with test-sized backoff (and timeout)."""
    timeout = f"timeout_s = {timeout_s}, " if timeout_s is not None else ""
    return (
        f'{{ preset = "durable", {timeout}backoff_min_s = 0.05, backoff_max_s = {backoff_max_s} }}'
    )


def webhook(url: str, **fields: str) -> str:
    """A [[webhooks]] table named cloud; values are TOML literals."""
    lines = ["[[webhooks]]", 'name = "cloud"', f'url = "{url}"']
    lines += [f"{k} = {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def start_gateway(
    make: Callable[..., GatewayProc],
    tmp_path: Path,
    port: int,
    url: str,
    *,
    name: str = "gw",
    shared_group: str = "",
    session_expiry_s: int = 3600,
    ingest_processes: int = 1,
    web: str = "enabled = false",
    **fields: str,
) -> GatewayProc:
    """A gateway subprocess on its own store, with one webhook to `url` (`fields` are its
    TOML values), connected and subscribed when this returns (each of its sessions, with
    `ingest_processes`)."""
    extra = f"session_expiry_s = {session_expiry_s}\ningest_processes = {ingest_processes}"
    topic = "devices/+/up"
    if shared_group:
        extra += f'\nshared_group = "{shared_group}"'
        topic = f"$share/{shared_group}/{topic}"
    for n in range(ingest_processes):
        register_session(port, f"{name}-{n}" if n else name, topic, session_expiry_s)
    cfg = write_config(
        tmp_path / f"{name}.toml",
        port,
        tmp_path / f"state-{name}",
        extra=webhook(url, **fields),
        mqtt_extra=extra,
        client_id=name,
        web=web,
    )
    gw = make(cfg)
    gw.start()
    wait_for(lambda: gw.log().count("connected to") >= ingest_processes, what=f"{name} connected")
    return gw


def restart(gw: GatewayProc) -> None:
    """Start a stopped gateway again and wait until it is connected."""
    seen = gw.log().count("connected to")
    gw.start()
    wait_for(lambda: gw.log().count("connected to") > seen, what="gateway connected again")


def status(gw: GatewayProc) -> dict[str, Any]:
    """`gateway status --json` from the gateway's store (works while it is stopped)."""
    out = subprocess.run(
        gateway_cmd("status", "--json", "-c", str(gw.config)),
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
        timeout=30,
    ).stdout
    return json.loads(out)  # type: ignore[no-any-return]


class Accepting(Protocol):
    """A receiver that can list the requests it answered with 2xx."""

    def ok(self) -> list[Recorded]: ...


@dataclass
class Tally:
    """What a receiver accepted (2xx), by packet: the webhook-id and copy of each delivery."""

    by_seq: dict[int, list[tuple[str, int]]] = field(default_factory=dict)
    records: int = 0
    # webhook-ids answered 2xx more than once: batches sent again after a crash or timeout
    resent_ids: set[str] = field(default_factory=set)
    # 2xx answers beyond the first of each webhook-id (a batch can be sent again twice)
    resends: int = 0

    @classmethod
    def of(cls, *receivers: Accepting) -> Tally:
        t = cls()
        answered: set[str] = set()
        for r in receivers:
            for req in r.ok():
                wid = req.webhook_id
                if wid in answered:
                    t.resent_ids.add(wid)
                    t.resends += 1
                answered.add(wid)
                for rec in req.records:
                    seq, copy = parse(rec["Payload"])
                    t.by_seq.setdefault(seq, []).append((wid, copy))
                    t.records += 1
        return t

    @property
    def distinct(self) -> int:
        return len(self.by_seq)

    @property
    def duplicates(self) -> int:
        return self.records - self.distinct

    def missing(self, total: int) -> list[int]:
        return [s for s in range(total) if s not in self.by_seq]

    def seqs_with_several_ids(self) -> dict[int, set[str]]:
        """Packets delivered under more than one webhook-id (stored twice by the gateway,
        or published twice by the test)."""
        ids = {s: {w for w, _ in d} for s, d in self.by_seq.items()}
        return {s: v for s, v in ids.items() if len(v) > 1}


def delivered_all(total: int, *receivers: Accepting) -> Callable[[], bool]:
    """A wait_for predicate: every packet 0..total-1 reached one of the receivers."""
    return lambda: Tally.of(*receivers).distinct >= total


def bodies_by_id(*receivers: Any) -> dict[str, set[bytes]]:
    """Every body sent under each webhook-id, whatever the answer."""
    out: dict[str, set[bytes]] = collections.defaultdict(set)
    for r in receivers:
        for req in list(r.requests):
            out[req.webhook_id].add(req.body)
    return out

"""What the store takes in and hands out: packets, batches, rejects, replays (no SQL).

Other packages build and read these; the store's SQL lives in the modules beside this one.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field

import orjson


@dataclass(slots=True)
class Incoming:
    """A packet as handed over by the MQTT thread, not yet committed."""

    topic: str
    payload: bytes
    iccid: str
    mid: int
    dup: bool
    epoch: int
    recv_ns: int = field(default_factory=time.time_ns)
    too_large: bool = False
    # Which MQTT session it came on: 0 is mqtt.client_id (the only one unless
    # mqtt.ingest_processes > 1), n is its ingest process n. Packet ids are per session.
    source: int = 0
    # Set by the writer: "stored", "redelivery", "too_large" or "dropped".
    outcome: str = ""

    @property
    def inflight_key(self) -> int:
        """The `inflight` row of its packet id: the session in the bits above the 16 of a
        packet id, so that session 0's key is the packet id itself."""
        return self.source << 16 | self.mid

    def digest(self) -> bytes:
        return digest_of(self.topic, self.payload)


def digest_of(topic: str, payload: bytes) -> bytes:
    """What `inflight` keeps of a packet: the first 8 bytes of a 16-byte BLAKE2b of topic
    and payload (8 bytes a packet). A row holding all 16 bytes is compared by its first
    8, so it still recognises a redelivery."""
    h = hashlib.blake2b(topic.encode(), digest_size=16)
    h.update(b"\0")
    h.update(payload)
    return h.digest()[:8]


@dataclass(frozen=True, slots=True)
class PacketRow:
    id: int
    recv_ns: int
    topic: str
    iccid: str
    payload: bytes


@dataclass(frozen=True, slots=True)
class Batch:
    """A request-to-be: its webhook-id is fixed when it is created and kept across retries."""

    id: str
    route: str
    item_ids: tuple[int, ...]
    single: bool
    body: bytes | None
    attempts: int
    created_ns: int
    next_at_ns: int
    count: int = 0  # records in the batch
    retry_delay_ns: int = 0  # the delay that set next_at_ns (0: none or not known)
    seq: int = 0  # its row in `batches` once stored (0: not stored yet)


# Why a record was dead-lettered on its own, before any request: its webhook's filter
# failed on it, its format cannot hold it, or its stored row is damaged. Each is counted
# as `rejected_<reason>`; packets too large to store are counted as packets_too_large.
REJECT_REASONS = ("unfilterable", "unencodable", "undecodable")


@dataclass(frozen=True, slots=True)
class Reject:
    """A record dead-lettered on its own: its webhook-id, why, and the body kept for it
    (the record in a form that always encodes, see Source.fallback)."""

    webhook_id: str
    reason: str
    error: str
    body: bytes
    topic: str | None = None
    iccid: str | None = None
    recv_ns: int | None = None


@dataclass(frozen=True, slots=True)
class Replay:
    """What requeue_dead_letters did: how many letters it re-queued, and which it left."""

    requeued: int
    # Oversize packets whose letters keep only a prefix of the payload: left as they are.
    skipped: tuple[int, ...] = ()


def batch_item_ids(item_ids: str | None, first_id: int | None, count: int) -> tuple[int, ...]:
    """A batch row's record ids. Consecutive ones (a webhook without a filter) are kept as
    first_id and count only, with item_ids NULL: a JSON list of ten 7-digit ids is 80
    bytes of a 150-byte row, and about ten rows are added and deleted per commit at
    1,000 packets/s. A batch with a body and no records (a report notice, a replayed
    dead letter) has item_ids '[]'."""
    if item_ids is None:
        return tuple(range(first_id, first_id + count)) if first_id is not None else ()
    return tuple(orjson.loads(item_ids)) if item_ids else ()

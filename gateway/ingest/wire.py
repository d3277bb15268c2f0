"""The frames between an ingest process and the gateway process.

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

import socket
import struct
from collections.abc import Iterator

from gateway.store.records import Incoming

_HEAD = struct.Struct("!BI")
_FIXED = struct.Struct("!IHBQHHI")  # a packet's fixed fields
_PKT = struct.Struct("!BI" + _FIXED.format[1:])  # _HEAD and _FIXED in one
HELLO, COMMITTED, STOP, PACKET, STATS = (ord(c) for c in "HAQPS")
_DUP, _TOO_LARGE = 1, 2


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

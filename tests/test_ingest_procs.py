"""The frames between an ingest process and the gateway (`gateway/ingest/wire.py`):
whatever the packets and however the socket cuts the stream, the gateway gets back
exactly what the process sent."""

from __future__ import annotations

import socket
import threading

from hypothesis import given, settings
from hypothesis import strategies as hs

from gateway.ingest.wire import (
    COMMITTED,
    PACKET,
    decode_packet,
    encode_packet,
    frame,
    pack_ids,
    read_frames,
    unpack_ids,
)
from gateway.store import Incoming

packets = hs.builds(
    Incoming,
    topic=hs.text(max_size=60),
    payload=hs.binary(max_size=3000),
    iccid=hs.text(alphabet="0123456789F", max_size=22),
    mid=hs.integers(0, 65535),
    dup=hs.booleans(),
    epoch=hs.integers(0, 2**32 - 1),
    recv_ns=hs.integers(0, 2**63 - 1),
    too_large=hs.booleans(),
)


@settings(max_examples=60, deadline=None)
@given(
    pkts=hs.lists(packets, max_size=40),
    ids=hs.lists(hs.integers(0, 65535), max_size=50),
    cuts=hs.lists(hs.integers(1, 4000), min_size=1, max_size=20),
)
def test_frames_survive_any_cutting_of_the_stream(
    pkts: list[Incoming], ids: list[int], cuts: list[int]
) -> None:
    data = b"".join(b"".join(encode_packet(p)) for p in pkts) + frame(COMMITTED, pack_ids(9, ids))
    ours, theirs = socket.socketpair()

    def send() -> None:
        pos, i = 0, 0
        while pos < len(data):
            step = cuts[i % len(cuts)]
            theirs.sendall(data[pos : pos + step])
            pos, i = pos + step, i + 1
        theirs.close()

    sender = threading.Thread(target=send)
    sender.start()
    got: list[Incoming] = []
    acks: list[tuple[int, list[int]]] = []
    for kind, body in read_frames(ours):
        if kind == PACKET:
            got.append(decode_packet(body, source=3))
        else:
            assert kind == COMMITTED
            acks.append(unpack_ids(body))
    sender.join()
    ours.close()
    fields = ("topic", "payload", "iccid", "mid", "dup", "epoch", "recv_ns", "too_large")
    assert [tuple(getattr(p, f) for f in fields) for p in got] == [
        tuple(getattr(p, f) for f in fields) for p in pkts
    ]
    assert all(p.source == 3 for p in got)
    assert acks == [(9, ids)]

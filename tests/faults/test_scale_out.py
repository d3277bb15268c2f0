"""Two gateways with the same `mqtt.shared_group` on one mosquitto.

What Mosquitto 2.0 does with an MQTT 5 shared subscription whose members keep persistent
sessions (the gateway's `session_expiry_s`, 7 d by default), as measured here:

- It hands each packet to one member, in turn.
- A member that is killed keeps its place in the group while its session lives: the
  packets in flight to it (sent, not acknowledged) stay with its session, and so does
  its turn of every new packet. The other member carries on with its own share only.
  When the killed member comes back, it gets all of them. Nothing is lost or doubled.
- When the session expires first, the broker drops what it held for it and sends the
  whole stream to the members left. Those held packets are lost.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

from tests.conftest import Broker, GatewayProc, wait_for
from tests.faults.support import Publisher, Tally, restart, status
from tests.receiver import Receiver

BATCH = "{ window_ms = 50, max_items = 100 }"
N = 1_000  # packets per phase


def members(
    launch: Callable[..., GatewayProc], ra: Receiver, rb: Receiver, expiry_a: int = 3600
) -> tuple[GatewayProc, GatewayProc]:
    """gw-a and gw-b in shared group `gw`, delivering to ra and rb."""
    a = launch(ra.url, batch=BATCH, name="gw-a", shared_group="gw", session_expiry_s=expiry_a)
    return a, launch(rb.url, batch=BATCH, name="gw-b", shared_group="gw")


def seqs(r: Receiver, lo: int = 0, hi: int = 1 << 30) -> set[int]:
    return {s for s in Tally.of(r).by_seq if lo <= s < hi}


def settled(count: object, what: str, at_least: int) -> int:
    """Wait until count() reaches at_least and stops growing for 0.5 s; return it."""
    wait_for(lambda: count() >= at_least, what=what)  # type: ignore[operator]
    last = -1
    while (now := count()) != last:  # type: ignore[operator]
        last = now
        time.sleep(0.5)
    return last


def test_shared_group_splits_the_stream_and_a_killed_members_share_waits_for_its_return(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, launch, record_property
) -> None:
    ra, rb = receiver, Receiver().start()
    try:
        a, b = members(launch, ra, rb)
        # 1. Both running: every packet goes to exactly one of them.
        Publisher(mosquitto.port, N, 1_000).start().join(30)
        wait_for(lambda: len(seqs(ra) | seqs(rb)) >= N, what="phase 1 delivered")
        assert not seqs(ra) & seqs(rb)
        split = [len(seqs(ra)), len(seqs(rb))]
        record_property("phase1_split", split)
        assert min(split) >= N * 0.3, split

        # 2. gw-a frozen, then killed: what the broker sent it stays unacknowledged.
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        Publisher(mosquitto.port, N, 1_000, first=N).start().join(30)
        to_b_frozen = settled(lambda: len(seqs(rb, N)), "gw-b's share of phase 2", N // 3)
        a.kill9()
        # 3. gw-a dead, its persistent session alive: the stream goes on.
        Publisher(mosquitto.port, N, 1_000, first=2 * N).start().join(30)
        to_b = settled(lambda: len(seqs(rb, N)), "gw-b's share of phase 3", to_b_frozen + N // 3)
        record_property("phase2_a_frozen_to_b", to_b_frozen)
        record_property("phase3_a_dead_to_b", to_b - to_b_frozen)
        assert seqs(ra, N) == set()

        # 4. gw-a back: it gets every packet the broker held for it, and nobody else had.
        restart(a)
        wait_for(lambda: len(seqs(ra) | seqs(rb)) >= 3 * N, what="every packet delivered")
        assert not seqs(ra) & seqs(rb)
        held = len(seqs(ra, N))
        record_property("held_for_a", held)
        assert held >= N * 0.6, "the broker gave gw-a's turns to gw-b"
        record_property("redelivered_to_a", status(a)["packets"]["redelivered"])
        a.terminate()
        b.terminate()
    finally:
        rb.stop()


def test_shared_group_a_member_whose_session_expires_loses_what_the_broker_held_for_it(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, launch, record_property
) -> None:
    ra, rb = receiver, Receiver().start()
    try:
        a, b = members(launch, ra, rb, expiry_a=1)
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGSTOP)
        Publisher(mosquitto.port, N, 1_000).start().join(30)
        settled(lambda: len(seqs(rb)), "gw-b's share", N // 3)
        a.kill9()
        time.sleep(3)  # the session expires 1 s after the disconnect
        Publisher(mosquitto.port, N, 1_000, first=N).start().join(30)
        wait_for(lambda: seqs(rb, N) == set(range(N, 2 * N)), what="all of phase 2 to gw-b")
        restart(a)
        time.sleep(2)  # room for anything the broker still had for gw-a
        lost = set(range(N)) - seqs(ra) - seqs(rb)
        record_property("held_for_a_then_lost", len(lost))
        assert seqs(ra) == set()
        assert len(lost) >= N * 0.3  # gw-a's share of phase 1, gone with its session
        a.terminate()
        b.terminate()
    finally:
        rb.stop()

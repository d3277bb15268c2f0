"""The broker goes away mid-stream: a restart (it saves its state first) and a kill -9.

Mosquitto writes its persistence file every `autosave_interval` (1 s in these tests) and
on a clean exit; the kill -9 waits for a snapshot taken after the stream began. After a kill -9 it comes back with its last snapshot, so it may have
lost what it acknowledged to publishers after that snapshot began: the broker's loss, not
the gateway's. A packet acknowledged before the snapshot was either already committed
and acknowledged by the gateway or is in the snapshot, so it must be delivered.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Broker, wait_for
from tests.faults.support import Publisher, Tally, status
from tests.receiver import Receiver

TOTAL = 3_000
RATE = 1_000
# The persistence file's mtime is when a snapshot was complete; writing it takes a few ms.
SNAPSHOT_MARGIN_S = 0.1


@pytest.mark.parametrize("how", ["restart", "kill9"])
def test_broker_restart_or_kill9_mid_stream_loses_no_packet_the_broker_kept(
    mosquitto: Broker,
    tmp_path: Path,
    receiver: Receiver,
    launch,
    record_property,
    how: str,
) -> None:
    gw = launch(receiver.url, batch="{ window_ms = 50, max_items = 100 }")
    pub = Publisher(mosquitto.port, TOTAL, RATE).start()
    wait_for(lambda: len(pub.acked) >= TOTAL // 2, what="half published")
    kept = set(range(TOTAL))  # a clean exit saves everything
    acked_at_kill: set[int] = set()
    if how == "restart":
        mosquitto.restart()
    else:
        # Kill only once a snapshot taken mid-stream is on disk: on a loaded machine the
        # first autosave can come later than the half-way mark.
        snapshot = mosquitto.workdir / "mosquitto.db"
        first_ack = pub.first_ack_at()
        wait_for(
            lambda: snapshot.exists() and snapshot.stat().st_mtime > first_ack,
            what="a broker snapshot taken mid-stream",
        )
        mosquitto.stop(kill=True)
        kept = set(pub.acked_before(snapshot.stat().st_mtime - SNAPSHOT_MARGIN_S))
        acked_at_kill = set(pub.acked)
        mosquitto.start()
    pub.join(60)
    wait_for(lambda: kept <= set(Tally.of(receiver).by_seq), timeout=60, what="every kept packet")
    # What the broker lost, the publisher did not re-send: give it a moment to show up.
    time.sleep(1.0)
    wait_for(lambda: status(gw)["packets"]["pending"] == 0, what="store emptied")
    t = Tally.of(receiver)
    stats = status(gw)["packets"]
    gw.terminate()
    lost_by_broker = sorted(acked_at_kill - set(t.by_seq))
    record_property("publisher_reconnects", pub.reconnects)
    if how == "kill9":
        record_property("acked_before_snapshot", len(kept))
        record_property("acked_before_kill", len(acked_at_kill))
        record_property("lost_by_broker", len(lost_by_broker))
    record_property("duplicates", t.duplicates)
    record_property("packets_under_two_ids", len(t.seqs_with_several_ids()))
    record_property("redelivered_by_broker", stats["redelivered"])

    assert pub.reconnects >= 1  # the publisher did see the broker go
    assert kept, "nothing to check"
    assert sorted(kept - set(t.by_seq)) == []
    # Every packet the gateway stored twice was published twice (a PUBACK lost with the
    # broker) or resent by a broker that forgot it had delivered it (kill -9).
    if how == "restart":
        twice = t.seqs_with_several_ids()
        assert all(pub.copies[s] > 1 for s in twice), twice
        assert t.missing(TOTAL) == []
    # The losses are all after the snapshot: acknowledged to the publisher, then lost.
    assert all(s not in kept for s in lost_by_broker)

"""kill -9 of the gateway at random moments while packets flow to a slow receiver.

Guarantee 1 of DESIGN.md: every packet is delivered at least once, a duplicate comes only
from a batch that was in flight at a crash, and it carries the webhook-id of its first
delivery. The moments are random; FAULTS_SEED=<n> repeats a run.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from tests.conftest import Broker, wait_for
from tests.faults.support import (
    Publisher,
    Tally,
    bodies_by_id,
    delivered_all,
    durable,
    restart,
    seeded,
    status,
)
from tests.receiver import Receiver, Reply

CONCURRENCY = 2
MAX_ITEMS = 100
# delivery.route.Route keeps at most this many batches open (persisted, not yet finished)
MAX_OPEN = max(CONCURRENCY * 4, 8)


@pytest.mark.parametrize(
    ("total", "kills", "rate"),
    [
        pytest.param(5_000, 3, 1_000, id="5k-3kills"),
        pytest.param(
            50_000, 10, 2_000, id="50k-10kills", marks=[pytest.mark.slow, pytest.mark.timeout(900)]
        ),
    ],
)
def test_kill9_at_random_moments_delivers_every_packet_and_duplicates_keep_their_webhook_id(
    mosquitto: Broker,
    tmp_path: Path,
    receiver: Receiver,
    launch,
    record_property,
    total: int,
    kills: int,
    rate: int,
) -> None:
    seed, rng = seeded(record_property)
    # A slow receiver: 2 requests at a time, 0.1 s each, so batches are always in flight.
    receiver.behaviour = lambda n, r: Reply(200, delay_s=0.1)
    gw = launch(
        receiver.url,
        batch=f"{{ window_ms = 50, max_items = {MAX_ITEMS} }}",
        concurrency=str(CONCURRENCY),
        retry=durable(0.5),
    )
    pub = Publisher(mosquitto.port, total, rate, timeout=total / rate + 60).start()
    began = time.monotonic()
    # Kills spread over the publishing time and a little after, one per slot.
    slot = max(1.5, (total / rate + 2) / kills)
    moments = [i * slot + rng.uniform(0.5, slot) for i in range(kills)]
    for at in moments:
        time.sleep(max(0.0, began + at - time.monotonic()))
        gw.kill9()
        time.sleep(rng.uniform(0, 0.3))
        restart(gw)
    pub.join(total / rate + 60)
    wait_for(
        delivered_all(total, receiver),
        timeout=60 + total / 500,
        what="every packet delivered after the kills",
    )
    wait_for(lambda: status(gw)["packets"]["pending"] == 0, what="store emptied")
    t = Tally.of(receiver)
    stats = status(gw)["packets"]
    gw.terminate()
    record_property("duplicates", t.duplicates)
    record_property("resent_batches", len(t.resent_ids))
    record_property("resends", t.resends)
    record_property("redelivered_by_broker", stats["redelivered"])
    record_property("seconds", round(time.monotonic() - began, 1))

    assert pub.reconnects == 0  # the broker never went away: each packet published once
    missing, several = t.missing(total), t.seqs_with_several_ids()
    assert missing == [], f"seed {seed}: {len(missing)} missing, first {missing[:10]}"
    assert several == {}, f"seed {seed}: {len(several)} packets sent under two webhook-ids"
    # A batch sent again is the same request: same id, same body.
    assert all(len(b) == 1 for b in bodies_by_id(receiver).values()), f"seed {seed}"
    # Duplicates only from batches open at a kill (a batch can be open at two kills).
    assert t.resends <= kills * MAX_OPEN, f"seed {seed}: {t.resends} batches sent again"
    assert t.duplicates <= t.resends * MAX_ITEMS, f"seed {seed}: {t.duplicates} duplicates"
    # The store took each packet once: a broker redelivery of a committed packet is recognised.
    assert stats["received"] == total, f"seed {seed}: {stats}"

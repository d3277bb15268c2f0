"""A receiver that answers 500, 429, 503 or nothing at all, at random.

The durable preset retries each of them with backoff, waits at least as long as a
Retry-After says (seconds or an HTTP date), resends a batch with its webhook-id and
body unchanged, and loses nothing. FAULTS_SEED=<n> repeats a run.
"""

from __future__ import annotations

import collections
import email.utils
import itertools
import time
from pathlib import Path

from tests.conftest import Broker, wait_for
from tests.faults.support import (
    Publisher,
    Tally,
    bodies_by_id,
    delivered_all,
    durable,
    seeded,
    status,
)
from tests.receiver import Receiver, Recorded, Reply

TOTAL = 2_000
RATE = 1_000
TIMEOUT_S = 1.0


def test_random_500_429_503_and_timeouts_are_retried_as_the_durable_preset_says(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, launch, record_property
) -> None:
    seed, rng = seeded(record_property)
    kinds: dict[int, str] = {}

    def behaviour(n: int, _r: Recorded) -> Reply:
        x = rng.random()
        if x < 0.2:
            kinds[n], reply = "500", Reply(500, text="boom")
        elif x < 0.3:
            kinds[n], reply = "429", Reply(429, headers={"Retry-After": "1"})
        elif x < 0.35:
            # An HTTP date 2 s ahead: whole seconds, so between 1 and 2 s from now.
            date = email.utils.formatdate(time.time() + 2, usegmt=True)
            kinds[n], reply = "503", Reply(503, headers={"Retry-After": date})
        elif x < 0.45:
            kinds[n], reply = "timeout", Reply(200, delay_s=TIMEOUT_S * 2)
        else:
            kinds[n], reply = "ok", Reply(200)
        return reply

    receiver.behaviour = behaviour
    gw = launch(
        receiver.url, batch="{ window_ms = 50, max_items = 20 }", retry=durable(0.2, TIMEOUT_S)
    )
    Publisher(mosquitto.port, TOTAL, RATE).start().join(30)
    wait_for(delivered_all(TOTAL, receiver), timeout=60, what="every packet delivered")
    wait_for(lambda: status(gw)["packets"]["pending"] == 0, what="store emptied")
    hook = status(gw)["webhooks"][0]
    gw.terminate()
    t = Tally.of(receiver)
    requests = list(receiver.requests)
    by_id: dict[str, list[tuple[Recorded, str]]] = collections.defaultdict(list)
    for n, req in enumerate(requests):
        by_id[req.webhook_id].append((req, kinds[n]))
    counts = collections.Counter(kinds.values())
    record_property("requests", dict(counts))
    record_property("batches", len(by_id))

    assert t.missing(TOTAL) == [], f"seed {seed}"
    assert hook["dead_letters"] == 0
    assert min(counts["500"], counts["429"], counts["timeout"]) > 0, counts
    # No crash here, so each packet was in exactly one batch and the only second 2xx of a
    # batch is the late answer to a request the gateway had given up on.
    assert t.seqs_with_several_ids() == {}
    assert all(len(b) == 1 for b in bodies_by_id(receiver).values())
    for wid, tries in by_id.items():
        assert [k for _, k in tries].count("ok") == 1, (wid, tries)
        assert tries[-1][1] == "ok", f"seed {seed}: batch {wid} sent again after an ok"
        for (req, kind), (nxt, _) in itertools.pairwise(tries):
            gap = nxt.at - req.at
            if kind in ("429", "503"):
                assert gap >= 0.9, f"seed {seed}: Retry-After not honoured ({kind}, {gap:.2f} s)"
            elif kind == "timeout":
                assert gap >= TIMEOUT_S * 0.9, f"seed {seed}: retried before the timeout"
    failed = counts["500"] + counts["429"] + counts["503"] + counts["timeout"]
    assert (hook["requests_ok"], hook["requests_failed"]) == (counts["ok"], failed)
    assert hook["delivered"] == TOTAL

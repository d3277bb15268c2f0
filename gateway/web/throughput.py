"""The dashboard's throughput: store counters sampled on a timer, rates from their
differences."""

from __future__ import annotations

import itertools
import math
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

from gateway import store as st

# One hour of throughput samples, and never more than this many however short the interval.
WINDOW_S = 3600.0
MAX_SAMPLES = 3600
RATE_OVER_S = 60.0


@dataclass(frozen=True, slots=True)
class Sample:
    """Store counters at one moment (monotonic seconds: a rate must not change when the
    wall clock is set)."""

    mono: float
    received: int
    delivered: int
    failed: int


def take_sample(conn: Any) -> Sample:
    """The counters the throughput chart is drawn from (two tiny queries)."""
    c = st.counters(conn)
    failed = conn.execute("SELECT COALESCE(SUM(requests_failed), 0) FROM webhook_stats")
    return Sample(
        time.monotonic(), c["packets_received"], c["packets_delivered"], failed.fetchone()[0]
    )


class Throughput:
    """A bounded ring of samples; rates come from differences between them."""

    def __init__(self, interval_s: float) -> None:
        self.interval_s = interval_s
        self.samples: deque[Sample] = deque(
            maxlen=min(math.ceil(WINDOW_S / interval_s), MAX_SAMPLES) + 1
        )

    @property
    def window_s(self) -> float:
        """How far back the samples go when the ring is full."""
        return min(WINDOW_S, MAX_SAMPLES * self.interval_s)

    def add(self, sample: Sample) -> None:
        """Append a sample, dropping the oldest beyond the window."""
        self.samples.append(sample)

    @staticmethod
    def _rates(a: Sample, b: Sample) -> tuple[float, float, float]:
        dt = max(b.mono - a.mono, 1e-6)
        return (
            max(b.delivered - a.delivered, 0) / dt,
            max(b.failed - a.failed, 0) / dt * 60,
            max(b.received - a.received, 0) / dt,
        )

    def points(self) -> list[list[float]]:
        """[t, delivered/s, failures/min, received/s] between consecutive samples.

        t is Unix time by the gateway's clock as it reads now, less the sample's age: a
        clock that was set moves the whole chart instead of folding it back on itself."""
        now, mono = time.time(), time.monotonic()
        # /api/status runs in a worker thread while the sampler appends on the event loop:
        # iterate a copy (list() copies a deque without letting another thread run).
        samples = list(self.samples)
        return [
            [round(now - (mono - b.mono), 3), *(round(x, 3) for x in self._rates(a, b))]
            for a, b in itertools.pairwise(samples)
        ]

    def rates(self) -> dict[str, float]:
        """Rates over about the last minute."""
        s = list(self.samples)
        if len(s) < 2:
            return {"received_per_s": 0.0, "delivered_per_s": 0.0, "failures_per_min": 0.0}
        newest = s[-1]
        older = next((x for x in s if newest.mono - x.mono <= RATE_OVER_S), s[-2])
        if older is newest:
            older = s[-2]
        d, f, r = self._rates(older, newest)
        return {
            "received_per_s": round(r, 3),
            "delivered_per_s": round(d, 3),
            "failures_per_min": round(f, 3),
        }

"""StoreSettings: what the store is told by the configuration, in one object."""

from __future__ import annotations

from dataclasses import dataclass

from gateway.store.pacing import DELAY_ENOUGH_PACKETS


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The store's limits and commit pacing (see Store.__init__ for what each does). The
    defaults are for tests and benchmarks; the service builds them from its config."""

    max_buffer_bytes: int = 512 << 20
    on_full: str = "backpressure"
    commit_max_packets: int = 2000
    min_free_bytes: int = 0
    commit_delay_s: float = 0.0
    commit_delay_max_packets: int = DELAY_ENOUGH_PACKETS
    commit_delay_slow_s: float = 0.0
    receive_maximum: int = 1000
    sessions: int = 1
    redelivery_window: int = 0  # 0: worked out from the others
    dead_letter_max_bytes: int = 64 << 20
    dead_letter_max_age_s: float = 30 * 86400.0

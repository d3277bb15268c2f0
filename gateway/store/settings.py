"""StoreSettings: what the store is told by the configuration, in one object."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from gateway.store.pacing import DELAY_ENOUGH_PACKETS, commit_delay_ms, commit_delay_slow_ms
from gateway.store.retention import RETENTION_CHECK_S

if TYPE_CHECKING:
    from gateway.config import Config


@dataclass(frozen=True, slots=True)
class StoreSettings:
    """The store's limits and commit pacing (see Store.__init__ for what each does). The
    defaults are for tests and benchmarks; the service builds them with from_config."""

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
    # CDRs, events, modem snapshots and reports older than this go (0: kept for ever);
    # looked at every retention_check_s (see retention.RETENTION_CHECK_S).
    retention_s: float = 35 * 86400.0
    retention_check_s: float = RETENTION_CHECK_S
    # The configured report names, whose exports keep the CDRs they have not taken.
    reports: tuple[str, ...] | None = None

    @classmethod
    def from_config(cls, cfg: Config) -> StoreSettings:
        """From the gateway, mqtt and webhooks sections; "auto" commit delays follow the
        packet webhooks' batching windows (see pacing.commit_delay_ms)."""
        g = cfg.gateway
        return cls(
            max_buffer_bytes=int(g.max_buffer_mb * 1024 * 1024),
            on_full=g.on_full,
            commit_max_packets=g.commit_max_packets,
            min_free_bytes=int(g.min_free_mb * 1024 * 1024),
            commit_delay_s=commit_delay_ms(g, cfg.webhooks) / 1000,
            # The broker sends at most receive_maximum packets ahead of their PUBACKs.
            commit_delay_max_packets=max(1, cfg.mqtt.receive_maximum // 2),
            commit_delay_slow_s=commit_delay_slow_ms(g, cfg.webhooks) / 1000,
            receive_maximum=cfg.mqtt.receive_maximum,
            sessions=cfg.mqtt.ingest_processes,
            dead_letter_max_bytes=int(g.dead_letter_max_mb * 1024 * 1024),
            dead_letter_max_age_s=g.dead_letter_max_age,
            retention_s=g.retention_days * 86400.0,
            reports=tuple(r.name for r in cfg.reports),
        )

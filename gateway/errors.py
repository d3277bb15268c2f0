"""The gateway's exception hierarchy: one base class, converted at the boundary."""

from __future__ import annotations


class GatewayError(Exception):
    """Base class of every error the gateway raises on purpose."""


class ConfigError(GatewayError):
    """The configuration file is missing, unreadable or invalid."""

    def __init__(self, problems: list[str], source: str = "") -> None:
        self.problems = problems
        self.source = source
        head = f"{source}: " if source else ""
        super().__init__(head + "; ".join(problems))


class StoreError(GatewayError):
    """The SQLite store cannot be opened, migrated or written."""


class StoreFullError(StoreError):
    """The store reached max_buffer_mb and the policy is backpressure."""


class ModemError(GatewayError):
    """The modem did not answer as expected."""


class DeliveryError(GatewayError):
    """A webhook request failed."""

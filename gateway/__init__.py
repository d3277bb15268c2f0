"""edge-gateway: durable MQTT ingest, webhook delivery and cellular usage CDRs."""

from __future__ import annotations

__version__ = "0.1.0"

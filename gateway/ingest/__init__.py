"""MQTT ingest: packets from the broker into the store, each PUBACK after its commit.

`client` is the paho client and its fast paths, `session` one MQTT session feeding the
store, `wire`, `process` and `pool` the ingest processes of `mqtt.ingest_processes`,
and `running` the asyncio side that starts whichever the config asks for.
"""

from __future__ import annotations

from gateway.ingest.running import Taker, running
from gateway.ingest.session import Ingest, IngestStats

__all__ = ["Ingest", "IngestStats", "Taker", "running"]

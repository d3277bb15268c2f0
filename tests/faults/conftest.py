"""Fixtures of the fault suite."""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import Broker, GatewayProc
from tests.faults.support import start_gateway


@pytest.fixture
def launch(
    gateway_proc: Callable[..., GatewayProc], tmp_path: Path, mosquitto: Broker
) -> Callable[..., GatewayProc]:
    """launch(url, name=..., **webhook_fields): a gateway on the test's broker, connected."""
    return functools.partial(start_gateway, gateway_proc, tmp_path, mosquitto.port)

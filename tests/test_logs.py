"""Log lines for journald: one line per event, json on request, secrets masked, repeats limited."""

from __future__ import annotations

import io
import json
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import config, logs


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def record(msg: str, level: int = logging.ERROR, name: str = "gateway.store", **extra: object):
    rec = logging.LogRecord(name, level, __file__, 1, msg, (), None)
    rec.__dict__.update(extra)
    return rec


def test_identical_errors_pass_once_then_once_a_minute_with_the_count() -> None:
    clock = Clock()
    f = logs.RepeatFilter(60, clock=clock)
    assert f.filter(record("disk full"))
    passed = 0
    for _ in range(500):
        clock.now += 0.1
        passed += f.filter(record("disk full"))
    assert passed == 0
    clock.now += 10.1  # 60.1 s after the first
    again = record("disk full")
    assert f.filter(again)
    assert again.__dict__["repeated"] == 500


def test_flush_reports_the_count_of_a_line_that_stopped_repeating() -> None:
    clock = Clock()
    f = logs.RepeatFilter(60, clock=clock)
    f.filter(record("broker down"))
    for _ in range(7):
        f.filter(record("broker down"))
    assert f.flush() == []  # the minute is not over
    clock.now += 61
    (summary,) = f.flush()
    assert summary.getMessage() == "broker down"
    assert summary.__dict__["repeated"] == 7
    assert f.flush() == []
    assert f.filter(record("broker down"))  # a new first occurrence


def test_info_lines_and_different_errors_are_never_held_back() -> None:
    f = logs.RepeatFilter(60, clock=Clock())
    assert all(f.filter(record("delivered", logging.INFO)) for _ in range(5))
    assert f.filter(record("error a"))
    assert f.filter(record("error b"))
    assert f.filter(record("error a", name="gateway.ingest"))


def test_json_lines_carry_level_component_message_fields_and_a_one_line_traceback() -> None:
    secrets = logs.Secrets()
    fmt = logs.JsonFormatter(secrets)
    try:
        raise ValueError("bad\nvalue")
    except ValueError:
        exc_info = sys.exc_info()
    rec = logging.LogRecord(
        "gateway.delivery", logging.WARNING, __file__, 1, "x %s", ("y",), exc_info
    )
    rec.__dict__["webhook"] = "cloud"
    line = fmt.format(rec)
    assert "\n" not in line
    doc = json.loads(line)
    assert doc["level"] == "warning"
    assert doc["component"] == "delivery"
    assert doc["msg"] == "x y"
    assert doc["webhook"] == "cloud"
    assert doc["ts"].endswith("Z")
    assert "ValueError: bad\nvalue" in doc["exc"]


def test_text_lines_are_single_lines_with_key_value_fields() -> None:
    fmt = logs.TextFormatter(logs.Secrets())
    line = fmt.format(record("two\nlines", logging.WARNING, reason="disk full", n=3))
    assert "\n" not in line
    assert line.split(" ", 1)[1].startswith("WARNING store: two\\nlines")
    assert line.endswith(' reason="disk full" n=3')


def test_under_journald_lines_start_with_the_syslog_priority_and_no_time(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    with (tmp_path / "stream").open("w") as stream, (tmp_path / "other").open("w") as other:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", f"{st.st_dev}:{st.st_ino}")
        assert logs.under_journald(stream)
        assert not logs.under_journald(other)
    fmt = logs.TextFormatter(logs.Secrets(), journald=True)
    assert fmt.format(record("disk full")) == "<3>ERROR store: disk full"
    assert fmt.format(record("ok", logging.INFO)).startswith("<6>INFO store: ok")


def test_secret_config_values_are_masked_in_every_line() -> None:
    cfg = config.parse(
        {
            "mqtt": {"host": "h", "username": "u", "password": "mqtt-pass-123"},
            "webhooks": [
                {
                    "name": "a",
                    "url": "https://user:url-pass-456@example.com/x",
                    "auth": {"type": "bearer", "token": "tok-789"},
                    "signing": {"scheme": "standard-webhooks", "secret": "whsec_one whsec_two"},
                }
            ],
        },
        env={},
    )
    found = logs.secret_values(cfg)
    assert {"mqtt-pass-123", "url-pass-456", "tok-789", "whsec_one", "whsec_two"} <= found
    secrets = logs.Secrets()
    secrets.add(found)
    for fmt in (logs.TextFormatter(secrets), logs.JsonFormatter(secrets)):
        line = fmt.format(record("connect with mqtt-pass-123 to url-pass-456, tok-789 whsec_two"))
        for value in found:
            assert value not in line
        assert "***" in line


@pytest.fixture
def root_logger() -> Iterator[logging.Logger]:
    """The root logger, with handlers and level put back after the test."""
    root = logging.getLogger()
    before_handlers, before_level = list(root.handlers), root.level
    yield root
    for h in list(root.handlers):
        if h not in before_handlers:
            root.removeHandler(h)
    root.setLevel(before_level)
    logs._state.handler = None


def test_setup_installs_one_handler_and_a_cli_level_survives_a_config_reload(
    root_logger: logging.Logger,
) -> None:
    stream = io.StringIO()
    handler = logs.setup("warning", "json", level_fixed=True, stream=stream)
    logs.setup("warning", "json", level_fixed=True, stream=stream)
    assert handler not in root_logger.handlers  # replaced, not stacked
    logs.apply_config_level("debug")
    assert root_logger.level == logging.WARNING
    logs.setup("info", "text", stream=stream)
    logs.apply_config_level("error")
    assert root_logger.level == logging.ERROR


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_rate_limited_lines_reach_the_stream_once(fmt: str, root_logger: logging.Logger) -> None:
    stream = io.StringIO()
    logs.setup("info", fmt, stream=stream)
    log = logging.getLogger("gateway.test")
    for _ in range(50):
        log.error("store write failed: disk full")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    assert "store write failed" in lines[0]

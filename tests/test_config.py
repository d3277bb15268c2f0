"""Config: every mistake names its key, all at once, exit code 2; secrets never shown."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as hs

from gateway import config
from gateway.cli import main
from gateway.errors import ConfigError
from gateway.store.pacing import commit_delay_ms, commit_delay_slow_ms
from tests.conftest import ROOT, gateway_cmd

GOOD = """
[mqtt]
host = "127.0.0.1"
password = "${MQTT_PASSWORD}"

[[webhooks]]
name = "cloud"
url = "https://example.com/ingest"
auth = { type = "basic", username = "u", password = "${HOOK_PASSWORD}" }
signing = { scheme = "cdr-manager", secret = "file:secret.txt" }
"""


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "gw.toml"
    p.write_text(text)
    return p


def problems(text: str, env: dict[str, str] | None = None) -> list[str]:
    import tomllib

    with pytest.raises(ConfigError) as info:
        config.parse(tomllib.loads(text), env or {})
    return info.value.problems


BAD_CASES = [
    ('[mqtt]\nhost = "h"\nport = 0\n', "mqtt.port: must be 1-65535, got 0"),
    ('[mqtt]\nhost = "h"\nport = "1883"\n', "mqtt.port: must be an integer, got '1883'"),
    ('[mqtt]\nhost = "h"\nprot = 1883\n', "mqtt.prot: unknown key (did you mean 'port'?)"),
    ("[mqtt]\nport = 1883\n", "mqtt.host: is required"),
    ('[gateway]\nstate_dir = "/tmp"\n', "mqtt: section is required"),
    (
        '[mqtt]\nhost = "h"\npassword = "${NOPE}"\n',
        "mqtt.password: environment variable NOPE is not set",
    ),
    (
        '[mqtt]\nhost = "h"\niccid_from_topic = "devices/{imei}/up"\n',
        "mqtt.iccid_from_topic: unknown placeholder '{imei}'",
    ),
    (
        '[mqtt]\nhost = "h"\n[gateway]\non_full = "explode"\n',
        "gateway.on_full: must be one of 'backpressure', 'drop_oldest', got 'explode'",
    ),
    (
        '[mqtt]\nhost = "h"\n[[webhooks]]\nname = "a"\nurl = "ftp://x"\n',
        "webhooks[0].url: must be an http:// or https:// URL, got 'ftp://x'",
    ),
    (
        '[mqtt]\nhost = "h"\n[[webhooks]]\nname = "a"\nurl = "https://x"\nformat = "monogoto"\n',
        "webhooks[0].format: source 'packets' takes format 'monoz' or 'envelope' or 'flat'",
    ),
    (
        '[mqtt]\nhost = "h"\n[[webhooks]]\nname = "a"\nurl = "https://x"\nbatch = { max_items = 0 }\n',
        "webhooks[0].batch.max_items: must be 1-10000, got 0",
    ),
    (
        '[mqtt]\nhost = "h"\n[[webhooks]]\nname = "a"\nurl = "https://x"\nauth = { type = "basic" }\n',
        "webhooks[0].auth.username: is required for auth type 'basic'",
    ),
    (
        '[mqtt]\nhost = "h"\n[[webhooks]]\nname = "a"\nurl = "https://x"\n'
        'when = [{ field = "size", op = "~", value = 1 }]\n',
        "webhooks[0].when[0].op: must be one of",
    ),
    (
        '[mqtt]\nhost = "h"\n[[webhooks]]\nname = "a"\nurl = "https://x"\nretry = { preset = "x" }\n',
        "webhooks[0].retry.preset: must be 'monoz' or 'durable', got 'x'",
    ),
    (
        '[mqtt]\nhost = "h"\n[[webhooks]]\nname = "a"\nurl = "https://x"\nsigning = { scheme = "standard-webhooks", secret = "abc" }\n',
        "webhooks[0].signing.secret: each secret must start with 'whsec_'",
    ),
    (
        '[mqtt]\nhost = "h"\n[web]\nlisten = "0.0.0.0:8080"\n',
        "web.token: is required when web.listen is not loopback",
    ),
    ('[mqtt]\nhost = "h"\n[cdr]\ninterval_s = "soon"\n', "cdr.interval_s: must be a duration"),
    (
        '[mqtt]\nhost = "h"\ningest_processes = 2\n',
        "mqtt.ingest_processes: more than 1 needs mqtt.shared_group",
    ),
    ('[mqtt]\nhost = "h"\ningest_processes = 0\n', "mqtt.ingest_processes: must be 1-16, got 0"),
    (
        '[mqtt]\nhost = "h"\n[gateway]\ncommit_delay_ms = "soon"\n',
        'gateway.commit_delay_ms: must be a number or "auto"',
    ),
    (
        '[mqtt]\nhost = "h"\n[gateway]\ncommit_delay_ms = 5000\n',
        'gateway.commit_delay_ms: must be at most 1000 or "auto"',
    ),
    (
        '[mqtt]\nhost = "h"\n[modme]\nport = "/dev/ttyUSB2"\n',
        "modme: unknown key (did you mean 'modem'?)",
    ),
    (
        '[mqtt]\nhost = "h"\n[modem]\n[modem.recovery]\nunregistered_s = 0\n',
        "modem.recovery.unregistered_s: must be greater than 0, got 0",
    ),
    (
        '[mqtt]\nhost = "h"\n[modem]\n[modem.recovery]\nmax_resets_per_hour = 100\n',
        "modem.recovery.max_resets_per_hour: must be 0-60, got 100",
    ),
    (
        '[mqtt]\nhost = "h"\n[modem]\n[modem.recovery]\nmax_reset_per_hour = 1\n',
        "modem.recovery.max_reset_per_hour: unknown key (did you mean 'max_resets_per_hour'?)",
    ),
    (
        '[mqtt]\nhost = "h"\n[modem]\nrecovery = true\n',
        "modem.recovery: must be a table, got True",
    ),
    (
        '[mqtt]\nhost = "h"\n[modem]\n[modem.recovery]\npower_cycle_command = "uhubctl \'-a"\n',
        "modem.recovery.power_cycle_command: is not a valid command line (No closing quotation)",
    ),
    (
        '[mqtt]\nhost = "h"\n[modem]\n[modem.recovery]\n'
        'power_cycle_command = "uhubctl -a cycle > /tmp/log"\n',
        "modem.recovery.power_cycle_command: runs without a shell",
    ),
]


@pytest.mark.parametrize(("text", "expected"), BAD_CASES)
def test_a_bad_config_names_the_key_and_what_is_wrong(text: str, expected: str) -> None:
    found = problems(text)
    assert any(expected in p for p in found), found


def test_all_mistakes_are_reported_at_once() -> None:
    found = problems('[mqtt]\nhost = "h"\nport = 0\nqos = 7\n[gateway]\non_full = "x"\n')
    assert len(found) == 3
    assert {p.split(":")[0] for p in found} == {"mqtt.port", "mqtt.qos", "gateway.on_full"}


def test_check_config_exits_2_and_prints_one_line_per_problem(tmp_path: Path) -> None:
    cfg = write(tmp_path, '[mqtt]\nhost = "h"\nport = 0\nprot = 1\n')
    r = subprocess.run(
        gateway_cmd("check-config", "-c", str(cfg)), capture_output=True, text=True, cwd=ROOT
    )
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 2
    assert "mqtt.port: must be 1-65535, got 0" in lines[0] + lines[1]
    assert "Traceback" not in r.stderr


def test_missing_file_and_invalid_toml_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["check-config", "-c", str(tmp_path / "nope.toml")]) == 2
    assert "cannot read config file" in capsys.readouterr().err
    assert main(["check-config", "-c", str(write(tmp_path, "[mqtt\n"))]) == 2
    assert "invalid TOML" in capsys.readouterr().err


def test_secrets_resolve_from_env_and_files_and_are_masked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "secret.txt").write_text("s3cr3t-signing\n")
    monkeypatch.setenv("MQTT_PASSWORD", "mqtt-pw-value")
    monkeypatch.setenv("HOOK_PASSWORD", "hook-pw-value")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    cfg = config.load(write(tmp_path, GOOD))
    assert cfg.mqtt.password == "mqtt-pw-value"
    assert cfg.webhooks[0].auth.password == "hook-pw-value"
    assert cfg.webhooks[0].signing.secret == "s3cr3t-signing"
    assert main(["check-config", "-c", str(tmp_path / "gw.toml")]) == 0
    out = capsys.readouterr().out
    for secret in ("mqtt-pw-value", "hook-pw-value", "s3cr3t-signing"):
        assert secret not in out
    shown = json.loads(out)
    assert shown["webhooks"][0]["auth"]["password"] == "***"
    assert shown["mqtt"]["host"] == "127.0.0.1"


def test_defaults_follow_the_design() -> None:
    cfg = config.parse({"mqtt": {"host": "h"}, "webhooks": [{"name": "a", "url": "https://x"}]}, {})
    w = cfg.webhooks[0]
    assert (w.source, w.format, w.id_field) == ("packets", "monoz", "ICCID")
    assert (w.batch.window_ms, w.batch.max_items) == (1000, 10)
    assert w.retry.preset == "durable"
    assert (w.retry.backoff_min_s, w.retry.backoff_max_s) == (1.0, 300.0)
    assert w.retry.max_age_s == 7 * 86400
    assert cfg.modem is None  # no [modem]: no poller
    assert cfg.mqtt.qos == 1
    assert cfg.mqtt.subscriptions() == ["devices/+/up"]
    monoz = (
        config.parse(
            {
                "mqtt": {"host": "h"},
                "webhooks": [{"name": "a", "url": "https://x", "retry": {"preset": "monoz"}}],
            },
            {},
        )
        .webhooks[0]
        .retry
    )
    assert (monoz.timeout_s, monoz.max_attempts, monoz.retry_on_status) == (90.0, 3, ())


@pytest.mark.parametrize(
    ("gateway", "hooks", "expected", "slow"),
    [
        ({}, [{}], 200.0, 500.0),  # monoZ's 1 s window: a fifth of it, a trickle half
        ({"commit_delay_ms": "auto"}, [{"batch": {"window_ms": 50}}], 10.0, 25.0),
        ({}, [{}, {"batch": {"window_ms": 0}}], 0.0, 0.0),  # one webhook sends at once
        ({}, [{"batch": {"window_ms": 60_000}}], 200.0, 500.0),  # at most 200 and 500 ms
        ({}, [{"source": "cdrs", "format": "monogoto", "batch": {"window_ms": 0}}], 200.0, 500.0),
        ({}, [], 200.0, 500.0),
        ({"commit_delay_ms": 0}, [{}], 0.0, 0.0),  # as set, and never stretched
        ({"commit_delay_ms": 250}, [{"batch": {"window_ms": 0}}], 250.0, 250.0),
    ],
)
def test_commit_delay_auto_is_a_fifth_of_the_shortest_packet_window(
    gateway: dict[str, Any], hooks: list[dict[str, Any]], expected: float, slow: float
) -> None:
    raw = {
        "mqtt": {"host": "h"},
        "gateway": gateway,
        "webhooks": [{"name": f"w{i}", "url": "https://x", **h} for i, h in enumerate(hooks)],
    }
    cfg = config.parse(raw, {})
    assert commit_delay_ms(cfg.gateway, cfg.webhooks) == expected
    # How long a trickle of packets (fewer than store.TRICKLE_PACKETS) waits in all.
    assert commit_delay_slow_ms(cfg.gateway, cfg.webhooks) == slow


def test_shared_group_prefixes_every_topic() -> None:
    cfg = config.parse({"mqtt": {"host": "h", "shared_group": "gw", "topics": ["a/+", "b/#"]}}, {})
    assert cfg.mqtt.subscriptions() == ["$share/gw/a/+", "$share/gw/b/#"]


def test_shipped_configs_are_valid(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # gateway.example.toml reads its MQTT password from systemd's credentials directory.
    (tmp_path / "mqtt-password").write_text("x")
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))
    for path in sorted((ROOT / "config").glob("*.toml")):
        raw_env = {"MQTT_PASSWORD": "x", "CLOUD_PASSWORD": "x", "WEBHOOK_SECRET": "x"}
        for k, v in raw_env.items():
            monkeypatch.setenv(k, v)
        config.load(path)


toml_scalars = hs.one_of(
    hs.integers(-(2**63), 2**63 - 1),
    hs.booleans(),
    hs.text(max_size=20),
    hs.floats(allow_nan=False, allow_infinity=False),
)
toml_values: Any = hs.recursive(
    toml_scalars,
    lambda inner: (
        hs.lists(inner, max_size=3) | hs.dictionaries(hs.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
known_keys = hs.sampled_from(
    [
        "mqtt",
        "gateway",
        "webhooks",
        "modem",
        "cdr",
        "web",
        "reports",
        "host",
        "port",
        "url",
        "name",
        "batch",
        "when",
        "auth",
        "retry",
    ]
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.dictionaries(known_keys | hs.text(max_size=6), toml_values, max_size=6))
def test_random_config_never_raises_anything_but_config_error(doc: dict[str, Any]) -> None:
    try:
        config.parse(doc, {})
    except ConfigError as exc:
        assert exc.problems
        assert all(isinstance(p, str) and p for p in exc.problems)


webhook_keys = hs.sampled_from(
    [
        "name",
        "url",
        "source",
        "format",
        "id_field",
        "iccid_as",
        "batch",
        "auth",
        "headers",
        "signing",
        "retry",
        "when",
        "meta",
        "gzip",
        "concurrency",
        "timeout_s",
        "ca_file",
    ]
)
sub_keys = hs.sampled_from(
    [
        "type",
        "username",
        "password",
        "token",
        "key",
        "header",
        "scheme",
        "secret",
        "preset",
        "timeout_s",
        "max_attempts",
        "retry_on_status",
        "window_ms",
        "max_items",
        "field",
        "op",
        "value",
        "backoff_min_s",
    ]
)
sub_values: Any = hs.one_of(
    toml_values,
    hs.dictionaries(sub_keys, toml_values, max_size=4),
    hs.lists(hs.dictionaries(sub_keys, toml_values, max_size=3), max_size=2),
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(hs.lists(hs.dictionaries(webhook_keys, sub_values, max_size=8), min_size=1, max_size=2))
def test_random_webhook_tables_never_raise_anything_but_config_error(hooks: list[Any]) -> None:
    try:
        config.parse({"mqtt": {"host": "h"}, "webhooks": hooks}, {})
    except ConfigError as exc:
        assert exc.problems


def test_modem_recovery_is_on_with_defaults_whenever_modem_is_set() -> None:
    cfg = config.parse({"mqtt": {"host": "h"}, "modem": {}}, {})
    assert cfg.modem is not None
    rec = cfg.modem.recovery
    assert (rec.enabled, rec.unregistered_s, rec.unresponsive_s, rec.max_resets_per_hour) == (
        True,
        300.0,
        120.0,
        2,
    )
    assert rec.power_cycle_command == ""
    cfg = config.parse(
        {
            "mqtt": {"host": "h"},
            "modem": {
                "port": "/dev/gateway-modem",
                "recovery": {
                    "enabled": False,
                    "power_cycle_command": "sh -c 'uhubctl -a cycle > /run/x'",
                },
            },
        },
        {},
    )
    assert cfg.modem is not None
    assert cfg.modem.port == "/dev/gateway-modem"
    assert not cfg.modem.recovery.enabled

"""Secrets stay secret and store files stay private: check-config, log lines and dead-letter
listings show *** for every kind of secret; a world-readable config with inline secrets is
named with the chmod that fixes it; credentials bound for the network in clear are warned
about; the store's files are the service user's alone, and CLI commands that write the
store run as that user only."""

from __future__ import annotations

import json
import logging
import os
import shutil
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway import config, logs
from gateway.store import Incoming, Store
from tests.conftest import (
    Broker,
    gateway_cmd,
    publish,
    wait_for,
    write_config,
)
from tests.receiver import Receiver, Reply

ICCID = "8981100000000000012"
TOPIC = f"devices/{ICCID}/up"
NOBODY = 65534

# Each a secret of its own kind; none may show in check-config's output.
SECRETS = {
    "mqtt password": "mqtt-inline-pass-1",
    "Authorization header": "hdr-bearer-token-2",
    "X-Api-Key header": "hdr-api-key-3",
    "Cookie header": "cookie-session-4",
    "URL userinfo": "url-user-pass-5",
    "URL query": "query-code-6",
    "meta key": "meta-api-key-7",
    "nested meta key": "nested-client-secret-8",
    "secret list": "listed-token-9",
}
SECRETS_TOML = f"""
[gateway]
state_dir = "/tmp/never-made"

[mqtt]
host = "127.0.0.1"
username = "gw"
password = "{SECRETS["mqtt password"]}"

[web]
enabled = false

[[webhooks]]
name = "crm"
url = "https://gw:{SECRETS["URL userinfo"]}@hooks.example.com/in?code={SECRETS["URL query"]}&v=2"

[webhooks.headers]
Authorization = "Bearer {SECRETS["Authorization header"]}"
X-Api-Key = "{SECRETS["X-Api-Key header"]}"
Cookie = "sid={SECRETS["Cookie header"]}"
X-Trace = "visible-trace"

[webhooks.meta]
customer = "acme"
apiKey = "{SECRETS["meta key"]}"
nested = {{ client_secret = "{SECRETS["nested meta key"]}", region = "eu" }}
tokens = ["{SECRETS["secret list"]}"]
"""


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(gateway_cmd(*args), capture_output=True, text=True, timeout=60, env=env)


def write_mode(path: Path, text: str, mode: int) -> Path:
    path.write_text(text)
    path.chmod(mode)
    return path


def mode_of(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


# -- masking --------------------------------------------------------------------------


def test_check_config_shows_every_kind_of_secret_as_stars(tmp_path: Path) -> None:
    cfg = write_mode(tmp_path / "gw.toml", SECRETS_TOML, 0o600)
    done = cli("check-config", "-c", str(cfg))
    assert done.returncode == 0, done.stderr
    for kind, value in SECRETS.items():
        assert value not in done.stdout + done.stderr, kind
    shown = json.loads(done.stdout)
    hook = shown["webhooks"][0]
    assert hook["url"] == "https://***@hooks.example.com/in?code=***&v=***"
    assert hook["headers"] == {
        "Authorization": "***",
        "X-Api-Key": "***",
        "Cookie": "***",
        "X-Trace": "visible-trace",
    }
    assert hook["meta"] == {
        "customer": "acme",
        "apiKey": "***",
        "nested": {"client_secret": "***", "region": "eu"},
        "tokens": ["***"],
    }
    assert shown["mqtt"]["password"] == "***"
    assert shown["mqtt"]["username"] == "gw"


def test_a_config_error_quoting_a_secret_or_a_url_shows_stars(tmp_path: Path) -> None:
    cfg = write_mode(
        tmp_path / "gw.toml",
        SECRETS_TOML.replace(
            'X-Trace = "visible-trace"', 'X-Trace = "visible-trace"\nX-Auth-Token = 1234567'
        )
        + '\n[[reports]]\nname = "r"\nwebhook = "https://x.example/?token=report-query-10"\n',
        0o600,
    )
    done = cli("check-config", "-c", str(cfg))
    assert done.returncode == 2
    assert "headers.X-Auth-Token" in done.stderr
    assert "1234567" not in done.stderr
    assert "report-query-10" not in done.stderr
    assert "token=***" in done.stderr


def test_log_lines_mask_header_meta_and_query_secrets() -> None:
    cfg = config.parse(
        {
            "mqtt": {"host": "h"},
            "webhooks": [
                {
                    "name": "a",
                    "url": "https://example.com/x?code=azure-function-code-1",
                    "headers": {"Authorization": "Bearer hdr-token-22", "X-Trace": "t-1"},
                    "meta": {"deep": {"signing_key": "meta-key-333"}},
                }
            ],
        },
        env={},
    )
    found = logs.secret_values(cfg)
    assert {"azure-function-code-1", "hdr-token-22", "meta-key-333"} <= found
    assert "Bearer" not in found
    secrets = logs.Secrets()
    secrets.add(found)
    record = logging.LogRecord("gateway.delivery", logging.WARNING, "", 0, "", (), None)
    record.msg = (
        "POST https://u:p4ss@other.example/y?sig=short failed; sent hdr-token-22,"
        " code azure-function-code-1, meta-key-333"
    )
    for fmt in (logs.TextFormatter(secrets), logs.JsonFormatter(secrets)):
        line = fmt.format(record)
        for value in ("azure-function-code-1", "hdr-token-22", "meta-key-333", "p4ss", "short"):
            assert value not in line
        assert "https://***@other.example/y?sig=***" in line


def test_dead_letter_listing_and_log_mask_the_webhook_url_a_reply_quotes(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    """A receiver that rejects a batch and quotes the URL it was called at (query token
    and all): `gateway dlq list` and the gateway's log show the token as ***."""
    token = "func-code-quoted-77"
    rx = Receiver().start()
    try:
        rx.behaviour = lambda n, r: Reply(
            400, text=f"no function at https://127.0.0.1:{rx.port}{r.path}?code={token}"
        )
        cfg = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            extra=f"""
[[webhooks]]
name = "fn"
url = "{rx.url}?code={token}"
batch = {{ window_ms = 0, max_items = 1 }}
retry = {{ preset = "durable", max_attempts = 1 }}
headers = {{ Authorization = "Bearer hdr-bearer-88" }}
""",
        )
        gw = gateway_proc(cfg)
        gw.start()
        wait_for(lambda: "subscribed to" in gw.log(), what="gateway to subscribe")
        publish(mosquitto.port, [(TOPIC, b'{"t": 1}')])

        def letters() -> list[dict[str, object]]:
            done = cli("dlq", "list", "--json", "-c", str(cfg))
            return list(json.loads(done.stdout)) if done.returncode == 0 else []

        rows = wait_for(letters, what="the rejected batch's dead letter")
        assert isinstance(rows, list)
        excerpt = str(rows[0]["excerpt"])
        assert token not in excerpt
        assert "/hook?code=***" in excerpt
        text = cli("dlq", "list", "-c", str(cfg)).stdout
        assert token not in text
        status = json.loads(cli("status", "--json", "-c", str(cfg)).stdout)
        last_error = status["webhooks"][0]["last_error"]
        assert "HTTP 400" in last_error
        assert token not in last_error
        assert rx.requests[0].headers["authorization"] == "Bearer hdr-bearer-88"
    finally:
        rx.stop()
    wait_for(lambda: "dead-lettered" in gw.log(), what="the dead letter's log line")
    assert token not in gw.log()
    assert "hdr-bearer-88" not in gw.log()


# -- the config file's mode -------------------------------------------------------------


def test_a_world_readable_config_with_inline_secrets_gets_the_chmod_to_run(
    tmp_path: Path,
) -> None:
    cfg = write_mode(tmp_path / "gw.toml", SECRETS_TOML, 0o644)
    done = cli("check-config", "-c", str(cfg))
    assert done.returncode == 0
    assert f"run chmod 0640 {cfg}" in done.stderr
    assert "mqtt.password" in done.stderr
    assert SECRETS["mqtt password"] not in done.stderr
    json.loads(done.stdout)  # the warning goes to stderr: stdout stays the config

    cfg.chmod(0o640)
    assert "chmod" not in cli("check-config", "-c", str(cfg)).stderr

    # Secrets from the environment or files are not in the file: no warning at 0644.
    env_only = write_mode(
        tmp_path / "env.toml",
        '[mqtt]\nhost = "127.0.0.1"\npassword = "${MQTT_PASSWORD}"\n[web]\nenabled = false\n',
        0o644,
    )
    done = cli("check-config", "-c", str(env_only), env={**os.environ, "MQTT_PASSWORD": "pw"})
    assert done.returncode == 0, done.stderr
    assert "chmod" not in done.stderr


def test_gateway_run_logs_the_chmod_for_a_world_readable_config(
    mosquitto: Broker, tmp_path: Path, gateway_proc
) -> None:
    cfg = write_config(
        tmp_path / "gw.toml",
        mosquitto.port,
        tmp_path / "state",
        web='enabled = false\ntoken = "inline-web-token-1234"',
    )
    cfg.chmod(0o644)
    gw = gateway_proc(cfg)
    gw.start()
    wait_for(lambda: "subscribed to" in gw.log(), what="gateway to subscribe")
    line = next(x for x in gw.log().splitlines() if "chmod" in x)
    assert "WARNING" in line
    assert f"run chmod 0640 {cfg}" in line
    assert "web.token" in line
    assert "inline-web-token-1234" not in gw.log()


# -- transport --------------------------------------------------------------------------


def test_credentials_in_clear_to_another_host_are_warned_about(tmp_path: Path) -> None:
    """Only check-config: nothing here connects anywhere."""
    cfg = write_mode(
        tmp_path / "gw.toml",
        """
[mqtt]
host = "broker.example"
username = "gw"
password = "${MQTT_PASSWORD}"

[web]
enabled = false

[[webhooks]]
name = "plain"
url = "http://crm.example/in"
auth = { type = "bearer", token = "${TOKEN}" }

[[webhooks]]
name = "signed"
url = "http://crm.example/signed"
signing = { scheme = "cdr-manager", secret = "${TOKEN}" }

[[webhooks]]
name = "local"
url = "http://127.0.0.1:9000/in"
auth = { type = "bearer", token = "${TOKEN}" }

[[webhooks]]
name = "open"
url = "http://crm.example/open"
""",
        0o600,
    )
    env = {**os.environ, "MQTT_PASSWORD": "pw", "TOKEN": "tok"}
    done = cli("check-config", "-c", str(cfg), env=env)
    assert done.returncode == 0, done.stderr
    warnings = [x for x in done.stderr.splitlines() if x.startswith("gateway: warning:")]
    assert len(warnings) == 3, done.stderr
    assert "mqtt.password is sent in clear to broker.example:1883" in warnings[0]
    assert "webhooks[0].url: auth 'bearer' over plain http:// to crm.example" in warnings[1]
    assert "webhooks[1].url: signing 'cdr-manager' over plain http://" in warnings[2]

    # TLS, or a broker on this machine: nothing to say.
    tls = cfg.read_text().replace('host = "broker.example"', 'host = "broker.example"\ntls = true')
    local = cfg.read_text().replace('host = "broker.example"', 'host = "localhost"')
    for text in (tls, local):
        cfg.write_text(text)
        done = cli("check-config", "-c", str(cfg), env=env)
        assert done.returncode == 0, done.stderr
        assert "mqtt.password" not in done.stderr


@pytest.mark.parametrize("key", ["ca_file", "cert_file", "key_file"])
def test_tls_files_without_tls_are_an_error_naming_the_key(tmp_path: Path, key: str) -> None:
    pem = tmp_path / "file.pem"
    pem.write_text("-----BEGIN CERTIFICATE-----\n")
    cfg = write_mode(
        tmp_path / "gw.toml",
        f'[mqtt]\nhost = "127.0.0.1"\n{key} = "{pem}"\n[web]\nenabled = false\n',
        0o600,
    )
    done = cli("check-config", "-c", str(cfg))
    assert done.returncode == 2
    assert f"mqtt.{key}: is set but mqtt.tls is not true" in done.stderr
    cfg.write_text(cfg.read_text().replace("[mqtt]\n", "[mqtt]\ntls = true\n"))
    assert cli("check-config", "-c", str(cfg)).returncode == 0


# -- store files ----------------------------------------------------------------------


@pytest.fixture
def umask_022() -> Iterator[None]:
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


def report_config(path: Path, state: Path, mode: int) -> Path:
    """A config with the store in `state` and one report, written with `mode`."""
    return write_mode(
        path,
        f"""
[gateway]
state_dir = "{state}"
[mqtt]
host = "127.0.0.1"
[web]
enabled = false
[[reports]]
name = "daily"
every = "24h"
""",
        mode,
    )


def test_store_and_report_files_are_private_under_umask_022(
    tmp_path: Path, umask_022: None
) -> None:
    state = tmp_path / "deep" / "state"
    with Store.open(state) as store:
        store.submit_packet(Incoming(TOPIC, b"{}", ICCID, 1, False, 1))
        store.flush()
        db = state / "gateway.db"
        for name in ("gateway.db", "gateway.db-wal", "gateway.db-shm"):
            assert mode_of(state / name) == 0o600, name
    assert mode_of(state) == 0o700
    assert mode_of(state.parent) == 0o700
    assert mode_of(db) == 0o600

    cfg = report_config(tmp_path / "gw.toml", state, 0o600)
    done = cli("cdr", "export", "-c", str(cfg), "--report", "daily")
    assert done.returncode == 0, done.stderr
    zips = list((state / "reports").glob("*.zip"))
    assert len(zips) == 1
    assert mode_of(state / "reports") == 0o700
    assert mode_of(zips[0]) == 0o600


def test_a_store_made_world_readable_is_made_private_when_opened(
    tmp_path: Path, umask_022: None
) -> None:
    state = tmp_path / "state"
    state.mkdir()
    (state / "gateway.db").touch(mode=0o644)
    assert mode_of(state / "gateway.db") == 0o644
    with Store.open(state):
        pass
    assert mode_of(state / "gateway.db") == 0o600


# -- who may write the store ------------------------------------------------------------


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another uid can reach (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="gw-owner-", dir="/tmp"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


def store_of_nobody(d: Path) -> Path:
    state = d / "state"
    with Store.open(state):
        pass
    for p in (state, *state.rglob("*")):
        os.chown(p, NOBODY, NOBODY)
    return report_config(d / "gw.toml", state, 0o644)


WRITES = [
    ("dlq", "replay"),
    ("dlq", "purge", "--all"),
    ("cdr", "export", "--report", "daily"),
]


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the store to another uid")
@pytest.mark.parametrize("command", WRITES, ids=[" ".join(c[:2]) for c in WRITES])
def test_a_command_that_writes_the_store_runs_only_as_its_owner(
    shared_dir: Path, command: tuple[str, ...]
) -> None:
    cfg = store_of_nobody(shared_dir)
    state = shared_dir / "state"
    before = sorted(p.name for p in state.iterdir())
    done = cli(*command, "-c", str(cfg))
    assert done.returncode == 2
    assert (
        f"run it as nobody: sudo -u nobody gateway {' '.join(command)} -c {cfg}" in done.stderr
    ), done.stderr
    assert sorted(p.name for p in state.iterdir()) == before
    assert all(p.stat().st_uid == NOBODY for p in state.rglob("*"))

    as_nobody = ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups"]
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv is not installed")
    ran = subprocess.run(
        [*as_nobody, *gateway_cmd(*command, "-c", str(cfg))],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "HOME": str(shared_dir)},
    )
    assert ran.returncode == 0, ran.stderr
    assert all(p.stat().st_uid == NOBODY for p in state.rglob("*"))


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to chown the store to another uid")
def test_gateway_run_refuses_a_store_of_another_user(shared_dir: Path) -> None:
    cfg = store_of_nobody(shared_dir)
    done = cli("run", "-c", str(cfg))
    assert done.returncode == 2
    assert f"run it as nobody: sudo -u nobody gateway run -c {cfg}" in done.stderr

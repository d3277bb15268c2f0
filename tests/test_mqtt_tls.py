"""MQTT over TLS with a client certificate, as AWS IoT Core and Azure IoT Hub require: a
trustme CA issues the broker's certificate and the gateway's; mosquitto asks for a client
certificate (`require_certificate true`) and takes its CN as the user name."""

from __future__ import annotations

from pathlib import Path

import trustme

from tests.conftest import Broker, free_port, publish, register_session, wait_for, write_config
from tests.receiver import Receiver

ICCID = "8981100000000000012"
TOPIC = f"devices/{ICCID}/up"


def tls_broker(tmp_path: Path, ca: trustme.CA) -> tuple[Broker, int]:
    """mosquitto with a plain listener (for the test's publisher) and a TLS one that
    requires a certificate from `ca`."""
    d = tmp_path / "broker"
    d.mkdir()
    ca.cert_pem.write_to_path(str(d / "ca.pem"))
    server = ca.issue_cert("127.0.0.1")
    server.private_key_pem.write_to_path(str(d / "key.pem"))
    server.cert_chain_pems[0].write_to_path(str(d / "cert.pem"))
    tls_port = free_port()
    broker = Broker(
        free_port(),
        d,
        extra_conf=f"listener {tls_port} 127.0.0.1\n"
        f"cafile {d / 'ca.pem'}\ncertfile {d / 'cert.pem'}\nkeyfile {d / 'key.pem'}\n"
        "require_certificate true\nuse_identity_as_username true\n",
    )
    broker.start()
    return broker, tls_port


def gateway_config(
    tmp_path: Path, broker: Broker, tls_port: int, name: str, cert: str, hook_url: str
) -> Path:
    cfg = write_config(
        tmp_path / f"{name}.toml",
        broker.port,
        tmp_path / name,
        client_id=name,
        mqtt_extra=f'tls = true\nca_file = "{tmp_path / "ca.pem"}"\n{cert}',
        extra=f'[[webhooks]]\nname = "cloud"\nurl = "{hook_url}"\nbatch = {{ window_ms = 100 }}\n',
    )
    cfg.write_text(cfg.read_text().replace(f"port = {broker.port}", f"port = {tls_port}"))
    return cfg


def test_a_gateway_with_a_client_certificate_connects_receives_and_delivers(
    tmp_path: Path, gateway_proc, receiver: Receiver
) -> None:
    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    mine = ca.issue_cert("gateway-01.example", common_name="gateway-01")
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    mine.private_key_pem.write_to_path(str(tmp_path / "client.key"))
    (tmp_path / "client.key").chmod(0o600)
    broker, tls_port = tls_broker(tmp_path, ca)
    try:
        cert = f'cert_file = "{tmp_path / "client.pem"}"\nkey_file = "{tmp_path / "client.key"}"'
        cfg = gateway_config(tmp_path, broker, tls_port, "gw-cert", cert, receiver.url)
        register_session(broker.port, "gw-cert", "devices/+/up")
        gw = gateway_proc(cfg)
        gw.start()
        wait_for(lambda: "subscribed to" in gw.log(), what="the gateway to subscribe over TLS")
        publish(broker.port, [(TOPIC, b"over-mtls")])
        wait_for(lambda: receiver.delivered(), what="the packet delivered")
        assert receiver.delivered()[0]["Payload"] == "over-mtls"
        assert f"connected to 127.0.0.1:{tls_port}" in gw.log()
        assert gw.terminate() == 0

        # Without a certificate the broker ends the handshake: the log says so, and
        # what to set.
        nocert = gateway_config(tmp_path, broker, tls_port, "gw-nocert", "", receiver.url)
        other = gateway_proc(nocert)
        other.start()
        wait_for(lambda: "mqtt.cert_file" in other.log(), what="the refusal in the gateway's log")
        line = next(x for x in other.log().splitlines() if "mqtt.cert_file" in x)
        assert "client certificate" in line
        assert "subscribed to" not in other.log()
        assert other.terminate() == 0
    finally:
        broker.stop()


def test_a_client_key_every_user_can_read_is_warned_about_with_its_chmod(tmp_path: Path) -> None:
    from gateway import config

    ca = trustme.CA()
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    mine = ca.issue_cert("gateway-01.example")
    mine.cert_chain_pems[0].write_to_path(str(tmp_path / "client.pem"))
    key = tmp_path / "client.key"
    mine.private_key_pem.write_to_path(str(key))
    raw = {
        "gateway": {"state_dir": str(tmp_path)},
        "mqtt": {
            "host": "broker.example",
            "tls": True,
            "ca_file": str(tmp_path / "ca.pem"),
            "cert_file": str(tmp_path / "client.pem"),
            "key_file": str(key),
        },
    }
    key.chmod(0o644)
    found = [w for w in config.warnings(config.parse(raw)) if "mqtt.key_file" in w]
    assert found == [
        f"mqtt.key_file: {key} is a private key every user can read (mode 0644):"
        f" run chmod 0600 {key}"
    ]
    key.chmod(0o600)
    assert not [w for w in config.warnings(config.parse(raw)) if "mqtt.key_file" in w]


def test_tls_failures_name_the_setting_to_fix() -> None:
    from gateway.config import MqttSection
    from gateway.ingest.client import tls_problem

    bare = MqttSection("broker.example", tls=True)
    with_cert = MqttSection("broker.example", tls=True, cert_file="/etc/gw/client.pem")
    required = (
        "SSLError: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required"
    )
    assert "set mqtt.cert_file and mqtt.key_file" in tls_problem(bare, required)
    unknown = "SSLError: [SSL: TLSV1_ALERT_UNKNOWN_CA] tlsv1 alert unknown ca"
    assert "refused the client certificate /etc/gw/client.pem" in tls_problem(with_cert, unknown)
    untrusted = (
        "SSLCertVerificationError: [SSL: CERTIFICATE_VERIFY_FAILED] certificate verify failed"
    )
    assert "check mqtt.ca_file" in tls_problem(bare, untrusted)
    assert tls_problem(bare, "ConnectionResetError: [Errno 104] Connection reset by peer") == ""

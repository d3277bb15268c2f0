"""What a configuration leaves open to others on the network or the machine: secrets
sent in clear (MQTT without TLS, plain http:// webhooks) and a config file that holds
secrets inline while every user can read it. Warnings only: `gateway check-config` prints
them and `gateway run` logs them at start."""

from __future__ import annotations

import ipaddress
import shlex
import stat
import tomllib
import urllib.parse
from pathlib import Path
from typing import Any

from gateway.config.schema import Config, WebhookConfig, is_loopback
from gateway.config.secrets import is_secret_name, is_secret_value, url_secrets


def warnings(cfg: Config) -> list[str]:
    """Every warning for `cfg`, transport first, then private keys, then report links,
    then the config file's mode."""
    out = transport_warnings(cfg) + key_warnings(cfg)
    out += report_link_warnings(cfg)
    if cfg.path is not None:
        note = file_warning(cfg.path)
        if note:
            out.append(note)
    return out


def transport_warnings(cfg: Config) -> list[str]:
    """Credentials that would cross the network in clear to another machine."""
    out = []
    m = cfg.mqtt
    if m.password and not m.tls and not is_loopback(m.host):
        out.append(
            f"mqtt.password is sent in clear to {m.host}:{m.port}: mqtt.tls is not true and"
            " the broker is not on this machine (set mqtt.tls = true)"
        )
    for i, w in enumerate(cfg.webhooks):
        try:
            parts = urllib.parse.urlsplit(w.url)
            host = parts.hostname or ""
        except ValueError:
            continue
        if parts.scheme != "http" or is_loopback(host):
            continue
        what = _credentials(w)
        if what:
            out.append(
                f"webhooks[{i}].url: {what} over plain http:// to {host}: anyone on the way"
                " can read or replay them (use https://)"
            )
    return out


# Addresses another network cannot reach: loopback, RFC 1918, carrier-grade NAT (RFC 6598),
# link-local and IPv6 unique local addresses.
_UNREACHABLE = tuple(
    ipaddress.ip_network(n)
    for n in (
        "127.0.0.0/8",
        "10.0.0.0/8",
        "172.16.0.0/12",
        "192.168.0.0/16",
        "100.64.0.0/10",
        "169.254.0.0/16",
        "::1/128",
        "fc00::/7",
        "fe80::/10",
    )
)


def unreachable_host(host: str) -> str:
    """Why a receiver elsewhere cannot reach `host` (a loopback or private address), or
    "" (a public address, or a name: names are not resolved here)."""
    if host.lower() == "localhost" or host.lower().endswith(".localhost"):
        return "a loopback name"
    try:
        addr = ipaddress.ip_address(host)
    except ValueError:
        return ""
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    for net in _UNREACHABLE:
        if addr.version == net.version and addr in net:
            if addr.is_loopback:
                return "a loopback address"
            if net.prefixlen == 10 and addr.version == 4:
                return "a carrier-grade NAT address (100.64.0.0/10)"
            if addr.is_link_local:
                return "a link-local address"
            if addr.version == 6:
                return "a unique local address (fc00::/7)"
            return "a private address"
    return ""


def report_link_warnings(cfg: Config) -> list[str]:
    """`link` reports whose download URL a receiver on another network cannot open."""
    links = [r.name for r in cfg.reports if r.delivery == "link" and r.webhook]
    if not links:
        return []
    names = ", ".join(repr(n) for n in links)
    if not cfg.web.enabled:
        return [
            f"reports {names} send download links, but web.enabled is false: nothing"
            " serves them (enable the web server or set delivery = 'push')"
        ]
    try:
        host = urllib.parse.urlsplit(cfg.web.public_url).hostname or ""
    except ValueError:
        return []
    why = unreachable_host(host)
    if not why:
        return []
    return [
        f"web.public_url ({cfg.web.public_url}) is {why}: the download links of reports"
        f" {names} cannot be opened from another network, nor from behind the carrier's"
        " NAT a cellular gateway usually sits behind (set delivery = 'push', or a"
        " public_url the receiver can reach)"
    ]


def key_warnings(cfg: Config) -> list[str]:
    """Private key files (mqtt.key_file, web.tls_key) that every user can read, with the
    chmod that fixes each."""
    out = []
    for key, value in (("mqtt.key_file", cfg.mqtt.key_file), ("web.tls_key", cfg.web.tls_key)):
        if not value:
            continue
        try:
            mode = stat.S_IMODE(Path(value).stat().st_mode)
        except OSError:
            continue
        if mode & stat.S_IROTH:
            out.append(
                f"{key}: {value} is a private key every user can read (mode {mode:04o}):"
                f" run chmod 0600 {shlex.quote(value)}"
            )
    return out


def _credentials(w: WebhookConfig) -> str:
    """What a webhook sends that should not travel in clear, in words ("" for nothing)."""
    found = []
    if w.auth.type != "none":
        found.append(f"auth '{w.auth.type}'")
    if w.signing.scheme != "none":
        found.append(f"signing '{w.signing.scheme}'")
    names = [name for name, value in w.headers if value and is_secret_name(name)]
    if names:
        found.append("header " + ", ".join(names))
    passwords, query = url_secrets(w.url)
    if passwords or query:
        found.append("the URL's credentials")
    return " and ".join(found)


def file_warning(path: Path) -> str:
    """A warning when the config file holds a secret inline (not `${ENV}` or `file:`) and
    every user of the machine can read it, with the chmod that fixes it; "" otherwise."""
    try:
        mode = path.stat().st_mode
        if not mode & stat.S_IROTH:
            return ""
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError):
        return ""
    keys = inline_secrets(raw)
    if not keys:
        return ""
    shown = ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
    fixed = stat.S_IMODE(mode) & ~0o007
    return (
        f"{path} holds secrets inline ({shown}) and every user can read it"
        f" (mode {stat.S_IMODE(mode):04o}): run chmod {fixed:04o} {shlex.quote(str(path))}"
        " (or move them to ${ENV} or file: references)"
    )


def inline_secrets(raw: Any, path: str = "") -> list[str]:
    """The key paths of a parsed TOML document whose secrets are written in the file."""
    key = path.rpartition(".")[2].partition("[")[0]
    if isinstance(raw, dict):
        return [
            hit for k, v in raw.items() for hit in inline_secrets(v, f"{path}.{k}" if path else k)
        ]
    if isinstance(raw, list):
        return [hit for i, v in enumerate(raw) for hit in inline_secrets(v, f"{path}[{i}]")]
    if isinstance(raw, str) and ("${" in raw or raw.startswith("file:")):
        return []
    if is_secret_name(key) and is_secret_value(raw):
        return [path]
    if isinstance(raw, str) and "://" in raw and any(url_secrets(raw)):
        return [path]
    return []

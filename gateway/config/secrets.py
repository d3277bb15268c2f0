"""Secrets in the config: `${ENV}` and `file:` values resolved at load, and masked
wherever the config, a log line, an error or a dead letter is shown.

What counts as a secret: the value of a key or header whose name says so
(`is_secret_name`), and the userinfo and query values of a URL (`mask_url`): a token in
`?code=…` is as good as a password."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from gateway.config.schema import Config

MASK = "***"
# The config's own secret keys; `is_secret_name` also takes any name containing one.
SECRET_KEYS = {"password", "token", "secret", "key"}
# A key or header name with one of these in it (any case) holds a secret.
_SECRET_WORDS = (
    "password",
    "passwd",
    "token",
    "secret",
    "key",
    "signature",
    "authorization",
    "cookie",
    "credential",
)
# A URL inside free text (an error message, a reply excerpt): up to a space or a quote.
_URL_RE = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s\"'<>`]+")

_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


# Told the key path and what is wrong when a secret cannot be had; None where the
# caller needs no secrets (`gateway status` reads the store without them).
Fail = Callable[[str, str], None] | None


def resolve_secret(value: str, path: str, fail: Fail, env: Mapping[str, str]) -> str:
    """Expand `${ENV}` references and `file:/path` (relative to $CREDENTIALS_DIRECTORY)."""
    if value.startswith("file:"):
        target = Path(value[5:])
        if not target.is_absolute():
            creds = env.get("CREDENTIALS_DIRECTORY", "")
            target = Path(creds) / target if creds else target
        try:
            return target.read_text(encoding="utf-8").strip()
        except OSError as exc:
            if fail is not None:
                fail(path, f"cannot read secret file {str(target)!r} ({exc.strerror})")
            return ""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            if fail is not None:
                fail(path, f"environment variable {name} is not set")
            return ""
        return env[name]

    return _ENV_RE.sub(sub, value)


def expand(raw: Any, path: str, fail: Fail, env: Mapping[str, str]) -> Any:
    """Every `${ENV}` and `file:` value of a parsed TOML document, resolved."""
    if isinstance(raw, dict):
        return {k: expand(v, f"{path}.{k}" if path else k, fail, env) for k, v in raw.items()}
    if isinstance(raw, list):
        return [expand(v, f"{path}[{i}]", fail, env) for i, v in enumerate(raw)]
    if isinstance(raw, str) and ("${" in raw or raw.startswith("file:")):
        return resolve_secret(raw, path, fail, env)
    return raw


def is_secret_name(name: str) -> bool:
    """Whether a key or header of this name holds a secret: Authorization, Cookie, or a
    name with password, token, secret, key or signature in it (api_key, X-Auth-Token,
    signingSecret). A name ending in `_file` holds the path to one (mqtt.key_file)."""
    low = name.lower()
    if low.endswith("_file"):
        return False
    return any(word in low for word in _SECRET_WORDS)


def is_secret_value(value: Any) -> bool:
    """A value worth masking under a secret name: a non-empty string or a number."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int | float) or (isinstance(value, str) and value != "")


def mask_url(url: str) -> str:
    """A URL with its userinfo and every query value replaced by ***; the rest as it was."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    end = next((i for i, c in enumerate(rest) if c in "/?#"), len(rest))
    authority, tail = rest[:end], rest[end:]
    if "@" in authority:
        authority = MASK + "@" + authority.rpartition("@")[2]
    path, q, after = tail.partition("?")
    if q:
        query, hash_, fragment = after.partition("#")
        pairs = []
        for pair in query.split("&"):
            name, eq, value = pair.partition("=")
            if eq:
                pairs.append(f"{name}={MASK if value else ''}")
            else:
                pairs.append(MASK if name else "")
        tail = path + "?" + "&".join(pairs) + hash_ + fragment
    return scheme + sep + authority + tail


def mask_urls(text: str) -> str:
    """Every URL in a piece of text (a log line, an error, a reply excerpt) masked."""
    if "://" not in text:
        return text
    return _URL_RE.sub(lambda m: mask_url(m.group(0)), text)


def url_secrets(url: str) -> tuple[list[str], list[str]]:
    """The secrets a URL carries: its userinfo password and its query values, each as
    written and decoded."""
    try:
        password = urllib.parse.urlsplit(url).password or ""
    except ValueError:
        password = ""
    passwords = list({password, urllib.parse.unquote(password)} - {""})
    values: list[str] = []
    query = url.partition("?")[2].partition("#")[0]
    for pair in query.split("&"):
        value = pair.partition("=")[2] if "=" in pair else pair
        if value:
            values.extend({value, urllib.parse.unquote(value)})
    return passwords, values


def masked(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data, with secrets replaced by ***: values of
    secret-like keys at any depth (meta too), auth-like header values, URL userinfo and
    query values."""
    return dict(mask_data(cfg))


def mask_data(value: Any, key: str = "") -> Any:
    """`value` (a dataclass, mapping, list or scalar) as plain data with secrets masked."""
    if is_dataclass(value) and not isinstance(value, type):
        return {f.name: mask_data(getattr(value, f.name), f.name) for f in fields(value)}
    if isinstance(value, Mapping):
        return {str(k): mask_data(v, str(k)) for k, v in value.items()}
    if isinstance(value, tuple | list):
        if key == "headers" and all(isinstance(p, tuple) and len(p) == 2 for p in value):
            return {str(k): mask_data(v, str(k)) for k, v in value}
        return [mask_data(v, key) for v in value]
    if isinstance(value, Path):
        return str(value)
    if is_secret_name(key) and is_secret_value(value):
        return MASK
    if isinstance(value, str):
        return mask_urls(value)
    return value

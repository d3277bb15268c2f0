"""Secrets in the config: `${ENV}` and `file:` values resolved at load, and masked
wherever the config is shown."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Any

from gateway.config.schema import Config

MASK = "***"
# A key with one of these names (or ending in one) holds a secret.
SECRET_KEYS = {"password", "token", "secret", "key"}

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


def masked(cfg: Config) -> dict[str, Any]:
    """The effective configuration as plain data, with secrets replaced by ***."""

    def walk(value: Any, key: str = "") -> Any:
        if is_dataclass(value) and not isinstance(value, type):
            return {f.name: walk(getattr(value, f.name), f.name) for f in fields(value)}
        if isinstance(value, Mapping):
            return {k: walk(v, k) for k, v in value.items()}
        if isinstance(value, tuple | list):
            if key == "headers":
                return {k: v for k, v in value}
            return [walk(v) for v in value]
        if isinstance(value, Path):
            return str(value)
        if key in SECRET_KEYS and isinstance(value, str) and value:
            return MASK
        if key == "url" and isinstance(value, str):
            return re.sub(r"//[^/@]*@", "//***@", value)
        return value

    return dict(walk(cfg))

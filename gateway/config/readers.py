"""Reading config values: each reader checks one kind of value and says what is wrong
with it ("mqtt.port: must be 1-65535, got 0"); `Reader` collects every problem."""

from __future__ import annotations

import difflib
import re
import string
from collections.abc import Callable, Mapping
from dataclasses import fields, is_dataclass
from typing import Any

from gateway.config.schema import T
from gateway.config.secrets import MASK, is_secret_name, is_secret_value, mask_urls


class Reader:
    """Walks the TOML tree, collecting every problem with its key path."""

    def __init__(self, need_secrets: bool = True) -> None:
        self.problems: list[str] = []
        self.need_secrets = need_secrets

    def fail(self, path: str, what: str, got: Any = ...) -> None:
        if got is ...:
            self.problems.append(f"{path}: {what}")
        else:
            self.problems.append(f"{path}: {what}, got {show(path, got)}")

    def table(self, parent: str, key: str, raw: Any) -> dict[str, Any]:
        path = join(parent, key)
        if not isinstance(raw, dict):
            self.fail(path, "must be a table", raw)
            return {}
        return raw

    def unknown(self, path: str, raw: Mapping[str, Any], known: set[str]) -> None:
        for key in raw:
            if key not in known:
                close = difflib.get_close_matches(key, sorted(known), n=1)
                hint = f" (did you mean '{close[0]}'?)" if close else ""
                allowed = ", ".join(sorted(known))
                self.fail(join(path, key), f"unknown key{hint}; known keys: {allowed}")

    def read(self, cls: type[T], path: str, raw: Mapping[str, Any], **checks: Any) -> T | None:
        """Build dataclass `cls` from `raw`; `checks[name]` validates one field."""
        assert is_dataclass(cls)
        names = {f.name for f in fields(cls)}
        self.unknown(path, raw, names - {"path"})
        kwargs: dict[str, Any] = {}
        ok = True
        for f in fields(cls):
            if f.name not in raw:
                continue
            key = join(path, f.name)
            value = raw[f.name]
            check = checks.get(f.name)
            if check is None:
                check = default_check(f.type)
            try:
                kwargs[f.name] = check(value) if check else value
            except Bad as bad:
                self.fail(key, bad.what, value)
                ok = False
        if not ok:
            return None
        try:
            return cls(**kwargs)
        except TypeError as exc:
            missing = re.findall(r"'(\w+)'", str(exc))
            for name in missing:
                self.fail(join(path, name), "is required")
            return None


class Bad(Exception):
    def __init__(self, what: str) -> None:
        self.what = what


def join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def show(path: str, value: Any) -> str:
    if is_secret_name(path.rsplit(".", 1)[-1]) and is_secret_value(value):
        return repr(MASK)
    text = repr(mask_urls(value) if isinstance(value, str) else value)
    return text if len(text) <= 80 else text[:77] + "..."


def default_check(type_name: Any) -> Callable[[Any], Any] | None:
    kind = str(type_name)
    if kind == "str":
        return str_value
    if kind == "int":
        return int_value(None, None)
    if kind == "float":
        return float_value(None, None)
    if kind == "bool":
        return bool_value
    return None


def str_value(value: Any) -> str:
    if not isinstance(value, str):
        raise Bad("must be a string")
    return value


def bool_value(value: Any) -> bool:
    if not isinstance(value, bool):
        raise Bad("must be true or false")
    return value


def int_value(lo: int | None, hi: int | None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise Bad("must be an integer")
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise Bad(f"must be {lo}-{hi}")
        if lo is not None and value < lo:
            raise Bad(f"must be at least {lo}")
        if hi is not None and value > hi:
            raise Bad(f"must be at most {hi}")
        return value

    return check


def float_value(
    lo: float | None, hi: float | None, *, above: bool = False
) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise Bad("must be a number")
        if above and lo is not None and value <= lo:
            raise Bad(f"must be greater than {lo:g}")
        if lo is not None and value < lo:
            raise Bad(f"must be at least {lo:g}")
        if hi is not None and value > hi:
            raise Bad(f"must be at most {hi:g}")
        return float(value)

    return check


def or_auto(check: Callable[[Any], float]) -> Callable[[Any], float | None]:
    """`check`, or "auto" (None): a value the gateway works out from the rest."""

    def either(value: Any) -> float | None:
        if value == "auto":
            return None
        try:
            return check(value)
        except Bad as exc:
            raise Bad(f'{exc.what} or "auto"') from None

    return either


def statuses(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise Bad("must be a list of HTTP status codes")
    return tuple(int_value(100, 599)(v) for v in value)


def choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise Bad("must be one of " + ", ".join(repr(o) for o in options))
        return str(value)

    return check


def nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise Bad("must be a non-empty string")
    return value


def url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
        raise Bad("must be an http:// or https:// URL")
    return value


def template(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise Bad("must be a string")
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(value) if n is not None]
        except ValueError as exc:
            raise Bad(f"is not a valid template ({exc})") from exc
        for name in names:
            if name not in allowed:
                raise Bad(f"unknown placeholder '{{{name}}}'; allowed: " + ", ".join(allowed))
        return value

    return check


def topic_template(value: Any) -> str:
    text = template("iccid")(value)
    if text and text.count("{iccid}") != 1:
        raise Bad("must contain '{iccid}' exactly once, or be empty")
    return text


def topics(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise Bad("must be a non-empty list of topic filters")
    for t in value:
        if not isinstance(t, str) or not t or "#" in t[:-1]:
            raise Bad(f"'{t}' is not a valid topic filter")
    return tuple(value)


def listen(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$", value):
        raise Bad("must be HOST:PORT (IPv6 as [::1]:PORT)")
    port = int(value.rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise Bad("port must be 1-65535")
    return value


def duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", str(value))
    if not m:
        raise Bad("must be a duration such as '90s', '15m', '24h' or seconds as a number")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    seconds = float(m.group(1)) * scale
    if seconds <= 0:
        raise Bad("must be greater than zero")
    return seconds


def duration_or_off(value: Any) -> float:
    """A duration, or 0 (the number or "0"): off."""
    if not isinstance(value, bool) and value in (0, "0"):
        return 0.0
    try:
        return duration(value)
    except Bad as exc:
        raise Bad(f"{exc.what}, or 0 for none") from None


def duration_s(text: str) -> float:
    """A duration as the config takes it ('90s', '15m', '24h', '30d' or seconds), for
    command-line options; ValueError says what is wrong."""
    try:
        return duration(text)
    except Bad as exc:
        raise ValueError(exc.what) from None


def clock(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise Bad("must be HH:MM (24 h, local time)")
    return value

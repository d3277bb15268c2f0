"""Logging to stderr for journald: one line per event, secrets masked, repeats counted.

Text lines read `LEVEL component: message key=value …`. Under journald (stderr is the
stream named by $JOURNAL_STREAM) the time stamp is left to the journal and each line
starts with a `<N>` syslog priority, so `journalctl -p warning` works. `json` writes one
object per line. Values of secret config keys (and auth-like headers) are replaced by
`***` in every line, and so are the userinfo and query values of any URL in it.
Identical warnings and errors are rate-limited: the first goes out, then one line per
interval with how many more there were.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, fields, is_dataclass
from typing import Any, TextIO

from gateway.config.secrets import is_secret_name, is_secret_value, mask_urls, url_secrets

FORMATS = ("text", "json")
MASK = "***"
REPEAT_INTERVAL_S = 60.0

# Secrets shorter than this are not masked: "***" in place of every "a" helps nobody.
_MIN_SECRET_LEN = 4
# A URL's query value this long is masked wherever it shows; a shorter one (`json` in
# `?format=json`) only inside URLs, which every line has masked anyway.
_MIN_QUERY_SECRET_LEN = 8
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}
_RECORD_ATTRS = frozenset(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {
    "message",
    "asctime",
    "taskName",
    "repeated",
}


def component(name: str) -> str:
    """`gateway.ingest` → `ingest`: the part of the gateway a line comes from."""
    return name.removeprefix("gateway.") if name != "gateway" else "gateway"


def fields_of(record: logging.LogRecord) -> dict[str, Any]:
    """The key=value fields a caller attached with `extra={...}`."""
    return {k: v for k, v in record.__dict__.items() if k not in _RECORD_ATTRS}


def _text_value(value: Any) -> str:
    text = str(value)
    if not text or any(c in text for c in ' "=\\') or not text.isprintable():
        return json.dumps(text, ensure_ascii=False)
    return text


class Secrets:
    """The secret values to mask; shared by the formatters, grown on reload."""

    def __init__(self) -> None:
        self._values: tuple[str, ...] = ()

    def add(self, values: Iterable[str]) -> None:
        merged = set(self._values) | {v for v in values if len(v) >= _MIN_SECRET_LEN}
        # Longest first, so a secret that contains another is masked whole.
        self._values = tuple(sorted(merged, key=len, reverse=True))

    def mask(self, text: str) -> str:
        text = mask_urls(text)
        for value in self._values:
            if value in text:
                text = text.replace(value, MASK)
        return text


class _Base(logging.Formatter):
    def __init__(self, secrets: Secrets) -> None:
        super().__init__()
        self.secrets = secrets

    def _exc_text(self, record: logging.LogRecord) -> str:
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        return record.exc_text or ""


class TextFormatter(_Base):
    """`[<N>][time ]LEVEL component: message k=v …` on one line."""

    def __init__(self, secrets: Secrets, *, journald: bool = False) -> None:
        super().__init__(secrets)
        self.journald = journald

    def format(self, record: logging.LogRecord) -> str:
        parts = []
        if self.journald:
            parts.append(f"<{_SYSLOG_PRIORITY.get(record.levelno, 6)}>")
        else:
            parts.append(_iso_ms(record.created) + " ")
        parts.append(f"{record.levelname} {component(record.name)}: {record.getMessage()}")
        extra = fields_of(record)
        if record.__dict__.get("repeated"):
            extra["repeated"] = record.__dict__["repeated"]
        for key, value in extra.items():
            parts.append(f" {key}={_text_value(value)}")
        exc = self._exc_text(record)
        if exc:
            parts.append(" exc=" + json.dumps(exc, ensure_ascii=False))
        # One event, one line: journald would split a multi-line message into entries.
        return self.secrets.mask("".join(parts).replace("\n", "\\n"))


class JsonFormatter(_Base):
    """One JSON object per line: ts, level, component, msg, fields, exc."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Any] = {
            "ts": _iso_ms(record.created),
            "level": record.levelname.lower(),
            "component": component(record.name),
            "msg": record.getMessage(),
        }
        for key, value in fields_of(record).items():
            doc.setdefault(key, value)
        if record.__dict__.get("repeated"):
            doc["repeated"] = record.__dict__["repeated"]
        exc = self._exc_text(record)
        if exc:
            doc["exc"] = exc
        return self.secrets.mask(json.dumps(doc, ensure_ascii=False, default=str))


def _iso_ms(created: float) -> str:
    millis = int(created % 1 * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created)) + f".{millis:03d}Z"


@dataclass(slots=True)
class _Seen:
    window_start: float
    suppressed: int
    record: logging.LogRecord


class RepeatFilter(logging.Filter):
    """Rate-limits identical warnings and errors: the first passes, the rest are counted.

    When an interval is over, the next identical line goes out with `repeated=N` (how
    many were held back); `flush()` reports counts for lines that did not come again.
    """

    def __init__(
        self,
        interval_s: float = REPEAT_INTERVAL_S,
        *,
        min_level: int = logging.WARNING,
        clock: Callable[[], float] = time.monotonic,
        max_keys: int = 1000,
    ) -> None:
        super().__init__()
        self.interval_s = interval_s
        self.min_level = min_level
        self.clock = clock
        self.max_keys = max_keys
        self._seen: dict[tuple[str, int, str], _Seen] = {}
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < self.min_level or record.__dict__.get("repeated"):
            return True
        key = (record.name, record.levelno, record.getMessage())
        now = self.clock()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None:
                if len(self._seen) >= self.max_keys:
                    self._seen.pop(next(iter(self._seen)))
                self._seen[key] = _Seen(now, 0, record)
                return True
            if now - seen.window_start < self.interval_s:
                seen.suppressed += 1
                return False
            record.__dict__["repeated"] = seen.suppressed
            self._seen[key] = _Seen(now, 0, record)
            return True

    def flush(self) -> list[logging.LogRecord]:
        """Summary records for finished intervals whose line did not come again."""
        now = self.clock()
        out = []
        with self._lock:
            for key, seen in list(self._seen.items()):
                if now - seen.window_start < self.interval_s:
                    continue
                if seen.suppressed:
                    summary = logging.makeLogRecord(seen.record.__dict__)
                    summary.created = time.time()
                    summary.__dict__["repeated"] = seen.suppressed
                    summary.exc_info = None
                    summary.exc_text = None
                    out.append(summary)
                del self._seen[key]
        return out


@dataclass(slots=True)
class _State:
    handler: logging.Handler | None = None
    repeats: RepeatFilter | None = None
    level_fixed: bool = False
    fmt: str = "text"


_state = _State()
_secrets = Secrets()


def under_journald(stream: TextIO) -> bool:
    """True when `stream` is the journal stream systemd named in $JOURNAL_STREAM."""
    want = os.environ.get("JOURNAL_STREAM", "")
    if not want:
        return False
    try:
        st = os.fstat(stream.fileno())
    except (OSError, ValueError):
        return False
    return want == f"{st.st_dev}:{st.st_ino}"


def setup(
    level: str = "info",
    fmt: str = "text",
    *,
    level_fixed: bool = False,
    stream: TextIO | None = None,
    secret_values: Iterable[str] = (),
) -> logging.Handler:
    """Install the gateway's one stderr handler on the root logger (replacing any)."""
    stream = stream or sys.stderr
    _secrets.add(secret_values)
    handler = logging.StreamHandler(stream)
    formatter: logging.Formatter
    if fmt == "json":
        formatter = JsonFormatter(_secrets)
    else:
        formatter = TextFormatter(_secrets, journald=under_journald(stream))
    handler.setFormatter(formatter)
    repeats = RepeatFilter()
    handler.addFilter(repeats)
    root = logging.getLogger()
    if _state.handler is not None:
        root.removeHandler(_state.handler)
    root.addHandler(handler)
    root.setLevel(level.upper())
    _state.handler, _state.repeats, _state.level_fixed = handler, repeats, level_fixed
    _state.fmt = fmt
    return handler


def settings() -> tuple[str, str]:
    """The level and format in effect, for a child process to log the same way."""
    return logging.getLevelName(logging.getLogger().level).lower(), _state.fmt


def add_secrets(values: Iterable[str]) -> None:
    """More values to mask (a reloaded config may bring new secrets)."""
    _secrets.add(values)


def apply_config_level(level: str) -> None:
    """A reloaded config's log level, unless --log-level on the command line fixed it."""
    if not _state.level_fixed:
        logging.getLogger().setLevel(level.upper())


def flush_repeats() -> None:
    """Write the counts of rate-limited lines whose interval is over (call periodically)."""
    if _state.handler is None or _state.repeats is None:
        return
    for record in _state.repeats.flush():
        _state.handler.handle(record)


def secret_values(cfg: object) -> set[str]:
    """Every secret a config holds: the values of secret-like keys at any depth (password,
    token, secret, key, api_key in meta …), of auth-like headers, and URL passwords and
    long query values."""
    found: set[str] = set()

    def walk(value: Any, key: str = "") -> None:
        if is_dataclass(value) and not isinstance(value, type):
            for f in fields(value):
                walk(getattr(value, f.name), f.name)
        elif isinstance(value, dict):
            for k, v in value.items():
                walk(v, str(k))
        elif isinstance(value, tuple | list):
            if key == "headers" and all(isinstance(p, tuple) and len(p) == 2 for p in value):
                for name, v in value:
                    if is_secret_name(str(name)) and v:
                        found.add(str(v))
                        # The scheme word ("Bearer", "Basic") is no secret; what follows is.
                        found.update(str(v).split()[1:])
                    walk(v)
                return
            for v in value:
                walk(v, key)
        elif is_secret_name(key) and is_secret_value(value):
            found.add(str(value))
            found.update(str(value).split())  # standard-webhooks: several, space-separated
        elif isinstance(value, str) and "://" in value:
            passwords, query = url_secrets(value)
            found.update(passwords)
            found.update(v for v in query if len(v) >= _MIN_QUERY_SECRET_LEN)

    walk(cfg)
    return found

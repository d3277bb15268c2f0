"""One TOML file into frozen dataclasses; every mistake names its key path."""

from __future__ import annotations

import dataclasses
import difflib
import ipaddress
import os
import re
import string
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from gateway.errors import ConfigError

T = TypeVar("T")

SOURCES = ("packets", "cdrs", "reports", "events")
FORMATS = ("monoz", "monogoto", "envelope", "flat", "report")
PAYLOAD_ENCODINGS = ("auto", "utf8", "base64", "hex", "cbor-json")
OPS = ("==", "!=", ">", ">=", "<", "<=", "contains", "startswith", "regex", "in")
MASK = "***"


@dataclass(frozen=True, slots=True)
class GatewaySection:
    state_dir: Path = Path("/var/lib/edge-gateway")
    max_buffer_mb: float = 512.0
    on_full: str = "backpressure"
    commit_max_packets: int = 2000
    commit_delay_ms: float | None = None  # None: "auto" (see store.commit_delay_ms)
    log_level: str = "info"
    log_format: str = "text"
    min_free_mb: float = 64.0
    # Dead letters count toward max_buffer_mb; the oldest go past either limit. Left
    # out, the size limit is 64 MB, or a quarter of a max_buffer_mb not above that.
    dead_letter_max_mb: float = 64.0
    dead_letter_max_age: float = 30 * 86400.0  # seconds; 0: no age limit


@dataclass(frozen=True, slots=True)
class MqttSection:
    host: str
    port: int = 1883
    client_id: str = "edge-gateway"
    username: str = ""
    password: str = ""
    tls: bool = False
    ca_file: str = ""
    cert_file: str = ""
    key_file: str = ""
    topics: tuple[str, ...] = ("devices/+/up",)
    qos: int = 1
    shared_group: str = ""
    iccid_from_topic: str = "devices/{iccid}/up"
    payload_encoding: str = "auto"
    max_payload_bytes: int = 262144
    protocol: str = "5"
    keepalive_s: int = 30
    session_expiry_s: int = 7 * 24 * 3600
    receive_maximum: int = 1000
    reconnect_min_s: float = 0.5
    reconnect_max_s: float = 30.0
    # MQTT clients in processes of their own, each with a session in shared_group.
    ingest_processes: int = 1

    def session_client_id(self, n: int) -> str:
        """The client id of ingest session n (mqtt.ingest_processes): session 0 keeps
        client_id, so a gateway going from 1 to more processes keeps its session."""
        return f"{self.client_id}-{n}" if n else self.client_id

    @property
    def store_wait_s(self) -> float:
        """How long a thread handing packets to the store waits for room at a time: half
        the keepalive, so that paho's network thread still answers the broker's."""
        return self.keepalive_s / 2

    def subscriptions(self) -> list[str]:
        """Topic filters as sent to the broker, with the shared-subscription prefix."""
        if not self.shared_group:
            return list(self.topics)
        return [f"$share/{self.shared_group}/{t}" for t in self.topics]


@dataclass(frozen=True, slots=True)
class ModemSection:
    port: str = "/dev/ttyUSB2"
    baudrate: int = 115200
    profile: str = "auto"
    poll_interval_s: float = 60.0
    interface: str = "wwan0"
    command_timeout_s: float = 5.0


@dataclass(frozen=True, slots=True)
class CdrSection:
    interval_s: float = 900.0
    thing_name: str = "ICCID {iccid}"
    thing_id: str = "ThingId_ICCID_{iccid}"
    things_group_id: str = ""
    things_group_name: str = ""
    emit_zero_usage: bool = False


@dataclass(frozen=True, slots=True)
class BatchPolicy:
    window_ms: int = 1000
    max_items: int = 10


@dataclass(frozen=True, slots=True)
class AuthConfig:
    type: str = "none"
    username: str = ""
    password: str = ""
    token: str = ""
    key: str = ""
    header: str = "x-api-key"


@dataclass(frozen=True, slots=True)
class SigningConfig:
    scheme: str = "none"
    secret: str = ""


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """When to try a request again; see DESIGN.md "Auth, signing, retries"."""

    preset: str = "durable"
    timeout_s: float = 30.0
    max_attempts: int = 0  # 0: no limit, max_age_s decides
    retry_on_status: tuple[int, ...] = (408, 425, 429, 500, 501, 502, 503, 504, 505, 506, 507, 508)
    retry_any_5xx: bool = True
    backoff_min_s: float = 1.0
    backoff_max_s: float = 300.0
    max_age_s: float = 7 * 24 * 3600.0
    honour_retry_after: bool = True


RETRY_PRESETS: dict[str, RetryPolicy] = {
    "durable": RetryPolicy(),
    # monoZ:Link: wait 90 s for a response, 2 more tries on no response, none on an error.
    "monoz": RetryPolicy(
        preset="monoz",
        timeout_s=90.0,
        max_attempts=3,
        retry_on_status=(),
        retry_any_5xx=False,
        backoff_min_s=1.0,
        backoff_max_s=10.0,
        max_age_s=7 * 24 * 3600.0,
        honour_retry_after=False,
    ),
}


@dataclass(frozen=True, slots=True)
class Condition:
    field: str
    op: str
    value: Any


@dataclass(frozen=True, slots=True)
class WebhookConfig:
    name: str
    url: str
    source: str = "packets"
    format: str = "monoz"
    id_field: str = "ICCID"
    iccid_as: str = "auto"
    batch: BatchPolicy = BatchPolicy()
    auth: AuthConfig = AuthConfig()
    headers: tuple[tuple[str, str], ...] = ()
    signing: SigningConfig = SigningConfig()
    retry: RetryPolicy = RetryPolicy()
    when: tuple[Condition, ...] = ()
    meta: Mapping[str, Any] = field(default_factory=dict)
    gzip: bool = False
    # Requests in flight at once. A monoZ webhook (10 records a request) at 2,000
    # packets/s sends 200 requests/s: at 100 ms a round trip that needs 20 in flight.
    # Even on loopback at 5,000/s, 4 fell behind where 16 kept closer (README, Live).
    concurrency: int = 16
    ca_file: str = ""


@dataclass(frozen=True, slots=True)
class ReportConfig:
    name: str
    task_id: int = 1
    every_s: float = 24 * 3600.0
    at: str = ""
    webhook: str = ""


@dataclass(frozen=True, slots=True)
class WebSection:
    listen: str = "127.0.0.1:8080"
    token: str = ""
    public_url: str = "http://127.0.0.1:8080"
    enabled: bool = True
    # Seconds between the dashboard's throughput samples (one hour of them is kept).
    sample_s: float = 5.0

    @property
    def loopback(self) -> bool:
        """Whether `listen` is a loopback address (no token needed)."""
        return is_loopback(self.listen.rsplit(":", 1)[0].strip("[]"))


def is_loopback(host: str) -> bool:
    """localhost, 127.0.0.0/8 or ::1."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@dataclass(frozen=True, slots=True)
class Config:
    mqtt: MqttSection
    gateway: GatewaySection = GatewaySection()
    modem: ModemSection | None = None
    cdr: CdrSection = CdrSection()
    webhooks: tuple[WebhookConfig, ...] = ()
    reports: tuple[ReportConfig, ...] = ()
    web: WebSection = WebSection()
    path: Path | None = None

    @property
    def db_path(self) -> Path:
        """Where the SQLite store lives."""
        return self.gateway.state_dir / "gateway.db"


SECRET_KEYS = {"password", "token", "secret", "key"}


class _Reader:
    """Walks the TOML tree, collecting every problem with its key path."""

    def __init__(self, need_secrets: bool = True) -> None:
        self.problems: list[str] = []
        self.need_secrets = need_secrets

    def fail(self, path: str, what: str, got: Any = ...) -> None:
        if got is ...:
            self.problems.append(f"{path}: {what}")
        else:
            self.problems.append(f"{path}: {what}, got {_show(path, got)}")

    def table(self, parent: str, key: str, raw: Any) -> dict[str, Any]:
        path = _join(parent, key)
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
                self.fail(_join(path, key), f"unknown key{hint}; known keys: {allowed}")

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
            key = _join(path, f.name)
            value = raw[f.name]
            check = checks.get(f.name)
            if check is None:
                check = _default_check(f.type)
            try:
                kwargs[f.name] = check(value) if check else value
            except _Bad as bad:
                self.fail(key, bad.what, value)
                ok = False
        if not ok:
            return None
        try:
            return cls(**kwargs)
        except TypeError as exc:
            missing = re.findall(r"'(\w+)'", str(exc))
            for name in missing:
                self.fail(_join(path, name), "is required")
            return None


class _Bad(Exception):
    def __init__(self, what: str) -> None:
        self.what = what


def _join(parent: str, key: str) -> str:
    return f"{parent}.{key}" if parent else key


def _show(path: str, value: Any) -> str:
    if path.rsplit(".", 1)[-1] in SECRET_KEYS and isinstance(value, str) and value:
        return repr(MASK)
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


def _default_check(type_name: Any) -> Callable[[Any], Any] | None:
    kind = str(type_name)
    if kind == "str":
        return _str
    if kind == "int":
        return _int(None, None)
    if kind == "float":
        return _float(None, None)
    if kind == "bool":
        return _bool
    return None


def _str(value: Any) -> str:
    if not isinstance(value, str):
        raise _Bad("must be a string")
    return value


def _bool(value: Any) -> bool:
    if not isinstance(value, bool):
        raise _Bad("must be true or false")
    return value


def _int(lo: int | None, hi: int | None) -> Callable[[Any], int]:
    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise _Bad("must be an integer")
        if lo is not None and hi is not None and not lo <= value <= hi:
            raise _Bad(f"must be {lo}-{hi}")
        if lo is not None and value < lo:
            raise _Bad(f"must be at least {lo}")
        if hi is not None and value > hi:
            raise _Bad(f"must be at most {hi}")
        return value

    return check


def _float(lo: float | None, hi: float | None, *, above: bool = False) -> Callable[[Any], float]:
    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise _Bad("must be a number")
        if above and lo is not None and value <= lo:
            raise _Bad(f"must be greater than {lo:g}")
        if lo is not None and value < lo:
            raise _Bad(f"must be at least {lo:g}")
        if hi is not None and value > hi:
            raise _Bad(f"must be at most {hi:g}")
        return float(value)

    return check


def _or_auto(check: Callable[[Any], float]) -> Callable[[Any], float | None]:
    """`check`, or "auto" (None): a value the gateway works out from the rest."""

    def either(value: Any) -> float | None:
        if value == "auto":
            return None
        try:
            return check(value)
        except _Bad as exc:
            raise _Bad(f'{exc.what} or "auto"') from None

    return either


def _statuses(value: Any) -> tuple[int, ...]:
    if not isinstance(value, list):
        raise _Bad("must be a list of HTTP status codes")
    return tuple(_int(100, 599)(v) for v in value)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise _Bad("must be one of " + ", ".join(repr(o) for o in options))
        return str(value)

    return check


def _nonempty(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _Bad("must be a non-empty string")
    return value


def _url(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^https?://[^/\s]+", value):
        raise _Bad("must be an http:// or https:// URL")
    return value


def _template(*allowed: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise _Bad("must be a string")
        try:
            names = [n for _, n, _, _ in string.Formatter().parse(value) if n is not None]
        except ValueError as exc:
            raise _Bad(f"is not a valid template ({exc})") from exc
        for name in names:
            if name not in allowed:
                raise _Bad(f"unknown placeholder '{{{name}}}'; allowed: " + ", ".join(allowed))
        return value

    return check


def _topic_template(value: Any) -> str:
    text = _template("iccid")(value)
    if text and text.count("{iccid}") != 1:
        raise _Bad("must contain '{iccid}' exactly once, or be empty")
    return text


def _topics(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise _Bad("must be a non-empty list of topic filters")
    for t in value:
        if not isinstance(t, str) or not t or "#" in t[:-1]:
            raise _Bad(f"'{t}' is not a valid topic filter")
    return tuple(value)


def _listen(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^(\[[0-9a-fA-F:]+\]|[^:\s]+):\d{1,5}$", value):
        raise _Bad("must be HOST:PORT (IPv6 as [::1]:PORT)")
    port = int(value.rsplit(":", 1)[1])
    if not 1 <= port <= 65535:
        raise _Bad("port must be 1-65535")
    return value


def _duration(value: Any) -> float:
    if isinstance(value, int | float) and not isinstance(value, bool) and value > 0:
        return float(value)
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*", str(value))
    if not m:
        raise _Bad("must be a duration such as '90s', '15m', '24h' or seconds as a number")
    scale = {"ms": 0.001, "s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
    seconds = float(m.group(1)) * scale
    if seconds <= 0:
        raise _Bad("must be greater than zero")
    return seconds


def _duration_or_off(value: Any) -> float:
    """A duration, or 0 (the number or "0"): off."""
    if not isinstance(value, bool) and value in (0, "0"):
        return 0.0
    try:
        return _duration(value)
    except _Bad as exc:
        raise _Bad(f"{exc.what}, or 0 for none") from None


def duration_s(text: str) -> float:
    """A duration as the config takes it ('90s', '15m', '24h', '30d' or seconds), for
    command-line options; ValueError says what is wrong."""
    try:
        return _duration(text)
    except _Bad as exc:
        raise ValueError(exc.what) from None


def _clock(value: Any) -> str:
    if not isinstance(value, str) or not re.fullmatch(r"([01]\d|2[0-3]):[0-5]\d", value):
        raise _Bad("must be HH:MM (24 h, local time)")
    return value


_ENV_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def resolve_secret(value: str, path: str, r: _Reader, env: Mapping[str, str]) -> str:
    """Expand `${ENV}` references and `file:/path` (relative to $CREDENTIALS_DIRECTORY)."""
    if value.startswith("file:"):
        target = Path(value[5:])
        if not target.is_absolute():
            creds = env.get("CREDENTIALS_DIRECTORY", "")
            target = Path(creds) / target if creds else target
        try:
            return target.read_text(encoding="utf-8").strip()
        except OSError as exc:
            if r.need_secrets:
                r.fail(path, f"cannot read secret file {str(target)!r} ({exc.strerror})")
            return ""

    def sub(m: re.Match[str]) -> str:
        name = m.group(1)
        if name not in env:
            if r.need_secrets:
                r.fail(path, f"environment variable {name} is not set")
            return ""
        return env[name]

    return _ENV_RE.sub(sub, value)


def _expand(raw: Any, path: str, r: _Reader, env: Mapping[str, str]) -> Any:
    if isinstance(raw, dict):
        return {k: _expand(v, _join(path, k), r, env) for k, v in raw.items()}
    if isinstance(raw, list):
        return [_expand(v, f"{path}[{i}]", r, env) for i, v in enumerate(raw)]
    if isinstance(raw, str) and ("${" in raw or raw.startswith("file:")):
        return resolve_secret(raw, path, r, env)
    return raw


def _read_webhook(r: _Reader, path: str, raw: dict[str, Any]) -> WebhookConfig | None:
    fmt = raw.get("format", "monoz")
    per_record = fmt in ("envelope", "flat", "report")
    default_batch = BatchPolicy(window_ms=0, max_items=1) if per_record else BatchPolicy()
    sub: dict[str, Any] = {}

    batch_raw = raw.get("batch", {})
    if "batch" in raw:
        batch_raw = r.table(path, "batch", raw["batch"])
    b = r.read(
        BatchPolicy,
        _join(path, "batch"),
        {"window_ms": default_batch.window_ms, "max_items": default_batch.max_items, **batch_raw},
        window_ms=_int(0, 3_600_000),
        max_items=_int(1, 10_000),
    )
    if b is not None and per_record and b.max_items != 1:
        r.fail(_join(path, "batch.max_items"), f"format '{fmt}' sends one record per POST", 1)
    sub["batch"] = b

    if "auth" in raw:
        a_raw = r.table(path, "auth", raw["auth"])
        a = r.read(
            AuthConfig,
            _join(path, "auth"),
            a_raw,
            type=_choice("none", "basic", "bearer", "api_key"),
            header=_nonempty,
        )
        if a is not None:
            need = {"basic": ("username",), "bearer": ("token",), "api_key": ("key",)}
            for key in need.get(a.type, ()):
                if not getattr(a, key):
                    r.fail(_join(path, f"auth.{key}"), f"is required for auth type '{a.type}'")
        sub["auth"] = a

    if "signing" in raw:
        s_raw = r.table(path, "signing", raw["signing"])
        s = r.read(
            SigningConfig,
            _join(path, "signing"),
            s_raw,
            scheme=_choice("none", "cdr-manager", "standard-webhooks"),
        )
        if s is not None and s.scheme != "none" and not s.secret:
            r.fail(_join(path, "signing.secret"), f"is required for scheme '{s.scheme}'")
        if s is not None and s.scheme == "standard-webhooks":
            for part in s.secret.split():
                if not part.startswith("whsec_"):
                    r.fail(_join(path, "signing.secret"), "each secret must start with 'whsec_'")
        sub["signing"] = s

    retry_raw = raw.get("retry", {"preset": "durable"})
    if isinstance(retry_raw, str):
        retry_raw = {"preset": retry_raw}
    retry_raw = r.table(path, "retry", retry_raw)
    preset_name = retry_raw.get("preset", "durable")
    if not isinstance(preset_name, str) or preset_name not in RETRY_PRESETS:
        r.fail(_join(path, "retry.preset"), "must be 'monoz' or 'durable'", preset_name)
        sub["retry"] = None
    else:
        base = RETRY_PRESETS[preset_name]
        explicit = {k: v for k, v in retry_raw.items() if k != "preset"}
        if "timeout_s" in raw:
            explicit.setdefault("timeout_s", raw["timeout_s"])
        rp = r.read(
            RetryPolicy,
            _join(path, "retry"),
            explicit,
            timeout_s=_float(0, 3600, above=True),
            max_attempts=_int(0, 1000),
            backoff_min_s=_float(0, 86400),
            backoff_max_s=_float(0, 86400),
            max_age_s=_float(0, 365 * 86400, above=True),
            retry_on_status=_statuses,
        )
        if rp is not None:
            from dataclasses import replace

            names = {f.name for f in fields(RetryPolicy)}
            sub["retry"] = replace(base, **{k: getattr(rp, k) for k in explicit if k in names})

    if "headers" in raw:
        h = r.table(path, "headers", raw["headers"])
        pairs = []
        for k, v in h.items():
            if not isinstance(v, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", k):
                r.fail(_join(path, f"headers.{k}"), "must be a string value with a token name", v)
            else:
                pairs.append((k, v))
        sub["headers"] = tuple(pairs)

    if "when" in raw:
        conds = []
        when = raw["when"]
        if isinstance(when, dict):
            when = [when]
        if not isinstance(when, list):
            r.fail(_join(path, "when"), "must be a list of {field, op, value} tables", when)
        else:
            for i, c in enumerate(when):
                cp = f"{path}.when[{i}]"
                if not isinstance(c, dict):
                    r.fail(cp, "must be a table {field, op, value}", c)
                    continue
                cond = r.read(Condition, cp, c, field=_nonempty, op=_choice(*OPS), value=None)
                if cond is None:
                    continue
                if cond.op == "regex":
                    try:
                        re.compile(str(cond.value))
                    except re.error as exc:
                        r.fail(f"{cp}.value", f"is not a valid regex ({exc})", cond.value)
                if cond.op == "in" and not isinstance(cond.value, list):
                    r.fail(f"{cp}.value", "must be a list for op 'in'", cond.value)
                conds.append(cond)
        sub["when"] = tuple(conds)

    if "meta" in raw:
        sub["meta"] = r.table(path, "meta", raw["meta"])

    rest = {k: v for k, v in raw.items() if k not in sub and k not in ("retry", "timeout_s")}
    known = {f.name for f in fields(WebhookConfig)} | {"timeout_s"}
    r.unknown(path, {k: v for k, v in raw.items() if k not in known}, known)
    rest = {k: v for k, v in rest.items() if k in known}
    w = r.read(
        WebhookConfig,
        path,
        rest,
        name=_nonempty,
        url=_url,
        source=_choice(*SOURCES),
        format=_choice(*FORMATS),
        id_field=_choice("ICCID", "Topic"),
        iccid_as=_choice("auto", "string"),
        concurrency=_int(1, 256),
    )
    if w is None or any(v is None for v in sub.values()):
        return None
    from dataclasses import replace

    w = replace(w, **{k: v for k, v in sub.items() if v is not None})
    allowed = {
        "packets": ("monoz", "envelope", "flat"),
        "cdrs": ("monogoto", "envelope", "flat"),
        "events": ("envelope", "flat"),
        "reports": ("report",),
    }[w.source]
    if w.format not in allowed:
        r.fail(
            _join(path, "format"),
            f"source '{w.source}' takes format " + " or ".join(repr(a) for a in allowed),
            w.format,
        )
    if w.ca_file and not Path(w.ca_file).is_file():
        r.fail(_join(path, "ca_file"), "file does not exist", w.ca_file)
    return w


def _dead_letter_limit(r: _Reader, g: GatewaySection, raw: Any) -> GatewaySection:
    """Dead letters count toward max_buffer_mb: their own limit must leave room for
    packets. Left out, it is a quarter of a max_buffer_mb too small for the default."""
    given = isinstance(raw, dict) and "dead_letter_max_mb" in raw
    if g.dead_letter_max_mb < g.max_buffer_mb:
        return g
    if given:
        r.fail(
            "gateway.dead_letter_max_mb",
            f"must be less than gateway.max_buffer_mb ({g.max_buffer_mb:g}): dead letters"
            " count toward it",
            g.dead_letter_max_mb,
        )
        return g
    return dataclasses.replace(g, dead_letter_max_mb=g.max_buffer_mb / 4)


def parse(
    raw: dict[str, Any],
    env: Mapping[str, str] | None = None,
    source: str = "",
    *,
    need_secrets: bool = True,
) -> Config:
    """Validate a parsed TOML document; raise ConfigError listing every problem.

    need_secrets=False: a `${VAR}` or `file:` that cannot be read becomes "" instead of a
    problem (for commands that only read the store, run without the service's secrets)."""
    env = os.environ if env is None else env
    r = _Reader(need_secrets)
    raw = _expand(raw, "", r, env)
    sections = {"gateway", "mqtt", "modem", "cdr", "webhooks", "reports", "web"}
    r.unknown("", raw, sections)

    g = r.read(
        GatewaySection,
        "gateway",
        r.table("", "gateway", raw.get("gateway", {})),
        state_dir=lambda v: Path(_nonempty(v)),
        max_buffer_mb=_float(0, None, above=True),
        on_full=_choice("backpressure", "drop_oldest"),
        commit_max_packets=_int(1, 100_000),
        commit_delay_ms=_or_auto(_float(0, 1000)),
        log_level=_choice("debug", "info", "warning", "error"),
        log_format=_choice("text", "json"),
        min_free_mb=_float(0, None),
        dead_letter_max_mb=_float(0, None, above=True),
        dead_letter_max_age=_duration_or_off,
    )
    if g is not None:
        g = _dead_letter_limit(r, g, raw.get("gateway", {}))

    m = None
    if "mqtt" not in raw:
        r.fail("mqtt", "section is required (at least mqtt.host)")
    else:
        m = r.read(
            MqttSection,
            "mqtt",
            r.table("", "mqtt", raw["mqtt"]),
            host=_nonempty,
            port=_int(1, 65535),
            client_id=_nonempty,
            topics=_topics,
            qos=_int(0, 1),
            iccid_from_topic=_topic_template,
            payload_encoding=_choice(*PAYLOAD_ENCODINGS),
            max_payload_bytes=_int(1, 256 * 1024 * 1024),
            protocol=_choice("5", "3.1.1"),
            keepalive_s=_int(5, 3600),
            session_expiry_s=_int(0, 2**32 - 1),
            receive_maximum=_int(1, 65535),
            reconnect_min_s=_float(0, 3600, above=True),
            reconnect_max_s=_float(0, 3600, above=True),
            ingest_processes=_int(1, 16),
        )
        if m is not None and m.tls:
            for key in ("ca_file", "cert_file", "key_file"):
                p = getattr(m, key)
                if p and not Path(p).is_file():
                    r.fail(f"mqtt.{key}", "file does not exist", p)
        if m is not None and m.ingest_processes > 1 and not m.shared_group:
            r.fail(
                "mqtt.ingest_processes",
                "more than 1 needs mqtt.shared_group (else every process takes every packet)",
                m.ingest_processes,
            )
        if m is not None and m.shared_group and "/" in m.shared_group:
            r.fail("mqtt.shared_group", "must not contain '/'", m.shared_group)

    modem = None
    if "modem" in raw:
        modem = r.read(
            ModemSection,
            "modem",
            r.table("", "modem", raw["modem"]),
            port=_nonempty,
            baudrate=_int(300, 4_000_000),
            profile=_choice("auto", "generic", "quectel", "ublox", "simcom", "telit", "huawei"),
            poll_interval_s=_float(0, 86400, above=True),
            command_timeout_s=_float(0, 600, above=True),
        )

    cdr = r.read(
        CdrSection,
        "cdr",
        r.table("", "cdr", raw.get("cdr", {})),
        interval_s=_duration,
        thing_name=_template("iccid", "imsi", "imei"),
        thing_id=_template("iccid", "imsi", "imei"),
        things_group_id=_template("iccid", "imsi", "imei"),
        things_group_name=_template("iccid", "imsi", "imei"),
    )

    hooks: list[WebhookConfig] = []
    raw_hooks = raw.get("webhooks", [])
    if not isinstance(raw_hooks, list):
        r.fail("webhooks", "must be an array of tables ([[webhooks]])", raw_hooks)
        raw_hooks = []
    names: set[str] = set()
    for i, h in enumerate(raw_hooks):
        path = f"webhooks[{i}]"
        if not isinstance(h, dict):
            r.fail(path, "must be a table", h)
            continue
        w = _read_webhook(r, path, h)
        if w is None:
            continue
        if w.name in names:
            r.fail(f"{path}.name", "is used by another webhook", w.name)
        names.add(w.name)
        hooks.append(w)

    reports: list[ReportConfig] = []
    raw_reports = raw.get("reports", [])
    if not isinstance(raw_reports, list):
        r.fail("reports", "must be an array of tables ([[reports]])", raw_reports)
        raw_reports = []
    for i, rep in enumerate(raw_reports):
        path = f"reports[{i}]"
        if not isinstance(rep, dict):
            r.fail(path, "must be a table", rep)
            continue
        rep = dict(rep)
        if "every" in rep:
            rep["every_s"] = rep.pop("every")
        rc = r.read(
            ReportConfig,
            path,
            rep,
            name=_nonempty,
            task_id=_int(0, None),
            every_s=_duration,
            at=_clock,
            webhook=_str,
        )
        if rc is None:
            continue
        target = next((w for w in hooks if w.name == rc.webhook), None)
        if rc.webhook and target is None:
            r.fail(f"{path}.webhook", "names no [[webhooks]] entry", rc.webhook)
        elif target is not None and target.source != "reports":
            r.fail(f"{path}.webhook", "must name a webhook with source = 'reports'", rc.webhook)
        reports.append(rc)

    web = r.read(
        WebSection,
        "web",
        r.table("", "web", raw.get("web", {})),
        listen=_listen,
        public_url=_url,
        sample_s=_float(0.1, 600.0),
    )
    if web is not None and web.enabled and not web.token and not web.loopback:
        r.fail("web.token", f"is required when web.listen is not loopback ({web.listen})")

    if r.problems or g is None or m is None or cdr is None or web is None:
        raise ConfigError(r.problems or ["invalid configuration"], source)
    return Config(
        gateway=g,
        mqtt=m,
        modem=modem,
        cdr=cdr,
        webhooks=tuple(hooks),
        reports=tuple(reports),
        web=web,
        path=Path(source) if source else None,
    )


def load(
    path: str | Path, env: Mapping[str, str] | None = None, *, need_secrets: bool = True
) -> Config:
    """Read and validate one TOML file."""
    p = Path(path)
    try:
        text = p.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"cannot read config file ({exc.strerror})"], str(p)) from exc
    except UnicodeDecodeError as exc:
        raise ConfigError([f"not UTF-8 text ({exc.reason})"], str(p)) from exc
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"invalid TOML: {exc}"], str(p)) from exc
    return parse(raw, env, str(p), need_secrets=need_secrets)


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

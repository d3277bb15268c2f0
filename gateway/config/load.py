"""One TOML file into frozen dataclasses; every mistake names its key path."""

from __future__ import annotations

import dataclasses
import math
import os
import re
import shlex
import ssl
import tomllib
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any

from gateway.config.readers import (
    Bad,
    Reader,
    choice,
    clock,
    duration,
    duration_or_off,
    float_value,
    int_value,
    join,
    listen,
    nonempty,
    or_auto,
    statuses,
    str_value,
    template,
    topic_template,
    topics,
    url,
)
from gateway.config.schema import (
    CDR_FIELDS,
    CDR_NUMBER_FIELDS,
    FORMATS,
    OPS,
    PAYLOAD_ENCODINGS,
    REPORT_DELIVERIES,
    REPORT_PERIODS,
    RETRY_PRESETS,
    SOURCES,
    AuthConfig,
    BatchPolicy,
    CdrSection,
    Condition,
    Config,
    GatewaySection,
    ModemSection,
    MqttSection,
    RecoverySection,
    ReportConfig,
    RetryPolicy,
    SigningConfig,
    WebhookConfig,
    WebSection,
)
from gateway.config.secrets import expand
from gateway.errors import ConfigError

# The shortest web.token accepted: 16 characters.
MIN_TOKEN_CHARS = 16
# The largest modem.data_budget_mb: a petabyte, far past any SIM plan; it keeps byte
# figures well inside SQLite's 64-bit integers.
MAX_DATA_BUDGET_MB = 1e9


def _read_webhook(r: Reader, path: str, raw: dict[str, Any]) -> WebhookConfig | None:
    fmt = raw.get("format", "monoz")
    per_record = fmt in ("envelope", "flat", "report")
    default_batch = BatchPolicy(window_ms=0, max_items=1) if per_record else BatchPolicy()
    sub: dict[str, Any] = {}

    batch_raw = raw.get("batch", {})
    if "batch" in raw:
        batch_raw = r.table(path, "batch", raw["batch"])
    b = r.read(
        BatchPolicy,
        join(path, "batch"),
        {"window_ms": default_batch.window_ms, "max_items": default_batch.max_items, **batch_raw},
        window_ms=int_value(0, 3_600_000),
        max_items=int_value(1, 10_000),
    )
    if b is not None and per_record and b.max_items != 1:
        r.fail(join(path, "batch.max_items"), f"format '{fmt}' sends one record per POST", 1)
    sub["batch"] = b

    if "auth" in raw:
        a_raw = r.table(path, "auth", raw["auth"])
        a = r.read(
            AuthConfig,
            join(path, "auth"),
            a_raw,
            type=choice("none", "basic", "bearer", "api_key"),
            header=nonempty,
        )
        if a is not None:
            need = {"basic": ("username",), "bearer": ("token",), "api_key": ("key",)}
            for key in need.get(a.type, ()):
                if not getattr(a, key):
                    r.fail(join(path, f"auth.{key}"), f"is required for auth type '{a.type}'")
        sub["auth"] = a

    if "signing" in raw:
        s_raw = r.table(path, "signing", raw["signing"])
        s = r.read(
            SigningConfig,
            join(path, "signing"),
            s_raw,
            scheme=choice("none", "cdr-manager", "standard-webhooks"),
        )
        if s is not None and s.scheme != "none" and not s.secret:
            r.fail(join(path, "signing.secret"), f"is required for scheme '{s.scheme}'")
        if s is not None and s.scheme == "standard-webhooks":
            for part in s.secret.split():
                if not part.startswith("whsec_"):
                    r.fail(join(path, "signing.secret"), "each secret must start with 'whsec_'")
        sub["signing"] = s

    retry_raw = raw.get("retry", {"preset": "durable"})
    if isinstance(retry_raw, str):
        retry_raw = {"preset": retry_raw}
    retry_raw = r.table(path, "retry", retry_raw)
    preset_name = retry_raw.get("preset", "durable")
    if not isinstance(preset_name, str) or preset_name not in RETRY_PRESETS:
        r.fail(join(path, "retry.preset"), "must be 'monoz' or 'durable'", preset_name)
        sub["retry"] = None
    else:
        base = RETRY_PRESETS[preset_name]
        explicit = {k: v for k, v in retry_raw.items() if k != "preset"}
        if "timeout_s" in raw:
            explicit.setdefault("timeout_s", raw["timeout_s"])
        rp = r.read(
            RetryPolicy,
            join(path, "retry"),
            explicit,
            timeout_s=float_value(0, 3600, above=True),
            max_attempts=int_value(0, 1000),
            backoff_min_s=float_value(0, 86400),
            backoff_max_s=float_value(0, 86400),
            max_age_s=float_value(0, 365 * 86400, above=True),
            retry_on_status=statuses,
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
                r.fail(join(path, f"headers.{k}"), "must be a string value with a token name", v)
            else:
                pairs.append((k, v))
        sub["headers"] = tuple(pairs)

    if "when" in raw:
        sub["when"] = _conditions(r, path, "when", raw["when"])

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
        name=nonempty,
        url=url,
        source=choice(*SOURCES),
        format=choice(*FORMATS),
        id_field=choice("ICCID", "Topic"),
        iccid_as=choice("auto", "string"),
        concurrency=int_value(1, 256),
        lag_alert_s=duration_or_off,
        failing_after=int_value(0, 1_000_000),
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
            join(path, "format"),
            f"source '{w.source}' takes format " + " or ".join(repr(a) for a in allowed),
            w.format,
        )
    if w.ca_file and not Path(w.ca_file).is_file():
        r.fail(join(path, "ca_file"), "file does not exist", w.ca_file)
    return w


def _conditions(r: Reader, path: str, key: str, raw: Any) -> tuple[Condition, ...]:
    """A `when` or `filter` list of {field, op, value} tables (one table alone too)."""
    conds = []
    if isinstance(raw, dict):
        raw = [raw]
    if not isinstance(raw, list):
        r.fail(join(path, key), "must be a list of {field, op, value} tables", raw)
        return ()
    for i, c in enumerate(raw):
        cp = f"{join(path, key)}[{i}]"
        if not isinstance(c, dict):
            r.fail(cp, "must be a table {field, op, value}", c)
            continue
        cond = r.read(Condition, cp, c, field=nonempty, op=choice(*OPS), value=None)
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
    return tuple(conds)


def _cdr_filter(r: Reader, path: str, raw: Any) -> tuple[Condition, ...]:
    """A report's `filter`: conditions on CDR fields (names matched regardless of case and
    kept in the CDR's spelling), each value of the field's type: a filter that can never
    match because 222 is not "222" is a mistake to name now, not an empty report later."""
    out = []
    by_lower = {f.lower(): f for f in CDR_FIELDS}
    bad = len(r.problems)
    conds = _conditions(r, path, "filter", raw)
    if len(r.problems) > bad:
        return conds
    for i, c in enumerate(conds):
        cp = f"{join(path, 'filter')}[{i}]"
        name = by_lower.get(c.field.lower())
        if name is None:
            known = ", ".join(CDR_FIELDS)
            r.fail(f"{cp}.field", f"is not a CDR field (one of {known})", c.field)
            continue
        number = name in CDR_NUMBER_FIELDS
        values = c.value if c.op == "in" else [c.value]
        if c.op in ("contains", "startswith", "regex"):
            want, ok = "a string", all(isinstance(v, str) for v in values)
        elif number:
            want = "a number"
            ok = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
        else:
            want, ok = "a string", all(isinstance(v, str) for v in values)
        if not ok:
            what = f"must be {want}" if c.op != "in" else f"must be a list of {want[2:]}s"
            r.fail(f"{cp}.value", f"{what} for {name} with op '{c.op}'", c.value)
            continue
        out.append(dataclasses.replace(c, field=name))
    return tuple(out)


def _read_report(r: Reader, path: str, rep: dict[str, Any]) -> ReportConfig | None:
    rep = dict(rep)
    if "every" in rep:
        rep["every_s"] = rep.pop("every")
    bad = len(r.problems)
    conds = _cdr_filter(r, path, rep.pop("filter")) if "filter" in rep else ()
    rc = r.read(
        ReportConfig,
        path,
        rep,
        name=nonempty,
        task_id=int_value(0, None),
        every_s=duration,
        at=clock,
        webhook=str_value,
        delivery=choice(*REPORT_DELIVERIES),
        period=choice(*REPORT_PERIODS),
        push_max_mb=float_value(0, 1024, above=True),
    )
    if rc is None or len(r.problems) > bad:
        return None
    if rc.period != "since_last" and "every_s" in rep:
        r.fail(
            join(path, "every"),
            f"does not go with period '{rc.period}', which runs once after each period ends"
            " (leave it out; `at` may set the local time of day)",
            rep["every_s"],
        )
        return None
    if rc.delivery == "push" and not rc.webhook:
        r.fail(join(path, "webhook"), "is required with delivery = 'push'")
        return None
    return dataclasses.replace(rc, filter=conds)


def _dead_letter_limit(r: Reader, g: GatewaySection, raw: Any) -> GatewaySection:
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
    r = Reader(need_secrets)
    raw = expand(raw, "", r.fail if r.need_secrets else None, env)
    sections = {"gateway", "mqtt", "modem", "cdr", "webhooks", "reports", "web"}
    r.unknown("", raw, sections)

    g = r.read(
        GatewaySection,
        "gateway",
        r.table("", "gateway", raw.get("gateway", {})),
        state_dir=lambda v: Path(nonempty(v)),
        max_buffer_mb=float_value(0, None, above=True),
        on_full=choice("backpressure", "drop_oldest"),
        commit_max_packets=int_value(1, 100_000),
        commit_delay_ms=or_auto(float_value(0, 1000)),
        log_level=choice("debug", "info", "warning", "error"),
        log_format=choice("text", "json"),
        min_free_mb=float_value(0, None),
        dead_letter_max_mb=float_value(0, None, above=True),
        dead_letter_max_age=duration_or_off,
        retention_days=float_value(1, 3650),
        heartbeat_s=_heartbeat,
        flap_interval_s=_flap_interval,
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
            host=nonempty,
            port=int_value(1, 65535),
            client_id=nonempty,
            topics=topics,
            qos=int_value(0, 1),
            iccid_from_topic=topic_template,
            payload_encoding=choice(*PAYLOAD_ENCODINGS),
            max_payload_bytes=int_value(1, 256 * 1024 * 1024),
            protocol=choice("5", "3.1.1"),
            keepalive_s=int_value(5, 3600),
            session_expiry_s=int_value(0, 2**32 - 1),
            receive_maximum=int_value(1, 65535),
            reconnect_min_s=float_value(0, 3600, above=True),
            reconnect_max_s=float_value(0, 3600, above=True),
            ingest_processes=int_value(1, 16),
        )
        for key in ("ca_file", "cert_file", "key_file"):
            p = getattr(m, key) if m is not None else ""
            if m is None or not p:
                continue
            if not m.tls:
                # The connection would be plain: the CA or the client certificate the
                # operator set up would silently not be used.
                r.fail(f"mqtt.{key}", "is set but mqtt.tls is not true (set mqtt.tls = true)", p)
            elif not Path(p).is_file():
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
        modem_raw = dict(r.table("", "modem", raw["modem"]))
        recovery = _read_recovery(r, modem_raw.pop("recovery", {}))
        modem = r.read(
            ModemSection,
            "modem",
            modem_raw,
            port=nonempty,
            baudrate=int_value(300, 4_000_000),
            profile=choice("auto", "generic", "quectel", "ublox", "simcom", "telit", "huawei"),
            poll_interval_s=float_value(0, 86400, above=True),
            command_timeout_s=float_value(0, 600, above=True),
            data_budget_mb=_data_budget_mb,
            billing_day=_billing_day,
        )
        if modem is not None and recovery is not None:
            modem = dataclasses.replace(modem, recovery=recovery)

    cdr = r.read(
        CdrSection,
        "cdr",
        r.table("", "cdr", raw.get("cdr", {})),
        interval_s=duration,
        thing_name=template("iccid", "imsi", "imei"),
        thing_id=template("iccid", "imsi", "imei"),
        things_group_id=template("iccid", "imsi", "imei"),
        things_group_name=template("iccid", "imsi", "imei"),
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
        rc = _read_report(r, path, rep)
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
        listen=listen,
        public_url=url,
        sample_s=float_value(0.1, 600.0),
        allowed_hosts=_host_names,
        read_timeout_s=float_value(0.1, 600.0),
    )
    if web is not None:
        _check_web(r, web)

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


# The shortest gateway.heartbeat_s: a fleet's receiver takes one event per site each
# time, and the heartbeat reads the store.
MIN_HEARTBEAT_S = 10.0


def _heartbeat(value: Any) -> float:
    seconds = duration_or_off(value)
    if 0 < seconds < MIN_HEARTBEAT_S:
        raise Bad(f"must be at least {MIN_HEARTBEAT_S:g} s, or 0 for no heartbeat")
    return seconds


def _flap_interval(value: Any) -> float:
    seconds = duration(value)
    if not 1 <= seconds <= 86400:
        raise Bad("must be between 1 s and 1 day")
    return seconds


def _data_budget_mb(value: Any) -> float:
    """MB (of 1,048,576 bytes) per billing cycle, fractions allowed; 0 is off."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise Bad("must be a number of MB (0 for no budget)")
    if not math.isfinite(value):
        raise Bad("must be a finite number of MB (0 for no budget)")
    if value < 0:
        raise Bad("must be at least 0 (0 for no budget)")
    if value > MAX_DATA_BUDGET_MB:
        raise Bad(f"must be at most {MAX_DATA_BUDGET_MB:g}")
    if 0 < value * 1024 * 1024 < 1:
        raise Bad("must be 0 or at least 1 byte (0.000001 MB)")
    return float(value)


def _billing_day(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise Bad("must be a day of the month, 1-28")
    if not 1 <= value <= 28:
        # A cycle starting on the 29th-31st would have no start in a shorter month.
        raise Bad("must be 1-28 (the 29th-31st do not exist in every month)")
    return value


def _read_recovery(r: Reader, raw: Any) -> RecoverySection | None:
    """[modem.recovery]; the power-cycle command must split into a program and arguments."""
    rec = r.read(
        RecoverySection,
        "modem.recovery",
        r.table("modem", "recovery", raw),
        unregistered_s=float_value(0, 7 * 86400, above=True),
        unresponsive_s=float_value(0, 7 * 86400, above=True),
        settle_s=float_value(0, 3600, above=True),
        max_resets_per_hour=int_value(0, 60),
        power_cycle_timeout_s=float_value(0, 3600, above=True),
    )
    if rec is not None and rec.power_cycle_command.strip():
        try:
            argv = shlex.split(rec.power_cycle_command)
        except ValueError as exc:
            r.fail(
                "modem.recovery.power_cycle_command",
                f"is not a valid command line ({exc})",
                rec.power_cycle_command,
            )
            return None
        shell = Path(argv[0]).name in ("sh", "bash", "dash") if argv else False
        if not shell and any(ch in rec.power_cycle_command for ch in "|;&<>`$"):
            # It runs as a process, never through a shell: a pipe or a redirection
            # would reach the program as a literal argument.
            r.fail(
                "modem.recovery.power_cycle_command",
                "runs without a shell: shell syntax (| ; & < > ` $) would be passed as"
                " arguments; wrap it in a script or give sh -c '...' explicitly",
                rec.power_cycle_command,
            )
            return None
    return rec


def _host_names(value: Any) -> tuple[str, ...]:
    if not isinstance(value, list) or not all(isinstance(h, str) for h in value):
        raise Bad("must be a list of host names")
    out = []
    for h in value:
        name = h.strip().lower().strip("[]")
        if not name or not re.fullmatch(r"[a-z0-9._:-]+", name):
            raise Bad(f"'{h}' is not a host name or address (no port, no scheme)")
        out.append(name)
    return tuple(out)


def _check_web(r: Reader, web: WebSection) -> None:
    if not web.enabled:
        return
    if not web.token and not web.loopback:
        r.fail("web.token", f"is required when web.listen is not loopback ({web.listen})")
    # A short token falls to guessing, rate limit or not.
    if web.token and len(web.token) < MIN_TOKEN_CHARS:
        r.fail("web.token", f"must be at least {MIN_TOKEN_CHARS} characters long")
    if bool(web.tls_cert) != bool(web.tls_key):
        missing = "web.tls_key" if web.tls_cert else "web.tls_cert"
        r.fail(missing, "is required with the other of web.tls_cert and web.tls_key")
        return
    if web.tls_cert:
        for key in ("tls_cert", "tls_key"):
            try:
                Path(getattr(web, key)).read_bytes()
            except OSError as exc:
                r.fail(f"web.{key}", f"cannot read it ({exc.strerror})", getattr(web, key))
                return
        ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            ctx.load_cert_chain(web.tls_cert, web.tls_key)
        except (ssl.SSLError, ValueError) as exc:
            r.fail("web.tls_cert", f"not a certificate matching web.tls_key ({exc})")


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

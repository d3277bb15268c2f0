"""The `gateway` command; a GatewayError becomes one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gateway import __version__, logs
from gateway import config as config_mod
from gateway import store as store_mod
from gateway.errors import ConfigError, GatewayError
from gateway.web import status as status_mod

DEFAULT_CONFIG = "/etc/edge-gateway/gateway.toml"


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gateway", description="IoT edge gateway")
    p.add_argument("--version", action="version", version=f"edge-gateway {__version__}")
    _log_options(p, default=None)
    sub = p.add_subparsers(dest="command", required=True)

    def with_config(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("-c", "--config", default=DEFAULT_CONFIG, help="TOML config file")

    run = sub.add_parser("run", help="run the gateway")
    with_config(run)
    # Also after `run`; SUPPRESS keeps a value given before `run` from being reset.
    _log_options(run, default=argparse.SUPPRESS)
    with_config(sub.add_parser("check-config", help="validate and print the effective config"))
    s = sub.add_parser("status", help="packet and webhook figures from the store")
    with_config(s)
    s.add_argument("--json", action="store_true")

    modem = sub.add_parser("modem", help="the cellular modem")
    msub = modem.add_subparsers(dest="modem_command", required=True)
    mi = msub.add_parser("info", help="read identity, network and counters once")
    mi.add_argument("--port", required=True, help="tty, pty, socket://host:port, rfc2217://…")
    mi.add_argument(
        "--profile",
        default="auto",
        choices=["auto", "generic", "quectel", "ublox", "simcom", "telit", "huawei"],
    )
    mi.add_argument("--json", action="store_true")
    mi.add_argument("--timeout", type=float, default=5.0, help="per-command timeout, seconds")
    mi.add_argument("--interface", default="wwan0", help="network interface for sysfs counters")
    ms = msub.add_parser("signal", help="the radio over time, from the stored snapshots")
    with_config(ms)
    ms.add_argument("--since", default="1h", help="ISO date/time (UTC), epoch ms, or an age")
    ms.add_argument("--json", action="store_true")
    mr = msub.add_parser(
        "reset",
        help="one recovery step now (counted toward modem.recovery.max_resets_per_hour)",
    )
    with_config(mr)
    mr.add_argument(
        "--step",
        choices=["radio_cycle", "reset"],
        default="reset",
        help="radio_cycle: AT+CFUN=0 then 1; reset (default): the profile's reset command",
    )

    demo = sub.add_parser("demo", help="run broker, fleet, sink and gateway locally")
    demo.add_argument("--duration", type=float, default=None, help="seconds (default: Ctrl-C)")
    demo.add_argument("--devices", type=int, default=10)
    demo.add_argument("--rate", type=float, default=1.0, help="packets/s per device")
    demo.add_argument("--keep", action="store_true", help="keep the demo's temp directory")
    demo.add_argument(
        "--broker",
        choices=["auto", "mosquitto", "amqtt"],
        default="auto",
        help="auto: mosquitto when installed, else the embedded amqtt broker",
    )
    demo.add_argument("--workdir", type=Path, default=None, help="use (and keep) this directory")
    demo.add_argument("--cdr-interval", type=float, default=None, help="seconds per CDR")
    demo.add_argument("--report-every", type=float, default=None, help="seconds per report")

    dlq = sub.add_parser("dlq", help="dead letters")
    dsub = dlq.add_subparsers(dest="dlq_command", required=True)
    dl = dsub.add_parser("list", help="list dead letters")
    with_config(dl)
    dl.add_argument("--webhook")
    dl.add_argument("--json", action="store_true")
    dr = dsub.add_parser("replay", help="re-queue dead letters for delivery")
    with_config(dr)
    dr.add_argument("--webhook")
    dr.add_argument("--id", type=int, nargs="+", action="extend", default=[], metavar="N")
    dp = dsub.add_parser("purge", help="delete dead letters for good")
    with_config(dp)
    dp.add_argument("--webhook", help="a webhook's letters ('' for oversize packets)")
    dp.add_argument("--older-than", metavar="AGE", help="made longer ago than AGE, e.g. 7d")
    dp.add_argument("--id", nargs="+", action="extend", default=[], metavar="N")
    dp.add_argument("--all", action="store_true", help="every dead letter (no filter given)")
    cdr = sub.add_parser("cdr", help="usage CDRs and CDR reports")
    csub = cdr.add_subparsers(dest="cdr_command", required=True)
    cl = csub.add_parser("list", help="list usage CDRs")
    with_config(cl)
    cl.add_argument(
        "--since", default="", help="ISO date/time (UTC), epoch ms, or an age such as 24h"
    )
    cl.add_argument("--json", action="store_true")
    ce = csub.add_parser("export", help="export a [[reports]] entry now and queue its notice")
    with_config(ce)
    ce.add_argument("--report", required=True, help="the [[reports]] name")
    return p


def _since_ms(text: str) -> int:
    """--since as epoch ms: '', epoch ms, an ISO date/time (UTC when no zone), or an age."""
    import datetime as dt
    import re
    import time

    text = text.strip()
    if not text:
        return 0
    if text.isdigit():
        return int(text)
    m = re.fullmatch(r"(\d+(?:\.\d+)?)(s|m|h|d)", text)
    if m:
        scale = {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]
        return int((time.time() - float(m.group(1)) * scale) * 1000)
    try:
        when = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        raise GatewayError(
            f"--since: expected an ISO date/time, epoch ms or an age such as 24h, got {text!r}"
        ) from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


def _cdr_cmd(args: argparse.Namespace) -> int:
    from gateway.delivery import formats
    from gateway.usage import cdr, reports

    cfg = _load(args)
    if args.cdr_command == "list":
        since = _since_ms(args.since)
        conn = store_mod.connect(cfg.db_path, readonly=True) if cfg.db_path.exists() else None
        rows = cdr.list_cdrs(conn, since, limit=100_000) if conn else []
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        for r in rows:
            ts = formats.iso_ms(r["Timestamp"] * 1_000_000)
            print(f"{r['UniqueID']}  {ts}  {r['Iccid']:<20}  {r['Usage']:>12} B  {r['MnoName']}")
        print(f"{len(rows)} CDR(s), {sum(r['Usage'] for r in rows)} bytes")
        return 0
    rc = next((r for r in cfg.reports if r.name == args.report), None)
    if rc is None:
        names = ", ".join(r.name for r in cfg.reports) or "none configured"
        raise GatewayError(f"--report: no [[reports]] entry named {args.report!r} ({names})")
    import time

    _require_store_owner(cfg, args)
    conn = store_mod.connect(cfg.db_path)
    try:
        store_mod.migrate(conn)
        out = reports.export(conn, cfg, rc, time.time_ns())
    finally:
        conn.close()
    n = out.notice
    if n["error"]:
        print(f"report {rc.name}: {n['error']}", file=sys.stderr)
    else:
        print(
            f"report {rc.name}: {n['fileName']}, {n['numberOfLines']} CDR(s), "
            f"{n['fileSizeInBytes']} bytes at {out.path}"
        )
        if out.url:
            print(f"download (until {n['validUntil']}): {out.url}")
    if rc.webhook:
        what = "push (notice and zip)" if rc.delivery == "push" else "notice"
        print(f"{what} queued for webhook {rc.webhook!r} (sent by the running gateway)")
    return 1 if n["error"] else 0


def _log_options(p: argparse.ArgumentParser, default: Any) -> None:
    p.add_argument(
        "--log-level",
        default=default,
        choices=["debug", "info", "warning", "error"],
        help="overrides gateway.log_level, also across reloads",
    )
    p.add_argument(
        "--log-format",
        default=default,
        choices=list(logs.FORMATS),
        help="text (default) or json lines; overrides gateway.log_format",
    )


def _require_store_owner(cfg: config_mod.Config, args: argparse.Namespace) -> None:
    """Refuse to write a store that belongs to another user, root included: SQLite's
    -wal and -shm files, report zips and a new database made by this process would be
    this user's, and the service could no longer write them."""
    target = cfg.db_path
    if not target.exists():
        target = cfg.gateway.state_dir
        if not target.is_dir():
            return
    uid = target.stat().st_uid
    if uid == os.geteuid():
        return
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        name = f"#{uid}"  # as sudo -u takes a uid without a name
    command = shlex.join(["gateway", *args.argv])
    raise GatewayError(
        f"{target} belongs to {name}, and this command writes the store: run it as {name}:"
        f" sudo -u {shlex.quote(name)} {command}"
    )


def _load(args: argparse.Namespace) -> config_mod.Config:
    # Only `run` and `check-config` need the secrets: `status` and `dlq` read the store,
    # and an operator runs them without the service's $CREDENTIALS_DIRECTORY.
    need = args.command in ("run", "check-config")
    return config_mod.load(args.config, need_secrets=need)


WEBHOOK_COLUMNS = (
    ("webhook", "name"),
    ("hits", "hits"),
    ("delivered", "delivered"),
    ("failed", "requests_failed"),
    ("retried", "retried"),
    ("queue", "queue_depth"),
    ("delivery", "oldest_pending_s"),
    ("dead_letters", "dead_letters"),
    ("last_hit", "last_hit"),
    ("last_success", "last_success"),
    ("state", "disabled"),
    ("last_error", "last_error"),
)


def _webhook_table(hooks: list[dict[str, Any]]) -> list[str]:
    """The per-webhook table the dashboard shows, as aligned text lines."""
    rows = []
    for h in hooks:
        cells = []
        for _title, key in WEBHOOK_COLUMNS:
            if key == "disabled":
                value = "disabled" if h["disabled"] else "ok"
            elif key == "oldest_pending_s":
                value = status_mod.behind_text(h.get(key) or 0.0)
            elif key == "last_error":
                value = h["last_error"].replace("\n", " ")[:80]
                if value and h["last_error_at"]:
                    value = f"{h['last_error_at']} {value}"
            else:
                value = "-" if h[key] in ("", None) else str(h[key])
            cells.append(value)
        rows.append(cells)
    titles = [t for t, _ in WEBHOOK_COLUMNS]
    widths = [max(len(t), *(len(r[i]) for r in rows)) for i, t in enumerate(titles)]
    return [
        "  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip()
        for r in [titles, *rows]
    ]


def _data_size(n: int) -> str:
    """Bytes in the MB of modem.data_budget_mb (1,048,576 bytes), KB below one MB."""
    mb = n / (1024 * 1024)
    if mb >= 100:
        return f"{mb:.0f} MB"
    if mb >= 1:
        return f"{mb:.1f} MB"
    return f"{n / 1024:.1f} KB" if n >= 1024 else f"{n} bytes"


def _data_budget_line(d: dict[str, Any]) -> str:
    """'data     this cycle: 412 MB of 500 MB (82 %), cycle from 2026-12-01'."""
    used = _data_size(d["used_bytes"])
    if d["budget_bytes"]:
        used += f" of {_data_size(d['budget_bytes'])} ({int(d['percent'])} %)"
    else:
        used += " (no data_budget_mb)"
    return f"data     this cycle: {used}, cycle from {d['cycle_start'][:10]}"


def _print_status(snap: dict[str, Any]) -> None:
    p = snap["packets"]
    print("packets  " + "  ".join(f"{k}={v}" for k, v in p.items()))
    print("rejected " + "  ".join(f"{k}={v}" for k, v in snap["rejected"].items()))
    b = snap["buffer"]
    if b.get("max_bytes"):
        print(
            f"buffer   {(b['bytes'] + b['dead_letter_bytes'] + b['retained_bytes']) / 1e6:.1f}"
            f" MB of {b['max_bytes'] / 1e6:.0f} MB ({b['dead_letter_bytes'] / 1e6:.1f} MB dead"
            f" letters, {b['retained_bytes'] / 1e6:.1f} MB CDRs, events, snapshots, reports)"
        )
    print(f"dead     {snap['dead_letters']} letter(s), {snap['dead_letters_evicted']} evicted")
    tables = snap.get("tables")
    if tables:
        pruned = snap.get("retention", {}).get("pruned", {})
        print(
            "tables   "
            + "  ".join(
                f"{name}={t['rows']} ({t['bytes'] / 1e6:.1f} MB"
                + (f", {pruned[name]} pruned)" if pruned.get(name) else ")")
                for name, t in tables.items()
            )
        )
    disk = snap.get("storage")
    if disk:
        free = f"{disk['free_bytes'] / 1e6:.1f} MB free" if "free_bytes" in disk else "?"
        print(f"storage  {free} on {disk['state_dir']}  {disk['problem'] or 'ok'}")
        last = disk.get("last_write_failure")
        if last:
            print(
                f"         last write failure {last['since']} .. {last['until']}: {last['error']}"
            )
    m = snap.get("modem")
    if m and m["info"]:
        i = m["info"]
        today = m["bytes_today"]
        print(
            f"modem    {m['state']} at {m['updated']}  {i.get('operator') or '?'}"
            f" ({i.get('mcc') or '?'}/{i.get('mnc') or '?'})  ICCID {i.get('iccid') or '?'}"
            f"  signal {i.get('signal_dbm')} dBm"
            + (f"  {today} bytes today" if today is not None else "")
        )
        from gateway.modem.signal import summary

        radio = summary(i, m.get("signal_quality"))
        if radio:
            print(f"radio    {radio}")
    if m and m.get("recovery"):
        print(_recovery_line(m["recovery"]))
    if snap.get("data_budget"):
        print(_data_budget_line(snap["data_budget"]))
    c = snap["cdrs"]
    print(f"cdrs     {c['count']} stored, {c['pending_usage']} bytes not yet in a CDR")
    if snap["reports"]:
        r = snap["reports"][0]
        print(
            f"reports  {len(snap['reports'])} recent; newest {r['file_name']}"
            f" valid until {r['valid_until']}{' (expired)' if r['expired'] else ''}"
        )
    hooks = snap["webhooks"]
    if not hooks:
        print("webhooks (none configured: packets are stored and wait)")
        return
    print()
    for line in _webhook_table(hooks):
        print(line)


def _recovery_line(r: dict[str, Any]) -> str:
    """`gateway status`'s line for the modem recovery ladder."""
    if r.get("enabled") is False:
        head = "off"
    elif r["state"] == "gave_up":
        head = f"gave up until {status_mod.iso(int(r['resume_at'] * 1e9))}"
    elif r["state"] == "recovering":
        head = f"recovering ({r['problem']})"
    else:
        head = "idle"
    last = r.get("last")
    if last:
        when = status_mod.iso(int(last.get("at", 0) * 1e9)) or "?"
        outcome = f", {last['outcome']}" if last.get("outcome") else ""
        head += f"; last step {last.get('step')} at {when}{outcome}"
    limit = r.get("max_resets_per_hour")
    used = f"{r['resets_last_hour']} of {limit}" if limit is not None else r["resets_last_hour"]
    totals = " ".join(f"{k}={v}" for k, v in r["totals"].items())
    return f"recovery {head}; resets this hour {used}; total {totals}"


def _modem_signal(args: argparse.Namespace) -> int:
    from gateway.modem import signal

    cfg = _load(args)
    since_ns = _since_ms(args.since) * 1_000_000
    if not cfg.db_path.exists():
        raise GatewayError(f"no store at {cfg.db_path} (has the gateway run with this state_dir?)")
    conn = store_mod.connect(cfg.db_path, readonly=True)
    try:
        return signal.command(conn, since_ns, args.json)
    finally:
        conn.close()


def _cmd(args: argparse.Namespace) -> int:
    if args.command == "check-config":
        cfg = _load(args)
        print(json.dumps(config_mod.masked(cfg), indent=2, default=str))
        for warning in config_mod.warnings(cfg):
            print(f"gateway: warning: {warning}", file=sys.stderr)
        return 0
    if args.command == "run":
        cfg = _load(args)
        logs.setup(
            args.log_level or cfg.gateway.log_level,
            args.log_format or cfg.gateway.log_format,
            level_fixed=args.log_level is not None,
            secret_values=logs.secret_values(cfg),
        )
        for warning in config_mod.warnings(cfg):
            logging.getLogger("gateway.config").warning("%s", warning)
        _require_store_owner(cfg, args)
        from gateway.runtime import service

        return service.main(cfg)
    if args.command == "status":
        cfg = _load(args)
        snap = status_mod.read(cfg.db_path, cfg)
        if args.json:
            print(json.dumps(snap, indent=2))
        else:
            _print_status(snap)
        return 0
    if args.command == "modem" and args.modem_command == "signal":
        return _modem_signal(args)
    if args.command == "modem" and args.modem_command == "reset":
        from gateway.modem import reset

        cfg = _load(args)
        _require_store_owner(cfg, args)
        return reset.command(cfg, args.step)
    if args.command == "modem":
        from gateway.modem import info

        return info.command(args.port, args.profile, args.json, args.timeout, args.interface)
    if args.command == "demo":
        from gateway import demo

        return demo.run(
            args.duration,
            args.devices,
            args.rate,
            args.keep,
            broker=args.broker,
            workdir=args.workdir,
            cdr_interval_s=args.cdr_interval,
            report_every_s=args.report_every,
        )
    if args.command == "cdr":
        return _cdr_cmd(args)
    if args.command == "dlq":
        cfg = _load(args)
        if args.dlq_command == "list":
            conn = store_mod.connect(cfg.db_path, readonly=True) if cfg.db_path.exists() else None
            rows = store_mod.list_dead_letters(conn, args.webhook) if conn else []
            if args.json:
                print(json.dumps(rows, indent=2))
            else:
                for r in rows:
                    kept = f" sha256={r['sha256'][:16]}" if r["sha256"] else ""
                    print(
                        f"{r['id']:>6}  {r['webhook'] or '(ingest)':<12} {r['reason']:<16} "
                        f"records={r['records']} status={r['status']}{kept}"
                        f" {r['excerpt'] or ''}"[:160]
                    )
                print(f"{len(rows)} dead letter(s)")
            return 0
        if args.dlq_command == "purge":
            return _purge(cfg, args)
        _require_store_owner(cfg, args)
        conn = store_mod.connect(cfg.db_path)
        try:
            store_mod.migrate(conn)
            done = store_mod.requeue_dead_letters(conn, args.webhook, args.id)
        finally:
            conn.close()
        print(f"re-queued {done.requeued} dead letter(s)")
        if done.skipped:
            shown = ", ".join(str(i) for i in done.skipped[:20])
            more = ", ..." if len(done.skipped) > 20 else ""
            print(
                f"skipped {len(done.skipped)} oversize packet(s) (ids {shown}{more}): their"
                " dead letters keep only the first"
                f" {store_mod.DEAD_LETTER_PREFIX_BYTES} bytes of the payload, which cannot be"
                " delivered as it came; `gateway dlq purge --id N` removes them"
            )
        return 0
    raise AssertionError(args.command)


def _purge(cfg: config_mod.Config, args: argparse.Namespace) -> int:
    """`gateway dlq purge`: bad input is one line and exit 2, before the store is opened."""
    import time

    before_ns = 0
    if args.older_than is not None:
        try:
            age = config_mod.duration_s(args.older_than)
        except ValueError as exc:
            raise GatewayError(f"--older-than: {exc}, got {args.older_than!r}") from None
        before_ns = time.time_ns() - int(age * 1e9)
    ids = []
    for text in args.id:
        if not text.isdigit():
            raise GatewayError(f"--id: must be a dead letter's id (a number), got {text!r}")
        ids.append(int(text))
    chosen = args.webhook is not None or before_ns or ids
    if args.all and chosen:
        raise GatewayError("--all purges every dead letter: give it without other filters")
    if not args.all and not chosen:
        raise GatewayError(
            "nothing chosen to purge: give --webhook, --older-than or --id"
            " (or --all for every dead letter)"
        )
    if not cfg.db_path.exists():
        print("purged 0 dead letter(s)")
        return 0
    _require_store_owner(cfg, args)
    conn = store_mod.connect(cfg.db_path)
    try:
        store_mod.migrate(conn)
        n = store_mod.purge_dead_letters(
            conn, args.webhook, before_ns, ids, everything=bool(args.all)
        )
    finally:
        conn.close()
    print(f"purged {n} dead letter(s)")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `gateway` console script."""
    args = _parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # to name the command again
    try:
        return _cmd(args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(
                f"gateway: config error: {exc.source + ': ' if exc.source else ''}{problem}",
                file=sys.stderr,
            )
        return 2
    except GatewayError as exc:
        print(f"gateway: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())

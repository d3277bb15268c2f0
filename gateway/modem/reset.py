"""`gateway modem reset`: one recovery step now, recorded and counted like the ladder's.

An operator's step always runs, whatever the hour's budget says, and counts toward it:
the ladder of a gateway started afterwards sees it. The port is opened with an exclusive
lock, which a running gateway's poller holds: then the command says so and does nothing
(over socket:// there is no lock, and the emulator or ser2net gives the port to the
newest connection, so stop the gateway first).
"""

from __future__ import annotations

import time

from gateway.config import Config
from gateway.errors import GatewayError, ModemError
from gateway.modem import recovery
from gateway.modem.at import AtChannel, PortBusy, describe
from gateway.modem.profiles import REGISTERED, Profile, detect, make_profile, read_fields
from gateway.store import connect, migrate

MANUAL_STEPS = ("radio_cycle", "reset")
# No budget refuses an operator's step.
UNLIMITED = 1_000_000


def _open(cfg: Config) -> AtChannel:
    assert cfg.modem is not None
    m = cfg.modem
    try:
        return AtChannel.open(
            m.port, baudrate=m.baudrate, timeout=m.command_timeout_s, exclusive=True
        )
    except PortBusy as exc:
        raise GatewayError(
            f"{exc}: a running gateway polls it. Stop the gateway (systemctl stop"
            " edge-gateway) and run this again, or leave it to the gateway's recovery"
            " ladder ([modem.recovery])"
        ) from exc
    except ModemError as exc:
        raise GatewayError(describe(exc)) from exc


def _profile(ch: AtChannel, cfg: Config) -> Profile:
    assert cfg.modem is not None
    try:
        ch.init()
        return detect(ch, cfg.modem.profile, interface=cfg.modem.interface)
    except ModemError:
        # A hung modem answers nothing but may still obey the reset command.
        name = cfg.modem.profile if cfg.modem.profile != "auto" else "generic"
        return make_profile(name, interface=cfg.modem.interface)


def _record(cfg: Config, step: str) -> int:
    """Store the step's event and count it; the radio cycles and resets of the last hour."""
    assert cfg.modem is not None
    data = {
        "port": cfg.modem.port,
        "step": step,
        "reason": "manual: gateway modem reset",
        "attempt": 1,
    }
    conn = connect(cfg.db_path)
    try:
        migrate(conn)
        budget = recovery.record(conn, time.time_ns(), data, {}, UNLIMITED)
    finally:
        conn.close()
    return len(budget or [])


def _registration(ch: AtChannel, profile: Profile, seconds: float) -> str:
    deadline = time.monotonic() + seconds
    reg = ""
    while True:
        fields, _failed = read_fields(ch, profile, ("registration",))
        reg = str(fields.get("registration") or "")
        if reg in REGISTERED or time.monotonic() >= deadline:
            return reg or "unknown"
        time.sleep(0.2)


def command(cfg: Config, step: str = "reset") -> int:
    """Take one step now; 0 when the modem answered (and for a radio cycle, registered)."""
    if cfg.modem is None:
        raise GatewayError("no [modem] section in the config: there is no modem to reset")
    if step not in MANUAL_STEPS:
        raise GatewayError(f"--step must be one of {', '.join(MANUAL_STEPS)}, got {step!r}")
    m = cfg.modem
    rcfg = m.recovery
    ch = _open(cfg)
    try:
        profile = _profile(ch, cfg)
        used = _record(cfg, step)
    except BaseException:
        ch.close()
        raise
    limit = rcfg.max_resets_per_hour
    over = " (over the limit: the recovery ladder waits)" if used > limit else ""
    print(f"{step}: {used} radio cycle(s) and reset(s) in the last hour, limit {limit}{over}")
    started = time.monotonic()
    if step == "radio_cycle":
        try:
            recovery.radio_cycle(ch, m.command_timeout_s)
            reg = _registration(ch, profile, rcfg.settle_s)
        except ModemError as exc:
            print(f"radio cycle failed: {describe(exc)}")
            return 2
        finally:
            ch.close()
        print(f"radio cycle done; registration: {reg}")
        return 0 if reg in REGISTERED else 1
    deadline = started + rcfg.settle_s
    error = recovery.reset(ch, m, profile.reset_command, deadline)  # closes ch
    if error:
        print(f"{profile.reset_command} failed: {error}")
        return 2

    def back() -> None:
        with AtChannel.open(
            m.port, baudrate=m.baudrate, timeout=m.command_timeout_s, exclusive=True
        ) as again:
            again.init()

    error = recovery.wait_back(back, deadline, lambda: False)
    if error:
        print(
            f"{profile.reset_command} sent; the modem did not answer within {rcfg.settle_s:g} s:"
            f" {error}"
        )
        return 2
    print(
        f"{profile.reset_command} sent; the modem answered again after"
        f" {time.monotonic() - started:.1f} s"
    )
    return 0

"""The recovery ladder: what the poller does about a modem that stays off the network or
stops answering.

A problem is "unregistered" (the modem answers, the SIM is ready, the network says
neither home nor roaming) or "unresponsive" (no valid AT answer). Once one has lasted
`unregistered_s` / `unresponsive_s`, the ladder takes the first step that applies, and each
further step only when the one before did not bring the modem back within `settle_s`:

    reopen        close and re-open the port                        (unresponsive only)
    radio_cycle   AT+CFUN=0, then AT+CFUN=1                         (unregistered only)
    reset         the profile's reset command (AT+CFUN=1,1 …), then wait for the port and
                  the modem to come back and set echo/errors up again
    power_cycle   run modem.recovery.power_cycle_command (when set)
    gave_up       nothing more until an hour after the last radio cycle or reset

A reading without the problem ends the ladder. Radio cycles and resets together are
limited to `max_resets_per_hour`; a step the budget does not allow gives up instead. Every
step is recorded (event, counter, the `modem_recovery` meta row) before it is taken, so
that a gateway that restarts, even because of the step, still counts it: after a restart
the ladder goes on from the step after the last one, and a ladder that gave up stays so.
"""

from __future__ import annotations

import asyncio
import logging
import math
import shlex
import sqlite3
import subprocess
import time
from collections.abc import Callable
from typing import Any

import orjson

from gateway.config import ModemSection, RecoverySection
from gateway.errors import ModemError
from gateway.modem.at import AtChannel, AtTimeout, PortError, describe
from gateway.store import Store, add_event, bump, counters, get_meta, set_meta, transaction

log = logging.getLogger("gateway.modem")

# Every step in ladder order; each problem takes those that apply to it.
ORDER = ("reopen", "radio_cycle", "reset", "power_cycle")
STEPS = (*ORDER, "gave_up")
APPLIES = {
    "unresponsive": frozenset({"reopen", "reset", "power_cycle"}),
    "unregistered": frozenset({"radio_cycle", "reset", "power_cycle"}),
}
# The steps max_resets_per_hour counts.
BUDGETED = frozenset({"radio_cycle", "reset"})
WINDOW_S = 3600.0
META_KEY = "modem_recovery"
COUNTER_PREFIX = "modem_recoveries_"
# Between AT+CFUN=0 and AT+CFUN=1: time for the modem to detach from the network.
RADIO_OFF_S = 1.0
# AT+CFUN=0/1 detach from or attach to the network before answering: up to 15 s (Quectel).
RADIO_TIMEOUT_S = 15.0
# How long a reset modem has to drop its port or announce its boot before it is looked for.
DOWN_WAIT_S = 5.0
# Between attempts to open a port that is coming back.
REOPEN_PAUSE_S = 0.2


def problem_of(state: str, registration: str | None) -> str | None:
    """The ladder's view of one poll: "unresponsive", "unregistered", "" (nothing to do),
    or None when the poll cannot tell (the registration was unreadable)."""
    if state in ("unreachable", "error"):
        return "unresponsive"
    if state in ("starting", "sim_busy"):
        return None  # a SIM still starting up after a reset says nothing yet
    if state != "ok":
        return ""  # no SIM, or one asking for a PIN: no reset puts a SIM in
    if registration is None:
        return None
    return "" if registration in ("home", "roaming") else "unregistered"


# -- what is kept in the store ------------------------------------------------------------


def load_saved(conn: sqlite3.Connection) -> dict[str, Any]:
    """The `modem_recovery` meta row as a dict ({} when missing or damaged)."""
    try:
        data = orjson.loads(get_meta(conn, META_KEY, "{}") or "{}")
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _times(value: Any) -> list[float]:
    if not isinstance(value, list):
        return []
    return [float(t) for t in value if isinstance(t, int | float) and not isinstance(t, bool)]


def recent(budget: list[float], now: float) -> list[float]:
    """The budget's entries of the last hour; one in the future (a clock set back) counts
    as now, so that a wrong clock cannot free the budget or hold it forever."""
    return sorted(min(t, now) for t in budget if now - min(t, now) < WINDOW_S)


def resume_after(budget: list[float], now: float) -> float:
    """When a ladder that gives up now starts over: an hour after the last radio cycle or
    reset, or an hour from now when the hour had none."""
    return max(budget, default=now) + WINDOW_S


def record(
    conn: sqlite3.Connection,
    ts_ns: int,
    data: dict[str, Any],
    run: dict[str, Any],
    limit: int,
) -> list[float] | None:
    """Store one step (writer thread, one transaction): the event, its counter and the
    meta row with `run` merged in. A radio cycle or reset beyond `limit` in the last hour
    is not stored: None. Returns the budget's entries of the last hour."""
    now = ts_ns / 1e9
    step = str(data["step"])
    with transaction(conn):
        saved = load_saved(conn)
        budget = recent(_times(saved.get("budget")), now)
        if step in BUDGETED:
            if len(budget) >= limit:
                return None
            budget.append(now)
        saved.update(run)
        if step == "gave_up":
            saved["resume_at"] = resume_after(budget, now)
        saved["budget"] = budget
        saved["last"] = {**data, "at": now, "outcome": ""}
        set_meta(conn, META_KEY, orjson.dumps(saved).decode())
        add_event(conn, "modem_recovery", data, ts_ns)
        bump(conn, COUNTER_PREFIX + step)
    return budget


def record_recovered(conn: sqlite3.Connection, ts_ns: int) -> None:
    """The modem is back: the ladder's run ends; the budget stays."""
    with transaction(conn):
        saved = load_saved(conn)
        for key in ("problem", "last_step", "attempt", "step_at", "resume_at"):
            saved.pop(key, None)
        last = saved.get("last")
        if isinstance(last, dict) and not last.get("outcome"):
            last["outcome"] = "recovered"
            last["recovered_at"] = ts_ns / 1e9
        set_meta(conn, META_KEY, orjson.dumps(saved).decode())


def _last(value: Any) -> dict[str, Any] | None:
    """The newest step as the meta row keeps it, with only well-typed fields."""
    if not isinstance(value, dict) or not isinstance(value.get("step"), str):
        return None
    out: dict[str, Any] = {"step": value["step"]}
    for key, kind in (
        ("reason", str),
        ("attempt", int),
        ("at", float),
        ("outcome", str),
        ("recovered_at", float),
    ):
        v = value.get(key)
        if isinstance(v, bool):
            continue
        if kind is float and isinstance(v, int | float):
            out[key] = float(v)
        elif isinstance(v, kind):
            out[key] = v
    return out


def status(
    conn: sqlite3.Connection, cfg: RecoverySection | None, now: float | None = None
) -> dict[str, Any]:
    """The ladder as `gateway status` and the dashboard show it."""
    now = time.time() if now is None else now
    saved = load_saved(conn)
    totals = counters(conn)
    last = _last(saved.get("last"))
    resume = saved.get("resume_at")
    if not isinstance(resume, int | float) or isinstance(resume, bool):
        resume = None
    elif resume > now + WINDOW_S:
        resume = now + WINDOW_S  # a clock set back: the ladder waits an hour at most
    state = "idle"
    if isinstance(resume, int | float) and resume > now:
        state = "gave_up"
    elif saved.get("problem"):
        state = "recovering"
    return {
        "enabled": cfg.enabled if cfg is not None else None,
        "state": state,
        "problem": str(saved.get("problem") or ""),
        "resume_at": float(resume) if state == "gave_up" and resume else None,
        "resets_last_hour": len(recent(_times(saved.get("budget")), now)),
        "max_resets_per_hour": cfg.max_resets_per_hour if cfg is not None else None,
        "last": last,
        "totals": {s: totals.get(COUNTER_PREFIX + s, 0) for s in STEPS},
    }


# -- the ladder ---------------------------------------------------------------------------


class Ladder:
    """Which step is due, from what the poller sees; the poller takes the steps."""

    def __init__(self, cfg: RecoverySection, saved: dict[str, Any], wall: float) -> None:
        self.cfg = cfg
        self.problem = ""
        self.since: float | None = None  # monotonic start of a problem with no step yet
        self.step_mono: float | None = None  # monotonic time of the run's last step
        self.last_index = -1  # ORDER index of the run's last step
        self.attempt = 0
        self.resume_wall = 0.0  # gave up: nothing before this wall-clock time
        step_at = saved.get("step_at")
        resume = saved.get("resume_at")
        if isinstance(resume, int | float) and resume > wall:
            # A clock set back must not hold the ladder for longer than an hour.
            self.resume_wall = min(float(resume), wall + WINDOW_S)
        if isinstance(step_at, int | float) and 0 <= wall - step_at < WINDOW_S:
            last = saved.get("last_step")
            if last in ORDER:
                self.last_index = ORDER.index(str(last))
            attempt = saved.get("attempt")
            self.attempt = attempt if isinstance(attempt, int) else 0
            self.problem = str(saved.get("problem") or "")

    @property
    def active(self) -> bool:
        """Whether a run has taken a step (or gave up) and not ended yet."""
        return self.attempt > 0 or self.resume_wall > 0

    def threshold(self, problem: str) -> float:
        return self.cfg.unresponsive_s if problem == "unresponsive" else self.cfg.unregistered_s

    def observe(self, problem: str | None, mono: float, wall: float) -> str | None:
        """The step due now ("recovered" when a run just ended), or None."""
        if problem is None or not self.cfg.enabled:
            return None
        if not problem:
            ended = self.active
            self.problem, self.since, self.step_mono = "", None, None
            self.last_index, self.attempt, self.resume_wall = -1, 0, 0.0
            return "recovered" if ended else None
        self.problem = problem
        if self.resume_wall:
            if wall < self.resume_wall:
                return None
            # An hour after giving up the ladder starts over, at once.
            self.resume_wall, self.last_index, self.step_mono = 0.0, -1, None
            self.since = mono - self.threshold(problem)
        if self.since is None:
            self.since = mono
        if mono < self._due(mono):
            return None
        return self._next()

    def wait_s(self, mono: float, wall: float) -> float:
        """Seconds until a step may be due (math.inf when none can be)."""
        if not self.cfg.enabled or not self.problem:
            return math.inf
        if self.resume_wall:
            return max(0.0, self.resume_wall - wall)
        return max(0.0, self._due(mono) - mono)

    def taken(self, step: str, mono: float, wall: float, budget: list[float]) -> None:
        """A step was recorded (and is about to be taken)."""
        self.attempt += 1
        if step == "gave_up":
            self.resume_wall = resume_after(budget, wall)
        else:
            self.last_index = ORDER.index(step)
            self.step_mono = mono

    def run_fields(self, step: str, wall: float) -> dict[str, Any]:
        """What the meta row keeps of the run after `step` (`record` adds resume_at)."""
        if step == "gave_up":
            return {"problem": self.problem, "attempt": self.attempt + 1}
        return {
            "problem": self.problem,
            "last_step": step,
            "attempt": self.attempt + 1,
            "step_at": wall,
            "resume_at": 0,
        }

    def _due(self, mono: float) -> float:
        if self.step_mono is not None:
            return self.step_mono + self.cfg.settle_s
        # A first step, or the next one of a run restored after a restart: the threshold
        # applies again, so that a gateway in a boot loop never steps at start.
        if self.since is not None:
            return self.since + self.threshold(self.problem)
        return math.inf

    def _next(self) -> str:
        for step in ORDER[self.last_index + 1 :]:
            if step not in APPLIES[self.problem]:
                continue
            if step == "power_cycle" and not self.cfg.power_cycle_command.strip():
                continue
            return step
        return "gave_up"


async def store_step(
    store: Store, ladder: Ladder, step: str, reason: str, port: str, limit: int
) -> tuple[str, dict[str, Any], list[float]]:
    """Record `step` before it is taken, or `gave_up` when the hour's budget refuses it;
    (the step recorded, its event data, the budget's entries of the last hour). Shielded:
    a poller cancelled at shutdown still records what it was about to do."""
    for recorded in (step, "gave_up"):
        if recorded != step:
            reason = f"{limit} radio cycle(s) and reset(s) in the last hour already; {reason}"
        data: dict[str, Any] = {
            "port": port,
            "step": recorded,
            "reason": reason,
            "attempt": ladder.attempt + 1,
        }
        run = ladder.run_fields(recorded, time.time())
        budget = await asyncio.shield(
            asyncio.wrap_future(store.call(record, time.time_ns(), data, run, limit))
        )
        if budget is not None:
            return recorded, data, budget
    raise AssertionError("gave_up is never refused")


# -- the steps (worker threads) -------------------------------------------------------------


def radio_cycle(ch: AtChannel, timeout: float) -> None:
    """AT+CFUN=0, a pause, AT+CFUN=1; ModemError when the modem refuses or is silent."""
    limit = max(timeout, RADIO_TIMEOUT_S)
    ch.command("AT+CFUN=0", timeout=limit)
    time.sleep(RADIO_OFF_S)
    ch.command("AT+CFUN=1", timeout=limit)


def describe_problem(problem: str, threshold: float, registration: str | None, error: str) -> str:
    """The `reason` of a step: what has lasted how long."""
    if problem == "unresponsive":
        return f"no valid AT answer for {threshold:g} s or more: {error}"
    return f"not registered ({registration or 'unknown'}) for {threshold:g} s or more"


def reset(ch: AtChannel | None, modem: ModemSection, command: str, deadline: float) -> str:
    """The reset command on `ch`, or on the port opened for it (closed either way), then
    the wait for the modem to go down; '' or why it will not reboot."""
    if ch is None:
        try:
            ch = AtChannel.open(
                modem.port,
                baudrate=modem.baudrate,
                timeout=modem.command_timeout_s,
                exclusive=True,
            )
        except PortError as exc:
            return describe(exc)
    try:
        down = max(0.0, min(DOWN_WAIT_S, deadline - time.monotonic()))
        return send_reset(ch, command, modem.command_timeout_s, down)
    finally:
        ch.close()


def send_reset(ch: AtChannel, command: str, timeout: float, down_s: float) -> str:
    """Send the reset command and watch the modem go down; '' or why it will not reboot.

    A modem that hangs may still obey the command without answering it, and one that
    reboots at once may drop its port before its OK: neither is an error."""
    try:
        ch.command(command, bare=True, timeout=timeout)
    except AtTimeout:
        pass
    except PortError:
        return ""
    except ModemError as exc:
        return describe(exc)
    try:
        ch.wait_boot(down_s)
    except PortError:
        pass
    return ""


def wait_back(connect: Callable[[], None], deadline: float, stopping: Callable[[], bool]) -> str:
    """Call `connect` (open the port, set it up) until it works; '' or the last error."""
    last = "not tried"
    while not stopping():
        try:
            connect()
        except ModemError as exc:
            last = describe(exc)
        else:
            return ""
        if time.monotonic() + REOPEN_PAUSE_S >= deadline:
            break
        time.sleep(REOPEN_PAUSE_S)
    return last


def power_cycle(command: str, timeout: float) -> str:
    """Run the power-cycle command as a process (no shell); '' or what went wrong."""
    argv = shlex.split(command)
    if not argv:
        return "modem.recovery.power_cycle_command is empty"
    try:
        done = subprocess.run(
            argv,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return f"{argv[0]} did not finish within {timeout:g} s"
    except OSError as exc:
        return f"cannot run {argv[0]}: {exc.strerror or exc}"
    if done.returncode != 0:
        tail = (done.stderr or done.stdout or b"")[-300:].decode("utf-8", "replace").strip()
        return f"{argv[0]} exited with status {done.returncode}" + (f": {tail}" if tail else "")
    return ""

"""The modem poller: identity at start and on SIM/registration changes, counters every poll.

Serial I/O runs in worker threads; SQLite writes go through the store's writer thread.
Every modem fault (unplugged or silent port, no SIM, SIM busy, garbage) is a state, logged
once when it begins, and retried with capped, jittered backoff: ``run`` only ever ends by
cancellation. A modem that stays off the network or silent is acted on after each poll by
the recovery ladder (gateway.modem.recovery), whose steps the poller takes.
"""

from __future__ import annotations

import asyncio
import logging
import random
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from gateway.config import CdrSection, ModemSection
from gateway.errors import GatewayError, ModemError
from gateway.modem import recovery
from gateway.modem.at import AtChannel, AtTimeout, PortError, describe, split_fields
from gateway.modem.profiles import (
    REGISTERED,
    REGISTRATION,
    STEPS,
    SYSFS_NET,
    ModemInfo,
    Profile,
    detect,
    make_profile,
    merge,
    read_fields,
)
from gateway.store import Store, transaction
from gateway.usage import budget, cdr

log = logging.getLogger("gateway.modem")

# Read every poll; the rest of STEPS only at start and when one of these changes. The
# radio step costs two or three short commands once the modem's unsupported ones are known.
FAST_STEPS = ("sim_state", "iccid", "signal", "registration", "radio", "counters")
# How often URCs are looked at between polls (they can make the next poll come early).
URC_CHECK_S = 0.5
# Snapshots kept in the store (about two weeks at the default 60 s poll).
KEEP_SNAPSHOTS = 20_000
# States in which the modem answers; the others mean no fresh reading.
ANSWERING = frozenset({"ok", "no_sim", "sim_busy", "sim_error"})

EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass(slots=True)
class ModemState:
    """What the poller knows now, for the web UI and status: one instance, updated in place."""

    state: str = "starting"  # starting|ok|no_sim|sim_busy|sim_error|unreachable|error
    last_error: str = ""
    info: ModemInfo | None = None
    since_ns: int = 0
    updated_ns: int = 0

    def as_dict(self) -> dict[str, Any]:
        """Plain data for JSON."""
        return {
            "state": self.state,
            "last_error": self.last_error,
            "since_ns": self.since_ns,
            "updated_ns": self.updated_ns,
            "info": self.info.to_dict() if self.info is not None else None,
        }


# The state the service's poller updates unless it is given another one.
STATE = ModemState()


def backoff(failures: int, base: float, cap: float, rng: random.Random) -> float:
    """Exponential backoff capped at cap, jittered down by up to half."""
    delay = min(cap, base * (1 << min(max(failures - 1, 0), 30)))
    return delay * rng.uniform(0.5, 1.0)


def state_of(info: ModemInfo) -> tuple[str, str]:
    """(state, error) for a completed reading."""
    failed = dict(info.failed)
    if all(step in failed for step in ("sim_state", "signal", "registration")):
        return "error", f"unreadable answers: {failed['sim_state']}"
    sim = info.sim_state
    if sim == "not_inserted":
        return "no_sim", "SIM not inserted"
    if sim == "busy":
        return "sim_busy", "SIM busy"
    if sim and sim != "ready":
        return "sim_error", f"SIM {sim}"
    return "ok", ""


# -- store functions (writer thread) -------------------------------------------------------


def last_iccid(conn: sqlite3.Connection) -> str:
    """The ICCID of the newest snapshot that has one ('' when none)."""
    row = conn.execute(
        "SELECT json_extract(data, '$.iccid') FROM modem_snapshots"
        " WHERE COALESCE(json_extract(data, '$.iccid'), '') != '' ORDER BY id DESC LIMIT 1"
    ).fetchone()
    return str(row[0]) if row and row[0] else ""


def write_snapshot(
    conn: sqlite3.Connection,
    ts_ns: int,
    state: str,
    data: bytes | None,
    events: list[tuple[str, bytes]],
    cdr_cfg: CdrSection | None = None,
    data_budget: budget.Budget | None = None,
) -> list[tuple[str, dict[str, Any]]]:
    """Insert a snapshot (when data) and events in one transaction; prune old snapshots.

    With `cdr_cfg`, an answering snapshot's byte counters are accounted for usage CDRs in
    the same transaction, so the reading and the usage it adds are stored together; with
    `data_budget` too, that usage counts toward the billing cycle's data budget. Returns
    the data budget events recorded with it.
    """
    raised: list[tuple[str, dict[str, Any]]] = []
    with transaction(conn):
        if data is not None:
            cur = conn.execute(
                "INSERT INTO modem_snapshots(ts_ns, state, data) VALUES (?, ?, ?)",
                (ts_ns, state, data.decode()),
            )
            last = cur.lastrowid or 0
            if last % 100 == 0 and last > KEEP_SNAPSHOTS:
                conn.execute("DELETE FROM modem_snapshots WHERE id <= ?", (last - KEEP_SNAPSHOTS,))
        conn.executemany(
            "INSERT INTO events(ts_ns, kind, data) VALUES (?, ?, ?)",
            [(ts_ns, kind, d.decode()) for kind, d in events],
        )
        if cdr_cfg is not None and data is not None and state in ANSWERING:
            reading = cdr.Reading.from_snapshot(orjson.loads(data))
            if reading is not None:
                added = cdr.account(conn, cdr_cfg, reading, ts_ns)
                if data_budget is not None:
                    raised = budget.add_usage(conn, data_budget, reading.iccid, added, ts_ns)
                    conn.executemany(
                        "INSERT INTO events(ts_ns, kind, data) VALUES (?, ?, ?)",
                        [(ts_ns, kind, orjson.dumps(d).decode()) for kind, d in raised],
                    )
    return raised


# -- the poller ------------------------------------------------------------------------------


class _Poller:
    def __init__(
        self,
        cfg: ModemSection,
        store: Store,
        on_event: EventCallback | None,
        state: ModemState,
        sysfs_root: Path,
        cdr_cfg: CdrSection | None,
    ) -> None:
        self.cfg = cfg
        self.cdr_cfg = cdr_cfg
        self.data_budget = budget.Budget.from_config(cfg)
        self.store = store
        self.on_event = on_event
        self.state = state
        self.sysfs_root = sysfs_root
        self.ch: AtChannel | None = None
        self.profile: Profile | None = None
        self.info: ModemInfo | None = None
        self.known_iccid = ""
        self.registered: bool | None = None
        self.failures = 0
        self.failed_steps: frozenset[str] = frozenset()
        # Set from the I/O thread by a URC that says the SIM or the registration changed.
        self.dirty = threading.Event()
        self.rng = random.Random()
        self.base = min(1.0, cfg.poll_interval_s)
        self.cap = max(self.base, min(cfg.poll_interval_s, 60.0))
        self.last_step = 0.0
        # A connect still running in a worker thread when run() ends must not leak its port.
        self._ch_lock = threading.Lock()
        self._stopping = False
        self.ladder: recovery.Ladder | None = None

    async def run(self) -> None:
        try:
            self.known_iccid = await asyncio.wrap_future(self.store.call(last_iccid))
        except (GatewayError, sqlite3.Error) as exc:
            log.warning("modem: cannot read the last known ICCID: %s", exc)
        if self.cfg.recovery.enabled:
            saved: dict[str, Any] = {}
            try:
                saved = await asyncio.wrap_future(self.store.call(recovery.load_saved))
            except (GatewayError, sqlite3.Error) as exc:
                log.warning("modem: cannot read the recovery ladder's state: %s", exc)
            self.ladder = recovery.Ladder(self.cfg.recovery, saved, time.time())
        try:
            while True:
                delay = await self._step()
                await self._wait(delay)
        finally:
            with self._ch_lock:
                self._stopping = True
            self._drop_channel()

    # -- one poll -----------------------------------------------------------------------

    async def _step(self) -> float:
        delay = await self._poll()
        if self.ladder is not None:
            delay = min(delay, await self._recover())
        return delay

    async def _poll(self) -> float:
        self.last_step = time.monotonic()
        try:
            if self.ch is None:
                await asyncio.to_thread(self._connect)
                self.info = None
            info = await asyncio.to_thread(self._read, self.dirty.is_set())
        except (PortError, AtTimeout) as exc:
            self._drop_channel()
            await self._settle("unreachable", None, describe(exc))
            return self._retry()
        except ModemError as exc:
            # Garbage or a confused modem: start over with a fresh init.
            self._drop_channel()
            await self._settle("error", None, describe(exc))
            return self._retry()
        except Exception as exc:
            # Never let a bug here take the gateway down; it is logged once per state change.
            self._drop_channel()
            if self.state.state != "error":
                log.exception("modem: unexpected failure")
            await self._settle("error", None, f"unexpected: {describe(exc)}")
            return self._retry()
        state, error = state_of(info)
        if state == "error":
            self._drop_channel()
        else:
            self.info = info
        await self._settle(state, info, error)
        if state == "ok":
            self.failures = 0
            return self.cfg.poll_interval_s
        return self._retry()

    # -- the recovery ladder ------------------------------------------------------------------

    async def _recover(self) -> float:
        """Take the ladder's step if one is due; seconds until the next may be."""
        ladder = self.ladder
        assert ladder is not None
        st = self.state
        info = st.info
        registration = None
        if info is not None and info.registration and "registration" not in dict(info.failed):
            registration = info.registration
        problem = recovery.problem_of(st.state, registration)
        step = ladder.observe(problem, time.monotonic(), time.time())
        if step == "recovered":
            log.info("modem %s: back after the recovery ladder", self.cfg.port)
            try:
                await asyncio.shield(
                    asyncio.wrap_future(self.store.call(recovery.record_recovered, time.time_ns()))
                )
            except (GatewayError, sqlite3.Error) as exc:
                log.warning("modem: cannot store the recovery ladder's state: %s", exc)
        elif step is not None:
            reason = recovery.describe_problem(
                ladder.problem,
                ladder.threshold(ladder.problem),
                registration,
                self.state.last_error or self.state.state,
            )
            if step == "gave_up":
                reason = f"every step taken; {reason}"
            await self._take(step, reason)
            # A look soon after the step shows whether it worked.
            return min(self.base, ladder.wait_s(time.monotonic(), time.time()))
        return ladder.wait_s(time.monotonic(), time.time())

    async def _take(self, step: str, reason: str) -> None:
        """Record a step, then take it; a step the budget does not allow gives up instead."""
        ladder = self.ladder
        assert ladder is not None
        port = self.cfg.port
        try:
            step, data, budget = await recovery.store_step(
                self.store, ladder, step, reason, port, self.cfg.recovery.max_resets_per_hour
            )
        except (GatewayError, sqlite3.Error) as exc:
            # Unrecorded, a step could repeat after a restart without limit: not taken.
            log.warning("modem %s: cannot record recovery step %s: %s", port, step, exc)
            return
        ladder.taken(step, time.monotonic(), time.time(), budget)
        log.warning(
            "modem %s: recovery step %s (attempt %d): %s",
            port,
            step,
            ladder.attempt,
            data["reason"],
        )
        if self.on_event is not None:
            try:
                self.on_event("modem_recovery", data)
            except Exception:
                log.exception("modem: event callback failed for modem_recovery")
        error = await self._run_step(step)
        if error:
            log.warning("modem %s: recovery step %s: %s", port, step, error)

    async def _run_step(self, step: str) -> str:
        """Take one step; '' or what went wrong (the ladder's next step follows anyway)."""
        rcfg = self.cfg.recovery
        deadline = time.monotonic() + rcfg.settle_s
        if step == "gave_up":
            return ""
        if step == "reopen":
            self._drop_channel()
            self.failures = 0
            try:
                await asyncio.to_thread(self._connect)
            except ModemError as exc:
                return describe(exc)
            self.info = None
            return ""
        if step == "radio_cycle":
            ch = self.ch
            if ch is None:
                return "modem port is not open"
            self.dirty.set()  # identity and registration are read again afterwards
            try:
                await asyncio.to_thread(recovery.radio_cycle, ch, self.cfg.command_timeout_s)
            except ModemError as exc:
                self._drop_channel()
                return describe(exc)
            return ""
        if step == "power_cycle":
            self._drop_channel()
            error = await asyncio.to_thread(
                recovery.power_cycle, rcfg.power_cycle_command, rcfg.power_cycle_timeout_s
            )
            if error:
                return error
        else:
            error = await asyncio.to_thread(self._send_reset, deadline)
            if error:
                return error
        self.info = None
        return await asyncio.to_thread(
            recovery.wait_back, self._connect, deadline, lambda: self._stopping
        )

    def _send_reset(self, deadline: float) -> str:
        """Worker thread: the profile's reset command on the open port (or a fresh one)."""
        profile = self.profile
        if profile is None:
            profile = make_profile(self.cfg.profile if self.cfg.profile != "auto" else "generic")
        with self._ch_lock:
            ch, self.ch = self.ch, None
        return recovery.reset(ch, self.cfg, profile.reset_command, deadline)

    def _retry(self) -> float:
        self.failures += 1
        return backoff(self.failures, self.base, self.cap, self.rng)

    def _connect(self) -> None:
        ch = AtChannel.open(
            self.cfg.port,
            baudrate=self.cfg.baudrate,
            timeout=self.cfg.command_timeout_s,
            on_urc=self._on_urc,
            # `gateway modem reset` must not talk to the modem in the middle of a poll.
            exclusive=True,
        )
        try:
            ch.init()
            self.profile = detect(
                ch, self.cfg.profile, interface=self.cfg.interface, sysfs_root=self.sysfs_root
            )
        except BaseException:
            ch.close()
            raise
        with self._ch_lock:
            if self._stopping:
                ch.close()
                raise PortError("modem poller stopped")
            self.ch = ch

    def _read(self, dirty: bool) -> ModemInfo:
        """One reading (worker thread): the fast steps, or everything when something changed."""
        ch, profile, prev = self.ch, self.profile, self.info
        if ch is None or profile is None:
            raise PortError("modem port is not open")
        self.dirty.clear()
        if ch.needs_init:
            # A rebooted modem echoes again and forgot AT+CMEE=1; set it up again.
            ch.init()
        full = dirty or prev is None
        fields, failed = read_fields(ch, profile, STEPS if full else FAST_STEPS)
        if not full and prev is not None and self._changed(prev, fields):
            full = True
            fields, failed = read_fields(ch, profile, STEPS)
        info = merge(ModemInfo() if full or prev is None else prev, fields, failed)
        if info.sim_state not in ("", "ready"):
            # The old SIM's identity must not outlive it.
            info = replace(info, iccid="", imsi="", msisdn="")
        return info

    @staticmethod
    def _changed(prev: ModemInfo, fields: dict[str, Any]) -> bool:
        if "sim_state" in fields and fields["sim_state"] != prev.sim_state:
            return True
        if fields.get("iccid") and fields["iccid"] != prev.iccid:
            return True
        return "registration" in fields and fields["registration"] != prev.registration

    def _on_urc(self, line: str) -> None:
        """I/O thread: mark the reading stale when a URC reports a SIM or network change."""
        head, _, payload = line.partition(":")
        head = head.strip().upper()
        info = self.info
        if info is None:
            return  # the first full reading is under way
        if head in ("RDY", "^SYSSTART", "+QUSIM", "+UUSIMSTAT", "^SIMST"):
            self.dirty.set()
        elif head == "+CPIN":
            value = payload.strip().strip('"').upper()
            if value != "READY" or info.sim_state != "ready":
                self.dirty.set()
        elif head in ("+CREG", "+CEREG", "+CGREG"):
            fields = split_fields(payload)
            # URC forms: "<stat>" or, with n=2 (the gateway sets it for +CEREG),
            # "<stat>,"<tac>","<ci>",<AcT>" with the location quoted.
            stat = fields[0].strip()
            if len(fields) >= 2 and fields[1].strip().isdigit():
                stat = fields[1].strip()
            if not stat.isdigit():
                return
            now_registered = REGISTRATION.get(int(stat), "unknown") in REGISTERED
            was_registered = info.registration in REGISTERED
            if now_registered != was_registered:
                self.dirty.set()

    async def _wait(self, delay: float) -> None:
        deadline = time.monotonic() + delay
        earliest = self.last_step + min(delay, 1.0)
        while True:
            now = time.monotonic()
            if now >= deadline or (self.dirty.is_set() and now >= earliest):
                return
            await asyncio.sleep(min(deadline - now, URC_CHECK_S))
            ch = self.ch
            if ch is not None and not self.dirty.is_set():
                try:
                    await asyncio.to_thread(ch.poll_urcs)
                except ModemError:
                    self.dirty.set()  # the next poll finds out what is wrong

    def _drop_channel(self) -> None:
        with self._ch_lock:
            ch, self.ch = self.ch, None
        if ch is not None:
            # close() never blocks on a command in flight; still keep port I/O off the loop.
            try:
                asyncio.get_running_loop().run_in_executor(None, ch.close)
            except RuntimeError:
                ch.close()

    # -- state, events and snapshots ------------------------------------------------------

    async def _settle(self, new: str, info: ModemInfo | None, error: str) -> None:
        st = self.state
        old = st.state
        now = time.time_ns()
        events: list[tuple[str, dict[str, Any]]] = []
        port = self.cfg.port
        if new != old:
            if new == "ok":
                log.info("modem %s: ok (%s)", port, self._summary(info))
            else:
                log.warning("modem %s: %s: %s", port, new, error)
            if new == "unreachable":
                events.append(("modem_unreachable", {"error": error}))
            elif new in ANSWERING and old in ("unreachable", "error"):
                events.append(("modem_recovered", {"after": old}))
            if new == "no_sim":
                events.append(("sim_removed", {"iccid": self.known_iccid, "previous": old}))
            elif old == "no_sim" and new in ANSWERING:
                events.append(("sim_inserted", {"iccid": info.iccid if info else ""}))
            st.since_ns = now
        elif new not in ANSWERING and error != st.last_error:
            log.debug("modem %s: still %s: %s", port, new, error)
        if info is not None and new in ANSWERING:
            events += self._compare(info)
            failed = frozenset(dict(info.failed))
            if failed != self.failed_steps and new == "ok":
                if failed:
                    log.info(
                        "modem %s: could not read %s",
                        port,
                        "; ".join(f"{k}: {v}" for k, v in info.failed),
                    )
                self.failed_steps = failed
            st.info = info
        st.state = new
        st.last_error = error
        st.updated_ns = now
        if info is not None and new in ANSWERING:
            data: bytes | None = orjson.dumps({**info.to_dict(), "error": error})
        elif new != old:
            last = st.info.to_dict() if st.info is not None else {}
            data = orjson.dumps({**last, "error": error})
        else:
            data = None
        if data is None and not events:
            return
        events = [(kind, {"port": port, **d}) for kind, d in events]
        encoded = [(kind, orjson.dumps(d)) for kind, d in events]
        try:
            # Shielded: the state above is already visible, so a poller cancelled at
            # shutdown still commits it (the next start compares the SIM against it).
            raised = await asyncio.shield(
                asyncio.wrap_future(
                    self.store.call(
                        write_snapshot, now, new, data, encoded, self.cdr_cfg, self.data_budget
                    )
                )
            )
        except (GatewayError, sqlite3.Error) as exc:
            log.warning("modem: cannot store snapshot: %s", exc)
            return
        for kind, d in [*events, *raised]:
            log.info("modem event %s %s", kind, d)
            if self.on_event is not None:
                try:
                    self.on_event(kind, d)
                except Exception:
                    log.exception("modem: event callback failed for %s", kind)

    def _compare(self, info: ModemInfo) -> list[tuple[str, dict[str, Any]]]:
        """Events from one answering reading against what was known before it."""
        events: list[tuple[str, dict[str, Any]]] = []
        failed = dict(info.failed)
        if info.iccid:
            if self.known_iccid and info.iccid != self.known_iccid:
                events.append(
                    (
                        "sim_changed",
                        {"old_iccid": self.known_iccid, "iccid": info.iccid, "imsi": info.imsi},
                    )
                )
            self.known_iccid = info.iccid
        if "registration" not in failed and info.registration:
            reg = info.registration in REGISTERED
            detail = {
                "registration": info.registration,
                "operator": info.operator,
                "iccid": info.iccid or self.known_iccid,
            }
            if self.registered is True and not reg:
                events.append(("registration_lost", detail))
            elif self.registered is False and reg:
                events.append(("registration_regained", detail))
            self.registered = reg
        prev = self.state.info
        if (
            prev is not None
            and "counters" not in failed
            and prev.counter_source == info.counter_source
            and prev.tx_bytes is not None
            and prev.rx_bytes is not None
            and info.tx_bytes is not None
            and info.rx_bytes is not None
            and (info.tx_bytes < prev.tx_bytes or info.rx_bytes < prev.rx_bytes)
        ):
            events.append(
                (
                    "counters_reset",
                    {
                        "source": info.counter_source,
                        "tx_bytes": info.tx_bytes,
                        "rx_bytes": info.rx_bytes,
                        "prev_tx_bytes": prev.tx_bytes,
                        "prev_rx_bytes": prev.rx_bytes,
                    },
                )
            )
        return events

    @staticmethod
    def _summary(info: ModemInfo | None) -> str:
        if info is None:
            return "no reading"
        return (
            f"{info.vendor} {info.model}, ICCID {info.iccid or '-'},"
            f" {info.registration or 'registration unknown'}"
        )


async def run(
    cfg: ModemSection,
    store: Store,
    *,
    on_event: EventCallback | None = None,
    state: ModemState | None = None,
    sysfs_root: Path = SYSFS_NET,
    cdr_cfg: CdrSection | None = None,
) -> None:
    """Poll the modem until cancelled; snapshots and events go to the store, and with
    `cdr_cfg` the byte counters are accounted for usage CDRs."""
    poller = _Poller(
        cfg, store, on_event, state if state is not None else STATE, sysfs_root, cdr_cfg
    )
    await poller.run()

"""Vendor profiles: which AT commands give the ICCID and the byte counters, and their parsers.

Every parser takes the answer lines of ``AtChannel.command`` and raises ``AtParseError``
for a form it does not understand, so a vendor quirk is one failed field, never a crash.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, ClassVar

from gateway.errors import ModemError
from gateway.modem import radio
from gateway.modem.at import (
    CME_SIM_BUSY,
    CME_SIM_NOT_INSERTED,
    AtChannel,
    AtCommandError,
    AtParseError,
    AtTimeout,
    PortError,
    describe,
    split_fields,
    unquote,
    values,
)

log = logging.getLogger("gateway.modem")

SYSFS_NET = Path("/sys/class/net")

# 3GPP TS 27.007 <stat> of +CREG/+CGREG/+CEREG.
REGISTRATION = {
    0: "not_registered",
    1: "home",
    2: "searching",
    3: "denied",
    4: "unknown",
    5: "roaming",
    6: "home",  # SMS only
    7: "roaming",  # SMS only
    8: "emergency",
    9: "home",  # CSFB not preferred
    10: "roaming",
}
REGISTERED = frozenset({"home", "roaming"})

# Which fields each read step fills; read_fields() takes step names.
STEPS = (
    "device",
    "sim_state",
    "iccid",
    "imsi",
    "imei",
    "msisdn",
    "operator",
    "signal",
    "registration",
    "radio",
    "apn",
    "counters",
)
# Steps that need a SIM: skipped (not attempted) when the SIM is absent or busy.
SIM_STEPS = frozenset({"iccid", "imsi", "msisdn"})


@dataclass(frozen=True, slots=True)
class Counters:
    """Byte counters and where they came from ("AT+QGDCNT", "sysfs:wwan0", ...)."""

    tx_bytes: int
    rx_bytes: int
    source: str


@dataclass(frozen=True, slots=True)
class ModemInfo:
    """Everything read from the modem in one go; failed names the steps that did not work."""

    profile: str = ""
    vendor: str = ""
    model: str = ""
    revision: str = ""
    iccid: str = ""
    imsi: str = ""
    imei: str = ""
    msisdn: str = ""
    operator: str = ""
    mcc: str = ""
    mnc: str = ""
    apn: str = ""
    csq: int | None = None
    signal_dbm: int | None = None
    registration: str = ""
    sim_state: str = ""
    tx_bytes: int | None = None
    rx_bytes: int | None = None
    counter_source: str = ""
    access_technology: str | None = None
    rsrp_dbm: float | None = None
    rsrq_db: float | None = None
    sinr_db: float | None = None
    rscp_dbm: float | None = None
    ecno_db: float | None = None
    cell_id: int | None = None
    tac: int | None = None
    band: int | None = None
    earfcn: int | None = None
    pci: int | None = None
    failed: tuple[tuple[str, str], ...] = field(default=())

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict; failed becomes {step: reason}."""
        d = asdict(self)
        d["failed"] = dict(self.failed)
        return d


# -- parsers ------------------------------------------------------------------------------

_HEX = frozenset("0123456789ABCDEF")


def decode_iccid(raw: str) -> str:
    """An ICCID as ModemManager decodes it: unquote, 19-20 chars, '98…' nibble-swapped, no F."""
    s = raw.replace('"', "").replace(" ", "").strip().upper()
    if not 19 <= len(s) <= 20:
        raise AtParseError(f"ICCID must be 19-20 characters, got {raw!r}")
    for i, c in enumerate(s):
        if c.isdigit():
            continue
        # Some issuers (China Mobile) use BCD's A-F range in the issuer part near the
        # start; the padding F sits at the end (or, nibble-swapped, one before it).
        if (2 <= i < 12 and c in _HEX) or (i >= 18 and c == "F"):
            continue
        raise AtParseError(f"ICCID has an invalid character {c!r}: {raw!r}")
    if s.startswith("98"):
        s = "".join(s[i + 1] + s[i] if i + 1 < len(s) else s[i] for i in range(0, len(s), 2))
    if s.endswith("F"):
        s = s[:-1]
    if "F" in s[18:] or not s[:2].isdigit():
        raise AtParseError(f"ICCID is not BCD: {raw!r}")
    return s


def encode_iccid_swapped(iccid: str) -> str:
    """The SIM's EF_ICCID as a hex string: F-padded to 20 and nibble-swapped."""
    s = iccid.upper().ljust(20, "F")
    return "".join(s[i + 1] + s[i] for i in range(0, 20, 2))


def _first(lines: list[str], prefix: str, what: str) -> str:
    vals = values(lines, prefix)
    if not vals:
        raise AtParseError(f"no {prefix} line in the answer for {what}: {lines!r}")
    return vals[0]


def parse_iccid(lines: list[str], prefix: str) -> str:
    """+QCCID/+CCID/+ICCID/#CCID/^ICCID: the first field, decoded (a u-blox EID is ignored)."""
    return decode_iccid(unquote(split_fields(_first(lines, prefix, "ICCID"))[0]))


def parse_crsm_iccid(lines: list[str]) -> str:
    """+CRSM: <sw1>,<sw2>,"<EF_ICCID hex>" from READ BINARY of 2FE2 (12258)."""
    f = split_fields(_first(lines, "+CRSM", "ICCID"))
    if len(f) < 3 or not f[0].isdigit() or not f[1].isdigit():
        raise AtParseError(f"cannot parse +CRSM answer {lines!r}")
    sw1, sw2 = int(f[0]), int(f[1])
    # As ModemManager: 0x90 0x00 is success; 0x91, 0x92 and 0x9F carry data too.
    if not ((sw1 == 0x90 and sw2 == 0) or sw1 in (0x91, 0x92, 0x9F)):
        raise AtParseError(f"SIM refused READ BINARY of EF_ICCID: sw1={sw1} sw2={sw2}")
    return decode_iccid(unquote(f[2]))


_IMSI_RE = re.compile(r"^\d{6,15}$")
_IMEI_RE = re.compile(r"^\d{14,17}$")


def _digits_line(lines: list[str], pattern: re.Pattern[str], prefix: str, what: str) -> str:
    for line in lines:
        text = line
        if text.upper().startswith(prefix):
            text = text[len(prefix) :].lstrip(" :")
        text = unquote(text.strip())
        if pattern.match(text):
            return text
    raise AtParseError(f"no {what} in the answer {lines!r}")


def parse_imsi(lines: list[str]) -> str:
    """AT+CIMI: a bare 6-15 digit line (a '+CIMI:' prefix is tolerated)."""
    return _digits_line(lines, _IMSI_RE, "+CIMI", "IMSI")


def parse_imei(lines: list[str]) -> str:
    """AT+CGSN (bare) or AT+CGSN=1 (+CGSN: "<imei>")."""
    return _digits_line(lines, _IMEI_RE, "+CGSN", "IMEI")


def parse_text(lines: list[str], prefix: str) -> str:
    """AT+CGMI/CGMM/CGMR: the first non-empty line, without an optional '+CGMx:' prefix."""
    for line in lines:
        text = line
        if text.upper().startswith(prefix):
            text = text[len(prefix) :].lstrip(" :")
        text = unquote(text.strip())
        if text:
            return text
    raise AtParseError(f"empty answer for {prefix}")


def parse_cnum(lines: list[str]) -> str:
    """+CNUM: [<alpha>],<number>,<type>[,...] (any number of lines, maybe none): first number."""
    for payload in values(lines, "+CNUM"):
        f = split_fields(payload)
        if len(f) >= 2 and unquote(f[1]):
            return unquote(f[1])
    return ""


def parse_cops(lines: list[str]) -> tuple[int | None, str]:
    """+COPS: <mode>[,<format>,<oper>[,<act>]] -> (format, oper); no operator -> (None, '')."""
    f = split_fields(_first(lines, "+COPS", "operator"))
    if len(f) < 3:
        return None, ""
    if not f[1].isdigit():
        raise AtParseError(f"cannot parse +COPS answer {lines!r}")
    return int(f[1]), unquote(f[2])


def split_plmn(plmn: str) -> tuple[str, str]:
    """'44010' -> ('440', '10'), '310410' -> ('310', '410')."""
    p = plmn.strip()
    if not (p.isdigit() and len(p) in (5, 6)):
        raise AtParseError(f"operator code must be 5 or 6 digits, got {plmn!r}")
    return p[:3], p[3:]


def parse_reg(lines: list[str], prefix: str) -> str:
    """+CREG/+CGREG/+CEREG: <n>,<stat>[,...] -> 'home', 'roaming', 'searching', ..."""
    f = split_fields(_first(lines, prefix, "registration"))
    stat = f[1] if len(f) >= 2 else f[0]
    if not stat.isdigit():
        raise AtParseError(f"cannot parse {prefix} answer {lines!r}")
    return REGISTRATION.get(int(stat), "unknown")


def parse_cgdcont(lines: list[str]) -> dict[int, str]:
    """+CGDCONT: <cid>,<pdp_type>,<apn>,... per context -> {cid: apn}."""
    out: dict[int, str] = {}
    for payload in values(lines, "+CGDCONT"):
        f = split_fields(payload)
        if len(f) >= 3 and f[0].isdigit():
            out[int(f[0])] = unquote(f[2])
    return out


def parse_cgact(lines: list[str]) -> list[int]:
    """+CGACT: <cid>,<state> per context -> the active cids, in order."""
    out: list[int] = []
    for payload in values(lines, "+CGACT"):
        f = split_fields(payload)
        if len(f) >= 2 and f[0].isdigit() and f[1] == "1":
            out.append(int(f[0]))
    return out


def parse_cpin(lines: list[str]) -> str:
    """+CPIN: READY -> 'ready'; 'SIM PIN' -> 'sim_pin', ..."""
    code = unquote(_first(lines, "+CPIN", "SIM state")).strip()
    return "ready" if code.upper() == "READY" else code.lower().replace(" ", "_")


def sim_state_of_error(exc: AtCommandError) -> str | None:
    """The SIM state a +CME error means (10 not inserted, 14 busy, 13 failure), if any."""
    return {
        CME_SIM_NOT_INSERTED: "not_inserted",
        CME_SIM_BUSY: "busy",
        13: "failure",
        15: "wrong",
        11: "sim_pin",
        12: "sim_puk",
    }.get(exc.code if exc.code is not None else -1)


def _int(text: str, base: int = 10) -> int:
    try:
        v = int(unquote(text), base)
    except ValueError as exc:
        raise AtParseError(f"not a counter value: {text!r}") from exc
    if v < 0:
        raise AtParseError(f"negative counter value: {text!r}")
    return v


def parse_qgdcnt(lines: list[str]) -> tuple[int, int]:
    """Quectel +QGDCNT: <bytes_sent>,<bytes_recv>."""
    f = split_fields(_first(lines, "+QGDCNT", "counters"))
    if len(f) < 2:
        raise AtParseError(f"cannot parse +QGDCNT answer {lines!r}")
    return _int(f[0]), _int(f[1])


def parse_ugcntrd(lines: list[str]) -> tuple[int, int]:
    """u-blox +UGCNTRD: <cid>,<sent_sess>,<recv_sess>,<sent_total>,<recv_total> per context,
    summed over contexts."""
    tx = rx = 0
    rows = values(lines, "+UGCNTRD")
    if not rows:
        raise AtParseError(f"no +UGCNTRD line in {lines!r}")
    for payload in rows:
        f = split_fields(payload)
        if len(f) < 5:
            raise AtParseError(f"cannot parse +UGCNTRD line {payload!r}")
        tx += _int(f[3])
        rx += _int(f[4])
    return tx, rx


def parse_gdatavol(lines: list[str]) -> tuple[int, int]:
    """Telit #GDATAVOL: <cid>,<tot>,<sent>,<received> per context, summed over contexts."""
    tx = rx = 0
    rows = values(lines, "#GDATAVOL")
    if not rows:
        raise AtParseError(f"no #GDATAVOL line in {lines!r}")
    for payload in rows:
        f = split_fields(payload)
        if len(f) < 4:
            raise AtParseError(f"cannot parse #GDATAVOL line {payload!r}")
        tx += _int(f[2])
        rx += _int(f[3])
    return tx, rx


def parse_dsflowqry(lines: list[str]) -> tuple[int, int]:
    """Huawei ^DSFLOWQRY: six hex fields; the totals are fields 5 (tx) and 6 (rx)."""
    f = split_fields(_first(lines, "^DSFLOWQRY", "counters"))
    if len(f) < 6:
        raise AtParseError(f"cannot parse ^DSFLOWQRY answer {lines!r}")
    return _int(f[4], 16), _int(f[5], 16)


def sysfs_counters(interface: str, root: Path = SYSFS_NET) -> Counters:
    """The kernel's byte counters of a network interface."""
    base = root / interface / "statistics"
    try:
        tx = int((base / "tx_bytes").read_text().strip())
        rx = int((base / "rx_bytes").read_text().strip())
    except (OSError, ValueError) as exc:
        raise ModemError(f"no byte counters for interface {interface} in {root}: {exc}") from exc
    return Counters(tx, rx, f"sysfs:{interface}")


# -- profiles -----------------------------------------------------------------------------


class Profile:
    """The generic 3GPP profile: ICCID via AT+CRSM, counters from sysfs."""

    name: ClassVar[str] = "generic"
    # (command, answer prefix) tried before the AT+CRSM fallback.
    iccid_command: ClassVar[tuple[str, str] | None] = None
    # Reboots the modem (3GPP TS 27.007 +CFUN=<fun>,<rst>: full functionality after a reset).
    reset_command: ClassVar[str] = "AT+CFUN=1,1"

    def __init__(self, interface: str = "wwan0", sysfs_root: Path = SYSFS_NET) -> None:
        self.interface = interface
        self.sysfs_root = sysfs_root
        self.radio_probe = radio.RadioProbe()

    def iccid(self, ch: AtChannel) -> str:
        """The SIM's ICCID: the vendor command first, then READ BINARY of EF_ICCID."""
        if self.iccid_command is not None:
            cmd, prefix = self.iccid_command
            try:
                return parse_iccid(ch.command(cmd, prefix=prefix), prefix)
            except AtCommandError as exc:
                if sim_state_of_error(exc) is not None:
                    raise
                log.debug("%s failed (%s), trying AT+CRSM", cmd, exc)
            except AtParseError as exc:
                log.debug("%s: %s, trying AT+CRSM", cmd, exc)
        return parse_crsm_iccid(ch.command("AT+CRSM=176,12258,0,0,10"))

    def counters(self, ch: AtChannel) -> Counters:
        """Byte counters: the vendor's AT command, else the kernel's interface counters."""
        return sysfs_counters(self.interface, self.sysfs_root)

    def _at_counters(
        self, ch: AtChannel, cmd: str, prefix: str, parse: Callable[[list[str]], tuple[int, int]]
    ) -> Counters:
        try:
            tx, rx = parse(ch.command(cmd, prefix=prefix))
        except (AtCommandError, AtParseError) as exc:
            try:
                return sysfs_counters(self.interface, self.sysfs_root)
            except ModemError:
                raise exc from None
        return Counters(tx, rx, cmd)


class Quectel(Profile):
    """Quectel EC2x/EG9x/BG9x/RM5xx: AT+QCCID, AT+QGDCNT?."""

    name = "quectel"
    iccid_command = ("AT+QCCID", "+QCCID")

    def counters(self, ch: AtChannel) -> Counters:
        """+QGDCNT: <sent>,<recv>."""
        return self._at_counters(ch, "AT+QGDCNT?", "+QGDCNT", parse_qgdcnt)


class Ublox(Profile):
    """u-blox SARA/LARA/TOBY: AT+CCID, AT+UGCNTRD (when AT+UGCNTRD=? says it exists)."""

    name = "ublox"
    iccid_command = ("AT+CCID", "+CCID")
    # SARA-R4/R5 take no <rst> in AT+CFUN=1,1; 16 resets the module and the SIM.
    reset_command = "AT+CFUN=16"

    def __init__(self, interface: str = "wwan0", sysfs_root: Path = SYSFS_NET) -> None:
        super().__init__(interface, sysfs_root)
        self._has_ugcntrd: bool | None = None

    def counters(self, ch: AtChannel) -> Counters:
        """+UGCNTRD totals summed over contexts; probed once with AT+UGCNTRD=?."""
        if self._has_ugcntrd is None:
            try:
                ch.command("AT+UGCNTRD=?", prefix="+UGCNTRD")
                self._has_ugcntrd = True
            except AtCommandError:
                self._has_ugcntrd = False
        if not self._has_ugcntrd:
            return sysfs_counters(self.interface, self.sysfs_root)
        return self._at_counters(ch, "AT+UGCNTRD", "+UGCNTRD", parse_ugcntrd)


class Simcom(Profile):
    """SIMCom SIM7xxx: AT+CICCID (answers +ICCID:); counters from sysfs."""

    name = "simcom"
    iccid_command = ("AT+CICCID", "+ICCID")
    reset_command = "AT+CRESET"


class Telit(Profile):
    """Telit LE910/LN920/FN980: AT#CCID, AT#GDATAVOL=2."""

    name = "telit"
    iccid_command = ("AT#CCID", "#CCID")
    reset_command = "AT#REBOOT"

    def counters(self, ch: AtChannel) -> Counters:
        """#GDATAVOL: <cid>,<tot>,<sent>,<recv> summed over contexts."""
        return self._at_counters(ch, "AT#GDATAVOL=2", "#GDATAVOL", parse_gdatavol)


class Huawei(Profile):
    """Huawei ME909/MU709/E3372: AT^ICCID? (nibble-swapped), AT^DSFLOWQRY (hex)."""

    name = "huawei"
    iccid_command = ("AT^ICCID?", "^ICCID")
    reset_command = "AT^RESET"

    def counters(self, ch: AtChannel) -> Counters:
        """^DSFLOWQRY totals (hex)."""
        return self._at_counters(ch, "AT^DSFLOWQRY", "^DSFLOWQRY", parse_dsflowqry)


PROFILES: dict[str, type[Profile]] = {
    p.name: p for p in (Profile, Quectel, Ublox, Simcom, Telit, Huawei)
}
# Substrings of AT+CGMI / ATI answers, lower case.
_VENDOR_HINTS = (
    ("quectel", "quectel"),
    ("u-blox", "ublox"),
    ("ublox", "ublox"),
    ("simcom", "simcom"),
    ("telit", "telit"),
    ("huawei", "huawei"),
)


def vendor_profile(manufacturer: str) -> str:
    """The profile name for a manufacturer string ('Quectel' -> 'quectel'), else 'generic'."""
    low = manufacturer.lower()
    for hint, name in _VENDOR_HINTS:
        if hint in low:
            return name
    return "generic"


def make_profile(name: str, *, interface: str = "wwan0", sysfs_root: Path = SYSFS_NET) -> Profile:
    """A profile instance by name ('auto' is resolved by detect())."""
    try:
        cls = PROFILES[name]
    except KeyError:
        known = ", ".join(["auto", *PROFILES])
        raise ModemError(f"unknown modem profile {name!r} (known: {known})") from None
    return cls(interface, sysfs_root)


def detect(
    ch: AtChannel, name: str = "auto", *, interface: str = "wwan0", sysfs_root: Path = SYSFS_NET
) -> Profile:
    """The named profile, or for 'auto' the one matching AT+CGMI (then ATI)."""
    if name != "auto":
        return make_profile(name, interface=interface, sysfs_root=sysfs_root)
    for cmd in ("AT+CGMI", "ATI"):
        try:
            text = " ".join(ch.command(cmd, bare=True))
        except (AtCommandError, AtParseError):
            continue
        found = vendor_profile(text)
        if found != "generic":
            return make_profile(found, interface=interface, sysfs_root=sysfs_root)
    return make_profile("generic", interface=interface, sysfs_root=sysfs_root)


# -- reading ------------------------------------------------------------------------------


def _read_device(ch: AtChannel, _p: Profile) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, cmd in (("vendor", "AT+CGMI"), ("model", "AT+CGMM"), ("revision", "AT+CGMR")):
        out[key] = parse_text(ch.command(cmd, bare=True), cmd[2:])
    return out


def _read_sim_state(ch: AtChannel, _p: Profile) -> dict[str, Any]:
    try:
        return {"sim_state": parse_cpin(ch.command("AT+CPIN?"))}
    except AtCommandError as exc:
        state = sim_state_of_error(exc)
        if state is None:
            raise
        return {"sim_state": state}


def _read_imei(ch: AtChannel, _p: Profile) -> dict[str, Any]:
    try:
        return {"imei": parse_imei(ch.command("AT+CGSN", bare=True))}
    except (AtCommandError, AtParseError):
        return {"imei": parse_imei(ch.command("AT+CGSN=1", prefix="+CGSN"))}


def _read_operator(ch: AtChannel, _p: Profile) -> dict[str, Any]:
    # Numeric first, then alphanumeric, so the modem is left in the common default format.
    ch.command("AT+COPS=3,2")
    fmt, plmn = parse_cops(ch.command("AT+COPS?"))
    mcc = mnc = ""
    if plmn and fmt == 2:
        mcc, mnc = split_plmn(plmn)
    ch.command("AT+COPS=3,0")
    fmt, name = parse_cops(ch.command("AT+COPS?"))
    return {"operator": name if fmt == 0 else "", "mcc": mcc, "mnc": mnc}


def _read_registration(ch: AtChannel, _p: Profile) -> dict[str, Any]:
    # LTE (CEREG) and CS (CREG) may disagree; registered on either counts as registered.
    found: list[str] = []
    errors: list[ModemError] = []
    for cmd, prefix in (("AT+CEREG?", "+CEREG"), ("AT+CREG?", "+CREG")):
        try:
            state = parse_reg(ch.command(cmd), prefix)
        except (AtCommandError, AtParseError) as exc:
            errors.append(exc)
            continue
        if state in REGISTERED:
            return {"registration": state}
        found.append(state)
    if found:
        return {"registration": found[0]}
    raise errors[0]


def _read_apn(ch: AtChannel, _p: Profile) -> dict[str, Any]:
    contexts = parse_cgdcont(ch.command("AT+CGDCONT?"))
    try:
        active = parse_cgact(ch.command("AT+CGACT?"))
    except (AtCommandError, AtParseError):
        active = []
    for cid in [*active, 1, *sorted(contexts)]:
        if cid in contexts:
            return {"apn": contexts[cid]}
    return {"apn": ""}


def _read_counters(ch: AtChannel, p: Profile) -> dict[str, Any]:
    c = p.counters(ch)
    return {"tx_bytes": c.tx_bytes, "rx_bytes": c.rx_bytes, "counter_source": c.source}


_READERS: dict[str, Callable[[AtChannel, Profile], dict[str, Any]]] = {
    "device": _read_device,
    "sim_state": _read_sim_state,
    "iccid": lambda ch, p: {"iccid": p.iccid(ch)},
    "imsi": lambda ch, _p: {"imsi": parse_imsi(ch.command("AT+CIMI", bare=True))},
    "imei": _read_imei,
    "msisdn": lambda ch, _p: {"msisdn": parse_cnum(ch.command("AT+CNUM"))},
    "operator": _read_operator,
    "signal": radio.read_csq,
    "registration": _read_registration,
    "radio": lambda ch, p: radio.read(ch, p.name, p.radio_probe),
    "apn": _read_apn,
    "counters": _read_counters,
}


def read_fields(
    ch: AtChannel, profile: Profile, steps: tuple[str, ...] = STEPS
) -> tuple[dict[str, Any], dict[str, str]]:
    """Run the read steps; returns (fields, {step: reason} for the steps that failed).

    A failing command fails its step only. After a timeout the modem is pinged: when it
    does not answer that either, AtTimeout propagates (the modem is gone, not one command).
    A PortError always propagates.
    """
    fields: dict[str, Any] = {"profile": profile.name}
    failed: dict[str, str] = {}
    sim_ok = True
    for step in steps:
        if step in SIM_STEPS and not sim_ok:
            failed[step] = f"SIM {fields.get('sim_state', 'absent')}"
            continue
        try:
            fields.update(_READERS[step](ch, profile))
        except AtTimeout as exc:
            failed[step] = describe(exc)
            ch.command("AT", timeout=min(ch.timeout, 2.0))
        except AtCommandError as exc:
            failed[step] = describe(exc)
            sim = sim_state_of_error(exc)
            if sim is not None and step in SIM_STEPS:
                fields["sim_state"] = sim
                sim_ok = False
        except PortError:
            raise
        except ModemError as exc:
            failed[step] = describe(exc)
        if step == "radio" and step in failed:
            fields.update(radio.EMPTY)  # no stale levels next to a failed reading
        if step == "sim_state" and fields.get("sim_state") not in (None, "ready"):
            sim_ok = False
    return fields, failed


def read_all(ch: AtChannel, profile: Profile) -> ModemInfo:
    """Read identity, signal, registration and counters, tolerating single failures."""
    fields, failed = read_fields(ch, profile, STEPS)
    return ModemInfo(**fields, failed=tuple(failed.items()))


def merge(info: ModemInfo, fields: dict[str, Any], failed: dict[str, str]) -> ModemInfo:
    """info with freshly read fields; failed is replaced by this read's failures."""
    return replace(info, **fields, failed=tuple(failed.items()))

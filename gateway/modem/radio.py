"""Radio diagnostics: access technology, RSRP/RSRQ/SINR, cell and tracking area.

The 3GPP commands come first (AT+CEREG? with n=2 for the cell, AT+COPS? for the access
technology when +CEREG has none, AT+CESQ for the levels); one vendor command per profile
fills what they leave open (SINR, band, EARFCN, PCI). Every parser takes the answer lines
of ``AtChannel.command`` and returns only the fields it could read: a field it cannot read,
out of range or in a form it does not know, is left out (unknown), never an exception.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from gateway.modem.at import (
    AtChannel,
    AtCommandError,
    AtParseError,
    AtTimeout,
    split_fields,
    unquote,
    values,
)

log = logging.getLogger("gateway.modem")

# The ModemInfo fields this module fills; each is None while unknown.
RADIO_KEYS = (
    "access_technology",
    "rsrp_dbm",
    "rsrq_db",
    "sinr_db",
    "rscp_dbm",
    "ecno_db",
    "cell_id",
    "tac",
    "band",
    "earfcn",
    "pci",
)
EMPTY: dict[str, Any] = dict.fromkeys(RADIO_KEYS)

# 3GPP TS 27.007 <AcT> of +COPS/+CREG/+CGREG/+CEREG. 8 is EC-GSM-IoT in 27.007, but the
# LTE-M modules that report it (Quectel BG9x, SIMCom SIM70x0) mean eMTC by it, and an
# EC-GSM-IoT cell cannot be the answer of +CEREG.
ACCESS_TECHNOLOGY = {
    0: "gsm",
    1: "gsm",
    2: "umts",
    3: "gsm",
    4: "umts",
    5: "umts",
    6: "umts",
    7: "lte",
    8: "lte-m",
    9: "nb-iot",
    10: "lte",
    11: "5g-nr",
    12: "5g-nr",
    13: "5g-nr",
}
TECHNOLOGIES = ("gsm", "umts", "lte", "lte-m", "nb-iot", "5g-nr")

# Plausible ranges; anything outside is a garbled answer, not a measurement.
_BOUNDS: dict[str, tuple[float, float]] = {
    "rsrp_dbm": (-156.0, -31.0),
    "rsrq_db": (-43.0, 20.0),
    "sinr_db": (-30.0, 60.0),
    "rscp_dbm": (-130.0, -20.0),
    "ecno_db": (-30.0, 0.0),
}
_MAX_CELL_ID = 0xFFFFFFFFF  # 36 bits: an NR cell identity; E-UTRAN uses 28
_MAX_TAC = 0xFFFFFF  # 24 bits in NR, 16 in LTE
_MAX_BAND = 1024
_MAX_EARFCN = 3_279_165  # the largest NR-ARFCN
_MAX_PCI = 1007

_INT_RE = re.compile(r"^[+-]?\d{1,9}$")
_DEC_RE = re.compile(r"^[+-]?\d{1,6}(?:\.\d{1,3})?$")
_HEX_RE = re.compile(r"^(?:0[xX])?([0-9A-Fa-f]{1,9})$")
_BAND_RE = re.compile(r"(?:BAND|\bB|\bN)\s*(\d{1,4})\s*$", re.IGNORECASE)

# Quality grades from RSRP and SINR (docs/modem-and-cdrs.md names the source): the
# lower bound of each grade, best first; below the last one is "poor".
RSRP_GRADES = ((-80.0, "excellent"), (-90.0, "good"), (-100.0, "fair"))
SINR_GRADES = ((20.0, "excellent"), (13.0, "good"), (0.0, "fair"))
GRADES = ("excellent", "good", "fair", "poor")


# -- small, strict number readers -----------------------------------------------------------


def _int(text: str) -> int | None:
    s = unquote(text).strip()
    return int(s) if _INT_RE.match(s) else None


def _dec(text: str) -> float | None:
    s = unquote(text).strip()
    return float(s) if _DEC_RE.match(s) else None


def _hex(text: str, limit: int) -> int | None:
    m = _HEX_RE.match(unquote(text).strip())
    if m is None:
        return None
    v = int(m.group(1), 16)
    # All ones is how modems write "invalid" (FFFF, FFFFFFF).
    if v > limit or set(m.group(1).upper()) == {"F"}:
        return None
    return v


def _index(text: str, top: int) -> int | None:
    """A 0..top index value; 99/255 and anything else mean unknown."""
    v = _int(text)
    return v if v is not None and 0 <= v <= top else None


def _bounded(key: str, v: float | None) -> float | None:
    if v is None:
        return None
    lo, hi = _BOUNDS[key]
    return round(float(v), 1) if lo <= v <= hi else None


def _in_range(v: int | None, lo: int, hi: int) -> int | None:
    return v if v is not None and lo <= v <= hi else None


def _put(out: dict[str, Any], key: str, v: float | None) -> None:
    b = _bounded(key, v)
    if b is not None:
        out[key] = b


def _fields(lines: list[str], prefix: str) -> list[list[str]]:
    return [split_fields(p) for p in values(lines, prefix)]


def _at(f: list[str], i: int) -> str:
    return f[i] if i < len(f) else ""


# -- 3GPP -------------------------------------------------------------------------------------


def technology(act: int | None) -> str | None:
    """An <AcT> number as a name ('lte', 'lte-m', 'nb-iot', ...), None when unknown."""
    return ACCESS_TECHNOLOGY.get(act) if act is not None else None


def parse_csq(lines: list[str]) -> tuple[int | None, int | None]:
    """+CSQ: <rssi>,<ber> -> (csq, dBm); 99 is unknown: (None, None)."""
    rows = _fields(lines, "+CSQ")
    rssi = _int(rows[0][0]) if rows else None
    if rssi is None:
        raise AtParseError(f"cannot parse +CSQ answer {lines!r}")
    if not 0 <= rssi <= 31:
        return None, None
    return rssi, -113 + 2 * rssi


def read_csq(ch: AtChannel, _profile: object = None) -> dict[str, Any]:
    """The "signal" step: AT+CSQ as csq and signal_dbm."""
    csq, dbm = parse_csq(ch.command("AT+CSQ"))
    return {"csq": csq, "signal_dbm": dbm}


def parse_cesq(lines: list[str]) -> dict[str, Any]:
    """+CESQ: <rxlev>,<ber>,<rscp>,<ecno>,<rsrq>,<rsrp> (TS 27.007 §8.69): index values to
    dBm/dB at each step's lower bound; 99 and 255 are unknown."""
    out: dict[str, Any] = {}
    for f in _fields(lines, "+CESQ")[:1]:
        rscp, ecno = _index(_at(f, 2), 96), _index(_at(f, 3), 49)
        rsrq, rsrp = _index(_at(f, 4), 34), _index(_at(f, 5), 97)
        _put(out, "rscp_dbm", None if rscp is None else -121 + rscp)
        _put(out, "ecno_db", None if ecno is None else -24.5 + ecno / 2)
        _put(out, "rsrq_db", None if rsrq is None else -20 + rsrq / 2)
        _put(out, "rsrp_dbm", None if rsrp is None else -141 + rsrp)
    return out


def parse_cereg(lines: list[str], prefix: str = "+CEREG") -> tuple[int | None, dict[str, Any]]:
    """The answer of AT+CEREG? (or +CREG/+CGREG): (n, {tac, cell_id, access_technology}).

    <n>,<stat>[,[<tac>],[<ci>],[<AcT>]...]: the location fields are there with n >= 2.
    """
    for f in _fields(lines, prefix)[:1]:
        out: dict[str, Any] = {}
        n = _int(_at(f, 0))
        if len(f) >= 4:
            tac = _hex(_at(f, 2), _MAX_TAC)
            cell = _hex(_at(f, 3), _MAX_CELL_ID)
            if tac is not None:
                out["tac"] = tac
            if cell is not None:
                out["cell_id"] = cell
        tech = technology(_int(_at(f, 4))) if len(f) >= 5 else None
        if tech is not None:
            out["access_technology"] = tech
        return (n if n is not None and 0 <= n <= 5 else None), out
    return None, {}


def parse_cops_act(lines: list[str]) -> str | None:
    """+COPS: <mode>,<format>,<oper>,<AcT>: the access technology, None when absent."""
    for f in _fields(lines, "+COPS")[:1]:
        return technology(_int(_at(f, 3))) if len(f) >= 4 else None
    return None


# -- vendors ----------------------------------------------------------------------------------

# Quectel's RAT words in +QENG/+QCSQ.
_QUECTEL_RAT = {
    "LTE": "lte",
    "CAT-M": "lte-m",
    "EMTC": "lte-m",
    "CAT-NB": "nb-iot",
    "NBIOT": "nb-iot",
    "WCDMA": "umts",
    "TDSCDMA": "umts",
    "GSM": "gsm",
    "NR5G-SA": "5g-nr",
    "NR5G-NSA": "5g-nr",
    "NR5G": "5g-nr",
}


def _quectel_sinr(raw: int | None) -> float | None:
    """Quectel LTE/eMTC/NB-IoT SINR: fifths of a dB from -20 dB (0..250 is -20..+30 dB)."""
    return None if raw is None or not 0 <= raw <= 250 else raw / 5 - 20


def parse_qeng(lines: list[str]) -> dict[str, Any]:
    """Quectel AT+QENG="servingcell".

    LTE / CAT-M / CAT-NB: "servingcell",<state>,<rat>,<is_tdd>,<MCC>,<MNC>,<cellID hex>,
    <PCID>,<EARFCN>,<band>,<UL bw>,<DL bw>,<TAC hex>,<RSRP>,<RSRQ>,<RSSI>,<SINR>,...;
    WCDMA: ...,"WCDMA",<MCC>,<MNC>,<LAC>,<cellID>,<UARFCN>,<PSC>,<RAC>,<RSCP>,<ecio>,...;
    NR5G-SA: ...,"NR5G-SA",<duplex>,<MCC>,<MNC>,<cellID>,<PCID>,<TAC>,<ARFCN>,<band>,
    <bw>,<RSRP>,<RSRQ>,<SINR dB>,... Modules in EN-DC print the LTE and NR5G-NSA parts
    on lines of their own, without "servingcell".
    """
    out: dict[str, Any] = {}
    for f in _fields(lines, "+QENG"):
        if unquote(_at(f, 0)).lower() == "servingcell":
            f = f[2:]
        rat = _QUECTEL_RAT.get(unquote(_at(f, 0)).upper())
        if rat is None:
            continue
        out.setdefault("access_technology", rat)
        if rat in ("lte", "lte-m", "nb-iot") and len(f) >= 15:
            _fill(out, "cell_id", _hex(f[4], _MAX_CELL_ID))
            _fill(out, "pci", _in_range(_int(f[5]), 0, _MAX_PCI))
            _fill(out, "earfcn", _in_range(_int(f[6]), 0, _MAX_EARFCN))
            _fill(out, "band", _in_range(_int(f[7]), 1, _MAX_BAND))
            _fill(out, "tac", _hex(f[10], _MAX_TAC))
            _put(out, "rsrp_dbm", _int(f[11]))
            _put(out, "rsrq_db", _int(f[12]))
            _put(out, "sinr_db", _quectel_sinr(_int(f[14])))
        elif rat == "umts" and len(f) >= 10:
            _put(out, "rscp_dbm", _int(f[8]))
            _put(out, "ecno_db", _dec(f[9]))
        elif unquote(f[0]).upper() == "NR5G-SA" and len(f) >= 14:
            _fill(out, "cell_id", _hex(f[4], _MAX_CELL_ID))
            _fill(out, "pci", _in_range(_int(f[5]), 0, _MAX_PCI))
            _fill(out, "tac", _hex(f[6], _MAX_TAC))
            _fill(out, "earfcn", _in_range(_int(f[7]), 0, _MAX_EARFCN))
            _fill(out, "band", _in_range(_int(f[8]), 1, _MAX_BAND))
            _put(out, "rsrp_dbm", _int(f[10]))
            _put(out, "rsrq_db", _int(f[11]))
            _put(out, "sinr_db", _int(f[12]))
    return out


def parse_qcsq(lines: list[str]) -> dict[str, Any]:
    """Quectel +QCSQ: "LTE"|"eMTC"|"NBIoT",<rssi>,<rsrp>,<sinr>,<rsrq> (SINR as in QENG)."""
    out: dict[str, Any] = {}
    for f in _fields(lines, "+QCSQ")[:1]:
        rat = _QUECTEL_RAT.get(unquote(_at(f, 0)).upper())
        if rat is None:
            continue
        out["access_technology"] = rat
        if rat in ("lte", "lte-m", "nb-iot") and len(f) >= 5:
            _put(out, "rsrp_dbm", _int(f[2]))
            _put(out, "sinr_db", _quectel_sinr(_int(f[3])))
            _put(out, "rsrq_db", _int(f[4]))
    return out


def parse_ucged(lines: list[str]) -> dict[str, Any]:
    """u-blox SARA-R4 AT+UCGED? in mode 5: +RSRP: <PCI>,<EARFCN>,"<dBm>",... and +RSRQ:
    lines of the same form (one triple per measured cell; the first is the serving cell)."""
    out: dict[str, Any] = {}
    for prefix, key in (("+RSRP", "rsrp_dbm"), ("+RSRQ", "rsrq_db")):
        for f in _fields(lines, prefix)[:1]:
            if len(f) < 3:
                continue
            _fill(out, "pci", _in_range(_int(f[0]), 0, _MAX_PCI))
            _fill(out, "earfcn", _in_range(_int(f[1]), 0, _MAX_EARFCN))
            _put(out, key, _dec(f[2]))
    return out


_SIMCOM_RAT = (
    ("CAT-M", "lte-m"),
    ("CAT-NB", "nb-iot"),
    ("NB-IOT", "nb-iot"),
    ("NR5G", "5g-nr"),
    ("LTE", "lte"),
    ("WCDMA", "umts"),
    ("HSPA", "umts"),
    ("GSM", "gsm"),
)


def parse_cpsi(lines: list[str]) -> dict[str, Any]:
    """SIMCom AT+CPSI? on LTE: <mode>,<op mode>,<MCC>-<MNC>,<TAC 0x..>,<cell id>,<PCI>,
    <band>,<EARFCN>,<DL bw>,<UL bw>,<RSRQ>,<RSRP>,<RSSI>,<RSSNR>.

    SIM7500/7600 print RSRQ, RSRP and RSSI in tenths (-1126 is -112.6 dBm), SIM7000/7080
    in whole units; an RSRP below -200 can only be tenths, and then RSRQ is in tenths too.
    """
    out: dict[str, Any] = {}
    for f in _fields(lines, "+CPSI")[:1]:
        mode = unquote(_at(f, 0)).upper()
        rat = next((name for word, name in _SIMCOM_RAT if word in mode), None)
        if rat is None:
            continue
        out["access_technology"] = rat
        if rat not in ("lte", "lte-m", "nb-iot") or len(f) < 13:
            continue
        _fill(out, "tac", _hex(f[3], _MAX_TAC))
        _fill(out, "cell_id", _in_range(_int(f[4]), 0, _MAX_CELL_ID))
        _fill(out, "pci", _in_range(_int(f[5]), 0, _MAX_PCI))
        m = _BAND_RE.search(unquote(f[6]))
        _fill(out, "band", _in_range(int(m.group(1)), 1, _MAX_BAND) if m else None)
        _fill(out, "earfcn", _in_range(_int(f[7]), 0, _MAX_EARFCN))
        rsrq, rsrp = _dec(f[10]), _dec(f[11])
        tenths = rsrp is not None and rsrp < -200
        _put(out, "rsrp_dbm", rsrp / 10 if tenths and rsrp is not None else rsrp)
        _put(out, "rsrq_db", rsrq / 10 if tenths and rsrq is not None else rsrq)
        if len(f) >= 14:
            _put(out, "sinr_db", _dec(f[13]))
    return out


def parse_rfsts(lines: list[str]) -> dict[str, Any]:
    """Telit AT#RFSTS on LTE: <PLMN>,<EARFCN>,<RSRP>,<RSSI>,<RSRQ>,<TAC hex>,<RAC>,
    [<TXPWR>],<DRX>,<MM>,<RRC>,<CID hex>,<IMSI>,[<NetName>],<SD>,<ABND>[,<SINR>].

    The 2G and 3G forms have a PSC or BSIC where LTE has a negative RSRP; they give
    nothing here. The SINR field, where the firmware prints it, is 0..250 for -20..+30 dB.
    """
    out: dict[str, Any] = {}
    for f in _fields(lines, "#RFSTS")[:1]:
        rsrp = _int(_at(f, 2))
        if rsrp is None or rsrp >= 0 or len(f) < 12:
            continue
        out["access_technology"] = "lte"
        _fill(out, "earfcn", _in_range(_int(f[1]), 0, _MAX_EARFCN))
        _put(out, "rsrp_dbm", rsrp)
        _put(out, "rsrq_db", _int(f[4]))
        _fill(out, "tac", _hex(f[5], _MAX_TAC))
        _fill(out, "cell_id", _hex(f[11], _MAX_CELL_ID))
        if len(f) >= 16:
            _fill(out, "band", _in_range(_int(f[15]), 1, _MAX_BAND))
        if len(f) >= 17:
            _put(out, "sinr_db", _quectel_sinr(_int(f[16])))
    return out


def parse_hcsq(lines: list[str]) -> dict[str, Any]:
    """Huawei ^HCSQ: "LTE",<rssi>,<rsrp>,<sinr>,<rsrq> / "WCDMA",<rssi>,<rscp>,<ecio> /
    "GSM",<rssi> / "NOSERVICE". Index values: RSRP 0..97 is -141+n dBm, SINR 0..251 is
    -20.2+n/5 dB, RSRQ 0..34 is -20+n/2 dB, RSCP 0..96 is -121+n dBm, Ec/Io 0..65 is
    -32.5+n/2 dB; 255 is unknown."""
    out: dict[str, Any] = {}
    for f in _fields(lines, "^HCSQ")[:1]:
        mode = unquote(_at(f, 0)).upper()
        if mode == "LTE":
            out["access_technology"] = "lte"
            rsrp, sinr, rsrq = _index(_at(f, 2), 97), _index(_at(f, 3), 251), _index(_at(f, 4), 34)
            _put(out, "rsrp_dbm", None if rsrp is None else -141 + rsrp)
            _put(out, "sinr_db", None if sinr is None else -20.2 + sinr / 5)
            _put(out, "rsrq_db", None if rsrq is None else -20 + rsrq / 2)
        elif mode in ("WCDMA", "TD-SCDMA"):
            out["access_technology"] = "umts"
            rscp, ecio = _index(_at(f, 2), 96), _index(_at(f, 3), 65)
            _put(out, "rscp_dbm", None if rscp is None else -121 + rscp)
            _put(out, "ecno_db", None if ecio is None else -32.5 + ecio / 2)
        elif mode == "GSM":
            out["access_technology"] = "gsm"
    return out


def _fill(out: dict[str, Any], key: str, v: int | None) -> None:
    if v is not None and key not in out:
        out[key] = v


@dataclass(frozen=True, slots=True)
class VendorCommand:
    """A vendor's radio command: what to send, how the answer is read, set-up sent once."""

    command: str
    parse: Callable[[list[str]], dict[str, Any]]
    prefix: str | None = None
    bare: bool = False
    setup: str = ""


VENDOR_COMMANDS: dict[str, tuple[VendorCommand, ...]] = {
    "quectel": (
        VendorCommand('AT+QENG="servingcell"', parse_qeng, prefix="+QENG"),
        VendorCommand("AT+QCSQ", parse_qcsq, prefix="+QCSQ"),
    ),
    # Mode 5 makes SARA-R4 report the serving cell's RSRP and RSRQ.
    "ublox": (VendorCommand("AT+UCGED?", parse_ucged, bare=True, setup="AT+UCGED=5"),),
    "simcom": (VendorCommand("AT+CPSI?", parse_cpsi, prefix="+CPSI"),),
    "telit": (VendorCommand("AT#RFSTS", parse_rfsts, prefix="#RFSTS"),),
    "huawei": (VendorCommand("AT^HCSQ?", parse_hcsq, prefix="^HCSQ"),),
}


# -- the quality grade ------------------------------------------------------------------------


def _grade(v: float, bands: tuple[tuple[float, str], ...]) -> str:
    return next((name for low, name in bands if v >= low), "poor")


def signal_quality(rsrp_dbm: object, sinr_db: object) -> str | None:
    """'excellent', 'good', 'fair' or 'poor' from RSRP and SINR (the worse of the two when
    both are known); None when neither is."""
    grades = [
        _grade(float(v), bands)
        for v, bands in ((rsrp_dbm, RSRP_GRADES), (sinr_db, SINR_GRADES))
        if isinstance(v, int | float) and not isinstance(v, bool) and v == v
    ]
    return max(grades, key=GRADES.index) if grades else None


# -- reading ----------------------------------------------------------------------------------


class RadioUnsupported(AtCommandError):
    """None of the radio commands is answered by this modem."""


@dataclass(slots=True)
class RadioProbe:
    """What one connection's modem turned out not to answer, so it is not asked again."""

    unsupported: set[str] = field(default_factory=set)
    set_up: set[str] = field(default_factory=set)
    timeouts: dict[str, int] = field(default_factory=dict)


# A command that times out this many polls in a row is not sent again on the connection.
MAX_TIMEOUTS = 2


def _not_supported(exc: AtCommandError) -> bool:
    # ERROR, or +CME ERROR 3/4 (not allowed / not supported): the command is unknown here.
    # Other errors (SIM busy, no network) are conditions of the moment.
    return not exc.is_cme or exc.code in (3, 4, 100)


def read(ch: AtChannel, vendor: str, probe: RadioProbe) -> dict[str, Any]:
    """Every radio field (None when unknown), 3GPP first, then the vendor's command.

    Raises RadioUnsupported when the modem answers none of the commands, and AtTimeout
    when one times out (after MAX_TIMEOUTS polls in a row it is not sent again on this
    connection).
    """
    found: dict[str, Any] = {}
    errors: list[str] = []
    answered = False

    def ask(cmd: str, parse: Callable[[list[str]], Any], **kw: Any) -> Any:
        nonlocal answered
        if cmd in probe.unsupported:
            errors.append(f"{cmd}: not supported")
            return None
        try:
            lines = ch.command(cmd, **kw)
        except AtTimeout:
            probe.timeouts[cmd] = probe.timeouts.get(cmd, 0) + 1
            if probe.timeouts[cmd] >= MAX_TIMEOUTS:
                probe.unsupported.add(cmd)
            raise
        except AtCommandError as exc:
            if _not_supported(exc):
                probe.unsupported.add(cmd)
            errors.append(str(exc))
            return None
        answered = True
        probe.timeouts.pop(cmd, None)
        try:
            return parse(lines)
        except (ValueError, IndexError, TypeError, ArithmeticError) as exc:
            log.debug("%s: cannot read %r: %s", cmd, lines, exc)
            return None

    cereg = ask("AT+CEREG?", parse_cereg)
    if cereg is not None:
        n, location = cereg
        if n is not None and n < 2 and "AT+CEREG=2" not in probe.unsupported:
            # The gateway keeps +CEREG at n=2 (URCs carry the cell too; the poller reads
            # both forms); a modem reset puts it back, and the next poll sets it again.
            try:
                ch.command("AT+CEREG=2")
            except AtCommandError as exc:
                if _not_supported(exc):
                    probe.unsupported.add("AT+CEREG=2")
            else:
                again = ask("AT+CEREG?", parse_cereg)
                if again is not None:
                    location = again[1]
        found.update(location)
    if "access_technology" not in found:
        act = ask("AT+COPS?", parse_cops_act)
        if act is not None:
            found["access_technology"] = act
    cesq = ask("AT+CESQ", parse_cesq)
    if cesq:
        found.update(cesq)
    for vc in VENDOR_COMMANDS.get(vendor, ()):
        if vc.setup and vc.setup not in probe.set_up and vc.command not in probe.unsupported:
            probe.set_up.add(vc.setup)
            try:
                ch.command(vc.setup)
            except AtCommandError as exc:
                log.debug("%s: %s", vc.setup, exc)
        extra = ask(vc.command, vc.parse, prefix=vc.prefix, bare=vc.bare)
        if vc.setup and not extra:
            probe.set_up.discard(vc.setup)  # a modem reset forgets it: sent again next poll
        for key, value in (extra or {}).items():
            found.setdefault(key, value)
        if found.get("sinr_db") is not None:
            break  # the next command would only repeat what is known
    if not answered:
        raise RadioUnsupported("radio diagnostics", "; ".join(errors) or "ERROR")
    return {**EMPTY, **found}

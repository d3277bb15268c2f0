"""The emulated modem's radio: levels that move, a cell, and each vendor's way of saying so.

Answers AT+CESQ, AT+CEREG=<n> / AT+CEREG? (n=2 adds TAC, cell id and AcT), the <AcT> of
+COPS, and the vendors' radio commands: Quectel AT+QENG="servingcell" and AT+QCSQ, u-blox
AT+UCGED=5 / AT+UCGED?, SIMCom AT+CPSI?, Telit AT#RFSTS, Huawei AT^HCSQ?. The generic
vendor answers only the 3GPP commands.

The levels take a bounded random walk, one step per AT+CESQ, from a seeded generator, so
a run is repeatable; a level set with ``set`` (control port: ``radio rsrp -95``) is pinned
and stays where it was put. ``radio off`` makes the modem answer none of the radio
commands, as older firmware does.
"""

from __future__ import annotations

import random
from dataclasses import asdict, dataclass, replace
from typing import Any

# The <AcT> reported for each radio access technology. 8 for LTE-M follows the modules
# that report eMTC so (Quectel BG9x, SIMCom SIM70x0); 13 is E-UTRA-NR dual connectivity.
RATS = {"gsm": 0, "umts": 2, "lte": 7, "lte-m": 8, "nb-iot": 9, "5g-nr": 13}
LTE_FAMILY = frozenset({"lte", "lte-m", "nb-iot", "5g-nr"})
# (lowest, highest, step) of each moving level; values stay inside.
WALK = {
    "rsrp": (-125.0, -60.0, 1.0),
    "rsrq": (-19.0, -4.0, 1.0),
    "sinr": (-10.0, 28.0, 1.0),
    "rscp": (-115.0, -50.0, 1.0),
    "ecno": (-20.0, -2.0, 0.5),
}
# How far a moving level strays from where it started.
SPREAD = 6.0


@dataclass(frozen=True, slots=True)
class Conditions:
    """The radio as the emulated modem sees it."""

    rat: str = "lte"
    rsrp: float = -92.0
    rsrq: float = -11.0
    sinr: float = 9.0
    rscp: float = -85.0
    ecno: float = -7.5
    cell_id: int = 0x1A2B3C4
    tac: int = 0x1A2B
    band: int = 3
    earfcn: int = 1850
    pci: int = 123
    enabled: bool = True


def _clamp(v: float, lo: float, hi: float) -> float:
    return max(lo, min(hi, v))


class RadioSim:
    """The radio part of one ModemEmulator (called under the emulator's lock)."""

    def __init__(self, vendor: str, seed: int | None, conditions: Conditions | None = None):
        self.vendor = vendor
        self.cond = conditions or Conditions()
        self.start = self.cond
        self.pinned: set[str] = set()
        self.cereg_n = 0
        self.ucged_mode = 0
        self._rng = random.Random(None if seed is None else seed + 1)

    # -- control --------------------------------------------------------------------------

    def set(self, key: str, value: str) -> None:
        """Set (and pin) one condition: rat NAME, rsrp/rsrq/sinr/rscp/ecno NUMBER, cell_id
        or tac HEX, band/earfcn/pci N; `on`/`off` as the key switch the answers."""
        if key in ("on", "off"):
            self.cond = replace(self.cond, enabled=key == "on")
            return
        if key == "rat":
            if value not in RATS:
                raise ValueError(f"unknown rat {value!r}; choose from {', '.join(RATS)}")
            self.cond = replace(self.cond, rat=value)
        elif key in WALK:
            self.cond = replace(self.cond, **{key: float(value)})
            self.pinned.add(key)
        elif key in ("cell_id", "tac"):
            self.cond = replace(self.cond, **{key: int(value, 16)})
        elif key in ("band", "earfcn", "pci"):
            self.cond = replace(self.cond, **{key: int(value)})
        else:
            raise ValueError(f"unknown radio setting {key!r}")

    def reboot(self) -> None:
        """A modem reset: +CEREG and +UCGED back to their defaults."""
        self.cereg_n = 0
        self.ucged_mode = 0

    def state(self) -> dict[str, Any]:
        """The conditions, the pinned levels and the +CEREG mode, as plain data."""
        return {**asdict(self.cond), "pinned": sorted(self.pinned), "cereg_n": self.cereg_n}

    def step(self) -> None:
        """One step of the random walk of every level that is not pinned."""
        c = self.cond
        moved: dict[str, float] = {}
        for key, (lo, hi, unit) in WALK.items():
            if key in self.pinned:
                continue
            base = getattr(self.start, key)
            v = getattr(c, key) + self._rng.choice((-unit, 0.0, unit))
            moved[key] = _clamp(_clamp(v, base - SPREAD, base + SPREAD), lo, hi)
        self.cond = replace(c, **moved)

    # -- answers --------------------------------------------------------------------------

    @property
    def cops_act(self) -> str:
        """',<AcT>' to end a +COPS answer with; nothing with the radio answers off."""
        return f",{RATS[self.cond.rat]}" if self.cond.enabled else ""

    def cereg_urc(self, stat: int, registered: bool) -> str:
        """+CEREG: <stat>, with the location when n=2 and camped on an LTE cell."""
        return f"+CEREG: {stat}{self._location(registered)}"

    def hcsq_urc(self, registered: bool) -> str:
        """Huawei's ^HCSQ, sent unsolicited when the levels change."""
        return self._hcsq(registered)

    def _location(self, registered: bool) -> str:
        c = self.cond
        if self.cereg_n < 2 or not registered or c.rat not in LTE_FAMILY or not c.enabled:
            return ""
        return f',"{c.tac:04X}","{c.cell_id:07X}",{RATS[c.rat]}'

    def answer(
        self, u: str, stat: int, registered: bool, plmn: str
    ) -> tuple[list[str], str] | None:
        """(lines, final) for a radio command, None for any other command."""
        if u.startswith("AT+CEREG="):
            if not self.cond.enabled or u[9:] not in ("0", "1", "2"):
                return [], "ERROR"
            self.cereg_n = int(u[9:])
            return [], "OK"
        if u == "AT+CEREG?":
            if not self.cond.enabled:
                return None
            return [f"+CEREG: {self.cereg_n},{stat}{self._location(registered)}"], "OK"
        vendor_cmds = {
            "quectel": ('AT+QENG="SERVINGCELL"', "AT+QCSQ"),
            "ublox": ("AT+UCGED?", "AT+UCGED=5", "AT+UCGED=2", "AT+UCGED=0"),
            "simcom": ("AT+CPSI?",),
            "telit": ("AT#RFSTS",),
            "huawei": ("AT^HCSQ?",),
        }.get(self.vendor, ())
        if u != "AT+CESQ" and u not in vendor_cmds:
            return None
        if not self.cond.enabled:
            return [], "ERROR"
        if u == "AT+CESQ":
            self.step()
            return [self._cesq(registered)], "OK"
        if u.startswith("AT+UCGED="):
            self.ucged_mode = int(u[9:])
            return [], "OK"
        mcc, mnc = plmn[:3], plmn[3:]
        lines = {
            'AT+QENG="SERVINGCELL"': lambda: [self._qeng(registered, mcc, mnc)],
            "AT+QCSQ": lambda: [self._qcsq(registered)],
            "AT+UCGED?": lambda: self._ucged(registered),
            "AT+CPSI?": lambda: [self._cpsi(registered, mcc, mnc)],
            "AT#RFSTS": lambda: [self._rfsts(registered, mcc, mnc)],
            "AT^HCSQ?": lambda: [self._hcsq(registered)],
        }[u]()
        return lines, "OK"

    def _cesq(self, registered: bool) -> str:
        c = self.cond
        if not registered:
            return "+CESQ: 99,99,255,255,255,255"
        if c.rat in LTE_FAMILY:
            rsrq = int(_clamp(round((c.rsrq + 20) * 2), 0, 34))
            rsrp = int(_clamp(round(c.rsrp + 141), 0, 97))
            return f"+CESQ: 99,99,255,255,{rsrq},{rsrp}"
        if c.rat == "umts":
            rscp = int(_clamp(round(c.rscp + 121), 0, 96))
            ecno = int(_clamp(round((c.ecno + 24.5) * 2), 0, 49))
            return f"+CESQ: 99,99,{rscp},{ecno},255,255"
        return "+CESQ: 40,0,255,255,255,255"

    def _raw_sinr(self) -> int:
        """Quectel's and Telit's SINR unit: fifths of a dB from -20 dB."""
        return int(_clamp(round((self.cond.sinr + 20) * 5), 0, 250))

    def _qeng(self, registered: bool, mcc: str, mnc: str) -> str:
        c = self.cond
        if not registered:
            return '+QENG: "servingcell","SEARCH"'
        head = '+QENG: "servingcell","NOCONN"'
        if c.rat == "umts":
            rscp, ecno = round(c.rscp), round(c.ecno)
            return (
                f'{head},"WCDMA",{mcc},{mnc},{c.tac:X},{c.cell_id:X},10700,{c.pci},'
                f"1,{rscp},{ecno},-,-,-,-,-"
            )
        if c.rat == "gsm":
            return f'{head},"GSM",{mcc},{mnc},{c.tac:X},{c.cell_id & 0xFFFF:X},30,60,-,-80'
        if c.rat == "5g-nr":
            return (
                f'{head},"NR5G-SA","TDD",{mcc},{mnc},{c.cell_id:X},{c.pci},{c.tac:X},'
                f"{c.earfcn},{c.band},12,{round(c.rsrp)},{round(c.rsrq)},{round(c.sinr)},1,-"
            )
        word = {"lte": "LTE", "lte-m": "CAT-M", "nb-iot": "CAT-NB"}[c.rat]
        return (
            f'{head},"{word}","FDD",{mcc},{mnc},{c.cell_id:X},{c.pci},{c.earfcn},{c.band},'
            f"5,5,{c.tac:X},{round(c.rsrp)},{round(c.rsrq)},{round(c.rsrp) + 25},"
            f"{self._raw_sinr()},12,-,40"
        )

    def _qcsq(self, registered: bool) -> str:
        c = self.cond
        if not registered or c.rat not in LTE_FAMILY:
            return '+QCSQ: "NOSERVICE"'
        word = {"lte-m": "eMTC", "nb-iot": "NBIoT"}.get(c.rat, "LTE")
        rsrp, rsrq = round(c.rsrp), round(c.rsrq)
        return f'+QCSQ: "{word}",{rsrp + 25},{rsrp},{self._raw_sinr()},{rsrq}'

    def _ucged(self, registered: bool) -> list[str]:
        c = self.cond
        if self.ucged_mode != 5 or not registered or c.rat not in LTE_FAMILY:
            return [f"+UCGED: {self.ucged_mode}"]
        return [
            "+UCGED: 5",
            f'+RSRP: {c.pci},{c.earfcn},"{c.rsrp:07.2f}",',
            f'+RSRQ: {c.pci},{c.earfcn},"{c.rsrq:06.2f}",',
        ]

    def _cpsi(self, registered: bool, mcc: str, mnc: str) -> str:
        c = self.cond
        if not registered:
            return "+CPSI: NO SERVICE,Online"
        if c.rat == "umts":
            return (
                f"+CPSI: WCDMA,Online,{mcc}-{mnc},0x{c.tac:04X},{c.cell_id},"
                f"WCDMA IMT 2000,{c.pci},10700,0,{round(c.ecno)},{round(c.rscp)},0,0"
            )
        if c.rat == "gsm":
            return f"+CPSI: GSM,Online,{mcc}-{mnc},0x{c.tac:04X},{c.cell_id & 0xFFFF},60,EGSM900"
        mode = {"lte": "LTE", "lte-m": "LTE CAT-M1", "nb-iot": "LTE NB-IOT", "5g-nr": "LTE"}
        # SIM7600 firmware prints RSRQ, RSRP and RSSI in tenths.
        return (
            f"+CPSI: {mode[c.rat]},Online,{mcc}-{mnc},0x{c.tac:04X},{c.cell_id},{c.pci},"
            f"EUTRAN-BAND{c.band},{c.earfcn},5,5,{round(c.rsrq * 10)},{round(c.rsrp * 10)},"
            f"{round((c.rsrp + 25) * 10)},{round(c.sinr)}"
        )

    def _rfsts(self, registered: bool, mcc: str, mnc: str) -> str:
        c = self.cond
        if not registered:
            return '#RFSTS: "",0,0,0,0'
        if c.rat not in LTE_FAMILY:
            return (
                f'#RFSTS: "{mcc} {mnc}",10700,{c.pci},{c.ecno:.1f},{round(c.rscp)},-70,'
                f'{c.tac:04X},FF,0,64,19,2,0,0.0,{c.cell_id:07X},"",,3'
            )
        return (
            f'#RFSTS: "{mcc} {mnc}",{c.earfcn},{round(c.rsrp)},{round(c.rsrp) + 25},'
            f"{round(c.rsrq)},{c.tac:04X},FF,0,128,19,1,{c.cell_id:07X},"
            f'"","",3,{c.band},{self._raw_sinr()}'
        )

    def _hcsq(self, registered: bool) -> str:
        c = self.cond
        if not registered:
            return '^HCSQ: "NOSERVICE"'
        if c.rat in LTE_FAMILY:
            rsrp = int(_clamp(round(c.rsrp + 141), 0, 97))
            sinr = int(_clamp(round((c.sinr + 20.2) * 5), 0, 251))
            rsrq = int(_clamp(round((c.rsrq + 20) * 2), 0, 34))
            return f'^HCSQ: "LTE",{rsrp + 20},{rsrp},{sinr},{rsrq}'
        if c.rat == "umts":
            rscp = int(_clamp(round(c.rscp + 121), 0, 96))
            ecio = int(_clamp(round((c.ecno + 32.5) * 2), 0, 65))
            return f'^HCSQ: "WCDMA",{rscp + 10},{rscp},{ecio}'
        return '^HCSQ: "GSM",40'

"""Radio diagnostics: the parsers of each vendor's answer, hostile answers, the quality grade,
the metrics of the radio fields and the signal history read from a real store."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as hs
from prometheus_client.parser import text_string_to_metric_families

from gateway.modem import radio, signal
from gateway.modem.profiles import ModemInfo
from gateway.store import Store
from gateway.web import metrics

PARSERS: dict[str, Callable[[list[str]], dict[str, Any]]] = {
    "+CESQ": radio.parse_cesq,
    "+QENG": radio.parse_qeng,
    "+QCSQ": radio.parse_qcsq,
    "+RSRP": radio.parse_ucged,
    "+CPSI": radio.parse_cpsi,
    "#RFSTS": radio.parse_rfsts,
    "^HCSQ": radio.parse_hcsq,
}

# -- 3GPP -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        # LTE: RSRP 97 is -44 dBm, 0 is below -140; RSRQ 34 is -3 dB, 0 below -19.5.
        ("+CESQ: 99,99,255,255,18,46", {"rsrq_db": -11.0, "rsrp_dbm": -95.0}),
        ("+CESQ: 99,99,255,255,34,97", {"rsrq_db": -3.0, "rsrp_dbm": -44.0}),
        ("+CESQ: 99,99,255,255,0,0", {"rsrq_db": -20.0, "rsrp_dbm": -141.0}),
        ("+CESQ: 99,99,255,255,21,255", {"rsrq_db": -9.5}),
        # UMTS: RSCP and Ec/No, the LTE fields unknown.
        ("+CESQ: 99,99,36,34,255,255", {"rscp_dbm": -85.0, "ecno_db": -7.5}),
        # GSM or nothing at all: no level the gateway reports.
        ("+CESQ: 40,0,255,255,255,255", {}),
        ("+CESQ: 99,99,255,255,255,255", {}),
        # Out of the index ranges (35, 98) is unknown, not extrapolated.
        ("+CESQ: 99,99,255,255,35,98", {}),
    ],
)
def test_cesq_index_values_become_dbm_and_db(line: str, expected: dict[str, Any]) -> None:
    assert radio.parse_cesq([line]) == expected


def test_cereg_n2_gives_tac_cell_and_access_technology() -> None:
    n, loc = radio.parse_cereg(['+CEREG: 2,1,"1A2B","01A2B3C4",7'])
    assert n == 2
    assert loc == {"tac": 0x1A2B, "cell_id": 0x1A2B3C4, "access_technology": "lte"}
    assert radio.parse_cereg(['+CEREG: 2,5,"00C3","0000A1B",9'])[1]["access_technology"] == (
        "nb-iot"
    )
    # n=0 or 1 carries no location; "FFFF" / "FFFFFFF" are how modems say invalid.
    assert radio.parse_cereg(["+CEREG: 0,1"]) == (0, {})
    assert radio.parse_cereg(['+CEREG: 2,1,"FFFF","FFFFFFF",7'])[1] == {"access_technology": "lte"}
    assert radio.parse_cereg(["+CEREG: 2,2,,,"]) == (2, {})


@pytest.mark.parametrize(
    ("act", "name"),
    [
        (0, "gsm"),
        (2, "umts"),
        (6, "umts"),
        (7, "lte"),
        (8, "lte-m"),
        (9, "nb-iot"),
        (10, "lte"),
        (11, "5g-nr"),
        (12, "5g-nr"),
        (13, "5g-nr"),
        (14, None),
        (99, None),
    ],
)
def test_access_technology_of_each_act(act: int, name: str | None) -> None:
    assert radio.parse_cops_act([f'+COPS: 0,0,"Operator",{act}']) == name
    assert radio.technology(act) == name


def test_cops_without_act_or_operator_gives_no_technology() -> None:
    assert radio.parse_cops_act(['+COPS: 0,0,"Operator"']) is None
    assert radio.parse_cops_act(["+COPS: 0"]) is None


# -- vendors -------------------------------------------------------------------------------------


def test_quectel_qeng_lte_with_the_sinr_in_fifths_of_a_db() -> None:
    line = (
        '+QENG: "servingcell","NOCONN","LTE","FDD",440,10,1A2B3C4,123,1850,3,5,5,1A2B,'
        "-95,-11,-70,165,12,-,40"
    )
    assert radio.parse_qeng([line]) == {
        "access_technology": "lte",
        "cell_id": 0x1A2B3C4,
        "pci": 123,
        "earfcn": 1850,
        "band": 3,
        "tac": 0x1A2B,
        "rsrp_dbm": -95.0,
        "rsrq_db": -11.0,
        "sinr_db": 13.0,  # 165 / 5 - 20
    }


def test_quectel_qeng_other_forms() -> None:
    assert radio.parse_qeng(['+QENG: "servingcell","SEARCH"']) == {}
    cat_m = radio.parse_qeng(
        [
            '+QENG: "servingcell","NOCONN","CAT-M","FDD",440,10,A1B2C3,7,6300,20,3,3,'
            "2F1,-110,-14,-80,50,-,30"
        ]
    )
    assert cat_m["access_technology"] == "lte-m"
    assert cat_m["sinr_db"] == -10.0
    wcdma = radio.parse_qeng(
        ['+QENG: "servingcell","NOCONN","WCDMA",440,10,1A2B,1A2B3C4,10700,123,1,-85,-8,-,-,-,-,-']
    )
    assert wcdma == {"access_technology": "umts", "rscp_dbm": -85.0, "ecno_db": -8.0}
    nr = radio.parse_qeng(
        [
            '+QENG: "servingcell","NOCONN","NR5G-SA","TDD",440,10,1A2B3C4D5,501,1A2B3C,'
            "627264,78,12,-88,-11,18,1,-"
        ]
    )
    assert nr["access_technology"] == "5g-nr"
    assert (nr["cell_id"], nr["tac"], nr["band"], nr["sinr_db"]) == (
        0x1A2B3C4D5,
        0x1A2B3C,
        78,
        18.0,
    )
    # EN-DC: the LTE anchor on a line of its own.
    endc = radio.parse_qeng(
        [
            '+QENG: "servingcell","NOCONN"',
            '+QENG: "LTE","FDD",440,10,1A2B3C4,123,1850,3,5,5,1A2B,-95,-11,-70,165,12,-,40',
            '+QENG: "NR5G-NSA",440,10,501,-90,20,-11,627264,78,12,1',
        ]
    )
    assert (endc["access_technology"], endc["rsrp_dbm"], endc["band"]) == ("lte", -95.0, 3)


def test_quectel_qcsq() -> None:
    assert radio.parse_qcsq(['+QCSQ: "LTE",-70,-95,165,-11']) == {
        "access_technology": "lte",
        "rsrp_dbm": -95.0,
        "sinr_db": 13.0,
        "rsrq_db": -11.0,
    }
    assert radio.parse_qcsq(['+QCSQ: "NOSERVICE"']) == {}


def test_ublox_ucged_mode_5() -> None:
    lines = ["+UCGED: 5", '+RSRP: 123,1850,"-095.00",', '+RSRQ: 123,1850,"-11.00",']
    assert radio.parse_ucged(lines) == {
        "pci": 123,
        "earfcn": 1850,
        "rsrp_dbm": -95.0,
        "rsrq_db": -11.0,
    }
    assert radio.parse_ucged(["+UCGED: 0"]) == {}


def test_simcom_cpsi_in_tenths_and_in_whole_units() -> None:
    # SIM7600 (tenths) as printed in the field.
    tenths = radio.parse_cpsi(
        ["+CPSI: LTE,Online,404-45,0x21F9,322642,453,EUTRAN-BAND40,39275,4,4,-168,-1126,-773,7"]
    )
    assert tenths == {
        "access_technology": "lte",
        "tac": 0x21F9,
        "cell_id": 322642,
        "pci": 453,
        "band": 40,
        "earfcn": 39275,
        "rsrp_dbm": -112.6,
        "rsrq_db": -16.8,
        "sinr_db": 7.0,
    }
    whole = radio.parse_cpsi(
        ["+CPSI: LTE CAT-M1,Online,460-00,0x5A4F,25536770,301,EUTRAN-BAND3,1300,5,5,-10,-76,-50,15"]
    )
    assert (whole["access_technology"], whole["rsrp_dbm"], whole["rsrq_db"]) == (
        "lte-m",
        -76.0,
        -10.0,
    )
    assert radio.parse_cpsi(["+CPSI: NO SERVICE,Online"]) == {}
    assert radio.parse_cpsi(["+CPSI: GSM,Online,460-00,0x1234,5678,60,EGSM900"]) == {
        "access_technology": "gsm"
    }


def test_telit_rfsts_lte_and_3g() -> None:
    lte = radio.parse_rfsts(
        [
            '#RFSTS: "440 10",1850,-95,-70,-11,1A2B,FF,0,128,19,1,1A2B3C4,"440101234567890",'
            '"NTT DOCOMO",3,3,165'
        ]
    )
    assert lte == {
        "access_technology": "lte",
        "earfcn": 1850,
        "rsrp_dbm": -95.0,
        "rsrq_db": -11.0,
        "tac": 0x1A2B,
        "cell_id": 0x1A2B3C4,
        "band": 3,
        "sinr_db": 13.0,
    }
    # The 3G form has the PSC where LTE has RSRP: nothing is guessed from it.
    assert (
        radio.parse_rfsts(
            ['#RFSTS: "440 10",10700,123,-5.0,-80,-70,1A2B,FF,0,64,19,2,0,0.0,1A2B3C4,"",,3']
        )
        == {}
    )


def test_huawei_hcsq_index_values() -> None:
    assert radio.parse_hcsq(['^HCSQ: "LTE",66,46,166,18']) == {
        "access_technology": "lte",
        "rsrp_dbm": -95.0,  # -141 + 46
        "sinr_db": 13.0,  # -20.2 + 166 / 5
        "rsrq_db": -11.0,  # -20 + 18 / 2
    }
    assert radio.parse_hcsq(['^HCSQ: "WCDMA",46,36,50']) == {
        "access_technology": "umts",
        "rscp_dbm": -85.0,
        "ecno_db": -7.5,
    }
    assert radio.parse_hcsq(['^HCSQ: "LTE",255,255,255,255']) == {"access_technology": "lte"}
    assert radio.parse_hcsq(['^HCSQ: "NOSERVICE"']) == {}


# -- hostile answers ------------------------------------------------------------------------------

FIELD = hs.one_of(
    hs.integers(min_value=-(10**30), max_value=10**30).map(str),
    hs.floats(allow_nan=True, allow_infinity=True).map(str),
    hs.text(max_size=12),
    hs.sampled_from(["", '""', '"', "-", "255", "99", "FFFF", "0x", "nan", "1e9", "LTE", "CAT-M"]),
    hs.text(alphabet="0123456789ABCDEFabcdef", min_size=1, max_size=14).map(lambda s: f'"{s}"'),
)
LINE = hs.tuples(
    hs.sampled_from(
        [*PARSERS, "+CEREG", "+COPS", '+QENG: "servingcell","NOCONN"', "+RSRQ", "+UCGED", ""]
    ),
    hs.lists(FIELD, max_size=22),
).map(lambda t: f"{t[0]}: " + ",".join(t[1]))
ANSWERS = hs.lists(hs.one_of(LINE, hs.text(max_size=60)), max_size=5)


def _check_fields(out: dict[str, Any]) -> None:
    assert set(out) <= set(radio.RADIO_KEYS)
    for key, value in out.items():
        if key == "access_technology":
            assert value in radio.TECHNOLOGIES
        elif key in radio._BOUNDS:
            lo, hi = radio._BOUNDS[key]
            assert isinstance(value, float)
            assert math.isfinite(value)
            assert lo <= value <= hi
        else:
            assert isinstance(value, int)
            assert value >= 0


@settings(max_examples=300, deadline=None)
@given(lines=ANSWERS)
def test_no_answer_makes_a_parser_raise_or_report_nonsense(lines: list[str]) -> None:
    for parse in PARSERS.values():
        _check_fields(parse(lines))
    n, location = radio.parse_cereg(lines)
    assert n is None or 0 <= n <= 5
    _check_fields(location)
    assert radio.parse_cops_act(lines) in (None, *radio.TECHNOLOGIES)


@settings(max_examples=200, deadline=None)
@given(
    rsrp=hs.one_of(hs.none(), hs.floats(), hs.integers(), hs.text(max_size=4), hs.booleans()),
    sinr=hs.one_of(hs.none(), hs.floats(), hs.integers(), hs.text(max_size=4), hs.booleans()),
)
def test_the_grade_takes_any_value_and_is_never_better_than_either_input(
    rsrp: object, sinr: object
) -> None:
    grade = radio.signal_quality(rsrp, sinr)
    assert grade in (None, *radio.GRADES)
    for value, alone in (
        (rsrp, radio.signal_quality(rsrp, None)),
        (sinr, radio.signal_quality(None, sinr)),
    ):
        if alone is not None:
            assert grade is not None
            assert radio.GRADES.index(grade) >= radio.GRADES.index(alone), value


@pytest.mark.parametrize(
    ("rsrp", "sinr", "grade"),
    [
        (-70, None, "excellent"),
        (-80, None, "excellent"),
        (-80.5, None, "good"),
        (-90, None, "good"),
        (-95, None, "fair"),
        (-100, None, "fair"),
        (-101, None, "poor"),
        (None, 20, "excellent"),
        (None, 13, "good"),
        (None, 12.8, "fair"),
        (None, 0, "fair"),
        (None, -0.2, "poor"),
        (-75, 5, "fair"),  # the worse of the two
        (-105, 25, "poor"),
        (None, None, None),
    ],
)
def test_grade_bands(rsrp: float | None, sinr: float | None, grade: str | None) -> None:
    assert radio.signal_quality(rsrp, sinr) == grade


# -- metrics and history ---------------------------------------------------------------------


def _metric_samples(status: dict[str, Any]) -> dict[str, float]:
    from prometheus_client import CollectorRegistry, generate_latest

    class One:
        def collect(self) -> Any:
            return metrics._modem(status)

    reg = CollectorRegistry()
    reg.register(One())  # type: ignore[arg-type]
    text = generate_latest(reg).decode()
    return {
        s.name
        + (
            "{" + ",".join(f"{k}={v}" for k, v in s.labels.items()) + "}" if s.labels else ""
        ): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


def test_radio_gauges_have_no_sample_while_unknown() -> None:
    info = ModemInfo(access_technology="lte-m", rsrp_dbm=-95.0, rsrq_db=-11.0).to_dict()
    got = _metric_samples({"configured": True, "state": "ok", "info": info})
    assert got["gateway_modem_rsrp_dbm"] == -95.0
    assert got["gateway_modem_rsrq_db"] == -11.0
    assert got["gateway_modem_access_technology{technology=lte-m}"] == 1.0
    assert not any(k.startswith(("gateway_modem_sinr", "gateway_modem_rscp")) for k in got)
    none = _metric_samples({"configured": True, "state": "ok", "info": ModemInfo().to_dict()})
    assert not any("rsrp" in k or "technology" in k for k in none)
    assert none["gateway_modem_up"] == 1.0


def test_signal_history_reads_the_snapshots_oldest_first(tmp_path: Path) -> None:
    store = Store(tmp_path / "gateway.db")
    now = time.time_ns()
    snaps = [
        (now - 7200 * 10**9, ModemInfo(rsrp_dbm=-70.0, access_technology="lte")),
        (now - 60 * 10**9, ModemInfo(rsrp_dbm=-95.0, sinr_db=25.0, cell_id=27440068, tac=6699)),
        (now - 30 * 10**9, ModemInfo(rscp_dbm=-85.0, ecno_db=-7.5, access_technology="umts")),
    ]

    def write(conn: sqlite3.Connection) -> None:
        with conn:
            for ts, info in snaps:
                conn.execute(
                    "INSERT INTO modem_snapshots(ts_ns, state, data) VALUES (?, 'ok', ?)",
                    (ts, orjson.dumps(info.to_dict()).decode()),
                )
            # A damaged row is skipped, not fatal.
            conn.execute(
                "INSERT INTO modem_snapshots(ts_ns, state, data) VALUES (?, 'ok', '[1]')",
                (now - 20 * 10**9,),
            )

    try:
        store.call(write).result(10)
    finally:
        store.close()
    conn = sqlite3.connect(tmp_path / "gateway.db")
    try:
        rows = signal.history(conn, now - 3600 * 10**9)
    finally:
        conn.close()
    assert [r["rsrp_dbm"] for r in rows] == [-95.0, None]
    assert rows[0]["signal_quality"] == "fair"
    assert (rows[0]["cell_id"], rows[0]["tac"]) == (27440068, 6699)
    assert rows[1]["signal_quality"] is None
    table = signal.format_table(rows).splitlines()
    assert table[0].split()[:4] == ["time", "(UTC)", "state", "tech"]
    assert "-95" in table[1]
    assert "fair" in table[1]
    assert "27440068" in table[1]
    assert "umts" in table[2]
    assert "-7.5" in table[2]

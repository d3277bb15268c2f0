"""Vendor profiles: parsers from exact answer strings, ICCID decoding, counters, read_all."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.errors import ModemError
from gateway.modem.at import AtChannel, AtParseError
from gateway.modem.profiles import (
    ModemInfo,
    decode_iccid,
    detect,
    encode_iccid_swapped,
    make_profile,
    parse_cgact,
    parse_cgdcont,
    parse_cnum,
    parse_cops,
    parse_cpin,
    parse_crsm_iccid,
    parse_dsflowqry,
    parse_gdatavol,
    parse_iccid,
    parse_imei,
    parse_imsi,
    parse_qgdcnt,
    parse_reg,
    parse_ugcntrd,
    read_all,
    split_plmn,
    sysfs_counters,
    vendor_profile,
)
from gateway.modem.radio import parse_csq
from tests.test_modem_at import modem

# -- ICCID ----------------------------------------------------------------------------------


def test_iccid_vectors_decode_as_modemmanager_does() -> None:
    assert decode_iccid("98231420326409614067") == "89324102234690160476"
    assert decode_iccid('"984402003576012594F9"') == "8944200053671052499"
    assert decode_iccid("89441000303132333435") == "89441000303132333435"
    assert decode_iccid("8944100030313233343F") == "8944100030313233343"
    assert decode_iccid(" 8944100030313233343 ") == "8944100030313233343"


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "1234",
        "894410003031323334351234",
        "89441000303132333G35",
        "F9441000303132333435",
        "89441000303132333F35",
    ],
)
def test_iccid_that_is_not_one_is_refused(raw: str) -> None:
    with pytest.raises(AtParseError):
        decode_iccid(raw)


@given(st.from_regex(r"89[0-9]{17,18}", fullmatch=True))
def test_iccid_round_trips_through_the_sims_nibble_swapped_form(iccid: str) -> None:
    assert decode_iccid(iccid) == iccid
    assert decode_iccid(encode_iccid_swapped(iccid)) == iccid


@pytest.mark.parametrize(
    ("lines", "prefix", "iccid"),
    [
        (["+QCCID: 89860318760204123456"], "+QCCID", "89860318760204123456"),
        (["+QCCID: 8944500601234567890F"], "+QCCID", "8944500601234567890"),
        (["+CCID: 8939104520000147432"], "+CCID", "8939104520000147432"),
        (['+CCID: "89441000301234567890",""'], "+CCID", "89441000301234567890"),
        (
            ['+CCID: "8944100030123456789F","89049032000001000000012345678901"'],
            "+CCID",
            "8944100030123456789",
        ),
        (["+ICCID: 898600D6011680036795"], "+ICCID", "898600D6011680036795"),
        (["+ICCID: 89860A18760204123456"], "+ICCID", "89860A18760204123456"),
        (["#CCID: 89011703278101034357"], "#CCID", "89011703278101034357"),
        (["^ICCID: 98231420326409614067"], "^ICCID", "89324102234690160476"),
        (["^ICCID: 984402003576012594F9"], "^ICCID", "8944200053671052499"),
    ],
)
def test_vendor_iccid_answers(lines: list[str], prefix: str, iccid: str) -> None:
    assert parse_iccid(lines, prefix) == iccid


def test_generic_iccid_from_crsm_read_binary() -> None:
    assert parse_crsm_iccid(['+CRSM: 144,0,"984402003576012594F9"']) == "8944200053671052499"
    assert parse_crsm_iccid(['+CRSM: 144,0,"98231420326409614067"']) == "89324102234690160476"
    with pytest.raises(AtParseError, match="sw1=106"):
        parse_crsm_iccid(['+CRSM: 106,130,""'])
    with pytest.raises(AtParseError):
        parse_crsm_iccid([])


# -- identity, network ---------------------------------------------------------------------


def test_imsi_and_imei_bare_or_prefixed() -> None:
    assert parse_imsi(["440101234567890"]) == "440101234567890"
    assert parse_imsi(["~#", "310410123456789"]) == "310410123456789"
    assert parse_imei(["490154203237518"]) == "490154203237518"
    assert parse_imei(['+CGSN: "490154203237518"']) == "490154203237518"
    assert parse_imei(["+CGSN: 490154203237518"]) == "490154203237518"
    with pytest.raises(AtParseError):
        parse_imsi(["Quectel"])


def test_msisdn_any_number_of_lines_or_none() -> None:
    assert parse_cnum([]) == ""
    assert parse_cnum(['+CNUM: "","+819012345678",145']) == "+819012345678"
    assert parse_cnum([',"0",129', '+CNUM: ,"+4915112345678",145']) == "+4915112345678"
    assert (
        parse_cnum(['+CNUM: "Voice","+15551230001",145,7,4', '+CNUM: "Data","+15551230002",145'])
        == "+15551230001"
    )
    assert parse_cnum(['+CNUM: "",""']) == ""


def test_operator_name_and_numeric_code() -> None:
    assert parse_cops(['+COPS: 0,0,"NTT DOCOMO",7']) == (0, "NTT DOCOMO")
    assert parse_cops(['+COPS: 1,0,"AT&T, Inc",7']) == (0, "AT&T, Inc")
    assert parse_cops(['+COPS: 0,2,"310410",7']) == (2, "310410")
    assert parse_cops(["+COPS: 0"]) == (None, "")
    assert split_plmn("44010") == ("440", "10")
    assert split_plmn("310410") == ("310", "410")
    with pytest.raises(AtParseError):
        split_plmn("4401")


@pytest.mark.parametrize(
    ("line", "csq", "dbm"),
    [
        ("+CSQ: 20,99", 20, -73),
        ("+CSQ: 30, 99", 30, -53),
        ("+CSQ: 0,0", 0, -113),
        ("+CSQ: 31,99", 31, -51),
        ("+CSQ: 99,99", None, None),
    ],
)
def test_signal_quality_in_dbm(line: str, csq: int | None, dbm: int | None) -> None:
    assert parse_csq([line]) == (csq, dbm)


@pytest.mark.parametrize(
    ("line", "prefix", "state"),
    [
        ("+CREG: 0,1", "+CREG", "home"),
        ('+CREG: 2,5,"1A2B","01C3D4E",7', "+CREG", "roaming"),
        ("+CEREG: 0,2", "+CEREG", "searching"),
        ("+CEREG: 0,3", "+CEREG", "denied"),
        ("+CGREG: 0,4", "+CGREG", "unknown"),
        ("+CREG: 0,0", "+CREG", "not_registered"),
    ],
)
def test_registration_states(line: str, prefix: str, state: str) -> None:
    assert parse_reg([line], prefix) == state


def test_apn_of_contexts_and_active_cids() -> None:
    lines = ['+CGDCONT: 1,"IP","internet","0.0.0.0",0,0', '+CGDCONT: 2,"IPV4V6","ims","",0,0']
    assert parse_cgdcont(lines) == {1: "internet", 2: "ims"}
    assert parse_cgact(["+CGACT: 1,0", "+CGACT: 2,1"]) == [2]


def test_sim_state() -> None:
    assert parse_cpin(["+CPIN: READY"]) == "ready"
    assert parse_cpin(["+CPIN: SIM PIN"]) == "sim_pin"


# -- counters -------------------------------------------------------------------------------

BIG = 2**32 + 12345


def test_quectel_counters() -> None:
    assert parse_qgdcnt([f"+QGDCNT: {BIG},{BIG * 2}"]) == (BIG, BIG * 2)


def test_ublox_counters_are_summed_over_contexts() -> None:
    lines = ["+UGCNTRD: 1,100,200,1000,2000", f"+UGCNTRD: 2,0,0,{BIG},5"]
    assert parse_ugcntrd(lines) == (1000 + BIG, 2005)


def test_telit_counters_are_summed_over_contexts() -> None:
    assert parse_gdatavol(["#GDATAVOL: 1,3000,1000,2000", "#GDATAVOL: 2,10,4,6"]) == (1004, 2006)


def test_huawei_counters_are_hex_totals() -> None:
    line = (
        "^DSFLOWQRY:00000D0E,0000000000009B32,0000000000027524,000016C1,"
        "000000000069E6A1,0000000004BBC0D4"
    )
    assert parse_dsflowqry([line]) == (0x69E6A1, 0x4BBC0D4)
    big = "^DSFLOWQRY: 00000001,0,0,00000001,0000000180000000,00000002FFFFFFFF"
    assert parse_dsflowqry([big]) == (0x180000000, 0x2FFFFFFFF)


@pytest.mark.parametrize("bad", [["+QGDCNT: 1"], ["+QGDCNT: a,b"], ["+QGDCNT: -1,2"], []])
def test_unparseable_counters_are_parse_errors(bad: list[str]) -> None:
    with pytest.raises(AtParseError):
        parse_qgdcnt(bad)


def sysfs(root: Path, iface: str, tx: int, rx: int) -> Path:
    d = root / iface / "statistics"
    d.mkdir(parents=True, exist_ok=True)
    (d / "tx_bytes").write_text(f"{tx}\n")
    (d / "rx_bytes").write_text(f"{rx}\n")
    return root


def test_sysfs_counters_with_a_test_root(tmp_path: Path) -> None:
    root = sysfs(tmp_path, "wwan0", BIG, 7)
    c = sysfs_counters("wwan0", root)
    assert (c.tx_bytes, c.rx_bytes, c.source) == (BIG, 7, "sysfs:wwan0")
    with pytest.raises(ModemError, match="no byte counters for interface ppp0"):
        sysfs_counters("ppp0", root)


# -- detection and read_all ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "name"),
    [
        ("Quectel", "quectel"),
        ("u-blox", "ublox"),
        ("SIMCOM INCORPORATED", "simcom"),
        ("Telit", "telit"),
        ("huawei", "huawei"),
        ("Sierra Wireless", "generic"),
    ],
)
def test_vendor_detection_from_manufacturer(text: str, name: str) -> None:
    assert vendor_profile(text) == name


def test_auto_detect_falls_back_to_ati_then_generic() -> None:
    ch = AtChannel(modem({"AT+CGMI": b"\r\nERROR\r\n", "ATI": ["Telit", "LE910C1-EUX"]}))
    assert detect(ch).name == "telit"
    ch = AtChannel(modem({"AT+CGMI": ["ACME"], "ATI": ["ACME 1"]}))
    assert detect(ch).name == "generic"


def test_unknown_profile_name_is_a_modem_error() -> None:
    with pytest.raises(ModemError, match="unknown modem profile 'nokia'"):
        make_profile("nokia")


def _quectel_table() -> dict[str, list[str] | bytes]:
    return {
        "AT+CGMI": ["Quectel"],
        "AT+CGMM": ["EC25"],
        "AT+CGMR": ["EC25EFAR06A06M4G"],
        "AT+CPIN?": ["+CPIN: READY"],
        "AT+QCCID": ["+QCCID: 8944500601234567890F"],
        "AT+CIMI": ["440101234567890"],
        "AT+CGSN": ["490154203237518"],
        "AT+CNUM": b"\r\nERROR\r\n",
        "AT+COPS=3,2": [],
        "AT+COPS=3,0": [],
        "AT+COPS?": ['+COPS: 0,0,"NTT DOCOMO",7'],
        "AT+CSQ": ["+CSQ: 99,99"],
        "AT+CEREG?": ["+CEREG: 0,5"],
        "AT+CREG?": ["+CREG: 0,5"],
        "AT+CGDCONT?": ['+CGDCONT: 1,"IP","internet","0.0.0.0",0,0'],
        "AT+CGACT?": ["+CGACT: 1,1"],
        "AT+QGDCNT?": [f"+QGDCNT: {BIG},{BIG + 1}"],
    }


def test_read_all_records_failed_steps_and_keeps_the_rest(tmp_path: Path) -> None:
    ch = AtChannel(modem(_quectel_table()), timeout=0.2)
    info = read_all(ch, make_profile("quectel", sysfs_root=tmp_path))
    assert isinstance(info, ModemInfo)
    assert info.iccid == "8944500601234567890"
    assert info.registration == "roaming"
    assert (info.csq, info.signal_dbm) == (None, None)
    assert (info.tx_bytes, info.rx_bytes, info.counter_source) == (BIG, BIG + 1, "AT+QGDCNT?")
    assert dict(info.failed) == {"msisdn": "AT+CNUM: ERROR"}
    # The table ignores AT+COPS=3,2, so there is no numeric code to split.
    assert (info.operator, info.mcc, info.mnc) == ("NTT DOCOMO", "", "")


def test_read_all_skips_sim_steps_without_a_sim(tmp_path: Path) -> None:
    table = _quectel_table()
    table["AT+CPIN?"] = b"\r\n+CME ERROR: 10\r\n"
    ch = AtChannel(modem(table), timeout=0.2)
    info = read_all(ch, make_profile("quectel", sysfs_root=tmp_path))
    assert info.sim_state == "not_inserted"
    assert info.iccid == ""
    failed = dict(info.failed)
    assert failed["iccid"] == "SIM not_inserted"
    assert "AT+QCCID\r" not in [w.decode() for w in ch.port.written]  # type: ignore[attr-defined]


def test_vendor_counter_failure_falls_back_to_sysfs(tmp_path: Path) -> None:
    table = _quectel_table()
    table["AT+QGDCNT?"] = b"\r\nERROR\r\n"
    ch = AtChannel(modem(table), timeout=0.2)
    info = read_all(
        ch, make_profile("quectel", interface="wwan1", sysfs_root=sysfs(tmp_path, "wwan1", 11, 22))
    )
    assert (info.tx_bytes, info.rx_bytes, info.counter_source) == (11, 22, "sysfs:wwan1")


def test_a_silent_modem_mid_read_propagates_the_timeout() -> None:
    table = _quectel_table()
    port = modem(table)
    ch = AtChannel(port, timeout=0.05)
    port.responder = lambda _d: []
    with pytest.raises(ModemError, match="did not answer AT within"):
        read_all(ch, make_profile("quectel"))

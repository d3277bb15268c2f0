"""The AT channel's parser: echo, URCs, garbage, split reads and final codes, in memory."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import pytest
import serial
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway.errors import ModemError
from gateway.modem.at import (
    AtChannel,
    AtCommandError,
    AtTimeout,
    Kind,
    Pending,
    PortError,
    classify,
    clean,
    expected_prefix,
    parse_error,
    split_fields,
    values,
)

Responder = Callable[[bytes], list[bytes]]


class FakeSerial:
    """A serial-like object: whatever is written is answered by responder(data) chunks."""

    def __init__(self, responder: Responder | None = None, pre: list[bytes] | None = None):
        self.timeout: float | None = 0.01
        self.responder = responder or (lambda _data: [])
        self.chunks: deque[bytes] = deque(pre or [])
        self.written: list[bytes] = []
        self.closed = False
        self.broken = False

    def feed(self, *chunks: bytes) -> None:
        self.chunks.extend(c for c in chunks if c)

    def write(self, data: bytes, /) -> int:
        if self.broken:
            raise serial.SerialException("write failed: device disconnected")
        self.written.append(data)
        self.feed(*self.responder(data))
        return len(data)

    def read(self, size: int = 1) -> bytes:
        if self.broken:
            raise serial.SerialException("device reports readiness to read but returned no data")
        if not self.chunks:
            time.sleep(0.001)
            return b""
        chunk = self.chunks.popleft()
        if len(chunk) > size:
            self.chunks.appendleft(chunk[size:])
            chunk = chunk[:size]
        return chunk

    @property
    def in_waiting(self) -> int:
        return len(self.chunks[0]) if self.chunks else 0

    def close(self) -> None:
        self.closed = True


def modem(table: dict[str, list[str] | bytes], *, echo: bool = False) -> FakeSerial:
    """A fake modem answering commands from a table (lines + OK, or raw bytes)."""

    def respond(data: bytes) -> list[bytes]:
        cmd = data.decode().strip()
        out = [data] if echo else []
        answer = table.get(cmd, b"\r\nERROR\r\n")
        if isinstance(answer, bytes):
            return [*out, answer]
        return [*out, *(f"\r\n{line}\r\n".encode() for line in answer), b"\r\nOK\r\n"]

    return FakeSerial(respond)


def channel(port: FakeSerial, timeout: float = 0.2) -> AtChannel:
    return AtChannel(port, name="fake", timeout=timeout)


# -- classification -----------------------------------------------------------------------


def test_expected_prefix_comes_from_the_extended_command_name() -> None:
    assert expected_prefix("AT+CSQ") == "+CSQ"
    assert expected_prefix("AT+CREG?") == "+CREG"
    assert expected_prefix("AT+COPS=3,2") == "+COPS"
    assert expected_prefix("AT^DSFLOWQRY") == "^DSFLOWQRY"
    assert expected_prefix("AT#GDATAVOL=2") == "#GDATAVOL"
    assert expected_prefix("ATE0") is None
    assert expected_prefix("ATI") is None


def test_unsolicited_single_field_creg_is_not_the_answer_to_creg_query() -> None:
    p = Pending("AT+CREG?", "+CREG")
    assert classify("+CREG: 5", p)[0] is Kind.URC
    assert classify('+CREG: 1,"1A2B","01C3D4E",7', p)[0] is Kind.URC
    assert classify("+CREG: 0,5", p)[0] is Kind.ANSWER
    assert classify('+CREG: 2,1,"1A2B","01C3D4E",7', p)[0] is Kind.ANSWER


def test_known_urcs_never_join_a_bare_answer() -> None:
    p = Pending("AT+CIMI", None, bare=True)
    for urc in (
        "RDY",
        "RING",
        "+CFUN: 1",
        "+CPIN: READY",
        "+QIND: SMS DONE",
        "^RSSI: 23",
        '^HCSQ: "LTE",50,40,120,20',
        "+CGEV: ME PDN ACT 1",
        "+CREG: 5",
    ):
        assert classify(urc, p)[0] is Kind.URC, urc
    assert classify("440101234567890", p) == (Kind.ANSWER, "440101234567890")


def test_a_known_urc_behind_garbage_is_still_a_urc() -> None:
    p = Pending("AT+CIMI", None, bare=True)
    assert classify("~~+CGEV: ME PDN ACT 1", p) == (Kind.URC, "+CGEV: ME PDN ACT 1")


def test_echo_is_recognised_with_garbage_in_front() -> None:
    p = Pending("AT+CSQ", "+CSQ")
    assert classify("AT+CSQ", p)[0] is Kind.ECHO
    assert classify("at+csq", p)[0] is Kind.ECHO
    assert classify("}{AT+CSQ", p)[0] is Kind.ECHO


def test_final_codes() -> None:
    p = Pending("AT+CPIN?", "+CPIN")
    assert classify("OK", p)[0] is Kind.FINAL_OK
    for line in (
        "ERROR",
        "+CME ERROR: 10",
        "+CME ERROR: SIM busy",
        "+CMS ERROR: 500",
        "NO CARRIER",
    ):
        assert classify(line, p)[0] is Kind.FINAL_ERROR, line
    # Numeric result codes are only accepted while switching to verbose ones.
    assert classify("0", Pending("ATV1", numeric=True))[0] is Kind.FINAL_OK
    assert classify("0", Pending("AT+CIMI", bare=True))[0] is Kind.ANSWER


def test_cme_errors_numeric_and_verbose() -> None:
    assert parse_error("+CME ERROR: 10") == (10, "10")
    assert parse_error("+CME ERROR: SIM not inserted") == (10, "SIM not inserted")
    assert parse_error("+CME ERROR: SIM busy") == (14, "SIM busy")
    assert parse_error("+CME ERROR: something odd") == (None, "something odd")
    assert parse_error("+CMS ERROR: 500") == (500, "500")
    assert parse_error("ERROR") == (None, "ERROR")


def test_clean_drops_nul_and_binary_bytes() -> None:
    assert clean(b"\x00\x00\xff+CSQ: \x1b20,99 ") == "+CSQ: 20,99"


def test_fields_split_outside_quotes_only() -> None:
    assert split_fields('0,0,"AT&T, Inc",7') == ["0", "0", '"AT&T, Inc"', "7"]
    assert values(["+CSQ: 20,99", "+CREG: 1"], "+CSQ") == ["20,99"]


# -- the channel ----------------------------------------------------------------------------


def test_echo_on_until_ate0_and_urcs_before_inside_and_after() -> None:
    port = modem(
        {
            "AT": [],
            "ATE0": [],
            "ATV1": [],
            "AT+CMEE=1": [],
            "AT+CSQ": b"\r\nRDY\r\n\r\n+CSQ: 20,99\r\n\r\n+CPIN: READY\r\n\r\nOK\r\n\r\nRING\r\n",
        },
        echo=True,
    )
    port.feed(b"\x00\x00\r\n+CFUN: 1\r\n")
    ch = channel(port)
    ch.init()
    assert ch.command("AT+CSQ") == ["+CSQ: 20,99"]
    assert list(ch.urcs) == ["+CFUN: 1", "RDY", "+CPIN: READY"]
    assert ch.poll_urcs() == ["RING"]
    assert [w.decode() for w in port.written] == [
        "AT\r",
        "ATE0\r",
        "ATV1\r",
        "AT+CMEE=1\r",
        "AT+CSQ\r",
    ]


def test_answer_split_across_reads() -> None:
    def respond(_data: bytes) -> list[bytes]:
        return [b"\r\n+CO", b'PS: 0,0,"NTT D', b'OCOMO",7\r', b"\n\r\nO", b"K\r\n"]

    assert channel(FakeSerial(respond)).command("AT+COPS?") == ['+COPS: 0,0,"NTT DOCOMO",7']


def test_bare_answer_keeps_value_lines_and_routes_urcs() -> None:
    port = modem({"AT+CIMI": ["+CGEV: ME PDN ACT 1", "440101234567890", "^RSSI: 23"]})
    ch = channel(port)
    assert ch.command("AT+CIMI", bare=True) == ["440101234567890"]
    assert list(ch.urcs) == ["+CGEV: ME PDN ACT 1", "^RSSI: 23"]


def test_unknown_unsolicited_line_does_not_join_a_prefixed_answer() -> None:
    port = modem({"AT+CSQ": ["+XYZZY: 1", "+CSQ: 9,99"]})
    ch = channel(port)
    assert ch.command("AT+CSQ") == ["+CSQ: 9,99"]
    assert list(ch.urcs) == ["+XYZZY: 1"]


@pytest.mark.parametrize(
    ("final", "code", "text"),
    [
        ("+CME ERROR: 10", 10, "10"),
        ("+CME ERROR: SIM not inserted", 10, "SIM not inserted"),
        ("+CME ERROR: 14", 14, "14"),
        ("+CMS ERROR: 304", 304, "304"),
        ("ERROR", None, "ERROR"),
        ("NO CARRIER", None, "NO CARRIER"),
    ],
)
def test_error_finals_raise_command_error(final: str, code: int | None, text: str) -> None:
    ch = channel(modem({"AT+CPIN?": f"\r\n{final}\r\n".encode()}))
    with pytest.raises(AtCommandError) as info:
        ch.command("AT+CPIN?")
    assert info.value.code == code
    assert info.value.text == text
    assert info.value.command == "AT+CPIN?"


def test_silent_modem_times_out_with_the_command_named() -> None:
    ch = channel(FakeSerial(), timeout=0.05)
    with pytest.raises(AtTimeout, match=r"AT\+CSQ within 0.05 s"):
        ch.command("AT+CSQ")


def test_unplugged_port_is_a_port_error() -> None:
    port = modem({"AT": []})
    ch = channel(port)
    port.broken = True
    with pytest.raises(PortError, match="cannot write"):
        ch.command("AT")


def test_closed_channel_refuses_commands() -> None:
    port = modem({"AT": []})
    ch = channel(port)
    ch.close()
    assert port.closed
    with pytest.raises(PortError, match="closed"):
        ch.command("AT")


def test_open_of_a_missing_port_is_a_port_error(tmp_path: object) -> None:
    with pytest.raises(PortError, match="cannot open modem port"):
        AtChannel.open("/nonexistent/ttyUSB9")
    with pytest.raises(PortError, match="cannot open modem port"):
        AtChannel.open("nosuchscheme://x")


def test_stale_answer_of_a_timed_out_command_is_dropped() -> None:
    port = modem({"AT+CSQ": ["+CSQ: 5,99"]})
    port.feed(b"\r\n+CPIN: READY\r\n\r\nOK\r\n")  # the late tail of an earlier command
    ch = channel(port)
    assert ch.command("AT+CSQ") == ["+CSQ: 5,99"]


def test_garbage_flood_without_line_ends_is_bounded() -> None:
    def respond(_data: bytes) -> list[bytes]:
        return [b"x" * 10000, b"\r\n+CSQ: 1,99\r\n\r\nOK\r\n"]

    assert channel(FakeSerial(respond)).command("AT+CSQ") == ["+CSQ: 1,99"]


# -- properties -------------------------------------------------------------------------------

COMMANDS: list[tuple[str, bool, list[str]]] = [
    ("AT+CSQ", False, ["+CSQ: 20,99"]),
    ("AT+CREG?", False, ['+CREG: 2,1,"1A2B","01C3D4E",7']),
    ("AT+CEREG?", False, ["+CEREG: 0,5"]),
    ("AT+CPIN?", False, ["+CPIN: READY"]),
    (
        "AT+CGDCONT?",
        False,
        ['+CGDCONT: 1,"IP","internet","0.0.0.0",0,0', '+CGDCONT: 2,"IPV4V6","ims","0.0.0.0",0,0'],
    ),
    ("AT+CNUM", False, []),
    ("AT+QGDCNT?", False, ["+QGDCNT: 5000000000,6000000000"]),
    (
        "AT^DSFLOWQRY",
        False,
        [
            "^DSFLOWQRY:00000D0E,0000000000009B32,0000000000027524,"
            "000016C1,000000000069E6A1,0000000004BBC0D4"
        ],
    ),
    ("AT+CIMI", True, ["440101234567890"]),
    ("AT+CGSN", True, ["490154203237518"]),
    ("ATI", True, ["Quectel", "EC25", "Revision: EC25EFAR06A06M4G"]),
]
URCS = [
    "RDY",
    "+CFUN: 1",
    "+CPIN: READY",
    '+QIND: "csq",20,99',
    "+QIND: SMS DONE",
    "+CREG: 5",
    "+CEREG: 1",
    "^RSSI: 23",
    '^HCSQ: "LTE",50,40,120,20',
    "^DSFLOWRPT: 0000003C,00000000,00000000,0000000000001F40,0000000000002EE0,0003E800,0003E800",
    "+CGEV: ME PDN ACT 1",
    "RING",
    '+UUPSDA: 0,"10.64.0.2"',
    "#QSS: 1",
]
FINALS = ["OK", "ERROR", "+CME ERROR: 10", "+CME ERROR: SIM busy", "+CMS ERROR: 500", "NO CARRIER"]
GARBAGE = bytes([*range(0x00, 0x0A), 0x0B, 0x0C, *range(0x0E, 0x20), *range(0x7F, 0x100)])


def _head(line: str) -> str:
    return line.split(":")[0]


@st.composite
def exchanges(draw: st.DrawFn) -> tuple[str, bool, list[str], str, list[str], list[bytes]]:
    cmd, bare, answer = draw(st.sampled_from(COMMANDS))
    final = draw(st.sampled_from(FINALS))
    echo = draw(st.booleans())
    answer = answer if final == "OK" else []
    # A URC whose prefix is the command's own is answer-shaped by definition (but +CREG: 5
    # is the single-field unsolicited form, which the channel must tell apart).
    own = expected_prefix(cmd)
    pool = [u for u in URCS if _head(u) != own or u in ("+CREG: 5", "+CEREG: 1")]
    lines = [*answer, final]
    urc_slots: list[list[str]] = [[] for _ in range(len(lines) + 2)]
    for urc in draw(st.lists(st.sampled_from(pool), max_size=6)):
        urc_slots[draw(st.integers(0, len(urc_slots) - 1))].append(urc)
    stream = b"".join(f"\r\n{u}\r\n".encode() for u in urc_slots[0])
    if echo:
        stream += cmd.encode() + b"\r"
    for i, line in enumerate(lines):
        stream += b"".join(f"\r\n{u}\r\n".encode() for u in urc_slots[i + 1])
        stream += f"\r\n{line}\r\n".encode()
    stream += b"".join(f"\r\n{u}\r\n".encode() for u in urc_slots[-1])
    # Garbage bytes anywhere, even inside lines.
    data = bytearray(stream)
    for _ in range(draw(st.integers(0, 8))):
        pos = draw(st.integers(0, len(data)))
        data[pos:pos] = draw(
            st.binary(min_size=1, max_size=4).map(
                lambda b: bytes(GARBAGE[x % len(GARBAGE)] for x in b)
            )
        )
    cuts = sorted(draw(st.lists(st.integers(0, len(data)), max_size=10)))
    chunks = [bytes(data[a:b]) for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]
    urcs = [u for slot in urc_slots for u in slot]
    return cmd, bare, answer, final, urcs, chunks


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exchanges())
def test_urcs_and_garbage_never_mix_into_answers(
    ex: tuple[str, bool, list[str], str, list[str], list[bytes]],
) -> None:
    cmd, bare, answer, final, urcs, chunks = ex
    ch = channel(FakeSerial(lambda _d: chunks), timeout=0.5)
    if final == "OK":
        assert ch.command(cmd, bare=bare) == answer
    else:
        with pytest.raises(AtCommandError) as info:
            ch.command(cmd, bare=bare)
        assert info.value.final == final
    ch.poll_urcs()
    assert list(ch.urcs) == urcs


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.sampled_from([c for c, _b, _a in COMMANDS]),
    st.booleans(),
    st.lists(st.binary(max_size=64), max_size=8),
)
def test_random_bytes_only_ever_raise_modem_errors(
    cmd: str, bare: bool, chunks: list[bytes]
) -> None:
    ch = channel(FakeSerial(lambda _d: chunks), timeout=0.01)
    try:
        lines = ch.command(cmd, bare=bare)
    except ModemError:
        pass
    else:
        assert all(isinstance(x, str) and x and x.isprintable() for x in lines)
        if not bare:
            assert all(_head(x).strip().upper() == expected_prefix(cmd) for x in lines)
    ch.poll_urcs()
    assert all(isinstance(u, str) for u in ch.urcs)

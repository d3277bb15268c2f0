"""``python -m firmware_sim modem …``: the modem emulator as a process of its own (the
options are in firmware_sim.modem's docstring)."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from firmware_sim.control import ControlServer
from firmware_sim.modem import FAULTS, REG_STATES, VENDORS, Identity, ModemEmulator


def _hostport(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"expected HOST:PORT, got {text!r}")
    return host or "127.0.0.1", int(port)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m firmware_sim modem", description="AT-command cellular modem emulator"
    )
    p.add_argument("--vendor", choices=VENDORS, default="quectel")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pty", action="store_true", help="serve on a new pty, print its path")
    where.add_argument(
        "--tcp", type=_hostport, metavar="HOST:PORT", help="serve on TCP, print the socket:// URL"
    )
    p.add_argument("--link", type=Path, help="keep a symlink here pointing at the pty")
    p.add_argument(
        "--control",
        type=_hostport,
        metavar="HOST:PORT",
        help="listen for runtime control commands here",
    )
    d = Identity()
    p.add_argument("--iccid", default=d.iccid)
    p.add_argument("--imsi", default=d.imsi)
    p.add_argument("--imei", default=d.imei)
    p.add_argument("--msisdn", default=d.msisdn, help="empty: AT+CNUM answers no number")
    p.add_argument("--operator", default=d.operator)
    p.add_argument("--plmn", default=d.plmn, help="MCC+MNC, e.g. 44010 or 310410")
    p.add_argument("--apn", default=d.apn)
    p.add_argument("--csq", type=int, default=d.csq)
    p.add_argument("--registration", choices=list(REG_STATES), default=d.registration)
    p.add_argument("--tx-rate", type=float, default=200.0, help="bytes/s sent while registered")
    p.add_argument("--rx-rate", type=float, default=800.0, help="bytes/s received")
    p.add_argument("--counter-start", type=int, default=0)
    p.add_argument("--no-urcs", action="store_true", help="no random URCs")
    p.add_argument("--urc-interval", type=float, default=1.0, help="mean seconds between URCs")
    p.add_argument("--seed", type=int, default=None, help="seed for URCs and garbage")
    p.add_argument("--slow-s", type=float, default=2.0, help="answer delay of the slow fault")
    p.add_argument("--fault", action="append", default=[], choices=FAULTS)
    p.add_argument(
        "--radio",
        action="append",
        default=[],
        metavar="SETTING",
        help='a radio setting as on the control port, e.g. "rat lte-m" or "rsrp -95"',
    )
    p.add_argument(
        "--reboot-s", type=float, default=0.5, help="how long a reset or power cycle is down"
    )
    return p


def main(argv: list[str]) -> int:
    """Run the emulator until SIGTERM/SIGINT; the first stdout line is the port to open."""
    args = _parser().parse_args(argv)
    ident = Identity(
        iccid=args.iccid,
        imsi=args.imsi,
        imei=args.imei,
        msisdn=args.msisdn,
        operator=args.operator,
        plmn=args.plmn,
        apn=args.apn,
        csq=args.csq,
        registration=args.registration,
    )
    emu = ModemEmulator(
        args.vendor,
        identity=ident,
        urcs=not args.no_urcs,
        seed=args.seed,
        urc_interval=args.urc_interval,
        tx_rate=args.tx_rate,
        rx_rate=args.rx_rate,
        counter_start=args.counter_start,
        slow_s=args.slow_s,
        link=args.link,
        faults=tuple(args.fault),
        reboot_s=args.reboot_s,
    )
    for setting in args.radio:
        reply = emu.control(f"radio {setting}")
        if reply != "ok":
            print(f"modem emulator: --radio {setting!r}: {reply}", file=sys.stderr)
            return 2
    stop = threading.Event()

    def on_signal(_sig: int, _frame: object) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    control: ControlServer | None = None
    try:
        url = emu.start_tcp(*args.tcp) if args.tcp else emu.start_pty()
        if args.control:
            control = ControlServer(args.control, emu)
            threading.Thread(target=control.serve_forever, args=(0.2,), daemon=True).start()
            host, port = control.socket.getsockname()[:2]
            print(f"control: {host}:{port}", file=sys.stderr, flush=True)
        print(url, flush=True)
        while not stop.wait(0.5):
            pass
    except OSError as exc:
        print(f"modem emulator: {exc}", file=sys.stderr)
        return 2
    finally:
        if control is not None:
            control.shutdown()
            control.server_close()
        emu.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

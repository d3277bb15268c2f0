"""python -m firmware_sim {fleet,sink,modem,modem-control,broker} …"""

from __future__ import annotations

import importlib
import sys

COMMANDS = {
    "fleet": "firmware_sim.devices",
    "sink": "firmware_sim.sink",
    "modem": "firmware_sim.modem",
    "modem-control": "firmware_sim.control",
    "broker": "firmware_sim.broker",
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in COMMANDS:
        print(
            "usage: python -m firmware_sim {" + ",".join(COMMANDS) + "} [options]", file=sys.stderr
        )
        return 2
    module = importlib.import_module(COMMANDS[argv[0]])
    return int(module.main(argv[1:]))


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

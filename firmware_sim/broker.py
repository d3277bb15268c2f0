"""An embedded MQTT 3.1.1 broker (amqtt) for the demo on machines without mosquitto.

    python -m firmware_sim broker --port 1883

Loopback only, anonymous, in memory: good enough to show the gateway working without
root. It is not what the guarantees are measured against: production and the test
suite use Mosquitto with `config/mosquitto.conf` (persistence, queue limits).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from typing import Any


def broker_config(port: int) -> dict[str, Any]:
    return {
        "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{port}"}},
        "plugins": {
            "amqtt.plugins.authentication.AnonymousAuthPlugin": {"allow_anonymous": True},
        },
    }


async def serve(port: int) -> None:
    """Run the broker until SIGTERM/SIGINT."""
    from amqtt.broker import Broker

    broker = Broker(broker_config(port))
    await broker.start()
    print(f"amqtt broker on 127.0.0.1:{port}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await broker.shutdown()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m firmware_sim broker", description=__doc__)
    p.add_argument("--port", type=int, default=1883)
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        import amqtt  # noqa: F401
    except ImportError:
        print("the embedded broker needs amqtt: pip install 'amqtt>=0.11,<1'", file=sys.stderr)
        return 2
    asyncio.run(serve(args.port))
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))

"""How far ahead of its PUBACKs the broker sends: what the redelivery window rests on.

    .venv/bin/python bench/sendahead.py [--receive-max 10,100,1000] [--packets 3000]
                                        [--ack-ms 20]

A broker may hold at most the client's Receive Maximum of QoS 1 packets unacknowledged
(MQTT 5, 3.3.4). The gateway keeps each session's latest packet rows for recognising
redeliveries (the store's redelivery window, see PIN_WAIT_S in gateway/store/redelivery.py), and
how many it needs depends on whether the broker keeps to that. For each broker
configuration (mosquitto started here on a free loopback port: `max_inflight_messages
0`, as the tests and benchmarks run it, and mosquitto's default) and each Receive
Maximum, a manual-ack MQTT 5 subscriber (paho) connects with that Receive Maximum, and
a publisher sends --packets QoS 1 packets, 100 at a time every 10 ms:
  first      packets that came before the subscriber acknowledged any (for 1 s)
  ahead      the most packets it had received beyond the PUBACKs it had sent, while it
             acknowledged what it had every --ack-ms (a group commit's way); counted
             against PUBACKs handed to paho, so at least what the broker had received
Baseline: the Receive Maximum itself, what the broker may send ahead. One JSON line at
the end. Only loopback; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
from drain import start_broker
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

BROKERS: dict[str, int | None] = {"max_inflight_messages 0": 0, "mosquitto's default": None}


def measure(port: int, receive_max: int, packets: int, ack_s: float) -> dict[str, int]:
    lock = threading.Lock()
    got: list[int] = []
    state = {"acked": 0, "ahead": 0}

    def on_message(_c: mqtt.Client, _u: object, m: mqtt.MQTTMessage) -> None:
        with lock:
            got.append(m.mid)
            state["ahead"] = max(state["ahead"], len(got) - state["acked"])

    sub = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=f"ahead-{receive_max}",
        protocol=mqtt.MQTTv5,
        manual_ack=True,
    )
    sub.on_message = on_message
    props = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
    props.ReceiveMaximum = receive_max
    sub.connect("127.0.0.1", port, clean_start=True, properties=props)
    sub.loop_start()
    pub = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    pub.connect("127.0.0.1", port)
    pub.loop_start()
    try:
        subscribed = threading.Event()
        sub.on_subscribe = lambda *_a: subscribed.set()
        sub.subscribe("ahead/t", qos=1)
        if not subscribed.wait(5):
            raise SystemExit("no SUBACK from mosquitto")

        def publish() -> None:
            for i in range(packets):
                pub.publish("ahead/t", b"x" * 71, qos=1)
                if i % 100 == 99:
                    time.sleep(0.01)

        sender = threading.Thread(target=publish, daemon=True)
        sender.start()
        time.sleep(1.0)  # nothing acknowledged yet
        with lock:
            first = len(got)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with lock:
                todo = got[state["acked"] :]
                state["acked"] += len(todo)  # counted before they go: an upper bound
            for mid in todo:
                sub.ack(mid, 1)
            if state["acked"] >= packets:
                break
            time.sleep(ack_s)
        sender.join(5)
        return {"first": first, "ahead": state["ahead"], "received": len(got)}
    finally:
        for c in (sub, pub):
            c.disconnect()
            c.loop_stop()


def main() -> int:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--receive-max", default="10,100,1000")
    ap.add_argument("--packets", type=int, default=3000)
    ap.add_argument("--ack-ms", type=float, default=20.0)
    args = ap.parse_args()
    if shutil.which("mosquitto") is None:
        raise SystemExit("needs Debian's mosquitto")
    version = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout
    print(version.splitlines()[0] if version else "mosquitto")
    print(f"{'broker':<26}{'receive max':>12}{'first':>8}{'ahead':>8}{'received':>10}")
    rows = []
    for name, max_inflight in BROKERS.items():
        with tempfile.TemporaryDirectory() as tmp:
            proc, port = start_broker(Path(tmp), max_inflight)
            try:
                for rm in (int(x) for x in args.receive_max.split(",")):
                    r = measure(port, rm, args.packets, args.ack_ms / 1000)
                    rows.append({"broker": name, "receive_max": rm, **r})
                    print(f"{name:<26}{rm:>12}{r['first']:>8}{r['ahead']:>8}{r['received']:>10}")
            finally:
                proc.terminate()
                proc.wait(10)
    print(json.dumps({"bench": "sendahead", "rows": rows}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

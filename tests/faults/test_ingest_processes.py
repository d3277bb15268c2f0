"""`mqtt.ingest_processes = 2`: two MQTT sessions in processes of their own, one store.

Each packet goes to one of the two sessions (a shared subscription) and is committed by
the gateway process's one store writer before its process sends the PUBACK. What a user
sees: every packet delivered, once, whichever process took it; an ingest process that
dies is started again and nothing is lost or stored twice; no ingest process outlives
the gateway, whether it stops cleanly or is killed.
"""

from __future__ import annotations

import json
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil

from gateway.store.tables import PACKET_TABLES
from tests.conftest import Broker, GatewayProc, db_rows, free_port, wait_for
from tests.faults.support import Publisher, Tally, delivered_all, restart, seeded, status
from tests.receiver import Receiver

BATCH = "{ window_ms = 50, max_items = 100 }"
N = 2_000  # packets per phase


def ingest_pids(gw: GatewayProc) -> list[int]:
    assert gw.proc is not None
    return [c.pid for c in psutil.Process(gw.proc.pid).children()]


def gone(pids: list[int]) -> Callable[[], bool]:
    def alive(pid: int) -> bool:
        try:
            return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    return lambda: not any(alive(p) for p in pids)


def test_two_ingest_processes_share_the_stream_and_survive_kills(
    mosquitto: Broker,
    tmp_path: Path,
    receiver: Receiver,
    launch: Callable[..., GatewayProc],
    record_property: Callable[[str, object], None],
) -> None:
    _seed, rng = seeded(record_property)
    gw = launch(receiver.url, batch=BATCH, shared_group="gw", ingest_processes=2)
    first = ingest_pids(gw)
    assert len(first) == 2
    db = tmp_path / "state-gw" / "gateway.db"

    # 1. One ingest process is killed mid-stream: the gateway starts it again, and what
    #    it had taken but not acknowledged comes back from the broker, recognised.
    pub = Publisher(mosquitto.port, N, 1_000).start()
    wait_for(lambda: Tally.of(receiver).distinct >= N // 4, what="a quarter delivered")
    victim = rng.choice(first)
    psutil.Process(victim).kill()
    wait_for(lambda: "ingest process exited" in gw.log(), what="the gateway saw it die")
    wait_for(lambda: len(ingest_pids(gw)) == 2, what="a new ingest process")
    pub.join(60)
    wait_for(delivered_all(N, receiver), what="phase 1 delivered", timeout=60)
    t = Tally.of(receiver)
    assert t.missing(N) == []
    assert t.duplicates == 0, "a packet was stored twice"
    packets = status(gw)["packets"]
    assert packets["received"] == N, packets
    record_property("redelivered_after_process_kill", packets["redelivered"])
    # Both sessions took packets: the store keeps each session's packet ids apart.
    # (The tables keep each session's last receive_maximum rows, delivered or not.)
    rows = " UNION ALL ".join(f"SELECT mid FROM {t}" for t in PACKET_TABLES)
    sessions = dict(db_rows(db, f"SELECT mid >> 16, COUNT(*) FROM ({rows}) GROUP BY 1"))
    assert set(sessions) == {0, 1}, sessions

    # 2. The gateway itself is killed: its ingest processes do not outlive it, and
    #    after a restart every packet arrives.
    pub = Publisher(mosquitto.port, N, 1_000, first=N).start()
    wait_for(lambda: Tally.of(receiver).distinct >= N + N // 4, what="phase 2 under way")
    pids = ingest_pids(gw)
    gw.kill9()
    wait_for(gone(pids), what="ingest processes gone after kill -9 of the gateway")
    restart(gw)
    pub.join(60)
    wait_for(delivered_all(2 * N, receiver), what="phase 2 delivered", timeout=60)
    # Sent again only as whole batches that were in flight, under their webhook-id.
    assert Tally.of(receiver).seqs_with_several_ids() == {}

    # 3. A clean stop: exit 0, and no ingest process left.
    pids = ingest_pids(gw)
    assert gw.terminate(timeout=30) == 0
    wait_for(gone(pids), what="ingest processes gone after a clean stop")
    assert "did not stop" not in gw.log()


def test_lowering_ingest_processes_retires_the_extra_session_with_its_queue(
    mosquitto: Broker, receiver: Receiver, launch: Callable[..., GatewayProc]
) -> None:
    gw = launch(receiver.url, batch=BATCH, shared_group="gw", ingest_processes=2)
    assert gw.terminate(timeout=30) == 0
    # Queued while the gateway is stopped: about half for each session.
    Publisher(mosquitto.port, N, 1_000).start().join(30)
    gw.config.write_text(
        gw.config.read_text().replace("ingest_processes = 2", "ingest_processes = 1")
    )
    restart(gw)
    wait_for(delivered_all(N, receiver), what="both sessions' queues delivered", timeout=60)
    assert "gw-1: took" in gw.log()
    # gw-1 is gone from the group: every later packet goes to the session left. While
    # gw-1 lived, the broker would keep every other one for it.
    Publisher(mosquitto.port, N, 1_000, first=N).start().join(30)
    wait_for(delivered_all(2 * N, receiver), what="later packets delivered", timeout=30)
    t = Tally.of(receiver)
    assert t.duplicates == 0
    assert gw.terminate(timeout=30) == 0


def test_a_new_shared_group_leaves_the_old_one_instead_of_taking_each_packet_twice(
    mosquitto: Broker, receiver: Receiver, launch: Callable[..., GatewayProc]
) -> None:
    gw = launch(receiver.url, batch=BATCH, shared_group="gw", ingest_processes=2)
    assert gw.terminate(timeout=30) == 0
    gw.config.write_text(
        gw.config.read_text().replace('shared_group = "gw"', 'shared_group = "gw2"')
    )
    restart(gw)
    wait_for(
        lambda: gw.log().count("unsubscribed from $share/gw/devices/+/up") == 2,
        what="both sessions out of the old group",
    )
    # Had either session stayed in group "gw", the broker would hand each packet to a
    # member of "gw" and to one of "gw2": both are this gateway's sessions.
    n = 200
    Publisher(mosquitto.port, n, 1_000).start().join(30)
    wait_for(delivered_all(n, receiver), what="every packet delivered", timeout=30)
    wait_for(lambda: status(gw)["packets"]["received"] >= n, what="status caught up")
    assert Tally.of(receiver).duplicates == 0
    assert status(gw)["packets"]["received"] == n
    assert gw.terminate(timeout=30) == 0


def test_a_hung_ingest_process_is_killed_and_replaced_and_its_share_delivered(
    mosquitto: Broker, receiver: Receiver, launch: Callable[..., GatewayProc]
) -> None:
    gw = launch(receiver.url, batch=BATCH, shared_group="gw", ingest_processes=2)
    wait_for(lambda: gw.log().count("subscribed to") == 2, what="both sessions subscribed")
    first = ingest_pids(gw)
    psutil.Process(first[0]).suspend()  # SIGSTOP: alive, connected, silent
    # Half the packets go to the stopped process's session: they can only arrive once
    # the gateway notices, kills it and starts another on the same session.
    n = 200
    Publisher(mosquitto.port, n, 1_000).start().join(30)
    wait_for(lambda: "sent nothing for" in gw.log(), what="the hung process noticed", timeout=30)
    wait_for(gone(first[:1]), what="the hung process killed")
    wait_for(delivered_all(n, receiver), what="every packet delivered", timeout=30)
    assert Tally.of(receiver).duplicates == 0
    assert first[1] in ingest_pids(gw), "the healthy process was left alone"
    assert gw.terminate(timeout=30) == 0


def test_the_status_api_shows_each_ingest_session_and_which_one_is_down(
    mosquitto: Broker, receiver: Receiver, launch: Callable[..., GatewayProc]
) -> None:
    port = free_port()
    gw = launch(
        receiver.url,
        batch=BATCH,
        shared_group="gw",
        ingest_processes=2,
        web=f'listen = "127.0.0.1:{port}"',
    )

    def sessions() -> dict[str, dict[str, Any]]:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/status", timeout=5) as r:
                return {s["client_id"]: s for s in json.load(r)["gateway"]["mqtt"]["sessions"]}
        except OSError:
            return {}

    wait_for(lambda: len(s := sessions()) == 2 and all(x["connected"] for x in s.values()))
    before = sessions()
    assert sorted(before) == ["gw", "gw-1"]
    assert sorted(x["pid"] for x in before.values()) == sorted(ingest_pids(gw))
    psutil.Process(before["gw-1"]["pid"]).kill()
    # Until it is started again (after 1 s), the API says which session is down and why.
    wait_for(
        lambda: "exited with code" in sessions()["gw-1"]["last_error"],
        what="the dead session named",
    )
    down = sessions()
    assert not down["gw-1"]["connected"]
    assert down["gw-1"]["pid"] == 0
    assert down["gw"]["connected"]
    assert down["gw"]["last_error"] == ""
    wait_for(
        lambda: (s := sessions()["gw-1"])["connected"] and s["pid"] != before["gw-1"]["pid"],
        what="the session back, in a new process",
    )
    assert sessions()["gw"]["pid"] == before["gw"]["pid"]
    assert gw.terminate(timeout=30) == 0

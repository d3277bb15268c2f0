"""The local API's CDR look-up: one CDR by UniqueID, CDRs by time and ICCID, each with
its delivery state per CDR webhook, read from a running gateway's store."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from tests.conftest import Broker
from tests.receiver import Receiver, Recorded, Reply
from tests.test_cdr import NEW, OLD, preload_cdrs
from tests.test_web import TOKEN, bearer, hook, start, web_config


async def poll(
    check: Callable[[], Awaitable[bool]], what: str, show: Callable[[], Awaitable[Any]]
) -> None:
    """Await check() until true, for at most 20 s; fail showing what show() returns."""
    deadline = time.monotonic() + 20
    while not await check():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}: {await show()}")
        await asyncio.sleep(0.1)


def states(item: dict[str, Any]) -> dict[str, str]:
    return {d["webhook"]: d["state"] for d in item["delivery"]}


async def test_a_cdr_shows_delivered_dead_lettered_pending_and_filtered_per_webhook(
    mosquitto: Broker, tmp_path: Path, run_gateway, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    db = tmp_path / "state" / "gateway.db"
    small, big, other = preload_cdrs(
        db, [(OLD, 100, "440"), (OLD, 2_000_000, "440"), (NEW, 30, "222")]
    )
    refusing = True

    def behaviour(n: int, req: Recorded) -> Reply:
        if req.path == "/refuse" and refusing:
            return Reply(400, text="unknown account")
        if req.path == "/slow":
            return Reply(503, text="maintenance")
        return Reply()

    receiver.behaviour = behaviour
    url = receiver.url.removesuffix("/hook")
    hooks = (
        hook("all", url + "/ok", source='"cdrs"', format='"monogoto"', batch="{ window_ms = 0 }")
        + hook("refuse", url + "/refuse", source='"cdrs"', format='"flat"')
        + hook(
            "slow",
            url + "/slow",
            source='"cdrs"',
            format='"flat"',
            retry="{ backoff_min_s = 60, backoff_max_s = 60 }",
        )
        + hook(
            "big",
            url + "/big",
            source='"cdrs"',
            format='"flat"',
            when='[{ field = "Usage", op = ">", value = 1000 }]',
        )
        + hook("packets", url + "/packets")
    )
    cfg = web_config(tmp_path, mosquitto, hooks, token=TOKEN)
    base = await start(run_gateway, http, cfg, TOKEN)

    async def get(path: str, **params: str) -> tuple[int, Any]:
        async with http.get(base + path, params=params, headers=bearer()) as r:
            return r.status, await r.json()

    async def settled() -> bool:
        _, page = await get("/api/cdrs")
        return all(
            states(c)
            == {"all": "delivered", "refuse": "dead_lettered", "slow": "pending", "big": s}
            and next(d for d in c["delivery"] if d["webhook"] == "slow")["attempts"] >= 1
            for c, s in zip(page["cdrs"], ("filtered", "delivered", "filtered"), strict=True)
        )

    await poll(settled, "every webhook to settle", lambda: get("/api/cdrs"))

    code, one = await get(f"/api/cdrs/{big['UniqueID']}")
    assert code == 200
    assert one["cdr"] == big
    assert (one["unique_id"], one["iccid"], one["usage"]) == (big["UniqueID"], OLD, 2_000_000)
    assert one["ts_ms"] == big["Timestamp"]
    by_hook = {d["webhook"]: d for d in one["delivery"]}
    assert list(by_hook) == ["all", "refuse", "slow", "big"]  # CDR webhooks only
    assert by_hook["refuse"]["reason"] == "http_400"
    assert by_hook["slow"]["webhook_id"].startswith("msg_")

    # The dead letter replayed and accepted: delivered.
    refusing = False
    dl = by_hook["refuse"]["dead_letter_id"]
    async with http.post(
        base + "/api/dead-letters", json={"webhook": "refuse", "ids": [dl]}, headers=bearer()
    ) as r:
        assert await r.json() == {"replayed": 1}

    async def replayed() -> bool:
        _, now = await get(f"/api/cdrs/{big['UniqueID']}")
        return states(now)["refuse"] == "delivered"

    await poll(
        replayed, "the replayed CDR to be delivered", lambda: get(f"/api/cdrs/{big['UniqueID']}")
    )
    _, still = await get(f"/api/cdrs/{small['UniqueID']}")
    assert states(still)["refuse"] == "dead_lettered"

    # Paging, ICCID and time.
    code, page = await get("/api/cdrs", limit="2")
    assert code == 200
    assert [c["unique_id"] for c in page["cdrs"]] == [small["UniqueID"], big["UniqueID"]]
    _, rest = await get("/api/cdrs", limit="2", after=str(page["next_after"]))
    assert [c["unique_id"] for c in rest["cdrs"]] == [other["UniqueID"]]
    assert rest["next_after"] is None
    _, sim = await get("/api/cdrs", iccid=NEW)
    assert [c["unique_id"] for c in sim["cdrs"]] == [other["UniqueID"]]
    _, later = await get("/api/cdrs", since=str(other["Timestamp"]))
    assert [c["unique_id"] for c in later["cdrs"]] == [other["UniqueID"]]
    _, iso = await get("/api/cdrs", since="2000-01-01T00:00:00Z")
    assert len(iso["cdrs"]) == 3

    # Unknown ids and bad queries: JSON errors.
    code, err = await get("/api/cdrs/CDR-00000000000000000000")
    assert code == 404
    assert err == {"error": "no CDR with UniqueID 'CDR-00000000000000000000'"}
    for params, message in (
        ({"limit": "0"}, "limit: must be an integer 1-1000"),
        ({"limit": "1001"}, "limit: must be an integer 1-1000"),
        ({"after": "-1"}, "after: must be an integer"),
        ({"since": "yesterday"}, "since: must be epoch milliseconds or an ISO 8601"),
        ({"iccid": "8944' OR 1=1"}, "iccid: must be up to 22 digits"),
        ({"sim": "1"}, "sim: unknown parameter"),
    ):
        code, err = await get("/api/cdrs", **params)
        assert code == 400, params
        assert err["error"].startswith(message), err
    # The same guard as every /api path.
    async with http.get(base + f"/api/cdrs/{big['UniqueID']}") as r:
        assert r.status == 401

"""The web interface against a real gateway: token, API, metrics, health, downloads, OpenAPI.

Each gateway runs on the test's event loop (or as a subprocess where an exit code is the
point), with a real mosquitto and real aiohttp receivers; requests go over real sockets.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import sqlite3
import subprocess
import threading
import time
import zipfile
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families
from yarl import URL

from gateway import config, ingest
from gateway import store as store_mod
from gateway.usage import reports
from gateway.web import app as web
from gateway.web import openapi, throughput
from tests.conftest import (
    ROOT,
    Broker,
    free_port,
    gateway_cmd,
    publish,
    until,
    write_config,
)
from tests.receiver import Receiver, Reply

TOKEN = "s3cret-dashboard-token"
ICCID = "8981100000000000012"
TOPIC = f"devices/{ICCID}/up"


def web_config(
    tmp_path: Path, broker: Broker, hooks: str = "", token: str = "", listen: str = ""
) -> config.Config:
    listen = listen or f"127.0.0.1:{free_port()}"
    lines = [f'listen = "{listen}"', "sample_s = 0.2"]
    if token:
        lines.append(f'token = "{token}"')
    path = write_config(
        tmp_path / "gw.toml",
        broker.port,
        tmp_path / "state",
        extra=hooks,
        web="\n".join(lines),
    )
    return config.load(path)


def hook(name: str, url: str, **fields: str) -> str:
    lines = ["[[webhooks]]", f'name = "{name}"', f'url = "{url}"']
    lines += [f"{k} = {v}" for k, v in fields.items()]
    return "\n".join(lines) + "\n"


def base_url(cfg: config.Config) -> str:
    return f"http://{cfg.web.listen}"


def bearer(token: str = TOKEN) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def login_csrf(http: aiohttp.ClientSession, base: str) -> str:
    """The login form's csrf field (its cookie stays in the session's jar)."""
    async with http.get(base + "/login") as r:
        page = await r.text()
    return page.split('name="csrf" value="', 1)[1].split('"', 1)[0]


async def get_json(
    http: aiohttp.ClientSession, url: str, headers: dict[str, str] | None = None
) -> Any:
    async with http.get(url, headers=headers) as r:
        assert r.status == 200, f"GET {url}: {r.status} {await r.text()}"
        return await r.json()


async def status_of(
    http: aiohttp.ClientSession, cfg: config.Config, token: str = ""
) -> dict[str, Any]:
    return await get_json(  # type: ignore[no-any-return]
        http, base_url(cfg) + "/api/status", bearer(token) if token else None
    )


async def ready(http: aiohttp.ClientSession, cfg: config.Config, token: str = "") -> None:
    """Poll until the web answers and the broker granted the subscription (a packet
    published before that has no subscriber and is lost)."""
    deadline = time.monotonic() + 20
    while True:
        try:
            s = await status_of(http, cfg, token)
            if s["gateway"]["mqtt"]["subscribed"]:
                return
        except aiohttp.ClientConnectionError:
            pass
        if time.monotonic() > deadline:
            pytest.fail("gateway web/ingest not ready within 20 s")
        await asyncio.sleep(0.05)


async def start(
    run_gateway, http: aiohttp.ClientSession, cfg: config.Config, token: str = ""
) -> str:
    """Run the gateway on this loop, wait until it takes packets; its base URL."""
    await run_gateway(cfg)
    await ready(http, cfg, token)
    return base_url(cfg)


async def pub(broker: Broker, n: int) -> None:
    await asyncio.to_thread(publish, broker.port, [(TOPIC, f"p{i}".encode()) for i in range(n)])


# -- startup ------------------------------------------------------------------------------


def test_a_non_loopback_listen_without_a_token_refuses_to_start(
    mosquitto: Broker, tmp_path: Path
) -> None:
    cfg = write_config(
        tmp_path / "gw.toml", mosquitto.port, tmp_path / "state", web='listen = "0.0.0.0:8080"'
    )
    r = subprocess.run(
        gateway_cmd("run", "-c", str(cfg)), capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert r.returncode == 2
    assert "web.token: is required when web.listen is not loopback" in r.stderr
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "state" / "gateway.db").exists()


def test_a_listen_port_in_use_stops_the_gateway_with_exit_2(
    mosquitto: Broker, tmp_path: Path
) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            web=f'listen = "127.0.0.1:{port}"',
        )
        r = subprocess.run(
            gateway_cmd("run", "-c", str(cfg)), capture_output=True, text=True, cwd=ROOT, timeout=30
        )
    assert r.returncode == 2
    assert f"web.listen: cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "Traceback" not in r.stderr


# -- token --------------------------------------------------------------------------------


async def test_the_token_guards_pages_api_and_metrics_but_not_healthz_or_downloads(
    mosquitto: Broker, tmp_path: Path, run_gateway, http: aiohttp.ClientSession
) -> None:
    cfg = web_config(tmp_path, mosquitto, token=TOKEN)
    base = await start(run_gateway, http, cfg, TOKEN)
    guarded = ["/", "/api/status", "/api/dead-letters", "/api/openapi.json", "/metrics"]
    for path in guarded:
        for headers in ({}, bearer("wrong"), bearer(TOKEN[:-1]), {"Authorization": TOKEN}):
            async with http.get(base + path, headers=headers) as r:
                assert r.status == 401, (path, headers)
                assert TOKEN not in await r.text()
        async with http.get(base + path, headers=bearer()) as r:
            assert r.status == 200, path
    async with http.post(base + "/api/webhooks/x/test") as r:
        assert r.status == 401
    async with http.get(base + "/api/status") as r:
        assert r.headers["WWW-Authenticate"].startswith("Bearer")
    async with http.get(base + "/healthz") as r:
        assert (r.status, await r.text()) == (200, "ok\n")
    async with http.get(base + reports.DOWNLOAD_PREFIX + "no-such-token") as r:
        assert r.status == 404

    # The login page: a wrong token is refused, the right one sets a session cookie.
    async with http.get(base + "/") as r:
        page = await r.text()
        assert r.status == 401
        assert 'name="token"' in page
    form = {"csrf": await login_csrf(http, base), "next": "/"}
    async with http.post(base + "/login", data={**form, "token": "nope"}) as r:
        assert r.status == 401
        assert "Wrong token." in await r.text()
    assert "gateway_session" not in http.cookie_jar.filter_cookies(URL(base))
    async with http.post(
        base + "/login", data={**form, "token": TOKEN}, allow_redirects=False
    ) as r:
        assert r.status == 303
        assert r.headers["Location"] == "/"
        cookie = r.cookies[web.SESSION_COOKIE]
        assert cookie["httponly"]
        assert cookie["samesite"] == "Strict"
        assert TOKEN not in cookie.value
    for path in guarded:
        async with http.get(base + path) as r:
            assert r.status == 200, path
            body = await r.text()
            assert TOKEN not in body
    async with http.get(base + "/") as r:
        assert "Content-Security-Policy" in r.headers
        assert '<svg id="chart"' in await r.text()

    # A tampered or expired cookie is worth nothing; an open redirect is not offered.
    value = http.cookie_jar.filter_cookies(URL(base))[web.SESSION_COOKIE].value
    expires, _, sig = value.partition(".")
    past = int(time.time()) - 10
    stale = hmac.new(TOKEN.encode(), f"edge-gateway session {past}".encode(), hashlib.sha256)
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as fresh:
        for cookie_value in (
            value,
            f"{int(expires) + 1}.{sig}",
            f"{expires}.{'0' * len(sig)}",
            f"{past}.{stale.hexdigest()}",
            "1.abc",
            "9" * 5000 + ".x",
            "\u00b2.x",
            "x",
        ):
            async with fresh.get(
                base + "/api/status", headers={"Cookie": f"{web.SESSION_COOKIE}={cookie_value}"}
            ) as r:
                assert r.status == (200 if cookie_value == value else 401), cookie_value
        csrf = await login_csrf(fresh, base)
        async with fresh.post(
            base + "/login",
            data={"token": TOKEN, "next": "//evil.example/", "csrf": csrf},
            allow_redirects=False,
        ) as r:
            assert r.headers["Location"] == "/"


# -- API, metrics and the CLI agree -----------------------------------------------------


async def test_metrics_parse_and_match_api_status_and_the_status_command(
    mosquitto: Broker, tmp_path: Path, run_gateway, http: aiohttp.ClientSession
) -> None:
    good, bad = Receiver().start(), Receiver().start()
    bad.behaviour = lambda n, r: Reply(400, text="rejected: bad field")
    try:
        cfg = web_config(
            tmp_path,
            mosquitto,
            hook("good", good.url, batch="{ window_ms = 0, max_items = 10 }")
            + hook("bad", bad.url, batch="{ window_ms = 0, max_items = 10 }"),
        )
        await start(run_gateway, http, cfg)
        await pub(mosquitto, 25)

        async def settled() -> dict[str, Any] | None:
            s = await status_of(http, cfg)
            hooks = {w["name"]: w for w in s["webhooks"]}
            if hooks["good"]["delivered"] == 25 and hooks["bad"]["dead_lettered"] == 25:
                return s
            return None

        deadline = time.monotonic() + 20
        while (s := await settled()) is None:
            assert time.monotonic() < deadline, "delivery did not settle"
            await asyncio.sleep(0.1)

        async with http.get(base_url(cfg) + "/metrics") as r:
            assert r.status == 200
            assert r.headers["Content-Type"].startswith("text/plain; version=0.0.4")
            text = await r.text()
        s = await status_of(http, cfg)
        samples: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
        for fam in text_string_to_metric_families(text):
            for smp in fam.samples:
                samples[(smp.name, tuple(sorted(smp.labels.items())))] = smp.value

        def m(name: str, **labels: str) -> float:
            return samples[(name, tuple(sorted(labels.items())))]

        p = s["packets"]
        assert m("gateway_packets_stored_total") == p["received"] == 25
        assert m("gateway_packets_delivered_total") == p["delivered"]
        assert m("gateway_packets_dead_lettered_total") == p["dead"]
        assert m("gateway_packets_pending") == p["pending"]
        assert m("gateway_packets_received_total") == s["gateway"]["mqtt"]["received"] == 25
        assert m("gateway_packets_acknowledged_total") == s["gateway"]["mqtt"]["acknowledged"]
        # Read before the status: commits made in between count only there.
        assert 1 <= m("gateway_store_commits_total") <= s["gateway"]["store"]["commits"]
        # One MQTT session, in this process, with the same counts.
        (session,) = s["gateway"]["mqtt"]["sessions"]
        assert session["client_id"] == cfg.mqtt.client_id
        assert session["pid"] == os.getpid()
        assert session["connected"]
        assert session["received"] == 25
        assert m("gateway_dead_letters") == s["dead_letters"]
        assert m("gateway_packets_bad_topic_total") == s["gateway"]["mqtt"]["bad_topics"] == 0
        for reason, n in s["rejected"].items():
            assert m("gateway_records_rejected_total", reason=reason) == n == 0
        assert set(s["rejected"]) == {"too_large", "unfilterable", "unencodable", "undecodable"}
        assert m("gateway_store_bytes") == s["gateway"]["store"]["bytes"] > 0
        assert m("gateway_store_writable") == 1
        # 25 packets published at once, each batch made as soon as delivery saw it: no
        # wait ran out twice with the same count, so no broker cap was learnt.
        assert m("gateway_store_broker_cap") == s["gateway"]["store"]["broker_cap"] == 0
        # Nor a trickle cap: 25 packets at once are more than a trickle.
        assert m("gateway_store_trickle_cap") == s["gateway"]["store"]["trickle_cap"] == 0
        assert m("gateway_mqtt_connected") == 1
        assert m("gateway_cdrs_emitted_total") == s["cdrs"]["count"] == 0
        for w in s["webhooks"]:
            name = w["name"]
            assert m("gateway_webhook_hits_total", webhook=name) == w["hits"] == 25
            assert m("gateway_webhook_delivered_total", webhook=name) == w["delivered"]
            assert (
                m("gateway_webhook_requests_total", webhook=name, result="ok") == w["requests_ok"]
            )
            failed = m("gateway_webhook_requests_total", webhook=name, result="failed")
            assert failed == w["requests_failed"]
            assert m("gateway_webhook_queue_depth", webhook=name) == w["queue_depth"] == 0
            assert m("gateway_webhook_dead_letters", webhook=name) == w["dead_letters"]
            assert m("gateway_webhook_dead_lettered_records", webhook=name) == w["dead_lettered"]
            assert m("gateway_webhook_disabled", webhook=name) == 0
            # The histogram is fed by delivery after every POST.
            count = m("gateway_webhook_request_duration_seconds_count", webhook=name)
            assert count == w["requests_ok"] + w["requests_failed"] > 0
        assert s["webhooks"][1]["last_error"] == "HTTP 400: rejected: bad field"
        assert s["webhooks"][1]["last_error_status"] == 400
        assert "gateway_modem" not in text  # no [modem] section, no modem figures

        # `gateway status` reads the same store and agrees with the API.
        out = await asyncio.to_thread(
            subprocess.run,
            gateway_cmd("status", "--json", "-c", str(cfg.path)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        assert json.loads(out.stdout)["webhooks"] == s["webhooks"]
        table = await asyncio.to_thread(
            subprocess.run,
            gateway_cmd("status", "-c", str(cfg.path)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            check=True,
        )
        header = next(line for line in table.stdout.splitlines() if line.startswith("webhook "))
        for col in ("hits", "delivered", "failed", "last_hit", "last_success", "last_error"):
            assert col in header.split()
        bad_row = next(line for line in table.stdout.splitlines() if line.startswith("bad "))
        assert "HTTP 400: rejected: bad field" in bad_row
    finally:
        good.stop()
        bad.stop()


async def test_dead_letters_are_listed_and_replayed_through_the_api(
    mosquitto: Broker, tmp_path: Path, run_gateway, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    receiver.behaviour = lambda n, r: Reply(400, text="nope")
    cfg = web_config(
        tmp_path, mosquitto, hook("flaky", receiver.url, batch="{ window_ms = 0, max_items = 5 }")
    )
    base = await start(run_gateway, http, cfg)
    await pub(mosquitto, 10)

    async def dead() -> list[dict[str, Any]]:
        return (await get_json(http, base + "/api/dead-letters?webhook=flaky"))["dead_letters"]  # type: ignore[no-any-return]

    deadline = time.monotonic() + 20
    rows = await dead()
    while sum(d["records"] for d in rows) < 10:
        assert time.monotonic() < deadline, "packets were not dead-lettered"
        await asyncio.sleep(0.1)
        rows = await dead()
    assert {d["reason"] for d in rows} == {"http_400"}
    assert all(d["webhook"] == "flaky" and d["created"] for d in rows)
    assert (await get_json(http, base + "/api/dead-letters?webhook=other"))["dead_letters"] == []

    # Refusals: unknown webhook, wrong shapes, not JSON.
    api = base + "/api/dead-letters"
    for body, code in (
        ({"webhook": "nope"}, 404),
        ({"webhook": 3}, 400),
        ({"webhook": "flaky", "ids": ["1"]}, 400),
        ({"webhook": "flaky", "extra": 1}, 400),
        ([], 400),
    ):
        async with http.post(api, json=body) as r:
            assert r.status == code, body
            assert "error" in await r.json()
    async with http.post(api, data="webhook=flaky") as r:
        assert r.status == 415
    for limit in ("0", "10001", "\u00b2", "9" * 5000):
        async with http.get(api, params={"limit": limit}) as r:
            assert r.status == 400, limit

    # Replay one by id, then the rest; the receiver now accepts, ids are kept.
    receiver.behaviour = lambda n, r: Reply(200)
    first = rows[-1]
    async with http.post(api, json={"webhook": "flaky", "ids": [first["id"]]}) as r:
        assert await r.json() == {"replayed": 1}
    async with http.post(api, json={"webhook": "flaky"}) as r:
        assert await r.json() == {"replayed": len(rows) - 1}
    wanted = {d["webhook_id"] for d in rows}
    await until(
        lambda: {r.webhook_id for r in receiver.ok()} == wanted, what="replayed batches to arrive"
    )
    assert sorted(rec["Payload"] for rec in receiver.delivered()) == sorted(
        f"p{i}" for i in range(10)
    )
    assert await dead() == []


async def test_the_test_endpoint_sends_one_request_in_the_webhooks_format(
    mosquitto: Broker, tmp_path: Path, run_gateway, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    secret = "whsec_" + base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()
    cfg = web_config(
        tmp_path,
        mosquitto,
        hook(
            "cloud",
            receiver.url,
            auth='{ type = "basic", username = "u", password = "p" }',
            signing=f'{{ scheme = "standard-webhooks", secret = "{secret}" }}',
        )
        + hook("usage", receiver.url + "/cdr", source='"cdrs"', format='"monogoto"')
        + hook(
            "notices",
            receiver.url + "/report",
            source='"reports"',
            format='"report"',
            batch="{ max_items = 1 }",
        ),
    )
    base = await start(run_gateway, http, cfg)

    async with http.post(base + "/api/webhooks/cloud/test", json={}) as r:
        out = await r.json()
    assert r.status == 200
    assert out["ok"] is True
    assert out["status"] == 200
    assert out["excerpt"] == "ok"
    assert out["latency_ms"] >= 0
    req = receiver.requests[-1]
    assert req.webhook_id == out["webhook_id"]
    assert req.headers["authorization"] == "Basic " + base64.b64encode(b"u:p").decode()
    signed = f"{req.webhook_id}.{req.headers['webhook-timestamp']}.".encode() + req.body
    key = base64.b64decode(secret.removeprefix("whsec_"))
    expected = base64.b64encode(hmac.new(key, signed, hashlib.sha256).digest()).decode()
    assert req.headers["webhook-signature"] == f"v1,{expected}"
    body = req.json
    assert set(body) == {"ICCID", "Timestamp", "Payload"}
    assert body["ICCID"] == int(web.TEST_ICCID)

    async with http.post(base + "/api/webhooks/usage/test", json={}) as r:
        assert (await r.json())["ok"]
    cdrs = receiver.requests[-1].json
    assert isinstance(cdrs, list)
    assert cdrs[0]["CdrType"] == "DATA"
    assert cdrs[0]["UniqueID"].startswith("CDR-")
    assert len(cdrs[0]["UniqueID"]) == 24

    async with http.post(base + "/api/webhooks/notices/test", json={}) as r:
        assert (await r.json())["ok"]
    notice = receiver.requests[-1].json
    assert notice["contentType"] == "application/zip"
    assert notice["callbackURL"].startswith(cfg.web.public_url + reports.DOWNLOAD_PREFIX)

    # A failing receiver is reported, not raised; no delivery figures change.
    receiver.behaviour = lambda n, r: Reply(503, text="maintenance")
    async with http.post(base + "/api/webhooks/cloud/test", json={}) as r:
        out = await r.json()
    assert (r.status, out["ok"], out["status"], out["excerpt"]) == (200, False, 503, "maintenance")
    # A reply quoting the URL it was called at shows its query values as ***.
    receiver.behaviour = lambda n, r: Reply(404, text=f"no route {receiver.url}?code=fn-key-42")
    async with http.post(base + "/api/webhooks/cloud/test", json={}) as r:
        out = await r.json()
    assert "fn-key-42" not in out["excerpt"]
    assert out["excerpt"] == f"no route {receiver.url}?code=***"
    async with http.post(base + "/api/webhooks/missing/test", json={}) as r:
        assert r.status == 404
    s = await status_of(http, cfg)
    assert all(w["requests_ok"] == w["requests_failed"] == 0 for w in s["webhooks"])


# -- report downloads -------------------------------------------------------------------


def add_report(db: Path, token: str, path: Path, valid_until_ns: int, name: str) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        with conn:
            conn.execute(
                "INSERT INTO reports(name, task_id, token_sha256, file_name, path, size, lines,"
                " period_start_ns, period_end_ns, created_ns, valid_until_ns)"
                " VALUES ('daily', 1, ?, ?, ?, ?, 2, 0, 0, ?, ?)",
                (
                    reports.token_digest(token),
                    name,
                    str(path),
                    path.stat().st_size if path.exists() else 0,
                    time.time_ns(),
                    valid_until_ns,
                ),
            )
    finally:
        conn.close()


async def test_report_downloads_serve_the_zip_until_expiry_without_the_dashboard_token(
    mosquitto: Broker, tmp_path: Path, run_gateway, http: aiohttp.ClientSession
) -> None:
    cfg = web_config(tmp_path, mosquitto, token=TOKEN)
    await start(run_gateway, http, cfg, TOKEN)
    zpath = tmp_path / "cdr-report.zip"
    with zipfile.ZipFile(zpath, "w") as z:
        z.writestr("cdrs.csv", "Iccid,Usage\n8981100000000000012,1234\n")
    now = time.time_ns()
    add_report(cfg.db_path, "live-token", zpath, now + 3600 * 10**9, "cdr-report.zip")
    add_report(cfg.db_path, "old-token", zpath, now - 1, "old.zip")
    add_report(cfg.db_path, "gone-file", tmp_path / "missing.zip", now + 3600 * 10**9, "m.zip")

    url = base_url(cfg) + reports.DOWNLOAD_PREFIX
    async with http.get(url + "live-token") as r:
        assert r.status == 200
        assert r.headers["Content-Type"] == "application/zip"
        assert r.headers["Content-Disposition"] == 'attachment; filename="cdr-report.zip"'
        assert r.headers["Referrer-Policy"] == "no-referrer"
        assert await r.read() == zpath.read_bytes()
    async with http.get(url + "old-token") as r:
        assert r.status == 410
    async with http.get(url + "gone-file") as r:
        assert r.status == 410
    for unknown in ("live-toke", "x" * 300, "a/b"):
        async with http.get(url + unknown) as r:
            assert r.status == 404, unknown

    s = await status_of(http, cfg, TOKEN)
    assert [(x["file_name"], x["expired"]) for x in s["reports"]] == [
        ("m.zip", False),
        ("old.zip", True),
        ("cdr-report.zip", False),
    ]
    assert "live-token" not in json.dumps(s)


# -- health -------------------------------------------------------------------------------


async def test_healthz_is_503_while_the_store_cannot_write_and_when_ingest_stops(
    mosquitto: Broker, tmp_path: Path, http: aiohttp.ClientSession
) -> None:
    cfg = web_config(tmp_path, mosquitto)
    url = base_url(cfg) + "/healthz"

    async def health() -> tuple[int, str]:
        async with http.get(url) as r:
            return r.status, await r.text()

    with store_mod.Store.open(cfg.gateway.state_dir) as store:
        async with (
            aiohttp.ClientSession() as client,
            web.serve(cfg, store, client) as site,
        ):
            assert await health() == (503, "ingest not running\n")
            async with ingest.running(cfg.mqtt, store) as taker:
                site.ingest = taker
                assert await health() == (200, "ok\n")
                # The broker drops what is published before the fresh session subscribes.
                await until(lambda: taker.stats.subscribed, what="the subscription")
                # A read-only database is what a full or read-only disk looks like to SQLite.
                await asyncio.wrap_future(store.call(lambda c: c.execute("PRAGMA query_only = 1")))
                await asyncio.to_thread(publish, mosquitto.port, [(TOPIC, b"x")], timeout=10)
                await until(lambda: store.write_error, what="the failed commit")
                code, text = await health()
                assert code == 503
                assert text.startswith("store not writable: OperationalError")
                await asyncio.wrap_future(store.call(lambda c: c.execute("PRAGMA query_only = 0")))
                await until(lambda: not store.write_error, what="the store to recover")
                assert await health() == (200, "ok\n")
                assert taker.stats.acked == 1
            assert await health() == (503, "ingest not running\n")


# -- OpenAPI ------------------------------------------------------------------------------


async def test_the_api_holds_to_its_openapi_document_under_generated_requests(
    mosquitto: Broker, tmp_path: Path, run_gateway, http: aiohttp.ClientSession, receiver: Receiver
) -> None:
    import schemathesis
    from hypothesis import HealthCheck, given, settings

    cfg = web_config(tmp_path, mosquitto, hook("cloud", receiver.url), token=TOKEN)
    base = await start(run_gateway, http, cfg, TOKEN)
    doc = await get_json(http, base + "/api/openapi.json", bearer())
    assert doc == json.loads(json.dumps(openapi.document()))
    schema = schemathesis.openapi.from_dict(doc)
    seen: list[tuple[str, str, int]] = []

    @settings(
        max_examples=60,
        deadline=None,
        database=None,
        suppress_health_check=list(HealthCheck),
    )
    @given(case=schema.as_strategy())
    def check(case: Any) -> None:
        response = case.call(base_url=base, headers=bearer(), timeout=10)
        seen.append((case.method, case.path, response.status_code))
        assert response.status_code < 500, (case.method, case.formatted_path, response.text)
        case.validate_response(response)

    # schemathesis is synchronous: run it beside the loop that serves the gateway.
    await asyncio.to_thread(check)
    assert {(m, p) for m, p, _ in seen} >= {
        ("GET", "/api/status"),
        ("GET", "/api/dead-letters"),
        ("POST", "/api/dead-letters"),
        ("POST", "/api/webhooks/{name}/test"),
        ("GET", "/api/cdrs"),
        ("GET", "/api/cdrs/{unique_id}"),
    }


def test_the_chart_can_be_read_while_the_sampler_adds_to_it() -> None:
    # /api/status reads the samples in a worker thread while the event loop adds to them.
    tp = throughput.Throughput(0.1)
    for i in range(100):
        tp.add(throughput.Sample(i, i, i, 0))
    stop = threading.Event()
    errors: list[Exception] = []

    def read() -> None:
        while not stop.is_set():
            try:
                tp.points()
                tp.rates()
            except RuntimeError as exc:  # deque mutated during iteration
                errors.append(exc)
                return

    reader = threading.Thread(target=read)
    reader.start()
    deadline = time.monotonic() + 1.0
    i = 100
    while time.monotonic() < deadline and not errors:
        tp.add(throughput.Sample(i, i, i, 0))
        i += 1
    stop.set()
    reader.join()
    assert errors == []

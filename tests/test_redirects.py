"""Webhook auth and redirects end to end: a real gateway, real mosquitto, real aiohttp
receivers that check the Authorization header, move (307/308) and point elsewhere
(301/302/303), and hostile Location headers."""

from __future__ import annotations

import base64
import hashlib
import hmac
from pathlib import Path

import pytest

from gateway.delivery import redirects
from tests.conftest import Broker, db_rows, until
from tests.receiver import Receiver, Recorded, Reply
from tests.test_delivery import TOPIC, connected, gw_config, hook, pub

TOKEN = "tok-3f9a1c"


def named(name: str, url: str, **fields: str) -> str:
    return hook(url, **fields).replace('name = "cloud"', f'name = "{name}"')


async def test_a_bearer_webhook_is_accepted_by_a_receiver_that_checks_the_token(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    """The receiver answers 401 to anything but `Bearer <token>`: every record arriving
    means every request carried it."""
    receiver.behaviour = lambda n, r: (
        Reply() if r.headers.get("authorization") == f"Bearer {TOKEN}" else Reply(401)
    )
    cfg = gw_config(
        tmp_path,
        mosquitto,
        hook(
            receiver.url,
            batch="{ window_ms = 100 }",
            auth=f'{{ type = "bearer", token = "{TOKEN}" }}',
        ),
    )
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, f"p{i}".encode()) for i in range(5)])
    await until(lambda: len(receiver.delivered()) == 5, what="5 packets accepted")
    assert all(r.status == 200 for r in receiver.requests)
    db = tmp_path / "state" / "gateway.db"
    assert db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 0


async def test_307_and_308_are_followed_with_the_same_post_and_auth_stays_with_its_origin(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    """/hook answers 307 to a relative /v2 on the same origin (credentials go along),
    /v2 answers 308 to another origin, which gets the same body, method, webhook-id and
    signature, but not the bearer token nor the secret custom header."""
    moved = Receiver().start()
    try:
        final = f"http://127.0.0.1:{moved.port}/final"

        def first(n: int, r: Recorded) -> Reply:
            if r.path == "/hook":
                return Reply(307, headers={"Location": "/v2?x=1"})
            return Reply(308, headers={"Location": final})

        receiver.behaviour = first
        cfg = gw_config(
            tmp_path,
            mosquitto,
            hook(
                receiver.url,
                batch="{ window_ms = 100 }",
                auth=f'{{ type = "bearer", token = "{TOKEN}" }}',
                signing='{ scheme = "cdr-manager", secret = "s3cret" }',
                headers='{ "X-Auth-Token" = "t0k", "X-Site" = "north" }',
            ),
        )
        await run_gateway(cfg)
        await connected(tmp_path)
        await pub(mosquitto, [(TOPIC, b"hello")])
        await until(lambda: moved.ok(), what="the request at the final URL")
        a, b = receiver.requests[:2]
        c = moved.ok()[0]
        assert (a.path, b.path, c.path) == ("/hook", "/v2", "/final")
        assert a.raw == b.raw == c.raw
        assert c.records[0]["Payload"] == "hello"
        assert a.webhook_id == b.webhook_id == c.webhook_id
        want = base64.b64encode(hmac.new(b"s3cret", c.raw, hashlib.sha512).digest()).decode()
        assert a.headers["x-cdr-signature"] == c.headers["x-cdr-signature"] == want
        assert a.headers["authorization"] == b.headers["authorization"] == f"Bearer {TOKEN}"
        assert b.headers["x-auth-token"] == "t0k"
        assert "authorization" not in c.headers
        assert "x-auth-token" not in c.headers
        assert c.headers["x-site"] == "north"
        db = tmp_path / "state" / "gateway.db"
        await until(
            lambda: db_rows(db, "SELECT redirects, delivered FROM webhook_stats")[0] == (2, 1),
            what="2 redirects counted, 1 record delivered",
        )
        assert db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == 0
    finally:
        moved.stop()


HUGE = "/" + "a" * 3000


async def test_moved_receivers_and_bad_redirects_are_dead_lettered_with_a_reason_that_says_where(
    mosquitto: Broker, tmp_path: Path, receiver: Receiver, run_gateway
) -> None:
    """301/302/303 are not followed (a client may turn them into a body-less GET): the
    dead letter names the Location, its query values masked. A loop, a fourth hop, and a
    Location that is missing, not http(s) or huge each fail with their own reason. No
    receiver path is asked more often than the redirects allow."""
    base = f"http://127.0.0.1:{receiver.port}"
    answers = {
        "/moved": Reply(301, headers={"Location": "https://new.example/hook?token=abc"}),
        "/found": Reply(302, headers={"Location": "https://other.example/in"}),
        "/other": Reply(303, headers={"Location": "/elsewhere"}),
        "/loop": Reply(307, headers={"Location": "/loop2"}),
        "/loop2": Reply(308, headers={"Location": f"{base}/loop"}),
        "/none": Reply(307),
        "/scheme": Reply(307, headers={"Location": "javascript:alert(1)"}),
        "/huge": Reply(307, headers={"Location": HUGE}),
        **{f"/hop{i}": Reply(307, headers={"Location": f"/hop{i + 1}"}) for i in range(5)},
    }
    receiver.behaviour = lambda n, r: answers.get(r.path, Reply())
    expected = {
        "moved": "receiver moved permanently (301) to https://new.example/hook?token=***;"
        " update the webhook url",
        "found": "receiver found elsewhere (302) to https://other.example/in;"
        " update the webhook url",
        "other": "receiver see other (303) to /elsewhere; update the webhook url",
        "loop": f"redirect loop: HTTP 308 back to {base}/loop",
        "none": "HTTP 307 redirect without a Location header",
        "scheme": "HTTP 307 redirect to javascript:alert(1): not an http(s) URL",
        "huge": f"HTTP 307 redirect with a Location of {len(HUGE)} characters",
        "hop0": f"more than 3 redirects (the next to {base}/hop4)",
    }
    webhooks = "".join(
        named(name, f"{base}/{name}", batch="{ window_ms = 100 }") for name in expected
    )
    cfg = gw_config(tmp_path, mosquitto, webhooks)
    await run_gateway(cfg)
    await connected(tmp_path)
    await pub(mosquitto, [(TOPIC, b"hello")])
    db = tmp_path / "state" / "gateway.db"
    await until(
        lambda: db_rows(db, "SELECT COUNT(*) FROM dead_letters")[0][0] == len(expected),
        what="a dead letter per webhook",
    )
    rows = {
        str(r[0]): r[1:]
        for r in db_rows(db, "SELECT webhook, reason, status, excerpt, count FROM dead_letters")
    }
    for name, text in expected.items():
        reason, status, excerpt, count = rows[name]
        assert excerpt == text, name
        assert reason == f"http_{status}"
        assert count == 1
    stats = dict(db_rows(db, "SELECT name, last_error FROM webhook_stats"))
    assert "https://new.example/hook?token=***" in str(stats["moved"])
    paths = [r.path for r in receiver.requests]
    assert paths.count("/moved") == 1
    assert "/elsewhere" not in paths
    assert paths.count("/loop") == paths.count("/loop2") == 1
    assert [p for p in paths if p.startswith("/hop")] == ["/hop0", "/hop1", "/hop2", "/hop3"]


@pytest.mark.parametrize(
    ("current", "location", "want"),
    [
        ("https://a.example/hook", "/v2", "https://a.example/v2"),
        ("https://a.example/x/hook", "next", "https://a.example/x/next"),
        ("https://a.example/hook", "//b.example/in", "https://b.example/in"),
        ("https://a.example/hook", "http://b.example/in", "from https to plain http"),
        ("https://a.example/hook", "ftp://b.example/in", "not an http(s) URL"),
        ("https://a.example/hook", "https://b.example:99999/in", "malformed Location"),
        ("https://a.example/hook", "https://b.example/\x00in", "malformed Location"),
        ("https://a.example/hook", "https://bé.example/in", "malformed Location"),
        ("https://a.example/hook", "https://:443/in", "not an http(s) URL"),
        ("https://a.example/hook", "   ", "without a Location"),
    ],
)
def test_a_location_is_resolved_or_refused_with_its_reason(
    current: str, location: str, want: str
) -> None:
    hop = redirects.resolve(current, 307, location)
    if want.startswith("https://"):
        assert hop == redirects.Hop(url=want)
    else:
        assert want in hop.error
        assert not hop.url


def test_origins_compare_scheme_host_and_default_port() -> None:
    assert redirects.origin("https://A.example/x") == redirects.origin("https://a.example:443/y")
    assert redirects.origin("http://a.example/") != redirects.origin("https://a.example/")
    assert redirects.origin("http://a.example:8080/") != redirects.origin("http://a.example/")


def test_the_headers_left_behind_across_origins_are_the_credentials_not_the_signatures() -> None:
    from gateway.config import AuthConfig, WebhookConfig

    cfg = WebhookConfig(
        "cloud",
        "https://a.example/hook",
        auth=AuthConfig(type="api_key", key="k", header="X-Api-Key"),
        headers=(("X-Auth-Token", "t"), ("X-Site", "north"), ("X-Signature-Note", "v")),
    )
    names = redirects.auth_header_names(cfg)
    assert {"authorization", "cookie", "x-api-key", "x-auth-token", "x-signature-note"} <= names
    assert names.isdisjoint({"x-site", "x-cdr-signature", "webhook-signature", "webhook-id"})

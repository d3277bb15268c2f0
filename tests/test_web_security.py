"""The dashboard on a shared LAN: each attack from docs/security.md, against a real gateway.

Gateways run on the test's event loop with a real mosquitto; requests go over real sockets
(aiohttp, or raw sockets where a misbehaving client is the point); where a browser is the
attacker, it is Debian's headless Chromium. Everything listens on loopback only:
127.0.0.2 plays the other site, and Chromium's host resolver maps made-up names to
127.0.0.1 the way a rebinding DNS server would.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web as aioweb
from yarl import URL

from gateway import config
from gateway.web import app as web
from gateway.web import guard
from tests.conftest import ROOT, Broker, free_port, gateway_cmd, write_config
from tests.receiver import Receiver
from tests.test_dashboard import headless_chromium
from tests.test_web import login_csrf

TOKEN = "lan-dashboard-token-0123"
# Names Chromium resolves to 127.0.0.1: one the gateway was told about, one it was not.
KNOWN_NAME = "gateway.lan"
REBOUND_NAME = "rebind.example"


def gw_config(
    tmp_path: Path, broker: Broker, *web_lines: str, hooks: str = "", port: int = 0
) -> config.Config:
    lines = [f'listen = "127.0.0.1:{port or free_port()}"', "sample_s = 0.5", *web_lines]
    path = write_config(
        tmp_path / "gw.toml", broker.port, tmp_path / "state", extra=hooks, web="\n".join(lines)
    )
    return config.load(path)


def hook(name: str, url: str) -> str:
    return f'[[webhooks]]\nname = "{name}"\nurl = "{url}"\n'


async def start(run_gateway: Any, cfg: config.Config, ssl_ctx: ssl.SSLContext | None = None) -> str:
    """Run the gateway on this loop until its web answers; its base URL."""
    await run_gateway(cfg)
    scheme = "https" if ssl_ctx else "http"
    base = f"{scheme}://{cfg.web.listen}"
    deadline = time.monotonic() + 20
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(base + "/healthz", ssl=ssl_ctx or False) as r:
                    await r.read()
                    return base
            except aiohttp.ClientConnectionError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the gateway's web did not answer within 20 s")
            await asyncio.sleep(0.05)


@pytest.fixture
def chromium() -> Iterator[Any]:
    """Headless Chromium whose resolver sends KNOWN_NAME and REBOUND_NAME to 127.0.0.1."""
    yield from headless_chromium(
        f"--host-resolver-rules=MAP {KNOWN_NAME} 127.0.0.1, MAP {REBOUND_NAME} 127.0.0.1"
    )


# -- open redirect ------------------------------------------------------------------------

FOREIGN_NEXT = [
    "/\t/evil.example",
    "/\n/evil.example",
    "/ /evil.example",
    "//evil.example",
    "/\\evil.example",
    "/\\/evil.example",
    "https://evil.example/",
    "javascript:alert(1)",
    "evil.example",
    "/%09/evil.example",
    "/%2F%2Fevil.example",
    "/%2f/evil.example",
    "/%5Cevil.example",
    "/%252F%252Fevil.example",
    "/\u3000/evil.example",
    "/%E3%80%80/evil.example",
    "",
]


def test_next_keeps_only_paths_on_this_site() -> None:
    for value in FOREIGN_NEXT:
        assert guard.safe_next(value) == "/", repr(value)
    for value in ("/", "/?tab=webhooks", "/api/status", "/x%2Dy", "/x#y"):
        assert guard.safe_next(value) == value


async def test_login_redirects_only_to_a_path_on_this_site(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any, http: aiohttp.ClientSession
) -> None:
    base = await start(run_gateway, gw_config(tmp_path, mosquitto, f'token = "{TOKEN}"'))
    csrf = await login_csrf(http, base)
    for value in [*FOREIGN_NEXT, "/?tab=webhooks"]:
        form = {"token": TOKEN, "next": value, "csrf": csrf}
        async with http.post(base + "/login", data=form, allow_redirects=False) as r:
            assert r.status == 303, value
            want = value if value == "/?tab=webhooks" else "/"
            assert r.headers["Location"] == want, repr(value)
    # The login page does not carry a foreign next into its form either.
    async with http.get(base + "/login", params={"next": "/\t/evil.example"}) as r:
        assert 'name="next" value="/"' in await r.text()


# -- login rate limit and token length ----------------------------------------------------


async def test_wrong_tokens_lock_a_client_out_of_login_for_doubling_times(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any, http: aiohttp.ClientSession
) -> None:
    base = await start(run_gateway, gw_config(tmp_path, mosquitto, f'token = "{TOKEN}"'))

    async def attempt(session: aiohttp.ClientSession, token: str) -> tuple[int, str]:
        body = {"token": token, "next": "/"}
        async with session.post(base + "/login", json=body, allow_redirects=False) as r:
            return r.status, r.headers.get("Retry-After", "")

    assert [await attempt(http, "wrong-token-guess") for _ in range(3)] == [(401, "")] * 3
    # Locked out: even the right token is not looked at, and no cookie is set.
    assert await attempt(http, TOKEN) == (429, "1")
    assert not http.cookie_jar.filter_cookies(URL(base))
    # Another client (another loopback address) is not held back by this one.
    connector = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with aiohttp.ClientSession(connector=connector) as other:
        assert await attempt(other, "wrong-token-guess") == (401, "")

    # Once the second is over, one more wrong token locks it out for twice as long.
    deadline = time.monotonic() + 5
    while (got := await attempt(http, "wrong-token-guess"))[0] == 429:
        assert time.monotonic() < deadline, "still locked out after 5 s"
        await asyncio.sleep(0.1)
    assert got == (401, "")
    assert await attempt(http, "wrong-token-guess") == (429, "2")

    # The HTML form gets the same answer, as a page that says when to try again.
    form = {"token": TOKEN, "next": "/", "csrf": await login_csrf(http, base)}
    async with http.post(base + "/login", data=form) as r:
        assert r.status == 429
        assert r.headers["Retry-After"] == "2"
        assert "try again in 2 s" in await r.text()


def test_the_limiter_doubles_up_to_its_cap_and_holds_a_bounded_number_of_clients() -> None:
    now = [1000.0]
    limiter = guard.LoginLimiter(free=3, base_s=1, cap_s=300, max_clients=100, clock=lambda: now[0])
    delays = [limiter.failed("10.0.0.1") for _ in range(14)]
    assert delays == [0, 0, 1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]
    assert limiter.retry_after("10.0.0.1") == 300
    now[0] += 300
    assert limiter.retry_after("10.0.0.1") == 0
    for i in range(10_000):
        limiter.failed(f"10.{i // 65536}.{i // 256 % 256}.{i % 256}")
    assert len(limiter) == 100
    # One IPv6 host holds a /64: its addresses are one client.
    assert guard.LoginLimiter.key("2001:db8:1:2::1") == guard.LoginLimiter.key("2001:db8:1:2::ff")
    assert guard.LoginLimiter.key("::ffff:10.0.0.1") == "10.0.0.1"


def test_check_config_refuses_a_short_token_and_half_or_unreadable_tls(
    mosquitto: Broker, tmp_path: Path
) -> None:
    def check(*web_lines: str) -> subprocess.CompletedProcess[str]:
        path = write_config(
            tmp_path / "gw.toml", mosquitto.port, tmp_path / "state", web="\n".join(web_lines)
        )
        return subprocess.run(
            gateway_cmd("check-config", "-c", str(path)),
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=30,
        )

    r = check('token = "fifteen-chars-x"')
    assert r.returncode == 2
    assert "web.token: must be at least 16 characters long" in r.stderr
    assert "fifteen-chars-x" not in r.stderr + r.stdout
    assert check('token = "sixteen-chars-xx"').returncode == 0

    r = check(f'tls_cert = "{tmp_path / "cert.pem"}"')
    assert r.returncode == 2
    assert "web.tls_key: is required with the other of web.tls_cert and web.tls_key" in r.stderr
    r = check(f'tls_cert = "{tmp_path / "no.pem"}"', f'tls_key = "{tmp_path / "no.key"}"')
    assert r.returncode == 2
    assert "web.tls_cert: cannot read it" in r.stderr
    (tmp_path / "junk.pem").write_text("not a certificate\n")
    r = check(f'tls_cert = "{tmp_path / "junk.pem"}"', f'tls_key = "{tmp_path / "junk.pem"}"')
    assert r.returncode == 2
    assert "web.tls_cert: not a certificate matching web.tls_key" in r.stderr


# -- Host header (DNS rebinding) ----------------------------------------------------------


async def test_a_foreign_host_header_is_answered_421_even_without_a_token(
    mosquitto: Broker,
    tmp_path: Path,
    run_gateway: Any,
    http: aiohttp.ClientSession,
    receiver: Receiver,
) -> None:
    cfg = gw_config(
        tmp_path, mosquitto, f'allowed_hosts = ["{KNOWN_NAME}"]', hooks=hook("cloud", receiver.url)
    )
    base = await start(run_gateway, cfg)
    port = cfg.web.listen.rpartition(":")[2]
    foreign = {"Host": f"{REBOUND_NAME}:{port}"}
    for method, path, body in (
        ("GET", "/", None),
        ("GET", "/api/status", None),
        ("GET", "/metrics", None),
        ("POST", "/api/dead-letters", {"webhook": "cloud"}),
        ("POST", "/api/webhooks/cloud/test", {}),
    ):
        async with http.request(method, base + path, json=body, headers=foreign) as r:
            assert r.status == 421, (method, path)
            assert "Host" in (await r.json())["error"]
    assert receiver.requests == []
    # Monitors may use any name for /healthz, which shows nothing worth rebinding for.
    async with http.get(base + "/healthz", headers=foreign) as r:
        assert r.status in (200, 503)
    for host in (f"127.0.0.1:{port}", f"localhost:{port}", f"{KNOWN_NAME}:{port}", "LOCALHOST"):
        async with http.get(base + "/api/status", headers={"Host": host}) as r:
            assert r.status == 200, host


async def test_a_rebound_name_in_chromium_reads_nothing_and_a_listed_one_works(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any, chromium: Any
) -> None:
    from selenium.webdriver.common.by import By

    cfg = gw_config(tmp_path, mosquitto, f'allowed_hosts = ["{KNOWN_NAME}"]')
    await start(run_gateway, cfg)
    port = cfg.web.listen.rpartition(":")[2]

    def visit(name: str) -> str:
        # A page of the attacker's site, now resolving to the gateway: same origin for the
        # browser, so only the gateway itself can refuse.
        chromium.get(f"http://{name}:{port}/api/status")
        return str(chromium.find_element(By.TAG_NAME, "body").text)

    text = await asyncio.to_thread(visit, REBOUND_NAME)
    assert "does not answer to that Host name" in text
    assert "webhooks" not in text
    assert '"webhooks"' in await asyncio.to_thread(visit, KNOWN_NAME)


# -- cross-site requests ------------------------------------------------------------------

ATTACK_PAGE = """<!doctype html><html><body>
<form id="plain" method="post" enctype="text/plain" action="__TARGET__">
<input name='{"a":"' value='"}'></form>
<form id="urlenc" method="post" action="__TARGET__"><input name="x" value="1"></form>
<script>
const which = new URLSearchParams(location.search).get("via");
if (which === "fetch") {
  fetch("__TARGET__", {method: "POST", mode: "cors", headers: {"Content-Type":
    "application/json"}, body: "{}"}).then(r => { document.title = "sent " + r.status; },
    e => { document.title = "blocked"; });
} else {
  document.getElementById(which).submit();
}
</script></body></html>
"""


@pytest.fixture
async def attacker_site() -> AsyncIterator[tuple[str, list[str]]]:
    """A site on 127.0.0.2 whose page posts to the URL in `target[0]`."""
    target = [""]

    async def page(request: aioweb.Request) -> aioweb.Response:
        return aioweb.Response(
            text=ATTACK_PAGE.replace("__TARGET__", target[0]), content_type="text/html"
        )

    app = aioweb.Application()
    app.router.add_get("/", page)
    runner = aioweb.AppRunner(app)
    await runner.setup()
    port = free_port()
    await aioweb.TCPSite(runner, "127.0.0.2", port).start()
    try:
        yield f"http://127.0.0.2:{port}/", target
    finally:
        await runner.cleanup()


async def test_a_page_on_another_site_cannot_make_chromium_send_a_test_request(
    mosquitto: Broker,
    tmp_path: Path,
    run_gateway: Any,
    receiver: Receiver,
    chromium: Any,
    attacker_site: tuple[str, list[str]],
) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    # No token: a loopback gateway trusts its own machine, and the browser is on it.
    cfg = gw_config(tmp_path, mosquitto, hooks=hook("cloud", receiver.url))
    base = await start(run_gateway, cfg)
    target = base + "/api/webhooks/cloud/test"
    attacker_site[1][0] = target

    def attack(via: str) -> str:
        chromium.get(attacker_site[0] + "?via=" + via)
        wait = WebDriverWait(chromium, 15)
        if via == "fetch":
            wait.until(lambda d: d.title in ("blocked",) or d.title.startswith("sent"))
            return str(chromium.title)
        wait.until(lambda d: d.current_url.startswith(base))
        return str(chromium.page_source)

    plain = await asyncio.to_thread(attack, "plain")
    assert "send the body as application/json" in plain
    urlenc = await asyncio.to_thread(attack, "urlenc")
    assert "csrf" in urlenc
    # JSON from another origin needs a CORS preflight, which the gateway never grants.
    assert await asyncio.to_thread(attack, "fetch") == "blocked"
    assert receiver.requests == []

    # The dashboard's own button, same origin, still sends it.
    async with aiohttp.ClientSession() as s, s.post(target, json={}) as r:
        assert r.status == 200
    assert len(receiver.requests) == 1


async def test_login_and_logout_refuse_a_form_post_without_the_csrf_field(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any, http: aiohttp.ClientSession
) -> None:
    base = await start(run_gateway, gw_config(tmp_path, mosquitto, f'token = "{TOKEN}"'))
    csrf = await login_csrf(http, base)
    for form in (
        {"token": TOKEN, "next": "/"},
        {"token": TOKEN, "next": "/", "csrf": "0" * 64},
    ):
        async with http.post(base + "/login", data=form, allow_redirects=False) as r:
            assert r.status == 403
            assert "sign-in form expired" in await r.text()
    # A field of this gateway with another browser's cookie is worth nothing either.
    async with aiohttp.ClientSession() as other:
        form = {"token": TOKEN, "next": "/", "csrf": csrf}
        async with other.post(base + "/login", data=form, allow_redirects=False) as r:
            assert r.status == 403
    assert web.SESSION_COOKIE not in http.cookie_jar.filter_cookies(URL(base))

    form = {"token": TOKEN, "next": "/", "csrf": csrf}
    async with http.post(base + "/login", data=form, allow_redirects=False) as r:
        assert r.status == 303
    async with http.post(base + "/logout", data={"x": "1"}, allow_redirects=False) as r:
        assert r.status == 403
    async with http.get(base + "/api/status") as r:
        assert r.status == 200
    async with http.post(base + "/logout", json={}, allow_redirects=False) as r:
        assert r.status == 303


async def test_sign_in_and_sign_out_work_in_chromium(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any, chromium: Any
) -> None:
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    base = await start(run_gateway, gw_config(tmp_path, mosquitto, f'token = "{TOKEN}"'))

    def session() -> str:
        chromium.get(base + "/")
        chromium.find_element(By.ID, "token").send_keys(TOKEN)
        chromium.find_element(By.ID, "sign-in").click()
        wait = WebDriverWait(chromium, 15)
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))
        wait.until(lambda d: d.find_element(By.ID, "logout-form").is_displayed())
        chromium.find_element(By.CSS_SELECTOR, "#logout-form button").click()
        wait.until(lambda d: d.current_url.startswith(base + "/login"))
        chromium.get(base + "/api/status")
        return str(chromium.find_element(By.TAG_NAME, "body").text)

    assert "missing or wrong token" in await asyncio.to_thread(session)


# -- slow clients -------------------------------------------------------------------------


def _seconds_until_closed(port: int, first: bytes, limit: float = 10.0) -> tuple[float, bytes]:
    """Send `first`, then nothing; how long until the server closes, and what it said."""
    with socket.create_connection(("127.0.0.1", port), timeout=limit) as s:
        t0 = time.monotonic()
        s.sendall(first)
        got = b""
        while time.monotonic() - t0 < limit:
            try:
                chunk = s.recv(4096)
            except TimeoutError:
                break
            except ConnectionResetError:
                break
            if not chunk:
                break
            got += chunk
        return time.monotonic() - t0, got


async def test_a_client_that_stalls_mid_request_is_disconnected_within_the_read_timeout(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any
) -> None:
    cfg = gw_config(tmp_path, mosquitto, "read_timeout_s = 1")
    await start(run_gateway, cfg)
    port = int(cfg.web.listen.rpartition(":")[2])

    took, said = await asyncio.to_thread(_seconds_until_closed, port, b"GET /api/sta")
    assert took < 4, f"a partial request line held the connection for {took:.1f} s"
    took, said = await asyncio.to_thread(
        _seconds_until_closed, port, b"GET /api/status HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow"
    )
    assert took < 4, f"partial headers held the connection for {took:.1f} s"
    body_start = (
        b"POST /api/dead-letters HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        b'Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"webhook"'
    )
    took, said = await asyncio.to_thread(_seconds_until_closed, port, body_start)
    assert took < 4, f"a stalled body held the connection for {took:.1f} s"
    assert said.startswith(b"HTTP/1.1 408")


# -- HTTPS --------------------------------------------------------------------------------


async def test_https_with_a_trusted_certificate_secure_cookies_and_hsts(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any
) -> None:
    import trustme

    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    cert.private_key_pem.write_to_path(str(tmp_path / "key.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "cert.pem"))
    for blob in cert.cert_chain_pems[1:]:
        blob.write_to_path(str(tmp_path / "cert.pem"), append=True)
    port = free_port()
    cfg = gw_config(
        tmp_path,
        mosquitto,
        f'token = "{TOKEN}"',
        f'tls_cert = "{tmp_path / "cert.pem"}"',
        f'tls_key = "{tmp_path / "key.pem"}"',
        f'public_url = "https://127.0.0.1:{port}"',
        port=port,
    )
    client_ctx = ssl.create_default_context()
    ca.configure_trust(client_ctx)
    base = await start(run_gateway, cfg, client_ctx)
    assert base == f"https://127.0.0.1:{port}"

    jar = aiohttp.CookieJar(unsafe=True)
    async with aiohttp.ClientSession(cookie_jar=jar) as s:
        async with s.get(base + "/login", ssl=client_ctx) as r:
            assert r.status == 200
            assert r.headers["Strict-Transport-Security"].startswith("max-age=")
            assert r.cookies[guard.CSRF_COOKIE]["secure"]
            page = await r.text()
        csrf = page.split('name="csrf" value="', 1)[1].split('"', 1)[0]
        form = {"token": TOKEN, "next": "/", "csrf": csrf}
        async with s.post(base + "/login", data=form, ssl=client_ctx, allow_redirects=False) as r:
            assert r.status == 303
            assert r.cookies[web.SESSION_COOKIE]["secure"]
        async with s.get(base + "/api/status", ssl=client_ctx) as r:
            assert r.status == 200
            assert r.headers["Cache-Control"] == "no-store"
    # The same port speaks no plain HTTP: the token never crosses the network in clear.
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientError):
            async with s.get(f"http://127.0.0.1:{port}/login") as r:
                await r.read()
    # A client that does not trust the CA gets no answer at all.
    async with aiohttp.ClientSession() as s:
        with pytest.raises(aiohttp.ClientConnectorCertificateError):
            async with s.get(base + "/healthz") as r:
                await r.read()


# -- caching ------------------------------------------------------------------------------


async def test_pages_and_api_answers_that_show_data_are_never_cached(
    mosquitto: Broker, tmp_path: Path, run_gateway: Any, http: aiohttp.ClientSession
) -> None:
    base = await start(run_gateway, gw_config(tmp_path, mosquitto))
    for path in ("/", "/api/status", "/api/dead-letters", "/api/openapi.json", "/metrics"):
        async with http.get(base + path) as r:
            assert r.status == 200, path
            assert r.headers["Cache-Control"] == "no-store", path

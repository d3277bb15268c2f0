"""The dashboard in a real headless Chromium, against a running gateway fed by the fleet.

Everything is real: mosquitto, the gateway as a subprocess, the firmware_sim fleet and
modem emulator, aiohttp receivers, Debian's chromium driven by Selenium through the system
chromedriver. Screenshots land in tests/artifacts/ (ignored by git).
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.usage import reports
from gateway.web import status
from tests.conftest import ROOT, Broker, db_rows, free_port, wait_for, write_config
from tests.receiver import Receiver, Reply

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = "/usr/bin/chromedriver"
ARTIFACTS = ROOT / "tests" / "artifacts"
TOKEN = "dashboard-test-token"


def _browser_missing() -> str:
    if CHROMIUM is None:
        return "chromium is not installed (apt-get install chromium chromium-driver)"
    if not Path(CHROMEDRIVER).exists():
        return f"{CHROMEDRIVER} is missing (apt-get install chromium-driver)"
    return ""


def headless_chromium(*extra: str) -> Iterator[Any]:
    """Headless Chromium through the system chromedriver (no browser download), with
    `extra` command-line switches; skipped where it is missing, except in CI."""
    missing = _browser_missing()
    if missing and os.environ.get("CI"):
        pytest.fail(f"CI must run the browser test: {missing}; .ci/run sets WITH_BROWSER=1")
    if missing:
        pytest.skip(missing)
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in (
        "--headless=new",
        "--no-sandbox",  # tests run as root in CI
        "--disable-gpu",
        "--disable-dev-shm-usage",
        *extra,
    ):
        options.add_argument(arg)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    driver.set_page_load_timeout(15)
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture
def browser() -> Iterator[Any]:
    yield from headless_chromium("--window-size=1440,2000", "--lang=en-US")


def get(url: str, token: str = TOKEN) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
    except OSError:
        return 0, b""


def api_status(base: str) -> dict[str, Any]:
    code, body = get(base + "/api/status")
    assert code == 200, body
    return json.loads(body)  # type: ignore[no-any-return]


def add_cdr_and_report(db: Path, zip_path: Path) -> None:
    conn = sqlite3.connect(db)
    try:
        conn.execute("PRAGMA busy_timeout = 5000")
        now = time.time_ns()
        record = {"CdrType": "DATA", "UniqueID": "CDR-TESTTESTTESTTESTTEST", "Usage": 1234567}
        record["MnoName"] = "<i>Test Mobile</i>"
        with conn:
            conn.execute(
                "INSERT INTO cdrs(unique_id, ts_ms, iccid, usage, data, period_start_ns,"
                " period_end_ns) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (
                    record["UniqueID"],
                    now // 1_000_000,
                    "8981100000000000012",
                    1234567,
                    json.dumps(record),
                    now - 900 * 10**9,
                    now,
                ),
            )
            conn.execute(
                "INSERT INTO reports(name, task_id, token_sha256, file_name, path, size, lines,"
                " period_start_ns, period_end_ns, created_ns, valid_until_ns)"
                " VALUES ('daily', 1, ?, 'cdr-2026-01-01.zip', ?, 2048, 12, 0, 0, ?, ?)",
                (reports.token_digest("secret-link"), str(zip_path), now, now + 86400 * 10**9),
            )
    finally:
        conn.close()


def test_the_dashboard_shows_live_figures_and_replays_dead_letters_in_chromium(
    mosquitto: Broker, tmp_path: Path, gateway_proc, browser: Any
) -> None:
    from selenium.common.exceptions import StaleElementReferenceException
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    good, flaky = Receiver().start(), Receiver().start()
    # Markup in an error excerpt must show as text, never as HTML.
    flaky.behaviour = lambda n, r: Reply(400, text="<b>bad</b> request")
    # RSRP -95 dBm is fair, SINR 25 dB excellent: the grade is the worse of the two.
    radio = ["--radio", "rsrp -95", "--radio", "sinr 25"]
    modem = subprocess.Popen(
        [sys.executable, "-m", "firmware_sim", "modem", "--vendor", "quectel", "--pty", *radio],
        stdout=subprocess.PIPE,
        cwd=ROOT,
    )
    try:
        assert modem.stdout is not None
        pty = modem.stdout.readline().decode().strip()
        port = free_port()
        base = f"http://127.0.0.1:{port}"
        hooks = "".join(
            f'[[webhooks]]\nname = "{name}"\nurl = "{r.url}"\n'
            "batch = { window_ms = 200, max_items = 10 }\n"
            for name, r in (("cloud", good), ("flaky", flaky))
        )
        cfg = write_config(
            tmp_path / "gw.toml",
            mosquitto.port,
            tmp_path / "state",
            web=f'listen = "127.0.0.1:{port}"\ntoken = "{TOKEN}"\nsample_s = 0.5',
            extra=f'[modem]\nport = "{pty}"\npoll_interval_s = 1\ndata_budget_mb = 1\n\n{hooks}',
        )
        gw = gateway_proc(cfg)
        gw.start()
        wait_for(lambda: get(base + "/healthz")[0] == 200, 20, "the gateway to be healthy")
        wait_for(lambda: api_status(base)["gateway"]["mqtt"]["subscribed"], 10, "the SUBACK")
        add_cdr_and_report(tmp_path / "state" / "gateway.db", tmp_path / "r.zip")

        fleet = subprocess.run(
            [
                sys.executable,
                "-m",
                "firmware_sim",
                "fleet",
                "--broker",
                f"127.0.0.1:{mosquitto.port}",
                "--devices",
                "4",
                "--rate",
                "20",
                "--count",
                "15",
                "--encoding",
                "json",
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            timeout=60,
        )
        assert fleet.returncode == 0, fleet.stderr

        def settled() -> bool:
            hooks = {w["name"]: w for w in api_status(base)["webhooks"]}
            return hooks["cloud"]["delivered"] == 60 and hooks["flaky"]["dead_lettered"] == 60

        wait_for(settled, 20, "60 packets delivered to cloud and dead-lettered for flaky")

        # Sign in through the login page, as a person would.
        browser.get(base + "/")
        browser.find_element(By.ID, "token").send_keys(TOKEN)
        browser.find_element(By.ID, "sign-in").click()
        # The page redraws the webhook table every 3 s: an element found before a redraw
        # is stale after it. Waits try again; cell() reads in one call, holding nothing.
        wait = WebDriverWait(browser, 15, ignored_exceptions=[StaleElementReferenceException])
        wait.until(lambda d: d.find_element(By.TAG_NAME, "body").get_attribute("data-loaded"))

        def cell(hook: str, cls: str) -> str:
            sel = f'#webhooks tr[data-webhook="{hook}"] td.{cls}'
            text = browser.execute_script(
                "const e = document.querySelector(arguments[0]); return e && e.innerText.trim();",
                sel,
            )
            return str(text)

        def click(hook: str, button: str) -> None:
            """Click a row's button; a redraw between finding and clicking means again."""
            sel = f'#webhooks tr[data-webhook="{hook}"] button.{button}'
            wait.until(lambda d: d.find_element(By.CSS_SELECTOR, sel).click() or True)

        wait.until(lambda d: cell("cloud", "hits") == "60")
        assert cell("cloud", "delivered") == "60"
        assert cell("flaky", "hits") == "60"
        assert cell("flaky", "last-error") == "HTTP 400: <b>bad</b> request"
        assert not browser.find_elements(By.CSS_SELECTOR, "#webhooks td.last-error b")
        assert int(cell("flaky", "dead")) > 0
        assert cell("flaky", "state") == "dead letters"
        # Delivery lag: nothing pending; an old record reads as the CLI says it.
        assert cell("cloud", "behind") == "up to date"
        for seconds in (11520, 45, 0):
            text = browser.execute_script("return behind(arguments[0]);", seconds)
            assert text == status.behind_text(seconds)
        assert browser.execute_script("return behind(11520);") == "behind by 3 h 12 min"
        assert browser.find_element(By.ID, "received").text == "60"
        # The MQTT tag's tooltip names the session and its counts.
        mqtt_title = browser.find_element(By.ID, "mqtt").get_attribute("title")
        assert f"gw-test (pid {gw.proc.pid}): connected, 60 received" in mqtt_title
        # The throughput chart has drawn points (samples every 0.5 s).
        wait.until(lambda d: int(d.find_element(By.ID, "chart").get_attribute("data-points")) >= 3)
        line = browser.find_element(By.ID, "chart-delivered").get_attribute("points")
        assert len(line.split()) >= 3
        # The modem panel (from the emulator) and the CDR and report tables.
        wait.until(lambda d: d.find_element(By.ID, "modem-iccid").text.startswith("89"))
        assert browser.find_element(By.ID, "modem-operator").text == "NTT DOCOMO"
        assert browser.find_elements(By.CSS_SELECTOR, "#modem-bars span.on")
        wait.until(lambda d: d.find_element(By.ID, "modem-quality").text == "fair")
        assert "RSRP -95 dBm" in browser.find_element(By.ID, "modem-radio").text
        # The data budget's bar: the emulator's traffic against data_budget_mb = 1.
        assert " of 1.0 MB (" in browser.find_element(By.ID, "budget-text").text
        assert browser.find_element(By.ID, "budget").is_displayed()
        wait.until(
            lambda d: (
                float(
                    d.find_element(By.ID, "budget-fill").value_of_css_property("width").strip("px")
                )
                > 0
            )
        )
        recovery = browser.find_element(By.ID, "modem-recovery").text
        assert recovery == "idle; 0 of 2 resets this hour"
        cdr_text = browser.find_element(By.ID, "cdrs").text
        assert "CDR-TESTTESTTESTTESTTEST" in cdr_text
        assert "<i>Test Mobile</i>" in cdr_text
        assert "cdr-2026-01-01.zip" in browser.find_element(By.ID, "reports").text
        assert "secret-link" not in browser.page_source

        ARTIFACTS.mkdir(exist_ok=True)
        shot = ARTIFACTS / "dashboard.png"
        assert browser.save_screenshot(str(shot))
        print(f"\ndashboard screenshot: {shot}")

        # "Send test" reports the receiver's answer in the row.
        click("cloud", "test")
        wait.until(lambda d: "test: HTTP 200" in cell("cloud", "actions"))

        # Replay: the receiver now accepts, and gets every dead-lettered batch, same ids.
        db = tmp_path / "state" / "gateway.db"
        dead_ids = {str(r[0]) for r in db_rows(db, "SELECT webhook_id FROM dead_letters")}
        assert dead_ids
        flaky.behaviour = lambda n, r: Reply(200)
        click("flaky", "replay")
        wait.until(
            lambda d: f"re-queued {len(dead_ids)} dead letter(s)" in cell("flaky", "actions")
        )
        wait_for(
            lambda: {r.webhook_id for r in flaky.ok()} == dead_ids,
            20,
            "the replayed batches to reach the receiver",
        )
        assert len(flaky.delivered()) == 60
        wait.until(lambda d: cell("flaky", "dead") == "0" and cell("flaky", "delivered") == "60")
        shot = ARTIFACTS / "dashboard-after-replay.png"
        assert browser.save_screenshot(str(shot))
        print(f"dashboard screenshot after replay: {shot}")
        assert gw.terminate() == 0
    finally:
        good.stop()
        flaky.stop()
        modem.terminate()
        modem.wait(10)
        if modem.stdout:
            modem.stdout.close()

"""The status page in a real headless Chromium (Debian's `chromium`, driven by Playwright
through `executable_path`; `make test` installs it with apt-get when it is missing, and
Playwright never downloads a browser of its own).

Screenshots go to tests/artifacts/ (git-ignored); docs/status-page.png in the README is a
copy of tests/artifacts/status-page.png.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from playwright.async_api import Browser, ConsoleMessage, Page, async_playwright

from tests.conftest import MakeProxy, MakeSim, RunningProxy, chat_body, proxy_config

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu",
                 "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"
ADMIN = "adm-key-for-the-browser"
#: How long the page may take to show something (generous: a loaded 2-core machine).
WAIT_MS = 10_000


@pytest.fixture
async def browser() -> AsyncIterator[Browser]:
    assert Path(CHROMIUM).exists(), "Debian's chromium is missing: run `make test` (it " \
                                    "installs it) or apt-get install chromium"
    async with async_playwright() as playwright:
        browser = await playwright.chromium.launch(executable_path=CHROMIUM,
                                                   args=CHROMIUM_ARGS, headless=True)
        yield browser
        await browser.close()


async def open_page(browser: Browser) -> tuple[Page, list[str]]:
    """A page 1400 px wide, and the list its console errors and uncaught errors go to
    (a Content-Security-Policy violation is one)."""
    page = await browser.new_page(viewport={"width": 1400, "height": 1000})
    errors: list[str] = []

    def on_console(message: ConsoleMessage) -> None:
        if message.type == "error":
            errors.append(message.text)

    page.on("console", on_console)
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    return page, errors


async def chat(proxy: RunningProxy, **kw: Any) -> aiohttp.ClientResponse:
    async with aiohttp.ClientSession() as http, http.post(
            f"{proxy.base_url}/chat/completions", json=chat_body(**kw)) as resp:
        await resp.read()
        return resp


async def login(page: Page, proxy: RunningProxy) -> None:
    await page.goto(f"{proxy.url}/ui")
    await page.locator("#login-key").fill(ADMIN)
    await page.locator("#login-form button").click()


async def test_status_page_shows_instances_a_live_failover_and_its_attempts(
        make_sim: MakeSim, make_proxy: MakeProxy, browser: Browser) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    primary, secondary = await make_sim("demo-model"), await make_sim("demo-model")
    cloud = await make_sim("demo-cloud")
    proxy = await make_proxy(proxy_config(
        [primary, secondary, cloud], local=[True, True, False],
        models={"cloud-only": {"instances": ["p2:s2"]}},
        server={"admin_key": ADMIN}, health={"interval_s": 0.5}))
    page, errors = await open_page(browser)
    await login(page, proxy)

    # Every instance, probed READY, with its circuit, load and fingerprint.
    rows = page.locator("#instances tbody tr")
    for instance in ("p0:s0", "p1:s1", "p2:s2"):
        row = page.locator(f'#instances tr[data-id="{instance}"]')
        await row.locator(".state-READY").wait_for(timeout=WAIT_MS)
        assert await row.locator("td").nth(2).inner_text() == "closed"
    assert await rows.count() == 3
    fingerprint = await page.locator('#instances tr[data-id="p0:s0"] td').nth(5).inner_text()
    assert fingerprint == "demo-model"
    await page.locator("#live.on").wait_for(timeout=WAIT_MS)  # the event stream is open

    # A failover: the primary answers 500 (retried once), the secondary answers.
    primary.set_faults(["status=500"])
    resp = await chat(proxy)
    answered = time.monotonic()
    assert resp.status == 200 and resp.headers["x-route-instance"] == "p1:s1"
    request_id = resp.headers["x-request-id"]
    entry = page.locator(f'#timeline li[data-type="REROUTED"][data-request="{request_id}"]')
    await entry.wait_for(timeout=WAIT_MS)
    shown_after_s = time.monotonic() - answered
    assert await entry.get_attribute("data-reason") == "UPSTREAM_5XX"
    assert "p0:s0" in await entry.inner_text() and "p1:s1" in await entry.inner_text()

    # The request view, opened from the timeline: the plan, every attempt, who answered.
    await entry.locator(".request-link").click()
    attempts = page.locator("#request-view tr[data-attempt]")
    await attempts.first.wait_for(timeout=WAIT_MS)
    codes = [await attempts.nth(n).get_attribute("data-code") for n in range(await attempts.count())]
    assert codes == ["UPSTREAM_5XX", "UPSTREAM_5XX", "ok"]
    assert "answered by p1:s1" in await page.locator("#request-view .story p").first.inner_text()
    candidates = page.locator("#request-view tr[data-candidate]")
    assert await candidates.first.get_attribute("data-candidate") == "p0:s0"

    # The tallies count the request and the reroute (polled every 2 s).
    await page.locator("#c-requests", has_text="1").wait_for(timeout=WAIT_MS)
    await page.locator("#c-reasons", has_text="UPSTREAM_5XX 1").wait_for(timeout=WAIT_MS)

    # A stream cut mid-answer, replayed on the twin: a resumed stream on the timeline.
    # (The secondary answers now: the primary's recent errors cost it score.)
    primary.set_faults([])
    secondary.set_faults(["die_after=3"])
    resp = await chat(proxy, stream=True)
    assert resp.status == 200 and resp.headers["x-route-instance"] == "p1:s1"
    resumed = page.locator(f'#timeline li[data-type="STREAM_RESUMED"]'
                           f'[data-request="{resp.headers["x-request-id"]}"]')
    await resumed.wait_for(timeout=WAIT_MS)
    assert "p1:s1 → p0:s0 (replay" in await resumed.inner_text()
    await page.locator("#c-resumed", has_text="1").wait_for(timeout=WAIT_MS)

    # Drain from the page: the instance is DRAINED, the change is on the timeline; then
    # enable it again.
    await page.locator('#instances tr[data-id="p2:s2"] button.drain').click()
    await page.locator('#instances tr[data-id="p2:s2"] .state-DRAINED').wait_for(timeout=WAIT_MS)
    await page.locator('#timeline li[data-type="INSTANCE_STATE_CHANGED"]',
                       has_text="drained by admin").wait_for(timeout=WAIT_MS)
    assert (await chat(proxy, model="cloud-only")).status == 503  # its one instance drained
    await page.locator('#timeline li[data-type="ROUTE_BLOCKED"]').wait_for(timeout=WAIT_MS)
    await page.locator("#c-blocked", has_text="1").wait_for(timeout=WAIT_MS)
    await page.locator("#c-requests", has_text="3").wait_for(timeout=WAIT_MS)
    await page.screenshot(path=str(ARTIFACTS / "status-page.png"), full_page=True)
    await page.locator('#instances tr[data-id="p2:s2"] button.enable').click()
    await page.locator('#instances tr[data-id="p2:s2"] .state-READY').wait_for(timeout=WAIT_MS)
    (ARTIFACTS / "status-page-timings.json").write_text(json.dumps(
        {"failover_on_timeline_after_s": round(shown_after_s, 3)}))
    # (the page's first look, before the key was given, was refused: the browser logs it)
    assert [e for e in errors if "401 (Unauthorized)" not in e] == []


async def test_status_page_asks_for_the_admin_key_and_keeps_it_in_the_tab_only(
        make_sim: MakeSim, make_proxy: MakeProxy, browser: Browser) -> None:
    ARTIFACTS.mkdir(exist_ok=True)
    sim = await make_sim()
    proxy = await make_proxy(proxy_config([sim], server={"admin_key": ADMIN}))
    page, errors = await open_page(browser)
    await page.goto(f"{proxy.url}/ui")
    await page.locator("#login").wait_for(timeout=WAIT_MS)
    assert await page.locator("#main").is_hidden()
    await page.locator("#login-key").fill("not-the-key")
    await page.locator("#login-form button").click()
    await page.locator("#login-error", has_text="Incorrect admin key").wait_for(timeout=WAIT_MS)
    await page.screenshot(path=str(ARTIFACTS / "status-page-login.png"))
    await page.locator("#login-key").fill(ADMIN)
    await page.locator("#login-form button").click()
    await page.locator('#instances tr[data-id="p0:s0"]').wait_for(timeout=WAIT_MS)
    stored = await page.evaluate("[sessionStorage.length, localStorage.length, document.cookie]")
    assert stored == [1, 0, ""]
    await page.locator("#logout").click()
    await page.locator("#login").wait_for(timeout=WAIT_MS)
    assert await page.evaluate("sessionStorage.length") == 0
    # the 401s of the wrong key are the only console errors (the browser logs them)
    assert all("401" in e for e in errors), errors

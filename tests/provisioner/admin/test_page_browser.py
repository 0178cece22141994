"""The status page in a real headless Chromium, against the app served by uvicorn.

The provider's numbers change while the page is open; the page must show the new values.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from provisioner.admin import AdminServer, create_app, serve_admin, stop_admin
from tests.provisioner.admin.browser import bar_fractions, line_points, save_screenshot
from tests.provisioner.admin.provider import FleetProvider, populated
from tests.support import CHROMIUM_ARGS, require_binary

pytestmark = pytest.mark.integration

TOKEN = "browser-test-token-0123456789"


@pytest.fixture
async def served() -> AsyncIterator[tuple[FleetProvider, AdminServer]]:
    provider = populated()
    server, task = await serve_admin(create_app(provider, token=TOKEN), "127.0.0.1", 0)
    try:
        yield provider, server
    finally:
        await stop_admin(server, task)


async def test_status_page_shows_live_counts(
    served: tuple[FleetProvider, AdminServer], tmp_path: Path
) -> None:
    chromium = require_binary("chromium", "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    provider, server = served
    base = f"http://127.0.0.1:{server.port}"
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            await page.goto(f"{base}/#token={TOKEN}&interval=250")

            await expect(page.locator("#count-provisioned")).to_have_text("5")
            await expect(page.locator("#count-failed")).to_have_text("2")
            await expect(page.locator("#count-total")).to_have_text("10")
            await expect(page.locator("#queue-waiting")).to_have_text("3")
            await expect(page.locator("#leader")).to_have_text("leader")
            await expect(page.locator("#overlay-count-eu-1")).to_have_text("15000 / 20000")
            failures = page.locator("#failures-body tr")
            await expect(failures).to_have_count(2)
            # remote text is shown as text, not markup
            await expect(page.locator("#failures-body")).to_contain_text("rpc timeout: <jwt>")
            # the token left the address bar
            assert TOKEN not in page.url

            # the fleet moves on: the page follows without a reload
            for i in range(10, 14):
                provider.add(f"node-{i:05d}.fleet.example.net", "provisioned")
            provider.add("node-00099.fleet.example.net", "failed", error="CSR CN mismatch")
            provider.overlays["eu-1"]["count"] = 15004
            provider.paused = True
            await expect(page.locator("#count-provisioned")).to_have_text("9")
            await expect(page.locator("#count-failed")).to_have_text("3")
            await expect(page.locator("#count-total")).to_have_text("15")
            await expect(page.locator("#overlay-count-eu-1")).to_have_text("15004 / 20000")
            await expect(page.locator("#paused")).to_have_text("paused")
            await expect(page.locator("#failures-body")).to_contain_text("CSR CN mismatch")
            await _check_drawing(page, provider, tmp_path)

            # the resume button drives the API with the token
            await page.click("#resume-button")
            await expect(page.locator("#paused")).to_have_text("running")
            assert provider.calls[-1] == "resume" and provider.paused is False
            assert errors == []
        finally:
            await browser.close()


async def test_status_page_login_field(served: tuple[FleetProvider, AdminServer]) -> None:
    chromium = require_binary("chromium", "apt-get install chromium")
    from playwright.async_api import async_playwright, expect

    _, server = served
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.goto(f"http://127.0.0.1:{server.port}/#interval=250")
            await expect(page.locator("#login")).to_be_visible()
            await page.fill("#token-input", "wrong-token")
            await page.click("#login-button")
            await expect(page.locator("#error")).to_contain_text("unauthorized")
            await expect(page.locator("#count-total")).to_have_text("-")
            await page.fill("#token-input", TOKEN)
            await page.click("#login-button")
            await expect(page.locator("#count-total")).to_have_text("10")
            await expect(page.locator("#login")).to_be_hidden()
            await expect(page.locator("#error")).to_be_hidden()
        finally:
            await browser.close()


async def _check_drawing(page: Any, provider: FleetProvider, tmp_path: Path) -> None:
    """The throughput line and the overlay fill bars are drawn from the API's numbers."""
    from playwright.async_api import expect

    # 9 nodes provisioned within the 30 s window of 1 s intervals: one point per interval.
    await expect(page.locator("#throughput-total")).to_have_text("9")
    await expect(page.locator("#throughput-line")).to_have_attribute("data-count", "30")
    points = await line_points(page)
    assert len(points) == 30
    xs = [x for x, _ in points]
    assert xs == sorted(xs) and xs[0] == 40.0 and xs[-1] == 600.0
    series = provider.throughput.series()["points"]
    peak = max(p["count"] for p in series)
    await expect(page.locator("#throughput-peak")).to_have_text(str(peak))
    # the highest interval touches the top of the chart, empty ones lie on the axis
    assert min(y for _, y in points) == 10.0
    assert max(y for _, y in points) == 120.0
    # the bars follow the fill, including a new overlay, without a reload
    provider.overlays["eu-3"] = {"count": 3, "capacity": 12, "state": "active"}
    await expect(page.locator("#overlay-bar-eu-3")).to_have_attribute("data-fill", "0.25")
    bars = await bar_fractions(page)
    widths = {name: bar["width"] for name, bar in bars.items()}
    assert widths["eu-1"] == pytest.approx(15004 / 20000, abs=0.01)
    assert widths["eu-2"] == pytest.approx(1.0, abs=0.01)
    assert widths["eu-3"] == pytest.approx(0.25, abs=0.01)
    assert widths["empty"] == pytest.approx(0.0, abs=0.01)
    # the line moves on as more nodes are provisioned
    for i in range(20, 26):
        provider.add(f"node-{i:05d}.fleet.example.net", "provisioned")
    await expect(page.locator("#throughput-total")).to_have_text("15")
    shot = await save_screenshot(page, tmp_path, "status-page")
    print(f"status page screenshot: {shot}")


async def test_hostile_overlay_names_are_drawn_as_text_and_fetch_nothing(
    served: tuple[FleetProvider, AdminServer], tmp_path: Path
) -> None:
    """An overlay name comes from a helper or the overlays file: markup in it stays text, its
    bar is still drawn, and the page asks no other site for anything."""
    chromium = require_binary("chromium", "apt-get install chromium")
    from playwright.async_api import Route, async_playwright, expect

    provider, server = served
    hostile = '<img src="http://evil.example/x.png" onerror="window.pwned=1">'
    provider.overlays = {hostile: {"count": 5, "capacity": 10, "state": "active<b>"}}
    requested: list[str] = []

    async def record(route: Route) -> None:
        requested.append(route.request.url)
        if route.request.url.startswith(f"http://127.0.0.1:{server.port}/"):
            await route.continue_()
        else:
            await route.abort()

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            page = await browser.new_page()
            await page.route("**/*", record)
            await page.goto(f"http://127.0.0.1:{server.port}/#token={TOKEN}&interval=250")
            body = page.locator("#overlays-body")
            await expect(body).to_contain_text(hostile)
            await expect(body).to_contain_text("active<b>")
            assert await page.locator("#overlays-body img, #overlays-body b").count() == 0
            assert await page.evaluate("() => window.pwned") is None
            bars = await bar_fractions(page)
            assert [bar["width"] for bar in bars.values()] == [pytest.approx(0.5, abs=0.01)]
            await save_screenshot(page, tmp_path, "status-page-hostile-overlay")
        finally:
            await browser.close()
    others = [u for u in requested if not u.startswith(f"http://127.0.0.1:{server.port}/")]
    assert others == [], others

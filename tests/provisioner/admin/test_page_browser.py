"""The status page in a real headless Chromium, against the app served by uvicorn.

The provider's numbers change while the page is open; the page must show the new values.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from provisioner.admin import AdminServer, create_app, serve_admin, stop_admin
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
    served: tuple[FleetProvider, AdminServer],
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

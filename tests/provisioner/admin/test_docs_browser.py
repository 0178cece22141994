"""Issue 19 item 1: ``/docs`` works offline.

A real headless Chromium loads ``/docs`` from the app served by uvicorn with every request to
another origin aborted; the page must list the API's operations, and no request to another
origin may even be attempted (a CDN script, a font, the online validator badge).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import pytest

from provisioner.admin import AdminServer, create_app, serve_admin, stop_admin
from tests.provisioner.admin.provider import populated
from tests.support import CHROMIUM_ARGS, require_binary

pytestmark = pytest.mark.integration

TOKEN = "docs-test-token-0123456789"
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1"}


@pytest.fixture
async def server() -> AsyncIterator[AdminServer]:
    server, task = await serve_admin(create_app(populated(), token=TOKEN), "127.0.0.1", 0)
    try:
        yield server
    finally:
        await stop_admin(server, task)


async def test_docs_page_lists_operations_with_the_network_blocked(server: AdminServer) -> None:
    chromium = require_binary("chromium", "apt-get install chromium")
    from playwright.async_api import Route, async_playwright, expect

    base = f"http://127.0.0.1:{server.port}"
    requested: list[str] = []
    blocked: list[str] = []
    console: list[str] = []

    async def only_local(route: Route) -> None:
        url = route.request.url
        requested.append(url)
        parts = urlsplit(url)
        if parts.scheme in ("data", "blob") or parts.hostname in LOCAL_HOSTS:
            await route.continue_()
        else:
            blocked.append(url)
            await route.abort("internetdisconnected")

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
        try:
            context = await browser.new_context()
            await context.route("**/*", only_local)
            page = await context.new_page()
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.on("console", lambda msg: console.append(f"{msg.type}: {msg.text}"))
            response = await page.goto(f"{base}/docs")
            assert response is not None and response.status == 200
            csp = response.headers["content-security-policy"]
            assert "script-src 'self';" in csp and "connect-src 'self';" in csp
            assert "unsafe-inline" not in csp and "unsafe-eval" not in csp

            operations = page.locator(".opblock")
            await expect(operations.first).to_be_visible(timeout=20_000)
            paths = [
                (await p.text_content() or "").replace("\u200b", "").strip()
                for p in await page.locator(".opblock-summary-path").all()
            ]
            for path in (
                "/api/v1/status",
                "/api/v1/nodes",
                "/api/v1/nodes/{identity}",
                "/api/v1/pause",
                "/api/v1/resume",
                "/api/v1/discover",
                "/api/v1/audit",
                "/api/v1/overlays",
                "/healthz",
                "/metrics",
            ):
                assert path in paths, (path, paths)
            await expect(page.locator(".opblock-get").first).to_be_visible()
            await expect(page.locator(".opblock-post").first).to_be_visible()
            await expect(page.locator(".btn.authorize")).to_be_visible()
            # Expand one operation: still nothing fetched from elsewhere.
            await page.locator(".opblock-summary-path", has_text="/api/v1/status").click()
            await expect(page.locator(".opblock.is-open")).to_have_count(1)
            assert errors == []
        finally:
            await browser.close()

    assert blocked == [], f"requests to other origins were attempted: {blocked}"
    assert any(u.endswith("/static/swagger-ui-bundle.js") for u in requested), requested
    assert any(u.endswith("/openapi.json") for u in requested), requested
    assert not [c for c in console if "Content Security Policy" in c], console
    assert not [c for c in console if c.startswith("error")], console


async def test_the_docs_assets_are_local_and_redoc_is_gone(server: AdminServer) -> None:
    import httpx

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{server.port}") as client:
        page = await client.get("/docs")
        assert page.status_code == 200
        assert "http" not in page.text  # no absolute URL at all: nothing from another site
        for name in ("swagger-ui-bundle.js", "swagger-ui.css", "docs.js"):
            asset = await client.get(f"/static/{name}")
            assert asset.status_code == 200 and len(asset.content) > 100, name
            assert b"sourceMappingURL" not in asset.content[-300:]
        assert (await client.get("/redoc")).status_code == 404
        assert (await client.get("/docs/oauth2-redirect")).status_code == 404
        assert (await client.get("/static/..%2Fapp.py")).status_code == 404
        assert (await client.get("/openapi.json")).status_code == 200

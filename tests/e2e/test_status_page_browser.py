"""Issues 8 and 19: the status page while a demo fleet provisions: counts change, it draws.

The whole demo runs in this test's event loop (real nats-servers, callout, CA, helper,
provisioner with its admin API, simulated nodes started gradually); a real headless Chromium
loads the status page and reads the provisioned count as it grows, then checks the throughput
line (from the provisioner's own ring buffer) and the overlay fill bars, and saves a screenshot
(``status-page-demo.png`` in the test's tmp_path and in ``TEST_ARTIFACTS_DIR`` when set).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import pytest

from testbed.demo import Demo, DemoOptions
from tests.e2e.support import processes_mentioning, require_nats_server
from tests.provisioner.admin.browser import bar_fractions, line_points, save_screenshot
from tests.support import CHROMIUM_ARGS, require_binary

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODES = 60
START_RATE = 15.0  # nodes/s: provisioning takes ~4 s, long enough to watch


async def test_status_page_counts_change_while_a_demo_fleet_provisions(tmp_path: Path) -> None:
    chromium = require_binary("chromium", "apt-get install chromium")
    require_nats_server()
    from playwright.async_api import async_playwright, expect

    demo = Demo(DemoOptions(nodes=NODES, start_rate=START_RATE, workdir=tmp_path / "demo"))
    run_task: asyncio.Task[None] | None = None
    try:
        await demo.start()
        async with async_playwright() as pw:
            browser = await pw.chromium.launch(executable_path=chromium, args=CHROMIUM_ARGS)
            try:
                page = await browser.new_page()
                errors: list[str] = []
                page.on("pageerror", lambda exc: errors.append(str(exc)))
                await page.goto(f"{demo.status_page_url}&interval=250")
                count = page.locator("#count-provisioned")
                await expect(count).to_have_count(1, timeout=10_000)
                run_task = asyncio.create_task(demo.run())

                seen: list[int] = []
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    text = (await count.text_content() or "").strip()
                    if text.isdigit() and (not seen or int(text) != seen[-1]):
                        seen.append(int(text))
                    if seen and seen[-1] == NODES:
                        break
                    await asyncio.sleep(0.1)

                assert seen, "the page never showed a provisioned count"
                assert seen[-1] == NODES, f"the page showed {seen}"
                intermediate = [v for v in seen if 0 < v < NODES]
                assert intermediate, f"no intermediate count seen, only {seen}"
                assert seen == sorted(seen), f"the count went down: {seen}"
                assert len(set(seen)) >= 3
                await expect(page.locator("#count-failed")).to_have_text("0")
                # the overlay table follows too: the counts shown add up to the fleet
                cells = page.locator("[id^=overlay-count-]")
                await expect(cells.first).to_be_visible()
                shown = [(await c.text_content() or "0 /").split("/")[0] for c in await cells.all()]
                assert sum(int(s) for s in shown) == NODES
                assert demo.admin_token not in page.url
                await _check_drawing(page, tmp_path)
                assert not errors, errors
            finally:
                await browser.close()

        await run_task
        result = await demo.verify()
        assert result.ok, result.problems[:5]
    finally:
        if run_task is not None and not run_task.done():
            run_task.cancel()
        await demo.close()
    assert not processes_mentioning(str(tmp_path / "demo"), "nats-server")


async def _check_drawing(page: Any, tmp_path: Path) -> None:
    """The whole fleet is on the throughput line; each bar is as wide as its overlay's fill."""
    from playwright.async_api import expect

    await expect(page.locator("#throughput-total")).to_have_text(str(NODES))
    points = await line_points(page)
    assert len(points) == 60  # 10 s intervals over 10 minutes
    assert min(y for _, y in points) == 10.0  # the busiest interval reaches the top
    assert any(y < 120.0 for _, y in points[-3:])  # ... and it is a recent one
    assert await page.locator("#throughput-peak").text_content() != "0"
    bars = await bar_fractions(page)
    api = await page.evaluate(
        """async () => (await (await fetch("/api/v1/overlays", {headers: {Authorization:
            "Bearer " + sessionStorage.getItem("provisioner-admin-token")}})).json()).overlays"""
    )
    fills = {ov["name"]: ov["fill"] for ov in api}
    assert set(bars) == set(fills) and bars
    for name, bar in bars.items():
        assert bar["fill"] == pytest.approx(fills[name]), name
        assert bar["width"] == pytest.approx(min(1.0, fills[name]), abs=0.01), (name, bar)
    assert any(bar["width"] > 0 for bar in bars.values())
    shot = await save_screenshot(page, tmp_path, "status-page-demo")
    print(f"status page screenshot: {shot}")

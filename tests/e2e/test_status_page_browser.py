"""Issue 8: loads the status page while a demo fleet provisions and sees the counts change.

The whole demo runs in this test's event loop (real nats-servers, callout, CA, helper,
provisioner with its admin API, simulated nodes started gradually); a real headless Chromium
loads the status page and reads the provisioned count as it grows.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from testbed.demo import Demo, DemoOptions
from tests.e2e.support import processes_mentioning, require_nats_server
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

"""Shared checks for the status page in a real browser: the drawn chart and bars, screenshots.

Screenshots go to the test's ``tmp_path`` and, when ``TEST_ARTIFACTS_DIR`` is set (CI keeps
that directory as a build artifact), are copied there too.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any


async def save_screenshot(page: Any, tmp_path: Path, name: str) -> Path:
    """A full-page PNG of ``page`` as ``<tmp_path>/<name>.png`` (and in TEST_ARTIFACTS_DIR)."""
    path = tmp_path / f"{name}.png"
    await page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000
    target = os.environ.get("TEST_ARTIFACTS_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)
    return path


async def line_points(page: Any) -> list[tuple[float, float]]:
    """The throughput line's points as drawn (SVG user units; y grows downwards)."""
    raw = await page.locator("#throughput-line").get_attribute("points") or ""
    out = []
    for pair in raw.split():
        x, y = pair.split(",")
        out.append((float(x), float(y)))
    return out


async def bar_fractions(page: Any) -> dict[str, dict[str, float]]:
    """Overlay name → ``{"width": drawn fill width / bar width, "fill": the bar's data-fill}``.

    Measured from the layout in one evaluation: the page redraws its rows on every poll.
    """
    measured: dict[str, dict[str, float]] = await page.evaluate(
        """() => {
            const out = {};
            for (const bar of document.querySelectorAll("[id^=overlay-bar-]")) {
                const outer = bar.getBoundingClientRect().width;
                const inner = bar.firstElementChild.getBoundingClientRect().width;
                out[bar.id.slice("overlay-bar-".length)] = {
                    width: outer > 0 ? inner / outer : -1,
                    fill: Number(bar.dataset.fill),
                };
            }
            return out;
        }"""
    )
    return measured

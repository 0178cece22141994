"""Render the provisioner's profile (``--profile pyinstrument|cprofile``) after it stopped."""

from __future__ import annotations

import asyncio
import pstats
import subprocess
import sys
from pathlib import Path

from testbed.bench.results import pstats_top

__all__ = ["render_profile"]

#: (renderer, file suffix, extra arguments) of ``pyinstrument --load``.
_PYINSTRUMENT_RENDERS: tuple[tuple[str, str, list[str]], ...] = (
    ("text", ".txt", ["--show-all", "-p", "processor_options.filter_threshold=0.005"]),
    ("html", ".html", []),
    ("pstats", ".pstats", []),
)


async def render_profile(profiler: str, profile_out: Path | None) -> dict[str, str]:
    """Text (and html) renderings of the profile at ``profile_out``; returns the paths and the
    top functions by own time (``top``)."""
    out: dict[str, str] = {}
    if profile_out is None or not await asyncio.to_thread(profile_out.exists):
        return out
    if profiler == "pyinstrument":
        for renderer, suffix, extra in _PYINSTRUMENT_RENDERS:
            target = profile_out.with_suffix(suffix)
            cmd = [sys.executable, "-m", "pyinstrument", "--load", str(profile_out),
                   "-r", renderer, *extra, "-o", str(target)]  # fmt: skip
            await asyncio.to_thread(subprocess.run, cmd, capture_output=True, timeout=600)
            if target.exists():
                out[renderer] = str(target)
        if "pstats" in out:
            out["top"] = await asyncio.to_thread(pstats_top, Path(out["pstats"]))
    else:
        target = profile_out.with_suffix(".txt")
        with target.open("w") as fh:
            stats = pstats.Stats(str(profile_out), stream=fh)
            stats.sort_stats("cumulative").print_stats(60)
            stats.sort_stats("tottime").print_stats(60)
        out["text"] = str(target)
        out["top"] = await asyncio.to_thread(pstats_top, profile_out)
    out["raw"] = str(profile_out)
    return out

"""`provisioner fleet` commands: simulate a fleet of unprovisioned Choria nodes.

Exit codes: 0 when the fleet ran (with ``--until-provisioned``: every node reached normal
mode); 1 when ``--until-provisioned`` timed out first; 2 on bad options.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.console import Console
from rich.live import Live
from rich.table import Table

from provisioner.cli._exit import EXIT_FAILED

if TYPE_CHECKING:
    from testbed.fleet import Fleet

app = typer.Typer(help="Simulate a fleet of unprovisioned nodes.", no_args_is_help=True)


def _table(counts: dict[str, int], elapsed: float, rss: int) -> Table:
    table = Table(title=f"fleet after {elapsed:.1f}s (RSS {rss / 1e6:.0f} MB)")
    for key in ("total", "starting", "provisioning", "normal", "stopped", "failed"):
        table.add_column(key, justify="right")
    table.add_row(
        *(
            str(counts.get(k, 0))
            for k in ("total", "starting", "provisioning", "normal", "stopped", "failed")
        )
    )
    return table


@app.command("simulate")
def simulate(
    nodes: int = typer.Option(..., "--nodes", min=1, help="Number of simulated nodes."),
    jwt: Path = typer.Option(..., "--jwt", help="Provisioning token file shared by all nodes."),
    processes: int = typer.Option(1, "--processes", min=1, help="OS processes to spread over."),
    seed: int = typer.Option(0, "--seed", help="Seed of the synthetic facts."),
    key_type: str = typer.Option("ec", "--key-type", help="rsa (go-choria default) or ec."),
    key_pool: bool = typer.Option(
        False, "--key-pool/--no-key-pool", help="Pre-generate keys into <workdir>/keypool."
    ),
    connections: str = typer.Option(
        "per-node", "--connections", help="per-node (real) or shared (big benchmarks only)."
    ),
    until_provisioned: bool = typer.Option(
        False, "--until-provisioned", help="Exit once every node is in normal mode."
    ),
    timeout: float = typer.Option(
        0.0,
        "--timeout",
        help="With --until-provisioned: fail after this many seconds; else run this long "
        "(0 = until Ctrl-C).",
    ),
    broker_url: list[str] = typer.Option(
        [], "--broker-url", help="Override the token's broker URLs (repeatable)."
    ),
    workdir: Path | None = typer.Option(
        None, "--workdir", help="Node state and key pool (default: a new temp directory)."
    ),
    start_index: int = typer.Option(0, "--start-index", help="Index of the first node."),
    restart_delay_scale: float = typer.Option(
        1.0, "--restart-delay-scale", help="Scale restart delays (tests and demos).", hidden=True
    ),
    json_summary: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Run N nodes with synthetic identities and facts; live counts, then a summary."""
    # The simulator loads only when the command runs: `provisioner --help` stays fast.
    from testbed.fleet import Fleet

    logging.basicConfig(level=logging.WARNING)
    if key_type not in ("rsa", "ec"):
        raise typer.BadParameter("use rsa or ec", param_hint="--key-type")
    if connections not in ("per-node", "shared"):
        raise typer.BadParameter("use per-node or shared", param_hint="--connections")
    if not jwt.is_file():
        raise typer.BadParameter(f"{jwt} does not exist", param_hint="--jwt")
    work = workdir or Path(tempfile.mkdtemp(prefix="fleet-"))
    fleet = Fleet(
        nodes,
        jwt,
        broker_url or None,
        work,
        seed=seed,
        key_type="rsa" if key_type == "rsa" else "ec",
        processes=processes,
        connections="shared" if connections == "shared" else "per-node",
        key_pool=key_pool,
        start_index=start_index,
        restart_delay_scale=restart_delay_scale,
    )
    ok = asyncio.run(_run(fleet, until_provisioned, timeout, json_summary))
    if not ok:
        raise typer.Exit(EXIT_FAILED)


async def _run(fleet: Fleet, until_provisioned: bool, timeout: float, as_json: bool) -> bool:
    console = Console(stderr=as_json)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    began = time.monotonic()
    await fleet.start()
    started_in = time.monotonic() - began
    peak_rss = fleet.rss_bytes()
    ok = True
    with Live(_table(fleet.counts(), 0, peak_rss), console=console, refresh_per_second=4) as live:
        while not stop.is_set():
            counts = fleet.counts()
            elapsed = time.monotonic() - began
            peak_rss = max(peak_rss, fleet.rss_bytes())
            live.update(_table(counts, elapsed, peak_rss))
            if until_provisioned and counts["normal"] >= fleet.nodes:
                break
            if timeout and elapsed >= timeout:
                ok = not until_provisioned
                break
            try:
                await asyncio.wait_for(stop.wait(), 0.25)
            except TimeoutError:
                pass
    counts = fleet.counts()
    await fleet.stop()
    summary = {
        "nodes": fleet.nodes,
        "normal": counts["normal"],
        "provisioning": counts["provisioning"],
        "failed": counts["failed"],
        "started_in_s": round(started_in, 2),
        "elapsed_s": round(time.monotonic() - began, 2),
        "peak_rss_mb": round(peak_rss / 1e6, 1),
        "ok": ok,
    }
    if as_json:
        print(json.dumps(summary))
    else:
        console.print(
            f"summary: {summary['normal']}/{summary['nodes']} nodes reached normal mode, "
            f"{summary['provisioning']} still provisioning, {summary['failed']} failed; "
            f"started in {summary['started_in_s']}s, peak RSS {summary['peak_rss_mb']} MB"
        )
        if not ok:
            console.print(f"timed out after {timeout}s before every node was provisioned")
    return ok

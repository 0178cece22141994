"""``provisioner demo``: provision a simulated fleet end to end on this machine.

Everything runs on 127.0.0.1 from a fresh work directory (see :mod:`testbed.demo`); the
command shows live progress, then a summary it has verified. ``--json`` ends the output with
one line holding a JSON object (the only thing written to stdout in that mode). The exit code
is 0 only if every node was provisioned, its certificate verified and it is connected to its
overlay's broker; 1 if not, or if a part could not start; 2 on bad options; 130 after Ctrl-C
(or SIGTERM), which stops everything the demo started.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer
from rich.console import Console, Group
from rich.live import Live
from rich.table import Table
from rich.text import Text

from provisioner.cli._exit import EXIT_FAILED, EXIT_OK, EXIT_USAGE

if TYPE_CHECKING:
    from testbed.demo import Demo, DemoOptions, DemoResult

EXIT_INTERRUPTED = 130
#: ``testbed.demo.DEFAULT_NODES`` (the option default, without importing the demo for --help)
DEFAULT_NODES = 250


def _progress_view(snap: dict[str, Any], nodes: int) -> Group:
    states: dict[str, int] = snap["states"]
    fleet: dict[str, int] = snap["fleet"]
    head = Table.grid(padding=(0, 2))
    for _ in range(6):
        head.add_column(justify="right")
    head.add_row("discovered", "in flight", "provisioned", "deferred", "failed", "normal mode")
    head.add_row(
        f"{snap['discovered']}/{nodes}",
        str(snap["in_flight"]),
        Text(str(states.get("provisioned", 0)), style="bold green"),
        Text(str(states.get("deferred", 0)), style="yellow" if states.get("deferred") else ""),
        Text(str(states.get("failed", 0)), style="bold red" if states.get("failed") else ""),
        f"{fleet.get('normal', 0)}/{nodes}",
    )
    table = Table(title=None, expand=False, box=None, padding=(0, 2))
    table.add_column("overlay")
    table.add_column("broker")
    table.add_column("provisioned", justify="right")
    for name, info in sorted(snap["overlays"].items()):
        table.add_row(name, info.get("url", ""), str(info["count"]))
    title = Text(f"provisioning {nodes} nodes  {snap['elapsed']:.1f}s", style="bold")
    return Group(title, head, Text(""), table)


def _print_summary(console: Console, demo: Demo, result: DemoResult) -> None:
    ok, bad = "[green]✓[/green]", "[red]✗[/red]"
    n = result.nodes
    console.print()
    console.rule("[bold]Verified summary")
    table = Table(box=None, padding=(0, 2))
    table.add_column("overlay")
    table.add_column("broker")
    table.add_column("nodes", justify="right")
    table.add_column("connected (mTLS)" if result.tls else "connected", justify="right")
    by_overlay: dict[str, int] = {}
    for chk in result.checks:
        if chk.connected_ok and chk.overlay:
            by_overlay[chk.overlay] = by_overlay.get(chk.overlay, 0) + 1
    for name, ob in demo.overlay_brokers.items():
        table.add_row(name, ob.url, str(result.overlays.get(name, 0)), str(by_overlay.get(name, 0)))
    console.print(table)
    console.print()
    console.print(
        f"{ok if result.provisioned == n else bad} provisioned    {result.provisioned}/{n}"
        f"  (failed {result.failed}, deferred {result.deferred})"
    )
    console.print(
        f"{ok if result.verified == n else bad} certificates   {result.verified}/{n} verified "
        "in each node's ssldir on disk:"
    )
    console.print("                 signed by the CA, CN = SAN = identity, matches private.pem")
    console.print(
        f"{ok if result.connected == n else bad} normal mode    {result.connected}/{n} "
        "connected by name to their overlay's broker (/connz)"
    )
    if result.tls:
        console.print("                 with a client certificate the broker verified (mTLS)")
    console.print(f"  CA             {result.ca}")
    console.print(f"  helper         reference helper, {result.helper_mode} mode")
    console.print(
        f"  throughput     {result.nodes_per_minute:,.0f} nodes/minute "
        f"({result.provisioned} nodes in {result.provision_s:.1f}s)"
    )
    if result.p50_s is not None and result.p95_s is not None:
        console.print(
            f"  provisioned    p50 {result.p50_s:.2f}s  p95 {result.p95_s:.2f}s after node start"
        )
    if result.p50_normal_s is not None:
        console.print(
            f"  normal mode    p50 {result.p50_normal_s:.2f}s after node start "
            "(incl. the 2 s restart)"
        )
    console.print(f"  elapsed        {result.elapsed_s:.1f}s in total (setup {demo.setup_s:.1f}s)")
    if result.timed_out:
        console.print(f"{bad} timed out waiting for the fleet")
    for problem in result.problems[:10]:
        console.print(f"  [red]{problem}[/red]", markup=True, highlight=False)
    if len(result.problems) > 10:
        console.print(f"  ... and {len(result.problems) - 10} more problems")
    console.print(
        "[bold green]All nodes provisioned and verified.[/bold green]"
        if result.ok
        else "[bold red]Not every node was provisioned and verified.[/bold red]"
    )


async def _run(options: DemoOptions, *, json_out: bool, keep_running: bool) -> int:
    from testbed.demo import Demo, DemoError, DemoUsageError

    console = Console(stderr=json_out, highlight=False)
    loop = asyncio.get_running_loop()
    main = asyncio.current_task()
    assert main is not None
    interrupted = False

    def on_signal(signame: str) -> None:
        nonlocal interrupted
        if interrupted:
            console.print(f"[yellow]{signame} again: still stopping, please wait[/yellow]")
            return
        interrupted = True
        console.print(f"\n[yellow]{signame}: stopping everything the demo started[/yellow]")
        main.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig.name)

    try:
        demo = Demo(options)
    except DemoUsageError as exc:
        console.print(f"[red]provisioner demo: {exc}[/red]")
        return EXIT_USAGE
    _log_to(demo.workdir / "demo.log")
    result: DemoResult | None = None
    try:
        console.print(
            f"[bold]Fleet provisioner demo[/bold]  work directory {demo.workdir}", soft_wrap=True
        )
        await demo.start(lambda what: console.print(f"  starting {what}"))
        # soft_wrap: URLs and the token must stay on one line to be copied.
        assert demo.broker is not None
        console.print(f"  provisioning broker  {demo.broker.url}", soft_wrap=True)
        console.print(f"  admin API            {demo.admin_url}", soft_wrap=True)
        console.print(f"  admin bearer token   {demo.admin_token}", soft_wrap=True)
        console.print(f"  status page          {demo.status_page_url}", soft_wrap=True)
        live = Live(console=console, refresh_per_second=8, transient=False)
        with live:
            await demo.run(lambda snap: live.update(_progress_view(snap, options.nodes)))
            if options.run_for or options.certificate_validity:
                await demo.keep_running(lambda s: live.update(_progress_view(s, options.nodes)))
        result = await demo.verify()
        _print_summary(console, demo, result)
        if result.renewal is not None:
            console.print(f"  renewal              {result.renewal}", soft_wrap=True)
        if json_out:
            sys.stdout.write(json.dumps(result.to_json(), separators=(",", ":")) + "\n")
            sys.stdout.flush()
        if keep_running:
            console.print(
                f"\nEverything keeps running. Status page: {demo.status_page_url}\n"
                "Press Ctrl-C to stop.",
                soft_wrap=True,
            )
            await asyncio.Event().wait()
        return EXIT_OK if result.ok else EXIT_FAILED
    except asyncio.CancelledError:
        if result is not None:  # Ctrl-C after the summary (--keep-running): a normal end
            return EXIT_OK if result.ok else EXIT_FAILED
        _json_error(json_out, options, "interrupted")
        return EXIT_INTERRUPTED
    except DemoError as exc:
        console.print(f"[red]provisioner demo: {exc}[/red]")
        _json_error(json_out, options, str(exc))
        return EXIT_FAILED
    finally:
        t0 = time.monotonic()
        await demo.close()
        console.print(f"\nStopped everything in {time.monotonic() - t0:.1f}s.")


def _json_error(json_out: bool, options: DemoOptions, error: str) -> None:
    """With --json, the last line is a JSON object even when the demo could not finish."""
    if json_out:
        line = {"ok": False, "error": error, "nodes": options.nodes, "provisioned": 0}
        sys.stdout.write(json.dumps(line, separators=(",", ":")) + "\n")
        sys.stdout.flush()


def _log_to(path: Path) -> None:
    """The demo's logs go to a file: the terminal shows progress and the summary."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)
    # asyncio warns about every TLS connection closed by a peer (nodes restarting).
    for noisy in ("nats", "uvicorn.access", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    logging.getLogger("asyncio").setLevel(logging.ERROR)


def register(app: typer.Typer) -> None:
    """Attach the `demo` command to the main app."""

    @app.command("demo")
    def demo_command(
        nodes: int = typer.Option(DEFAULT_NODES, "--nodes", "-n", min=1, help="Fleet size."),
        json_out: bool = typer.Option(
            False, "--json", help="End with one line holding the verified result as JSON."
        ),
        ca: str = typer.Option("local", "--ca", help="local (built-in CA) or cfssl (cfssl serve)."),
        helper_mode: str = typer.Option(
            "python", "--helper-mode", help="Reference helper mode: python, persistent or exec."
        ),
        processes: int = typer.Option(
            1, "--processes", min=1, help="Run the simulated nodes in this many processes."
        ),
        keep_running: bool = typer.Option(
            False, "--keep-running", help="Keep everything up after the summary until Ctrl-C."
        ),
        workdir: Path | None = typer.Option(
            None, "--workdir", help="Use (and keep) this directory instead of a temporary one."
        ),
        start_rate: float | None = typer.Option(
            None, "--start-rate", help="Start nodes gradually, this many per second."
        ),
        timeout: float | None = typer.Option(
            None, "--timeout", help="Give up waiting for the fleet after this many seconds."
        ),
        tls: bool = typer.Option(
            True, "--tls/--no-tls", help="TLS to the brokers (mTLS on the overlay brokers)."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic fleet's facts."),
        certificate_validity: str | None = typer.Option(
            None,
            "--certificate-validity",
            help="Issue certificates of this lifetime (e.g. 90s, 1h) and turn renewal on.",
        ),
        run_for: str | None = typer.Option(
            None, "--run-for", help="Keep the fleet running this long (e.g. 240s) after its start."
        ),
    ) -> None:
        """Provision a simulated fleet end to end on this machine, nothing to configure."""
        from choria_core.durations import parse_duration
        from testbed.demo import DemoOptions

        if ca not in ("local", "cfssl"):
            raise typer.BadParameter("use local or cfssl", param_hint="--ca")
        if helper_mode not in ("python", "persistent", "exec"):
            raise typer.BadParameter("use python, persistent or exec", param_hint="--helper-mode")
        durations: dict[str, float | None] = {}
        for flag, value in (
            ("--certificate-validity", certificate_validity),
            ("--run-for", run_for),
        ):
            try:
                durations[flag] = None if value is None else parse_duration(value)
            except ValueError as exc:
                raise typer.BadParameter(str(exc), param_hint=flag) from None
        options = DemoOptions(
            nodes=nodes,
            ca=ca,  # type: ignore[arg-type]
            helper_mode=helper_mode,  # type: ignore[arg-type]
            processes=processes,
            workdir=workdir,
            start_rate=start_rate,
            timeout=timeout,
            tls=tls,
            seed=seed,
            certificate_validity=durations["--certificate-validity"],
            run_for=durations["--run-for"],
        )
        code = asyncio.run(_run(options, json_out=json_out, keep_running=keep_running))
        raise typer.Exit(code)

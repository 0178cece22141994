"""``provisioner bench``: provision N simulated nodes from cold and measure it (see
:mod:`testbed.bench` and ``docs/benchmarks.md``).

Progress goes to stderr; the markdown table to stdout; with ``--json`` the last line of stdout is
the result as one JSON object. The exit code is 0 whenever the measurement completed, however
slow (a benchmark is a measurement, not a test); 1 if something could not be set up; 130 on
Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path

import typer

EXIT_INTERRUPTED = 130


def register(app: typer.Typer) -> None:
    """Attach the `bench` command to the main app."""

    @app.command("bench")
    def bench_cmd(
        nodes: int = typer.Option(1000, "--nodes", "-n", min=1, help="Fleet size."),
        helper_mode: str = typer.Option(
            "python", "--helper-mode", help="Reference helper mode: exec, persistent or python."
        ),
        helper: str = typer.Option(
            "reference",
            "--helper",
            help="reference (the reference helper in --helper-mode), lean (a stdlib-only "
            "Python exec helper signing through cfssl) or go (the same helper compiled from "
            "helpers/examples/go; needs Go); lean and go need --helper-mode exec --ca cfssl.",
        ),
        ca: str = typer.Option("local", "--ca", help="local, cfssl or openbao."),
        key_type: str = typer.Option("ec", "--key-type", help="Node keys: rsa or ec."),
        connections: str = typer.Option(
            "per-node",
            "--connections",
            help="per-node (one NATS connection per node, like real nodes) or shared "
            "(one per simulator process; needed above ~20,000 nodes).",
        ),
        sim_processes: int = typer.Option(
            2, "--sim-processes", min=1, help="Simulator (fleet) processes."
        ),
        name: str | None = typer.Option(
            None, "--name", help="Result name: bench/results/<date>-<name>.json."
        ),
        json_out: bool = typer.Option(
            False, "--json", help="End stdout with one line holding the result as JSON."
        ),
        results_dir: Path | None = typer.Option(
            None, "--results-dir", help="Where to write the result (default bench/results)."
        ),
        workdir: Path | None = typer.Option(
            None, "--workdir", help="Use (and keep) this work directory."
        ),
        keep_workdir: bool = typer.Option(
            False, "--keep-workdir", help="Keep the temporary work directory (logs, audit)."
        ),
        sim_dir: str = typer.Option(
            "auto",
            "--sim-dir",
            help="Where simulated nodes keep their files: auto (tmpfs /dev/shm when present, "
            "since real nodes write to their own disks), disk (the work directory) or a path.",
        ),
        concurrency: int = typer.Option(
            256, "--concurrency", min=1, help="Nodes in flight in the provisioner."
        ),
        helper_pool_size: int = typer.Option(
            2, "--helper-pool-size", min=1, help="Persistent helper processes / python threads."
        ),
        broker: str = typer.Option(
            "auto",
            "--broker",
            help="callout (auth callout), static (go-choria user layout) or auto "
            "(callout for per-node, static for shared connections).",
        ),
        callout_mode: str = typer.Option(
            "process", "--callout-mode", help="Auth callout as a process or an in-process task."
        ),
        tls: bool = typer.Option(False, "--tls/--no-tls", help="TLS to the provisioning broker."),
        loglevel: str = typer.Option("warn", "--loglevel", help="The provisioner's log level."),
        profile: str = typer.Option(
            "none", "--profile", help="Profile the provisioner: none, pyinstrument or cprofile."
        ),
        floor: bool = typer.Option(True, "--floor/--no-floor", help="Measure the floor first."),
        floor_seconds: float = typer.Option(
            2.0, "--floor-seconds", min=0.5, help="Seconds per floor trial (3 trials each)."
        ),
        timeout: float | None = typer.Option(
            None, "--timeout", help="Stop waiting after this many seconds (and report)."
        ),
        stall_timeout: float = typer.Option(
            90.0, "--stall-timeout", help="Stop waiting when nothing was provisioned this long."
        ),
        seed: int = typer.Option(0, "--seed", help="Seed of the synthetic facts."),
    ) -> None:
        """Provision N simulated nodes from cold; report throughput against the floor."""
        from testbed.bench import BenchError, BenchOptions, run_bench

        logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
        opts = BenchOptions(
            nodes=nodes,
            helper_mode=helper_mode,  # type: ignore[arg-type]  # validated below
            helper=helper,  # type: ignore[arg-type]
            ca=ca,  # type: ignore[arg-type]
            key_type=key_type,  # type: ignore[arg-type]
            connections=connections,  # type: ignore[arg-type]
            sim_processes=sim_processes,
            name=name,
            results_dir=results_dir,
            workdir=workdir,
            keep_workdir=keep_workdir or workdir is not None,
            sim_dir=sim_dir,
            concurrency=concurrency,
            helper_pool_size=helper_pool_size,
            broker=broker,  # type: ignore[arg-type]
            callout_mode=callout_mode,  # type: ignore[arg-type]
            tls=tls,
            loglevel=loglevel,
            profile=profile,  # type: ignore[arg-type]
            floor=floor,
            floor_seconds=floor_seconds,
            timeout=timeout,
            stall_timeout=stall_timeout,
            seed=seed,
        )
        if callout_mode not in ("process", "task"):
            typer.echo("--callout-mode must be process or task", err=True)
            raise typer.Exit(2)

        def say(msg: str) -> None:
            print(msg, file=sys.stderr, flush=True)

        try:
            opts.validate()
            result, path = asyncio.run(run_bench(opts, say))
        except BenchError as exc:
            typer.echo(f"bench: {exc}", err=True)
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            typer.echo("interrupted", err=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        print(result["markdown"])
        if result.get("profile", {}).get("top"):
            print("\nTop functions by own time (provisioner):\n" + result["profile"]["top"])
        print(f"\nwritten {path}", file=sys.stderr)
        if json_out:
            print(json.dumps(result, separators=(",", ":")))
        sys.stdout.flush()

"""``provisioner bench``: provision N simulated nodes from cold and measure it (see
:mod:`testbed.bench` and ``docs/benchmarks.md``).

Progress goes to stderr; the markdown table to stdout; with ``--json`` the last line of stdout is
the result as one JSON object. The exit code is 0 whenever the measurement completed, however
slow (a benchmark is a measurement, not a test); 1 if something could not be set up; 2 on bad
options; 130 on Ctrl-C.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail

EXIT_INTERRUPTED = 130

Nodes = Annotated[int, typer.Option("--nodes", "-n", min=1, help="Fleet size.")]
HelperMode = Annotated[
    str, typer.Option("--helper-mode", help="Reference helper mode: exec, persistent or python.")
]
Helper = Annotated[
    str,
    typer.Option(
        "--helper",
        help="reference (the reference helper in --helper-mode), lean (a stdlib-only "
        "Python exec helper signing through cfssl) or go (the same helper compiled from "
        "helpers/examples/go; needs Go); lean and go need --helper-mode exec --ca cfssl.",
    ),
]
CA = Annotated[str, typer.Option("--ca", help="local, cfssl or openbao.")]
KeyType = Annotated[str, typer.Option("--key-type", help="Node keys: rsa or ec.")]
Connections = Annotated[
    str,
    typer.Option(
        "--connections",
        help="per-node (one NATS connection per node, like real nodes) or shared "
        "(one per simulator process; needed above ~20,000 nodes).",
    ),
]
SimProcesses = Annotated[
    int, typer.Option("--sim-processes", min=1, help="Simulator (fleet) processes.")
]
Name = Annotated[
    str | None, typer.Option("--name", help="Result name: bench/results/<date>-<name>.json.")
]
JsonOut = Annotated[
    bool, typer.Option("--json", help="End stdout with one line holding the result as JSON.")
]
ResultsDir = Annotated[
    Path | None,
    typer.Option("--results-dir", help="Where to write the result (default bench/results)."),
]
Workdir = Annotated[
    Path | None, typer.Option("--workdir", help="Use (and keep) this work directory.")
]
KeepWorkdir = Annotated[
    bool,
    typer.Option("--keep-workdir", help="Keep the temporary work directory (logs, audit)."),
]
SimDir = Annotated[
    str,
    typer.Option(
        "--sim-dir",
        help="Where simulated nodes keep their files: auto (tmpfs /dev/shm when present, "
        "since real nodes write to their own disks), disk (the work directory) or a path.",
    ),
]
Concurrency = Annotated[
    int, typer.Option("--concurrency", min=1, help="Nodes in flight in the provisioner.")
]
HelperPoolSize = Annotated[
    int,
    typer.Option("--helper-pool-size", min=1, help="Persistent helper processes / python threads."),
]
HelperForkServer = Annotated[
    bool,
    typer.Option(
        "--helper-fork-server/--no-helper-fork-server",
        help="Exec mode: the reference helper answers through its fork server (a light client "
        "per node, the work forked from a warm server).",
    ),
]
Broker = Annotated[
    str,
    typer.Option(
        "--broker",
        help="callout (auth callout), static (go-choria user layout) or auto "
        "(callout for per-node, static for shared connections).",
    ),
]
CalloutMode = Annotated[
    str,
    typer.Option("--callout-mode", help="Auth callout as a process or an in-process task."),
]
TLS = Annotated[bool, typer.Option("--tls/--no-tls", help="TLS to the provisioning broker.")]
LogLevel = Annotated[str, typer.Option("--loglevel", help="The provisioner's log level.")]
Profile = Annotated[
    str,
    typer.Option("--profile", help="Profile the provisioner: none, pyinstrument or cprofile."),
]
Floor = Annotated[bool, typer.Option("--floor/--no-floor", help="Measure the floor first.")]
FloorSeconds = Annotated[
    float,
    typer.Option("--floor-seconds", min=0.5, help="Seconds per floor trial (3 trials each)."),
]
Timeout = Annotated[
    float | None,
    typer.Option("--timeout", help="Stop waiting after this many seconds (and report)."),
]
StallTimeout = Annotated[
    float,
    typer.Option("--stall-timeout", help="Stop waiting when nothing was provisioned this long."),
]
Seed = Annotated[int, typer.Option("--seed", help="Seed of the synthetic facts.")]


def bench_cmd(
    nodes: Nodes = 1000,
    helper_mode: HelperMode = "python",
    helper: Helper = "reference",
    ca: CA = "local",
    key_type: KeyType = "ec",
    connections: Connections = "per-node",
    sim_processes: SimProcesses = 2,
    name: Name = None,
    json_out: JsonOut = False,
    results_dir: ResultsDir = None,
    workdir: Workdir = None,
    keep_workdir: KeepWorkdir = False,
    sim_dir: SimDir = "auto",
    concurrency: Concurrency = 256,
    helper_pool_size: HelperPoolSize = 2,
    helper_fork_server: HelperForkServer = False,
    broker: Broker = "auto",
    callout_mode: CalloutMode = "process",
    tls: TLS = False,
    loglevel: LogLevel = "warn",
    profile: Profile = "none",
    floor: Floor = True,
    floor_seconds: FloorSeconds = 2.0,
    timeout: Timeout = None,
    stall_timeout: StallTimeout = 90.0,
    seed: Seed = 0,
) -> None:
    """Provision N simulated nodes from cold; report throughput against the floor."""
    # The harness (servers, CA, fleet) loads only when the command runs: `--help` stays fast.
    from testbed.bench import BenchError, BenchOptions, BenchUsageError, run_bench

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
        helper_fork_server=helper_fork_server,
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

    def say(msg: str) -> None:
        print(msg, file=sys.stderr, flush=True)

    try:
        opts.validate()
        result, path = asyncio.run(run_bench(opts, say))
    except BenchUsageError as exc:
        raise fail(f"bench: {exc}", EXIT_USAGE) from None
    except BenchError as exc:
        raise fail(f"bench: {exc}", EXIT_FAILED) from None
    except KeyboardInterrupt:
        typer.echo("interrupted", err=True)
        raise typer.Exit(EXIT_INTERRUPTED) from None
    _print_result(result, path, json_out)


def _print_result(result: dict[str, Any], path: Path, json_out: bool) -> None:
    print(result["markdown"])
    if result.get("profile", {}).get("top"):
        print("\nTop functions by own time (provisioner):\n" + result["profile"]["top"])
    print(f"\nwritten {path}", file=sys.stderr)
    if json_out:
        print(json.dumps(result, separators=(",", ":")))
    sys.stdout.flush()


def register(app: typer.Typer) -> None:
    """Attach the `bench` command to the main app."""
    app.command("bench")(bench_cmd)

"""`provisioner node` commands: run one Choria-compatible node agent."""

from __future__ import annotations

import asyncio
import logging
import signal
from pathlib import Path

import typer

from node_agent.node import NodeAgent, NodeError
from provisioner.cli._exit import EXIT_USAGE, fail

app = typer.Typer(help="Run a Choria-compatible node agent.", no_args_is_help=True)


@app.command("run")
def run(
    jwt: Path = typer.Option(..., "--jwt", help="Provisioning token file (provisioning.jwt)."),
    identity: str = typer.Option(..., "--identity", help="Node identity (FQDN)."),
    facts: Path | None = typer.Option(None, "--facts", help="Facts file (JSON or YAML)."),
    state_dir: Path = typer.Option(
        Path("node-state"), "--state-dir", help="Config, keys and certificates go here."
    ),
    key_type: str = typer.Option("rsa", "--key-type", help="Key made by gencsr: rsa or ec."),
    broker_url: list[str] = typer.Option(
        [], "--broker-url", help="Override the token's broker URLs (repeatable)."
    ),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", help="Verify the provisioning broker against this CA bundle."
    ),
    ssl_root: Path | None = typer.Option(
        None,
        "--ssl-root",
        help="The ssldir a provisioner picks must be inside this directory "
        "(default: the state directory).",
    ),
    log_level: str = typer.Option("info", "--log-level", help="debug, info, warning, error."),
) -> None:
    """Run a node: provisioning mode until provisioned, then normal mode, until SIGINT/SIGTERM."""
    logging.basicConfig(
        level=getattr(logging, log_level.upper(), logging.INFO),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if key_type not in ("rsa", "ec"):
        raise typer.BadParameter("use rsa or ec", param_hint="--key-type")
    if facts is not None and not facts.is_file():
        raise typer.BadParameter(f"{facts} does not exist", param_hint="--facts")
    try:
        node = NodeAgent(
            identity=identity,
            token_path=jwt,
            state_dir=state_dir,
            facts_file=facts,
            key_type="rsa" if key_type == "rsa" else "ec",
            broker_urls=broker_url or None,
            tls_ca=tls_ca,
            ssl_root=ssl_root,
        )
    except ValueError as exc:
        raise typer.BadParameter(str(exc)) from exc
    try:
        asyncio.run(_serve(node))
    except NodeError as exc:
        # an unusable token or node configuration: bad configuration
        raise fail(str(exc), EXIT_USAGE) from exc


async def _serve(node: NodeAgent) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    start = loop.create_task(node.start())
    stopped = loop.create_task(stop.wait())
    await asyncio.wait({start, stopped}, return_when=asyncio.FIRST_COMPLETED)
    if start.done():
        start.result()  # raises NodeError for an unusable token or config
        await stopped
    await node.stop()
    if not start.done():
        start.cancel()
        await asyncio.gather(start, return_exceptions=True)

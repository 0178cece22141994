"""`provisioner broker` commands: generate the provisioning broker config, run the auth callout."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from pathlib import Path

import typer

from provisioner.cli._exit import EXIT_USAGE, fail

app = typer.Typer(
    help="Broker isolation: nats-server config and the auth callout service.",
    no_args_is_help=True,
)

_GENERATED = ("nats-server.conf", "broker-auth.yaml", "provisioner.password")


@app.command("config")
def config_cmd(
    out: Path = typer.Option(..., "--out", help="Directory to write the config and secrets into."),
    verify_key: list[str] = typer.Option(
        ...,
        "--verify-key",
        help="Provisioning token verification key: cert PEM, public key PEM or hex file "
        "(repeat for key rotation).",
    ),
    port: int = typer.Option(4222, "--port", help="Client port."),
    monitor_port: int = typer.Option(8222, "--monitor-port", help="HTTP monitoring port."),
    listen: str = typer.Option("0.0.0.0", "--listen", help="Client listen address."),
    tls: bool | None = typer.Option(
        None,
        "--tls/--no-tls",
        help="Generate a local CA and a server certificate (default: on unless --listen is "
        "loopback-only).",
    ),
    tls_host: list[str] = typer.Option(
        ["localhost", "127.0.0.1"], "--tls-host", help="Names/IPs for the server certificate."
    ),
    tls_cert: Path | None = typer.Option(
        None, "--tls-cert", help="Your own server certificate (PEM) instead of a generated one."
    ),
    tls_key: Path | None = typer.Option(None, "--tls-key", help="The key of --tls-cert (PEM)."),
    tls_ca: Path | None = typer.Option(
        None, "--tls-ca", help="CA the callout verifies --tls-cert with (default: system CAs)."
    ),
    insecure: bool = typer.Option(
        False,
        "--insecure",
        help="Allow a plain-text listener on a non-loopback address (tokens travel in clear).",
    ),
    connect_url: str | None = typer.Option(
        None, "--callout-url", help="URL the callout uses to reach this broker."
    ),
    pinning: bool = typer.Option(False, "--pinning", help="Pin identities to node nkeys."),
    require_nkey: bool = typer.Option(
        False, "--require-nkey", help="With --pinning: refuse nodes that present no nkey."
    ),
    force: bool = typer.Option(
        False, "--force", help="Overwrite an existing config (new secrets)."
    ),
) -> None:
    """Write DIR/nats-server.conf, DIR/broker-auth.yaml and DIR/provisioner.password (0600)."""
    from jwt_tools.keys import load_verify_key
    from jwt_tools.tokens import TokenError
    from provisioner.broker.config import BrokerConfigError, generate_broker_config, is_loopback

    existing = [name for name in _GENERATED if (out / name).exists()]
    if existing and not force:
        raise fail(
            f"{out} already holds {', '.join(existing)}; regenerating replaces every "
            "secret. Use --force to do it anyway.",
            EXIT_USAGE,
        )
    for source in verify_key:
        try:
            load_verify_key(source)
        except TokenError as exc:
            raise fail(f"--verify-key {source}: {exc}", EXIT_USAGE) from None
    try:
        files = generate_broker_config(
            out,
            verify_key,
            port=port,
            monitor_port=monitor_port,
            listen_host=listen,
            tls=tls,
            tls_hosts=tls_host,
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_ca=tls_ca,
            insecure=insecure,
            connect_url=connect_url,
            pinning=pinning,
            require_nkey=require_nkey,
        )
    except BrokerConfigError as exc:
        hint = (
            " Add --tls (generate a CA and certificate), --tls-cert/--tls-key (your own), "
            "--listen 127.0.0.1 (loopback only), or --insecure to accept plain text."
            if "plain-text" in str(exc)
            else ""
        )
        raise fail(f"{exc}.{hint}", EXIT_USAGE) from None
    typer.echo(f"wrote {files.server_config}")
    typer.echo(f"wrote {files.auth_config}")
    typer.echo(f"wrote {files.provisioner_password_file}")
    if files.tls_ca:
        typer.echo(f"wrote {files.tls_ca} (CA for clients that verify the broker)")
    elif files.settings.tls_cert is None and not is_loopback(listen):
        typer.echo(f"warning: plain text on {listen}:{port}; tokens and keys travel in clear")
    typer.echo(f"start: nats-server -c {files.server_config}")
    typer.echo(f"       provisioner broker auth --config {files.auth_config}")


@app.command("auth")
def auth_cmd(
    config: Path = typer.Option(..., "--config", help="The callout config (broker-auth.yaml)."),
    replicas: int = typer.Option(1, "--replicas", min=1, help="Replicas in this process."),
    metrics_port: int = typer.Option(
        0, "--metrics-port", help="Serve Prometheus metrics on 127.0.0.1:PORT (0 = off)."
    ),
    metrics_host: str = typer.Option("127.0.0.1", "--metrics-host"),
    log_level: str = typer.Option("INFO", "--log-level"),
) -> None:
    """Run the auth callout service (run several, on several hosts: one queue group)."""
    from prometheus_client import start_http_server

    from provisioner.broker.callout import CalloutConfigError, load_callout_config, serve_forever

    logging.basicConfig(
        level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        cfg = load_callout_config(config)
    except CalloutConfigError as exc:
        raise fail(str(exc), EXIT_USAGE) from None
    if metrics_port:
        start_http_server(metrics_port, addr=metrics_host)

    async def main() -> None:
        task = asyncio.ensure_future(serve_forever(cfg, replicas))
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, task.cancel)
        with contextlib.suppress(asyncio.CancelledError):
            await task

    asyncio.run(main())

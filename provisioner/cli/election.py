"""`provisioner election` commands: who leads the provisioner replicas, since when, which epoch.

``provisioner election status --config /etc/fleet-provisioner/provisioner.yaml`` reads the
broker URL, user, password, TLS files and the election bucket/key from the provisioner's own
configuration. Without ``--config`` give ``--nats-url``, ``--user`` and ``--password-file``
(the file holds the provisioning password; it is never taken on the command line).

The answer comes straight from the election key in JetStream KV
(:func:`provisioner.election.read_leader`), so it is right even when every replica's admin API
is unreachable. Exit codes (the convention of every command, docs/cli.md): 0 a leader holds
the key; 1 nobody does (failover in progress, or no replica running) or the broker or the
bucket could not be read (the message on stderr says which); 2 bad usage or configuration.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import ssl
import time
from pathlib import Path
from typing import Any

import typer

from provisioner.cli._exit import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from provisioner.config import ConfigError, ElectionConfig, ProvisionerConfig, load_config

app = typer.Typer(help="Leader election status.", no_args_is_help=True)


class _Target:
    """Where and how to read the election key."""

    def __init__(
        self,
        *,
        urls: list[str],
        user: str | None,
        password: str | None,
        bucket: str,
        key: str,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        self.urls = urls
        self.user = user
        self.password = password
        self.bucket = bucket
        self.key = key
        self.tls = tls


def _tls_from_config(cfg: ProvisionerConfig) -> ssl.SSLContext | None:
    wants = any(u.startswith("tls://") for u in cfg.broker_urls) or bool(cfg.tls.ca or cfg.tls.cert)
    if cfg.choria_insecure or not wants:
        return None
    ctx = ssl.create_default_context(cafile=cfg.tls.ca or None)
    if cfg.tls.cert and cfg.tls.key:
        ctx.load_cert_chain(cfg.tls.cert, cfg.tls.key)
    if not cfg.tls.verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    return ctx


def _target(
    config: Path | None,
    nats_url: list[str],
    user: str | None,
    password_file: Path | None,
    bucket: str | None,
    key: str | None,
) -> _Target:
    if config is not None:
        try:
            cfg = load_config(config)
        except ConfigError as exc:
            raise fail(f"invalid configuration: {exc}", EXIT_USAGE) from None
        try:
            tls = _tls_from_config(cfg)
        except (OSError, ssl.SSLError) as exc:
            raise fail(f"tls: could not load TLS files: {exc}", EXIT_USAGE) from None
        return _Target(
            urls=list(nats_url) or list(cfg.broker_urls),
            user=user or cfg.broker_user,
            password=_read_password(password_file) or cfg.broker_provisioning_password or None,
            bucket=bucket or cfg.election.bucket,
            key=key or cfg.election.key,
            tls=tls,
        )
    if not nats_url:
        raise fail(
            "give --config FILE, or --nats-url (with --user and --password-file)", EXIT_USAGE
        )
    defaults = ElectionConfig()
    return _Target(
        urls=list(nats_url),
        user=user,
        password=_read_password(password_file),
        bucket=bucket or defaults.bucket,
        key=key or defaults.key,
    )


def _read_password(path: Path | None) -> str | None:
    if path is None:
        return None
    try:
        return path.read_text(encoding="utf-8").strip() or None
    except OSError as exc:
        raise fail(f"cannot read the password file {path}: {exc.strerror}", EXIT_USAGE) from None


async def _read(target: _Target, timeout: float) -> dict[str, Any]:
    import nats

    from provisioner.election import read_leader

    async def quiet(exc: Exception) -> None:  # the failure is reported once, below
        return None

    options: dict[str, Any] = {
        "servers": target.urls,
        "connect_timeout": timeout,
        "allow_reconnect": False,
        "max_reconnect_attempts": 1,
        "reconnect_time_wait": 0.2,
        "error_cb": quiet,
    }
    if target.user:
        options["user"] = target.user
    if target.password:
        options["password"] = target.password
    if target.tls is not None:
        options["tls"] = target.tls
    try:
        nc = await asyncio.wait_for(nats.connect(**options), timeout * (len(target.urls) + 1))
    except Exception as exc:  # nats-py names the server, never the password
        where = ",".join(target.urls)
        raise fail(f"cannot connect to {where}: {type(exc).__name__}: {exc}", EXIT_FAILED) from None
    try:
        js = nc.jetstream(timeout=timeout)
        info = await asyncio.wait_for(read_leader(js, target.bucket, target.key), timeout)
    except Exception as exc:
        raise fail(
            f"cannot read the election bucket {target.bucket}: {type(exc).__name__}", EXIT_FAILED
        ) from None
    finally:
        await nc.close()
    now = time.time()
    result: dict[str, Any] = {"bucket": target.bucket, "key": target.key, "leader": None}
    if info is not None:
        result.update(
            leader=info.identity,
            epoch=info.epoch,
            revision=info.revision,
            since=info.since or None,
            for_seconds=round(now - info.since, 1) if info.since else None,
        )
    return result


@app.command("status")
def status(
    config: Path | None = typer.Option(
        None, "--config", "-c", help="The provisioner YAML file (broker, credentials, bucket)."
    ),
    nats_url: list[str] = typer.Option(
        [], "--nats-url", help="Broker URL (repeatable); overrides the file's broker_urls."
    ),
    user: str | None = typer.Option(None, "--user", help="NATS user (default: the file's)."),
    password_file: Path | None = typer.Option(
        None, "--password-file", help="File holding the NATS password."
    ),
    bucket: str | None = typer.Option(None, "--bucket", help="Election KV bucket."),
    key: str | None = typer.Option(None, "--key", help="Election key within the bucket."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
    timeout: float = typer.Option(5.0, "--timeout", help="Seconds to wait for the broker."),
) -> None:
    """Show the current leader, its epoch (fencing token) and since when it leads."""
    target = _target(config, nats_url, user, password_file, bucket, key)
    result = asyncio.run(_read(target, timeout))
    if as_json:
        typer.echo(json.dumps(result, sort_keys=True))
    elif result["leader"] is None:
        typer.echo(
            f"no leader: nobody holds {result['bucket']}/{result['key']} "
            "(failover in progress, or no replica is running)"
        )
    else:
        since = result.get("since")
        when = (
            dt.datetime.fromtimestamp(since, dt.UTC).isoformat(timespec="seconds")
            + f" ({result['for_seconds']:g}s ago)"
            if since
            else "unknown (a go-choria value without a start time)"
        )
        typer.echo(f"leader: {result['leader']}")
        typer.echo(f"epoch:  {result['epoch']}")
        typer.echo(f"since:  {when}")
        typer.echo(f"bucket: {result['bucket']} key: {result['key']}")
    raise typer.Exit(EXIT_OK if result["leader"] is not None else EXIT_FAILED)

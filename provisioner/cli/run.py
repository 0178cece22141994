"""`provisioner run`: run the provisioning service until SIGINT/SIGTERM.

Exit codes: 0 after a signal, 1 when the service cannot start or its broker connection closed
for good (so that systemd's ``Restart=on-failure`` restarts it), 2 for bad usage or
configuration.
"""

from __future__ import annotations

import asyncio
import json
import logging
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer

from provisioner.cli._exit import EXIT_FAILED, EXIT_OK, EXIT_USAGE, fail
from provisioner.config import ConfigError, ProvisionerConfig, load_config

log = logging.getLogger("provisioner.run")

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "warning": logging.WARNING,
    "error": logging.ERROR,
    "fatal": logging.CRITICAL,
    "panic": logging.CRITICAL,
}


class JSONFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, msg (+ exception)."""

    def format(self, record: logging.LogRecord) -> str:
        obj: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info:
            obj["exception"] = self.formatException(record.exc_info)
        return json.dumps(obj, separators=(",", ":"))


def setup_logging(cfg: ProvisionerConfig, log_format: str) -> None:
    """Log to ``logfile`` (or stderr) at ``loglevel``, as JSON lines or text."""
    if cfg.logfile and cfg.logfile not in {"-", "stderr", "stdout"}:
        handler: logging.Handler = logging.FileHandler(cfg.logfile)
    elif cfg.logfile == "stdout":
        handler = logging.StreamHandler(sys.stdout)
    else:
        handler = logging.StreamHandler(sys.stderr)
    if log_format == "json":
        handler.setFormatter(JSONFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(_LEVELS.get(cfg.loglevel, logging.INFO))
    # nats-py is chatty at debug level about every reconnect attempt.
    logging.getLogger("nats").setLevel(max(root.level, logging.INFO))


async def serve(cfg: ProvisionerConfig, overrides: dict[str, Any] | None = None) -> int:
    """Run a :class:`~provisioner.service.Provisioner` until a signal arrives.

    SIGHUP reopens the audit log (logrotate) and reloads the configuration file with the same
    command-line ``overrides`` (:mod:`provisioner.reload`).
    """
    from provisioner.service import Provisioner, ProvisionerError

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    prov = Provisioner(cfg)
    prov.reloader.configure(cfg.source_file, overrides)
    reloads: set[asyncio.Task[Any]] = set()

    def hangup() -> None:
        # logrotate: reopen the audit log (the hash chain continues in the new file)
        prov.audit.request_reopen()
        task = asyncio.ensure_future(prov.reloader.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, hangup)
    try:
        await prov.start()
    except ProvisionerError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILED
    except Exception as exc:  # e.g. the election bucket cannot be created
        log.error("cannot start: %s: %s", type(exc).__name__, exc)
        return EXIT_FAILED
    print(
        f"provisioner {cfg.identity} running"
        + (f", metrics on port {prov.http_port}" if prov.http_port else ""),
        file=sys.stderr,
        flush=True,
    )
    lost = asyncio.ensure_future(prov.connection_lost.wait())
    signalled = asyncio.ensure_future(stop.wait())
    await asyncio.wait({lost, signalled}, return_when=asyncio.FIRST_COMPLETED)
    for waiter in (lost, signalled):
        waiter.cancel()
    if prov.connection_lost.is_set():
        # nats-py closes a connection for good after a server -ERR (a control line over the
        # server's limit, a permissions violation of the connection itself): staying up would
        # look healthy and provision nothing. Exit 1 so the service manager restarts us.
        message = "the broker connection closed for good; exiting so that the service restarts"
        log.error(message)
        print(f"provisioner {cfg.identity}: {message}", file=sys.stderr, flush=True)
        await prov.stop()
        return EXIT_FAILED
    log.info("signal received, shutting down")
    await prov.stop()
    return EXIT_OK


def register(app: typer.Typer) -> None:
    """Attach the `run` command to the main app."""

    @app.command("run")
    def run_cmd(
        config: Path = typer.Option(..., "--config", "-c", help="The provisioner YAML file."),
        broker_url: list[str] = typer.Option(
            [],
            "--broker-url",
            help="Broker URL (repeatable); overrides broker_urls from the file.",
        ),
        log_format: str = typer.Option("json", "--log-format", help="json or text."),
    ) -> None:
        """Run the provisioner: discover nodes and provision them until SIGINT/SIGTERM."""
        overrides: dict[str, Any] = {}
        if broker_url:
            overrides["broker_urls"] = list(broker_url)
        try:
            cfg = load_config(config, overrides=overrides or None)
        except ConfigError as exc:
            raise fail(f"invalid configuration: {exc}", EXIT_USAGE) from None
        if log_format not in {"json", "text"}:
            raise fail("--log-format must be json or text", EXIT_USAGE)
        setup_logging(cfg, log_format)
        raise typer.Exit(asyncio.run(serve(cfg, overrides or None)))

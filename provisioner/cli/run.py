"""`provisioner run`: run the provisioning service until SIGINT/SIGTERM.

Exit codes: 0 after a signal, 1 when the service cannot start or its broker connection closed
for good (so that systemd's ``Restart=on-failure`` restarts it), 2 for bad usage or
configuration.

As the anchor: ``--choria-config FILE`` reads broker, TLS and client identity settings from a
Choria config file (:mod:`provisioner.choria_config`; our YAML wins where both set a key),
``--pid FILE`` writes our PID (refusing to start while another live process holds the file,
removed at exit), ``--debug`` sets ``loglevel`` to debug.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import typer

from choria_core.securefile import write_atomic
from provisioner.choria_config import ChoriaConfigError, choria_settings
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


#: The garbage collector's thresholds while serving (Python's default: 700, 10, 10). Nearly
#: everything the provisioner allocates per node (messages, futures, records) is freed by
#: reference counting; with the default the collector still ran a young collection every
#: ~10 nodes and a middle one every ~100, about 2-3% of the provisioner's CPU (bench, 3,000
#: nodes: 0.26 s of collector time; with these thresholds ~0, peak RSS unchanged).
GC_THRESHOLDS = (10_000, 20, 20)


def settle_heap() -> None:
    """Once started: freeze what start-up built (modules, configuration, the admin app, the
    connection) so that no full collection walks it again, and collect less often."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
    log.info(
        "start-up heap frozen (%d objects); collector thresholds %s",
        gc.get_freeze_count(),
        GC_THRESHOLDS,
    )


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
    settle_heap()
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


def _set_in_file(cfg: ProvisionerConfig, dotted: str) -> bool:
    """Whether the YAML file itself sets ``dotted`` (``tls.ca``)."""
    node: Any = cfg
    for part in dotted.split("."):
        if part not in getattr(node, "model_fields_set", ()):
            return False
        node = getattr(node, part)
    return True


def choria_overrides(config: Path, choria_config: Path) -> dict[str, Any]:
    """The Choria file's settings our YAML does not set itself (the YAML wins)."""
    base = load_config(config)
    return {k: v for k, v in choria_settings(choria_config).items() if not _set_in_file(base, k)}


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_pid(path: Path) -> None:
    """Write our PID to ``path`` atomically; refuse while another live process holds it."""
    with contextlib.suppress(OSError, ValueError):
        held = int(path.read_text(encoding="ascii").strip()[:20])
        if held != os.getpid() and held > 0 and _pid_alive(held):
            raise fail(f"{path} holds the PID of a running process ({held})", EXIT_FAILED)
    try:
        write_atomic(path, f"{os.getpid()}\n".encode(), mode=0o644)
    except OSError as exc:
        raise fail(f"could not write the PID file {path}: {exc}", EXIT_FAILED) from None


def remove_pid(path: Path) -> None:
    """Remove ``path`` if it still holds our PID."""
    with contextlib.suppress(OSError, ValueError):
        if int(path.read_text(encoding="ascii").strip()[:20]) == os.getpid():
            path.unlink()


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
        choria_config: Path | None = typer.Option(
            None,
            "--choria-config",
            help="A Choria config file for broker, TLS and client identity settings "
            "(our YAML wins where both set a key).",
        ),
        pid: Path | None = typer.Option(
            None, "--pid", help="Write our PID to this file (removed at exit)."
        ),
        debug: bool = typer.Option(False, "--debug", help="Log at debug level."),
    ) -> None:
        """Run the provisioner: discover nodes and provision them until SIGINT/SIGTERM."""
        overrides: dict[str, Any] = {}
        try:
            if choria_config is not None:
                overrides.update(choria_overrides(config, choria_config))
            if broker_url:
                overrides["broker_urls"] = list(broker_url)
            if debug:
                overrides["loglevel"] = "debug"
            cfg = load_config(config, overrides=overrides or None)
        except (ConfigError, ChoriaConfigError) as exc:
            raise fail(f"invalid configuration: {exc}", EXIT_USAGE) from None
        if log_format not in {"json", "text"}:
            raise fail("--log-format must be json or text", EXIT_USAGE)
        setup_logging(cfg, log_format)
        if pid is not None:
            pid = pid.absolute()
            write_pid(pid)
        try:
            code = asyncio.run(serve(cfg, overrides or None))
        finally:
            if pid is not None:
                remove_pid(pid)
        raise typer.Exit(code)

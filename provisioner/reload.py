"""Reloading the configuration (``SIGHUP``) without dropping in-flight nodes.

A reload reads the configuration file again (with the same command-line overrides) and
applies the keys of :data:`~provisioner.config.RELOADABLE_KEYS` to *new* attempts: the helper
(command, mode, arguments, limits, environment, CA protection), ``cert_deny_list``,
``pki_policy``, the token policy (``tokens``) and verification keys (``jwt_verify_cert``,
``tokens.verify_keys``) and the overlays registry file (``overlays``).

Everything new is built and checked first: the file must load and validate, the verification
keys must load, the helper command must exist (or the python handler import). Only then is the
pipeline context swapped, in one assignment: an attempt already running keeps the context it
started with (old helper, old deny list, old policy) and finishes with it; the old helper is
closed once those attempts have ended (a persistent pool is drained, then closed).

Anything wrong keeps the old configuration whole: the error is logged with its reason code
(:class:`~provisioner.reasons.ReloadReason`), counted in
``choria_provisioner_config_reloads_total{result}``, and shown as ``last_reload`` in the admin
status. Changed keys that need a restart (broker URLs, TLS, site, election, ...) are named in a
warning and keep their old values; the rest of the reload still applies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import shutil
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Protocol

from prometheus_client import Counter, Gauge

from choria_core.errors import FleetError
from choria_core.remote_text import clean_remote_text
from provisioner.admin.readmodel import ReadModel
from provisioner.checks import compile_deny_list
from provisioner.config import (
    ConfigError,
    ProvisionerConfig,
    config_changes,
    load_config,
    merge_reloadable,
)
from provisioner.connection import ProvisionerError, load_verify_keys
from provisioner.dispatch import Dispatcher
from provisioner.helper_runner import HelperError, HelperRunner, runner_from_config, split_command
from provisioner.metrics import Metrics
from provisioner.reasons import ReloadReason

log = logging.getLogger(__name__)

#: How long an old helper waits for the attempts that started with it before it is closed.
DRAIN_LIMIT_S = 600.0
#: Error text in logs and the admin status is cut to this many characters.
ERROR_LIMIT = 1024


class ReloadError(FleetError, reason="reload"):
    """A reload was refused; ``reason`` is a :class:`ReloadReason`."""

    def __init__(self, code: ReloadReason, message: str) -> None:
        self.code = code
        self.reason = code.value
        super().__init__(message)


class ReloadTarget(Protocol):
    """The parts of the running service a reload reads and swaps."""

    config: ProvisionerConfig
    metrics: Metrics
    dispatcher: Dispatcher
    view: ReadModel

    def use_helper(self, helper: HelperRunner) -> None: ...


class ReloadMetrics:
    """``choria_provisioner_config_reloads_total{site,result}`` and the last reload gauges."""

    def __init__(self, metrics: Metrics, site: str) -> None:
        reg = metrics.registry
        self.site = site
        self.total = Counter(
            "choria_provisioner_config_reloads",
            "Configuration reloads (SIGHUP) by result: success or failure",
            ["site", "result"],
            registry=reg,
        )
        self.last_success = Gauge(
            "choria_provisioner_config_last_reload_successful",
            "1 if the last configuration reload succeeded, 0 if it was refused",
            ["site"],
            registry=reg,
        )
        self.last_time = Gauge(
            "choria_provisioner_config_last_reload_timestamp_seconds",
            "When the last configuration reload was attempted (Unix time)",
            ["site"],
            registry=reg,
        )
        for result in ("success", "failure"):
            self.total.labels(site, result)

    def record(self, ok: bool, when: float) -> None:
        self.total.labels(self.site, "success" if ok else "failure").inc()
        self.last_success.labels(self.site).set(1 if ok else 0)
        self.last_time.labels(self.site).set(when)


def check_helper_command(cfg: ProvisionerConfig) -> None:
    """Raise ``HelperError`` when an exec/persistent helper's program does not exist."""
    if cfg.helper_mode == "python":
        return  # the handler is imported when the runner is built
    argv = split_command(cfg.helper, cfg.helper_args)
    program = argv[0]
    if os.sep in program:
        if not (os.path.isfile(program) and os.access(program, os.X_OK)):
            raise HelperError("start_failed", f"helper program {program} is not an executable file")
    elif shutil.which(program) is None:
        raise HelperError("start_failed", f"helper program {program} is not on PATH")


class Reloader:
    """Reload one service's configuration (see the module docstring); one at a time."""

    def __init__(
        self,
        service: ReloadTarget,
        *,
        owns_helper: bool = True,
        path: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self._service = service
        self._owns_helper = owns_helper
        self._path = path
        self._overrides = dict(overrides or {})
        self._lock = asyncio.Lock()
        self._drains: set[asyncio.Task[None]] = set()
        self._retired: set[HelperRunner] = set()
        self.metrics = ReloadMetrics(service.metrics, service.config.site)
        #: The last reload: ``{"time", "result", "reason", "error", "changed", "restart_required"}``
        self.last: dict[str, Any] | None = None

    def status(self) -> dict[str, Any] | None:
        """A copy of :attr:`last` (``None`` before the first reload)."""
        return dict(self.last) if self.last is not None else None

    def configure(self, path: str | Path | None, overrides: Mapping[str, Any] | None) -> None:
        """Where to read from on reload (default: the file the config was loaded from)."""
        self._path = path
        self._overrides = dict(overrides or {})

    async def reload(self) -> dict[str, Any]:
        """Reload now; returns (and keeps as :attr:`last`) what happened. Never raises."""
        async with self._lock:
            when = time.time()
            try:
                changed, restart = await self._reload()
            except ReloadError as exc:
                return self._refused(when, exc.code, str(exc))
            except Exception as exc:  # a bug must not take the service down
                log.exception("configuration reload failed unexpectedly")
                return self._refused(when, ReloadReason.RELOAD_FAILED, type(exc).__name__)
            self.last = {
                "time": when,
                "result": "success",
                "reason": None,
                "error": None,
                "changed": changed,
                "restart_required": restart,
            }
            self.metrics.record(True, when)
            log.info(
                "configuration reloaded: changed=%s",
                ",".join(changed) or "-",
            )
            return dict(self.last)

    def _refused(self, when: float, reason: ReloadReason, message: str) -> dict[str, Any]:
        cfg = self._service.config
        secrets = [cfg.token, cfg.broker_provisioning_password, cfg.admin.token or ""]
        error = clean_remote_text(message, ERROR_LIMIT, secrets=secrets)
        self.last = {
            "time": when,
            "result": "failure",
            "reason": reason.value,
            "error": error,
            "changed": [],
            "restart_required": [],
        }
        self.metrics.record(False, when)
        log.error(
            "configuration reload refused (reason=%s), keeping the old configuration: %s",
            reason.value,
            error,
        )
        return dict(self.last)

    def _source(self) -> Path:
        path = self._path if self._path is not None else self._service.config.source_file
        if path is None:
            raise ReloadError(
                ReloadReason.CONFIG_INVALID, "the configuration was not loaded from a file"
            )
        return Path(path)

    async def _reload(self) -> tuple[list[str], list[str]]:
        svc = self._service
        old = svc.config
        try:
            new = load_config(self._source(), overrides=self._overrides or None)
        except ConfigError as exc:
            raise ReloadError(ReloadReason.CONFIG_INVALID, str(exc)) from None
        changes = config_changes(old, new)
        if changes.restart:
            log.warning(
                "configuration keys changed that need a restart; they keep their old values "
                "until then: %s",
                ",".join(changes.restart),
            )
        merged = merge_reloadable(old, new)
        try:
            verify_keys = load_verify_keys(merged)
        except ProvisionerError as exc:
            raise ReloadError(ReloadReason.VERIFY_KEYS_INVALID, str(exc)) from None
        helper: HelperRunner | None = None
        if self._owns_helper:
            try:
                check_helper_command(merged)
                helper = runner_from_config(merged)
            except HelperError as exc:
                raise ReloadError(ReloadReason.HELPER_UNAVAILABLE, str(exc)) from None
        elif any(k.startswith("helper") for k in changes.reloadable):
            log.warning("the helper was given in code, not by the configuration: not replaced")
        ctx = svc.dispatcher.ctx
        if ctx is not None:
            new_ctx = dataclasses.replace(
                ctx,
                config=merged,
                helper=helper if helper is not None else ctx.helper,
                verify_keys=verify_keys,
                deny_list=compile_deny_list(merged.cert_deny_list),
            )
            # The attempts running now keep the context (and helper) they started with.
            in_flight: set[asyncio.Task[Any]] = set(svc.dispatcher._workers)
            svc.dispatcher.ctx = new_ctx  # one assignment: new attempts see all of it
            if helper is not None:
                self._spawn_drain(ctx.helper, in_flight)
        svc.config = merged
        if helper is not None:
            svc.use_helper(helper)
        svc.view.config_reloaded(merged)
        return changes.reloadable, changes.restart

    def _spawn_drain(self, old: HelperRunner, attempts: set[asyncio.Task[Any]]) -> None:
        self._retired.add(old)
        task = asyncio.create_task(self._drain(old, attempts), name="reload:drain-helper")
        self._drains.add(task)
        task.add_done_callback(self._drains.discard)

    async def _drain(self, old: HelperRunner, attempts: set[asyncio.Task[Any]]) -> None:
        """Close the old helper once the attempts that may still use it have ended."""
        if attempts:
            await asyncio.wait(attempts, timeout=DRAIN_LIMIT_S)
        await self._close(old)
        log.info("the previous helper was closed after %d in-flight attempts", len(attempts))

    async def _close(self, old: HelperRunner) -> None:
        if old in self._retired:
            self._retired.discard(old)
            with contextlib.suppress(Exception):
                await old.aclose()

    async def aclose(self) -> None:
        """Close the old helpers still draining (the service is stopping: attempts ended)."""
        for task in list(self._drains):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for old in list(self._retired):
            await self._close(old)

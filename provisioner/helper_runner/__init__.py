"""Run the operator's helper: the three modes behind one interface.

- :class:`ExecHelper` is the anchor's mode: one process per node, the input JSON on stdin, one
  JSON object on stdout. Helpers written for choria-io/provisioner run unchanged.
- :class:`PersistentHelper` keeps a pool of long-running helper processes that read one JSON
  object per line and answer one JSON object per line, in order.
- :class:`PythonHelper` calls an importable `module:callable` (or `path/file.py:callable`) in
  the provisioner process, sync or async.

:func:`runner_from_config` puts the mode's runner behind :class:`GuardedHelper`, the CA
protection (concurrency, rate, circuit breaker) the provisioner enforces across every helper
process. Exec and persistent helpers get a minimal environment (:func:`helper_environment`).

Every failure is a :class:`HelperError` whose `reason` is a short machine code (used in metrics
and the audit log) and whose message says what to fix. Secrets from the input (the provisioning
token, the NATS password) and PEM private keys are never copied into errors or logs. The
modules of this package log under the ``provisioner.helper_runner`` logger.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from provisioner.helper_runner.base import (
    DEFAULT_MAX_OUTPUT,
    DEFAULT_TIMEOUT,
    MODE_ENV,
    REASONS,
    STDERR_KEEP,
    HelperError,
    HelperRunner,
    decode_output,
    helper_environment,
    split_command,
    validate_output,
)
from provisioner.helper_runner.exec_mode import ExecHelper
from provisioner.helper_runner.guard import GuardDeferral, GuardedHelper, ca_outage, deferral_reason
from provisioner.helper_runner.persistent_mode import PersistentHelper
from provisioner.helper_runner.python_mode import HandlerResult, PythonHelper, load_callable

if TYPE_CHECKING:
    from provisioner.config import ProvisionerConfig

__all__ = [
    "DEFAULT_MAX_OUTPUT",
    "DEFAULT_TIMEOUT",
    "MODE_ENV",
    "REASONS",
    "STDERR_KEEP",
    "ExecHelper",
    "GuardDeferral",
    "GuardedHelper",
    "HandlerResult",
    "HelperError",
    "HelperRunner",
    "PersistentHelper",
    "PythonHelper",
    "ca_outage",
    "decode_output",
    "deferral_reason",
    "helper_environment",
    "load_callable",
    "runner_from_config",
    "split_command",
    "validate_output",
]


def runner_from_config(cfg: ProvisionerConfig) -> HelperRunner:
    """The runner `cfg.helper_mode` asks for, with the configured timeout, cap, args and
    environment, behind the provisioner's CA protection (`cfg.ca_protection`)."""
    runner = _mode_runner(cfg)
    prot = getattr(cfg, "ca_protection", None)
    if prot is None:
        return runner
    return GuardedHelper(
        runner,
        max_concurrency=prot.max_concurrency,
        rate=prot.rate,
        burst=prot.burst,
        max_wait=prot.max_wait,
        breaker_failures=prot.breaker_failures,
        breaker_reset=prot.breaker_reset,
    )


def _mode_runner(cfg: ProvisionerConfig) -> HelperRunner:
    mode = getattr(cfg, "helper_mode", "exec")
    timeout = float(getattr(cfg, "helper_timeout", DEFAULT_TIMEOUT))
    max_output = int(getattr(cfg, "helper_max_output", DEFAULT_MAX_OUTPUT))
    args = list(getattr(cfg, "helper_args", []) or [])
    pool = int(getattr(cfg, "helper_pool_size", 4))
    env = helper_environment(list(getattr(cfg, "helper_env", []) or []))
    if mode == "exec":
        workers = int(getattr(cfg, "workers", 4) or 4)
        return ExecHelper(
            cfg.helper,
            args=args,
            timeout=timeout,
            max_output=max_output,
            max_concurrent=max(workers, pool, 1) * 4,
            env=env,
        )
    if mode == "persistent":
        return PersistentHelper(
            cfg.helper, args=args, pool_size=pool, timeout=timeout, max_output=max_output, env=env
        )
    if mode == "python":
        return PythonHelper(cfg.helper, timeout=timeout, max_threads=max(pool, 1))
    raise HelperError("start_failed", f"unknown helper_mode {mode!r} (exec, persistent, python)")

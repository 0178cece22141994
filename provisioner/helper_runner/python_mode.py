"""Python mode: an importable `module:callable` (or `path/file.py:callable`) called in process."""

from __future__ import annotations

import asyncio
import importlib
import importlib.util
import inspect
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helpers.models import HelperInput, HelperOutput
from provisioner.helper_runner.base import (
    DEFAULT_TIMEOUT,
    HelperError,
    snippet,
    validate_output,
)

log = logging.getLogger(__name__)

HandlerResult = HelperOutput | dict[str, Any]


def load_callable(spec: str) -> Callable[..., Any]:
    """Load `module:callable` or `path/to/file.py:callable`."""
    target, sep, attr = spec.rpartition(":")
    if not sep or not target or not attr:
        raise HelperError(
            "start_failed",
            f"python helper {spec!r} must look like 'module:callable' or 'path/file.py:callable'",
        )
    try:
        if target.endswith(".py") or os.sep in target:
            path = Path(target).resolve()
            name = f"_provisioner_helper_{abs(hash(str(path)))}"
            file_spec = importlib.util.spec_from_file_location(name, path)
            if file_spec is None or file_spec.loader is None:
                raise ImportError(f"cannot load {path}")
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[name] = module
            file_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
    except Exception as exc:
        raise HelperError(
            "start_failed", f"cannot import python helper {target!r}: {type(exc).__name__}: {exc}"
        ) from None
    obj = getattr(module, attr, None)
    if obj is None or not callable(obj):
        raise HelperError("start_failed", f"{target!r} has no callable named {attr!r}")
    return obj


class PythonHelper:
    """An in-process helper: `handler(HelperInput) -> HelperOutput | dict`, sync or async.

    Sync handlers run in worker threads (at most `max_threads` at once) so they never block the
    event loop. A sync handler that times out cannot be stopped: its thread finishes in the
    background and its result is dropped.
    """

    def __init__(
        self,
        handler: str | Callable[..., Any],
        *,
        timeout: float = DEFAULT_TIMEOUT,
        max_threads: int = 8,
    ) -> None:
        self.handler = load_callable(handler) if isinstance(handler, str) else handler
        self.timeout = timeout
        self._is_async = inspect.iscoroutinefunction(self.handler) or (
            inspect.iscoroutinefunction(getattr(type(self.handler), "__call__", None))  # noqa: B004
        )
        self._threads = asyncio.Semaphore(max_threads)

    async def run(self, inp: HelperInput) -> HelperOutput:
        """Call the handler and validate its result."""
        secrets = inp.secrets()
        try:
            if self._is_async:
                # asyncio.timeout, not wait_for: the handler runs in this task (no task and
                # no extra loop iteration per node), cancelled the same way on timeout.
                async with asyncio.timeout(self.timeout):
                    result = await self.handler(inp)
            else:
                async with self._threads:
                    result = await asyncio.wait_for(
                        asyncio.to_thread(self.handler, inp), self.timeout
                    )
                if inspect.isawaitable(result):
                    result = await asyncio.wait_for(result, self.timeout)
        except TimeoutError:
            raise HelperError(
                "timeout", f"python helper did not return within {self.timeout:g}s"
            ) from None
        except HelperError:
            raise
        except Exception as exc:
            # No traceback in the log: exception text and locals may carry input secrets.
            what = snippet(f"{type(exc).__name__}: {exc}", secrets, 500)
            log.warning("python helper raised for %s: %s", inp.identity, what)
            raise HelperError("crashed", "python helper raised " + what) from None
        if isinstance(result, HelperOutput):
            # Re-validate so a model built with model_construct() cannot smuggle bad types.
            return validate_output(result.model_dump(), secrets)
        if result is None:
            raise HelperError("empty_output", "python helper returned None")
        return validate_output(result, secrets)

    async def aclose(self) -> None:
        """Nothing to release."""

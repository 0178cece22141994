"""Write a file atomically with tight permissions from its first byte.

One implementation for every secret or state file the project writes (keys, tokens, passwords,
CA material, node config): a temp file in the same directory is created with ``mode`` before any
data is written, then renamed over the target, so a reader never sees a partial file and a
secret is never briefly world-readable. This module imports nothing else from the project.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def write_atomic(
    path: str | Path,
    data: bytes,
    mode: int = 0o600,
    *,
    durable: bool = True,
    make_parents: int | None = None,
) -> Path:
    """Write ``data`` to ``path`` atomically with ``mode``.

    ``durable``: fsync before the rename (survives a crash). ``make_parents``: create missing
    parent directories with this mode (e.g. ``0o700`` for a directory about to hold a key).
    """
    target = Path(path)
    directory = target.parent if str(target.parent) else Path(".")
    if make_parents is not None:
        directory.mkdir(parents=True, exist_ok=True, mode=make_parents)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=f".{target.name}.")
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            if durable:
                fh.flush()
                os.fsync(fh.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return target

"""Write a file atomically with tight permissions from its first byte.

One implementation for every secret or state file the project writes (keys, tokens, passwords,
CA material, node config): a temp file in the same directory is created with ``mode`` before any
data is written, then renamed over the target, so a reader never sees a partial file and a
secret is never briefly world-readable. This module imports nothing else from the project.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from pathlib import Path

#: Temp names are ``.<name>.<pid>.<n>.tmp``, created exclusively and never through a symlink.
_TMP_SEQ = itertools.count()
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC


def write_atomic(
    path: str | os.PathLike[str],
    data: bytes,
    mode: int = 0o600,
    *,
    durable: bool = True,
    make_parents: int | None = None,
) -> Path:
    """Write ``data`` to ``path`` atomically with ``mode``.

    ``durable``: fsync before the rename (survives a crash). ``make_parents``: create missing
    parent directories with this mode (e.g. ``0o700`` for a directory about to hold a key).
    The temp file is created with mode 0600 (``O_EXCL | O_NOFOLLOW``), chmod-ed to ``mode``
    before the first byte, written, renamed over ``path``; on any failure it is removed.
    Plain ``os`` calls (no ``tempfile``, no per-call ``Path`` work): the fleet simulator
    writes six files per node through here.
    """
    target = os.fspath(path)
    head, name = os.path.split(target)
    if make_parents is not None and head:
        Path(head).mkdir(parents=True, exist_ok=True, mode=make_parents)
    while True:
        tmp = os.path.join(head, f".{name}.{os.getpid()}.{next(_TMP_SEQ)}.tmp")
        try:
            fd = os.open(tmp, _TMP_FLAGS, 0o600)
            break
        except FileExistsError:
            continue  # left behind by an earlier process with this pid: take the next name
    try:
        try:
            os.fchmod(fd, mode)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view) :]
            if durable:
                os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return Path(target)

"""Write a file atomically with tight permissions from its first byte; read a small file.

One implementation for every secret or state file the project writes (keys, tokens, passwords,
CA material, node config): a temp file in the same directory is created with ``mode`` before any
data is written, then renamed over the target, so a reader never sees a partial file and a
secret is never briefly world-readable. :func:`read_small` reads a regular file in four system
calls, without the io stack. This module imports nothing else from the project.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import os
import stat
from pathlib import Path

__all__ = ["read_small", "write_atomic", "write_atomic_text_path"]

#: O_NONBLOCK: opening a FIFO planted where a file is expected must not hang the reader.
_READ_FLAGS = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)


def read_small(path: str | os.PathLike[str], max_bytes: int = 16 * 1024 * 1024) -> bytes:
    """The content of the regular file at ``path`` (symlinks followed): ``open``, ``fstat``,
    one ``read``, ``close``, where ``Path.read_bytes`` makes twice the system calls.

    OSError as ``open`` raises it (FileNotFoundError, IsADirectoryError, PermissionError...);
    OSError(EINVAL) for anything but a regular file (a FIFO, a device); OSError(EFBIG) past
    ``max_bytes``.
    """
    fd = os.open(path, _READ_FLAGS)
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            if stat.S_ISDIR(st.st_mode):
                raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), os.fspath(path))
            raise OSError(errno.EINVAL, "not a regular file", os.fspath(path))
        size = st.st_size
        if size > max_bytes:
            raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), os.fspath(path))
        data = os.read(fd, size + 1)  # a short read of a regular file is its end
        if len(data) <= size:
            return data
        chunks = [data]  # it grew since fstat
        total = len(data)
        while chunk := os.read(fd, 65536):
            total += len(chunk)
            if total > max_bytes:
                raise OSError(errno.EFBIG, os.strerror(errno.EFBIG), os.fspath(path))
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


#: Temp names are ``.<name>.<pid>.<n>.tmp``, created exclusively and never through a symlink.
_TMP_SEQ = itertools.count()
_TMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
#: This process's id for temp names (``getpid`` is a system call; refreshed in a forked child).
_PID = [os.getpid()]
os.register_at_fork(after_in_child=lambda: _PID.__setitem__(0, os.getpid()))


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
    writes six files per node through here (:func:`write_atomic_text_path`, which returns
    nothing rather than a new ``Path``).
    """
    target = os.fspath(path)
    if make_parents is not None:
        head = os.path.dirname(target)
        if head:
            Path(head).mkdir(parents=True, exist_ok=True, mode=make_parents)
    write_atomic_text_path(target, data, mode, durable=durable)
    return Path(target)


def write_atomic_text_path(
    target: str | os.PathLike[str], data: bytes, mode: int = 0o600, *, durable: bool = True
) -> None:
    """:func:`write_atomic` (without ``make_parents``) returning nothing."""
    head, name = os.path.split(target)
    while True:
        tmp = os.path.join(head, f".{name}.{_PID[0]}.{next(_TMP_SEQ)}.tmp")
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

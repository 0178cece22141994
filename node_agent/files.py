"""Files a node writes while being provisioned, written like go-choria but safely.

go-choria writes the config as ``key=value`` lines without escaping, lets the
remote pick any absolute ``ssldir``, joins policy names without traversal checks and leaves
partial state behind when a step fails. Here:

* :func:`render_config` refuses keys and values with line breaks (no injected settings);
* :func:`resolve_ssldir` keeps ``ssldir`` under a configured root;
* :func:`check_policy_name` refuses separators, ``..`` and wrong suffixes;
* :class:`FileTransaction` stages every write, applies them with temp file + ``os.replace`` and
  rolls every applied change back if a later one fails, so a failed ``configure`` leaves the
  previous state in place.
"""

from __future__ import annotations

import contextlib
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from choria_core.errors import FleetError
from choria_core.securefile import read_small, write_atomic_text_path

__all__ = [
    "ConfigFileError",
    "FileTransaction",
    "UnsafePathError",
    "check_policy_name",
    "config_bool",
    "parse_config",
    "read_config",
    "read_config_if_exists",
    "render_config",
    "resolve_ssldir",
    "write_file",
]

_LINE_RE = re.compile(r"^(.+?)\s*=\s*(.+)$")
_KEY_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]*\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TRUE = {"1", "t", "true", "y", "yes", "on"}
_FALSE = {"0", "f", "false", "n", "no", "off"}


class ConfigFileError(FleetError, ValueError, reason="config"):
    """A config file or a setting to write is invalid; the message names the key, never a value."""


class UnsafePathError(FleetError, ValueError, reason="unsafe_path"):
    """A remote-supplied path or file name would escape where it is allowed to write."""


# --- config files --------------------------------------------------------------------------


def parse_config(text: str) -> dict[str, str]:
    """Parse a Choria ``key = value`` config: ``#`` comments, blank lines; ``key=`` is ignored.

    Lines that are neither comments nor settings raise ConfigFileError (go-choria ignores them;
    we want ``restart`` to refuse a file it cannot fully understand).
    """
    settings: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line[0] == "#":
            continue
        # the usual line, without the regular expression: the key before the first "=" (not
        # at the start), the value after it; both stripped, the value not empty
        key, eq, value = line.partition("=")
        if eq and line[0] != "=":
            key, value = key.strip(), value.strip()
            if value:
                settings[key] = value
                continue
        match = _LINE_RE.match(line)
        if match is None:
            if line.endswith("="):
                continue  # "key=" with an empty value is ignored, like go-choria
            raise ConfigFileError(f"line {number} is not a 'key = value' setting")
        settings[match.group(1).strip()] = match.group(2).strip()
    return settings


def read_config(path: str | os.PathLike[str]) -> dict[str, str]:
    """Read and parse a config file; errors name the file."""
    config = read_config_if_exists(path)
    if config is None:
        raise ConfigFileError(f"cannot read {path}: FileNotFoundError")
    return config


def read_config_if_exists(path: str | os.PathLike[str]) -> dict[str, str] | None:
    """:func:`read_config`, or None when there is no file at ``path`` (one ``open`` rather
    than ``exists`` then ``open``)."""
    try:
        text = read_small(path).decode("utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigFileError(f"cannot read {path}: {exc.__class__.__name__}") from exc
    try:
        return parse_config(text)
    except ConfigFileError as exc:
        raise ConfigFileError(f"{path}: {exc}") from exc


def config_bool(value: str | None) -> bool | None:
    """Choria-style boolean of a setting; ``None`` when unset, ValueError when not a boolean."""
    if value is None:
        return None
    v = value.strip().lower()
    if v in _TRUE:
        return True
    if v in _FALSE:
        return False
    raise ValueError(f"{value!r} is not a boolean")


def sanitize_header(text: str) -> str:
    """Make remote-supplied text safe for the one-line config header (no line breaks)."""
    return _CONTROL_RE.sub("?", text)[:200]


def render_config(settings: Mapping[str, str], header: str) -> str:
    """The config text: the header comment line, then ``key=value`` lines (sorted keys).

    Refuses keys that are not plain setting names and keys or values with line breaks or other
    control characters, which go-choria would write verbatim (newline injection).
    """
    lines = [f"# {sanitize_header(header)}"]
    for key in sorted(settings):
        value = settings[key]
        if not isinstance(key, str) or not _KEY_RE.match(key):
            shown = sanitize_header(str(key))[:64]
            raise ConfigFileError(f"invalid configuration key {shown!r}")
        if not isinstance(value, str):
            raise ConfigFileError(f"configuration value of {key} must be a string")
        if _CONTROL_RE.search(value):
            raise ConfigFileError(
                f"configuration value of {key} contains a line break or control character"
            )
        lines.append(f"{key}={value}")
    return "\n".join(lines) + "\n"


# --- paths ---------------------------------------------------------------------------------


def resolve_ssldir(requested: str, ssl_root: str | os.PathLike[str]) -> Path:
    """The ``ssldir`` to use, which must be absolute and inside ``ssl_root`` (symlinks resolved)."""
    return Path(resolve_ssldir_text(requested, ssl_root))


#: Where the kernel names an open file by its resolved path (Linux).
_PROC_FD = "/proc/self/fd/"
_O_PATH = getattr(os, "O_PATH", 0)
_HAVE_PROC_FD = bool(_O_PATH) and os.path.isdir(_PROC_FD)


def realpath_dir(path: str | os.PathLike[str]) -> str:
    """``os.path.realpath(path)``; for an existing directory asked of the kernel (open with
    ``O_PATH``, read its ``/proc/self/fd`` link: three system calls), not walked component by
    component with an ``lstat`` each."""
    if _HAVE_PROC_FD:
        try:
            fd = os.open(path, _O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            fd = -1  # missing, or not a directory: the portable way below
        if fd >= 0:
            try:
                resolved = os.readlink(f"{_PROC_FD}{fd}")
            except OSError:
                resolved = ""
            finally:
                os.close(fd)
            if resolved.startswith("/") and not resolved.endswith(" (deleted)"):
                return resolved
    return os.path.realpath(path)


def resolve_ssldir_text(requested: str, ssl_root: str | os.PathLike[str]) -> str:
    """:func:`resolve_ssldir` as text (no ``Path`` made)."""
    if not isinstance(requested, str) or not requested or _CONTROL_RE.search(requested):
        raise UnsafePathError("ssldir must be a non-empty path without control characters")
    if not os.path.isabs(requested):
        raise UnsafePathError(f"ssldir {requested!r} must be an absolute path")
    root = realpath_dir(ssl_root)
    resolved = realpath_dir(requested)
    # both are absolute and normalised: inside means equal, or below root + separator
    if resolved != root and not resolved.startswith(root.rstrip(os.sep) + os.sep):
        raise UnsafePathError(f"ssldir {requested!r} is outside the permitted root {root!r}")
    return resolved


def check_policy_name(name: str, suffix: str) -> str:
    """A policy file name must be a plain file name ending in ``suffix`` (``.policy``/``.rego``)."""
    shown = sanitize_header(str(name))[:64]
    if (
        not isinstance(name, str)
        or "/" in name
        or "\\" in name
        or ".." in name
        or _CONTROL_RE.search(name)
        or name.startswith(".")
        or len(name) > 200
    ):
        raise UnsafePathError(f"invalid policy file name {shown!r}")
    if not name.endswith(suffix) or name == suffix:
        raise UnsafePathError(f"policy file name {shown!r} must end in {suffix}")
    return name


# --- writing -------------------------------------------------------------------------------


def write_file(path: str | os.PathLike[str], data: bytes, mode: int, *, durable: bool) -> None:
    """Replace ``path`` atomically with ``data`` and ``mode`` (tight from the first byte):
    :func:`choria_core.securefile.write_atomic`; ``durable`` adds the fsync."""
    write_atomic_text_path(path, data, mode, durable=durable)


def _existing(path: str) -> tuple[bytes, int] | None:
    """Content and mode of the regular file at ``path`` (symlinks followed); None if there is
    nothing there; IsADirectoryError for anything else (a directory, a dangling symlink)."""
    try:
        st = os.lstat(path)  # one call for the usual case: nothing there yet
    except (FileNotFoundError, NotADirectoryError):
        return None
    if stat.S_ISLNK(st.st_mode):
        try:
            st = os.stat(path)
        except (FileNotFoundError, NotADirectoryError):
            raise IsADirectoryError(f"{path} exists and is not a regular file") from None
    if not stat.S_ISREG(st.st_mode):
        raise IsADirectoryError(f"{path} exists and is not a regular file")
    return read_small(path), st.st_mode & 0o7777


@dataclass(slots=True)
class _Op:
    kind: str  # "write" | "delete" | "mkdir"
    path: str
    data: bytes = b""
    mode: int = 0o600


@dataclass(slots=True)
class _Undo:
    kind: str  # "restore" | "unlink" | "rmdir"
    path: str
    data: bytes = b""
    mode: int = 0o600


class FileTransaction:
    """Stage file writes/deletes/mkdirs, then apply them all or none.

    Nothing touches the disk until :meth:`commit`. If an operation fails mid-way, the ones
    already applied are undone in reverse order (old contents and modes restored, new files and
    directories removed) and the original exception is re-raised.
    """

    def __init__(self, *, durable: bool = True) -> None:
        self._ops: list[_Op] = []
        self._durable = durable

    def mkdir(self, path: str | os.PathLike[str], mode: int = 0o700) -> None:
        """Create ``path`` and missing parents with ``mode`` (kept if it exists)."""
        self._ops.append(_Op("mkdir", os.fspath(path), mode=mode))

    def write(self, path: str | os.PathLike[str], data: bytes, mode: int) -> None:
        """Replace ``path`` with ``data`` and ``mode``."""
        self._ops.append(_Op("write", os.fspath(path), data=data, mode=mode))

    def delete(self, path: str | os.PathLike[str]) -> None:
        """Remove the file ``path`` if it exists."""
        self._ops.append(_Op("delete", os.fspath(path)))

    @property
    def paths(self) -> list[Path]:
        """Staged target paths, in order (for tests and logs)."""
        return [Path(op.path) for op in self._ops]

    def commit(self) -> None:
        """Apply every staged operation; on failure undo the applied ones and re-raise."""
        undo: list[_Undo] = []
        try:
            for op in self._ops:
                self._apply(op, undo)
        except BaseException:
            for u in reversed(undo):
                try:
                    if u.kind == "restore":
                        write_file(u.path, u.data, u.mode, durable=self._durable)
                    elif u.kind == "unlink":
                        with contextlib.suppress(FileNotFoundError):
                            os.unlink(u.path)
                    elif u.kind == "rmdir":
                        os.rmdir(u.path)
                except OSError:
                    pass  # best effort: the original error is what the caller must see
            raise
        finally:
            self._ops = []

    def _apply(self, op: _Op, undo: list[_Undo]) -> None:
        if op.kind == "mkdir":
            missing: list[str] = []
            p = op.path
            while not os.path.exists(p):
                missing.append(p)
                parent = os.path.dirname(p) or os.curdir
                if parent == p:
                    break
                p = parent
            for d in reversed(missing):
                try:
                    os.mkdir(d, op.mode)
                except FileExistsError:
                    if os.path.isdir(d):  # created concurrently (another node in this process)
                        continue
                    raise
                os.chmod(d, op.mode)  # mkdir's mode is filtered by the umask
                undo.append(_Undo("rmdir", d))
            return
        old = _existing(op.path)
        if op.kind == "write":
            write_file(op.path, op.data, op.mode, durable=self._durable)
            undo.append(_Undo("restore", op.path, *old) if old else _Undo("unlink", op.path))
        elif op.kind == "delete" and old is not None:
            os.unlink(op.path)
            undo.append(_Undo("restore", op.path, *old))

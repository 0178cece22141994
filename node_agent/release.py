"""Version upgrades of a node: what ``choria_provision#release_update`` fetches and installs.

go-choria hands ``release_update`` to choria-io/go-updater, whose HTTP(S) repository is laid
out as::

    <repository>/<version>/<os>/<arch>/release.json   {"binary": "choria.bz2", "hash": "<sha256>"}
    <repository>/<version>/<os>/<arch>/choria.bz2      the bzip2-compressed binary

``os``/``arch`` are Go's ``GOOS``/``GOARCH`` names (``linux``/``amd64``), ``binary`` is the file
next to ``release.json`` and ``hash`` the SHA-256 of the binary *after* decompression. This
module reads the same layout, with limits go-updater does not have: every name is checked
(a version or file name cannot leave its directory), ``release.json`` and the download are
bounded in size (compressed and decompressed: no bzip2 bombs), redirects may only go to
http(s), and a repository URL carrying credentials is refused (it would end up in logs).

Nothing is installed unless the checksum matched. The release goes into a fresh directory
``<state_dir>/releases/<version>.<random>/`` (0700) holding ``choria`` (0700: only the node's
own user runs it) and ``release.json``
(version, sha256, source), and the node switches to it by atomically replacing the
``<state_dir>/current`` symlink, so a reader sees the old release or the new one, never half
of one. The previous release is kept (go-updater keeps a backup too); older ones are removed.
:func:`installed_version` is what the node reports as its version after it restarted.
"""

from __future__ import annotations

import bz2
import hashlib
import json
import logging
import os
import platform
import re
import secrets
import shutil
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from choria_core.errors import FleetError
from choria_core.remote_text import clean_remote_text

__all__ = [
    "BINARY_NAME",
    "DEFAULT_MAX_BYTES",
    "ReleaseError",
    "ReleaseRequest",
    "apply_release",
    "binary_path",
    "check_version",
    "go_platform",
    "installed_version",
    "release_base_url",
]

log = logging.getLogger(__name__)

BINARY_NAME = "choria"
SPEC_NAME = "release.json"
#: Largest download and largest decompressed binary accepted by default (256 MiB).
DEFAULT_MAX_BYTES = 256 * 1024 * 1024
MAX_SPEC_BYTES = 64 * 1024
MAX_REPOSITORY_LENGTH = 512  # go-choria's DDL limits
MAX_VERSION_LENGTH = 32
HTTP_TIMEOUT = 15.0
_CHUNK = 64 * 1024

_VERSION_RE = re.compile(r"[0-9A-Za-z][0-9A-Za-z._+~-]{0,31}")
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._+-]{0,127}")
_HASH_RE = re.compile(r"[0-9a-fA-F]{64}")
_GOOS = {"linux": "linux", "darwin": "darwin", "windows": "windows", "freebsd": "freebsd"}
_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "i386": "386",
    "i686": "386",
    "armv7l": "arm",
    "armv6l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


class ReleaseError(FleetError, reason="release"):
    """The release could not be fetched, verified or installed; nothing was changed."""


def go_platform() -> tuple[str, str]:
    """This machine as Go's ``(GOOS, GOARCH)``, e.g. ``("linux", "amd64")``."""
    system, machine = platform.system().lower(), platform.machine().lower()
    return _GOOS.get(system, system), _GOARCH.get(machine, machine)


def check_version(version: str) -> str:
    """``version`` if it is a safe path segment (letters, digits, ``. _ + ~ -``, ≤ 32)."""
    if not _VERSION_RE.fullmatch(version) or ".." in version:
        raise ReleaseError(
            f"invalid version {clean_remote_text(version, 64)}: use at most "
            f"{MAX_VERSION_LENGTH} letters, digits and . _ + ~ -"
        )
    return version


def _check_repository(repository: str) -> str:
    if len(repository) > MAX_REPOSITORY_LENGTH or any(c.isspace() for c in repository):
        raise ReleaseError("invalid repository URL: too long or contains white space")
    parts = urllib.parse.urlsplit(repository)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ReleaseError("invalid repository URL: it must be http:// or https:// with a host")
    if parts.username is not None or parts.password is not None:
        raise ReleaseError("invalid repository URL: credentials in the URL are not supported")
    if parts.query or parts.fragment:
        raise ReleaseError("invalid repository URL: it must not have a query or fragment")
    return repository.rstrip("/")


def release_base_url(repository: str, version: str, os_name: str, arch: str) -> str:
    """``<repository>/<version>/<os>/<arch>``, every part checked."""
    for part in (os_name, arch):
        if not _NAME_RE.fullmatch(part):
            raise ReleaseError(f"invalid platform name {clean_remote_text(part, 64)}")
    return f"{_check_repository(repository)}/{check_version(version)}/{os_name}/{arch}"


def binary_path(state_dir: Path) -> Path:
    """Where the node's installed binary is: ``<state_dir>/current/choria``."""
    return state_dir / "current" / BINARY_NAME


def _read_manifest(directory: Path) -> dict[str, Any] | None:
    try:
        with open(directory / SPEC_NAME, "rb") as fh:
            data = json.loads(fh.read(MAX_SPEC_BYTES))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def installed_version(state_dir: Path) -> str | None:
    """The version of the release ``<state_dir>/current`` points to; None without one."""
    if not os.path.islink(os.path.join(state_dir, "current")):
        return None
    current = state_dir / "current"
    manifest = _read_manifest(current)
    version = manifest.get("version") if manifest else None
    if not isinstance(version, str) or not (current / BINARY_NAME).is_file():
        log.warning("ignoring the unusable release at %s", current)
        return None
    try:
        return check_version(version)
    except ReleaseError:
        log.warning("ignoring the release at %s: invalid version", current)
        return None


# ----------------------------------------------------------------------------- HTTP


class _HTTPOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects to http(s) URLs only (never to ``file:`` or ``ftp:``)."""

    def redirect_request(
        self, req: Any, fp: Any, code: int, msg: str, headers: Any, newurl: str
    ) -> Any:
        if urllib.parse.urlsplit(newurl).scheme not in ("http", "https"):
            raise ReleaseError("the repository redirected to a URL that is not http(s)")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def _open(url: str, timeout: float) -> IO[bytes]:
    opener = urllib.request.build_opener(_HTTPOnlyRedirects)
    # The scheme is http(s): checked in _check_repository, and by _HTTPOnlyRedirects.
    req = urllib.request.Request(url, headers={"User-Agent": "fleet-node-agent"})  # noqa: S310
    try:
        resp: IO[bytes] = opener.open(req, timeout=timeout)
    except urllib.error.HTTPError as exc:
        exc.close()
        raise ReleaseError(f"could not fetch {_show(url)}: HTTP {exc.code}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        why = getattr(exc, "reason", None) or type(exc).__name__
        raise ReleaseError(
            f"could not fetch {_show(url)}: {clean_remote_text(str(why), 200)}"
        ) from None
    return resp


def _show(url: str) -> str:
    return clean_remote_text(url, 600)


def _announced_length(resp: IO[bytes]) -> int | None:
    value = getattr(resp, "headers", {}).get("Content-Length")
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _fetch_spec(base: str, timeout: float) -> tuple[str, str]:
    url = f"{base}/{SPEC_NAME}"
    with _open(url, timeout) as resp:
        body = resp.read(MAX_SPEC_BYTES + 1)
    if len(body) > MAX_SPEC_BYTES:
        raise ReleaseError(f"{_show(url)} is larger than {MAX_SPEC_BYTES} bytes")
    try:
        spec = json.loads(body)
    except ValueError:
        raise ReleaseError(f"{_show(url)} is not valid JSON") from None
    if not isinstance(spec, dict):
        raise ReleaseError(f"{_show(url)} is not a JSON object")
    name, digest = spec.get("binary"), spec.get("hash")
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name) or ".." in name:
        raise ReleaseError(
            f"{_show(url)}: binary must be a plain file name, got {clean_remote_text(name, 100)}"
        )
    if not isinstance(digest, str) or not _HASH_RE.fullmatch(digest):
        raise ReleaseError(f"{_show(url)}: hash must be a hex SHA-256 (64 characters)")
    return name, digest.lower()


# ----------------------------------------------------------------------------- download


class _Inflater:
    """Decompresses bzip2 (one or more streams) into ``sink``, hashing and counting, bounded."""

    def __init__(self, sink: IO[bytes], limit: int) -> None:
        self._dec = bz2.BZ2Decompressor()
        self._sink = sink
        self._limit = limit
        self.size = 0
        self.sha256 = hashlib.sha256()

    def feed(self, data: bytes) -> None:
        try:
            while True:
                if self._dec.eof:
                    data = self._dec.unused_data + data
                    if not data:
                        return
                    self._dec = bz2.BZ2Decompressor()
                out = self._dec.decompress(data, max_length=_CHUNK)
                data = b""
                self._emit(out)
                if not self._dec.eof and self._dec.needs_input:
                    return
        except (OSError, EOFError, ValueError):
            raise ReleaseError("the binary is not valid bzip2 data") from None

    def _emit(self, out: bytes) -> None:
        self.size += len(out)
        if self.size > self._limit:
            raise ReleaseError(f"the binary is larger than {self._limit} bytes decompressed")
        self.sha256.update(out)
        self._sink.write(out)

    def finish(self) -> None:
        if not self._dec.eof:
            raise ReleaseError("the binary is truncated (incomplete bzip2 data)")


def _download(url: str, sink: IO[bytes], limit: int, timeout: float) -> str:
    """Fetch ``url`` (bzip2) into ``sink`` decompressed; returns the hex SHA-256 of the result."""
    inflater = _Inflater(sink, limit)
    received = 0
    with _open(url, timeout) as resp:
        announced = _announced_length(resp)
        if announced is not None and announced > limit:
            raise ReleaseError(f"{_show(url)} is larger than {limit} bytes ({announced})")
        while chunk := resp.read(_CHUNK):
            received += len(chunk)
            if received > limit:
                raise ReleaseError(f"{_show(url)} is larger than {limit} bytes")
            inflater.feed(chunk)
    inflater.finish()
    return inflater.sha256.hexdigest()


# ----------------------------------------------------------------------------- install


@dataclass(frozen=True, slots=True)
class ReleaseRequest:
    """One ``release_update``: where from, which version, where to, and the limits."""

    repository: str
    version: str
    state_dir: Path
    max_bytes: int = DEFAULT_MAX_BYTES
    timeout: float = HTTP_TIMEOUT
    durable: bool = True
    platform: tuple[str, str] | None = None


def apply_release(req: ReleaseRequest) -> Path:
    """Fetch, verify and install the release; returns the new release directory.

    Blocking (run it in a thread). Raises :class:`ReleaseError` with nothing installed.
    """
    os_name, arch = req.platform or go_platform()
    base = release_base_url(req.repository, req.version, os_name, arch)
    name, expected = _fetch_spec(base, req.timeout)
    releases = req.state_dir / "releases"
    try:
        releases.mkdir(parents=True, exist_ok=True, mode=0o700)
        staging = Path(tempfile.mkdtemp(dir=releases, prefix=".incoming-"))
    except OSError as exc:
        raise ReleaseError(f"cannot prepare {releases}: {exc.strerror}") from None
    try:
        target = staging / BINARY_NAME
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o700)
        with os.fdopen(fd, "wb") as fh:
            digest = _download(f"{base}/{name}", fh, req.max_bytes, req.timeout)
            if req.durable:
                fh.flush()
                os.fsync(fh.fileno())
        if not secrets.compare_digest(digest, expected):
            raise ReleaseError(
                f"checksum mismatch for {_show(base + '/' + name)}: "
                f"release.json says {expected}, the binary is {digest}"
            )
        manifest = {"version": req.version, "sha256": digest, "source": f"{base}/{name}"}
        (staging / SPEC_NAME).write_text(json.dumps(manifest) + "\n", encoding="utf-8")
        return _switch(req.state_dir, staging, req.version)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _switch(state_dir: Path, staging: Path, version: str) -> Path:
    """Move ``staging`` into place and point ``current`` at it (one atomic rename)."""
    releases = staging.parent
    final = releases / f"{version}.{secrets.token_hex(4)}"
    current = state_dir / "current"
    previous = os.path.realpath(current) if current.is_symlink() else None
    link = state_dir / f".current-{secrets.token_hex(4)}"
    try:
        os.rename(staging, final)
        os.symlink(os.path.relpath(final, state_dir), link)
        os.replace(link, current)
    except OSError as exc:
        link.unlink(missing_ok=True)
        if final.exists() and not staging.exists():
            shutil.rmtree(final, ignore_errors=True)
        raise ReleaseError(f"cannot install the release: {exc.strerror}") from None
    keep = {final.name, Path(previous).name if previous else ""}
    for old in releases.iterdir():
        if old.name not in keep and not old.name.startswith(".incoming-"):
            shutil.rmtree(old, ignore_errors=True)
    return final

"""Build the compiled example exec helpers (Go, standard library only).

``python -m helpers.examples.gobuild [--out PATH]`` builds ``go/cfssl-authsign`` and prints the
binary's path. Without ``--out`` the binary is cached under
``$XDG_CACHE_HOME/fleet-provisioner/helpers/`` (``~/.cache`` by default), keyed by a hash of
its source and the Go version, so a rebuild only happens when either changes.

The build never touches the network (``GOPROXY=off``; the helpers import the standard library
only) and produces a static binary (``CGO_ENABLED=0``).
Go comes from Debian's ``golang-go`` package (1.19 or newer).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from choria_core.errors import FleetError

SOURCE_ROOT = Path(__file__).resolve().parent / "go"
GO_HINT = "install Go: apt-get install golang-go (or run scripts/install --debian as root)"
#: The compiled examples, by name (a directory under ``go/``).
EXAMPLES = ("cfssl-authsign",)


class GoBuildError(FleetError, RuntimeError, reason="build"):
    """Go is missing or the build failed; the message says what to do."""


def go_binary() -> str | None:
    """The ``go`` command, or None when Go is not installed."""
    found = shutil.which("go")
    if found:
        return found
    # Debian installs the toolchain under /usr/lib/go*/bin and links /usr/bin/go
    for candidate in sorted(Path("/usr/lib").glob("go*/bin/go"), reverse=True):
        if os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def _cache_root() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "fleet-provisioner" / "helpers"


def _build_env(work: Path) -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        CGO_ENABLED="0",
        GOPROXY="off",
        GOFLAGS="-trimpath",
        GOTOOLCHAIN="local",
        GO111MODULE="on",
        GOWORK="off",
    )
    # a read-only or absent HOME must not break the build: keep Go's caches in our own tree
    env.setdefault("GOCACHE", str(work / "gocache"))
    env.setdefault("GOPATH", str(work / "gopath"))
    return env


def _source_digest(source: Path, go: str) -> str:
    digest = hashlib.sha256()
    version = subprocess.run([go, "version"], capture_output=True, text=True, check=False)
    digest.update(version.stdout.encode())
    for path in sorted(p for p in source.rglob("*") if p.is_file()):
        digest.update(path.relative_to(source).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


def build(name: str = "cfssl-authsign", out: Path | None = None) -> Path:
    """Build example ``name`` and return the binary's path (cached unless ``out`` is given)."""
    if name not in EXAMPLES:
        raise GoBuildError(f"unknown compiled example {name!r} (known: {', '.join(EXAMPLES)})")
    go = go_binary()
    if go is None:
        raise GoBuildError(f"Go is not installed; {GO_HINT}")
    source = SOURCE_ROOT / name
    cache = _cache_root()
    if out is None:
        out = cache / f"{name}-{_source_digest(source, go)}" / name
        if out.is_file() and os.access(out, os.X_OK):
            return out
    out.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    cache.mkdir(parents=True, exist_ok=True, mode=0o700)
    # build to a temporary name and rename, so concurrent builders never see half a binary
    fd, tmp_name = tempfile.mkstemp(prefix=f".{name}.", dir=out.parent)
    os.close(fd)
    try:
        proc = subprocess.run(
            [go, "build", "-o", tmp_name, "."],
            cwd=source,
            env=_build_env(cache),
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        if proc.returncode != 0:
            detail = (proc.stderr or proc.stdout).strip()[-2000:]
            raise GoBuildError(f"go build of {name} failed (exit {proc.returncode}): {detail}")
        os.chmod(tmp_name, 0o755)  # noqa: S103 - a program holding no secret; others may run it
        os.replace(tmp_name, out)
    finally:
        if os.path.exists(tmp_name):
            os.unlink(tmp_name)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m helpers.examples.gobuild",
        description="Build a compiled example exec helper and print its path.",
    )
    parser.add_argument("name", nargs="?", default="cfssl-authsign", choices=EXAMPLES)
    parser.add_argument("--out", type=Path, help="where to write the binary (default: cache)")
    args = parser.parse_args(argv)
    try:
        path = build(args.name, args.out)
    except GoBuildError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())

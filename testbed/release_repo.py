"""A local go-updater release repository served over real HTTP on loopback.

It lays releases out the way choria-io/go-updater (and so go-choria's ``release_update``)
reads them, and the node agent's :mod:`node_agent.release` fetches them::

    <root>/<version>/<os>/<arch>/release.json    {"binary": "choria.bz2", "hash": "<sha256>"}
    <root>/<version>/<os>/<arch>/choria.bz2       the bzip2-compressed binary

``hash`` is the SHA-256 of the binary before compression. :meth:`ReleaseRepo.add_release`
writes a good release; its keyword arguments break it on purpose (a wrong hash, a missing
artifact, a hostile ``binary`` name, a raw ``release.json``) for the tests. The server is
``http.server`` in a thread, bound to 127.0.0.1 on a free port; it records every path asked
for (:attr:`ReleaseRepo.requests`)::

    with ReleaseRepo(tmp / "repo") as repo:
        repo.add_release("0.30.0")
        node = NodeAgent(..., allow_update=True)  # release_update with repository=repo.url
"""

from __future__ import annotations

import bz2
import functools
import hashlib
import json
import threading
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from types import TracebackType
from typing import Any

from node_agent.release import go_platform

__all__ = ["ReleaseRepo", "fake_binary"]


def fake_binary(version: str) -> bytes:
    """A small stand-in for a Choria Server binary of ``version``."""
    return f"#!/bin/sh\n# fake choria server\necho 'choria {version}'\n".encode()


class _Handler(SimpleHTTPRequestHandler):
    repo: ReleaseRepo

    def __init__(self, *args: Any, repo: ReleaseRepo, **kwargs: Any) -> None:
        self.repo = repo
        super().__init__(*args, directory=str(repo.root), **kwargs)

    def do_GET(self) -> None:
        self.repo.requests.append(self.path)
        super().do_GET()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet: tests read :attr:`ReleaseRepo.requests` instead."""


class ReleaseRepo:
    """A release repository directory and, while started, its HTTP server."""

    def __init__(self, root: Path, *, platform: tuple[str, str] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        #: ``(os, arch)`` releases are written for: this machine's, as the node agent asks.
        self.platform = platform or go_platform()
        self.requests: list[str] = []
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -------------------------------------------------------------- content

    def release_dir(self, version: str) -> Path:
        os_name, arch = self.platform
        return self.root / version / os_name / arch

    def add_release(
        self,
        version: str,
        binary: bytes | None = None,
        *,
        binary_name: str = "choria.bz2",
        hash_override: str | None = None,
        omit_binary: bool = False,
        spec_text: str | None = None,
    ) -> Path:
        """Write one release; returns its directory.

        ``hash_override`` puts a wrong hash in ``release.json``; ``omit_binary`` leaves the
        artifact out; ``spec_text`` replaces ``release.json`` by this text verbatim.
        """
        data = binary if binary is not None else fake_binary(version)
        directory = self.release_dir(version)
        directory.mkdir(parents=True, exist_ok=True)
        spec = {"binary": binary_name, "hash": hash_override or hashlib.sha256(data).hexdigest()}
        text = spec_text if spec_text is not None else json.dumps(spec, indent=2) + "\n"
        (directory / "release.json").write_text(text, encoding="utf-8")
        safe_name = "/" not in binary_name and binary_name not in ("", ".", "..")
        if not omit_binary and safe_name:
            (directory / binary_name).write_bytes(bz2.compress(data))
        return directory

    # -------------------------------------------------------------- server

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>`` (start the server first)."""
        if self._server is None:
            raise RuntimeError("the release repository is not being served: call start()")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> ReleaseRepo:
        """Serve :attr:`root` on a free loopback port in a daemon thread."""
        if self._server is None:
            handler = functools.partial(_Handler, repo=self)
            self._server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
            self._server.daemon_threads = True
            self._thread = threading.Thread(
                target=self._server.serve_forever, name="release-repo", daemon=True
            )
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None

    def __enter__(self) -> ReleaseRepo:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

"""The reference helper's fork server: exec mode answered by children of a warm process.

A fresh interpreter that signs a certificate with `cryptography` spends most of its CPU
importing (see `docs/helpers.md`). With `--fork-server` the exec command becomes a light client
(`forkserver_client.py`) and the work is done by a child forked from this server, which has
already imported the fast and the full path and checked the configuration. The child runs
exactly what `python -m helpers.reference --config FILE` runs (fast path, then the full path),
with the client's stdin, stdout and stderr (received with SCM_RIGHTS), arguments, environment
and working directory, so outputs and exit statuses are those of plain exec.

The server:

- listens on ``<dir>/<name>.sock`` (0600) in a private directory (0700, ours), where ``name``
  hashes the configuration's real path, the interpreter and the helper's code; it answers only
  peers of its own uid (SO_PEERCRED) whose key is its own;
- before each fork checks that the configuration (and the overlay registry and code the fast
  path's cache is keyed by) did not change; when it did, it refuses the request (the client
  serves it itself) and exits, so the next client starts a server for the new configuration;
- serves at most `MAX_ENV` children at once, reaps them (pidfds), and exits after `IDLE_ENV`
  seconds without a request, on SIGTERM, or when its socket is removed or replaced;
- logs (start, stop, refusals; never a request's data) to ``<name>.log`` beside the socket.

A child watches its connection: when the client goes away (killed by the provisioner's helper
timeout) the child exits at once.
"""

from __future__ import annotations

import contextlib
import gc
import os
import select
import signal
import socket
import struct
import sys
import time
from typing import Any

from helpers.reference.forkserver_child import NO_GO_STATUS, parse, receive, run_child
from helpers.reference.forkserver_client import (
    DIR_ENV,
    IDLE_ENV,
    LOCK_FD_ENV,
    MAX_ENV,
    SERVER_FLAG,
    Location,
    locate,
)

__all__ = [
    "DIR_ENV",
    "IDLE_ENV",
    "MAX_ENV",
    "Server",
    "astop_server",
    "client_command",
    "serve",
    "server_pid",
    "stop_server",
]

_CHECK_EVERY_S = 1.0


class _Stop(SystemExit):
    """SIGTERM: stop serving (a SystemExit, so no ``except Exception`` swallows it)."""


def _log(msg: str) -> None:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime())
    sys.stderr.write(f"{stamp} pid={os.getpid()} {msg}\n")
    sys.stderr.flush()


def _env_number(name: str, default: float, low: float, high: float) -> float:
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return min(max(value, low), high)


# -- what the server keeps warm and watches -----------------------------------------------------


def _warm(config: str) -> list[list[Any]]:
    """Import everything a request uses; the keys (stat/content) the configuration depends on.

    Raises when the configuration does not load: the clients then serve every request
    themselves and report the error in plain exec's words.
    """
    import argparse  # noqa: F401  # the full path's imports, paid once here
    import io  # noqa: F401
    import traceback  # noqa: F401

    from cryptography import x509  # noqa: F401
    from cryptography.hazmat.primitives import hashes, serialization  # noqa: F401
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa  # noqa: F401
    from cryptography.x509.oid import NameOID  # noqa: F401

    import ca_adapters.local  # noqa: F401
    import helpers.reference.__main__
    import helpers.reference.fast as fast
    import helpers.sdk  # noqa: F401
    from ca_adapters.base import SignRequest  # noqa: F401
    from helpers.reference import make_handler

    handle = make_handler(config)
    helper = handle.helper  # type: ignore[attr-defined]
    entry = fast.load_cache(config)
    if entry is None:
        fast.write_cache(config, helper.cfg, helper)
        entry = fast.load_cache(config)
    if entry is not None:
        try:
            _warm_signing(entry)
        except Exception as exc:  # only a warm-up: the children would do it again
            _log(f"signing warm-up failed ({type(exc).__name__})")
        deps: list[list[Any]] = entry["deps"]
        return deps
    return [fast._content_key(config)]


def _warm_signing(entry: dict[str, Any]) -> None:
    """One fast-path decision and one signature for a throwaway identity (no I/O, output
    discarded): the lazy imports, regular expressions and caches that a request fills are
    filled here once instead of in every child."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    from ca_adapters.base import SignRequest
    from ca_adapters.local import LocalCA
    from helpers.reference.fast import decide

    name = "fork-server-warm-up.invalid"
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .sign(key, hashes.SHA256())
    )
    pem = csr.public_bytes(serialization.Encoding.PEM).decode()
    inventory = '{"version": "0.29.4", "facts": {}}'
    with contextlib.suppress(Exception):  # rules may refuse it: then sign below anyway
        decide(entry, {"identity": name, "csr": {"csr": pem}, "inventory": inventory})
    ca = entry["ca"]
    local = LocalCA.from_files(ca["cert"], ca["key"], ca["chain"], name=ca["name"])
    local.sign_sync(SignRequest(identity=name, csr_pem=pem, ttl_s=60.0))


def _code_files() -> list[tuple[str, int, int]]:
    """The project's loaded source files and the interpreter's package directories."""
    roots = ("ca_adapters", "choria_core", "helpers", "jwt_tools", "overlays")
    paths = {
        m.__file__
        for n, m in list(sys.modules.items())
        if n.split(".", 1)[0] in roots and getattr(m, "__file__", None)
    }
    paths |= {p for p in sys.path if p.endswith("-packages")}
    out = []
    for p in sorted(str(x) for x in paths):
        try:
            st = os.stat(p)
        except OSError:
            continue
        out.append((p, st.st_size, st.st_mtime_ns))
    return out


class _Watch:
    """Whether the server may still fork: configuration, code and socket unchanged."""

    def __init__(self, deps: list[list[Any]], sock_path: str) -> None:
        self.deps = deps
        self.sock_path = sock_path
        self.sock_ino = os.stat(sock_path).st_ino
        self.code = _code_files()
        self.checked = time.monotonic()

    def current(self) -> bool:
        from helpers.reference.fast import _dep_key

        try:
            if any(_dep_key(dep) != dep for dep in self.deps):
                return False
        except OSError:
            return False
        return self.periodic(force=False)

    def periodic(self, *, force: bool) -> bool:
        now = time.monotonic()
        if not force and now - self.checked < _CHECK_EVERY_S:
            return True
        self.checked = now
        try:
            if os.stat(self.sock_path).st_ino != self.sock_ino:
                return False
        except OSError:
            return False
        return _code_files() == self.code


# -- the server -------------------------------------------------------------------------------


class Server:
    """Accepts requests, forks a child for each, reaps children, and ends itself."""

    def __init__(self, loc: Location, listener: socket.socket, watch: _Watch) -> None:
        self.loc = loc
        self.listener = listener
        self.watch = watch
        self.children: dict[int, tuple[int, socket.socket]] = {}  # pidfd -> (pid, conn)
        self.max_children = int(_env_number(MAX_ENV, 16, 1, 256))
        self.idle_s = _env_number(IDLE_ENV, 60.0, 0.1, 86400.0)
        self.last_active = time.monotonic()
        self.served = 0
        self.given_up = 0  # children whose client stopped waiting before the go-ahead
        self.accepting = True

    def loop(self) -> None:
        poller = select.poll()
        while True:
            registered = set(self.children)
            listening = self.accepting and len(self.children) < self.max_children
            for fd in registered:
                poller.register(fd, select.POLLIN)
            if listening:
                poller.register(self.listener.fileno(), select.POLLIN)
            if not self.children:
                if not self.accepting:
                    return
                left = self.idle_s - (time.monotonic() - self.last_active)
                if left <= 0:
                    _log(f"idle for {self.idle_s:g}s after {self.served} requests: exiting")
                    return
                timeout_ms = int(min(left, _CHECK_EVERY_S) * 1000) + 1
            else:
                timeout_ms = int(_CHECK_EVERY_S * 1000)
            events = poller.poll(timeout_ms)
            for fd in registered:
                poller.unregister(fd)
            if listening:
                poller.unregister(self.listener.fileno())
            for fd, _ in events:
                if fd in self.children:
                    self._reap(fd)
                elif fd == self.listener.fileno() and self.accepting:
                    self._accept()
            if self.accepting and not self.watch.periodic(force=False):
                self.stop_accepting("the socket, the code or the packages changed")

    def _reap(self, pidfd: int) -> None:
        pid, conn = self.children.pop(pidfd)
        os.close(pidfd)
        try:
            _, status = os.waitpid(pid, 0)
        except ChildProcessError:
            status = 0
        if os.WIFSIGNALED(status):
            msg = b"S%d\n" % os.WTERMSIG(status)
        else:
            msg = b"X%d\n" % os.waitstatus_to_exitcode(status)
            if os.waitstatus_to_exitcode(status) == NO_GO_STATUS:
                self.served, self.given_up = self.served - 1, self.given_up + 1
        try:
            conn.sendall(msg)  # the child usually said it first; the client reads one
        except OSError:
            pass
        conn.close()
        self.last_active = time.monotonic()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
        except (BlockingIOError, InterruptedError):
            return
        self.last_active = time.monotonic()
        try:
            self._serve(conn)
        except Exception as exc:  # one bad client must not end the server
            _log(f"request dropped: {type(exc).__name__}")
            conn.close()

    def _serve(self, conn: socket.socket) -> None:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _, uid, _ = struct.unpack("3i", creds)
        if uid != os.getuid():
            _log(f"refused a client of uid {uid}")
            conn.close()
            return
        fields = receive(conn)
        if fields is None:
            conn.close()
            return
        try:
            request = parse(fields)
            if request[0] != self.loc.key:
                reply = b"Rkey\n"
            elif not self.watch.current():
                reply = b"Rstale\n"
                self.stop_accepting("the configuration or the code changed")
            else:
                self._fork(conn, request)
                return
        except ValueError:
            reply = b"Rbad\n"
        try:
            conn.sendall(reply)
        except OSError:
            pass
        conn.close()

    def _fork(self, conn: socket.socket, request: tuple[Any, ...]) -> None:
        pid = os.fork()
        if pid == 0:
            self.listener.close()
            for pidfd, (_, other) in self.children.items():
                os.close(pidfd)
                other.close()
            run_child(conn, request)  # never returns
        self.children[os.pidfd_open(pid)] = (pid, conn)
        self.served += 1

    def stop_accepting(self, why: str) -> None:
        if not self.accepting:
            return
        self.accepting = False
        _log(f"{why}: no more requests ({self.served} served, {self.given_up} given up)")
        _unlink_if_ours(self.loc, self.watch.sock_ino)
        self.listener.close()


def _unlink_if_ours(loc: Location, ino: int) -> None:
    """Remove the socket if it is still ours (under the start lock: no new server races us)."""
    import fcntl

    try:
        lock = os.open(loc.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if os.stat(loc.socket).st_ino == ino:
            os.unlink(loc.socket)
    except OSError:
        pass
    finally:
        os.close(lock)


def _hold_lock(loc: Location) -> int | None:
    """The start lock: inherited from the client that started us, or taken here."""
    import fcntl

    inherited = os.environ.pop(LOCK_FD_ENV, None)
    if inherited is not None and inherited.isdigit():
        fd = int(inherited)
        try:
            os.set_inheritable(fd, False)
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # ours already: a no-op check
            return fd
        except OSError:
            return None
    fd = os.open(loc.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        return None
    return fd


def _listen(loc: Location) -> socket.socket | None:
    """Bind the socket (under the start lock); None when another server already listens."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(loc.socket)
        return None
    except OSError:
        pass
    finally:
        probe.close()
    try:
        os.unlink(loc.socket)  # a dead server's
    except FileNotFoundError:
        pass
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o177)
    try:
        listener.bind(loc.socket)
    finally:
        os.umask(old)
    os.chmod(loc.socket, 0o600)
    listener.listen(256)
    listener.setblocking(False)
    return listener


def serve(argv: list[str]) -> None:
    """`--config FILE --fork-server-daemon`: run the server of FILE until idle or SIGTERM."""
    if len(argv) != 2 or argv[0] != "--config":
        raise SystemExit("usage: python -m helpers.reference --config FILE --fork-server-daemon")
    loc = locate(argv[1])
    if loc is None:
        raise SystemExit("fork server: no private runtime directory")
    lock = _hold_lock(loc)
    if lock is None:
        _log("another server is starting: exiting")
        return
    try:
        try:
            deps = _warm(loc.config)
        except Exception as exc:  # the clients report it, in plain exec's words
            _log(f"configuration not usable ({type(exc).__name__}): exiting")
            with contextlib.suppress(OSError):
                os.close(os.open(loc.failed, os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600))
                os.utime(loc.failed)
            return
        listener = _listen(loc)
        if listener is None:
            _log("another server is listening: exiting")
            return
        watch = _Watch(deps, loc.socket)
    finally:
        os.close(lock)
    os.chdir("/")
    server = Server(loc, listener, watch)

    def on_term(signum: int, frame: Any) -> None:
        raise _Stop

    signal.signal(signal.SIGTERM, on_term)
    _log(f"serving {loc.config} on {loc.socket}")
    gc.freeze()
    try:
        server.loop()
    except _Stop:
        _log("SIGTERM: exiting")
    finally:
        server.stop_accepting("exiting")


# -- for those who run the helper (the test stack, operators' scripts) -------------------------


def client_command(config: str | os.PathLike[str], *, light: bool = True) -> str:
    """The exec `helper` command that answers through the fork server of ``config``.

    ``light``: the client as a script without site (`python -S .../forkserver_light.py`),
    ~2x cheaper per request than `python -m helpers.reference --config FILE --fork-server`.
    """
    import shlex

    python, cfg = shlex.quote(sys.executable), shlex.quote(os.fspath(config))
    if light:
        script = shlex.quote(os.path.join(os.path.dirname(__file__), "forkserver_light.py"))
        return f"{python} -S {script} --config {cfg}"
    return f"{python} -m helpers.reference --config {cfg} --fork-server"


def server_pid(config: str | os.PathLike[str], directory: str) -> int | None:
    """The pid of the server of ``config`` listening in ``directory`` (SO_PEERCRED), if any."""
    loc = Location(os.path.abspath(directory), os.fspath(config))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(loc.socket)
        creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None
    finally:
        sock.close()
    pid: int = struct.unpack("3i", creds)[0]
    return pid


async def astop_server(config: str | os.PathLike[str], directory: str) -> None:
    """:func:`stop_server` in a thread, then remove ``directory`` (a stack's cleanup step)."""
    import asyncio

    await asyncio.to_thread(stop_server, config, directory, remove_dir=True)


def stop_server(
    config: str | os.PathLike[str],
    directory: str,
    *,
    timeout: float = 5.0,
    remove_dir: bool = False,
) -> None:
    """SIGTERM the server of ``config`` in ``directory`` (if one runs) and wait for it to end.

    ``remove_dir``: then remove ``directory`` too (a private one made for this server)."""
    try:
        _stop(config, directory, timeout)
    finally:
        if remove_dir:
            import shutil

            shutil.rmtree(directory, ignore_errors=True)


def _stop(config: str | os.PathLike[str], directory: str, timeout: float) -> bool:
    pid = server_pid(config, directory)
    if pid is None:
        return False
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            if SERVER_FLAG.encode() not in fh.read().split(b"\0"):
                return False
        os.kill(pid, signal.SIGTERM)
    except OSError:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{pid}/stat", "rb") as fh:
                if fh.read().rsplit(b")", 1)[1].split()[0] == b"Z":
                    break
        except OSError:
            break
        time.sleep(0.02)
    return True

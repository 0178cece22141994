"""The client of the reference helper's fork server (`--fork-server`): a light exec process.

`python -m helpers.reference --config FILE --fork-server` keeps the exec contract (one process
per request; JSON on stdin, JSON on stdout, exit code, stderr) but does not do the work: it
connects to a warm server (`forkserver.py`) on a Unix socket, passes its stdin, stdout and
stderr with SCM_RIGHTS, its arguments, environment and working directory, and exits with the
status of the child the server forked for it (which wrote to those descriptors directly).

Whenever the server cannot take the request (none listening, refused, a changed config, any
error before the child accepted it) the request is served in this process by the plain exec
path, so no request fails because of the server; when none is listening, one is started
(detached, under a lock so that only one starts however many clients arrive at once).

Only `os`, `sys`, `_socket` and `zlib` here (and `fcntl`/`signal` on the rare paths): this
module's import cost is paid by every request. It uses `_socket`, the C module under the
standard `socket`, because `socket` itself (with `enum` and `selectors`) costs more than the
rest of the client; what `socket.send_fds` adds (the SCM_RIGHTS array) is two lines here.

Its lightest form is the script `forkserver_light.py` (no site, no package import; when the
server cannot answer, it replaces itself with plain exec, `python -m helpers.reference`):

    python -S helpers/reference/forkserver_light.py --config FILE
"""

from __future__ import annotations

import _socket
import os
import sys

TYPE_CHECKING = False  # not `typing`: its import alone costs a light client ~20%
if TYPE_CHECKING:
    from collections.abc import Callable

#: Environment: the fork server's directory (socket, lock, log), or "off" to never use one.
DIR_ENV = "REFERENCE_HELPER_FORK_DIR"
#: Environment (server side): seconds without a request before the server exits (default 60).
IDLE_ENV = "REFERENCE_HELPER_FORK_IDLE"
#: Environment (server side): children served at once (default 16); more clients wait.
MAX_ENV = "REFERENCE_HELPER_FORK_MAX"
#: Environment (client side): seconds to wait for the server to take the request (while it
#: starts, or while it serves its maximum of children) before serving it in process (default
#: 10; 0: never wait).
WAIT_ENV = "REFERENCE_HELPER_FORK_WAIT"
#: Environment of the server process only: the inherited descriptor of the held start lock.
LOCK_FD_ENV = "REFERENCE_HELPER_FORK_LOCK_FD"
#: The server's command-line flag (also what the benchmark's CPU sampler looks for).
SERVER_FLAG = "--fork-server-daemon"
PROTOCOL = "reference-helper-fork/1"
MAX_REQUEST = 1 << 20
_MODE_ENV = "PROVISIONER_HELPER_MODE"
_SUN_PATH_MAX = 100
_FAILED_BACKOFF_S = 10.0


class Location:
    """Where the server of one configuration lives, and the key its requests must match."""

    __slots__ = ("config", "directory", "failed", "key", "lock", "log", "name", "socket")

    def __init__(self, directory: str, config: str) -> None:
        self.directory = directory
        self.config = os.path.realpath(config)
        here = os.path.dirname(os.path.abspath(__file__))
        code = []
        with os.scandir(here) as entries:
            for e in entries:
                if e.name.endswith(".py"):
                    st = e.stat()
                    code.append(f"{e.name}:{st.st_size}:{st.st_mtime_ns}")
        code.sort()
        #: what must be equal for a server to answer: config, interpreter, helper code
        self.key = "\n".join([PROTOCOL, self.config, sys.executable, sys.version, here, *code])
        raw = self.key.encode("utf-8", "surrogateescape")
        import zlib

        self.name = f"{zlib.crc32(raw):08x}{zlib.adler32(raw):08x}"
        base = os.path.join(directory, self.name)
        self.socket, self.lock, self.log = base + ".sock", base + ".lock", base + ".log"
        #: touched by a server whose configuration did not load (clients back off a while)
        self.failed = base + ".failed"


def runtime_dir() -> str | None:
    """The private directory of fork servers; None when disabled (env `DIR_ENV=off`)."""
    value = os.environ.get(DIR_ENV)
    if value is not None:
        return None if value.strip() in ("", "off") else value
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    if xdg and os.path.isabs(xdg):
        return os.path.join(xdg, "fleet-provisioner-reference-helper")
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(cache, "fleet-provisioner", "reference-helper", "fork")


def private_dir(path: str, *, create: bool) -> bool:
    """True when ``path`` is a directory of ours that no one else can enter (0700)."""
    try:
        if create:
            os.makedirs(path, mode=0o700, exist_ok=True)
        st = os.lstat(path)
    except OSError:
        return False
    return (
        (st.st_mode & 0o170000) == 0o040000  # a directory, not a symlink to one
        and st.st_uid == os.getuid()
        and not st.st_mode & 0o077
    )


def locate(config: str) -> Location | None:
    """The location for ``config``; None when fork servers are off or cannot be used."""
    directory = runtime_dir()
    if directory is None:
        return None
    directory = os.path.abspath(directory)
    if len(directory) + 22 > _SUN_PATH_MAX or not private_dir(directory, create=True):
        return None
    return Location(directory, config)


def exec_config(argv: list[str]) -> str | None:
    """The `--config` path when ``argv`` is a plain exec request (also `fast.config_from_argv`)."""
    if os.environ.get(_MODE_ENV, "").lower() == "persistent":
        return None
    if len(argv) == 2 and argv[0] == "--config" and argv[1]:
        return argv[1]
    if len(argv) == 1 and argv[0].startswith("--config=") and len(argv[0]) > 9:
        return argv[0][9:]
    return None


def encode_request(key: str, argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    """Length-prefixed, NUL-separated fields: key, cwd, argc, argv..., NAME=value..."""
    fields = [key, cwd, str(len(argv)), *argv, *(f"{k}={v}" for k, v in env.items())]
    body = "\0".join(fields).encode("utf-8", "surrogateescape")
    return len(body).to_bytes(4, "big") + body


def _connect(path: str) -> _socket.socket | None:
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return sock


def _die_like(sig: int) -> int:
    """End this process as the child ended (killed by ``sig``), as a plain exec would."""
    import signal

    sys.stdout.flush()
    sys.stderr.flush()
    try:
        signal.signal(sig, signal.SIG_DFL)
        os.kill(os.getpid(), sig)
    except (OSError, ValueError):
        pass
    return 128 + sig


def _await_status(sock: _socket.socket, deadline: float) -> int | None:
    """The child's exit status; None when the server did not take the request in time.

    The child touches nothing before our go-ahead (`G`), so giving up before it is safe."""
    import time

    accepted, buf = False, b""
    while True:
        try:
            if not accepted:
                sock.settimeout(max(deadline - time.monotonic(), 0.001))
            chunk = sock.recv(256)
        except InterruptedError:
            continue
        except OSError:  # a timeout before the go-ahead, or the server went away
            chunk = b""
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            kind, value = line[:1], line[1:]
            if kind == b"A" and not accepted:
                sock.settimeout(None)
                fds = b"".join(fd.to_bytes(4, sys.byteorder) for fd in (0, 1, 2))  # C ints
                sock.sendmsg([b"G"], [(_socket.SOL_SOCKET, _socket.SCM_RIGHTS, fds)])
                accepted = True
            elif kind == b"X" and value.isdigit() and accepted:
                return int(value)
            elif kind == b"S" and value.isdigit() and accepted:
                return _die_like(int(value))
            elif not accepted:
                return None  # refused (R), or a child that never started
    if not accepted:
        return None
    # The child took stdin and may have written: it cannot be replayed here.
    os.write(2, b"reference helper: the fork server lost this request\n")
    return 70


def via_server(loc: Location, argv: list[str]) -> int | None:
    """Have the server's child answer; its exit status, or None (serve it here)."""
    import time

    deadline = time.monotonic() + _env_seconds(WAIT_ENV, 10.0)
    sock = _connect(loc.socket)
    if sock is None:
        if not start_server(loc):
            return None
        sock = _await_server(loc, deadline)
        if sock is None:
            return None
    try:
        request = encode_request(loc.key, argv, os.getcwd(), dict(os.environ))
        if len(request) > MAX_REQUEST:
            return None
        sock.sendall(request)
        return _await_status(sock, deadline)
    except OSError:
        return None
    finally:
        sock.close()


def _env_seconds(name: str, default: float) -> float:
    try:
        return min(max(float(os.environ.get(name, default)), 0.0), 60.0)
    except ValueError:
        return default


def _open_lock(loc: Location) -> int | None:
    try:
        return os.open(loc.lock, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except OSError:
        return None


def start_server(loc: Location) -> bool:
    """Start the server of ``loc`` unless one is starting or listening (best effort).

    True when a server is starting (this call started it, or another process holds the start
    lock); False when none will (disabled, failed recently, or no lock file)."""
    import fcntl

    try:
        failed = os.stat(loc.failed).st_mtime
    except OSError:
        failed = 0.0
    import time

    if time.time() - failed < _FAILED_BACKOFF_S:
        return False  # its configuration did not load a moment ago: do not retry per request
    lock = _open_lock(loc)
    if lock is None:
        return False
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(lock)  # another client is starting it
        return True
    try:
        probe = _connect(loc.socket)
        if probe is not None:  # started while we looked
            probe.close()
            return True
        return _spawn(loc, lock)
    finally:
        os.close(lock)  # the server holds the lock (same open file) until it listens


def _await_server(loc: Location, deadline: float) -> _socket.socket | None:
    """A connection to the starting server, waiting until ``deadline`` (sleeping, not spinning).

    Stops early when the start lock is free and nothing listens (the server gave up)."""
    import fcntl
    import time

    lock = _open_lock(loc)
    if lock is None:
        return None
    try:
        while time.monotonic() < deadline:
            time.sleep(0.01)
            sock = _connect(loc.socket)
            if sock is not None:
                return sock
            try:
                fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except OSError:
                continue  # still starting
            fcntl.flock(lock, fcntl.LOCK_UN)
            return _connect(loc.socket)  # it listened just now, or it is gone
        return None
    finally:
        os.close(lock)


def _spawn(loc: Location, lock: int) -> bool:
    env = dict(os.environ)
    env[LOCK_FD_ENV] = str(lock)
    args = [sys.executable, "-m", "helpers.reference", "--config", loc.config, SERVER_FLAG]
    pid = os.fork()
    if pid == 0:  # pragma: no cover - runs in the forked process
        try:
            os.setsid()
            if os.fork():
                os._exit(0)
            null = os.open(os.devnull, os.O_RDWR)
            log = os.open(loc.log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
            os.dup2(null, 0)
            os.dup2(log, 1)
            os.dup2(log, 2)
            os.set_inheritable(lock, True)
            os.execve(sys.executable, args, env)  # noqa: S606 - this interpreter, no shell
        finally:
            os._exit(127)
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    return True


def run(argv: list[str], fallback: Callable[[list[str]], None]) -> None:
    """`--fork-server` (removed from ``argv``): answer through the server, else ``fallback``."""
    config = exec_config(argv)
    loc = locate(config) if config is not None else None
    code = via_server(loc, argv) if loc is not None else None
    if code is None:
        fallback(argv)
        return
    raise SystemExit(code)


def exec_plain(argv: list[str]) -> None:
    """The script form's fallback: become `python -m helpers.reference ARGV` (stdin unread)."""
    try:
        os.execv(sys.executable, [sys.executable, "-m", "helpers.reference", *argv])  # noqa: S606
    except OSError as exc:
        os.write(2, f"reference helper: cannot run {sys.executable}: {exc}\n".encode())
        raise SystemExit(127) from None

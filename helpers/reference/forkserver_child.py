"""One request of the reference helper's fork server: receiving it, and the forked child.

The server (`forkserver.py`) accepts a connection, checks the peer, reads the request with
:func:`receive` (arguments, working directory, environment) and forks; the child
(:func:`run_child`) takes the client's working directory and environment, says `A`, and waits
for the client's go-ahead `G`, which carries the client's stdin, stdout and stderr (SCM_RIGHTS).
Only then does it take them over and run plain exec's entry point,
`helpers.reference.__main__.main`. A client that stopped waiting (the server was busy) has
therefore lent no descriptor and lost no byte of its stdin: it answers the request itself.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import threading
from typing import Any

from helpers.reference.forkserver_client import MAX_REQUEST

_RECV_TIMEOUT_S = 5.0
_GO_TIMEOUT_S = 30.0
#: The exit status of a child whose client stopped waiting (never sent to a client).
NO_GO_STATUS = 125


def receive(conn: socket.socket) -> list[str] | None:
    """The request's fields (length-prefixed, NUL-separated); None if bad or too big."""
    conn.settimeout(_RECV_TIMEOUT_S)
    data = b""
    try:
        while len(data) < 4 or len(data) < 4 + int.from_bytes(data[:4], "big"):
            if len(data) >= 4 and int.from_bytes(data[:4], "big") > MAX_REQUEST:
                return None
            chunk = conn.recv(1 << 16)
            if not chunk:
                return None
            data += chunk
    except OSError:
        return None
    body = data[4 : 4 + int.from_bytes(data[:4], "big")]
    return body.decode("utf-8", "surrogateescape").split("\0")


def _take_stdio(conn: socket.socket) -> bool:
    """Wait for the go-ahead and the client's three descriptors; make them ours (0, 1, 2)."""
    conn.settimeout(_GO_TIMEOUT_S)
    msg, fds, flags, _ = socket.recv_fds(conn, 1, 3)
    if msg != b"G" or len(fds) != 3 or flags & socket.MSG_CTRUNC:
        return False
    for target, fd in enumerate(fds):
        os.dup2(fd, target)
        os.close(fd)
    conn.settimeout(None)
    return True


def parse(fields: list[str]) -> tuple[str, str, list[str], dict[str, str]]:
    key, cwd, argc = fields[0], fields[1], int(fields[2])
    argv = fields[3 : 3 + argc]
    env: dict[str, str] = {}
    for item in fields[3 + argc :]:
        name, sep, value = item.partition("=")
        if not sep or not name:
            raise ValueError("bad environment entry")
        env[name] = value
    if len(argv) != argc:
        raise ValueError("bad argument count")
    return key, cwd, argv, env


def _exit_code(exc: SystemExit) -> int:
    """The status Python gives an uncaught SystemExit (printing a non-int code to stderr)."""
    code = exc.code
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    sys.stderr.write(f"{code}\n")
    return 1


def _watch_client(conn: socket.socket) -> None:
    """In the child: the client sends nothing more, so a readable socket means it is gone."""
    try:
        conn.settimeout(None)
        while conn.recv(64):
            pass
    except OSError:
        pass
    os._exit(1)


def run_child(conn: socket.socket, request: tuple[Any, ...]) -> None:
    """The forked child: become the client's process and run plain exec's entry point."""
    code = 1
    try:
        _, cwd, argv, env = request
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.chdir(cwd)
        os.environ.clear()
        os.environ.update(env)
    except BaseException:
        try:
            conn.sendall(b"Rsetup\n")
        finally:
            os._exit(0)
    try:
        conn.sendall(b"A\n")
        go = _take_stdio(conn)
    except BaseException:
        go = False
    if not go:  # the client stopped waiting and answers itself: nothing of it was touched
        os._exit(NO_GO_STATUS)
    threading.Thread(target=_watch_client, args=(conn,), daemon=True).start()
    try:
        from helpers.reference.__main__ import main

        main(list(argv))
        code = 0
    except SystemExit as exc:
        code = _exit_code(exc)
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):  # a closed pipe: the status still goes out
            stream.flush()
    try:
        conn.sendall(b"X%d\n" % code)
    finally:
        os._exit(code)

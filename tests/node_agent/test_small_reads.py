"""Reading small files without the io stack (:func:`choria_core.securefile.read_small`) and what
the node builds on it: config files read in one ``open``, the old content a transaction keeps
for its rollback, the key ``configure`` checks a certificate against."""

from __future__ import annotations

import asyncio
import errno
import os
import random
import time
from pathlib import Path
from typing import Any, cast

import pytest

from choria_core.protocol import (
    Request,
    RPCReply,
    TransportHeaders,
    encode_rpc_request,
    new_request,
)
from choria_core.securefile import read_small
from node_agent.alive import alive_clock
from node_agent.dispatch import RequestDispatcher
from node_agent.files import (
    _LINE_RE,
    ConfigFileError,
    FileTransaction,
    UnsafePathError,
    parse_config,
    read_config,
    read_config_if_exists,
    realpath_dir,
    resolve_ssldir_text,
)
from node_agent.provision_agent import _config_target


def test_read_small_reads_a_regular_file_through_a_symlink(tmp_path: Path) -> None:
    target = tmp_path / "f"
    target.write_bytes(b"line1\r\nline2\n")
    (tmp_path / "link").symlink_to(target)
    assert read_small(target) == b"line1\r\nline2\n"  # bytes as they are (no newline mangling)
    assert read_small(str(tmp_path / "link")) == b"line1\r\nline2\n"
    (tmp_path / "empty").write_bytes(b"")
    assert read_small(tmp_path / "empty") == b""


def test_read_small_refuses_what_is_not_a_small_regular_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        read_small(tmp_path / "missing")
    with pytest.raises(IsADirectoryError):
        read_small(tmp_path)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    started = time.monotonic()
    with pytest.raises(OSError) as info:
        read_small(fifo)  # a FIFO planted where a file is expected does not hang the reader
    assert info.value.errno == errno.EINVAL and time.monotonic() - started < 1
    (tmp_path / "big").write_bytes(b"x" * 100)
    with pytest.raises(OSError) as info:
        read_small(tmp_path / "big", max_bytes=99)
    assert info.value.errno == errno.EFBIG
    assert read_small(tmp_path / "big", max_bytes=100) == b"x" * 100


def test_config_read_in_one_open(tmp_path: Path) -> None:
    path = tmp_path / "server.conf"
    assert read_config_if_exists(path) is None
    with pytest.raises(ConfigFileError, match="FileNotFoundError"):
        read_config(path)
    path.write_text("# header\r\nidentity = n1\r\nplugin.choria.server.provision=false\n")
    assert read_config_if_exists(path) == read_config(path)
    assert read_config(path) == {"identity": "n1", "plugin.choria.server.provision": "false"}
    path.write_bytes(b"identity=\xff\n")
    with pytest.raises(ConfigFileError, match="UnicodeDecodeError"):
        read_config_if_exists(path)
    with pytest.raises(ConfigFileError, match="IsADirectoryError"):
        read_config_if_exists(tmp_path)


def test_transaction_rolls_back_to_content_read_through_a_symlink(tmp_path: Path) -> None:
    real = tmp_path / "real.conf"
    real.write_bytes(b"old")
    real.chmod(0o640)
    (tmp_path / "server.conf").symlink_to(real)
    (tmp_path / "blocker").mkdir()
    tx = FileTransaction(durable=False)
    tx.write(str(tmp_path / "server.conf"), b"new", 0o600)
    tx.write(tmp_path / "new-file", b"1", 0o600)
    tx.write(tmp_path / "blocker", b"cannot replace a directory", 0o600)
    assert tx.paths == [tmp_path / "server.conf", tmp_path / "new-file", tmp_path / "blocker"]
    with pytest.raises(IsADirectoryError):
        tx.commit()
    # the replaced link is a file again holding the old content and mode; the new file is gone
    assert (tmp_path / "server.conf").read_bytes() == b"old"
    assert (tmp_path / "server.conf").stat().st_mode & 0o777 == 0o640
    assert not (tmp_path / "new-file").exists()


def test_transaction_mkdir_makes_missing_parents_from_text_paths(tmp_path: Path) -> None:
    tx = FileTransaction(durable=False)
    tx.mkdir(str(tmp_path / "a" / "b" / "ssl"), 0o700)
    tx.write(str(tmp_path / "a" / "b" / "ssl" / "k.pem"), b"k", 0o600)
    tx.mkdir(tmp_path / "a" / "b" / "ssl", 0o700)  # exists: kept
    tx.commit()
    assert (tmp_path / "a" / "b" / "ssl" / "k.pem").read_bytes() == b"k"
    for d in ("a", "a/b", "a/b/ssl"):
        assert (tmp_path / d).stat().st_mode & 0o777 == 0o700


async def test_drain_does_not_wait_for_finished_actions() -> None:
    dispatcher = RequestDispatcher("n1.example.net", {})

    async def _action() -> None:
        return None

    finished = asyncio.get_running_loop().create_task(_action())
    dispatcher.tasks.add(finished)
    await asyncio.sleep(0)
    assert finished.done() and finished in dispatcher.tasks  # its done callback not run yet
    passes: list[int] = []
    asyncio.get_running_loop().call_soon(passes.append, 1)
    await dispatcher.drain()
    # no pass of the loop went by: whatever the caller writes next joins the reply's write
    assert passes == []


# --- resolved paths asked of the kernel -----------------------------------------------------------


def test_realpath_dir_agrees_with_realpath(tmp_path: Path) -> None:
    real = tmp_path / "real" / "ssl"
    real.mkdir(parents=True)
    (tmp_path / "via").symlink_to(tmp_path / "real")
    (tmp_path / "sslink").symlink_to(real)
    (tmp_path / "file").write_text("x")
    for path in (
        real,
        tmp_path / "via" / "ssl",  # a symlinked directory on the way
        tmp_path / "sslink",  # the directory itself a symlink
        tmp_path / "via" / "ssl" / "..",  # ".." after a symlink: physical, as realpath
        tmp_path / "missing" / "ssl",  # not there: realpath's answer
        tmp_path / "file",  # not a directory: realpath's answer
    ):
        assert realpath_dir(path) == os.path.realpath(path), path
        assert realpath_dir(str(path)) == os.path.realpath(path), path


def test_ssldir_through_a_link_out_of_the_root_is_refused(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "ssl").mkdir(parents=True)
    (tmp_path / "elsewhere").mkdir()
    (root / "escape").symlink_to(tmp_path / "elsewhere")
    assert resolve_ssldir_text(str(root / "ssl"), root) == os.path.realpath(root / "ssl")
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_ssldir_text(str(root / "escape"), root)
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_ssldir_text(str(root / "ssl" / ".." / ".."), root)
    # a root that is itself a link is resolved too
    (tmp_path / "rootlink").symlink_to(root)
    assert resolve_ssldir_text(str(root / "ssl"), tmp_path / "rootlink") == str(
        (root / "ssl").resolve()
    )


def test_config_is_written_through_a_symlinked_config_file(tmp_path: Path) -> None:
    real = tmp_path / "etc" / "server.conf"
    real.parent.mkdir()
    real.write_text("old\n")
    (tmp_path / "state").mkdir()
    link = tmp_path / "state" / "server.conf"
    link.symlink_to(real)
    assert _config_target(link) == str(real)
    plain = tmp_path / "state" / "other.conf"
    assert _config_target(plain) == str(plain)  # no link: written where it is


def test_realpath_dir_asks_the_kernel_for_an_existing_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    expected = os.path.realpath(tmp_path / "real")

    def _walk(path: object) -> str:
        raise AssertionError("walked component by component")

    monkeypatch.setattr(os.path, "realpath", _walk)
    assert realpath_dir(tmp_path / "link") == expected


# --- action deadlines on the loop's shared clock ------------------------------------------------


class _SlowAgent:
    name = "slow"
    timeout = 0.1

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds

    async def dispatch(self, action: str, data: dict[str, Any], env: Any) -> RPCReply:
        await asyncio.sleep(self.seconds)
        return RPCReply(action, data={"ok": True})


class _Link:
    server_url = "nats://127.0.0.1:4222"

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes]] = []

    async def publish(self, subject: str, data: bytes) -> None:
        self.sent.append((subject, data))

    async def close(self) -> None:
        return None


def _request() -> tuple[Request, TransportHeaders]:
    req = new_request(
        agent="slow",
        collective="provisioning",
        callerid="choria=prov.example.net",
        senderid="prov.example.net",
        payload=encode_rpc_request("slow", "go", {}),
    )
    return req, TransportHeaders(reply_to="reply.1")


async def test_an_action_past_its_agents_timeout_gets_no_reply(
    caplog: pytest.LogCaptureFixture,
) -> None:
    dispatcher = RequestDispatcher("n1.example.net", {})
    link = _Link()
    dispatcher.link = cast(Any, link)
    clock = alive_clock()
    scheduled = len(clock)
    req, headers = _request()
    with caplog.at_level("WARNING", logger="node_agent.dispatch"):
        await dispatcher._handle_rpc(cast(Any, _SlowAgent(5.0)), req, headers)
    assert link.sent == [] and "slow#go timed out" in caplog.text
    assert len(clock) == scheduled  # the deadline left the clock
    await dispatcher._handle_rpc(cast(Any, _SlowAgent(0.0)), req, headers)
    assert len(link.sent) == 1 and len(clock) == scheduled


async def test_an_action_cancelled_by_its_node_stays_cancelled() -> None:
    dispatcher = RequestDispatcher("n1.example.net", {})
    link = _Link()
    dispatcher.link = cast(Any, link)
    req, headers = _request()
    task = asyncio.get_running_loop().create_task(
        dispatcher._handle_rpc(cast(Any, _SlowAgent(5.0)), req, headers)
    )
    await asyncio.sleep(0.02)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert link.sent == []


def _parse_by_regex(text: str) -> dict[str, str] | str:
    """The config parser as it was: one regular expression per line."""
    settings: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _LINE_RE.match(line)
        if match is None:
            if line.endswith("="):
                continue
            return f"line {number}"
        settings[match.group(1).strip()] = match.group(2).strip()
    return settings


def test_config_lines_parse_as_the_regular_expression_did() -> None:
    rng = random.Random(18)
    alphabet = ["a", "b.c", "=", " ", "\t", "#", "x", "\u00a0", "\u3000", "é", "1"]
    for _ in range(5000):
        text = "\n".join(
            "".join(rng.choice(alphabet) for _ in range(rng.randrange(0, 8)))
            for _ in range(rng.randrange(1, 4))
        )
        expected = _parse_by_regex(text)
        if isinstance(expected, str):
            with pytest.raises(ConfigFileError, match=expected):
                parse_config(text)
        else:
            assert parse_config(text) == expected, repr(text)

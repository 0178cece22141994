"""The real nats-server launcher: starts, isolates accounts, restarts, stops by PID."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nats
import pytest
from nats.errors import NoServersError

from choria_core.natsconn import sync_flush
from testbed.natsserver import NatsServer

pytestmark = pytest.mark.integration


async def test_server_accepts_provisioner_and_isolates_accounts(nats_server: NatsServer) -> None:
    prov_user, prov_pw = nats_server.users["provisioner"]
    choria_user, choria_pw = nats_server.users["choria"]
    prov = await nats.connect(nats_server.url, user=prov_user, password=prov_pw)
    other = await nats.connect(nats_server.url, user=choria_user, password=choria_pw)
    try:
        seen: list[bytes] = []

        async def cb(msg: nats.aio.msg.Msg) -> None:
            seen.append(msg.data)

        await prov.subscribe("provisioning.node.x", cb=cb)
        await sync_flush(prov)
        await other.publish("provisioning.node.x", b"from-choria-account")
        await prov.publish("provisioning.node.x", b"from-provisioning")
        await prov.flush()
        await other.flush()
        await asyncio.sleep(0.2)
        assert seen == [b"from-provisioning"]
        js = prov.jetstream()
        kv = await js.create_key_value(bucket="T", history=1)
        assert await kv.create("k", b"v") == 1
    finally:
        await prov.close()
        await other.close()


async def test_wrong_password_is_refused(nats_server: NatsServer) -> None:
    errors: list[Exception] = []

    async def err_cb(e: Exception) -> None:
        errors.append(e)

    with pytest.raises((NoServersError, nats.errors.Error, OSError)):
        await nats.connect(
            nats_server.url,
            user="provisioner",
            password="wrong",
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=2,
            error_cb=err_cb,
        )


def test_restart_keeps_port_and_stop_kills_process(nats_server: NatsServer) -> None:
    pid = nats_server.pid
    assert pid is not None and nats_server.running()
    port = nats_server.port
    nats_server.restart()
    assert nats_server.port == port
    assert nats_server.pid != pid
    new_pid = nats_server.pid
    assert new_pid is not None
    nats_server.stop()
    assert not nats_server.running()
    with pytest.raises(ProcessLookupError):
        os.kill(new_pid, 0)


def test_server_dies_with_its_parent(tmp_path: Path) -> None:
    """A server started with die_with_parent goes away when its starter is SIGKILLed."""
    script = (
        "import sys, time; from pathlib import Path\n"
        "from testbed.natsserver import start_nats_server\n"
        "s = start_nats_server(Path(sys.argv[1]), die_with_parent=True)\n"
        "print(s.pid, flush=True); time.sleep(60)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None
        child = int(proc.stdout.readline())
        os.kill(child, 0)  # running
        proc.kill()
        proc.wait(timeout=10)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.kill(child, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
        os.kill(child, signal.SIGKILL)
        raise AssertionError("nats-server outlived the process that started it")
    finally:
        if proc.poll() is None:
            proc.kill()

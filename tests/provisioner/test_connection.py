"""Closing the broker connection at stop: bounded, and a stray CancelledError from nats-py's
own tasks neither escapes nor skips the rest of the stop (the audit log is still closed)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from provisioner import connection
from provisioner.config import ProvisionerConfig
from provisioner.service import Provisioner


class _FakeNC:
    """A connection whose drain/close misbehave as told."""

    def __init__(self, drain: str = "ok", close: str = "ok") -> None:
        self.behaviour = {"drain": drain, "close": close}
        self.calls: list[str] = []
        self.is_closed = False
        self.is_connected = True

    async def _step(self, name: str) -> None:
        self.calls.append(name)
        how = self.behaviour[name]
        if how == "stray_cancel":
            raise asyncio.CancelledError  # as nats-py's reconnect task can leak it
        if how == "hang":
            await asyncio.sleep(3600)
        if how == "error":
            raise ConnectionError("already gone")
        if name == "close":
            self.is_closed = True

    async def drain(self) -> None:
        await self._step("drain")

    async def close(self) -> None:
        await self._step("close")


@pytest.mark.parametrize("drain", ["ok", "stray_cancel", "error"])
async def test_close_swallows_a_stray_cancel_and_still_closes(drain: str) -> None:
    nc = _FakeNC(drain=drain)
    await connection.close(nc, timeout=1)
    assert nc.calls == ["drain", "close"] and nc.is_closed


async def test_close_is_bounded() -> None:
    nc = _FakeNC(drain="hang", close="hang")
    loop = asyncio.get_running_loop()
    started = loop.time()
    await connection.close(nc, timeout=0.1)
    assert nc.calls == ["drain", "close"]
    assert loop.time() - started < 2


async def test_a_real_cancellation_of_the_caller_propagates() -> None:
    nc = _FakeNC(drain="hang")
    task = asyncio.create_task(connection.close(nc, timeout=60))
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert nc.calls == ["drain"]  # it stopped there: nothing swallowed the cancellation


async def test_stop_survives_a_stray_cancel_and_closes_the_audit_log(tmp_path: Path) -> None:
    audit_path = tmp_path / "audit.jsonl"
    prov = Provisioner(ProvisionerConfig(audit_log=str(audit_path)))
    await prov.audit.start()
    nc = _FakeNC(drain="stray_cancel", close="stray_cancel")
    # As if started: connected, nothing else set up.
    prov.nc = nc
    prov._running = True
    prov.audit.record({"event": "test", "identity": None})
    await prov.stop()
    assert nc.calls == ["drain", "close"]
    assert audit_path.read_text().count('"event":"test"') == 1  # flushed and closed
    assert prov.audit._fd is None
    assert not prov.ready()

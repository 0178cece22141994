"""A minimal provisioner for tests: on each startup event, jwt → configure → restart."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from nats.aio.msg import Msg

from choria_core.natsconn import sync_flush
from choria_core.protocol import parse_event
from testbed.natsserver import NatsServer, start_nats_server
from tests.node_agent.client import TOKEN, ProvClient


def plain_server(workdir: Path) -> NatsServer:
    """A nats-server without accounts or auth: the 'overlay' broker of the simpler tests."""
    return start_nats_server(
        workdir, config_text="listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n"
    )


class HandProvisioner:
    def __init__(self, client: ProvClient, overlay: NatsServer) -> None:
        self.client = client
        self.overlay = overlay
        self.done: list[str] = []
        self.errors: list[str] = []
        self._tasks: set[asyncio.Task[None]] = set()

    @classmethod
    async def start(cls, server: NatsServer, overlay: NatsServer) -> HandProvisioner:
        prov = cls(await ProvClient.connect(server), overlay)

        async def _cb(msg: Msg) -> None:
            task = asyncio.get_running_loop().create_task(
                prov._provision(parse_event(msg.data).identity)
            )
            prov._tasks.add(task)
            task.add_done_callback(prov._tasks.discard)

        await prov.client.nc.subscribe(
            "choria.lifecycle.event.startup.provision_mode_server", cb=_cb
        )
        await sync_flush(prov.client.nc)
        return prov

    async def _provision(self, identity: str) -> None:
        c = self.client
        jwt = await c.rpc(identity, "choria_provision", "jwt", {"token": TOKEN})
        config = {
            "identity": identity,
            "plugin.choria.server.provision": "false",
            "plugin.choria.middleware_hosts": self.overlay.url,
        }
        conf = await c.rpc(
            identity,
            "choria_provision",
            "configure",
            {"token": TOKEN, "config": json.dumps(config)},
        )
        restart = await c.rpc(identity, "choria_provision", "restart", {"token": TOKEN, "splay": 1})
        if all(r is not None and r.statuscode == 0 for r in (jwt, conf, restart)):
            self.done.append(identity)
        else:
            self.errors.append(f"{identity}: jwt={jwt} configure={conf} restart={restart}")

    async def stop(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.client.close()

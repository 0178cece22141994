"""Start a whole isolated provisioning broker (nats-server + auth callout) for tests, the demo
and the benchmark.

The config comes from the same generator as ``provisioner broker config``; nats-server is
started with ``testbed.natsserver.start_nats_server``; the callout runs as in-process
asyncio replicas (default) or as ``provisioner broker auth`` subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import ssl
import subprocess
import sys
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

from provisioner.broker.callout import (
    CalloutConfig,
    CalloutService,
    CalloutStats,
    load_callout_config,
    run_replicas,
)
from provisioner.broker.config import BrokerFiles, generate_broker_config
from testbed.natsserver import NatsServer, free_port, start_nats_server

log = logging.getLogger(__name__)

__all__ = ["IsolatedBroker", "start_isolated_broker"]


class IsolatedBroker:
    """A running provisioning broker: nats-server plus its callout replicas."""

    def __init__(
        self,
        server: NatsServer,
        files: BrokerFiles,
        config: CalloutConfig,
        *,
        replicas: int,
        callout_mode: Literal["task", "process"],
    ) -> None:
        self.server = server
        self.files = files
        self.callout_config = config
        self.replicas = replicas
        self.callout_mode = callout_mode
        self._services: list[CalloutService] = []
        self._procs: list[subprocess.Popen[bytes]] = []
        self._metrics_ports: list[int] = []
        self._retired = CalloutStats()

    # ------------------------------------------------------------------ addresses

    @property
    def url(self) -> str:
        scheme = "tls" if self.files.tls_ca else "nats"
        return f"{scheme}://127.0.0.1:{self.server.port}"

    @property
    def provisioner_credentials(self) -> tuple[str, str]:
        return ("provisioner", self.files.settings.provisioner_password)

    @property
    def tls_ca(self) -> Path | None:
        return self.files.tls_ca

    def tls_context(self, *, verify: bool = True) -> ssl.SSLContext | None:
        """Client TLS context (None without TLS). ``verify=False`` is how go-choria nodes
        connect in provisioning mode: they hold no CA yet, so they cannot verify the
        broker's certificate."""
        if self.files.tls_ca is None:
            return None
        if not verify:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
            return ctx
        return ssl.create_default_context(cafile=str(self.files.tls_ca))

    def provisioner_connect_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` as the provisioner user."""
        user, password = self.provisioner_credentials
        opts: dict[str, Any] = {"servers": [self.url], "user": user, "password": password}
        ctx = self.tls_context()
        if ctx is not None:
            opts["tls"] = ctx
        return opts

    def node_connect_options(self, identity: str, token: str) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` as a node (the go-choria convention)."""
        opts: dict[str, Any] = {"servers": [self.url], "token": token, "name": identity}
        ctx = self.tls_context(verify=False)
        if ctx is not None:
            opts["tls"] = ctx
        return opts

    # ------------------------------------------------------------------ callout control

    @property
    def callout_stats(self) -> CalloutStats:
        """Counters summed over all in-process replicas, including stopped ones."""
        total = CalloutStats().merge(self._retired)
        for svc in self._services:
            total = total.merge(svc.stats)
        return total

    @property
    def replica_stats(self) -> list[CalloutStats]:
        """Counters of each running in-process replica."""
        return [svc.stats for svc in self._services]

    @property
    def metrics_ports(self) -> list[int]:
        """Prometheus ports of the callout subprocesses (``callout_mode="process"``)."""
        return list(self._metrics_ports)

    async def start_callout(self) -> None:
        if self._services or self._procs:
            return
        if self.callout_mode == "task":
            self._services = await run_replicas(self.callout_config, self.replicas)
            return
        for _ in range(self.replicas):
            port = free_port()
            self._metrics_ports.append(port)
            self._procs.append(self._spawn_callout(port))
        await asyncio.gather(*(self._wait_process_ready(p) for p in self._metrics_ports))

    def _spawn_callout(self, metrics_port: int) -> subprocess.Popen[bytes]:
        """Start one ``provisioner broker auth`` process (its log: ``broker-auth.log``)."""
        cmd = [
            sys.executable,
            "-m",
            "provisioner",
            "broker",
            "auth",
            "--config",
            str(self.files.auth_config),
            "--metrics-port",
            str(metrics_port),
        ]
        with (self.files.directory / "broker-auth.log").open("ab") as logf:
            return subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=logf,
                start_new_session=True,
            )

    async def _wait_process_ready(self, port: int, timeout: float = 20.0) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        url = f"http://127.0.0.1:{port}/metrics"

        def probe() -> bool:
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    body = resp.read().decode()
            except OSError:
                return False
            return any(
                line.startswith("provisioner_broker_callout_ready ") and not line.endswith(" 0.0")
                for line in body.splitlines()
            )

        while loop.time() < deadline:
            if await asyncio.to_thread(probe):
                return
            if any(p.poll() is not None for p in self._procs):
                break
            await asyncio.sleep(0.1)
        await self.stop_callout()
        raise RuntimeError(
            f"the auth callout process did not become ready; see "
            f"{self.files.directory / 'broker-auth.log'}"
        )

    async def stop_callout(self) -> None:
        """Stop all callout replicas (connections already admitted stay up)."""
        services, self._services = self._services, []
        for svc in services:
            self._retired = self._retired.merge(svc.stats)
            await svc.stop()
        procs, self._procs = self._procs, []
        self._metrics_ports = []
        for proc in procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
        for proc in procs:
            try:
                await asyncio.to_thread(proc.wait, 10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                await asyncio.to_thread(proc.wait, 10)

    async def stop(self) -> None:
        """Stop the callout replicas and nats-server."""
        try:
            await self.stop_callout()
        finally:
            await asyncio.to_thread(self.server.stop)

    async def __aenter__(self) -> IsolatedBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _escape_format(text: str) -> str:
    """Make final config text safe for ``start_nats_server``'s ``str.format``."""
    return text.replace("{", "{{").replace("}", "}}")


async def start_isolated_broker(
    workdir: Path,
    verify_keys: Sequence[Any],
    *,
    tls: bool = False,
    replicas: int = 1,
    pinning: bool = False,
    require_nkey: bool = False,
    callout_mode: Literal["task", "process"] = "task",
    user_jwt_ttl_s: float = 3600.0,
    pin_ttl_s: float = 3600.0,
    admission: Mapping[str, float] | None = None,
) -> IsolatedBroker:
    """Generate the config into ``workdir``, start nats-server and the callout replicas.

    ``verify_keys``: provisioning-token verification keys (paths, inline hex or public key
    objects). Use as ``async with await start_isolated_broker(...) as broker:``.

    ``admission`` overrides the callout's ``max_pending``, ``workers``, ``source_rate`` and
    ``source_burst``. The per-source rate limit is off here unless asked for: every node of a
    test bed connects from 127.0.0.1, so one address stands for the whole fleet.
    """
    workdir = Path(workdir)
    port, monitor_port = free_port(), free_port()
    files = await asyncio.to_thread(
        generate_broker_config,
        workdir,
        verify_keys,
        port=port,
        monitor_port=monitor_port,
        listen_host="127.0.0.1",
        tls=tls,
        pinning=pinning,
        require_nkey=require_nkey,
        pin_ttl_s=pin_ttl_s,
        user_jwt_ttl_s=user_jwt_ttl_s,
        server_name=f"prov_broker_{port}",
        admission={"source_rate": 0.0, **(admission or {})},
    )
    settings = files.settings
    server = await asyncio.to_thread(
        start_nats_server,
        files.directory,
        config_text=_escape_format(files.server_config_text),
        port=port,
        monitor_port=monitor_port,
        users={
            "provisioner": ("provisioner", settings.provisioner_password),
            "choria": ("choria", settings.choria_password),
            "sys": ("sys", settings.sys_password),
        },
    )
    broker = IsolatedBroker(
        server,
        files,
        load_callout_config(files.auth_config),
        replicas=replicas,
        callout_mode=callout_mode,
    )
    try:
        await broker.start_callout()
    except BaseException:
        await broker.stop()
        raise
    return broker

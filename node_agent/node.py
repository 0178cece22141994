"""A Choria-compatible node: go-choria's server in provisioning mode, and the normal mode after.

Life of a node:

1. :meth:`NodeAgent.start` reads the provisioning token unverified (``cht`` and one of
   ``chu``/``chsrv``) and the config file. No config, or a config that enables provisioning,
   means *provisioning mode*: connect to the token's brokers with ``auth_token`` = the JWT,
   ``user``/``pass`` from ``chusr``/``chpwd`` and the identity as connection name, subscribe to
   ``provisioning.node.<identity>`` and the agents' broadcast subjects, publish the ``startup``
   lifecycle event (component ``provision_mode_server``). :mod:`node_agent.boot` has these rules.
2. Requests are checked (collective, TTL window, filter), dispatched on the envelope agent and
   answered to ``headers.reply-to`` (:mod:`node_agent.dispatch`; the actions are in
   :mod:`node_agent.agents` and :mod:`node_agent.provision_agent`).
3. ``restart`` re-reads the config written by ``configure`` and comes back in *normal mode*:
   connect to ``plugin.choria.middleware_hosts`` (mTLS with the new certificate for ``tls://``),
   subscribe to ``<collective>.node.<identity>`` per configured collective and publish
   ``startup`` with component ``server``. ``reprovision`` goes the other way.

A restart is done in-process (the connection is closed and the node boots again), standing in
for go-choria's ``execve``; in-memory state (ECDH key, provisioning lock) is lost just the same.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import os
import random
import time
from collections.abc import Coroutine, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from choria_core.protocol import (
    broadcast_subject,
    directed_subject,
    encode_event,
    is_valid_identity,
    lifecycle_subject,
    new_event,
)
from node_agent.agents import NODE_VERSION, AgentError, ChoriaUtilAgent, RPCUtilAgent
from node_agent.alive import alive_clock
from node_agent.boot import (
    PROVISIONING_COLLECTIVE,
    NodeError,
    load_facts_file,
    middleware_hosts,
    normal_mode,
    provisioning_options,
    read_token,
    wants_provisioning,
)
from node_agent.dispatch import Agent, RequestDispatcher
from node_agent.files import ConfigFileError, read_config_if_exists
from node_agent.keys import KeyPool, KeyType
from node_agent.provision_agent import PROVISION_SETTING, ProvisionAgent
from node_agent.release import DEFAULT_MAX_BYTES, installed_version
from node_agent.transport import ConnectOptions, Link, SharedConnections, connect_own

__all__ = ["NodeAgent", "NodeError", "NodeMode", "Transport"]

log = logging.getLogger(__name__)

NodeMode = Literal["provisioning", "normal", "stopped"]
Transport = Literal["nats-py", "lean"]
ALIVE_INTERVAL = 1800.0


def _check_choices(key_type: str, transport: str) -> None:
    if key_type not in ("rsa", "ec"):
        raise ValueError(f"unknown key type {key_type!r}: use 'rsa' or 'ec'")
    if transport not in ("nats-py", "lean"):
        raise ValueError(f"unknown transport {transport!r}: use 'nats-py' or 'lean'")


def _read_config_or_none(path: Path) -> dict[str, str] | None:
    return read_config_if_exists(path)


@lru_cache(maxsize=64)
def _broadcast_subjects(collectives: tuple[str, ...], agents: tuple[str, ...]) -> list[str]:
    # the same for every node of a mode: validated and built once per process
    return [broadcast_subject(c, a) for c in collectives for a in agents]


_lifecycle_subject = lru_cache(maxsize=64)(lifecycle_subject)


def _as_path(path: Path | str) -> Path:
    return path if isinstance(path, Path) else Path(path)


def _component(mode: str) -> str:
    return "provision_mode_server" if mode == "provisioning" else "server"


def _event(
    event_type: str, identity: str, component: str, version: str, new_version: str | None = None
) -> tuple[str, bytes]:
    """A lifecycle event of a node: (subject, encoded CloudEvents event)."""
    extra: dict[str, Any] = {"new_version": new_version} if new_version is not None else {}
    shown = version if event_type in ("startup", "alive", "upgraded") else None
    event = new_event(event_type, identity=identity, component=component, version=shown, **extra)
    return _lifecycle_subject(event_type, component), encode_event(event)


class NodeAgent:
    """One node. See the module docstring; ``docs/node-agent.md`` for operators.

    ``broker_urls`` overrides the token's ``chu`` (tests, SRV-less setups); ``tls_ca`` makes the
    provisioning connection verify the broker (go-choria never does); ``ssl_root`` bounds the
    ``ssldir`` a provisioner may choose (default ``state_dir``); ``shared`` multiplexes this
    node on a shared connection (benchmarks); ``restart_delay_scale`` scales restart/shutdown
    delays (tests: 0.01 makes the 2 s restart 20 ms). ``version``, ``allow_update`` (go-choria's
    ``provision.allow_update``) and ``release_max_bytes``: see :mod:`node_agent.release`.
    ``transport``: ``nats-py``, or ``lean`` (:mod:`node_agent.leannats`, the fleet's default).
    """

    def __init__(
        self,
        *,
        identity: str,
        token_path: Path | None,
        state_dir: Path,
        facts: Mapping[str, Any] | None = None,
        facts_file: Path | None = None,
        key_type: KeyType = "rsa",
        broker_urls: Sequence[str] | None = None,
        tls_ca: Path | None = None,
        ssl_root: Path | None = None,
        key_pool: KeyPool | None = None,
        shared: SharedConnections | None = None,
        restart_delay_scale: float = 1.0,
        durable: bool = True,
        alive_events: bool = True,
        version: str = NODE_VERSION,
        allow_update: bool = False,
        release_max_bytes: int = DEFAULT_MAX_BYTES,
        transport: Transport = "nats-py",
    ) -> None:
        if not is_valid_identity(identity):
            raise ValueError(f"invalid node identity {identity!r}")
        _check_choices(key_type, transport)
        self.identity = identity
        # a Path given is kept (immutable; a simulated fleet shares one token path)
        self.token_path = None if token_path is None else _as_path(token_path)
        self.state_dir = _as_path(state_dir).absolute()
        self._config_path = self.state_dir / "server.conf"
        self._default_ssldir = self.state_dir / "ssl"
        self.ssl_root = Path(ssl_root).absolute() if ssl_root is not None else self.state_dir
        self.key_type: KeyType = key_type
        self.key_pool = key_pool
        self.durable = durable
        self.restart_delay_scale = restart_delay_scale
        self.mode: NodeMode = "stopped"
        self.ecdh_private: X25519PrivateKey | None = None
        self.started_at = time.time()
        self.stats: dict[str, int] = {}
        self.boots = 0
        self._facts = dict(facts) if facts is not None else None
        self._facts_file = Path(facts_file) if facts_file is not None else None
        self._broker_urls = list(broker_urls) if broker_urls else None
        self._tls_ca = Path(tls_ca) if tls_ca is not None else None
        self._shared, self._lean = shared, transport == "lean"
        self._alive_events = alive_events
        self._base_version = self._version = version
        self._allow_update = allow_update
        self.release_max_bytes = release_max_bytes
        self._claims: dict[str, Any] | None = None
        self._token_text: str | None = None
        self._main_collective = PROVISIONING_COLLECTIVE
        self._requests = RequestDispatcher(identity, self.stats)
        self._provision_agent = ProvisionAgent(self)
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._restarting = False
        self._noted_ssldir: Path | None = None
        self._alive_ticket: int | None = None
        self._tasks: set[asyncio.Task[Any]] = set()

    @property
    def _link(self) -> Link | None:
        """The current connection (owned by the request dispatcher, which replies on it)."""
        return self._requests.link

    # --- NodeHost properties ----------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The Choria config file (``<state_dir>/server.conf``)."""
        return self._config_path

    @property
    def default_ssldir(self) -> Path:
        """``<dir(config)>/ssl``: where ``gencsr`` writes, as go-choria in provisioning mode."""
        return self._default_ssldir

    @property
    def ssldir(self) -> Path:
        """The ssl directory in use: ``plugin.choria.ssldir``, else the last configured, else
        the default."""
        try:
            cfg = read_config_if_exists(self.config_path) or {}
        except ConfigFileError:
            cfg = {}
        if cfg.get("plugin.choria.ssldir"):
            return Path(cfg["plugin.choria.ssldir"])
        return self._noted_ssldir or self.default_ssldir

    @property
    def provision_token(self) -> str | None:
        """The ``cht`` of the provisioning token, if one is readable."""
        return str(self._claims["cht"]) if self._claims and self._claims.get("cht") else None

    @property
    def collectives(self) -> list[str]:
        """Collectives this node is a member of."""
        return list(self._requests.collectives)

    @property
    def main_collective(self) -> str:
        """The main collective."""
        return self._main_collective

    @property
    def agent_names(self) -> list[str]:
        """Loaded agents (``discovery`` is always loaded)."""
        return self._requests.agent_names

    @property
    def upgradable(self) -> bool:
        """``release_update`` is allowed: ``allow_update``, or the token's ``update`` claim."""
        return self._allow_update or bool(self._claims and self._claims.get("update") is True)

    @property
    def version(self) -> str:
        """The version this node reports: its installed release's, else ``version``."""
        return self._version

    @property
    def connected_url(self) -> str:
        """The broker this node is connected to, or ``""``."""
        return self._link.server_url if self._link is not None else ""

    def facts(self) -> dict[str, Any]:
        """Facts from the mapping, else the facts file, else the token's ``chf`` file."""
        if self._facts is not None:
            return self._facts
        path = self._facts_file
        if path is None and self._claims and self._claims.get("chf"):
            path = Path(str(self._claims["chf"]))
        if path is None:
            return {}
        try:
            return load_facts_file(path)
        except (OSError, ValueError, yaml.YAMLError) as exc:
            log.warning("cannot read facts file %s: %s", path, type(exc).__name__)
            return {}

    def note_ssldir(self, ssldir: Path) -> None:
        """Remember where ``configure`` put the certificate (normal mode finds it there)."""
        self._noted_ssldir = ssldir

    # --- lifecycle --------------------------------------------------------------------------

    async def start(self) -> None:
        """Boot in the mode the token and config call for; returns once subscribed and the
        ``startup`` event is published. Raises NodeError if the node cannot run at all."""
        self._stopping.clear()
        self.started_at = time.time()
        await self._boot()

    async def stop(self) -> None:
        """Publish ``shutdown`` (best effort), close the connection, stop background tasks."""
        self._stopping.set()
        if self._link is not None and self.mode != "stopped":
            try:
                await self._publish_event_now("shutdown")
            except Exception as exc:
                log.debug("shutdown event not published: %s", exc)
        await self._teardown()
        tasks = [*self._tasks, *self._requests.tasks]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        self.mode = "stopped"

    async def wait_normal(self, timeout: float) -> None:
        """Wait until the node runs in normal mode (connected, subscribed, startup published)."""
        deadline = asyncio.get_running_loop().time() + timeout
        while not (self.mode == "normal" and self._ready.is_set()):
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                raise TimeoutError(f"{self.identity} did not reach normal mode in {timeout}s")
            await asyncio.sleep(min(0.02, remaining))

    @property
    def ready(self) -> bool:
        """True while connected and serving in the current mode."""
        return self._ready.is_set() and self.mode != "stopped"

    def check_restart_config(self) -> None:
        """Refuse to restart into a config that cannot be loaded or still provisions."""
        path = self.config_path
        try:
            cfg = _read_config_or_none(self.config_path)
            if cfg is None:
                raise ConfigFileError("the file does not exist")
            provisioning = wants_provisioning(cfg, self._claims)
            hosts = middleware_hosts(cfg)
        except (ConfigFileError, ValueError) as exc:
            raise AgentError(
                f"Configuration {path} could not be parsed, restart cannot continue: {exc}"
            ) from exc
        if provisioning:
            raise AgentError(f"Configuration {path} enables provisioning, restart cannot continue")
        if not hosts:
            raise AgentError(
                f"Configuration {path} sets no plugin.choria.middleware_hosts, "
                "restart cannot continue"
            )

    async def _boot(self) -> None:
        self._ready.clear()
        self._claims = self._token_text = None  # forgotten even if the token is now unreadable
        self._claims, self._token_text = read_token(self.token_path)
        self._version = installed_version(self.state_dir) or self._base_version
        cfg = _read_config_or_none(self.config_path)
        try:
            provisioning = wants_provisioning(cfg, self._claims)
        except ValueError as exc:
            raise NodeError(f"{self.config_path}: {PROVISION_SETTING}: {exc}") from exc
        if not provisioning:
            assert cfg is not None
            try:
                await self._boot_normal(cfg)
                return
            except NodeError as exc:
                if self._claims is None:
                    raise
                # Stay provisionable rather than dead: a node that cannot come up in normal
                # mode but still has its token can be provisioned again.
                log.error("normal mode failed, falling back to provisioning: %s", exc)
        await self._boot_provisioning()

    async def _boot_provisioning(self) -> None:
        if self._claims is None or self._token_text is None:
            raise NodeError(
                f"no configuration at {self.config_path} and no provisioning token "
                f"at {self.token_path}: cannot start"
            )
        opts = provisioning_options(
            identity=self.identity,
            claims=self._claims,
            token_text=self._token_text,
            broker_urls=self._broker_urls,
            tls_ca=self._tls_ca,
        )
        ssldir = self.ssldir if self._claims.get("chs") is True else None  # only chs needs it
        self._requests.provisioning_mode(self._claims, ca=self._tls_ca, ssldir=ssldir)
        self._main_collective = PROVISIONING_COLLECTIVE
        self._requests.agents = {
            "rpcutil": RPCUtilAgent(self),
            "choria_util": ChoriaUtilAgent(self),
            "choria_provision": self._provision_agent,
        }
        await self._connect_and_announce(opts, "provisioning")

    async def _boot_normal(self, cfg: Mapping[str, str]) -> None:
        normal = normal_mode(
            cfg,
            identity=self.identity,
            config_path=self.config_path,
            ssldir=self._noted_ssldir or self.default_ssldir,
        )
        self._requests.set_mode(normal.collectives, None)
        self._main_collective = normal.main_collective
        agents: dict[str, Agent] = {
            "rpcutil": RPCUtilAgent(self),
            "choria_util": ChoriaUtilAgent(self),
        }
        if self.provision_token:
            # go-choria keeps choria_provision loaded while a provisioning token is present.
            agents["choria_provision"] = self._provision_agent
        self._requests.agents = agents
        await self._connect_and_announce(normal.options, "normal")

    async def _connect_and_announce(self, opts: ConnectOptions, mode: NodeMode) -> None:
        collectives = self._requests.collectives
        subjects = [directed_subject(c, self.identity) for c in collectives]
        agents = ["discovery", *self._requests.agents]
        subjects += _broadcast_subjects(tuple(collectives), tuple(agents))
        on_message, stopping = self._requests.on_message, self._stopping
        # made per connection attempt; the lean client sends it in the login's own write
        startup = functools.partial(
            _event, "startup", self.identity, _component(mode), self.version
        )
        if self._shared is not None:
            link = await self._shared.attach(
                opts, self.identity, collectives, agents, on_message, stopping=stopping
            )
            await link.publish(*startup())
        else:
            link = await connect_own(
                opts, subjects, on_message, stopping=stopping, lean=self._lean, greeting=startup
            )
        self._requests.link = link
        self.stats["events"] = self.stats.get("events", 0) + 1
        self.mode = mode
        self.boots += 1
        self._ready.set()
        if self._alive_events:
            self._schedule_alive(random.uniform(0, ALIVE_INTERVAL))
        log.info("node %s up in %s mode on %s", self.identity, mode, self.connected_url)

    async def _teardown(self) -> None:
        self._ready.clear()
        if self._alive_ticket is not None:
            alive_clock().cancel(self._alive_ticket)
            self._alive_ticket = None
        link, self._requests.link = self._requests.link, None
        if link is not None:
            await link.close()

    # --- events -----------------------------------------------------------------------------

    async def _publish_event_now(self, event_type: str, new_version: str | None = None) -> None:
        link = self._link
        if link is None:
            return
        event = _event(event_type, self.identity, _component(self.mode), self.version, new_version)
        await link.publish(*event)
        self.stats["events"] = self.stats.get("events", 0) + 1

    async def publish_event(self, event_type: str, *, new_version: str | None = None) -> None:
        """Publish a CloudEvents lifecycle event for the current mode's component."""
        await self._publish_event_now(event_type, new_version)

    def _schedule_alive(self, delay: float) -> None:
        # one loop timer for every node of the process (node_agent.alive), not one each
        self._alive_ticket = alive_clock().schedule(delay, self._alive_tick)

    def _alive_tick(self) -> None:
        self._alive_ticket = None
        self._spawn(self._publish_event_now("alive"))
        self._schedule_alive(ALIVE_INTERVAL)

    # --- restart / shutdown -----------------------------------------------------------------

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def schedule_restart(self, delay_s: float) -> None:
        """Restart after ``delay_s`` (scaled), once: publish ``shutdown``, close, boot again."""
        if self._restarting:
            return
        self._restarting = True
        self._spawn(self._restart(delay_s))

    def schedule_shutdown(self, delay_s: float) -> None:
        """Stop serving after ``delay_s`` (scaled)."""
        if self._restarting:
            return
        self._restarting = True
        self._spawn(self._shutdown(delay_s))

    async def _restart(self, delay_s: float) -> None:
        try:
            await self._requests.drain()  # the reply to restart goes out first
            await self._publish_event_now("shutdown")
            await asyncio.sleep(delay_s * self.restart_delay_scale)
            await self._requests.drain()
            await self._teardown()
            # A new process would start without these, and with a new start time (what
            # rpcutil#daemon_stats reports: the fleet operations engine reads it).
            self.ecdh_private = None
            self.started_at = time.time()
            self._provision_agent.reset()
            if self._stopping.is_set():
                return
            await self._boot()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.error("restart of %s failed: %s", self.identity, exc)
            self.mode = "stopped"
        finally:
            self._restarting = False

    async def _shutdown(self, delay_s: float) -> None:
        try:
            await self._requests.drain()
            await asyncio.sleep(delay_s * self.restart_delay_scale)
            await self._requests.drain()
            await self._publish_event_now("shutdown")
            await self._teardown()
            self.mode = "stopped"
        finally:
            self._restarting = False

    def __repr__(self) -> str:
        return f"NodeAgent({self.identity!r}, mode={self.mode!r}, pid={os.getpid()})"

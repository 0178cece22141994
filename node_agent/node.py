"""A Choria-compatible node: go-choria's server in provisioning mode, and the normal mode after.

Life of a node (spec §6):

1. :meth:`NodeAgent.start` reads the provisioning token unverified (``cht`` and one of
   ``chu``/``chsrv``) and the config file. No config, or a config that enables provisioning,
   means *provisioning mode*: connect to the token's brokers with ``auth_token`` = the JWT,
   ``user``/``pass`` from ``chusr``/``chpwd`` and the identity as connection name, subscribe to
   ``provisioning.node.<identity>`` and the agents' broadcast subjects, publish the ``startup``
   lifecycle event (component ``provision_mode_server``).
2. Requests are checked (collective, TTL window, filter), dispatched on the envelope agent and
   answered to ``headers.reply-to`` (:mod:`node_agent.agents` has the actions).
3. ``restart`` re-reads the config written by ``configure`` and comes back in *normal mode*:
   connect to ``plugin.choria.middleware_hosts`` (mTLS with the new certificate for ``tls://``),
   subscribe to ``<collective>.node.<identity>`` per configured collective and publish
   ``startup`` with component ``server``. ``reprovision`` goes the other way.

A restart is done in-process (the connection is closed and the node boots again), standing in
for go-choria's ``execve``; in-memory state (ECDH key, provisioning lock) is lost just the same.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import time
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

import yaml
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from choria_core.protocol import (
    ProtocolError,
    Request,
    RPCReply,
    StatusCode,
    TransportHeaders,
    broadcast_subject,
    check_request,
    decode_payload,
    decode_request,
    directed_subject,
    encode_event,
    encode_reply,
    is_valid_identity,
    lifecycle_subject,
    new_event,
    new_reply,
    parse_rpc_request,
)
from jwt_tools import TokenError, parse_provisioning_token_unverified
from node_agent.agents import (
    NODE_VERSION,
    PROVISION_SETTING,
    AgentError,
    ChoriaUtilAgent,
    Envelope,
    ProvisionAgent,
    RPCUtilAgent,
)
from node_agent.files import ConfigFileError, config_bool, read_config
from node_agent.keys import KeyPool, KeyType
from node_agent.transport import (
    ConnectOptions,
    Link,
    SharedConnections,
    connect_own,
    tls_context,
)

__all__ = ["NodeAgent", "NodeError", "NodeMode"]

log = logging.getLogger(__name__)

NodeMode = Literal["provisioning", "normal", "stopped"]
PROVISIONING_COLLECTIVE = "provisioning"
ALIVE_INTERVAL = 1800.0
_Agent = RPCUtilAgent | ChoriaUtilAgent | ProvisionAgent


class NodeError(RuntimeError):
    """The node cannot start or change mode; the message says what to fix (no secrets)."""


@lru_cache(maxsize=64)
def _decode_cached(data: bytes) -> tuple[Request, TransportHeaders]:
    # Many simulated nodes in one process receive the very same broadcast bytes: decode once.
    return decode_request(data)


def _normalise_url(url: str) -> str:
    url = url.strip()
    return url if "://" in url else f"nats://{url}"


def _load_facts_file(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    data: Any
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("facts file must hold a mapping")
    return data


class NodeAgent:
    """One node. See the module docstring; ``docs/node-agent.md`` for operators.

    ``broker_urls`` overrides the token's ``chu`` (tests, SRV-less setups); ``tls_ca`` makes the
    provisioning connection verify the broker (go-choria never does); ``ssl_root`` bounds the
    ``ssldir`` a provisioner may choose (default ``state_dir``); ``shared`` multiplexes this
    node on a shared connection (benchmarks); ``restart_delay_scale`` scales restart/shutdown
    delays (tests: 0.01 makes the 2 s restart 20 ms).
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
    ) -> None:
        if not is_valid_identity(identity):
            raise ValueError(f"invalid node identity {identity!r}")
        if key_type not in ("rsa", "ec"):
            raise ValueError(f"unknown key type {key_type!r}: use 'rsa' or 'ec'")
        self.identity = identity
        self.token_path = Path(token_path) if token_path is not None else None
        self.state_dir = Path(state_dir).absolute()
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
        self._shared = shared
        self._alive_events = alive_events
        self._claims: dict[str, Any] | None = None
        self._token_text: str | None = None
        self._collectives: list[str] = [PROVISIONING_COLLECTIVE]
        self._main_collective = PROVISIONING_COLLECTIVE
        self._agents: dict[str, _Agent] = {}
        self._provision_agent = ProvisionAgent(self)
        self._link: Link | None = None
        self._stopping = asyncio.Event()
        self._ready = asyncio.Event()
        self._restarting = False
        self._noted_ssldir: Path | None = None
        self._alive_handle: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._rpc_tasks: set[asyncio.Task[Any]] = set()

    # --- NodeHost properties ----------------------------------------------------------------

    @property
    def config_path(self) -> Path:
        """The Choria config file (``<state_dir>/server.conf``)."""
        return self.state_dir / "server.conf"

    @property
    def default_ssldir(self) -> Path:
        """``<dir(config)>/ssl``: where ``gencsr`` writes, as go-choria in provisioning mode."""
        return self.config_path.parent / "ssl"

    @property
    def ssldir(self) -> Path:
        """The ssl directory in use: ``plugin.choria.ssldir``, else the last configured, else
        the default."""
        try:
            cfg = read_config(self.config_path) if self.config_path.exists() else {}
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
        return list(self._collectives)

    @property
    def main_collective(self) -> str:
        """The main collective."""
        return self._main_collective

    @property
    def agent_names(self) -> list[str]:
        """Loaded agents (``discovery`` is always loaded)."""
        return sorted(["discovery", *self._agents])

    @property
    def upgradable(self) -> bool:
        """False: this node does not implement ``release_update``."""
        return False

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
            return _load_facts_file(path)
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
        tasks = [*self._tasks, *self._rpc_tasks]
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

    def _read_token(self) -> None:
        self._claims = None
        self._token_text = None
        if self.token_path is None:
            return
        try:
            text = self.token_path.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            return
        except (OSError, UnicodeDecodeError) as exc:
            raise NodeError(f"cannot read provisioning token {self.token_path}: {exc}") from exc
        try:
            self._claims = parse_provisioning_token_unverified(text)
        except TokenError as exc:
            raise NodeError(f"unusable provisioning token {self.token_path}: {exc}") from exc
        self._token_text = text

    def _wants_provisioning(self, cfg: Mapping[str, str] | None) -> bool:
        if cfg is None:
            return True
        setting = config_bool(cfg.get(PROVISION_SETTING))
        if setting is not None:
            return setting
        # Without the setting the token's chpd decides, as in go-choria (spec §6.1).
        return bool(self._claims and self._claims.get("chpd"))

    def _read_config_or_none(self) -> dict[str, str] | None:
        if not self.config_path.exists():
            return None
        return read_config(self.config_path)

    def check_restart_config(self) -> None:
        """Refuse to restart into a config that cannot be loaded or still provisions (§7.6)."""
        path = self.config_path
        try:
            cfg = self._read_config_or_none()
            if cfg is None:
                raise ConfigFileError("the file does not exist")
            provisioning = self._wants_provisioning(cfg)
            hosts = self._middleware_hosts(cfg)
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

    @staticmethod
    def _middleware_hosts(cfg: Mapping[str, str]) -> list[str]:
        raw = cfg.get("plugin.choria.middleware_hosts", "")
        return [_normalise_url(u) for u in raw.split(",") if u.strip()]

    async def _boot(self) -> None:
        self._ready.clear()
        self._read_token()
        cfg = self._read_config_or_none()
        try:
            provisioning = self._wants_provisioning(cfg)
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
                # Stay provisionable rather than dead (working agreement: nothing is lost).
                log.error("normal mode failed, falling back to provisioning: %s", exc)
        await self._boot_provisioning()

    async def _boot_provisioning(self) -> None:
        claims = self._claims
        if claims is None or self._token_text is None:
            raise NodeError(
                f"no configuration at {self.config_path} and no provisioning token "
                f"at {self.token_path}: cannot start"
            )
        if self._broker_urls:
            urls = [_normalise_url(u) for u in self._broker_urls]
        elif claims.get("chu"):
            urls = [_normalise_url(u) for u in str(claims["chu"]).split(",") if u.strip()]
        else:
            raise NodeError(
                "the provisioning token names an SRV domain (chsrv); SRV lookup is not "
                "supported, give the broker URLs explicitly"
            )
        user = claims.get("chusr") or None
        if user == "provisioner":
            raise NodeError("the provisioning token's chusr must not be 'provisioner'")
        tls = None
        if self._tls_ca is not None or any(u.startswith("tls://") for u in urls):
            # go-choria: anonymous TLS without verification; with tls_ca we verify the broker.
            tls = tls_context(ca=self._tls_ca, verify=self._tls_ca is not None)
        opts = ConnectOptions(
            urls=urls,
            name=self.identity,
            token=self._token_text,
            user=str(user) if user else None,
            password=str(claims.get("chpwd") or "") if user else None,
            tls=tls,
        )
        self._collectives = [PROVISIONING_COLLECTIVE]
        self._main_collective = PROVISIONING_COLLECTIVE
        self._agents = {
            "rpcutil": RPCUtilAgent(self),
            "choria_util": ChoriaUtilAgent(self),
            "choria_provision": self._provision_agent,
        }
        await self._connect_and_announce(opts, "provisioning")

    async def _boot_normal(self, cfg: Mapping[str, str]) -> None:
        urls = self._middleware_hosts(cfg)
        if not urls:
            raise NodeError(f"{self.config_path} sets no plugin.choria.middleware_hosts")
        identity = cfg.get("identity", self.identity)
        if identity != self.identity:
            raise NodeError(
                f"{self.config_path} is for identity {identity!r}, not {self.identity!r}"
            )
        collectives = [c.strip() for c in cfg.get("collectives", "choria").split(",") if c.strip()]
        main = cfg.get("main_collective", collectives[0] if collectives else "choria")
        tls = None
        if any(u.startswith("tls://") for u in urls):
            ssldir = Path(cfg["plugin.choria.ssldir"]) if cfg.get("plugin.choria.ssldir") else None
            ssldir = ssldir or self._noted_ssldir or self.default_ssldir
            cert = Path(cfg.get("plugin.security.file.certificate") or ssldir / "certificate.pem")
            key = Path(cfg.get("plugin.security.file.key") or ssldir / "private.pem")
            ca = Path(cfg.get("plugin.security.file.ca") or ssldir / "ca.pem")
            try:
                tls = tls_context(ca=ca, cert=cert, key=key)
            except (OSError, ValueError) as exc:
                raise NodeError(f"cannot load TLS material from {ssldir}: {exc}") from exc
        user = cfg.get("plugin.nats.user") or None
        opts = ConnectOptions(
            urls=urls,
            name=self.identity,
            user=user,
            password=cfg.get("plugin.nats.pass", "") if user else None,
            tls=tls,
        )
        self._collectives = collectives
        self._main_collective = main
        self._agents = {"rpcutil": RPCUtilAgent(self), "choria_util": ChoriaUtilAgent(self)}
        if self.provision_token:
            # go-choria keeps choria_provision loaded while a provisioning token is present.
            self._agents["choria_provision"] = self._provision_agent
        await self._connect_and_announce(opts, "normal")

    async def _connect_and_announce(self, opts: ConnectOptions, mode: NodeMode) -> None:
        subjects = [directed_subject(c, self.identity) for c in self._collectives]
        agents = ["discovery", *self._agents]
        subjects += [broadcast_subject(c, a) for c in self._collectives for a in agents]
        if self._shared is not None:
            self._link = await self._shared.attach(
                opts,
                self.identity,
                self._collectives,
                agents,
                self._on_message,
                stopping=self._stopping,
            )
        else:
            self._link = await connect_own(
                opts, subjects, self._on_message, stopping=self._stopping
            )
        self.mode = mode
        self.boots += 1
        await self._publish_event_now("startup")
        self._ready.set()
        if self._alive_events:
            self._schedule_alive(random.uniform(0, ALIVE_INTERVAL))
        log.info("node %s up in %s mode on %s", self.identity, mode, self.connected_url)

    async def _teardown(self) -> None:
        self._ready.clear()
        if self._alive_handle is not None:
            self._alive_handle.cancel()
            self._alive_handle = None
        link, self._link = self._link, None
        if link is not None:
            await link.close()

    # --- events -----------------------------------------------------------------------------

    @property
    def _component(self) -> str:
        return "provision_mode_server" if self.mode == "provisioning" else "server"

    async def _publish_event_now(self, event_type: str) -> None:
        if self._link is None:
            return
        component = self._component
        version = NODE_VERSION if event_type in ("startup", "alive") else None
        event = new_event(event_type, identity=self.identity, component=component, version=version)
        await self._link.publish(lifecycle_subject(event_type, component), encode_event(event))
        self.stats["events"] = self.stats.get("events", 0) + 1

    async def publish_event(self, event_type: str) -> None:
        """Publish a CloudEvents lifecycle event for the current mode's component."""
        await self._publish_event_now(event_type)

    def _schedule_alive(self, delay: float) -> None:
        loop = asyncio.get_running_loop()
        self._alive_handle = loop.call_later(delay, self._alive_tick)

    def _alive_tick(self) -> None:
        self._spawn(self._publish_event_now("alive"))
        self._schedule_alive(ALIVE_INTERVAL)

    # --- restart / shutdown -----------------------------------------------------------------

    def _spawn(self, coro: Any, tasks: set[asyncio.Task[Any]] | None = None) -> None:
        group = self._tasks if tasks is None else tasks
        task = asyncio.get_running_loop().create_task(coro)
        group.add(task)
        task.add_done_callback(group.discard)

    async def _drain_rpcs(self, timeout: float = 5.0) -> None:
        """Let in-flight actions send their replies (the restart reply itself) before closing."""
        pending = [t for t in self._rpc_tasks if t is not asyncio.current_task()]
        if pending:
            await asyncio.wait(pending, timeout=timeout)

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
            await self._drain_rpcs()  # the reply to restart goes out first
            await self._publish_event_now("shutdown")
            await asyncio.sleep(delay_s * self.restart_delay_scale)
            await self._drain_rpcs()
            await self._teardown()
            # A new process would start without these.
            self.ecdh_private = None
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
            await self._drain_rpcs()
            await asyncio.sleep(delay_s * self.restart_delay_scale)
            await self._drain_rpcs()
            await self._publish_event_now("shutdown")
            await self._teardown()
            self.mode = "stopped"
        finally:
            self._restarting = False

    # --- request handling -------------------------------------------------------------------

    def _count(self, key: str) -> None:
        self.stats[key] = self.stats.get(key, 0) + 1

    async def _on_message(self, subject: str, data: bytes) -> None:
        self._count("total")
        try:
            req, headers = _decode_cached(data)
        except ProtocolError as exc:
            self._count("unvalidated")
            log.debug("dropped undecodable message on %s: %s", subject, exc)
            return
        self._count("validated")
        try:
            check_request(
                req,
                identity=self.identity,
                collectives=self._collectives,
                agents=self.agent_names,
            )
        except ProtocolError as exc:
            self._count("ttlexpired" if str(exc).startswith("ttl") else "filtered")
            log.debug("dropped request %s: %s", req.requestid, exc)
            return
        self._count("passed")
        if req.agent == "discovery":
            try:
                payload = decode_payload(req.message)
            except ProtocolError:
                return
            if b"ping" in payload:
                await self._reply(req, headers, "pong")
            return
        agent = self._agents.get(req.agent)
        if agent is None:
            log.debug("no agent %s on %s", req.agent, self.identity)
            return
        self._spawn(self._handle_rpc(agent, req, headers), self._rpc_tasks)

    async def _handle_rpc(self, agent: _Agent, req: Request, headers: TransportHeaders) -> None:
        try:
            body = parse_rpc_request(decode_payload(req.message))
        except ProtocolError as exc:
            reply = RPCReply("", StatusCode.INVALID_DATA, f"Could not process request: {exc}")
            await self._reply(req, headers, reply.to_json())
            return
        env = Envelope(
            requestid=req.requestid,
            senderid=req.senderid,
            callerid=req.callerid,
            collective=req.collective,
            time=req.time,
        )
        try:
            reply = await asyncio.wait_for(
                agent.dispatch(body.action, body.data, env), agent.timeout
            )
        except AgentError as exc:
            reply = RPCReply(body.action, exc.status, str(exc))
        except TimeoutError:
            # go-choria sends no reply when an action exceeds the agent timeout (spec §4).
            log.warning("%s#%s timed out on %s", req.agent, body.action, self.identity)
            return
        except Exception:
            log.exception("%s#%s failed on %s", req.agent, body.action, self.identity)
            reply = RPCReply(body.action, StatusCode.UNKNOWN_ERROR, "Unknown error in the action")
        await self._reply(req, headers, reply.to_json())

    async def _reply(self, req: Request, headers: TransportHeaders, message: str) -> None:
        link = self._link
        if not headers.reply_to or link is None:
            return
        url = link.server_url
        reply = new_reply(req, senderid=self.identity, message=message)
        data = encode_reply(reply, mc_sender=self.identity, seen_by=[(url, self.identity, url)])
        await link.publish(headers.reply_to, data)
        self._count("replies")

    def __repr__(self) -> str:
        return f"NodeAgent({self.identity!r}, mode={self.mode!r}, pid={os.getpid()})"

"""Test environment for provisioner integration tests: real brokers, tokens, CA, helper.

``ProvEnv`` is a :class:`testbed.stack.Stack` (see :data:`PROV_ENV_SPEC`) seen the way the tests
use it: the provisioning broker, an overlay nats-server (where provisioned nodes go), a token
signing key pair, a LocalCA written to disk and the test helper script. ``env.config(...)``
builds a :class:`ProvisionerConfig` for it and ``env.node(...)`` a :class:`NodeAgent` holding a
valid provisioning token.

The provisioning broker is, by default, the production layout: an **isolated broker**
(nats-server plus the auth callout verifying provisioning tokens with the env's verify key), so
nodes connect with their JWT as the auth token and their identity as the connection name, and
each node may only use its own subjects.

Tests that need the plain dev server (static ``node`` user, nodes with bad tokens reaching the
provisioner, rogue responders answering for any identity) opt out with
``@pytest.mark.dev_broker`` (the ``prov_env`` fixture then uses the ``nats_server`` fixture).
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from ca_adapters import LocalCA
from choria_core.natsconn import sync_flush
from choria_core.protocol import parse_event
from jwt_tools import generate_keypair, write_private_file
from node_agent.node import NodeAgent
from provisioner.audit import read_audit_file
from provisioner.config import ProvisionerConfig
from provisioner.service import Provisioner
from testbed.isolated_broker import IsolatedBroker
from testbed.natsserver import INSTALL_HINT, NatsServer, NatsServerNotFound, find_nats_server
from testbed.stack import CASpec, HelperSpec, ProvisionerSpec, Stack, StackSpec
from tests.support import missing_dependency

HELPERS = Path(__file__).resolve().parent.parent / "helpers"
TOKEN = "s3cret-provisioning-token"
#: Marker opting a test out of the isolated broker (it then gets the plain dev nats-server).
DEV_BROKER_MARK = "dev_broker"

#: The isolated broker (or the dev server a test opts into), a local CA, one dev-layout overlay
#: broker, the test helper ``tests/provisioner/helpers/localca_helper.py`` in exec mode.
PROV_ENV_SPEC = StackSpec(
    ca=CASpec(common_name="Test Fleet CA"),
    helper=HelperSpec(
        kind="command",
        mode="exec",
        command=f"{sys.executable} {HELPERS / 'localca_helper.py'}",
        timeout=5,
    ),
    provisioner=ProvisionerSpec(site="test", rpc_timeout=2, concurrency=32),
    token=TOKEN,
)


@dataclass
class ProvEnv:
    stack: Stack
    behaviour_file: Path
    nodes: list[NodeAgent] = field(default_factory=list)

    # ------------------------------------------------------------------ parts
    @property
    def server(self) -> NatsServer:
        """The provisioning broker's nats-server (the isolated broker's, or the dev server)."""
        return self.stack.server

    @property
    def broker(self) -> IsolatedBroker | None:
        """The isolated broker (default); None when the test opted out (plain dev server)."""
        return self.stack.broker

    @property
    def overlay(self) -> NatsServer:
        return self.stack.overlay

    @property
    def workdir(self) -> Path:
        return self.stack.workdir

    @property
    def ca(self) -> LocalCA:
        assert self.stack.ca is not None
        return self.stack.ca

    @property
    def ca_dir(self) -> Path:
        assert self.stack.ca_cert_path is not None
        return self.stack.ca_cert_path.parent

    @property
    def signer_key_path(self) -> Path:
        return self.stack.signer_key_path

    @property
    def verify_path(self) -> Path:
        return self.stack.verify_path

    @property
    def token_path(self) -> Path:
        return self.stack.token_path

    @property
    def overlay_password_file(self) -> Path:
        return self.stack.overlay_password_file

    @property
    def audit_path(self) -> Path:
        return self.stack.audit_path

    @property
    def isolated(self) -> bool:
        """True when the provisioning broker admits nodes through the auth callout."""
        return self.broker is not None

    @property
    def broker_url(self) -> str:
        """The URL nodes and the provisioner use for the provisioning broker."""
        return self.stack.broker_url

    # ------------------------------------------------------------------ tokens
    def make_token(
        self,
        path: Path,
        *,
        key_path: Path | None = None,
        validity_s: float = 3600,
        now: float | None = None,
    ) -> Path:
        """A provisioning token for the broker (dev layout: with the static node user)."""
        return self.stack.write_token(path, key_path=key_path, validity_s=validity_s, now=now)

    def token_with_wrong_key(self) -> Path:
        priv, _pub = generate_keypair("ed25519")
        other = self.workdir / f"other-{uuid.uuid4().hex[:6]}.seed"
        write_private_file(other, priv)
        return self.make_token(self.workdir / "wrong-key.jwt", key_path=other)

    def expired_token(self) -> Path:
        return self.make_token(self.workdir / "expired.jwt", validity_s=60, now=time.time() - 3600)

    # ------------------------------------------------------------------ settings
    def set_behaviour(self, behaviour: str) -> None:
        self.behaviour_file.write_text(behaviour)

    def helper_command(self, script: str = "localca_helper.py") -> str:
        return f"{sys.executable} {HELPERS / script}"

    def helper_args(self) -> list[str]:
        overlay_user, _ = self.overlay.users["choria"]
        return [
            "--ca-dir",
            str(self.ca_dir),
            "--overlay-url",
            self.overlay.url,
            "--overlay-user",
            overlay_user,
            "--overlay-password-file",
            str(self.overlay_password_file),
            "--behaviour-file",
            str(self.behaviour_file),
        ]

    def config(self, **overrides: Any) -> ProvisionerConfig:
        values: dict[str, Any] = {
            "identity": f"prov-{uuid.uuid4().hex[:8]}.test.example.net",
            "helper_args": self.helper_args(),
        }
        values.update(overrides)
        return self.stack.provisioner_config(**values)

    def provisioner(self, **overrides: Any) -> Provisioner:
        return Provisioner(self.config(**overrides), discovery_timeout=0.5, rpc_backoff=0.05)

    def node(self, identity: str, *, token_path: Path | None = None, **kw: Any) -> NodeAgent:
        n = NodeAgent(
            identity=identity,
            token_path=token_path or self.token_path,
            state_dir=self.workdir / "nodes" / identity,
            facts={"role": "test", "index": len(self.nodes)},
            key_type="ec",
            restart_delay_scale=0.01,
            durable=False,
            alive_events=False,
            **kw,
        )
        self.nodes.append(n)
        return n

    def audit(self) -> list[dict[str, Any]]:
        """The records of ended attempts (``decision`` set), oldest first."""
        return [r for r in self.audit_records() if "decision" in r]

    def audit_records(self) -> list[dict[str, Any]]:
        """Every line of the audit log, ``event: issued`` records included."""
        return read_audit_file(self.audit_path) if self.audit_path.exists() else []

    def audit_for(self, identity: str) -> list[dict[str, Any]]:
        return [r for r in self.audit() if r["identity"] == identity]

    def verify_node_certificate(self, node: NodeAgent) -> x509.Certificate:
        """The node's certificate has CN = identity and is signed by our CA."""
        cert = x509.load_pem_x509_certificate((node.ssldir / "certificate.pem").read_bytes())
        cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
        assert cn == node.identity
        cert.verify_directly_issued_by(self.ca.cert)
        return cert


async def make_env(tmp: Path, *, dev_server: NatsServer | None = None) -> ProvEnv:
    """Build the environment in ``tmp``; with ``dev_server`` it uses that plain dev broker,
    otherwise it starts an isolated broker (stopped by :func:`close_env`)."""
    stack = Stack(PROV_ENV_SPEC, tmp, dev_server=dev_server)
    try:
        await stack.start()
    except BaseException:
        await stack.close()
        raise
    env = ProvEnv(stack=stack, behaviour_file=tmp / "behaviour")
    env.make_token(env.token_path)
    if stack.broker is not None:
        # Wire-level test clients (responder.py) log in like a node: any valid provisioning
        # token as the password, their identity as the connection name.
        stack.server.users.setdefault("node", ("node", env.token_path.read_text().strip()))
    env.set_behaviour("ok")
    return env


async def close_env(env: ProvEnv) -> None:
    """Stop what :func:`make_env` started (the dev server belongs to its fixture)."""
    await env.stack.close()


def need_nats_server() -> None:
    """Fail under CI (skip elsewhere) when nats-server is missing."""
    try:
        find_nats_server()
    except NatsServerNotFound:
        missing_dependency("nats-server", INSTALL_HINT)


@pytest.fixture
async def prov_env(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[ProvEnv]:
    """The environment over the isolated broker, or the dev server with ``dev_broker``."""
    need_nats_server()
    dev_server: NatsServer | None = None
    if request.node.get_closest_marker(DEV_BROKER_MARK) is not None:
        dev_server = request.getfixturevalue("nats_server")
    env = await make_env(tmp_path, dev_server=dev_server)
    try:
        yield env
    finally:
        await close_env(env)


@pytest.fixture
async def stop_nodes(prov_env: ProvEnv) -> AsyncIterator[None]:
    """Stops every node created through ``prov_env.node`` at the end of the test."""
    yield
    await asyncio.gather(*(n.stop() for n in prov_env.nodes), return_exceptions=True)


class OverlayWatcher:
    """Counts nodes announcing ``startup`` in normal mode on the overlay broker."""

    def __init__(self, overlay: NatsServer) -> None:
        self.overlay = overlay
        self.seen: dict[str, int] = {}
        self.nc: Any = None

    async def start(self) -> None:
        user, pw = self.overlay.users["choria"]
        self.nc = await nats.connect(self.overlay.url, user=user, password=pw)

        async def on_event(msg: Any) -> None:
            ev = parse_event(msg.data)
            self.seen[ev.identity] = self.seen.get(ev.identity, 0) + 1

        await self.nc.subscribe("choria.lifecycle.event.startup.server", cb=on_event)
        await sync_flush(self.nc)

    async def stop(self) -> None:
        if self.nc is not None:
            await self.nc.close()


# ---------------------------------------------------------------------------- reference helper


def write_overlays_yaml(
    path: Path,
    overlays: list[tuple[str, NatsServer]],
    *,
    capacity: int,
    affinity: str | None = None,
) -> Path:
    """An overlays registry whose brokers are real nats-servers (one per overlay)."""
    placement: dict[str, Any] = {
        "policies": ["stable", "affinity", "least_filled"] if affinity else ["least_filled"],
    }
    if affinity:
        placement["affinity"] = affinity
    doc = {
        "overlays": [
            {"name": name, "brokers": [srv.url], "capacity": capacity} for name, srv in overlays
        ],
        "placement": placement,
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def write_reference_yaml(
    path: Path,
    *,
    overlays_file: Path,
    overlays: list[tuple[str, NatsServer]],
    ca: dict[str, Any],
    ttl: str = "168h",
) -> Path:
    """The reference helper's YAML: the given overlays and CA; each overlay's nodes log in to
    its broker as that server's ``choria`` user (per-overlay settings)."""
    doc = {
        "overlays": str(overlays_file),
        "ca": ca,
        "certificate": {"ttl": ttl},
        "collectives": ["mcollective"],
        "configuration": {"loglevel": "info", "registerinterval": "300"},
        "overlay_configuration": {
            name: {
                "plugin.nats.user": srv.users["choria"][0],
                "plugin.nats.pass": srv.users["choria"][1],
            }
            for name, srv in overlays
        },
    }
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds broker passwords
    with os.fdopen(fd, "w") as fh:
        yaml.safe_dump(doc, fh, sort_keys=False)
    return path


def check_node_certificate(node: NodeAgent, ca_cert: x509.Certificate) -> x509.Certificate:
    """The node's certificate on disk: CN = identity, identity among the DNS SANs, public key
    = the node's own private key's, and issued by ``ca_cert``."""
    cert = x509.load_pem_x509_certificate((node.ssldir / "certificate.pem").read_bytes())
    cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
    assert cn == node.identity
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert node.identity in san.get_values_for_type(x509.DNSName)
    key = serialization.load_pem_private_key(
        (node.ssldir / "private.pem").read_bytes(), password=None
    )
    spki = serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    assert cert.public_key().public_bytes(*spki) == key.public_key().public_bytes(*spki)
    cert.verify_directly_issued_by(ca_cert)
    return cert

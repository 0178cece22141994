"""A node whose provisioning token says ``chs: true`` answers only correctly signed requests.

Real nats-server (TLS for the x509 case: the CA the node is given verifies the broker and the
request signers alike), real keys and certificates, the node agent as a Choria node would run.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nats
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from choria_core.protocol import (
    Filter,
    RequestSigner,
    RPCReply,
    directed_subject,
    encode_request,
    encode_rpc_request,
    new_request,
    reply_prefix,
)
from node_agent.node import NodeAgent
from node_agent.transport import tls_context
from testbed.natsserver import NatsServer, default_accounts, start_nats_server
from tests.node_agent.client import ProvClient, write_token
from tests.node_agent.pki import ThrowawayCA
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

CALLER = "choria=provisioner.choria"
REFUSED = "signature_refused"


class SigningClient(ProvClient):
    """The test provisioner client, sending requests signed by ``signer`` (None: unsigned)."""

    async def signed_rpc(
        self, identity: str, signer: RequestSigner | None, *, callerid: str = CALLER
    ) -> asyncio.Queue[tuple[RPCReply | bytes, str]]:
        req = new_request(
            agent="rpcutil",
            collective="provisioning",
            callerid=callerid,
            senderid=self.senderid,
            payload=encode_rpc_request("rpcutil", "ping", {}),
            filter=Filter(agent=("rpcutil",)),
        )
        queue: asyncio.Queue[tuple[RPCReply | bytes, str]] = asyncio.Queue()
        self._waiters[req.requestid] = queue
        reply_to = f"{reply_prefix('provisioning', self.callerid)}.{req.requestid}"
        data = encode_request(req, reply_to=reply_to, mc_sender=self.senderid, signer=signer)
        await self.nc.publish(directed_subject("provisioning", identity), data, reply=reply_to)
        await self.nc.flush()
        return queue


async def _answered(queue: asyncio.Queue[tuple[RPCReply | bytes, str]]) -> RPCReply:
    body, _ = await asyncio.wait_for(queue.get(), 30)
    assert isinstance(body, RPCReply)
    return body


async def _refused(
    node: NodeAgent, client: SigningClient, signer: RequestSigner | None, **kw: Any
) -> None:
    before = node.stats.get(REFUSED, 0)
    queue = await client.signed_rpc(node.identity, signer, **kw)
    await async_wait_for(lambda: node.stats.get(REFUSED, 0) > before, timeout=30)
    await asyncio.sleep(0.2)
    assert queue.empty(), "a refused request was answered"


def _rsa_signer(key: rsa.RSAPrivateKey, cert_pem: str, caller: str = CALLER) -> RequestSigner:
    return RequestSigner(
        sign=lambda d: key.sign(d, padding.PKCS1v15(), hashes.SHA256()),
        pubcert=cert_pem,
        caller=caller,
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _client_jwt(issuer: ed25519.Ed25519PrivateKey, seed: ed25519.Ed25519PrivateKey) -> str:
    now = int(time.time())
    claims = {
        "purpose": "choria_client_id",
        "callerid": CALLER,
        "public_key": seed.public_key().public_bytes_raw().hex(),
        "ou": "choria",
        "iss": "I-" + issuer.public_key().public_bytes_raw().hex(),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "permissions": {"fleet_management": True},
    }
    head = _b64url(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64url(issuer.sign(f'{head}.{body}'.encode()))}"


@dataclass
class TLSBroker:
    server: NatsServer
    ca: ThrowawayCA
    ca_file: Path

    @property
    def url(self) -> str:
        return f"tls://127.0.0.1:{self.server.port}"


@pytest.fixture
def tls_broker(tmp_path: Path) -> Iterator[TLSBroker]:
    ca = ThrowawayCA.create()
    pki = tmp_path / "pki"
    cert, key = ca.issue_files(pki, "broker.example.net", server=True)
    ca_file = pki / "ca.pem"
    ca_file.write_text(ca.pem)
    users = {r: (r, f"pw-{r}-x") for r in ("provisioner", "node", "choria", "sys")}
    tls = f'cert_file: "{cert}", key_file: "{key}", timeout: 5'
    text = (
        "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\n"
        + f"tls {{{{ {tls} }}}}\n"
        + default_accounts(users).replace("{", "{{").replace("}", "}}")
    )
    server = start_nats_server(tmp_path / "nats", config_text=text, users=users)
    try:
        yield TLSBroker(server, ca, ca_file)
    finally:
        server.stop()


async def _client(url: str, server: NatsServer, ca_file: Path | None) -> SigningClient:
    user, password = server.users["provisioner"]
    tls = tls_context(ca=ca_file) if ca_file else None
    nc = await nats.connect(url, user=user, password=password, tls=tls, name="signing-test")
    client = SigningClient(nc, callerid=CALLER, senderid="provisioner.example.net")
    await client._subscribe("provisioning")
    return client


async def test_x509_signed_requests_only(
    tls_broker: TLSBroker, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    ca = tls_broker.ca
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = _rsa_signer(key, ca.sign(key.public_key(), "provisioner.choria"))
    token = write_token(tmp_path / "t.jwt", tls_broker.server, urls=[tls_broker.url], secure=True)
    node = NodeAgent(
        identity="signed-x509.example.net",
        token_path=token,
        state_dir=tmp_path / "state",
        tls_ca=tls_broker.ca_file,
        durable=False,
    )
    await node.start()
    client = await _client(tls_broker.url, tls_broker.server, tls_broker.ca_file)
    try:
        caplog.set_level(logging.WARNING, logger="node_agent.dispatch")
        await _refused(node, client, None)  # unsigned
        assert "signed-x509.example.net dropped request" in caplog.text
        assert "unsigned request" in caplog.text
        other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
        await _refused(node, client, _rsa_signer(other, good.pubcert))  # wrong key
        rogue_ca = ThrowawayCA.create()
        rogue = _rsa_signer(key, rogue_ca.sign(key.public_key(), "provisioner.choria"))
        await _refused(node, client, rogue)  # certificate of another CA
        caller = "choria=intruder.choria"
        await _refused(node, client, _rsa_signer(key, good.pubcert, caller), callerid=caller)
        reply = await _answered(await client.signed_rpc(node.identity, good))
        assert reply.ok and reply.action == "ping"
        assert node.stats[REFUSED] == 4
        assert node.stats["unvalidated"] >= 4
    finally:
        await node.stop()
        await client.close()


async def test_jwt_signed_requests_only(shared_nats_server: NatsServer, tmp_path: Path) -> None:
    issuer = ed25519.Ed25519PrivateKey.generate()
    seed = ed25519.Ed25519PrivateKey.generate()
    token = write_token(
        tmp_path / "t.jwt",
        shared_nats_server,
        secure=True,
        issuer="I-" + issuer.public_key().public_bytes_raw().hex(),
    )
    node = NodeAgent(
        identity="signed-jwt.example.net",
        token_path=token,
        state_dir=tmp_path / "state",
        durable=False,
    )
    await node.start()
    client = await _client(shared_nats_server.url, shared_nats_server, None)
    try:
        good = RequestSigner(sign=seed.sign, pubcert=_client_jwt(issuer, seed), caller=CALLER)
        await _refused(node, client, None)
        other = ed25519.Ed25519PrivateKey.generate()
        await _refused(node, client, RequestSigner(other.sign, good.pubcert, CALLER))
        rogue = ed25519.Ed25519PrivateKey.generate()
        rogue_jwt = _client_jwt(rogue, seed)  # a client JWT the node's issuer never issued
        await _refused(node, client, RequestSigner(seed.sign, rogue_jwt, CALLER))
        reply = await _answered(await client.signed_rpc(node.identity, good))
        assert reply.ok
        assert node.stats[REFUSED] == 3
    finally:
        await node.stop()
        await client.close()


async def test_without_chs_unsigned_requests_are_answered(
    shared_nats_server: NatsServer, tmp_path: Path
) -> None:
    node = NodeAgent(
        identity="unsigned-ok.example.net",
        token_path=write_token(tmp_path / "t.jwt", shared_nats_server, secure=False),
        state_dir=tmp_path / "state",
        durable=False,
    )
    await node.start()
    client = await _client(shared_nats_server.url, shared_nats_server, None)
    try:
        assert (await _answered(await client.signed_rpc(node.identity, None))).ok
        assert node.stats.get(REFUSED, 0) == 0
    finally:
        await node.stop()
        await client.close()


async def test_chs_without_trust_material_refuses_everything(
    shared_nats_server: NatsServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.ERROR, logger="node_agent.boot")
    node = NodeAgent(
        identity="no-trust.example.net",
        token_path=write_token(tmp_path / "t.jwt", shared_nats_server, secure=True),
        state_dir=tmp_path / "state",
        durable=False,
    )
    await node.start()
    client = await _client(shared_nats_server.url, shared_nats_server, None)
    try:
        assert "every request will be refused" in caplog.text
        seed = ed25519.Ed25519PrivateKey.generate()
        signer = RequestSigner(seed.sign, _client_jwt(seed, seed), CALLER)
        await _refused(node, client, signer)
    finally:
        await node.stop()
        await client.close()

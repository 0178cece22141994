"""Logging in to a Choria Broker with a client JWT and a signed nonce, then provisioning.

The broker is a real nats-server whose auth callout (``testbed/choria_broker_auth.py``) checks
the CONNECT as go-choria's ``choria_auth.go`` does: the provisioner password, the client JWT
against the Organization Issuer of its ``ou``, the ``provisioner`` permission and the nonce
signature with the JWT's public key.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519

from jwt_tools.base64url import b64url_encode
from provisioner import connection
from provisioner.client_identity import ClientIdentityConfig
from provisioner.config import ProvisionerConfig
from provisioner.service import ProvisionerError
from testbed.choria_broker_auth import ChoriaBroker, issue_client_jwt, start_choria_broker
from tests.provisioner.e2e.env import ProvEnv, close_env, make_env, need_nats_server
from tests.support import async_wait_for

pytestmark = pytest.mark.integration

CALLER = "choria=provisioner.example.net"
NONCE = "the-nonce-123"


class Issuer:
    """An Organization Issuer and the client identities it issues, as files."""

    def __init__(self, directory: Path) -> None:
        self.key = ed25519.Ed25519PrivateKey.generate()
        self.dir = directory
        directory.mkdir(parents=True, exist_ok=True)

    @property
    def public_hex(self) -> str:
        return self.key.public_key().public_bytes_raw().hex()

    def identity(
        self,
        name: str,
        *,
        validity_s: float = 3600,
        now: float | None = None,
        provisioner: bool = True,
        signer: ed25519.Ed25519PrivateKey | None = None,
    ) -> tuple[ClientIdentityConfig, ed25519.Ed25519PrivateKey]:
        client = ed25519.Ed25519PrivateKey.generate()
        token = issue_client_jwt(
            signer or self.key,
            caller=CALLER,
            public_key_hex=client.public_key().public_bytes_raw().hex(),
            validity_s=validity_s,
            now=now,
            provisioner=provisioner,
        )
        jwt, seed = self.dir / f"{name}.jwt", self.dir / f"{name}.seed"
        jwt.write_text(token)
        seed.write_text(client.private_bytes_raw().hex())
        seed.chmod(0o600)
        return ClientIdentityConfig(jwt=str(jwt), seed=str(seed)), client


@pytest.fixture
async def choria(tmp_path: Path) -> AsyncIterator[tuple[ChoriaBroker, ProvEnv, Issuer]]:
    need_nats_server()
    issuer = Issuer(tmp_path / "issuer")
    broker = await start_choria_broker(tmp_path / "broker", issuers={"choria": issuer.public_hex})
    try:
        env = await make_env(tmp_path / "env", dev_server=broker.server)
        try:
            yield broker, env, issuer
        finally:
            await asyncio.gather(*(n.stop() for n in env.nodes), return_exceptions=True)
            await close_env(env)
    finally:
        await broker.stop()


async def _connect(env: ProvEnv, ident: ClientIdentityConfig | None, **kw: Any) -> Any:
    cfg = env.config(client_identity=ident or ClientIdentityConfig(), **kw)
    return await connection.connect(
        cfg, name="jwt-login-test", is_running=lambda: True, on_reconnect=lambda: None
    )


async def test_provisioner_logs_in_with_jwt_and_nonce_and_provisions(
    choria: tuple[ChoriaBroker, ProvEnv, Issuer],
) -> None:
    broker, env, issuer = choria
    ident, _ = issuer.identity("provisioner")
    prov = env.provisioner(client_identity=ident)
    await prov.start()
    try:
        assert broker.auth.admitted == ["provisioner"], broker.auth.refused
        # what choria_auth.go reads: user/pass, the JWT as auth_token, the nonce sig
        assert {"user", "pass", "auth_token", "sig"} <= broker.auth.connect_fields[0]
        node = env.node("jwt-node.example.net")
        await node.start()
        await node.wait_normal(90)
        env.verify_node_certificate(node)
        await async_wait_for(lambda: bool(env.audit_for(node.identity)), timeout=30)
        assert env.audit_for(node.identity)[-1]["decision"] == "provisioned"
    finally:
        await prov.stop()


async def test_without_a_jwt_the_broker_refuses_the_provisioner(
    choria: tuple[ChoriaBroker, ProvEnv, Issuer],
) -> None:
    broker, env, _ = choria
    with pytest.raises(ProvisionerError, match="Authorization Violation") as err:
        await _connect(env, None)
    assert "no token provided in connection" in broker.auth.refused
    _, password = env.server.users["provisioner"]
    assert password not in str(err.value)


async def test_jwt_of_another_issuer_or_without_provisioner_right_is_refused(
    choria: tuple[ChoriaBroker, ProvEnv, Issuer],
) -> None:
    broker, env, issuer = choria
    rogue, _ = issuer.identity("rogue", signer=ed25519.Ed25519PrivateKey.generate())
    with pytest.raises(ProvisionerError, match="Authorization Violation"):
        await _connect(env, rogue)
    assert any("not signed by the issuer" in r for r in broker.auth.refused)
    plain, _ = issuer.identity("plain", provisioner=False)
    with pytest.raises(ProvisionerError, match="Authorization Violation"):
        await _connect(env, plain)
    assert any("provisioner claim is false" in r for r in broker.auth.refused)
    assert broker.auth.admitted == []


async def test_wrong_password_is_refused_even_with_a_good_jwt(
    choria: tuple[ChoriaBroker, ProvEnv, Issuer],
) -> None:
    broker, env, issuer = choria
    ident, _ = issuer.identity("provisioner")
    with pytest.raises(ProvisionerError, match="Authorization Violation"):
        await _connect(env, ident, broker_provisioning_password="not-the-password")
    assert "invalid provisioner password supplied" in broker.auth.refused


async def test_a_nonce_signed_with_another_key_is_refused(
    choria: tuple[ChoriaBroker, ProvEnv, Issuer],
) -> None:
    # The client side refuses a seed that does not match the JWT (see below), so forge the
    # CONNECT by hand: a valid JWT, its nonce signed by someone else's key.
    broker, env, issuer = choria
    ident, _ = issuer.identity("provisioner")
    token = Path(ident.jwt).read_text()
    thief = ed25519.Ed25519PrivateKey.generate()
    nc = connection._ChoriaClient()
    nc.choria_jwt = token
    _, password = env.server.users["provisioner"]
    with pytest.raises(Exception):  # noqa: B017 - nats-py raises its own error types
        await nc.connect(
            servers=[env.broker_url],
            user="provisioner",
            password=password,
            token=token,
            user_jwt_cb=lambda: bytearray(token.encode()),
            signature_cb=lambda nonce: b64url_encode(thief.sign(nonce.encode())).encode(),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
        )
    with contextlib.suppress(Exception):
        await nc.close()
    assert "nonce signature did not verify using pub key in the jwt" in broker.auth.refused
    assert broker.auth.admitted == []


async def test_wrong_seed_or_expired_jwt_is_refused_before_connecting(
    choria: tuple[ChoriaBroker, ProvEnv, Issuer],
) -> None:
    broker, env, issuer = choria
    ident, _ = issuer.identity("provisioner")
    _, other = issuer.identity("other")
    wrong = ClientIdentityConfig(jwt=ident.jwt, seed=str(issuer.dir / "other.seed"))
    with pytest.raises(ProvisionerError, match="does not match the seed"):
        await _connect(env, wrong)
    assert other.private_bytes_raw().hex() not in str(wrong)
    expired, _ = issuer.identity("expired", validity_s=60, now=time.time() - 3600)
    with pytest.raises(ProvisionerError, match="expired"):
        await _connect(env, expired)
    assert broker.auth.admitted == [] and broker.auth.refused == []  # never sent


async def test_the_connect_line_is_what_a_go_choria_client_sends(tmp_path: Path) -> None:
    """On the wire (a socket of our own that plays the server): user/pass, the JWT as both
    ``auth_token`` and ``jwt``, and ``sig``: base64url without padding, ed25519 over the
    nonce with the seed, verifiable with the JWT's ``public_key``."""
    issuer = Issuer(tmp_path)
    ident, client = issuer.identity("provisioner")
    token = Path(ident.jwt).read_text()
    lines: list[bytes] = []

    async def fake_server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        info = {"server_id": "x", "version": "2.11.0", "proto": 1, "headers": True,
                "auth_required": True, "nonce": NONCE, "max_payload": 1 << 20}  # fmt: skip
        writer.write(b"INFO " + json.dumps(info).encode() + b"\r\n")
        await writer.drain()
        lines.append(await reader.readline())
        writer.close()

    server = await asyncio.start_server(fake_server, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    cfg = ProvisionerConfig(
        broker_urls=[f"nats://127.0.0.1:{port}"],
        broker_provisioning_password="pw-123",
        client_identity=ident,
        features={"jwt": False},
    )
    nc: Any = None
    try:
        with contextlib.suppress(ProvisionerError):  # the fake server hangs up after CONNECT
            nc = await connection.connect(
                cfg, name="wire", is_running=lambda: False, on_reconnect=lambda: None
            )
        await async_wait_for(lambda: bool(lines), timeout=30)
    finally:
        if nc is not None:
            await connection.close(nc, timeout=5)
        server.close()
    verb, _, body = lines[0].partition(b" ")
    sent = json.loads(body)
    assert verb == b"CONNECT"
    assert sent["user"] == "provisioner" and sent["pass"] == "pw-123"
    assert sent["auth_token"] == token and sent["jwt"] == token
    sig = sent["sig"]
    assert "=" not in sig and "+" not in sig and "/" not in sig  # RawURLEncoding
    raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
    client.public_key().verify(raw, NONCE.encode())

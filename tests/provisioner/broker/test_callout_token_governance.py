"""Token governance at the auth callout, on a real nats-server: the leaked-token scenario.

A token baked into an image leaks. With ``token_governance`` the callout admits it for at
most ``max_identities`` distinct node identities (shared by the replicas through KV), only
for identities matching its pattern, not past its expiry override, and not at all once its
JTI is revoked (``provisioner jwt revoke --callout-config``), all without a secret in a log.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats.errors
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives.asymmetric import ed25519
from typer.testing import CliRunner

from jwt_tools.tokens import decode_unverified
from provisioner.cli.jwt import app as jwt_app
from provisioner.token_governance import TokenGovernanceConfig
from testbed.isolated_broker import IsolatedBroker, start_isolated_broker
from tests.provisioner.broker.conftest import Conn, connect, refused, wait_for_log
from tests.support import async_wait_for

pytestmark = [pytest.mark.integration]

SECRET = "image-baked-secret-7781"


def jti_of(token: str) -> str:
    return str(decode_unverified(token)[1]["jti"])


async def governed(broker: IsolatedBroker, *limits: dict[str, Any]) -> None:
    """Restart the callout replicas with token governance on and these limits."""
    await broker.stop_callout()
    section = TokenGovernanceConfig.model_validate({"enabled": True, "limits": list(limits)})
    broker.callout_config = broker.callout_config.model_copy(update={"token_governance": section})
    await broker.start_callout()


@pytest_asyncio.fixture
async def broker(
    tmp_path: Path, nats_binary: str, signing_key: ed25519.Ed25519PrivateKey
) -> AsyncIterator[IsolatedBroker]:
    b = await start_isolated_broker(tmp_path / "b", [signing_key.public_key()], replicas=2)
    async with b:
        yield b


async def test_leaked_token_admits_max_identities_then_refuses(
    broker: IsolatedBroker, make_token: Callable[..., str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="provisioner.broker.callout")
    leaked, other = make_token(token=SECRET), make_token(token="another-secret")
    await governed(broker, {"jti": jti_of(leaked), "max_identities": 2})
    opts = broker.node_connect_options
    held: list[Conn] = []
    try:
        for name in ("node-a.example.net", "node-b.example.net"):
            held.append(await connect(**opts(name, leaked)))
        err = await refused(**opts("node-c.example.net", leaked))
        assert "authorization violation" in err
        await wait_for_log(broker.server.log_path, "refused: token_identity_limit")
        assert broker.callout_stats.refused["token_identity_limit"] == 1
        # the two admitted identities reconnect (either replica), another token is unaffected
        await held.pop(0).close()
        held.append(await connect(**opts("node-a.example.net", leaked)))
        held.append(await connect(**opts("node-c.example.net", other)))
        assert "authorization violation" in await refused(**opts("node-d.example.net", leaked))
        assert broker.callout_stats.refused["token_identity_limit"] == 2
    finally:
        for conn in held:
            await conn.close()
    assert SECRET not in caplog.text and leaked not in caplog.text
    assert SECRET not in broker.server.log_path.read_text(errors="replace")


async def test_revoked_jti_is_refused_and_can_be_lifted(
    broker: IsolatedBroker, make_token: Callable[..., str]
) -> None:
    token = make_token(token=SECRET)
    jti = jti_of(token)
    await governed(broker)
    opts = broker.node_connect_options("web1.example.net", token)
    await (await connect(**opts)).close()
    runner = CliRunner()
    cli = ["--callout-config", str(broker.files.auth_config)]
    r = await asyncio.to_thread(
        runner.invoke, jwt_app, ["revoke", jti, "--reason", "leaked in image 42", *cli]
    )
    assert r.exit_code == 0 and "callout: revoked" in r.output, r.output
    r = await asyncio.to_thread(runner.invoke, jwt_app, ["revoked", *cli])
    assert jti in r.output and "leaked in image 42" in r.output

    async def is_refused() -> bool:
        try:
            await (await connect(**opts)).close()
            return False
        except nats.errors.Error:
            return True

    await async_wait_for(is_refused, 15)
    await wait_for_log(broker.server.log_path, "refused: token_revoked")
    r = await asyncio.to_thread(runner.invoke, jwt_app, ["revoke", "--undo", jti, *cli])
    assert r.exit_code == 0 and "revocation lifted" in r.output, r.output

    async def is_admitted() -> bool:
        return not await is_refused()

    await async_wait_for(is_admitted, 15)


async def test_identity_pattern(broker: IsolatedBroker, make_token: Callable[..., str]) -> None:
    token = make_token(token=SECRET)
    await governed(broker, {"jti": jti_of(token), "identity_pattern": r"web\d+\.example\.net"})
    await (await connect(**broker.node_connect_options("web7.example.net", token))).close()
    for identity in ("db1.example.net", "web7.example.net.attacker.org"):
        err = await refused(**broker.node_connect_options(identity, token))
        assert "authorization violation" in err
    await wait_for_log(broker.server.log_path, "refused: token_identity_pattern")
    assert broker.callout_stats.refused["token_identity_pattern"] == 2


async def test_expiry_override(broker: IsolatedBroker, make_token: Callable[..., str]) -> None:
    token = make_token(token=SECRET)  # its own exp is a year away
    fresh = make_token(token=SECRET)
    await governed(
        broker,
        {"jti": jti_of(token), "expires": "2020-01-01T00:00:00Z"},
        {"jti": jti_of(fresh), "expires": "1d"},
    )
    assert "authorization violation" in await refused(
        **broker.node_connect_options("n1.example.net", token)
    )
    await wait_for_log(broker.server.log_path, "refused: token_expired_override")
    await (await connect(**broker.node_connect_options("n1.example.net", fresh))).close()

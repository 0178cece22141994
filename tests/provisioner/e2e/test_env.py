"""The e2e environment itself: the isolated broker by default, the dev server on request."""

from __future__ import annotations

from typing import Any

import nats
import nats.errors
import pytest

from jwt_tools import parse_provisioning_token_unverified
from tests.provisioner.e2e.env import ProvEnv, prov_env

__all__ = ["prov_env"]

pytestmark = pytest.mark.integration


async def _connect(url: str, **kw: Any) -> nats.NATS:
    return await nats.connect(
        url, allow_reconnect=False, max_reconnect_attempts=0, connect_timeout=3, **kw
    )


async def test_default_is_the_isolated_broker(prov_env: ProvEnv) -> None:
    assert prov_env.isolated and prov_env.broker is not None
    assert prov_env.config().broker_urls == [prov_env.broker.url]
    token = prov_env.token_path.read_text().strip()
    assert "chusr" not in parse_provisioning_token_unverified(token)  # the JWT is the login
    # A forged token is refused by the auth callout before any provisioner sees the node.
    forged = prov_env.token_with_wrong_key().read_text().strip()
    with pytest.raises((nats.errors.Error, OSError)):
        await _connect(prov_env.broker_url, token=forged, name="forged.example.net")
    assert prov_env.broker.callout_stats.refused
    # The env's token admits a node, which may use only its own subject.
    errors: list[Exception] = []

    async def on_error(exc: Exception) -> None:
        errors.append(exc)

    nc = await _connect(prov_env.broker_url, token=token, name="n1.example.net", error_cb=on_error)
    try:
        await nc.subscribe("provisioning.node.n1.example.net")
        await nc.subscribe("provisioning.node.n2.example.net")
        await nc.flush()
        await nc.flush()
    finally:
        await nc.close()
    assert prov_env.broker.callout_stats.admitted == 1
    assert any("n2.example.net" in str(e) for e in errors), errors
    assert not any("n1.example.net" in str(e) for e in errors), errors


@pytest.mark.dev_broker
async def test_dev_broker_opt_out(prov_env: ProvEnv) -> None:
    assert not prov_env.isolated and prov_env.broker_url == prov_env.server.url
    user, password = prov_env.server.users["node"]
    # The dev layout's static node user logs in without any token.
    nc = await _connect(prov_env.broker_url, user=user, password=password)
    await nc.close()
    claims = parse_provisioning_token_unverified(prov_env.token_path.read_text().strip())
    assert claims["chusr"] == user  # nodes log in as that user

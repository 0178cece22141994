"""Hostile provisioning tokens next to a good node: each refused with its reason, the good
node provisioned all the same.

The tokens are really signed by the fleet's signer (a careless signer, or a stolen key used
to mint a forever-token): only the token policy stops them, not the signature.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import jwt
import nats
import pytest
from cryptography.hazmat.primitives.asymmetric import rsa

from jwt_tools import decode_unverified, load_signing_key
from provisioner.service import Provisioner
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration

YEAR = 365 * 86400


def _resigned(env: ProvEnv, name: str, **changes: Any) -> Path:
    """The env's good token with some claims changed (``None`` removes one), re-signed."""
    _, claims = decode_unverified(env.token_path.read_text())
    for key, value in changes.items():
        if value is None:
            claims.pop(key, None)
        else:
            claims[key] = value
    key = load_signing_key(env.signer_key_path)
    alg = "RS256" if isinstance(key, rsa.RSAPrivateKey) else "EdDSA"
    path = env.workdir / f"{name}.jwt"
    path.write_text(jwt.encode(claims, key, algorithm=alg))
    path.chmod(0o600)
    return path


def _records(prov: Provisioner, identity: str) -> list[dict[str, Any]]:
    return [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity]


# The isolated broker's callout refuses these tokens before the provisioner sees them (the
# test below): the dev broker lets them through so the provisioner's own check is exercised.
@pytest.mark.dev_broker
async def test_hostile_tokens_refused_by_the_provisioner_good_node_provisioned(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    _, good_claims = decode_unverified(prov_env.token_path.read_text())
    iat = good_claims["iat"]
    hostile = {
        "no-exp.example.net": (_resigned(prov_env, "no-exp", exp=None), "token_no_expiry"),
        "exp-1e20.example.net": (_resigned(prov_env, "exp-1e20", exp=10**20), "token_invalid_time"),
        "twenty-years.example.net": (
            _resigned(prov_env, "twenty-years", exp=iat + 20 * YEAR),
            "token_lifetime_too_long",
        ),
        "iat-bool.example.net": (_resigned(prov_env, "iat-bool", iat=True), "token_malformed"),
    }
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        nodes = [prov_env.node(i, token_path=p) for i, (p, _) in hostile.items()]
        good = prov_env.node("good-beside-hostile.example.net")
        for n in [*nodes, good]:
            await n.start()
        await good.wait_normal(30)
        prov_env.verify_node_certificate(good)

        def all_refused() -> bool:
            return all(_records(prov, i) for i in hostile)

        await async_wait_for(all_refused, 30)
        for identity, (_, reason) in hostile.items():
            rec = _records(prov, identity)[-1]
            assert rec["decision"] == "failed" and rec["stage"] == "validate", rec
            assert rec["reason"] == reason, rec
            assert rec["csr_sha256"] is None and rec["cert_serial"] is None
            assert "Traceback" not in (rec["error"] or "")
        assert not [
            r
            for r in prov.audit_tail(None, 1000)
            if r.get("event") == "issued" and r["identity"] in hostile
        ]
        assert _records(prov, good.identity)[-1]["decision"] == "provisioned"
    finally:
        await prov.stop()


@pytest.mark.parametrize(
    ("changes", "reason"),
    [({"exp": None}, "no_expiry"), ({"exp": 10**20}, "invalid_time")],
)
async def test_callout_refuses_hostile_tokens_good_node_provisioned(
    prov_env: ProvEnv, stop_nodes: None, changes: dict[str, Any], reason: str
) -> None:
    """On the isolated broker the auth callout applies the same policy at connect time."""
    broker = prov_env.broker
    assert prov_env.isolated and broker is not None
    token = _resigned(prov_env, f"callout-{reason}", **changes).read_text()
    before = broker.callout_stats.refused[reason]
    with pytest.raises((nats.errors.Error, OSError)):
        nc = await nats.connect(
            **broker.node_connect_options("hostile.example.net", token),
            allow_reconnect=False,
            max_reconnect_attempts=0,
            connect_timeout=3,
        )
        await nc.close()
    assert broker.callout_stats.refused[reason] == before + 1
    prov = prov_env.provisioner(helper_mode="persistent", helper_pool_size=1)
    await prov.start()
    try:
        good = prov_env.node("callout-good.example.net")
        await good.start()
        await good.wait_normal(30)
        assert _records(prov, good.identity)[-1]["decision"] == "provisioned"
    finally:
        await prov.stop()

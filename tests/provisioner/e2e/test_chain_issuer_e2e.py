"""Server JWTs with chain issuer data through the whole pipeline: real nats-server (isolated
broker + overlay), real node agents, a real exec helper (``chain_helper.py``).

The provisioner is a chain issuer (``jwt_signing_key`` + the org-issued ``jwt_signing_token``);
each node's ``server.jwt`` must pass the independent check against the org issuer's key alone.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest

from provisioner.config import Features
from provisioner.service import Provisioner
from tests.jwt_tools.test_chain_issuer import (
    CHAIN,
    ORG,
    _seed,
    chain_issuer_token,
    independent_verify,
)
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

pytestmark = pytest.mark.integration


def _chain_files(env: ProvEnv, issuer_exp: float) -> tuple[Path, Path]:
    key, token = env.workdir / "chain-signer.seed", env.workdir / "chain-signer.jwt"
    key.write_bytes(_seed(CHAIN))
    key.chmod(0o600)
    token.write_text(chain_issuer_token(exp=issuer_exp) + "\n")
    token.chmod(0o600)
    return key, token


def _provisioner(env: ProvEnv, key: Path, token: Path) -> Provisioner:
    return env.provisioner(
        features=Features(ed25519=True),
        helper=env.helper_command("chain_helper.py"),
        jwt_signing_key=str(key),
        jwt_signing_token=str(token),
    )


def _records(prov: Provisioner, identity: str) -> list[dict[str, Any]]:
    return [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity and "decision" in r]


async def test_chain_issued_server_jwts_and_hostile_claims(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    issuer_exp = int(time.time()) + 30 * 86400
    key, token = _chain_files(prov_env, issuer_exp)
    prov = _provisioner(prov_env, key, token)
    await prov.start()
    try:
        good = prov_env.node("good.chain.example.net")
        greedy = prov_env.node("greedy.chain.example.net")  # helper asks for a 100-year token
        rogue = prov_env.node("rogue.chain.example.net")  # helper asks for a forbidden permission
        for n in (good, greedy, rogue):
            await n.start()
        await good.wait_normal(30)
        await greedy.wait_normal(30)
        await async_wait_for(lambda: bool(_records(prov, rogue.identity)), 30)

        now = time.time()
        for node in (good, greedy):
            jwt_text = (node.config_path.parent / "server.jwt").read_text().strip()
            claims = independent_verify(jwt_text, ORG.public_key(), now)
            assert claims["identity"] == node.identity
            assert claims["issexp"] == issuer_exp
            assert _records(prov, node.identity)[-1]["decision"] == "provisioned"
        greedy_jwt = (greedy.config_path.parent / "server.jwt").read_text().strip()
        assert independent_verify(greedy_jwt, ORG.public_key(), now)["exp"] == issuer_exp

        rec = _records(prov, rogue.identity)[-1]
        assert rec["decision"] == "failed", rec
        assert rec["reason"] == "server_token_invalid_claims", rec
        assert not (rogue.config_path.parent / "server.jwt").exists()
        # the chain issuer JWT is a credential: never in the audit log
        chain_text = token.read_text().strip()
        assert all(chain_text not in str(r) for r in prov.audit_tail(None, 1000))
    finally:
        await prov.stop()


async def test_expired_chain_token_refused_renewal_used_without_restart(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    key, token = _chain_files(prov_env, time.time() + 86400)
    prov = _provisioner(prov_env, key, token)
    await prov.start()
    try:
        # the issuer's token lapses while the provisioner runs: no node gets a dead token
        token.write_text(chain_issuer_token(exp=time.time() - 60) + "\n")
        late = prov_env.node("late.chain.example.net")
        await late.start()
        await async_wait_for(lambda: bool(_records(prov, late.identity)), 30)
        rec = _records(prov, late.identity)[-1]
        assert rec["decision"] == "failed" and rec["reason"] == "server_token_expired", rec
        assert not (late.config_path.parent / "server.jwt").exists()

        renewed = int(time.time()) + 7 * 86400
        token.write_text(chain_issuer_token(exp=renewed) + "\n")
        fresh = prov_env.node("fresh.chain.example.net")
        await fresh.start()
        await fresh.wait_normal(30)
        jwt_text = (fresh.config_path.parent / "server.jwt").read_text().strip()
        assert independent_verify(jwt_text, ORG.public_key(), time.time())["issexp"] == renewed
    finally:
        await prov.stop()


async def test_provisioner_refuses_to_start_with_a_mismatched_chain(prov_env: ProvEnv) -> None:
    _key, token = _chain_files(prov_env, time.time() + 86400)
    other = prov_env.workdir / "other.seed"
    other.write_bytes(_seed(ORG))  # not the chain issuer's key
    prov = _provisioner(prov_env, other, token)
    with pytest.raises(Exception, match="jwt_signing_token") as info:
        await prov.start()
    await prov.stop()
    assert "does not match" in str(info.value)

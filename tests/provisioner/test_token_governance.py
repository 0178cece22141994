"""Token governance: the rules, and the shared state in JetStream KV on a real nats-server.

A leaked provisioning token must stop admitting identities once it is revoked or past its
limits, on every replica at once: revocations are watched (a cache that follows the bucket)
and the identity count of a token is updated with compare-and-set, so replicas racing for the
last slot cannot both win.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import re
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import nats
import pytest
import pytest_asyncio
import yaml
from cryptography.hazmat.primitives.asymmetric import ed25519
from prometheus_client import CollectorRegistry, generate_latest
from pydantic import ValidationError
from typer.testing import CliRunner

from jwt_tools.tokens import (
    create_provisioning_token,
    decode_unverified,
    verify_provisioning_token,
)
from provisioner.broker.callout_config import CalloutConfig
from provisioner.cli.jwt import app as jwt_app
from provisioner.config import ConfigError, ProvisionerConfig, load_config
from provisioner.service import Provisioner
from provisioner.token_governance import (
    GovernanceMetrics,
    TokenGovernance,
    TokenGovernanceConfig,
    TokenLimit,
    TokenRefused,
    cht_sha256,
    find_limit,
    list_revoked,
    open_bucket,
    revoke,
    token_label,
    unrevoke,
)
from testbed.natsserver import NatsServer
from tests.provisioner.e2e.env import ProvEnv, prov_env, stop_nodes
from tests.support import async_wait_for

__all__ = ["prov_env", "stop_nodes"]

SECRET = "leaked-image-secret-0042"
KEY = ed25519.Ed25519PrivateKey.generate()


def claims_of(**kwargs: Any) -> dict[str, Any]:
    """The verified claims of a real token (as the callout and the pipeline see them)."""
    kwargs.setdefault("token", SECRET)
    token = create_provisioning_token(KEY, urls=["nats://broker.example.net:4222"], **kwargs)
    return verify_provisioning_token(token, [KEY.public_key()])


def governance(*limits: dict[str, Any]) -> TokenGovernanceConfig:
    return TokenGovernanceConfig.model_validate(
        {"enabled": True, "bucket": "T_TOKENS", "limits": list(limits)}
    )


# ----------------------------------------------------------------------------- the rules


def test_a_limit_names_its_token_by_jti_or_cht_hash_only() -> None:
    with pytest.raises(ValidationError, match="exactly one of jti or cht_sha256"):
        TokenLimit.model_validate({"max_identities": 2})
    with pytest.raises(ValidationError, match="exactly one of jti or cht_sha256"):
        TokenLimit.model_validate({"jti": "x", "cht_sha256": cht_sha256(SECRET)})
    with pytest.raises(ValidationError, match="64 hex"):
        TokenLimit.model_validate({"cht_sha256": SECRET})  # the secret itself is refused
    with pytest.raises(ValidationError, match="not a regular expression"):
        TokenLimit.model_validate({"jti": "x", "identity_pattern": "(web"})
    with pytest.raises(ValidationError, match="time zone"):
        TokenLimit.model_validate({"jti": "x", "expires": "2027-01-01T00:00:00"})
    with pytest.raises(ValidationError, match="enabled: true"):
        TokenGovernanceConfig.model_validate({"limits": [{"jti": "x", "max_identities": 1}]})
    with pytest.raises(ValidationError, match="same token"):
        governance({"jti": "x", "max_identities": 1}, {"jti": "x", "max_identities": 2})


def test_limit_lookup_prefers_jti_then_cht_hash() -> None:
    claims = claims_of()
    by_cht = {"cht_sha256": cht_sha256(SECRET).upper(), "max_identities": 5}
    cfg = governance(by_cht)
    limit = find_limit(cfg, claims)
    assert limit is not None and limit.max_identities == 5
    cfg = governance(by_cht, {"jti": claims["jti"], "max_identities": 2})
    limit = find_limit(cfg, claims)
    assert limit is not None and limit.max_identities == 2
    assert find_limit(governance({"jti": "other"}), claims) is None
    # labels are short hashes: neither the secret, nor its hash, nor the jti
    for label in (token_label(claims), *(x.label for x in cfg.limits)):
        assert len(label) == 12 and SECRET not in label and claims["jti"] != label
        assert label not in cht_sha256(SECRET)


def test_expiry_override_is_a_time_or_a_duration_after_iat() -> None:
    yaml_time = yaml.safe_load("expires: 2027-01-01T00:00:00Z")["expires"]  # a datetime
    assert isinstance(yaml_time, dt.datetime)
    at = TokenLimit.model_validate({"jti": "x", "expires": yaml_time})
    assert at.deadline({"iat": 1}) == dt.datetime(2027, 1, 1, tzinfo=dt.UTC).timestamp()
    after = TokenLimit.model_validate({"jti": "x", "expires": "2d"})
    assert after.deadline({"iat": 1000}) == 1000 + 2 * 86400
    assert after.deadline({}) == 0.0  # no issue time: refused rather than unlimited


def test_the_section_is_in_both_configurations_and_off_by_default() -> None:
    assert ProvisionerConfig().token_governance.enabled is False
    section = {"enabled": True, "limits": [{"jti": "a", "max_identities": 3}]}
    assert ProvisionerConfig.model_validate({"token_governance": section}).token_governance.limits
    callout = CalloutConfig.model_validate(
        {
            "servers": ["nats://x:4222"],
            "auth_user_seed": "SU",
            "issuer_seed": "SA",
            "xkey_seed": "SX",
            "verify_keys": ["k"],
            "token_governance": section,
        }
    )
    assert callout.token_governance.limits[0].max_identities == 3


def test_unknown_governance_keys_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "p.yaml"
    path.write_text(
        yaml.safe_dump({"token_governance": {"enabled": True, "limits": [{"jti": "a", "max": 1}]}})
    )
    with pytest.raises(ConfigError, match=re.escape("token_governance.limits[0].max: unknown key")):
        load_config(path)


# ----------------------------------------------------------------------------- shared state


def is_revoked(gov: TokenGovernance, jti: str, *, want: bool = True) -> Callable[[], bool]:
    return lambda: (gov.revocation(jti) is not None) == want


@pytest_asyncio.fixture
async def conns(nats_server: NatsServer) -> AsyncIterator[list[Any]]:
    """Three connections: two enforcing replicas and an operator."""
    user, pw = nats_server.users["provisioner"]
    out = [await nats.connect(nats_server.url, user=user, password=pw) for _ in range(3)]
    try:
        yield out
    finally:
        for nc in out:
            await nc.close()


@pytest.mark.integration
async def test_revocation_reaches_every_replica_and_can_be_lifted(conns: list[Any]) -> None:
    claims = claims_of()
    other = claims_of()
    cfg = governance()
    kv = await open_bucket(conns[2].jetstream(), cfg.bucket)
    early = await revoke(kv, "revoked-before-start", "test", by="ops")
    a = await TokenGovernance.open(conns[0].jetstream(), cfg)
    b = await TokenGovernance.open(conns[1].jetstream(), cfg)
    try:
        # loaded at start: the cache is complete before the first check
        assert a.revocation("revoked-before-start") == early
        await a.check(claims, "n1.example.net")
        await revoke(kv, claims["jti"], "leaked in image build 42", by="ops@example.net")
        for replica in (a, b):
            await async_wait_for(is_revoked(replica, claims["jti"]), 10)
            with pytest.raises(TokenRefused) as exc:
                await replica.check(claims, "n2.example.net")
            assert exc.value.reason == "token_revoked" and "leaked in image build 42" in str(
                exc.value
            )
            assert SECRET not in str(exc.value)
            await replica.check(other, "n2.example.net")  # another token is unaffected
        listed = await list_revoked(kv)
        assert [r.jti for r in listed] == ["revoked-before-start", claims["jti"]]
        assert listed[1].by == "ops@example.net"
        assert await unrevoke(kv, claims["jti"]) is True
        assert await unrevoke(kv, claims["jti"]) is False
        for replica in (a, b):
            await async_wait_for(is_revoked(replica, claims["jti"], want=False), 10)
            await replica.check(claims, "n3.example.net")
    finally:
        await a.close()
        await b.close()


@pytest.mark.integration
async def test_max_identities_holds_across_replicas_racing(conns: list[Any]) -> None:
    claims = claims_of()
    cfg = governance({"jti": claims["jti"], "max_identities": 7})
    registry = CollectorRegistry()
    metrics = GovernanceMetrics.create("t", registry)
    replicas = [
        await TokenGovernance.open(nc.jetstream(), cfg, metrics=metrics) for nc in conns[:2]
    ]
    try:

        async def one(i: int) -> str | None:
            try:
                await replicas[i % 2].check(claims, f"node{i}.example.net")
                return f"node{i}.example.net"
            except TokenRefused as exc:
                assert exc.reason == "token_identity_limit", exc
                return None

        results = await asyncio.gather(*(one(i) for i in range(40)))
        admitted = [r for r in results if r is not None]
        assert len(admitted) == 7
        # an admitted identity comes back (a node reconnecting) on either replica
        for replica in replicas:
            await replica.check(claims, admitted[0])
        with pytest.raises(TokenRefused, match="already admitted its 7 identities"):
            await replicas[1].check(claims, "one-more.example.net")
        kv = await open_bucket(conns[2].jetstream(), cfg.bucket)
        stored = json.loads((await kv.get(f"identities.{cfg.limits[0].label}")).value)
        assert len(stored["identities"]) == 7
        assert not any("example" in h for h in stored["identities"])  # hashes, not names
        text = generate_latest(registry).decode()
        label = cfg.limits[0].label
        assert f't_token_identities{{token="{label}"}} 7.0' in text
        assert f't_token_refused_total{{reason="token_identity_limit",token="{label}"}}' in text
        assert SECRET not in text and claims["jti"] not in text
    finally:
        for replica in replicas:
            await replica.close()


@pytest.mark.integration
async def test_pattern_and_expiry_override(conns: list[Any]) -> None:
    now = time.time()
    fresh, old = claims_of(now=now), claims_of(now=now - 3 * 86400)
    web = claims_of()
    cfg = governance(
        {"jti": fresh["jti"], "expires": "2d"},
        {"jti": old["jti"], "expires": "2d"},
        {"jti": web["jti"], "identity_pattern": r"web\d+\.example\.net", "expires": "100y"},
    )
    gov = await TokenGovernance.open(conns[0].jetstream(), cfg)
    try:
        await gov.check(fresh, "a.example.net")
        with pytest.raises(TokenRefused) as exc:
            await gov.check(old, "a.example.net")  # its exp is a year away
        assert exc.value.reason == "token_expired_override"
        await gov.check(web, "web12.example.net")
        for bad in ("db1.example.net", "web12.example.net.evil", "xweb1.example.net"):
            with pytest.raises(TokenRefused) as exc:
                await gov.check(web, bad)
            assert exc.value.reason == "token_identity_pattern"
        expired = governance({"jti": web["jti"], "expires": "2020-01-01T00:00:00Z"})
        with pytest.raises(TokenRefused, match="governance expiry"):
            await TokenGovernance(expired, None).check(web, "web1.example.net")
    finally:
        await gov.close()


@pytest.mark.integration
async def test_an_unreadable_identity_set_fails_closed(conns: list[Any]) -> None:
    claims = claims_of()
    cfg = governance({"jti": claims["jti"], "max_identities": 3})
    kv = await open_bucket(conns[2].jetstream(), cfg.bucket)
    await kv.put(f"identities.{cfg.limits[0].label}", b'{"identities": ["not-a-hash"]}')
    gov = await TokenGovernance.open(conns[0].jetstream(), cfg)
    try:
        with pytest.raises(TokenRefused) as exc:
            await gov.check(claims, "n1.example.net")
        assert exc.value.reason == "token_governance_unavailable"
        await kv.put("revoked.0000", b"\x1b[2Jnot json")  # ignored, never crashes the watch
        await revoke(kv, "after-garbage", "x")
        await async_wait_for(lambda: gov.revocation("after-garbage") is not None, 10)
    finally:
        await gov.close()


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.integration
def test_cli_revoke_list_and_undo(nats_server: NatsServer, tmp_path: Path) -> None:
    user, pw = nats_server.users["provisioner"]
    cfg = tmp_path / "provisioner.yaml"
    cfg.write_text(
        yaml.safe_dump(
            {
                "broker_urls": [nats_server.url],
                "broker_user": user,
                "broker_provisioning_password": pw,
                "token_governance": {"enabled": True, "bucket": "CLI_TOKENS"},
            }
        )
    )
    runner = CliRunner()
    r = runner.invoke(jwt_app, ["revoke", "2abcJTI", "--config", str(cfg)])
    assert r.exit_code == 2 and "--reason" in r.output
    r = runner.invoke(jwt_app, ["revoke", "2abcJTI", "--reason", "leaked", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    assert "provisioner: revoked" in r.output
    r = runner.invoke(jwt_app, ["revoked", "--json", "--config", str(cfg)])
    assert r.exit_code == 0, r.output
    rows = json.loads(r.output)
    assert [(x["jti"], x["reason"], x["where"]) for x in rows] == [
        ("2abcJTI", "leaked", ["provisioner"])
    ]
    assert pw not in r.output
    r = runner.invoke(jwt_app, ["revoke", "--undo", "2abcJTI", "--config", str(cfg)])
    assert r.exit_code == 0 and "revocation lifted" in r.output
    r = runner.invoke(jwt_app, ["revoked", "--config", str(cfg)])
    assert r.exit_code == 0 and "no revoked tokens" in r.output
    r = runner.invoke(jwt_app, ["revoked"])
    assert r.exit_code == 2  # neither --config nor --callout-config


# ----------------------------------------------------------------------------- the pipeline


async def _failed_record(prov: Provisioner, identity: str) -> dict[str, Any]:
    def failed() -> bool:
        rec = prov.node(identity)
        return rec is not None and rec["state"] == "failed" and not rec["in_flight"]

    await async_wait_for(failed, 30)
    return [r for r in prov.audit_tail(None, 1000) if r["identity"] == identity][-1]


@pytest.mark.integration
@pytest.mark.dev_broker  # no auth callout: the provisioner is the only enforcer here
async def test_pipeline_refuses_over_limit_and_revoked_tokens(
    prov_env: ProvEnv, stop_nodes: None
) -> None:
    jti = decode_unverified(prov_env.token_path.read_text())[1]["jti"]
    section = {"enabled": True, "limits": [{"jti": jti, "max_identities": 1}]}
    prov = prov_env.provisioner(token_governance=section)
    await prov.start()
    try:
        first = prov_env.node("first.example.net")
        await first.start()
        await first.wait_normal(30)
        await prov_env.node("second.example.net").start()
        rec = await _failed_record(prov, "second.example.net")
        assert (rec["decision"], rec["stage"]) == ("failed", "token_governance")
        assert rec["reason"] == "token_identity_limit" and rec["csr_sha256"] is None
        assert rec["token_jti"] == jti
        node = prov.node("second.example.net")
        assert node is not None and "already admitted its 1 identities" in node["last_error"]

        assert prov.nc is not None and prov.token_governance is not None
        kv = await open_bucket(prov.nc.jetstream(), section_bucket(prov))
        await revoke(kv, jti, "leaked in image build 42", by="ops")
        await async_wait_for(is_revoked(prov.token_governance, jti), 10)
        await prov_env.node("third.example.net").start()
        rec = await _failed_record(prov, "third.example.net")
        assert rec["reason"] == "token_revoked" and rec["stage"] == "token_governance"
        assert "leaked in image build 42" in rec["error"]
        assert prov_env.token_path.read_text().strip() not in json.dumps(rec)
    finally:
        await prov.stop()


def section_bucket(prov: Provisioner) -> str:
    return prov.config.token_governance.bucket

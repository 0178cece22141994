"""VaultAdapter against a real OpenBao dev server (over TLS with a pinned CA)."""

from __future__ import annotations

import logging
import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ca_adapters import CAError, CAVerificationError, LocalCA, SignRequest, VaultAdapter
from testbed.ca_servers import OpenBaoServer
from tests.ca_adapters.helpers import load_cert, make_csr, spki

pytestmark = pytest.mark.integration

ID = "node1.example.net"


def approle(server: OpenBaoServer, **kw: object) -> VaultAdapter:
    kw.setdefault("secret_id", server.secret_id)
    kw.setdefault("ca_pem", server.ca_pem)
    kw.setdefault("tls_verify", str(server.tls_ca_path))
    return VaultAdapter(server.url, role_id=server.role_id, **kw)  # type: ignore[arg-type]


async def test_approle_sign_verified(
    openbao_server: OpenBaoServer, caplog: pytest.LogCaptureFixture
) -> None:
    csr, key = make_csr(ID, ips=("10.1.2.3",))
    ca = approle(openbao_server, ttl_s=3600)
    try:
        with caplog.at_level(logging.DEBUG, logger="ca_adapters.vault"):
            res = await ca.sign(SignRequest(ID, csr, ip_sans=("10.1.2.3",)))
            await ca.sign(SignRequest(ID, csr, ip_sans=("10.1.2.3",)))
        # The same server warning: once at WARNING, then at DEBUG (fleet-scale log hygiene).
        cn_warn = [r for r in caplog.records if "use_csr_common_name" in r.getMessage()]
        assert [r.levelno for r in cn_warn] == [logging.WARNING, logging.DEBUG]
        assert openbao_server.secret_id not in caplog.text
        cert = load_cert(res.certificate_pem)
        assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ID
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.DNSName) == [ID]
        assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.1.2.3"]
        assert spki(cert.public_key()) == spki(key)
        cert.verify_directly_issued_by(load_cert(openbao_server.ca_pem))
        left = cert.not_valid_after_utc - datetime.now(UTC)
        assert timedelta(minutes=55) < left <= timedelta(hours=1, minutes=1)
        # The role uses the CSR's names; OpenBao says so in a warning, which we pass on.
        assert any("use_csr_common_name" in w for w in res.warnings)
        assert ca.logins == 1
        assert await ca.health() is True
    finally:
        await ca.aclose()


async def test_ca_chain_fetched_when_not_pinned(openbao_server: OpenBaoServer) -> None:
    ca = VaultAdapter(
        openbao_server.url,
        token=openbao_server.root_token,
        tls_verify=str(openbao_server.tls_ca_path),
    )
    try:
        assert load_cert(await ca.ca_chain()) == load_cert(openbao_server.ca_pem)
        csr, _ = make_csr(ID)
        assert (await ca.sign(SignRequest(ID, csr))).chain_pem.startswith("-----BEGIN CERT")
    finally:
        await ca.aclose()


async def test_bad_token_is_permanent_and_not_leaked(openbao_server: OpenBaoServer) -> None:
    bad = "s.not-a-real-token-0123456789"
    csr, _ = make_csr(ID)
    ca = VaultAdapter(
        openbao_server.url,
        token=bad,
        ca_pem=openbao_server.ca_pem,
        tls_verify=str(openbao_server.tls_ca_path),
    )
    try:
        with pytest.raises(CAError, match="permission denied") as info:
            await ca.sign(SignRequest(ID, csr))
        assert info.value.status == 403 and not info.value.retryable
        assert bad not in str(info.value) and "vault" in str(info.value)
    finally:
        await ca.aclose()


async def test_bad_approle_secret_is_permanent_and_not_leaked(
    openbao_server: OpenBaoServer,
) -> None:
    bad = "00000000-1111-2222-3333-444444444444"
    csr, _ = make_csr(ID)
    ca = approle(openbao_server, secret_id=bad)
    try:
        with pytest.raises(CAError, match="AppRole login refused") as info:
            await ca.sign(SignRequest(ID, csr))
        assert not info.value.retryable and bad not in str(info.value)
    finally:
        await ca.aclose()


async def test_cn_outside_allowed_domains_is_a_policy_refusal(
    openbao_server: OpenBaoServer,
) -> None:
    evil = "evil.example.com"
    csr, _ = make_csr(evil)
    ca = approle(openbao_server)
    try:
        with pytest.raises(CAError, match="not allowed by this role") as info:
            await ca.sign(SignRequest(evil, csr))
        assert info.value.status == 400 and not info.value.retryable
    finally:
        await ca.aclose()


async def test_csr_naming_another_node_is_caught(openbao_server: OpenBaoServer) -> None:
    # Both names are allowed by the role; OpenBao signs the CSR's name, not the one asked for.
    csr, _ = make_csr("node2.example.net")
    ca = approle(openbao_server)
    try:
        with pytest.raises(CAVerificationError, match=re.escape("CN is 'node2.example.net'")):
            await ca.sign(SignRequest(ID, csr))
    finally:
        await ca.aclose()


async def test_policy_allows_only_sign_on_role_node(openbao_server: OpenBaoServer) -> None:
    csr, _ = make_csr(ID)
    ca = approle(openbao_server, role="other")
    try:
        with pytest.raises(CAError, match="permission denied") as info:
            await ca.sign(SignRequest(ID, csr))
        assert info.value.status == 403 and not info.value.retryable
        assert ca.logins == 2  # 403 → one fresh login, then give up
    finally:
        await ca.aclose()


async def test_renewal_and_relogin_after_revocation(openbao_server: OpenBaoServer) -> None:
    ca = approle(openbao_server)
    try:
        csr, _ = make_csr(ID)
        await ca.sign(SignRequest(ID, csr))
        assert (ca.logins, ca.renewals) == (1, 0)
        ca.renew_soon()
        await ca.sign(SignRequest(ID, csr))
        assert (ca.logins, ca.renewals) == (1, 1)  # renew-self, no new login
        # Revoke the adapter's token server-side: the next sign gets 403 and logs in again.
        openbao_server.api("POST", "auth/token/revoke", {"token": ca._token})
        await ca.sign(SignRequest(ID, csr))
        assert ca.logins == 2
    finally:
        await ca.aclose()


async def test_wrong_tls_pin_is_permanent(openbao_server: OpenBaoServer, tmp_path: Path) -> None:
    (tmp_path / "other.pem").write_text(LocalCA.generate("ec").chain_pem)
    ca = approle(openbao_server, tls_verify=str(tmp_path / "other.pem"))
    try:
        csr, _ = make_csr(ID)
        with pytest.raises(CAError, match="TLS verification") as info:
            await ca.sign(SignRequest(ID, csr))
        assert not info.value.retryable
        assert await ca.health() is False
    finally:
        await ca.aclose()

"""Revocation at every CA: the local CA's signed CRL, real cfssl (certificate database) and a
real OpenBao PKI mount. A revoked serial must show as revoked in the CA's own records."""

from __future__ import annotations

import os
import sqlite3
import ssl
import stat
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from cryptography import x509

from ca_adapters import CAError, CFSSLAdapter, LocalCA, SignRequest, VaultAdapter
from ca_adapters.base import crl_reason, parse_serial
from ca_adapters.guard import GuardedCA
from testbed.ca_servers import CFSSL_HINT, CFSSLServer, OpenBaoServer, start_cfssl
from tests.ca_adapters.helpers import make_csr
from tests.support import require_binary

ID = "node1.example.net"


async def _issue(ca: object, identity: str = ID) -> x509.Certificate:
    csr, _ = make_csr(identity)
    res = await ca.sign(SignRequest(identity, csr))  # type: ignore[attr-defined]
    return x509.load_pem_x509_certificate(res.certificate_pem.encode())


def _revoked_serials(crl: x509.CertificateRevocationList) -> set[int]:
    return {r.serial_number for r in crl}


def _crl_number(crl: x509.CertificateRevocationList) -> int:
    return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)


# ----------------------------------------------------------------------------- helpers


def test_serial_and_reason_parsing() -> None:
    assert parse_serial("0a:1B") == 0x0A1B and parse_serial("0x10") == 16
    for bad in ("", "zz", "0", "-", "1" * 41, "12 34"):
        with pytest.raises(CAError):
            parse_serial(bad)
    assert crl_reason("Key Compromise") == "keyCompromise"
    assert crl_reason("superseded") == "superseded"
    assert crl_reason("key_compromise: laptop stolen") == "keyCompromise"
    assert crl_reason("the node was stolen") == "unspecified"
    assert crl_reason("removeFromCRL") == "unspecified"


# ----------------------------------------------------------------------------- local CA


async def test_local_ca_publishes_a_signed_crl_beside_its_key(tmp_path: Path) -> None:
    LocalCA.generate().write(tmp_path)
    ca = LocalCA.from_files(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    empty = ca.crl()
    assert empty.is_signature_valid(ca.key.public_key()) and len(empty) == 0
    cert, other = await _issue(ca), await _issue(ca, "node2.example.net")
    serial = format(cert.serial_number, "x")
    await ca.revoke(serial, "keyCompromise")
    await ca.revoke(serial.upper(), "keyCompromise")  # twice: no change, no error

    crl_path = tmp_path / "crl.pem"
    assert stat.S_IMODE(os.stat(crl_path).st_mode) == 0o644
    # A second instance (the helper, another process) reads the same published CRL.
    crl = x509.load_pem_x509_crl(crl_path.read_bytes())
    again = LocalCA.from_files(tmp_path / "ca.pem", tmp_path / "ca-key.pem").crl()
    for published in (crl, again):
        assert published.issuer == ca.cert.subject
        assert published.is_signature_valid(ca.cert.public_key())
        assert _revoked_serials(published) == {cert.serial_number}
    entry = crl.get_revoked_certificate_by_serial_number(cert.serial_number)
    assert entry is not None
    reason = entry.extensions.get_extension_for_class(x509.CRLReason).value.reason
    assert reason is x509.ReasonFlags.key_compromise
    assert crl.get_revoked_certificate_by_serial_number(other.serial_number) is None

    # A revocation by the second instance keeps the first one's entry (shared file, locked).
    second = LocalCA.from_files(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    await second.revoke(format(other.serial_number, "x"), "superseded")
    assert _revoked_serials(ca.crl()) == {cert.serial_number, other.serial_number}
    assert _crl_number(ca.crl()) == _crl_number(crl) + 1


async def test_local_ca_refuses_a_crl_it_did_not_sign_and_bad_serials(tmp_path: Path) -> None:
    LocalCA.generate().write(tmp_path)
    ca = LocalCA.from_files(tmp_path / "ca.pem", tmp_path / "ca-key.pem")
    with pytest.raises(CAError, match="serial"):
        await ca.revoke("not-hex", "x")
    impostor = LocalCA.generate(common_name="Fleet Development CA")  # same name, other key
    (tmp_path / "crl.pem").write_text(impostor.crl_pem())
    with pytest.raises(CAError, match="not a CRL signed by this CA"):
        await ca.revoke("1234", "keyCompromise")


async def test_generated_ca_keeps_its_crl_in_memory_and_guard_passes_revoke() -> None:
    ca = LocalCA.generate()
    guarded = GuardedCA(ca, rate_per_s=1, burst=1, breaker_failures=1)
    cert = await _issue(guarded)
    await guarded.revoke(format(cert.serial_number, "x"), "cessation of operation")
    crl = ca.crl()
    assert ca.crl_path is None
    assert crl.is_signature_valid(ca.key.public_key())
    assert _revoked_serials(crl) == {cert.serial_number}


# ----------------------------------------------------------------------------- cfssl


@pytest.fixture(scope="module")
def cfssl_db_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CFSSLServer]:
    """cfssl serve with a sqlite certificate database (revoke enabled)."""
    require_binary("cfssl", CFSSL_HINT)
    server = start_cfssl(tmp_path_factory.mktemp("cfssl-db"), db=True)
    try:
        yield server
    finally:
        server.stop()


def _db_status(server: CFSSLServer, serial: int) -> tuple[str, int]:
    assert server.db_path is not None
    with sqlite3.connect(server.db_path) as conn:
        row = conn.execute(
            "SELECT status, reason FROM certificates WHERE serial_number = ?", (str(serial),)
        ).fetchone()
    assert row is not None, f"serial {serial} not in cfssl's database"
    return str(row[0]), int(row[1] or 0)


@pytest.mark.integration
async def test_cfssl_revoke_marks_the_certificate_revoked(cfssl_db_server: CFSSLServer) -> None:
    ca = CFSSLAdapter(
        cfssl_db_server.url, auth_key_hex=cfssl_db_server.auth_key_hex, profile="node"
    )
    try:
        cert, kept = await _issue(ca), await _issue(ca, "node2.example.net")
        assert _db_status(cfssl_db_server, cert.serial_number)[0] == "good"
        await ca.revoke(format(cert.serial_number, "x"), "keyCompromise")
        await ca.revoke(format(cert.serial_number, "x"), "keyCompromise")  # idempotent
        assert _db_status(cfssl_db_server, cert.serial_number) == ("revoked", 1)
        assert _db_status(cfssl_db_server, kept.serial_number)[0] == "good"
        with pytest.raises(CAError, match="not found") as info:
            await ca.revoke("7fffffff01", "keyCompromise")
        assert not info.value.retryable
    finally:
        await ca.aclose()


@pytest.mark.integration
async def test_cfssl_without_a_database_cannot_revoke(cfssl_server: CFSSLServer) -> None:
    ca = CFSSLAdapter(cfssl_server.url)
    try:
        cert = await _issue(ca)
        with pytest.raises(CAError, match="revoke"):
            await ca.revoke(format(cert.serial_number, "x"), "keyCompromise")
    finally:
        await ca.aclose()


# ----------------------------------------------------------------------------- OpenBao


def _bao_cert(server: OpenBaoServer, serial: str) -> dict[str, object]:
    verify = ssl.create_default_context(cafile=str(server.tls_ca_path))
    r = httpx.get(f"{server.url}/v1/pki/cert/{serial}", verify=verify, timeout=10)
    r.raise_for_status()
    data = r.json()["data"]
    assert isinstance(data, dict)
    return data


@pytest.mark.integration
async def test_openbao_revoke_sets_revocation_time(openbao_server: OpenBaoServer) -> None:
    ca = VaultAdapter(
        openbao_server.url,
        token=openbao_server.root_token,
        ca_pem=openbao_server.ca_pem,
        tls_verify=str(openbao_server.tls_ca_path),
    )
    try:
        cert = await _issue(ca)
        colon = cert.serial_number.to_bytes(20, "big").lstrip(b"\0").hex(":")
        assert int(str(_bao_cert(openbao_server, colon).get("revocation_time") or 0)) == 0
        await ca.revoke(format(cert.serial_number, "x"), "keyCompromise")
        await ca.revoke(format(cert.serial_number, "x"), "keyCompromise")  # idempotent
        assert int(str(_bao_cert(openbao_server, colon)["revocation_time"])) > 0
        with pytest.raises(CAError) as info:
            await ca.revoke("7fffffff01", "keyCompromise")
        assert not info.value.retryable
    finally:
        await ca.aclose()


@pytest.mark.integration
async def test_openbao_approle_without_revoke_policy_is_refused(
    openbao_server: OpenBaoServer,
) -> None:
    """The test bed's AppRole may only sign: revoke is refused (403), not retried."""
    ca = VaultAdapter(
        openbao_server.url,
        role_id=openbao_server.role_id,
        secret_id=openbao_server.new_secret_id(),
        ca_pem=openbao_server.ca_pem,
        tls_verify=str(openbao_server.tls_ca_path),
    )
    try:
        cert = await _issue(ca)
        with pytest.raises(CAError, match="403") as info:
            await ca.revoke(format(cert.serial_number, "x"), "keyCompromise")
        assert not info.value.retryable and openbao_server.secret_id not in str(info.value)
    finally:
        await ca.aclose()

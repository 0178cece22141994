"""The per-node shortcuts of issue 18 keep the behaviour they replace.

Real objects throughout: a real prometheus registry, a real audit log, real P-256 keys, CSRs and
certificates built with ``cryptography``.
"""

from __future__ import annotations

import datetime as dt
import warnings

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters.verify import verified_csr_key
from helpers.models import HelperOutput
from provisioner import pki_policy
from provisioner.attempt import Attempt, PipelineContext, PipelineError
from provisioner.audit import REDACTED, AuditLog
from provisioner.checks import _expected_key, validate_csr
from provisioner.config import ProvisionerConfig
from provisioner.metrics import Metrics
from provisioner.queue import NodeRecord


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _csr_pem(key: ec.EllipticCurvePrivateKey, cn: str) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(cn)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _ca_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("hot-path CA"))
        .issuer_name(_name("hot-path CA"))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def test_metrics_child_is_cached_and_counts_in_the_registry() -> None:
    m = Metrics("site-a")
    first = m.child(m.busy_workers, "site-a")
    assert m.child(m.busy_workers, "site-a") is first
    first.inc()
    m.child(m.busy_workers, "site-a").inc()
    m.child(m.outcomes, "site-a", "provisioned").inc()
    got = m.registry.get_sample_value("choria_provisioner_busy_workers", {"site": "site-a"})
    assert got == 2
    # a different label value is a different child, not the cached one
    assert m.child(m.outcomes, "site-a", "failed") is not m.child(
        m.outcomes, "site-a", "provisioned"
    )


def test_audit_scrub_still_redacts_keys_and_jwts_and_keeps_plain_text() -> None:
    log = AuditLog(None)
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ).decode()
    jwt_like = "eyJhbGciOiJFZERTQSJ9.eyJzdWIiOiJub2RlIn0.c2lnbmF0dXJl"
    out = log.scrub(
        {"msg": f"helper said {pem} and {jwt_like}", "plain": "node-1 provisioned", "n": 3}
    )
    assert "PRIVATE KEY" not in out["msg"] and "eyJhbGciOiJFZERTQSJ9" not in out["msg"]
    assert out["msg"].count(REDACTED) == 2
    assert out["plain"] == "node-1 provisioned" and out["n"] == 3


def test_expected_key_reuses_the_checked_csr_only_when_it_is_the_same_csr() -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    att = Attempt(NodeRecord("node-1", "event", 0.0))
    att.csr = {"csr": _csr_pem(key, "node-1")}
    assert _expected_key(att, HelperOutput()) == _spki(key)
    # what the CSR check kept is used for the same CSR ...
    att.csr_spki = (att.csr["csr"], b"kept by the CSR check")
    assert _expected_key(att, HelperOutput()) == b"kept by the CSR check"
    # ... and ignored when the CSR changed since
    att.csr = {"csr": _csr_pem(other, "node-1")}
    assert _expected_key(att, HelperOutput()) == _spki(other)


def test_ca_bundle_is_parsed_once_and_a_bad_bundle_still_raises() -> None:
    pem = _ca_pem()
    first = pki_policy._ca_bundle(pem)
    assert pki_policy._ca_bundle(pem) is first
    assert first[0].subject == _name("hot-path CA")
    for _ in range(2):
        with pytest.raises(ValueError):
            pki_policy._ca_bundle(
                "-----BEGIN CERTIFICATE-----\nnot base64\n-----END CERTIFICATE-----\n"
            )


def test_csr_check_keeps_the_shared_csr_key_and_still_refuses_a_disallowed_key() -> None:
    """validate_csr loads the CSR's key once (ca_adapters.verify.verified_csr_key): the local
    CA and the certificate check use that key; the key policy still applies to it."""
    ctx = PipelineContext(
        config=ProvisionerConfig(),
        rpc=None,  # type: ignore[arg-type]  # no RPC in this step
        helper=None,  # type: ignore[arg-type]
        metrics=Metrics(site="t"),
        verify_keys=[],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    att = Attempt(NodeRecord("node-1", "event", 0.0))
    att.csr = {"csr": _csr_pem(key, "node-1")}
    validate_csr(ctx, att)
    _, shared_der = verified_csr_key(att.csr["csr"])
    assert att.csr_spki is not None and att.csr_spki[1] is shared_der
    assert shared_der == _spki(key)
    # the refusal comes from the policy applied to the shared key
    ctx.config = ProvisionerConfig(pki_policy={"allowed_keys": ["rsa"]})
    att = Attempt(NodeRecord("node-1", "event", 0.0))
    att.csr = {"csr": _csr_pem(key, "node-1")}
    with pytest.raises(PipelineError, match="key type ec-p256 is not allowed"):
        validate_csr(ctx, att)


def test_csr_check_reads_a_malformed_subject_without_a_warning() -> None:
    """A country name of the wrong length makes cryptography warn while parsing the subject:
    the CSR check refuses it by policy and writes nothing to the warnings machinery."""
    ctx = PipelineContext(
        config=ProvisionerConfig(),
        rpc=None,  # type: ignore[arg-type]  # no RPC in this step
        helper=None,  # type: ignore[arg-type]
        metrics=Metrics(site="t"),
        verify_keys=[],
    )
    key = ec.generate_private_key(ec.SECP256R1())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        country = x509.NameAttribute(NameOID.COUNTRY_NAME, "USA", _validate=False)
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([country, x509.NameAttribute(NameOID.COMMON_NAME, "node-1")]))
        .sign(key, hashes.SHA256())
    )
    att = Attempt(NodeRecord("node-1", "event", 0.0))
    att.csr = {"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(PipelineError, match="subject attribute C="):
            validate_csr(ctx, att)
    assert [str(w.message) for w in caught] == []

"""Per-node work done once: the CSR's subject, the certificate's key comparison, key kinds.

Real P-256/RSA keys, CSRs and certificates built with ``cryptography``; the checks are the
pipeline's own (``validate_csr``, ``check_certificate``) with a real metrics registry.
"""

from __future__ import annotations

import datetime as dt

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_adapters.verify import CSRSignatureError, load_verified_csr, verified_csr_subject
from helpers.models import HelperOutput
from provisioner import pki_policy
from provisioner.attempt import Attempt, PipelineContext, PipelineError
from provisioner.checks import _expected_key, _expected_public_key, validate_csr
from provisioner.config import ProvisionerConfig
from provisioner.metrics import Metrics
from provisioner.pki_policy import PkiPolicyConfig, PolicyRefusal, check_certificate, check_csr
from provisioner.queue import NodeRecord


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _csr(key: ec.EllipticCurvePrivateKey, cn: str) -> str:
    csr = x509.CertificateSigningRequestBuilder().subject_name(_name(cn)).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _spki(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ca_and_leaf(node_key: ec.EllipticCurvePrivateKey, cn: str) -> tuple[str, x509.Certificate]:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("once CA"))
        .issuer_name(_name("once CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca.subject)
        .public_key(node_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    return ca.public_bytes(serialization.Encoding.PEM).decode(), leaf


def _ctx() -> PipelineContext:
    cfg = ProvisionerConfig()
    return PipelineContext(
        config=cfg,
        rpc=None,  # type: ignore[arg-type]
        helper=None,  # type: ignore[arg-type]
        metrics=Metrics(site="t"),
        verify_keys=[],
        deny_list=[],
    )


# -- the CSR's subject --------------------------------------------------------------------------


def test_a_verified_csr_subject_is_parsed_once() -> None:
    pem = _csr(ec.generate_private_key(ec.SECP256R1()), "node-1.example.net")
    first = verified_csr_subject(pem)
    assert first == _name("node-1.example.net")
    assert verified_csr_subject(pem) is first  # remembered: the same parsed Name
    # the CSR object's own subject is a new parse every time (what the cache saves)
    csr = load_verified_csr(pem)
    assert csr.subject == first and csr.subject is not csr.subject


def test_a_csr_whose_signature_fails_has_no_remembered_subject() -> None:
    pem = _csr(ec.generate_private_key(ec.SECP256R1()), "node-2.example.net")
    der = bytearray(x509.load_pem_x509_csr(pem.encode()).public_bytes(serialization.Encoding.DER))
    der[-1] ^= 0x01
    import base64

    bad = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    for _ in range(2):
        with pytest.raises(CSRSignatureError):
            verified_csr_subject(bad)


def test_check_csr_reads_the_subject_it_is_given() -> None:
    pem = _csr(ec.generate_private_key(ec.SECP256R1()), "node-3.example.net")
    csr = load_verified_csr(pem)
    policy = PkiPolicyConfig()
    check_csr(csr, "node-3.example.net", policy, signature_verified=True)
    # a caller's parsed subject is what is checked (no second parse of the CSR)
    with pytest.raises(PolicyRefusal, match="subject"):
        check_csr(
            csr,
            "node-3.example.net",
            policy,
            signature_verified=True,
            subject=_name("someone-else.example.net"),
        )


def test_validate_csr_checks_the_remembered_subject() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    ctx = _ctx()
    att = Attempt(NodeRecord("node-4.example.net", "event", 0.0))
    att.csr = {"csr": _csr(key, "node-4.example.net"), "public_key": "", "ssldir": ""}
    validate_csr(ctx, att)
    assert att.csr_spki is not None and att.csr_spki[1] == _spki(key)
    assert verified_csr_subject(att.csr["csr"]) == _name("node-4.example.net")
    wrong = Attempt(NodeRecord("node-5.example.net", "event", 0.0))
    wrong.csr = {"csr": att.csr["csr"], "public_key": "", "ssldir": ""}
    with pytest.raises(PipelineError, match="does not match identity"):
        validate_csr(ctx, wrong)


# -- the certificate's key ----------------------------------------------------------------------


def test_the_certificate_key_is_compared_as_a_key_object_and_by_its_encoding() -> None:
    node_key = ec.generate_private_key(ec.SECP256R1())
    other = ec.generate_private_key(ec.SECP256R1())
    ca_pem, leaf = _ca_and_leaf(node_key, "node-6.example.net")
    args: dict = {
        "identity": "node-6.example.net",
        "policy": PkiPolicyConfig(),
        "allowed_sans": {"node-6.example.net"},
    }
    # the right key: by object (no encoding needed) ...
    check_certificate(
        leaf,
        ca_pem,
        expected_key=b"not compared",
        expected_public_key=node_key.public_key(),
        **args,
    )
    # ... or by its encoding when the object is another key or absent
    check_certificate(
        leaf, ca_pem, expected_key=_spki(node_key), expected_public_key=other.public_key(), **args
    )
    check_certificate(leaf, ca_pem, expected_key=_spki(node_key), **args)
    # another key is refused both ways
    with pytest.raises(PolicyRefusal, match="public_key"):
        check_certificate(
            leaf, ca_pem, expected_key=_spki(other), expected_public_key=other.public_key(), **args
        )
    with pytest.raises(PolicyRefusal, match="public_key"):
        check_certificate(leaf, ca_pem, expected_key=_spki(other), **args)


def test_the_expected_key_object_is_the_checked_csrs_only() -> None:
    key, other = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    ctx = _ctx()
    att = Attempt(NodeRecord("node-7.example.net", "event", 0.0))
    att.csr = {"csr": _csr(key, "node-7.example.net"), "public_key": "", "ssldir": ""}
    out = HelperOutput()
    assert _expected_public_key(att, out, _expected_key(att, out)) is None  # not checked yet
    validate_csr(ctx, att)
    expected = _expected_key(att, out)
    found = _expected_public_key(att, out, expected)
    assert found is not None and found == key.public_key()
    # a different CSR since the check, other expected bytes, or a helper key: no object
    assert _expected_public_key(att, out, _spki(other)) is None
    assert _expected_public_key(att, HelperOutput(key="x"), expected) is None
    att.csr = {"csr": _csr(other, "node-7.example.net"), "public_key": "", "ssldir": ""}
    assert _expected_public_key(att, out, expected) is None


def test_key_kinds_are_remembered_per_class() -> None:
    pki_policy._KIND_BY_CLASS.clear()
    keys = {
        "ec-p256": ec.generate_private_key(ec.SECP256R1()).public_key(),
        "ec-p384": ec.generate_private_key(ec.SECP384R1()).public_key(),
        "ed25519": ed25519.Ed25519PrivateKey.generate().public_key(),
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048).public_key(),
    }
    for kind, key in keys.items():
        assert pki_policy.key_kind(key) == kind
        assert pki_policy.key_kind(key) == kind
    assert set(pki_policy._KIND_BY_CLASS.values()) == {"ec", "ed25519", "rsa"}
    assert pki_policy.key_kind(object()) == "object"
    small = rsa.generate_private_key(public_exponent=65537, key_size=1024).public_key()
    with pytest.raises(PolicyRefusal, match="key_size"):
        pki_policy.check_key(small, PkiPolicyConfig(), "CSR")


def test_san_templates_are_parsed_once() -> None:
    policy = PkiPolicyConfig(san_templates=["{identity}", "{identity}.{overlay}.internal"])
    pki_policy._template_fields.cache_clear()
    names = pki_policy.render_sans(policy, "Node-8.example.net", "site", "eu-1")
    assert names == {"node-8.example.net", "node-8.example.net.eu-1.internal"}
    pki_policy.render_sans(policy, "node-9.example.net", "site", None)
    info = pki_policy._template_fields.cache_info()
    assert info.misses == 2 and info.hits == 2


# -- the outcome's remote text ------------------------------------------------------------------


def test_a_clean_outcome_is_not_copied_and_a_dirty_one_is_escaped() -> None:
    from provisioner.attempt import Outcome
    from provisioner.audit import AuditLog
    from provisioner.outcomes import Outcomes
    from provisioner.queue import WorkQueue
    from provisioner.reasons import Decision

    outcomes = Outcomes(
        identity="prov.example.net",
        site="t",
        queue=WorkQueue(max_waiting=10),
        metrics=Metrics(site="t"),
        audit=AuditLog(None),
        retry=lambda identity: None,
    )
    clean = Outcome(Decision.PROVISIONED, "restart", msg="placed in eu-1", overlay="eu-1")
    assert outcomes._cleaned(clean) is clean
    dirty = Outcome(Decision.FAILED, "helper", error="bad\x1b[31m", msg="m\n", overlay="o\x00")
    cleaned = outcomes._cleaned(dirty)
    assert cleaned is not dirty
    assert "\x1b" not in (cleaned.error or "") and "\n" not in (cleaned.msg or "")
    assert "\x00" not in (cleaned.overlay or "")
    assert dirty.error == "bad\x1b[31m"  # the original is left as it was

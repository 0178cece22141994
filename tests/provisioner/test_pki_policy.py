"""The PKI policy on its own: CSRs, helper certificates, the configuration, and a fuzz.

The pipeline and real nodes are exercised in ``e2e/test_pki_policy_e2e.py``; here every rule
gets the hostile input directly and must refuse it naming the rule, while go-choria-style CSRs
and certificates from the project's own CA still pass.
"""

from __future__ import annotations

import ipaddress
import warnings
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ca_adapters import LocalCA, SignRequest
from provisioner.checks import compile_deny_list
from provisioner.config import DEFAULT_CERT_DENY_LIST, ConfigError, load_config
from provisioner.pki_policy import (
    PkiPolicyConfig,
    PolicyRefusal,
    check_certificate,
    check_csr,
    render_sans,
    spki,
)

IDENTITY = "node1.example.net"
POLICY = PkiPolicyConfig()

RSA1024 = rsa.generate_private_key(public_exponent=65537, key_size=1024)
RSA2048 = rsa.generate_private_key(public_exponent=65537, key_size=2048)
EC256 = ec.generate_private_key(ec.SECP256R1())
EC384 = ec.generate_private_key(ec.SECP384R1())
EC521 = ec.generate_private_key(ec.SECP521R1())
ED25519 = ed25519.Ed25519PrivateKey.generate()
KEYS: dict[str, Any] = {
    "rsa1024": RSA1024,
    "rsa2048": RSA2048,
    "ec256": EC256,
    "ec384": EC384,
    "ec521": EC521,
    "ed25519": ED25519,
}
CA = LocalCA.generate(common_name="Unit Test CA")
ROGUE = LocalCA.generate(common_name="Unit Test CA")  # same name, other key


def _attr(oid: x509.ObjectIdentifier, value: str) -> x509.NameAttribute:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # an empty country, as go-choria writes one
        return x509.NameAttribute(oid, value, _validate=False)


def _csr(
    subject: list[x509.NameAttribute] | None = None,
    extensions: list[x509.ExtensionType] | None = None,
    key: Any = EC256,
    hash_alg: hashes.HashAlgorithm | None = None,
) -> x509.CertificateSigningRequest:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name(subject if subject is not None else [_attr(NameOID.COMMON_NAME, IDENTITY)])
    )
    for ext in extensions or []:
        builder = builder.add_extension(ext, critical=False)
    if isinstance(key, ed25519.Ed25519PrivateKey):
        return builder.sign(key, None)
    return builder.sign(key, hash_alg or hashes.SHA256())


def _refused(csr: x509.CertificateSigningRequest, policy: PkiPolicyConfig = POLICY) -> str:
    with pytest.raises(PolicyRefusal) as info:
        check_csr(csr, IDENTITY, policy)
    assert len(str(info.value)) < 300
    return info.value.rule


# ----------------------------------------------------------------------------- CSRs


@pytest.mark.parametrize("key", ["rsa2048", "ec256", "ec384", "ed25519"])
def test_plain_csrs_pass(key: str) -> None:
    check_csr(_csr(key=KEYS[key]), IDENTITY, POLICY)


def test_go_choria_style_csr_passes() -> None:
    # RSA-2048, SHA-256, the gencsr fields it was not given written as empty values.
    subject = [
        _attr(NameOID.COUNTRY_NAME, ""),
        _attr(NameOID.LOCALITY_NAME, ""),
        _attr(NameOID.ORGANIZATION_NAME, ""),
        _attr(NameOID.ORGANIZATIONAL_UNIT_NAME, ""),
        _attr(NameOID.COMMON_NAME, IDENTITY),
    ]
    check_csr(_csr(subject, key=RSA2048), IDENTITY, POLICY)
    # ... and one naming its identity in the SANs (any case).
    san = x509.SubjectAlternativeName([x509.DNSName(IDENTITY.upper())])
    check_csr(_csr(extensions=[san], key=RSA2048), IDENTITY, POLICY)


def test_node_agent_csr_passes() -> None:
    from node_agent.keys import build_csr

    for key in (RSA2048, EC256):
        pem = build_csr(key, IDENTITY).csr_pem
        check_csr(x509.load_pem_x509_csr(pem.encode()), IDENTITY, POLICY)


@pytest.mark.parametrize(
    ("subject", "rule"),
    [
        (
            [
                _attr(NameOID.COMMON_NAME, IDENTITY),
                _attr(NameOID.COMMON_NAME, "admin.privileged.choria"),
            ],
            "subject",
        ),
        (
            [
                _attr(NameOID.COMMON_NAME, IDENTITY),
                _attr(NameOID.ORGANIZATION_NAME, "system:masters"),
            ],
            "subject",
        ),
        ([_attr(NameOID.COMMON_NAME, "other.example.net")], "subject"),
        ([_attr(NameOID.ORGANIZATION_NAME, "x")], "subject"),
        (
            [_attr(NameOID.COMMON_NAME, IDENTITY), _attr(NameOID.EMAIL_ADDRESS, "a@b.c")],
            "subject",
        ),
        (
            [_attr(NameOID.COMMON_NAME, IDENTITY), _attr(NameOID.DOMAIN_COMPONENT, "choria")],
            "subject",
        ),
    ],
)
def test_csr_subject_refused(subject: list[x509.NameAttribute], rule: str) -> None:
    assert _refused(_csr(subject)) == rule


def test_allowed_attribute_may_carry_a_value() -> None:
    subject = [_attr(NameOID.COMMON_NAME, IDENTITY), _attr(NameOID.ORGANIZATION_NAME, "Fleet")]
    policy = PkiPolicyConfig(csr_allowed_attributes=["O"])
    check_csr(_csr(subject), IDENTITY, policy)
    bad = [_attr(NameOID.COMMON_NAME, IDENTITY), _attr(NameOID.ORGANIZATION_NAME, "a\nb")]
    assert _refused(_csr(bad), policy) == "subject"


@pytest.mark.parametrize(
    "extension",
    [
        x509.BasicConstraints(ca=True, path_length=None),
        x509.BasicConstraints(ca=False, path_length=None),
        x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CODE_SIGNING]),
        x509.NameConstraints(
            permitted_subtrees=[x509.DNSName("example.net")], excluded_subtrees=None
        ),
    ],
)
def test_csr_extensions_refused(extension: x509.ExtensionType) -> None:
    assert _refused(_csr(extensions=[extension])) == "extensions"


@pytest.mark.parametrize(
    "names",
    [
        [x509.DNSName("*.example.net")],
        [x509.DNSName(IDENTITY), x509.DNSName("other.example.net")],
        [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))],
        [x509.UniformResourceIdentifier("spiffe://example.net/admin")],
        [x509.RFC822Name("root@example.net")],
    ],
)
def test_csr_sans_refused(names: list[x509.GeneralName]) -> None:
    assert _refused(_csr(extensions=[x509.SubjectAlternativeName(names)])) == "san"


@pytest.mark.parametrize(("key", "rule"), [("rsa1024", "key_size"), ("ec521", "key_type")])
def test_csr_weak_or_unlisted_keys_refused(key: str, rule: str) -> None:
    assert _refused(_csr(key=KEYS[key])) == rule


def test_key_policy_is_configurable() -> None:
    check_csr(_csr(key=EC521), IDENTITY, PkiPolicyConfig(allowed_keys=["ec-p521"]))
    assert _refused(_csr(key=RSA2048), PkiPolicyConfig(allowed_keys=["ec-p256"])) == "key_type"
    assert _refused(_csr(key=RSA2048), PkiPolicyConfig(min_rsa_bits=3072)) == "key_size"


def test_weak_signature_hash_refused() -> None:
    assert _refused(_csr(key=RSA2048, hash_alg=hashes.SHA224())) == "signature"


def test_csr_attribute_other_than_extension_request_refused() -> None:
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([_attr(NameOID.COMMON_NAME, IDENTITY)]))
        .add_attribute(x509.oid.AttributeOID.CHALLENGE_PASSWORD, b"hunter2")
        .sign(EC256, hashes.SHA256())
    )
    assert _refused(csr) == "attributes"


# ----------------------------------------------------------------------------- certificates


def _leaf(
    *,
    key: Any = EC256,
    subject: list[x509.NameAttribute] | None = None,
    sans: list[x509.GeneralName] | None = None,
    ca: LocalCA = CA,
    basic_ca: bool | None = False,
    key_cert_sign: bool = False,
    not_before: datetime | None = None,
    days: float = 30,
) -> x509.Certificate:
    now = datetime.now(UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(subject or [_attr(NameOID.COMMON_NAME, IDENTITY)]))
        .issuer_name(ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before or now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=days))
        .add_extension(
            x509.SubjectAlternativeName(sans if sans is not None else [x509.DNSName(IDENTITY)]),
            critical=False,
        )
    )
    if basic_ca is not None:
        builder = builder.add_extension(x509.BasicConstraints(ca=basic_ca, path_length=None), True)
    if key_cert_sign:
        usage = dict.fromkeys(
            (
                "digital_signature content_commitment key_encipherment data_encipherment "
                "key_agreement crl_sign encipher_only decipher_only"
            ).split(),
            False,
        )
        builder = builder.add_extension(x509.KeyUsage(key_cert_sign=True, **usage), True)
    return builder.sign(ca.key, hashes.SHA256())


def _check(
    cert: x509.Certificate,
    ca_pem: str | None = None,
    policy: PkiPolicyConfig = POLICY,
    key: Any = EC256,
) -> None:
    check_certificate(
        cert,
        CA.chain_pem if ca_pem is None else ca_pem,
        identity=IDENTITY,
        expected_key=spki(key.public_key()),
        policy=policy,
        allowed_sans=render_sans(policy, IDENTITY, "test", "overlay-a"),
    )


def _cert_refused(cert: x509.Certificate, **kw: Any) -> str:
    with pytest.raises(PolicyRefusal) as info:
        _check(cert, **kw)
    return info.value.rule


def test_local_ca_certificate_passes() -> None:
    res = CA.sign_sync(SignRequest(identity=IDENTITY, csr_pem=_pem(_csr())))
    _check(x509.load_pem_x509_certificate(res.certificate_pem.encode()))
    _check(_leaf(basic_ca=None))  # no basicConstraints at all is a leaf too


def _pem(csr: x509.CertificateSigningRequest) -> str:
    return csr.public_bytes(serialization.Encoding.PEM).decode()


@pytest.mark.parametrize(
    ("kwargs", "rule"),
    [
        ({"subject": [_attr(NameOID.COMMON_NAME, "admin.example.net")]}, "subject"),
        (
            {
                "subject": [
                    _attr(NameOID.COMMON_NAME, IDENTITY),
                    _attr(NameOID.COMMON_NAME, "admin.privileged.choria"),
                ]
            },
            "subject",
        ),
        (
            {
                "subject": [
                    _attr(NameOID.ORGANIZATION_NAME, "system:masters"),
                    _attr(NameOID.COMMON_NAME, IDENTITY),
                ]
            },
            "subject",
        ),
        ({"basic_ca": True}, "ca"),
        ({"key_cert_sign": True}, "ca"),
        ({"sans": [x509.DNSName("*.example.net")]}, "san"),
        ({"sans": [x509.DNSName(IDENTITY), x509.DNSName("other.example.net")]}, "san"),
        ({"sans": [x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]}, "san"),
        ({"sans": [x509.UniformResourceIdentifier("spiffe://x/y")]}, "san"),
        ({"days": 3650}, "validity"),
        ({"days": -1, "not_before": datetime.now(UTC) - timedelta(days=30)}, "validity"),
        ({"not_before": datetime.now(UTC) + timedelta(hours=1)}, "validity"),
        ({"key": EC384}, "public_key"),
        ({"key": RSA1024}, "key_size"),
        ({"ca": ROGUE}, "chain"),
    ],
)
def test_certificate_refused(kwargs: dict[str, Any], rule: str) -> None:
    assert _cert_refused(_leaf(**kwargs)) == rule


def test_certificate_needs_its_ca() -> None:
    assert _cert_refused(_leaf(), ca_pem="") == "chain"
    assert _cert_refused(_leaf(), ca_pem="garbage") == "chain"
    leaf_as_ca = _leaf().public_bytes(serialization.Encoding.PEM).decode()
    assert _cert_refused(_leaf(), ca_pem=leaf_as_ca) == "chain"  # not a CA certificate


def test_san_templates() -> None:
    policy = PkiPolicyConfig(
        san_templates=["{identity}", "{identity}.{overlay}.internal", "x.{site}.net"]
    )
    names = render_sans(policy, IDENTITY, "test", "overlay-a")
    assert names == {IDENTITY, f"{IDENTITY}.overlay-a.internal", "x.test.net"}
    sans: list[x509.GeneralName] = [x509.DNSName(n) for n in sorted(names)]
    _check(_leaf(sans=sans), policy=policy)
    assert _cert_refused(_leaf(sans=sans)) == "san"  # not with the default templates
    # an overlay name that is not a DNS label renders nothing
    assert render_sans(policy, IDENTITY, "test", "a.b") == {IDENTITY, "x.test.net"}


def test_trust_anchors(tmp_path: Path) -> None:
    anchor_file = tmp_path / "anchor.pem"
    anchor_file.write_bytes(CA.cert.public_bytes(serialization.Encoding.PEM))
    policy = PkiPolicyConfig(trust_anchors=[str(anchor_file)])
    _check(_leaf(), policy=policy)
    # a certificate genuinely signed by a rogue CA that the helper returns as the CA
    assert _cert_refused(_leaf(ca=ROGUE), ca_pem=ROGUE.chain_pem, policy=policy) == "trust_anchor"
    _check(_leaf(ca=ROGUE), ca_pem=ROGUE.chain_pem)  # without anchors: nothing to tell
    # the fleet's CA with a rogue CA smuggled into the bundle the node will trust
    bundle = CA.chain_pem + ROGUE.chain_pem
    assert _cert_refused(_leaf(), ca_pem=bundle, policy=policy) == "trust_anchor"
    # an intermediate under the anchor: bundle = intermediate (+ root)
    inter = LocalCA.generate(common_name="Intermediate", parent=CA)
    _check(_leaf(ca=inter), ca_pem=inter.chain_pem, policy=policy)
    _check(
        _leaf(ca=inter),
        ca_pem=inter.cert.public_bytes(serialization.Encoding.PEM).decode(),
        policy=policy,
    )
    # no ca returned: checked against the anchors
    _check(_leaf(), ca_pem="", policy=policy)


# ----------------------------------------------------------------------------- configuration


def _load(tmp_path: Path, body: str) -> Any:
    path = tmp_path / "provisioner.yaml"
    path.write_text(body)
    return load_config(path)


def test_defaults(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "helper: /bin/true\n")
    p = cfg.pki_policy
    assert p.allowed_keys == ["rsa", "ec-p256", "ec-p384", "ed25519"]
    assert p.min_rsa_bits == 2048 and p.san_templates == ["{identity}"]
    assert p.max_validity == 398 * 86400 and p.clock_skew == 300 and p.trust_anchors == []


@pytest.mark.parametrize(
    "body",
    [
        "pki_policy: {san_templates: ['{facts.role}.example.net']}\n",
        "pki_policy: {san_templates: ['{inventory}']}\n",
        "pki_policy: {san_templates: ['{identity!r}']}\n",
        "pki_policy: {san_templates: ['{jwt[sub]}.example.net']}\n",
        "pki_policy: {san_templates: ['*.example.net']}\n",
        "pki_policy: {san_templates: ['10.0.0.1:80']}\n",
        "pki_policy: {min_rsa_bits: 1024}\n",
        "pki_policy: {allowed_keys: []}\n",
        "pki_policy: {allowed_keys: [dsa]}\n",
        "pki_policy: {csr_allowed_attributes: [CN]}\n",
        "pki_policy: {trust_anchors: missing.pem}\n",
        "pki_policy: {unknown: 1}\n",
    ],
)
def test_bad_policy_refused_at_load(tmp_path: Path, body: str) -> None:
    with pytest.raises(ConfigError) as info:
        _load(tmp_path, body)
    assert "pki_policy" in str(info.value)


def test_trust_anchor_files(tmp_path: Path) -> None:
    (tmp_path / "ca.pem").write_bytes(CA.cert.public_bytes(serialization.Encoding.PEM))
    cfg = _load(tmp_path, "pki_policy: {trust_anchors: ca.pem, max_validity: 90d}\n")
    assert cfg.pki_policy.trust_anchors == [str(tmp_path / "ca.pem")]  # relative to the file
    assert [a.subject for a in cfg.pki_policy.anchors] == [CA.cert.subject]
    assert cfg.pki_policy.max_validity == 90 * 86400
    (tmp_path / "leaf.pem").write_bytes(_leaf().public_bytes(serialization.Encoding.PEM))
    with pytest.raises(ConfigError, match="not a CA"):
        _load(tmp_path, "pki_policy: {trust_anchors: [leaf.pem]}\n")


def test_deny_list_ignores_case() -> None:
    patterns = compile_deny_list(DEFAULT_CERT_DENY_LIST)
    for name in ("hx.Privileged.Choria", "X.PRIVILEGED.MCOLLECTIVE", "a.Choria"):
        assert any(p.search(name) for p in patterns), name
    assert not any(p.search(IDENTITY) for p in patterns)
    assert not any(p.search("a.Choria") for p in compile_deny_list([r"(?-i:\.choria$)"]))


# ----------------------------------------------------------------------------- fuzz

_OIDS = [
    NameOID.COMMON_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
    NameOID.COUNTRY_NAME,
    NameOID.LOCALITY_NAME,
    NameOID.STATE_OR_PROVINCE_NAME,
    NameOID.SERIAL_NUMBER,
    NameOID.EMAIL_ADDRESS,
    NameOID.DOMAIN_COMPONENT,
    NameOID.USER_ID,
]
_VALUES = st.one_of(
    st.sampled_from([IDENTITY, IDENTITY.upper(), "admin.privileged.choria", "", "system:masters"]),
    st.text(max_size=20),
)
_NAMES = st.sampled_from(
    [
        x509.DNSName(IDENTITY),
        x509.DNSName(IDENTITY.upper()),
        x509.DNSName("*.example.net"),
        x509.DNSName("admin.privileged.choria"),
        x509.IPAddress(ipaddress.ip_address("10.0.0.1")),
        x509.UniformResourceIdentifier("spiffe://example.net/x"),
        x509.RFC822Name("a@example.net"),
    ]
)
_EXTENSIONS = st.lists(
    st.one_of(
        st.builds(x509.SubjectAlternativeName, st.lists(_NAMES, min_size=1, max_size=3)),
        st.builds(lambda ca: x509.BasicConstraints(ca=ca, path_length=None), st.booleans()),
        st.just(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH])),
        st.just(x509.SubjectKeyIdentifier(b"\x01" * 20)),
        st.just(x509.OCSPNoCheck()),
    ),
    max_size=3,
    unique_by=lambda e: e.oid,
)
_ALLOWED_OTHER = {
    NameOID.COUNTRY_NAME,
    NameOID.STATE_OR_PROVINCE_NAME,
    NameOID.LOCALITY_NAME,
    NameOID.ORGANIZATION_NAME,
    NameOID.ORGANIZATIONAL_UNIT_NAME,
}


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    subject=st.lists(st.tuples(st.sampled_from(_OIDS), _VALUES), max_size=5),
    extensions=_EXTENSIONS,
    key_name=st.sampled_from(sorted(KEYS)),
)
def test_fuzz_csr_policy(
    subject: list[tuple[x509.ObjectIdentifier, str]],
    extensions: list[x509.ExtensionType],
    key_name: str,
) -> None:
    try:
        csr = _csr([_attr(oid, v) for oid, v in subject], extensions, KEYS[key_name])
    except (ValueError, TypeError):
        return  # the builder itself refused it
    try:
        check_csr(csr, IDENTITY, POLICY)
    except PolicyRefusal as exc:
        assert exc.rule in {
            "subject",
            "attributes",
            "extensions",
            "san",
            "key_type",
            "key_size",
            "signature",
        }
        return
    # Accepted: exactly CN = identity, other attributes only the empty gencsr fields, no
    # extension but a SAN that is exactly the identity, an allowed key.
    attrs = list(csr.subject)
    assert [a.value for a in attrs if a.oid == NameOID.COMMON_NAME] == [IDENTITY]
    assert all(
        a.oid in _ALLOWED_OTHER and a.value == "" for a in attrs if a.oid != NameOID.COMMON_NAME
    )
    for ext in csr.extensions:
        assert isinstance(ext.value, x509.SubjectAlternativeName)
        assert [str(n.value).lower() for n in ext.value] == [IDENTITY]
        assert all(isinstance(n, x509.DNSName) for n in ext.value)
    assert key_name in {"rsa2048", "ec256", "ec384", "ed25519"}

"""verify_issued: every way a CA's answer can be wrong is refused, a right answer passes."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_adapters import CAVerificationError, Expectations, LocalCA, verify_issued
from tests.ca_adapters.helpers import make_csr, node_key

ID = "node-7.fleet.example.net"
CA = LocalCA.generate("ec", "Verify Test CA")
# Same subject name as CA, different key: only the signature check can tell them apart.
IMPOSTOR = LocalCA.generate("ec", "Verify Test CA")
CSR_PEM, NODE_KEY = make_csr(ID)
CSR = x509.load_pem_x509_csr(CSR_PEM.encode())


def build(
    *,
    key: Any = None,
    cn: str = ID,
    dns: tuple[str, ...] = (ID,),
    ips: tuple[str, ...] = (),
    issuer: LocalCA = CA,
    is_ca: bool = False,
    start: timedelta = timedelta(minutes=-5),
    life: timedelta = timedelta(days=30),
    eku: tuple[x509.ObjectIdentifier, ...] = (
        ExtendedKeyUsageOID.SERVER_AUTH,
        ExtendedKeyUsageOID.CLIENT_AUTH,
    ),
) -> str:
    now = datetime.now(UTC)
    names: list[x509.GeneralName] = [x509.DNSName(d) for d in dns]
    names += [x509.IPAddress(ipaddress.ip_address(i)) for i in ips]
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(issuer.cert.subject)
        .public_key((key or NODE_KEY).public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now + start)
        .not_valid_after(now + start + life)
        .add_extension(x509.BasicConstraints(ca=is_ca, path_length=None), critical=True)
    )
    if names:
        b = b.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if eku:
        b = b.add_extension(x509.ExtendedKeyUsage(list(eku)), critical=False)
    cert = b.sign(issuer.key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def check(pem: str, **kw: Any) -> x509.Certificate:
    args: dict[str, Any] = {"csr": CSR, "identity": ID, "ca_chain": [CA.cert], "ca": "test-ca"}
    args.update(kw)
    return verify_issued(pem, **args)


def test_a_correct_certificate_passes() -> None:
    cert = check(
        build(dns=(ID, "alias.example.net"), ips=("10.1.2.3",)),
        dns_sans=("alias.example.net",),
        ip_sans=("10.1.2.3",),
    )
    assert cert.subject.rfc4514_string() == f"CN={ID}"


def test_a_ca_signed_leaf_passes_through_an_intermediate_bundle() -> None:
    inter = LocalCA.generate("ec", "Verify Issuing CA", parent=CA)
    check(build(issuer=inter), ca_chain=[inter.cert, CA.cert])


CASES: list[tuple[str, Callable[[], str], dict[str, Any], str]] = [
    ("other key", lambda: build(key=node_key()), {}, "public key is not the key of the CSR"),
    ("other CN", lambda: build(cn="node-8.fleet.example.net"), {}, "CN is"),
    ("extra SAN", lambda: build(dns=(ID, "evil.example.com")), {}, "DNS SANs are"),
    ("no identity SAN", lambda: build(dns=("alias.example.net",)), {}, "DNS SANs are"),
    ("no SAN at all", lambda: build(dns=()), {}, "no subjectAltName"),
    ("IP SAN dropped", lambda: build(), {"ip_sans": ("10.0.0.1",)}, "IP SANs are"),
    ("impostor CA", lambda: build(issuer=IMPOSTOR), {}, "not signed by the configured CA"),
    ("CA flag", lambda: build(is_ca=True), {}, "is a CA certificate"),
    ("expired", lambda: build(start=timedelta(days=-2), life=timedelta(days=1)), {}, "expired"),
    ("future", lambda: build(start=timedelta(hours=2)), {}, "not valid before"),
    ("absurd", lambda: build(life=timedelta(days=3650)), {}, "exceeds the allowed maximum"),
    (
        "no clientAuth",
        lambda: build(eku=(ExtendedKeyUsageOID.SERVER_AUTH,)),
        {},
        "lacks clientAuth",
    ),
    ("no EKU", lambda: build(eku=()), {}, "no extendedKeyUsage"),
    (
        "profile lifetime",
        lambda: build(life=timedelta(hours=168)),
        {"expect": Expectations(expected_lifetime_s=720 * 3600)},
        "profile promises",
    ),
    (
        "longer than asked",
        lambda: build(life=timedelta(days=30)),
        {"expect": Expectations(max_lifetime_s=3600)},
        "more than the",
    ),
    ("garbage", lambda: "not a certificate", {}, "not a PEM certificate"),
]


@pytest.mark.parametrize(("case", "make", "kw", "match"), CASES, ids=[c[0] for c in CASES])
def test_wrong_certificates_are_refused(
    case: str, make: Callable[[], str], kw: dict[str, Any], match: str
) -> None:
    with pytest.raises(CAVerificationError, match=match) as info:
        check(make(), **kw)
    assert info.value.retryable is False
    assert "test-ca" in str(info.value)


def test_eku_check_can_be_disabled() -> None:
    check(build(eku=()), expect=Expectations(require_eku=False))

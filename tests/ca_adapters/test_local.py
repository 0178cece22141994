"""LocalCA: EC and RSA CA keys, RSA and EC node CSRs, files, intermediates, bad input."""

from __future__ import annotations

import base64
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_adapters import CAError, LocalCA, SignRequest, verify_issued
from ca_adapters.verify import load_pem_chain
from tests.ca_adapters.helpers import load_cert, make_csr, node_key, spki

ID = "node-00001.fleet.example.net"


@pytest.fixture(scope="module")
def ec_ca() -> LocalCA:
    return LocalCA.generate("ec")


@pytest.fixture(scope="module")
def rsa_ca() -> LocalCA:
    return LocalCA.generate("rsa")


@pytest.mark.parametrize("ca_kind", ["ec", "rsa"])
@pytest.mark.parametrize("node_kind", ["ec", "rsa"])
async def test_sign_all_key_combinations(
    ca_kind: str, node_kind: str, ec_ca: LocalCA, rsa_ca: LocalCA
) -> None:
    ca = ec_ca if ca_kind == "ec" else rsa_ca
    key = node_key(node_kind)  # type: ignore[arg-type]
    csr_pem, _ = make_csr("ignored-cn.example.net", key=key)
    res = await ca.sign(
        SignRequest(ID, csr_pem, dns_sans=("alias.example.net",), ip_sans=("10.0.0.7",))
    )
    cert = load_cert(res.certificate_pem)
    assert spki(cert.public_key()) == spki(key)
    # CN and SANs are what the provisioner decided, not what the CSR said.
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ID
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [ID, "alias.example.net"]
    assert [str(i) for i in san.get_values_for_type(x509.IPAddress)] == ["10.0.0.7"]
    eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert ku.value.key_encipherment is (node_kind == "rsa")
    assert not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert isinstance(ca.key, ec.EllipticCurvePrivateKey if ca_kind == "ec" else rsa.RSAPrivateKey)
    assert res.chain_pem == ca.chain_pem == await ca.ca_chain()
    assert int(res.serial.replace(":", ""), 16) == cert.serial_number
    assert res.not_after == cert.not_valid_after_utc
    # And the generic re-verification accepts it.
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    verify_issued(
        res.certificate_pem,
        csr=csr,
        identity=ID,
        dns_sans=("alias.example.net",),
        ip_sans=("10.0.0.7",),
        ca_chain=load_pem_chain(ca.chain_pem),
        ca="local",
    )


def test_serials_are_random_and_large(ec_ca: LocalCA) -> None:
    csr_pem, _ = make_csr(ID)
    serials = {
        load_cert(ec_ca.sign_sync(SignRequest(ID, csr_pem)).certificate_pem).serial_number
        for _ in range(20)
    }
    assert len(serials) == 20
    assert all(s.bit_length() > 64 for s in serials)


def test_validity_default_ttl_and_cap() -> None:
    ca = LocalCA.generate("ec", validity_s=7 * 86400, max_validity_s=30 * 86400)
    csr_pem, _ = make_csr(ID)
    now = datetime.now(UTC)
    default = ca.sign_sync(SignRequest(ID, csr_pem))
    assert abs(default.not_after - (now + timedelta(days=7))) < timedelta(minutes=1)
    short = ca.sign_sync(SignRequest(ID, csr_pem, ttl_s=3600))
    assert abs(short.not_after - (now + timedelta(hours=1))) < timedelta(minutes=1)
    capped = ca.sign_sync(SignRequest(ID, csr_pem, ttl_s=365 * 86400))
    assert abs(capped.not_after - (now + timedelta(days=30))) < timedelta(minutes=1)


def test_write_and_load_round_trip(tmp_path: Path, ec_ca: LocalCA) -> None:
    cert_path, key_path = ec_ca.write(tmp_path / "ca")
    assert stat.S_IMODE(key_path.stat().st_mode) == 0o600
    assert not list((tmp_path / "ca").glob(".*"))  # no temp files left behind
    loaded = LocalCA.from_files(cert_path, key_path)
    csr_pem, _ = make_csr(ID)
    cert = load_cert(loaded.sign_sync(SignRequest(ID, csr_pem)).certificate_pem)
    cert.verify_directly_issued_by(ec_ca.cert)


def test_intermediate_ca_from_files(tmp_path: Path, rsa_ca: LocalCA) -> None:
    inter = LocalCA.generate("ec", "Fleet Issuing CA", parent=rsa_ca)
    cert_path, key_path = inter.write(tmp_path)
    # ca.pem holds the intermediate followed by the root.
    assert len(load_pem_chain(cert_path.read_text())) == 2
    (tmp_path / "chain.pem").write_text(rsa_ca.chain_pem)
    inter_cert = tmp_path / "inter.pem"
    inter_cert.write_bytes(inter.cert.public_bytes(serialization.Encoding.PEM))
    loaded = LocalCA.from_files(inter_cert, key_path, tmp_path / "chain.pem")
    csr_pem, _ = make_csr(ID, key=node_key("rsa"))
    res = loaded.sign_sync(SignRequest(ID, csr_pem))
    leaf = load_cert(res.certificate_pem)
    leaf.verify_directly_issued_by(inter.cert)
    inter.cert.verify_directly_issued_by(rsa_ca.cert)
    assert [c.subject for c in load_pem_chain(res.chain_pem)] == [
        inter.cert.subject,
        rsa_ca.cert.subject,
    ]


def test_from_files_refuses_mismatched_key(tmp_path: Path, ec_ca: LocalCA) -> None:
    other = LocalCA.generate("ec")
    cert_path, _ = ec_ca.write(tmp_path / "a")
    _, other_key = other.write(tmp_path / "b")
    with pytest.raises(ValueError, match="does not belong"):
        LocalCA.from_files(cert_path, other_key)


@pytest.mark.parametrize(
    ("identity", "csr_kind", "match"),
    [
        ("bad name.example.net", "ec", "not a valid DNS name"),
        ("*.example.net", "ec", "not a valid DNS name"),
        (ID, "garbage", "not valid PEM"),
        (ID, "rsa1024", "too small"),
        (ID, "tampered", "signature does not verify"),
    ],
)
def test_bad_input_is_a_permanent_error(
    identity: str, csr_kind: str, match: str, ec_ca: LocalCA
) -> None:
    if csr_kind == "garbage":
        csr_pem = "-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----\n"
    elif csr_kind == "rsa1024":
        csr_pem, _ = make_csr(ID, key=node_key("rsa", bits=1024))
    elif csr_kind == "tampered":
        good, _ = make_csr(ID)
        csr_der = x509.load_pem_x509_csr(good.encode()).public_bytes(serialization.Encoding.DER)
        der = bytearray(csr_der)
        der[-5] ^= 0x01  # flip a bit of the signature
        csr_pem = (
            "-----BEGIN CERTIFICATE REQUEST-----\n"
            + base64.encodebytes(bytes(der)).decode()
            + "-----END CERTIFICATE REQUEST-----\n"
        )
    else:
        csr_pem, _ = make_csr(ID)
    with pytest.raises(CAError, match=match) as info:
        ec_ca.sign_sync(SignRequest(identity, csr_pem))
    assert info.value.retryable is False


async def test_async_sign_offloads_rsa_only(ec_ca: LocalCA, rsa_ca: LocalCA) -> None:
    assert ec_ca.offload is False and rsa_ca.offload is True
    csr_pem, _ = make_csr(ID)
    assert load_cert((await rsa_ca.sign(SignRequest(ID, csr_pem))).certificate_pem)
    assert await ec_ca.health() is True

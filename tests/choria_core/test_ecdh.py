"""ECDH key exchange and private-key transport against independent implementations."""

from __future__ import annotations

import base64
import json
import subprocess
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from choria_core import ecdh
from tests.support import require_binary


@pytest.fixture(scope="module")
def rsa_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


def _der(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def test_x25519_both_sides_agree() -> None:
    node_priv, node_pub = ecdh.generate_keypair()
    prov_priv, prov_pub = ecdh.generate_keypair()
    assert len(node_pub) == 64 and node_pub == node_pub.lower()
    assert ecdh.shared_secret(node_priv, prov_pub) == ecdh.shared_secret(prov_priv, node_pub)


@pytest.mark.parametrize("bad", ["", "zz" * 32, "00" * 31, "00" * 32])
def test_x25519_rejects_bad_public_keys(bad: str) -> None:
    priv, _ = ecdh.generate_keypair()
    with pytest.raises(ecdh.ECDHError):
        ecdh.shared_secret(priv, bad)  # "00"*32 is a low-order point: all-zero secret


def test_legacy_pem_from_cryptography_decrypts(rsa_key: rsa.RSAPrivateKey) -> None:
    """A separate implementation (OpenSSL via cryptography) encrypts with the raw secret."""
    secret = bytes(range(32))
    pem = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.BestAvailableEncryption(secret),
    ).decode()
    assert "Proc-Type: 4,ENCRYPTED" in pem and "DEK-Info: AES-256-CBC," in pem
    assert ecdh.decrypt_legacy_pem(pem, secret) == _der(rsa_key)


def test_legacy_pem_from_openssl_cli_decrypts(tmp_path: Path) -> None:
    openssl = require_binary(
        "openssl", "install the openssl command line (apt-get install openssl)"
    )
    password = "A" * 16 + "printable-secret"  # the CLI can't pass raw bytes; any bytes work
    key = ec.generate_private_key(ec.SECP256R1())
    plain = tmp_path / "k.pem"
    plain.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
    )
    out = subprocess.run(
        [openssl, "ec", "-in", str(plain), "-aes256", "-passout", f"pass:{password}"],
        capture_output=True,
        check=True,
        text=True,
    ).stdout
    assert "Proc-Type: 4,ENCRYPTED" in out
    assert ecdh.decrypt_legacy_pem(out, password.encode()) == _der(key)


def test_our_legacy_encryption_loads_in_cryptography(rsa_key: rsa.RSAPrivateKey) -> None:
    secret = bytes(range(100, 132))
    pem = ecdh.encrypt_legacy_pem(_der(rsa_key), secret)
    assert pem.startswith("-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: ")
    loaded = serialization.load_pem_private_key(pem.encode(), password=secret)
    assert _der(loaded) == _der(rsa_key)  # type: ignore[arg-type]


def test_legacy_wrong_secret_is_refused(rsa_key: rsa.RSAPrivateKey) -> None:
    pem = ecdh.encrypt_legacy_pem(_der(rsa_key), b"\x01" * 32)
    with pytest.raises(ecdh.ECDHError):
        ecdh.decrypt_legacy_pem(pem, b"\x02" * 32)


def test_legacy_requires_encryption(rsa_key: rsa.RSAPrivateKey) -> None:
    plain = rsa_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    ).decode()
    with pytest.raises(ecdh.ECDHError, match="not encrypted"):
        ecdh.decrypt_private_key(plain, b"\x00" * 32)


def test_aead_roundtrip_and_tamper_detection() -> None:
    secret = bytes(range(32))
    env = ecdh.aead_encrypt(b"private key material", secret)
    assert ecdh.aead_decrypt(env, secret) == b"private key material"
    obj = json.loads(env)
    assert obj["alg"] == ecdh.AEAD_ALG
    ct = bytearray(base64.b64decode(obj["ct"]))
    ct[3] ^= 0x01
    obj["ct"] = base64.b64encode(bytes(ct)).decode()
    with pytest.raises(ecdh.ECDHError, match="authentication failed"):
        ecdh.aead_decrypt(json.dumps(obj), secret)
    with pytest.raises(ecdh.ECDHError, match="authentication failed"):
        ecdh.aead_decrypt(env, bytes(32))


def test_provisioner_to_node_both_modes_keep_key_type() -> None:
    """encrypt_private_key (provisioner) → decrypt_private_key (node) keeps EC keys as EC."""
    key = ec.generate_private_key(ec.SECP256R1())
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )
    node_priv, node_pub = ecdh.generate_keypair()
    for aead in (False, True):
        enc, prov_pub = ecdh.encrypt_private_key(pem, node_pub, aead=aead)
        assert ecdh.is_aead_envelope(enc) is aead
        out = ecdh.decrypt_private_key(enc, ecdh.shared_secret(node_priv, prov_pub))
        assert out.startswith(b"-----BEGIN EC PRIVATE KEY-----")  # not relabelled as RSA
        assert out == pem


def test_pkcs8_key_keeps_its_label() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    der = key.private_bytes(
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert ecdh.private_key_pem_from_der(der).startswith(b"-----BEGIN PRIVATE KEY-----")

"""provisioner.client_identity: loading a Choria client JWT + seed or an x509 pair, signing."""

from __future__ import annotations

import base64
import datetime
import logging
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import NameOID

from provisioner.client_identity import (
    ClientIdentityConfig,
    ClientIdentityError,
    load_client_identity,
    sign_nonce,
    verify_client_jwt,
)
from provisioner.config import ConfigError, load_config
from testbed.choria_broker_auth import issue_client_jwt

CALLER = "choria=prov1.example.net"


def _seed_hex(key: ed25519.Ed25519PrivateKey) -> str:
    return key.private_bytes_raw().hex()


def _pub_hex(key: ed25519.Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes_raw().hex()


def write_jwt_identity(
    d: Path,
    *,
    issuer: ed25519.Ed25519PrivateKey | None = None,
    validity_s: float = 3600,
    now: float | None = None,
    seed_for: ed25519.Ed25519PrivateKey | None = None,
) -> tuple[Path, Path, ed25519.Ed25519PrivateKey]:
    """A client JWT + seed file pair, as ``choria jwt client`` and go-choria write them."""
    issuer = issuer or ed25519.Ed25519PrivateKey.generate()
    client = ed25519.Ed25519PrivateKey.generate()
    token = issue_client_jwt(
        issuer, caller=CALLER, public_key_hex=_pub_hex(client), validity_s=validity_s, now=now
    )
    jwt, seed = d / "client.jwt", d / "client.seed"
    jwt.write_text(token + "\n")
    seed.write_text(_seed_hex(seed_for or client))  # go-choria writes no newline
    seed.chmod(0o600)
    return jwt, seed, client


def test_nothing_configured_is_none() -> None:
    assert load_client_identity(ClientIdentityConfig()) is None


def test_jwt_identity_loads_and_signs_like_go_choria(tmp_path: Path) -> None:
    jwt, seed, client = write_jwt_identity(tmp_path)
    ident = load_client_identity(ClientIdentityConfig(jwt=str(jwt), seed=str(seed)))
    assert ident is not None and ident.kind == "jwt"
    assert ident.caller == CALLER
    assert ident.jwt == jwt.read_text().strip()
    assert ident.certificate_pem is None
    sig = ident.sign(b"data")
    client.public_key().verify(sig, b"data")  # plain ed25519 over the bytes
    # the CONNECT sig: base64url without padding over the nonce text
    nonce_sig = sign_nonce(ident, "abc-nonce").decode()
    assert "=" not in nonce_sig
    client.public_key().verify(
        base64.urlsafe_b64decode(nonce_sig + "=" * (-len(nonce_sig) % 4)), b"abc-nonce"
    )
    assert "seed" not in repr(ident) and _seed_hex(client) not in repr(ident)


def test_seed_with_trailing_newline_is_accepted(tmp_path: Path) -> None:
    jwt, seed, _ = write_jwt_identity(tmp_path)
    seed.write_text(seed.read_text() + "\n")
    assert load_client_identity(ClientIdentityConfig(jwt=str(jwt), seed=str(seed))) is not None


def test_seed_not_matching_the_jwt_is_refused(tmp_path: Path) -> None:
    other = ed25519.Ed25519PrivateKey.generate()
    jwt, seed, _ = write_jwt_identity(tmp_path, seed_for=other)
    with pytest.raises(ClientIdentityError, match="does not match the seed") as err:
        load_client_identity(ClientIdentityConfig(jwt=str(jwt), seed=str(seed)))
    assert err.value.key == "client_identity.seed"
    assert _seed_hex(other) not in str(err.value)


def test_half_pairs_and_both_kinds_are_refused(tmp_path: Path) -> None:
    jwt, seed, _ = write_jwt_identity(tmp_path)
    with pytest.raises(ClientIdentityError, match="together"):
        load_client_identity(ClientIdentityConfig(jwt=str(jwt)))
    with pytest.raises(ClientIdentityError, match="together"):
        load_client_identity(ClientIdentityConfig(seed=str(seed)))
    with pytest.raises(ClientIdentityError, match="together"):
        load_client_identity(ClientIdentityConfig(certificate=str(jwt)))
    with pytest.raises(ClientIdentityError, match="not both"):
        load_client_identity(
            ClientIdentityConfig(jwt=str(jwt), seed=str(seed), certificate=str(jwt), key="k")
        )


def test_bad_files_are_refused_without_echoing_them(tmp_path: Path) -> None:
    jwt, seed, _ = write_jwt_identity(tmp_path)
    with pytest.raises(ClientIdentityError, match="cannot be read"):
        load_client_identity(ClientIdentityConfig(jwt=str(tmp_path / "nope"), seed=str(seed)))
    secret_looking = "not-hex-" + "z" * 56
    seed.write_text(secret_looking)
    with pytest.raises(ClientIdentityError, match="64 hex digits") as err:
        load_client_identity(ClientIdentityConfig(jwt=str(jwt), seed=str(seed)))
    assert secret_looking not in str(err.value)
    jwt.write_text("garbage")
    with pytest.raises(ClientIdentityError, match="not a JWT"):
        load_client_identity(ClientIdentityConfig(jwt=str(jwt), seed=str(seed)))


def test_expired_jwt_is_refused(tmp_path: Path) -> None:
    jwt, seed, _ = write_jwt_identity(tmp_path, validity_s=60, now=time.time() - 3600)
    with pytest.raises(ClientIdentityError, match="expired"):
        load_client_identity(ClientIdentityConfig(jwt=str(jwt), seed=str(seed)))


def test_loose_seed_permissions_are_warned_about(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    jwt, seed, client = write_jwt_identity(tmp_path)
    seed.chmod(0o644)
    with caplog.at_level(logging.WARNING, logger="provisioner.client_identity"):
        load_client_identity(ClientIdentityConfig(jwt=str(jwt), seed=str(seed)))
    assert "readable by group or others" in caplog.text
    assert _seed_hex(client) not in caplog.text


def test_verify_client_jwt_checks_issuer_and_expiry(tmp_path: Path) -> None:
    issuer = ed25519.Ed25519PrivateKey.generate()
    jwt, _, client = write_jwt_identity(tmp_path, issuer=issuer)
    token = jwt.read_text().strip()
    claims = verify_client_jwt(token, issuer.public_key())
    assert claims["callerid"] == CALLER and claims["public_key"] == _pub_hex(client)
    with pytest.raises(ClientIdentityError, match="not signed by the issuer"):
        verify_client_jwt(token, ed25519.Ed25519PrivateKey.generate().public_key())
    with pytest.raises(ClientIdentityError, match="expired"):
        verify_client_jwt(token, issuer.public_key(), now=time.time() + 7200)


def _cert(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cn: str) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    return cert.public_bytes(serialization.Encoding.PEM)


def _key_pem(key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def test_x509_rsa_and_ec_identities_sign(tmp_path: Path) -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    for name, key in (("rsa", rsa_key), ("ec", ec_key)):
        cert, keyf = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        cert.write_bytes(_cert(key, f"{name}.mcollective"))
        keyf.write_bytes(_key_pem(key))
        keyf.chmod(0o600)
        ident = load_client_identity(ClientIdentityConfig(certificate=str(cert), key=str(keyf)))
        assert ident is not None and ident.kind == "x509" and ident.jwt is None
        assert ident.caller == f"choria={name}.mcollective"
        assert ident.certificate_pem == cert.read_bytes()
        sig = ident.sign(b"payload")
        if isinstance(key, rsa.RSAPrivateKey):
            key.public_key().verify(sig, b"payload", padding.PKCS1v15(), hashes.SHA256())
        else:
            key.public_key().verify(sig, b"payload", ec.ECDSA(hashes.SHA256()))


def test_x509_key_of_another_certificate_is_refused(tmp_path: Path) -> None:
    a = ec.generate_private_key(ec.SECP256R1())
    b = ec.generate_private_key(ec.SECP256R1())
    (tmp_path / "c.pem").write_bytes(_cert(a, "a.mcollective"))
    (tmp_path / "k.pem").write_bytes(_key_pem(b))
    with pytest.raises(ClientIdentityError, match="does not belong"):
        load_client_identity(
            ClientIdentityConfig(certificate=str(tmp_path / "c.pem"), key=str(tmp_path / "k.pem"))
        )


def test_config_file_resolves_relative_paths_and_checks_the_pair(tmp_path: Path) -> None:
    d = tmp_path / "choria"
    d.mkdir()
    write_jwt_identity(d)
    cfg_file = tmp_path / "provisioner.yaml"
    cfg_file.write_text(
        "features: {jwt: false}\n"
        "client_identity:\n  jwt: choria/client.jwt\n  seed: choria/client.seed\n"
    )
    cfg = load_config(cfg_file)
    assert cfg.client_identity.jwt == str(tmp_path.resolve() / "choria" / "client.jwt")
    cfg_file.write_text("client_identity:\n  jwt: choria/client.jwt\n")
    with pytest.raises(ConfigError, match=r"client_identity\.seed: jwt and seed") as err:
        load_config(cfg_file)
    assert str(cfg_file) in str(err.value)

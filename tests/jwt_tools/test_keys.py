"""Key files: the formats go-choria uses, generation, tight permissions, clear refusals."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from jwt_tools import (
    KeyFileError,
    create_provisioning_token,
    generate_keypair,
    load_signing_key,
    load_verify_key,
    public_key_hex,
    verify_provisioning_token,
    write_private_file,
)


@pytest.fixture(scope="module")
def rsa_pair() -> tuple[bytes, bytes]:
    return generate_keypair("rsa")


def test_rsa_pair_formats_and_round_trip(rsa_pair: tuple[bytes, bytes], tmp_path: Path) -> None:
    priv, pub = rsa_pair
    assert priv.startswith(b"-----BEGIN RSA PRIVATE KEY-----")
    assert pub.startswith(b"-----BEGIN PUBLIC KEY-----")
    (tmp_path / "k.pem").write_bytes(priv)
    (tmp_path / "k.pub").write_bytes(pub)
    key = load_signing_key(tmp_path / "k.pem")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    tok = create_provisioning_token(key, token="t", urls=["b:1"])
    assert verify_provisioning_token(tok, load_verify_key(tmp_path / "k.pub"))
    assert verify_provisioning_token(tok, load_verify_key(str(tmp_path / "k.pub")))


def test_pkcs8_private_key_accepted(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    (tmp_path / "k.pem").write_bytes(pem)
    assert isinstance(load_signing_key(tmp_path / "k.pem"), rsa.RSAPrivateKey)


def test_ed25519_pair_is_bare_hex(tmp_path: Path) -> None:
    seed, pub = generate_keypair("ed25519")
    assert len(seed) == 64 and len(pub) == 64
    int(seed, 16), int(pub, 16)  # both pure hex, no trailing newline (Go decodes the whole file)
    (tmp_path / "seed").write_bytes(seed)
    key = load_signing_key(tmp_path / "seed")
    assert isinstance(key, ed25519.Ed25519PrivateKey)
    assert public_key_hex(key) == pub.decode()


def test_verify_key_hex_inline_file_and_trailing_newline(tmp_path: Path) -> None:
    key = ed25519.Ed25519PrivateKey.generate()
    hexpub = public_key_hex(key)
    tok = create_provisioning_token(key, token="t", srv="example.net")
    (tmp_path / "pub").write_text(hexpub + "\n")
    for source in (hexpub, hexpub + "\n", tmp_path / "pub", str(tmp_path / "pub")):
        assert verify_provisioning_token(tok, load_verify_key(source))["chsrv"] == "example.net"


def test_verify_key_from_certificate(tmp_path: Path) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "signer")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "signer.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    tok = create_provisioning_token(key, token="t", urls=["b:1"])
    assert verify_provisioning_token(tok, load_verify_key(tmp_path / "signer.pem"))


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_signing_key_refusals(tmp_path: Path) -> None:
    seedish = "ab" * 31  # 62 hex chars: close but wrong
    cases = [
        tmp_path / "missing",
        _write(tmp_path, "garbage", b"hello world"),
        _write(tmp_path, "short", seedish.encode()),
        _write(
            tmp_path,
            "badpem",
            b"-----BEGIN RSA PRIVATE KEY-----\nnope\n-----END RSA PRIVATE KEY-----\n",
        ),
        _write(
            tmp_path,
            "ec",
            ec.generate_private_key(ec.SECP256R1()).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            ),
        ),
        _write(
            tmp_path,
            "small",
            rsa.generate_private_key(public_exponent=65537, key_size=1024).private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
        ),
    ]
    for path in cases:
        with pytest.raises(KeyFileError) as info:
            load_signing_key(path)
        assert info.value.reason == "bad_key"
        assert str(path) in str(info.value)
        assert seedish not in str(info.value)


def test_verify_key_refusals(tmp_path: Path, rsa_pair: tuple[bytes, bytes]) -> None:
    priv_path = _write(tmp_path, "priv.pem", rsa_pair[0])
    for source in (tmp_path / "missing", "zz" * 32, priv_path, _write(tmp_path, "x", b"nothex")):
        with pytest.raises(KeyFileError) as info:
            load_verify_key(source)
        assert info.value.reason == "bad_key"
        assert "PRIVATE KEY-----" not in str(info.value)


def test_write_private_file_is_0600_and_replaces(tmp_path: Path) -> None:
    target = tmp_path / "secret"
    target.write_text("old")
    target.chmod(0o644)
    write_private_file(target, b"new")
    assert target.read_bytes() == b"new"
    assert stat.S_IMODE(target.stat().st_mode) == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["secret"]  # no temp file left behind


def test_generate_keypair_refuses_unknown_kind() -> None:
    with pytest.raises(ValueError):
        generate_keypair("dsa")  # type: ignore[arg-type]


def test_key_files_are_written_into_missing_directories(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from provisioner.cli import app

    priv, pub = tmp_path / "new" / "dir" / "k.seed", tmp_path / "other" / "k.pub"
    result = CliRunner().invoke(
        app,
        ["jwt", "keys", "--type", "ed25519", "--out-private", str(priv), "--out-public", str(pub)],
    )
    assert result.exit_code == 0, result.output
    assert priv.stat().st_mode & 0o777 == 0o600
    assert (priv.parent.stat().st_mode & 0o777) == 0o700
    assert pub.read_text().strip()

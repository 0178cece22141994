"""Safe file writing (config, paths, transactions) and keys/CSRs of the node agent."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from node_agent.files import (
    ConfigFileError,
    FileTransaction,
    UnsafePathError,
    check_policy_name,
    parse_config,
    render_config,
    resolve_ssldir,
)
from node_agent.keys import CSRFieldError, KeyPool, build_csr, generate_private_key


def test_config_roundtrip_has_header_and_sorted_lines() -> None:
    text = render_config({"b.key": "2", "a.key": "x = y"}, "written in request abc")
    assert text.splitlines() == ["# written in request abc", "a.key=x = y", "b.key=2"]
    assert parse_config(text) == {"a.key": "x = y", "b.key": "2"}


@pytest.mark.parametrize(
    "settings",
    [
        {"identity": "n1\nplugin.choria.server.provision=true"},
        {"identity": "n1\rx=1"},
        {"bad\nkey": "1"},
        {"key with space": "1"},
        {"": "1"},
    ],
)
def test_config_refuses_injection(settings: dict[str, str]) -> None:
    with pytest.raises(ConfigFileError):
        render_config(settings, "h")


def test_config_header_cannot_inject_lines() -> None:
    text = render_config({"a": "1"}, "from evil\nplugin.choria.server.provision=1")
    assert parse_config(text) == {"a": "1"}


def test_ssldir_must_stay_under_root(tmp_path: Path) -> None:
    root = tmp_path / "state"
    (root / "ssl").mkdir(parents=True)
    assert resolve_ssldir(str(root / "ssl"), root) == (root / "ssl").resolve()
    for bad in ("/etc/choria/ssl", str(root / ".." / "elsewhere"), "relative/ssl", ""):
        with pytest.raises(UnsafePathError):
            resolve_ssldir(bad, root)
    (root / "link").symlink_to(tmp_path)  # a symlink pointing out of the root
    with pytest.raises(UnsafePathError, match="outside"):
        resolve_ssldir(str(root / "link" / "x"), root)


@pytest.mark.parametrize(
    "name",
    ["../x.policy", "a/b.policy", "a\\b.policy", "..policy", ".policy", "x.rego", "a\n.policy"],
)
def test_policy_names_are_refused(name: str) -> None:
    with pytest.raises(UnsafePathError):
        check_policy_name(name, ".policy")


def test_policy_name_ok() -> None:
    assert check_policy_name("rpcutil.policy", ".policy") == "rpcutil.policy"


def test_transaction_rolls_back_every_applied_change(tmp_path: Path) -> None:
    keep = tmp_path / "keep.txt"
    keep.write_text("old")
    keep.chmod(0o640)
    gone = tmp_path / "gone.txt"
    gone.write_text("still here")
    tx = FileTransaction(durable=False)
    tx.write(keep, b"new", 0o600)
    tx.mkdir(tmp_path / "newdir" / "sub")
    tx.write(tmp_path / "newdir" / "sub" / "f", b"1", 0o600)
    tx.delete(gone)
    (tmp_path / "blocker").mkdir()
    tx.write(tmp_path / "blocker", b"cannot replace a directory", 0o600)  # fails last
    with pytest.raises(OSError):
        tx.commit()
    assert keep.read_text() == "old" and stat.S_IMODE(keep.stat().st_mode) == 0o640
    assert gone.read_text() == "still here"
    assert not (tmp_path / "newdir").exists()


def test_transaction_commit_modes(tmp_path: Path) -> None:
    tx = FileTransaction(durable=False)
    tx.mkdir(tmp_path / "d", 0o700)
    tx.write(tmp_path / "d" / "secret", b"s", 0o600)
    tx.commit()
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "d" / "secret").stat().st_mode) == 0o600


def test_csr_subject_and_spki_public_key() -> None:
    key = generate_private_key("ec")
    res = build_csr(
        key,
        "node1.example.net",
        {"C": "DE", "ST": "Bavaria", "L": "Munich", "O": "Acme", "OU": "Ops"},
    )
    csr = x509.load_pem_x509_csr(res.csr_pem.encode())
    assert csr.is_signature_valid
    subject = {a.oid: a.value for a in csr.subject}
    assert subject[NameOID.COMMON_NAME] == "node1.example.net"
    assert subject[NameOID.STATE_OR_PROVINCE_NAME] == "Bavaria"  # go-choria drops ST
    assert subject[NameOID.COUNTRY_NAME] == "DE"
    pub = serialization.load_pem_public_key(res.public_key_pem.encode())  # real SPKI
    assert isinstance(pub, ec.EllipticCurvePublicKey)
    assert res.key_pem.startswith(b"-----BEGIN EC PRIVATE KEY-----")


def test_rsa_default_is_go_compatible() -> None:
    key = generate_private_key("rsa")
    assert isinstance(key, rsa.RSAPrivateKey) and key.key_size == 2048
    res = build_csr(key, "node1.example.net")
    assert res.key_pem.startswith(b"-----BEGIN RSA PRIVATE KEY-----")


@pytest.mark.parametrize(
    ("cn", "fields"),
    [("bad cn", {}), ("n1", {"C": "Germany"}), ("n1", {"O": "a;b"}), ("x" * 81, {})],
)
def test_csr_fields_validated(cn: str, fields: dict[str, str]) -> None:
    with pytest.raises(CSRFieldError):
        build_csr(generate_private_key("ec"), cn, fields)


async def test_key_pool_hands_out_distinct_cached_keys(tmp_path: Path) -> None:
    pool = KeyPool(tmp_path, "ec")
    assert pool.ensure(3) == 3
    assert pool.ensure(3) == 0  # cached on disk
    for p in (tmp_path / "ec").iterdir():
        assert stat.S_IMODE(p.stat().st_mode) == 0o600
    second = KeyPool(tmp_path, "ec", offset=1)
    a, b = await pool.take(), await second.take()
    pem = lambda k: k.private_bytes(  # noqa: E731
        serialization.Encoding.DER,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    assert pem(a) != pem(b)
    assert pem(await pool.take()) == pem(b)  # index 1 from both views
    await pool.take()
    await pool.take()  # index 3: not pooled, generated on demand
    assert pool.generated_on_demand == 1
    assert len(os.listdir(tmp_path / "ec")) == 3

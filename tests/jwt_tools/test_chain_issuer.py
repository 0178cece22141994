"""Server tokens with chain issuer data (Organization Issuer networks) and RSA signing keys.

The checks here use an independent verifier (:func:`independent_verify`): plain base64/json and
``cryptography``, no code shared with the signer (neither ``jwt_tools`` nor PyJWT). It follows
the format as written down: ``iss = C-<issuer jti>.<issuer public key>``, ``issexp`` = the
issuer's ``exp``, ``exp`` ≤ the issuer's, ``tcs = <issuer tcs>.<hex ed25519 signature of
"<server jti>.<issuer tcs>">``, and the org issuer's ``tcs`` over ``"<issuer jti>.<issuer pub>"``.
"""

from __future__ import annotations

import base64
import json
import time
from pathlib import Path
from typing import Any

import pytest
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, padding, rsa

from jwt_tools import (
    TokenError,
    chain_issuer_fields,
    create_server_token,
    current_chain_issuer,
    load_chain_issuer,
    load_signing_key,
    parse_chain_issuer,
    verify_server_token,
)
from provisioner.config import Features, ProvisionerConfig
from provisioner.connection import ProvisionerError
from provisioner.connection import load_signing_key as provisioner_signing_key

# fixed seeds: the hand-built vector below is reproducible
ORG = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
CHAIN = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(32, 64)))
NODE = ed25519.Ed25519PrivateKey.from_private_bytes(bytes(range(64, 96)))
RAW = serialization.Encoding.Raw, serialization.PublicFormat.Raw


def _hex(key: ed25519.Ed25519PrivateKey) -> str:
    return key.public_key().public_bytes(*RAW).hex()


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def hand_jwt(claims: dict[str, Any], key: ed25519.Ed25519PrivateKey) -> str:
    """An EdDSA JWT built by hand (RFC 7515 compact form)."""
    head = _b64(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    body = _b64(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64(key.sign(f'{head}.{body}'.encode()))}"


def chain_issuer_token(
    *,
    exp: float | None = None,
    jti: str = "2BVhJXh4gPO8kMNSR8ZZQ6DESOo",
    org: ed25519.Ed25519PrivateKey = ORG,
    tcs_signer: ed25519.Ed25519PrivateKey | None = None,
    **extra: Any,
) -> str:
    """The provisioner's client JWT as an org issuer signs it (``I-`` issuer, ``tcs``)."""
    now = int(time.time())
    pub = _hex(CHAIN)
    claims: dict[str, Any] = {
        "purpose": "choria_client_id",
        "callerid": "choria=provisioner",
        "public_key": pub,
        "iss": "I-" + _hex(org),
        "tcs": (tcs_signer or org).sign(f"{jti}.{pub}".encode()).hex(),
        "iat": now,
        "exp": int(exp if exp is not None else now + 30 * 86400),
        "jti": jti,
    }
    claims.update(extra)
    return hand_jwt({k: v for k, v in claims.items() if v is not None}, org)


def independent_verify(token: str, org_pub: ed25519.Ed25519PublicKey, now: float) -> dict[str, Any]:
    """Verify a chain-issued server token from the format description alone."""
    head_b64, body_b64, sig_b64 = token.split(".")
    header, claims = json.loads(_unb64(head_b64)), json.loads(_unb64(body_b64))
    assert header["alg"] == "EdDSA"
    iss: str = claims["iss"]
    assert iss.startswith("C-")
    issuer_jti, issuer_pub_hex = iss[2:].split(".")
    assert issuer_jti and len(issuer_pub_hex) == 64
    issuer_pub = ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(issuer_pub_hex))
    # the JWS itself is signed by the chain issuer
    issuer_pub.verify(_unb64(sig_b64), f"{head_b64}.{body_b64}".encode())
    issuer_tcs, server_sig = claims["tcs"].split(".")
    # the org issuer vouches for the chain issuer ...
    org_pub.verify(bytes.fromhex(issuer_tcs), f"{issuer_jti}.{issuer_pub_hex}".encode())
    # ... and the chain issuer signed this token's id under that trust signature
    issuer_pub.verify(bytes.fromhex(server_sig), f"{claims['jti']}.{issuer_tcs}".encode())
    assert isinstance(claims["issexp"], int) and claims["issexp"] > now
    assert claims["exp"] <= claims["issexp"]
    assert claims["purpose"] == "choria_server"
    return dict(claims)


def _server(key: Any = CHAIN, **kw: Any) -> str:
    args: dict[str, Any] = {
        "identity": "n1.example.net",
        "public_key_hex": _hex(NODE),
        "collectives": ["choria"],
    }
    args.update(kw)
    return create_server_token(key, **args)


# ---------------------------------------------------------------------------- chain issuer data


def test_chain_issued_token_passes_the_independent_check() -> None:
    now = time.time()
    issuer_exp = int(now) + 7 * 86400
    chain = chain_issuer_token(exp=issuer_exp)
    tok = _server(chain_token=chain, validity_s=365 * 86400)  # asks for longer than the issuer
    claims = independent_verify(tok, ORG.public_key(), now)
    assert claims["iss"] == f"C-2BVhJXh4gPO8kMNSR8ZZQ6DESOo.{_hex(CHAIN)}"
    assert claims["issexp"] == issuer_exp
    assert claims["exp"] == issuer_exp  # capped at the issuer's expiry
    assert claims["tcs"].split(".")[0] == json.loads(_unb64(chain.split(".")[1]))["tcs"]
    # our own verifier agrees, and nothing verifies under another org key
    assert verify_server_token(tok, ORG.public_key())["identity"] == "n1.example.net"
    with pytest.raises(InvalidSignature):
        independent_verify(tok, NODE.public_key(), now)


def test_shorter_token_keeps_its_own_expiry() -> None:
    now = time.time()
    tok = _server(chain_token=chain_issuer_token(exp=now + 86400), validity_s=3600)
    claims = independent_verify(tok, ORG.public_key(), now)
    assert claims["exp"] < claims["issexp"]


def test_hand_built_vector() -> None:
    """chain_issuer_fields for a fixed server jti equals the fields built from the format."""
    jti, org_tcs = "2BVhJXh4gPO8kMNSR8ZZQ6DESOo", None
    issuer = parse_chain_issuer(chain_issuer_token(exp=4102444800, jti=jti))
    org_tcs = ORG.sign(f"{jti}.{_hex(CHAIN)}".encode()).hex()
    server_jti = "2BVhKQDp0pVPO2ZqeVLEmo3qBrV"
    expected = {
        "iss": f"C-{jti}.{_hex(CHAIN)}",
        "issexp": 4102444800,
        "exp": 4102444800,
        "tcs": org_tcs + "." + CHAIN.sign(f"{server_jti}.{org_tcs}".encode()).hex(),
    }
    got = chain_issuer_fields(issuer, CHAIN, own_jti=server_jti, exp=4102444800 + 10)
    assert got == expected
    # a full token assembled by hand from those fields is accepted by our verifier
    claims = {
        "purpose": "choria_server",
        "identity": "n1.example.net",
        "collectives": ["choria"],
        "public_key": _hex(NODE),
        "iat": int(time.time()),
        "jti": server_jti,
        **expected,
    }
    # the jti is not based on iat: the chain check insists on that, as go-choria does
    with pytest.raises(TokenError) as info:
        verify_server_token(hand_jwt(claims, CHAIN), ORG.public_key())
    assert info.value.reason == "malformed"


def test_token_without_issexp_refused_by_verifier() -> None:
    now = time.time()
    tok = _server(chain_token=chain_issuer_token(exp=now + 86400))
    body = json.loads(_unb64(tok.split(".")[1]))
    del body["issexp"]
    with pytest.raises(TokenError) as info:
        verify_server_token(hand_jwt(body, CHAIN), ORG.public_key())
    assert info.value.reason == "malformed"


@pytest.mark.parametrize(
    ("token", "reason", "words"),
    [
        (lambda: chain_issuer_token(tcs=None), "chain_invalid", "no trust chain signature"),
        (lambda: chain_issuer_token(purpose="choria_server"), "chain_invalid", "client id"),
        # a tcs not made by the org issuer named in iss
        (lambda: chain_issuer_token(tcs_signer=NODE), "chain_invalid", "not the organization"),
        # a chain-issued client cannot issue further (its tcs already has two parts)
        (lambda: chain_issuer_token(tcs="ab.cd"), "chain_invalid", "one ed25519 signature"),
        (lambda: chain_issuer_token(iss="C-x." + _hex(ORG)), "chain_invalid", "organization"),
        (lambda: chain_issuer_token(jti="a.b"), "chain_invalid", "jti"),
        (lambda: chain_issuer_token(public_key="zz"), "chain_invalid", "public_key"),
        (lambda: chain_issuer_token(exp=time.time() - 1), "expired", "expired"),
        (lambda: "not.a.jwt!", "chain_invalid", "not a JWT"),
        (lambda: "x" * 20000, "chain_invalid", "larger than"),
    ],
)
def test_bad_chain_issuer_token_refused(token: Any, reason: str, words: str) -> None:
    text = token()
    with pytest.raises(TokenError) as info:
        _server(chain_token=text)
    assert info.value.reason == reason
    assert words in str(info.value)
    assert text not in str(info.value)  # the credential never reaches an error message


def test_signing_key_must_be_the_chain_issuers() -> None:
    with pytest.raises(TokenError) as info:
        _server(NODE, chain_token=chain_issuer_token())
    assert info.value.reason == "wrong_key_type"


def test_rsa_key_cannot_sign_a_chain() -> None:
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TokenError) as info:
        _server(rsa_key, chain_token=chain_issuer_token())
    assert info.value.reason == "wrong_key_type"
    assert "ed25519" in str(info.value)


def test_chain_token_file_reread_when_renewed(tmp_path: Path) -> None:
    path = tmp_path / "signer.jwt"
    path.write_text(chain_issuer_token(exp=time.time() - 10) + "\n")
    with pytest.raises(TokenError) as info:
        current_chain_issuer(path)
    assert info.value.reason == "expired"
    renewed = int(time.time()) + 3600
    path.write_text(chain_issuer_token(exp=renewed, jti="2BVhRenewed0000000000000000") + "\n")
    assert current_chain_issuer(path).exp == renewed
    path.write_bytes(b"\xff" * 10)
    with pytest.raises(TokenError) as info:
        load_chain_issuer(path)
    assert info.value.reason == "chain_invalid"
    with pytest.raises(TokenError) as info:
        load_chain_issuer(tmp_path / "missing.jwt")
    assert info.value.reason == "chain_invalid"


# ---------------------------------------------------------------------------- RSA signing keys


def _rsa_pem(bits: int, fmt: serialization.PrivateFormat) -> tuple[rsa.RSAPrivateKey, bytes]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=bits)
    return key, key.private_bytes(serialization.Encoding.PEM, fmt, serialization.NoEncryption())


@pytest.mark.parametrize(
    "fmt", [serialization.PrivateFormat.TraditionalOpenSSL, serialization.PrivateFormat.PKCS8]
)
def test_rsa_signing_key_signs_rs256(tmp_path: Path, fmt: serialization.PrivateFormat) -> None:
    key, pem = _rsa_pem(2048, fmt)
    path = tmp_path / "signer-key.pem"
    path.write_bytes(pem)
    loaded = load_signing_key(path)
    tok = _server(loaded, validity_s=3600)
    head_b64, body_b64, sig_b64 = tok.split(".")
    assert json.loads(_unb64(head_b64))["alg"] == "RS256"
    # independent RS256 check: RSASSA-PKCS1-v1_5 with SHA-256 over "<header>.<body>"
    key.public_key().verify(
        _unb64(sig_b64), f"{head_b64}.{body_b64}".encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    claims = verify_server_token(tok, key.public_key())
    assert claims["iss"] == "Choria Provisioner" and "tcs" not in claims
    # an RSA-signed token does not verify with an ed25519 key, nor with another RSA key
    with pytest.raises(TokenError) as info:
        verify_server_token(tok, ORG.public_key())
    assert info.value.reason == "alg_not_allowed"
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    with pytest.raises(TokenError) as info:
        verify_server_token(tok, other.public_key())
    assert info.value.reason == "bad_signature"


def test_small_rsa_signing_key_refused(tmp_path: Path) -> None:
    _, pem = _rsa_pem(1024, serialization.PrivateFormat.TraditionalOpenSSL)
    path = tmp_path / "weak.pem"
    path.write_bytes(pem)
    with pytest.raises(TokenError) as info:
        load_signing_key(path)
    assert info.value.reason == "bad_key" and "2048" in str(info.value)
    assert pem.decode() not in str(info.value)


# ---------------------------------------------------------------------------- startup checks


def _config(tmp_path: Path, key: bytes, token: str | None) -> ProvisionerConfig:
    kp = tmp_path / "signer.key"
    kp.write_bytes(key)
    values: dict[str, Any] = {"features": Features(ed25519=True), "jwt_signing_key": str(kp)}
    if token is not None:
        tp = tmp_path / "signer.jwt"
        tp.write_text(token)
        values["jwt_signing_token"] = str(tp)
    return ProvisionerConfig(**values)


def _seed(key: ed25519.Ed25519PrivateKey) -> bytes:
    raw = key.private_bytes(
        serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption()
    )
    return raw.hex().encode()


def test_startup_accepts_rsa_and_matching_chain(tmp_path: Path) -> None:
    _, pem = _rsa_pem(2048, serialization.PrivateFormat.TraditionalOpenSSL)
    assert isinstance(provisioner_signing_key(_config(tmp_path, pem, None)), rsa.RSAPrivateKey)
    key = provisioner_signing_key(_config(tmp_path, _seed(CHAIN), chain_issuer_token()))
    assert isinstance(key, ed25519.Ed25519PrivateKey)


@pytest.mark.parametrize(
    ("key", "token", "words"),
    [
        (lambda: _seed(NODE), lambda: chain_issuer_token(), "does not match"),
        (
            lambda: _rsa_pem(2048, serialization.PrivateFormat.TraditionalOpenSSL)[1],
            lambda: chain_issuer_token(),
            "needs an ed25519",
        ),
        (lambda: _seed(CHAIN), lambda: chain_issuer_token(tcs=None), "trust chain"),
        (lambda: _seed(CHAIN), lambda: chain_issuer_token(exp=time.time() - 5), "expired"),
    ],
)
def test_startup_refuses_unusable_chain(tmp_path: Path, key: Any, token: Any, words: str) -> None:
    with pytest.raises(ProvisionerError) as info:
        provisioner_signing_key(_config(tmp_path, key(), token()))
    assert "jwt_signing_token" in str(info.value) and words in str(info.value)

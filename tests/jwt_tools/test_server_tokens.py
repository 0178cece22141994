"""Server tokens for the ed25519 feature: claims, direct signing and chain issuance."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from jwt_tools import (
    TokenError,
    create_server_token,
    ksuid_timestamp,
    new_ksuid,
    parse_server_token_unverified,
    public_key_hex,
    verify_server_token,
)

NODE = ed25519.Ed25519PrivateKey.generate()
PROV = ed25519.Ed25519PrivateKey.generate()
ORG = ed25519.Ed25519PrivateKey.generate()


def _server(**kw: Any) -> str:
    args: dict[str, Any] = {
        "identity": "n1.example.net",
        "public_key_hex": public_key_hex(NODE),
        "collectives": ["choria", "eu"],
    }
    args.update(kw)
    return create_server_token(PROV, **args)


def test_claims_and_direct_verification() -> None:
    now = time.time()
    tok = _server(
        permissions={"submission": True, "streams": False},
        pub_subjects=["custom.reg"],
        org="acme",
        validity_s=3600,
        now=now,
    )
    assert jwt.get_unverified_header(tok)["alg"] == "EdDSA"
    c = verify_server_token(tok, PROV.public_key())
    assert c["identity"] == "n1.example.net"
    assert c["collectives"] == ["choria", "eu"]
    assert c["permissions"] == {"submission": True}  # false permissions omitted (omitempty)
    assert c["pub_subjects"] == ["custom.reg"]
    assert c["ou"] == "acme"
    assert c["purpose"] == "choria_server"
    assert c["public_key"] == public_key_hex(NODE)
    assert c["iss"] == "Choria Provisioner"
    assert c["exp"] == int(now) + 3600
    assert ksuid_timestamp(c["jti"]) == c["iat"]
    assert parse_server_token_unverified(tok)["identity"] == "n1.example.net"


def test_expires_at_wins_over_validity() -> None:
    at = time.time() + 500
    c = verify_server_token(_server(expires_at=at, validity_s=10), PROV.public_key())
    assert c["exp"] == int(at)


def test_other_key_refused() -> None:
    with pytest.raises(TokenError) as info:
        verify_server_token(_server(), ORG.public_key())
    assert info.value.reason == "bad_signature"


def test_expired_refused() -> None:
    tok = _server(now=time.time() - 7200, validity_s=3600)
    with pytest.raises(TokenError) as info:
        verify_server_token(tok, PROV.public_key())
    assert info.value.reason == "expired"


@pytest.mark.parametrize(
    "kw",
    [
        {"collectives": []},
        {"identity": ""},
        {"identity": "a b"},
        {"public_key_hex": "abcd"},
        {"permissions": {"root": True}},
        {"expires_at": 1.0},
        {"validity_s": 0},
    ],
)
def test_creation_refusals(kw: dict[str, Any]) -> None:
    with pytest.raises(TokenError) as info:
        _server(**kw)
    assert info.value.reason == "invalid_claims"


def test_small_rsa_key_refused() -> None:
    # RSA signing keys are accepted (RS256, as go-choria signs with them): see
    # tests/jwt_tools/test_chain_issuer.py; below 2048 bits they are refused.
    with pytest.raises(TokenError) as info:
        create_server_token(
            rsa.generate_private_key(public_exponent=65537, key_size=1024),
            identity="n1",
            public_key_hex=public_key_hex(NODE),
            collectives=["c"],
        )
    assert info.value.reason == "wrong_key_type"


def _chain_issuer_token(exp: int) -> str:
    """The provisioner's client JWT as the org issuer would sign it (go-choria AddOrgIssuerData)."""
    now = int(time.time())
    jti = new_ksuid(now)
    pub = public_key_hex(PROV)
    claims = {
        "purpose": "choria_client_id",
        "callerid": "provisioner_signer",
        "public_key": pub,
        "iss": "I-" + public_key_hex(ORG),
        "tcs": ORG.sign(f"{jti}.{pub}".encode()).hex(),
        "iat": now,
        "exp": exp,
        "jti": jti,
    }
    return jwt.encode(claims, ORG, algorithm="EdDSA")


def test_chain_issued_server_token_verifies_against_org_issuer() -> None:
    chain_exp = int(time.time()) + 600
    chain = _chain_issuer_token(chain_exp)
    tok = _server(chain_token=chain, validity_s=365 * 86400)
    c = verify_server_token(tok, ORG.public_key())
    assert c["iss"].startswith("C-") and c["iss"].endswith("." + public_key_hex(PROV))
    assert c["issexp"] == chain_exp
    assert c["exp"] == chain_exp  # min(own validity, issuer expiry)
    assert c["tcs"].count(".") == 1
    # the chain does not verify against any other org key
    with pytest.raises(TokenError) as info:
        verify_server_token(tok, NODE.public_key())
    assert info.value.reason == "bad_signature"


def test_chain_token_must_match_signing_key() -> None:
    with pytest.raises(TokenError) as info:
        create_server_token(
            NODE,
            identity="n1",
            public_key_hex=public_key_hex(NODE),
            collectives=["c"],
            chain_token=_chain_issuer_token(int(time.time()) + 60),
        )
    assert info.value.reason == "wrong_key_type"

"""nkeys, NATS JWTs and xkey sealing (jwt_tools.nats_jwt), cross-checked with the nkeys package."""

from __future__ import annotations

import base64
import json

import nkeys
import pytest

from jwt_tools.nats_jwt import (
    PREFIX_ACCOUNT,
    PREFIX_CURVE,
    PREFIX_SERVER,
    PREFIX_USER,
    CurveKey,
    NatsJWTError,
    NKey,
    decode_jwt,
    decode_public_key,
    encode_jwt,
    is_public_key,
    verify_nonce_signature,
    xkey_open,
    xkey_seal,
)


@pytest.mark.parametrize(("prefix", "letter"), [(PREFIX_USER, "U"), (PREFIX_ACCOUNT, "A")])
def test_generated_keys_match_the_nkeys_package(prefix: int, letter: str) -> None:
    key = NKey.generate(prefix)
    assert key.public_key.startswith(letter) and len(key.public_key) == 56
    assert key.seed.startswith("S" + letter) and len(key.seed) == 58
    kp = nkeys.from_seed(key.seed.encode())
    assert kp.public_key.decode() == key.public_key
    sig = kp.sign(b"data")
    assert NKey.from_public_key(key.public_key).verify(b"data", sig)
    assert NKey.from_seed(key.seed).public_key == key.public_key


def test_checksum_and_type_are_checked() -> None:
    pub = NKey.generate(PREFIX_USER).public_key
    flipped = pub[:10] + ("A" if pub[10] != "A" else "B") + pub[11:]
    with pytest.raises(NatsJWTError):
        decode_public_key(flipped)
    assert is_public_key(pub, PREFIX_USER)
    assert not is_public_key(pub, PREFIX_ACCOUNT)


def test_curve_keys_and_xkey_sealing() -> None:
    a, b = CurveKey.generate(), CurveKey.generate()
    assert a.public_key.startswith("X") and a.seed.startswith("SX")
    assert CurveKey.from_seed(a.seed).public_key == a.public_key
    assert decode_public_key(a.public_key)[0] == PREFIX_CURVE
    sealed = xkey_seal(a, b.public_key, b"secret request")
    assert sealed.startswith(b"xkv1") and b"secret request" not in sealed
    assert xkey_open(b, a.public_key, sealed) == b"secret request"
    with pytest.raises(NatsJWTError):
        xkey_open(CurveKey.generate(), a.public_key, sealed)
    with pytest.raises(NatsJWTError):
        xkey_open(b, a.public_key, sealed[4:])
    with pytest.raises(NatsJWTError):
        NKey.from_seed(a.seed)  # a curve seed is not a signing seed


def test_jwt_round_trip_and_tampering() -> None:
    account = NKey.generate(PREFIX_ACCOUNT)
    token = encode_jwt({"sub": "UX", "nats": {"type": "user"}}, account, now=1000)
    header = json.loads(base64.urlsafe_b64decode(token.split(".")[0] + "=="))
    assert header == {"typ": "JWT", "alg": "ed25519-nkey"}
    assert "=" not in token
    claims = decode_jwt(token)
    assert claims["iss"] == account.public_key and claims["iat"] == 1000
    assert len(claims["jti"]) == 52  # base32 of a 32-byte SHA-512/256, unpadded
    h, p, s = token.split(".")
    forged = json.loads(base64.urlsafe_b64decode(p + "=="))
    forged["sub"] = "UY"
    p2 = base64.urlsafe_b64encode(json.dumps(forged).encode()).decode().rstrip("=")
    with pytest.raises(NatsJWTError, match="signature"):
        decode_jwt(f"{h}.{p2}.{s}")
    with pytest.raises(NatsJWTError, match="key type"):
        decode_jwt(token, allowed_issuer_prefixes=[PREFIX_SERVER])


def test_jwt_times_checked() -> None:
    account = NKey.generate(PREFIX_ACCOUNT)
    with pytest.raises(NatsJWTError, match="expired"):
        decode_jwt(encode_jwt({"exp": 10}, account), now=20)
    with pytest.raises(NatsJWTError, match="not valid yet"):
        decode_jwt(encode_jwt({"nbf": 30}, account), now=20)


def test_nonce_signature_both_encodings() -> None:
    user = NKey.generate(PREFIX_USER)
    raw = user.sign(b"NONCE")
    std = base64.b64encode(raw).decode()
    url = base64.urlsafe_b64encode(raw).decode().rstrip("=")
    assert verify_nonce_signature(user.public_key, "NONCE", std)
    assert verify_nonce_signature(user.public_key, "NONCE", url)
    assert not verify_nonce_signature(user.public_key, "OTHER", std)
    account = NKey.generate(PREFIX_ACCOUNT)
    assert not verify_nonce_signature(
        account.public_key, "NONCE", base64.b64encode(account.sign(b"NONCE")).decode()
    )

"""Signed secure requests: sign with real keys, decode from the wire, verify against trust."""

from __future__ import annotations

import base64
import datetime
import json
import time
from dataclasses import replace
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from choria_core.protocol import (
    ProtocolError,
    RequestSigner,
    RequestTrust,
    SecureEnvelope,
    decode_request,
    encode_request,
    new_request,
    verify_secure_request,
)
from choria_core.protocol.signing import MAX_PUBCERT

CALLER = "choria=provisioner.choria"
_NOW = datetime.datetime.now(datetime.UTC)


def _ca(cn: str = "test CA") -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(minutes=5))
        .not_valid_after(_NOW + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _leaf(
    ca: tuple[ec.EllipticCurvePrivateKey, x509.Certificate],
    cn: str,
    public_key: Any,
    *,
    usage: list[x509.ObjectIdentifier] | None = None,
    days: float = 1,
) -> x509.Certificate:
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .issuer_name(ca[1].subject)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(_NOW - datetime.timedelta(minutes=5))
        .not_valid_after(_NOW + datetime.timedelta(days=days))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(cn)]), critical=False)
        .add_extension(
            x509.ExtendedKeyUsage(usage or [ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    )
    return b.sign(ca[0], hashes.SHA256())


def _pem(cert: x509.Certificate) -> str:
    return cert.public_bytes(serialization.Encoding.PEM).decode()


def _rsa_signer(key: rsa.RSAPrivateKey, cert: x509.Certificate, caller: str = CALLER) -> Any:
    return RequestSigner(
        sign=lambda d: key.sign(d, padding.PKCS1v15(), hashes.SHA256()),
        pubcert=_pem(cert),
        caller=caller,
    )


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _client_jwt(
    issuer: ed25519.Ed25519PrivateKey, seed: ed25519.Ed25519PrivateKey, **kw: Any
) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {
        "purpose": "choria_client_id",
        "callerid": CALLER,
        "public_key": seed.public_key().public_bytes_raw().hex(),
        "ou": "choria",
        "iss": "I-" + issuer.public_key().public_bytes_raw().hex(),
        "iat": now,
        "nbf": now,
        "exp": now + 3600,
        "permissions": {"fleet_management": True},
    }
    claims.update(kw)
    head = _b64url(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    body = _b64url(json.dumps(claims).encode())
    return f"{head}.{body}.{_b64url(issuer.sign(f'{head}.{body}'.encode()))}"


def _wire(signer: Any | None, callerid: str = CALLER) -> SecureEnvelope:
    req = new_request(
        agent="rpcutil",
        collective="provisioning",
        callerid=callerid,
        senderid="provisioner.example.net",
        payload='{"agent":"rpcutil","action":"ping","data":{}}',
    )
    data = encode_request(req, reply_to="r", mc_sender="provisioner.example.net", signer=signer)
    decoded, _ = decode_request(data)
    assert decoded.secure is not None
    return decoded.secure


@pytest.fixture(scope="module")
def pki() -> dict[str, Any]:
    ca = _ca()
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return {
        "ca": ca,
        "rsa_key": rsa_key,
        "rsa_cert": _leaf(ca, "provisioner.choria", rsa_key.public_key()),
        "trust": RequestTrust.build(ca_pem=_pem(ca[1]).encode()),
    }


def _refused(env: SecureEnvelope, trust: RequestTrust, match: str, caller: str = CALLER) -> None:
    with pytest.raises(ProtocolError, match=match):
        verify_secure_request(env, caller, trust)


# --------------------------------------------------------------------------- x509


def test_x509_rsa_round_trip_and_wire_fields(pki: dict[str, Any]) -> None:
    env = _wire(_rsa_signer(pki["rsa_key"], pki["rsa_cert"]))
    assert env.pubcert == _pem(pki["rsa_cert"])
    # go-choria: base64 of RSA PKCS#1 v1.5 over SHA-256 of the request JSON text.
    pki["rsa_cert"].public_key().verify(
        base64.b64decode(env.signature), env.message.encode(), padding.PKCS1v15(), hashes.SHA256()
    )
    assert verify_secure_request(env, CALLER, pki["trust"]) == CALLER


def test_x509_ec_signer_round_trip(pki: dict[str, Any]) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    cert = _leaf(pki["ca"], "provisioner.choria", key.public_key())
    signer = RequestSigner(
        sign=lambda d: key.sign(d, ec.ECDSA(hashes.SHA256())), pubcert=_pem(cert), caller=CALLER
    )
    assert verify_secure_request(_wire(signer), CALLER, pki["trust"]) == CALLER


def test_unsigned_request_refused(pki: dict[str, Any]) -> None:
    env = _wire(None)
    assert (env.signature, env.pubcert) == ("insecure", "insecure")
    _refused(env, pki["trust"], "unsigned")


def test_tampered_body_refused(pki: dict[str, Any]) -> None:
    env = _wire(_rsa_signer(pki["rsa_key"], pki["rsa_cert"]))
    tampered = replace(env, message=env.message.replace('"ttl":60', '"ttl":61'))
    assert tampered.message != env.message
    _refused(tampered, pki["trust"], "does not match the request")


def test_wrong_key_refused(pki: dict[str, Any]) -> None:
    other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    _refused(_wire(_rsa_signer(other, pki["rsa_cert"])), pki["trust"], "does not match")


def test_wrong_caller_refused(pki: dict[str, Any]) -> None:
    caller = "choria=someone.choria"
    env = _wire(_rsa_signer(pki["rsa_key"], pki["rsa_cert"], caller), callerid=caller)
    _refused(env, pki["trust"], "not for caller", caller)


def test_certificate_of_another_ca_refused(pki: dict[str, Any]) -> None:
    rogue = _leaf(_ca("rogue CA"), "provisioner.choria", pki["rsa_key"].public_key())
    _refused(_wire(_rsa_signer(pki["rsa_key"], rogue)), pki["trust"], "does not chain")


def test_not_on_allow_list_refused_and_privileged_may_sign_for_others(
    pki: dict[str, Any],
) -> None:
    key = pki["rsa_key"]
    plain = _leaf(pki["ca"], "provisioner.example.net", key.public_key())
    caller = "choria=provisioner.example.net"
    env = _wire(_rsa_signer(key, plain, caller), callerid=caller)
    _refused(env, pki["trust"], "allow list", caller)
    privileged = _leaf(pki["ca"], "admin.privileged.choria", key.public_key())
    env = _wire(_rsa_signer(key, privileged, caller), callerid=caller)
    assert verify_secure_request(env, caller, pki["trust"]) == caller


def test_server_only_certificate_refused(pki: dict[str, Any]) -> None:
    cert = _leaf(
        pki["ca"],
        "provisioner.choria",
        pki["rsa_key"].public_key(),
        usage=[ExtendedKeyUsageOID.SERVER_AUTH],
    )
    _refused(_wire(_rsa_signer(pki["rsa_key"], cert)), pki["trust"], "client authentication")


def test_expired_certificate_refused(pki: dict[str, Any]) -> None:
    cert = _leaf(pki["ca"], "provisioner.choria", pki["rsa_key"].public_key(), days=-0.001)
    _refused(_wire(_rsa_signer(pki["rsa_key"], cert)), pki["trust"], "not valid now")


def test_no_ca_refuses_x509_signers(pki: dict[str, Any]) -> None:
    env = _wire(_rsa_signer(pki["rsa_key"], pki["rsa_cert"]))
    _refused(env, RequestTrust.build(), "no CA")


# --------------------------------------------------------------------------- hostile input


@pytest.mark.parametrize(
    "pubcert",
    [
        "x" * (MAX_PUBCERT + 1),
        "-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n",
        "-----BEGIN" + "A" * 100,
        "a.b.c",
        "e30.e30.e30",
        "\u202e.\x00.\n",
        "just garbage",
    ],
)
def test_oversize_or_garbage_pubcert_is_a_protocol_error(pki: dict[str, Any], pubcert: str) -> None:
    env = _wire(_rsa_signer(pki["rsa_key"], pki["rsa_cert"]))
    trust = RequestTrust.build(
        ca_pem=_pem(pki["ca"][1]).encode(),
        jwt_issuers={
            "choria": ed25519.Ed25519PrivateKey.generate().public_key().public_bytes_raw().hex()
        },
    )
    with pytest.raises(ProtocolError):
        verify_secure_request(replace(env, pubcert=pubcert), CALLER, trust)


@pytest.mark.parametrize("signature", ["%%%", "A" * 5000, ""])
def test_garbage_signature_is_a_protocol_error(pki: dict[str, Any], signature: str) -> None:
    env = _wire(_rsa_signer(pki["rsa_key"], pki["rsa_cert"]))
    with pytest.raises(ProtocolError):
        verify_secure_request(replace(env, signature=signature), CALLER, pki["trust"])


# --------------------------------------------------------------------------- JWT


@pytest.fixture(scope="module")
def jwt_pki() -> dict[str, Any]:
    issuer = ed25519.Ed25519PrivateKey.generate()
    seed = ed25519.Ed25519PrivateKey.generate()
    trust = RequestTrust.build(jwt_issuers={"choria": issuer.public_key().public_bytes_raw().hex()})
    return {"issuer": issuer, "seed": seed, "trust": trust}


def _jwt_signer(seed: ed25519.Ed25519PrivateKey, token: str, caller: str = CALLER) -> Any:
    return RequestSigner(sign=seed.sign, pubcert=token, caller=caller)


def test_jwt_round_trip(jwt_pki: dict[str, Any]) -> None:
    token = _client_jwt(jwt_pki["issuer"], jwt_pki["seed"])
    env = _wire(_jwt_signer(jwt_pki["seed"], token))
    assert env.pubcert == token
    jwt_pki["seed"].public_key().verify(base64.b64decode(env.signature), env.message.encode())
    assert verify_secure_request(env, CALLER, jwt_pki["trust"]) == CALLER


def test_jwt_provisioner_permission_accepted(jwt_pki: dict[str, Any]) -> None:
    token = _client_jwt(jwt_pki["issuer"], jwt_pki["seed"], permissions={"provisioner": True})
    assert verify_secure_request(
        _wire(_jwt_signer(jwt_pki["seed"], token)), CALLER, jwt_pki["trust"]
    )


def test_jwt_tampered_body_refused(jwt_pki: dict[str, Any]) -> None:
    env = _wire(_jwt_signer(jwt_pki["seed"], _client_jwt(jwt_pki["issuer"], jwt_pki["seed"])))
    tampered = replace(env, message=env.message.replace("ping", "pong"))
    _refused(tampered, jwt_pki["trust"], "does not match the request")


def test_jwt_wrong_seed_refused(jwt_pki: dict[str, Any]) -> None:
    token = _client_jwt(jwt_pki["issuer"], jwt_pki["seed"])
    other = ed25519.Ed25519PrivateKey.generate()
    _refused(_wire(_jwt_signer(other, token)), jwt_pki["trust"], "does not match")


def test_jwt_wrong_caller_refused(jwt_pki: dict[str, Any]) -> None:
    token = _client_jwt(jwt_pki["issuer"], jwt_pki["seed"])
    caller = "choria=other.choria"
    env = _wire(_jwt_signer(jwt_pki["seed"], token, caller), callerid=caller)
    _refused(env, jwt_pki["trust"], "not for caller", caller)


@pytest.mark.parametrize(
    ("claims", "match"),
    [
        ({"exp": int(time.time()) - 10}, "expired"),
        ({"nbf": int(time.time()) + 600}, "not valid yet"),
        ({"ou": "elsewhere"}, "no trusted issuer"),
        ({"purpose": "choria_provisioning"}, "not a client id"),
        ({"permissions": {}}, "neither fleet_management"),
        (
            {"permissions": {"fleet_management": True, "signed_fleet_management": True}},
            "delegation",
        ),
        ({"public_key": "zz"}, "public_key"),
    ],
)
def test_jwt_claims_refused(jwt_pki: dict[str, Any], claims: dict[str, Any], match: str) -> None:
    token = _client_jwt(jwt_pki["issuer"], jwt_pki["seed"], **claims)
    _refused(_wire(_jwt_signer(jwt_pki["seed"], token)), jwt_pki["trust"], match)


def test_jwt_not_signed_by_the_issuer_refused(jwt_pki: dict[str, Any]) -> None:
    rogue = ed25519.Ed25519PrivateKey.generate()
    token = _client_jwt(rogue, jwt_pki["seed"])
    _refused(_wire(_jwt_signer(jwt_pki["seed"], token)), jwt_pki["trust"], "not signed by")


def test_jwt_refused_when_no_issuer_trusted(jwt_pki: dict[str, Any], pki: dict[str, Any]) -> None:
    token = _client_jwt(jwt_pki["issuer"], jwt_pki["seed"])
    _refused(_wire(_jwt_signer(jwt_pki["seed"], token)), pki["trust"], "trusts no JWT issuer")

"""X25519 key agreement and private-key transport between the provisioner and a node.

The node announces a fresh X25519 public key in its ``jwt`` reply; the provisioner
answers ``configure`` with its own public key and the node's private key encrypted with the
shared secret. Two encodings are supported:

* **legacy**: Go's ``x509.EncryptPEMBlock`` (OpenSSL ``EVP_BytesToKey`` with MD5, one
  iteration, AES-CBC, PKCS#7 padding, ``Proc-Type``/``DEK-Info`` headers). This is what a real
  go-choria node understands. It is unauthenticated, so a wrong secret is detected only by the
  padding and by the DER failing to parse.
* **AEAD** (our extension, announced by the node with ``"ecdh_aead": true``): HKDF-SHA256 over
  the X25519 secret and AES-256-GCM, sent as a small JSON envelope
  ``{"alg":"x25519-hkdf-sha256-aes256gcm","nonce":b64,"ct":b64}``.

The provisioner imports :func:`encrypt_private_key`; the node uses :func:`decrypt_private_key`.
Unlike go-choria, which labels every decrypted key ``RSA PRIVATE KEY``, the decrypted key keeps
its original PEM type (RSA, EC, PKCS#8).
No function here logs or puts key material or secrets into exception messages.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import os
import re
import secrets
import textwrap
from collections.abc import Sequence

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, padding, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from choria_core.errors import FleetError

__all__ = [
    "AEAD_ALG",
    "DEFAULT_INFO",
    "ECDHError",
    "aead_decrypt",
    "aead_encrypt",
    "decrypt_legacy_pem",
    "decrypt_private_key",
    "encrypt_legacy_pem",
    "encrypt_private_key",
    "generate_keypair",
    "is_aead_envelope",
    "is_legacy_encrypted",
    "private_key_pem_from_der",
    "public_hex",
    "shared_secret",
]

AEAD_ALG = "x25519-hkdf-sha256-aes256gcm"
DEFAULT_INFO = b"choria-provisioning private key v1"

_LEGACY_CIPHERS = {"AES-128-CBC": 16, "AES-192-CBC": 24, "AES-256-CBC": 32}
_PEM_RE = re.compile(
    r"-----BEGIN (?P<label>[A-Z0-9 ]+)-----\r?\n(?P<body>.*?)-----END (?P=label)-----",
    re.DOTALL,
)


class ECDHError(FleetError, ValueError, reason="ecdh"):
    """Key agreement or key (de)cryption failed; the message never contains key material."""


# --- X25519 -------------------------------------------------------------------------------


def generate_keypair() -> tuple[X25519PrivateKey, str]:
    """A fresh X25519 key pair: (private key, lowercase hex of the 32-byte public key)."""
    private = X25519PrivateKey.generate()
    return private, public_hex(private)


def public_hex(private: X25519PrivateKey) -> str:
    """Lowercase hex of the raw public key, the form used in ``ecdh_public``."""
    raw = private.public_key().public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )
    return raw.hex()


def shared_secret(private: X25519PrivateKey, peer_public_hex: str) -> bytes:
    """The 32-byte X25519 secret with a peer given as 64 hex characters.

    Raises ECDHError for malformed input and for low-order points (all-zero secret).
    """
    if not isinstance(peer_public_hex, str) or len(peer_public_hex) != 64:
        raise ECDHError("ECDH public key must be 64 hex characters")
    try:
        raw = bytes.fromhex(peer_public_hex)
    except ValueError as exc:
        raise ECDHError("ECDH public key is not valid hex") from exc
    try:
        return private.exchange(X25519PublicKey.from_public_bytes(raw))
    except ValueError as exc:
        raise ECDHError("ECDH key agreement failed (invalid or low-order public key)") from exc


# --- legacy PEM encryption (x509.EncryptPEMBlock) --------------------------------------------


def _evp_bytes_to_key(password: bytes, salt: bytes, key_len: int) -> bytes:
    """OpenSSL EVP_BytesToKey with MD5 and one iteration, as Go's x509 package does."""
    out = b""
    prev = b""
    while len(out) < key_len:
        prev = hashlib.md5(prev + password + salt, usedforsecurity=False).digest()
        out += prev
    return out[:key_len]


def _pem_wrap(label: str, der: bytes, headers: Sequence[tuple[str, str]] = ()) -> str:
    body = "\n".join(textwrap.wrap(base64.b64encode(der).decode("ascii"), 64))
    head = "".join(f"{k}: {v}\n" for k, v in headers)
    if head:
        head += "\n"
    return f"-----BEGIN {label}-----\n{head}{body}\n-----END {label}-----\n"


def encrypt_legacy_pem(der: bytes, secret: bytes, *, label: str = "RSA PRIVATE KEY") -> str:
    """Encrypt DER like Go's ``x509.EncryptPEMBlock(rand, label, der, secret, PEMCipherAES256)``."""
    iv = os.urandom(16)
    key = _evp_bytes_to_key(secret, iv[:8], 32)
    padder = padding.PKCS7(128).padder()
    data = padder.update(der) + padder.finalize()
    enc = Cipher(algorithms.AES(key), modes.CBC(iv)).encryptor()
    ct = enc.update(data) + enc.finalize()
    headers = [("Proc-Type", "4,ENCRYPTED"), ("DEK-Info", f"AES-256-CBC,{iv.hex()}")]
    return _pem_wrap(label, ct, headers)


def _parse_pem(pem: str) -> tuple[str, dict[str, str], bytes]:
    match = _PEM_RE.search(pem)
    if match is None:
        raise ECDHError("key is not a PEM block")
    body = match.group("body").replace("\r\n", "\n")
    headers: dict[str, str] = {}
    lines = body.split("\n")
    idx = 0
    if lines and ":" in lines[0]:
        while idx < len(lines) and lines[idx].strip():
            name, _, value = lines[idx].partition(":")
            headers[name.strip()] = value.strip()
            idx += 1
    b64 = "".join(line.strip() for line in lines[idx:])
    try:
        der = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise ECDHError("key PEM body is not valid base64") from exc
    return match.group("label"), headers, der


def is_legacy_encrypted(text: str) -> bool:
    """True if ``text`` is a PEM block with ``Proc-Type: 4,ENCRYPTED``."""
    return "-----BEGIN " in text and "Proc-Type: 4,ENCRYPTED" in text


def decrypt_legacy_pem(pem: str, secret: bytes) -> bytes:
    """Decrypt a legacy encrypted PEM block (Go/OpenSSL format) and return the DER.

    The padding is checked strictly and the result must parse as a private key, which is how a
    wrong secret is detected (the format has no authentication tag).
    """
    _label, headers, ct = _parse_pem(pem)
    if headers.get("Proc-Type") != "4,ENCRYPTED":
        raise ECDHError("key is not encrypted")
    cipher_name, _, iv_hex = headers.get("DEK-Info", "").partition(",")
    key_len = _LEGACY_CIPHERS.get(cipher_name.strip().upper())
    if key_len is None:
        raise ECDHError("unsupported PEM encryption (need AES-128/192/256-CBC)")
    try:
        iv = bytes.fromhex(iv_hex.strip())
    except ValueError as exc:
        raise ECDHError("DEK-Info IV is not valid hex") from exc
    if len(iv) != 16 or not ct or len(ct) % 16:
        raise ECDHError("malformed encrypted PEM block")
    key = _evp_bytes_to_key(secret, iv[:8], key_len)
    dec = Cipher(algorithms.AES(key), modes.CBC(iv)).decryptor()
    data = dec.update(ct) + dec.finalize()
    pad = data[-1]
    if pad < 1 or pad > 16 or data[-pad:] != bytes([pad]) * pad:
        raise ECDHError("could not decrypt private key (wrong ECDH secret?)")
    der = data[:-pad]
    _load_der(der)
    return der


# --- AEAD ---------------------------------------------------------------------------------


def _aead_key(secret: bytes, info: bytes) -> bytes:
    if len(secret) != 32:
        raise ECDHError("ECDH secret must be 32 bytes")
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=info).derive(secret)


def aead_encrypt(plaintext: bytes, secret: bytes, *, info: bytes = DEFAULT_INFO) -> str:
    """Encrypt with AES-256-GCM under HKDF-SHA256(secret, info); returns the JSON envelope."""
    nonce = secrets.token_bytes(12)
    ct = AESGCM(_aead_key(secret, info)).encrypt(nonce, plaintext, AEAD_ALG.encode())
    return json.dumps(
        {
            "alg": AEAD_ALG,
            "nonce": base64.b64encode(nonce).decode("ascii"),
            "ct": base64.b64encode(ct).decode("ascii"),
        },
        separators=(",", ":"),
    )


def is_aead_envelope(text: str) -> bool:
    """True if ``text`` looks like our AEAD JSON envelope (not necessarily valid)."""
    return text.lstrip().startswith("{") and AEAD_ALG in text


def aead_decrypt(envelope: str, secret: bytes, *, info: bytes = DEFAULT_INFO) -> bytes:
    """Open an envelope made by :func:`aead_encrypt`; any tampering raises ECDHError."""
    try:
        obj = json.loads(envelope)
    except (ValueError, TypeError) as exc:
        raise ECDHError("AEAD envelope is not valid JSON") from exc
    if not isinstance(obj, dict) or obj.get("alg") != AEAD_ALG:
        raise ECDHError(f"AEAD envelope must have alg {AEAD_ALG!r}")
    try:
        nonce = base64.b64decode(str(obj["nonce"]), validate=True)
        ct = base64.b64decode(str(obj["ct"]), validate=True)
    except (KeyError, binascii.Error, ValueError) as exc:
        raise ECDHError("AEAD envelope needs base64 'nonce' and 'ct'") from exc
    if len(nonce) != 12:
        raise ECDHError("AEAD nonce must be 12 bytes")
    try:
        return AESGCM(_aead_key(secret, info)).decrypt(nonce, ct, AEAD_ALG.encode())
    except InvalidTag as exc:
        raise ECDHError("AEAD authentication failed: ciphertext tampered or wrong secret") from exc


# --- private keys -------------------------------------------------------------------------


def _load_der(der: bytes) -> object:
    try:
        return serialization.load_der_private_key(der, password=None)
    except (ValueError, TypeError) as exc:
        raise ECDHError("decrypted data is not a private key (wrong ECDH secret?)") from exc


def private_key_pem_from_der(der: bytes) -> bytes:
    """PEM for a private key DER, labelled after what the DER really is.

    PKCS#1 → ``RSA PRIVATE KEY``, SEC1 → ``EC PRIVATE KEY``, anything else → ``PRIVATE KEY``
    (PKCS#8). The DER bytes are kept as they are.
    """
    key = _load_der(der)
    label = "PRIVATE KEY"
    if isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        trad = key.private_bytes(
            serialization.Encoding.DER,
            serialization.PrivateFormat.TraditionalOpenSSL,
            serialization.NoEncryption(),
        )
        if trad == der:
            label = "RSA PRIVATE KEY" if isinstance(key, rsa.RSAPrivateKey) else "EC PRIVATE KEY"
    return _pem_wrap(label, der).encode("ascii")


def encrypt_private_key(
    key_pem: str | bytes, node_public_hex: str, *, aead: bool = False
) -> tuple[str, str]:
    """Provisioner side: encrypt a private key for a node.

    Returns ``(encrypted_key, provisioner_ecdh_public_hex)`` for the ``configure`` fields
    ``key`` and ``ecdh_public``. With ``aead=False`` the legacy format a go-choria node
    understands is produced (keeping the key's PEM label); with ``aead=True`` the PEM text is
    sealed in the AEAD envelope (only for nodes whose ``jwt`` reply had ``ecdh_aead: true``).
    """
    text = key_pem.decode("ascii") if isinstance(key_pem, bytes) else key_pem
    label, headers, der = _parse_pem(text)
    if headers:
        raise ECDHError("the private key to send must not itself be encrypted")
    _load_der(der)
    private, our_public = generate_keypair()
    secret = shared_secret(private, node_public_hex)
    if aead:
        return aead_encrypt(_pem_wrap(label, der).encode("ascii"), secret), our_public
    return encrypt_legacy_pem(der, secret, label=label), our_public


def decrypt_private_key(text: str, secret: bytes) -> bytes:
    """Node side: decrypt a ``configure`` key in either format; returns the key as PEM bytes."""
    if is_legacy_encrypted(text):
        return private_key_pem_from_der(decrypt_legacy_pem(text, secret))
    if is_aead_envelope(text):
        plain = aead_decrypt(text, secret)
        try:
            pem_text = plain.decode("ascii")
        except UnicodeDecodeError:
            return private_key_pem_from_der(plain)
        label, headers, der = _parse_pem(pem_text)
        if headers:
            raise ECDHError("decrypted key must not be encrypted again")
        _load_der(der)
        return _pem_wrap(label, der).encode("ascii")
    raise ECDHError("key is not encrypted")

"""Key material for Choria tokens: load signing/verification keys, generate key pairs.

File formats follow go-choria's ``tokens`` package so keys are interchangeable with the
``choria jwt`` tools:

* signing keys: an RSA private key PEM (``RSA PRIVATE KEY`` or ``PRIVATE KEY``) or a file holding
  exactly 64 hex characters, the ed25519 *seed*;
* verification keys: an X.509 certificate PEM, a public key PEM, or 64 hex characters of an
  ed25519 public key (in a file or inline). Unlike Go we tolerate surrounding whitespace such as
  a trailing newline, which editors add and which made Go fail in confusing ways.
"""

from __future__ import annotations

import binascii
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

from choria_core.securefile import write_atomic
from jwt_tools.tokens import TokenError

__all__ = [
    "KeyFileError",
    "SigningKey",
    "VerifyKey",
    "generate_keypair",
    "load_signing_key",
    "load_verify_key",
    "load_verify_keys",
    "public_key_hex",
    "write_private_file",
    "write_public_file",
]

SigningKey = rsa.RSAPrivateKey | ed25519.Ed25519PrivateKey
VerifyKey = rsa.RSAPublicKey | ed25519.Ed25519PublicKey

_HEX64 = re.compile(r"[0-9a-fA-F]{64}")
_MIN_RSA_BITS = 2048
#: At most this many keys from one directory, and no key file larger than this.
MAX_DIR_KEYS = 64
MAX_KEY_FILE = 64 * 1024


class KeyFileError(TokenError):
    """A key file is missing, unreadable or not in a supported format (reason ``bad_key``).

    The message names the file but never includes its contents.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message, reason="bad_key")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{what} file {path} does not exist") from None
    except OSError as exc:
        raise KeyFileError(f"{what} file {path} could not be read: {exc.strerror}") from None


def load_signing_key(path: str | Path) -> SigningKey:
    """Load a signing key: RSA private key PEM, or a file of 64 hex chars (ed25519 seed)."""
    p = Path(path)
    data = _read(p, "signing key")
    stripped = data.strip()
    if stripped.startswith(b"-----BEGIN"):
        if b"ENCRYPTED" in stripped.split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in stripped:
            raise KeyFileError(f"signing key {p} is encrypted; an unencrypted key is required")
        try:
            key = serialization.load_pem_private_key(stripped, password=None)
        except (ValueError, TypeError):
            raise KeyFileError(f"signing key {p} is not a valid private key PEM") from None
        if isinstance(key, rsa.RSAPrivateKey):
            if key.key_size < _MIN_RSA_BITS:
                raise KeyFileError(
                    f"signing key {p} is a {key.key_size}-bit RSA key; at least 2048 bits needed"
                )
            return key
        if isinstance(key, ed25519.Ed25519PrivateKey):
            return key
        raise KeyFileError(
            f"signing key {p} holds a {type(key).__name__}; only RSA or ed25519 keys are supported"
        )
    text = stripped.decode("ascii", errors="replace")
    if _HEX64.fullmatch(text):
        return ed25519.Ed25519PrivateKey.from_private_bytes(binascii.unhexlify(text))
    raise KeyFileError(
        f"signing key {p} is neither an RSA private key PEM nor 64 hex characters of an "
        "ed25519 seed"
    )


def _verify_key_from_bytes(data: bytes, origin: str) -> VerifyKey:
    stripped = data.strip()
    pub: object
    if stripped.startswith(b"-----BEGIN CERTIFICATE"):
        try:
            pub = x509.load_pem_x509_certificate(stripped).public_key()
        except ValueError:
            raise KeyFileError(f"{origin} is not a valid certificate PEM") from None
    elif stripped.startswith(b"-----BEGIN") and b"PRIVATE KEY" in stripped.split(b"\n", 1)[0]:
        raise KeyFileError(
            f"{origin} holds a private key; verification needs the certificate or public key"
        )
    elif stripped.startswith(b"-----BEGIN"):
        try:
            pub = serialization.load_pem_public_key(stripped)
        except ValueError:
            raise KeyFileError(f"{origin} is not a valid public key PEM") from None
    else:
        text = stripped.decode("ascii", errors="replace")
        if not _HEX64.fullmatch(text):
            raise KeyFileError(
                f"{origin} is neither a certificate/public key PEM nor 64 hex characters of an "
                "ed25519 public key"
            )
        return ed25519.Ed25519PublicKey.from_public_bytes(binascii.unhexlify(text))
    if isinstance(pub, rsa.RSAPublicKey | ed25519.Ed25519PublicKey):
        return pub
    raise KeyFileError(
        f"{origin} holds a {type(pub).__name__}; only RSA or ed25519 keys are supported"
    )


def load_verify_key(source: str | Path) -> VerifyKey:
    """Load a verification key from a file or inline text.

    ``source`` may be a path to a certificate PEM, public key PEM or hex file, or the key
    itself inline (64 hex characters, or PEM text) as ``jwt_verify_cert`` allows.
    """
    if isinstance(source, Path):
        return _verify_key_from_bytes(
            _read(source, "verification key"), f"verification key {source}"
        )
    text = source.strip()
    if _HEX64.fullmatch(text):
        return _verify_key_from_bytes(text.encode(), "inline verification key")
    if text.startswith("-----BEGIN"):
        return _verify_key_from_bytes(text.encode(), "inline verification key")
    return _verify_key_from_bytes(
        _read(Path(source), "verification key"), f"verification key {source}"
    )


def _dir_key_files(directory: Path) -> list[Path]:
    """The key files of a directory: every regular, non-hidden file, in name order."""
    try:
        entries = sorted(directory.iterdir())
    except OSError as exc:
        raise KeyFileError(
            f"verification key directory {directory} could not be read: {exc.strerror}"
        ) from None
    files = [p for p in entries if not p.name.startswith(".") and p.is_file()]
    if not files:
        raise KeyFileError(f"verification key directory {directory} holds no key files")
    if len(files) > MAX_DIR_KEYS:
        raise KeyFileError(
            f"verification key directory {directory} holds {len(files)} files; at most "
            f"{MAX_DIR_KEYS} keys are allowed"
        )
    return files


def load_verify_keys(sources: str | Path | Sequence[str | Path]) -> list[VerifyKey]:
    """Load every verification key of ``sources``, for signer rotation without downtime.

    Each source is what :func:`load_verify_key` takes (a file, or a key inline) or a
    directory, whose regular non-hidden files are each one key (in name order; a file that
    is not a key is an error, not skipped, so a typo cannot silently drop a signer). A token
    verifies when any key matches. Duplicate keys are loaded once.
    """
    items = [sources] if isinstance(sources, str | Path) else list(sources)
    keys: list[VerifyKey] = []
    seen: set[bytes] = set()
    for source in items:
        path = Path(source) if isinstance(source, Path) else None
        if path is None and isinstance(source, str):
            text = source.strip()
            if not (_HEX64.fullmatch(text) or text.startswith("-----BEGIN")):
                path = Path(text)
        if path is not None and path.is_dir():
            loaded = [_load_key_file(f) for f in _dir_key_files(path)]
        else:
            loaded = [load_verify_key(source)]
        for key in loaded:
            der = key.public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            if der not in seen:
                seen.add(der)
                keys.append(key)
    if not keys:
        raise KeyFileError("no verification keys were given")
    return keys


def _load_key_file(path: Path) -> VerifyKey:
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise KeyFileError(
            f"verification key file {path} could not be read: {exc.strerror}"
        ) from None
    if size > MAX_KEY_FILE:
        raise KeyFileError(f"verification key file {path} is larger than {MAX_KEY_FILE} bytes")
    return load_verify_key(path)


def public_key_hex(key: ed25519.Ed25519PrivateKey | ed25519.Ed25519PublicKey) -> str:
    """Hex of the raw 32-byte ed25519 public key (the form Choria puts in tokens and configs)."""
    pub = key.public_key() if isinstance(key, ed25519.Ed25519PrivateKey) else key
    return pub.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw).hex()


def generate_keypair(
    kind: Literal["rsa", "ed25519"], *, rsa_bits: int = 2048
) -> tuple[bytes, bytes]:
    """Generate a key pair; return ``(private file bytes, public file bytes)``.

    RSA: ``RSA PRIVATE KEY`` PEM (PKCS#1, as ``openssl genrsa`` and Choria use) and a
    ``PUBLIC KEY`` PEM. ed25519: the 64-hex seed and the 64-hex public key, without a trailing
    newline so Go's ``hex.DecodeString`` of the whole file accepts them.
    """
    if kind == "rsa":
        if rsa_bits < _MIN_RSA_BITS:
            raise ValueError("RSA keys must be at least 2048 bits")
        priv = rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
        return (
            priv.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.TraditionalOpenSSL,
                serialization.NoEncryption(),
            ),
            priv.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            ),
        )
    if kind == "ed25519":
        ed = ed25519.Ed25519PrivateKey.generate()
        seed = ed.private_bytes(
            serialization.Encoding.Raw,
            serialization.PrivateFormat.Raw,
            serialization.NoEncryption(),
        )
        return seed.hex().encode(), public_key_hex(ed).encode()
    raise ValueError(f"unknown key type {kind!r}; use 'rsa' or 'ed25519'")


def _atomic_write(path: str | Path, data: bytes, mode: int) -> Path:
    # a missing parent is created private: it is about to hold a key or a token
    return write_atomic(path, data, mode, durable=True, make_parents=0o700)


def write_private_file(path: str | Path, data: bytes) -> Path:
    """Write a secret (key, token) atomically with mode 0600."""
    return _atomic_write(path, data, 0o600)


def write_public_file(path: str | Path, data: bytes) -> Path:
    """Write public material atomically with mode 0644."""
    return _atomic_write(path, data, 0o644)

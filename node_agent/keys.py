"""Node key pairs, CSRs and a pre-generated key pool for big simulated fleets.

go-choria's ``gencsr`` makes an RSA-2048 key (PKCS#1 ``RSA PRIVATE KEY``) and a SHA-256 CSR
(spec §7.4). We do the same by default, can make EC P-256 keys instead (much faster, useful for
simulated fleets), honour ``ST`` (go-choria ignores it) and return ``public_key`` as a real
SubjectPublicKeyInfo PEM (go-choria mislabels PKCS#1 as ``PUBLIC KEY``, spec §16.9).

RSA generation costs ~50-200 ms of CPU per key; :class:`KeyPool` generates keys ahead of time in
a process pool and caches them on disk, one file per key, so a 10,000-node simulation does not
spend minutes in ``gencsr``. Pooled keys are reused across runs: only for simulation.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import os
import re
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

__all__ = [
    "CSRFieldError",
    "CSRResult",
    "KeyPool",
    "KeyType",
    "PrivateKey",
    "build_csr",
    "generate_private_key",
    "load_private_key",
    "private_key_pem",
    "public_key_pem",
    "validate_csr_fields",
]

log = logging.getLogger(__name__)

KeyType = Literal["rsa", "ec"]
PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey

# DDL validation of the gencsr inputs (spec §7.4); go-choria documents but never enforces it.
_HOSTNAME_RE = re.compile(
    r"^(([a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9\-]*[a-zA-Z0-9])\.)*"
    r"([A-Za-z0-9]|[A-Za-z0-9][A-Za-z0-9\-]*[A-Za-z0-9])\Z"
)
_COUNTRY_RE = re.compile(r"^[A-Z]{2}\Z")
_NAME_PART_RE = re.compile(r"^[\w\s-]+\Z")


class CSRFieldError(ValueError):
    """A ``gencsr`` subject field failed validation; the message names the field."""


def generate_private_key(key_type: KeyType = "rsa") -> PrivateKey:
    """RSA-2048 (go-choria compatible, the default) or EC P-256."""
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if key_type == "ec":
        return ec.generate_private_key(ec.SECP256R1())
    raise ValueError(f"unknown key type {key_type!r}: use 'rsa' or 'ec'")


def private_key_pem(key: PrivateKey) -> bytes:
    """Traditional PEM: ``RSA PRIVATE KEY`` (PKCS#1, as go-choria writes) or ``EC PRIVATE KEY``."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


def load_private_key(pem: bytes) -> PrivateKey:
    """Load an unencrypted RSA or EC private key PEM."""
    key = serialization.load_pem_private_key(pem, password=None)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError("only RSA and EC private keys are supported")
    return key


def public_key_pem(key: PrivateKey) -> str:
    """SubjectPublicKeyInfo PEM (``PUBLIC KEY``) of the key's public half."""
    return (
        key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def validate_csr_fields(cn: str, fields: Mapping[str, str]) -> None:
    """Enforce the ``choria_provision`` DDL rules on the CSR subject (spec §7.4)."""
    if not cn or len(cn) > 80 or not _HOSTNAME_RE.match(cn):
        raise CSRFieldError("Invalid CSR field cn: must be a host name of at most 80 characters")
    for name, value in fields.items():
        if not value:
            continue
        if name == "C":
            if not _COUNTRY_RE.match(value):
                raise CSRFieldError("Invalid CSR field C: must be two upper case letters")
        elif len(value) > 50 or not _NAME_PART_RE.match(value):
            raise CSRFieldError(
                f"Invalid CSR field {name}: must be letters, digits, spaces, '_' or '-', "
                "at most 50 characters"
            )


@dataclass(frozen=True, slots=True)
class CSRResult:
    """What ``gencsr`` produces."""

    key_pem: bytes
    csr_pem: str
    public_key_pem: str


_SUBJECT_OIDS = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
}


def build_csr(key: PrivateKey, cn: str, fields: Mapping[str, str] | None = None) -> CSRResult:
    """A SHA-256 CSR with subject CN (+ C, ST, L, O, OU when given) signed by ``key``."""
    fields = dict(fields or {})
    validate_csr_fields(cn, fields)
    attrs = [
        x509.NameAttribute(_SUBJECT_OIDS[name], fields[name])
        for name in ("C", "ST", "L", "O", "OU")
        if fields.get(name)
    ]
    attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name(attrs))
        .sign(key, hashes.SHA256())
    )
    return CSRResult(
        key_pem=private_key_pem(key),
        csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode("ascii"),
        public_key_pem=public_key_pem(key),
    )


def _generate_pem(key_type: KeyType) -> bytes:
    """Process-pool worker: one new key as PEM."""
    return private_key_pem(generate_private_key(key_type))


def _write_private(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        os.fchmod(fd, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class KeyPool:
    """Pre-generated private keys cached on disk (``<directory>/<key_type>/<n>.pem``, 0600).

    ``ensure(n, start=s)`` makes keys ``s..s+n-1`` using a process pool (all cores); ``take()``
    hands out the next key, starting at ``offset`` (so P worker processes can share one pool
    directory without reusing keys). When the pool runs dry a fresh key is generated in a
    thread. Trade-off: start-up of big fleets drops from minutes to seconds, but the same keys
    are reused every run and sit on disk, so this is for simulations only.
    """

    def __init__(self, directory: Path, key_type: KeyType = "rsa", *, offset: int = 0) -> None:
        self.key_type: KeyType = key_type
        self.directory = Path(directory) / key_type
        self._next = offset
        self.generated_on_demand = 0

    def _path(self, index: int) -> Path:
        return self.directory / f"{index:07d}.pem"

    def available(self) -> int:
        """Number of consecutive cached keys starting at index 0."""
        n = 0
        while self._path(n).exists():
            n += 1
        return n

    def ensure(self, count: int, *, start: int = 0, workers: int | None = None) -> int:
        """Make sure keys ``start .. start+count-1`` exist on disk; returns how many were made."""
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        missing = [i for i in range(start, start + count) if not self._path(i).exists()]
        if not missing:
            return 0
        log.info("key pool: generating %d %s keys", len(missing), self.key_type)
        if len(missing) < 8:
            for i in missing:
                _write_private(self._path(i), _generate_pem(self.key_type))
            return len(missing)
        with concurrent.futures.ProcessPoolExecutor(max_workers=workers) as pool:
            for i, pem in zip(
                missing,
                pool.map(_generate_pem, [self.key_type] * len(missing), chunksize=16),
                strict=True,
            ):
                _write_private(self._path(i), pem)
        return len(missing)

    async def take(self) -> PrivateKey:
        """The next pooled key (read lazily from disk), or a freshly generated one."""
        index = self._next
        self._next += 1
        path = self._path(index)
        try:
            pem = await asyncio.to_thread(path.read_bytes)
        except FileNotFoundError:
            self.generated_on_demand += 1
            return await asyncio.to_thread(generate_private_key, self.key_type)
        return load_private_key(pem)

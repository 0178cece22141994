"""An in-process CA signing node CSRs with ``cryptography``: for development, tests, small sites.

The CA (root or intermediate) is loaded from PEM files or generated; P-256 ECDSA and RSA CA
keys are supported, and node CSRs may carry RSA (>= 2048 bit), EC (P-256/384/521) or Ed25519
keys. Issued certificates have CN = SAN = identity (plus extra SANs), EKU serverAuth +
clientAuth, a critical KeyUsage, a random 159-bit serial and a configurable lifetime.

``sign_sync`` is the fast path used in-process (the python helper mode). It writes the leaf's
DER itself from a per-CA template (:mod:`ca_adapters.leafcert`, byte-identical to what
``CertificateBuilder`` writes; ~0.06 ms less per certificate). ``sign`` runs it
inline for EC CA keys and in a worker thread for RSA CA keys. Measured on the 2-core dev box:
an EC sign (CSR parse + build + P-256 signature) takes ~0.15 ms, a thread hop ~0.06 ms, and
offloading cuts EC throughput from ~6700/s to ~4100/s, so EC stays on the loop. An RSA-2048
sign takes ~0.4-0.5 ms (3072/4096-bit CA keys several ms) during which the loop would stall,
so RSA goes to a thread (~2600/s inline vs ~2100/s offloaded; loop lag stays < 5 ms).

Revocation: :meth:`LocalCA.revoke` adds the serial to a CRL signed by the CA key. A CA loaded
with :meth:`LocalCA.from_files` keeps its CRL in ``crl.pem`` beside its key (0644, rewritten
atomically under a lock file, so the helper and the provisioner may share the CA files); a
generated CA keeps it in memory. :meth:`LocalCA.crl` / :meth:`LocalCA.crl_pem` give the
current CRL. The local CA keeps no record of what it issued, so any serial can be revoked.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import threading
from collections.abc import Iterator, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from choria_core.securefile import write_atomic

from .base import CAError, SignRequest, SignResult, crl_reason, parse_serial
from .leafcert import LeafTemplate
from .verify import (
    check_request_names,
    dump_pem_chain,
    parse_csr,
    serial_hex,
    verified_csr_key,
)

CAKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
KeyType = Literal["ec", "ecdsa", "rsa"]

DEFAULT_VALIDITY_S = 30 * 86400.0
DEFAULT_MAX_VALIDITY_S = 398 * 86400.0
_BACKDATE = timedelta(minutes=5)  # tolerate nodes whose clocks run a little behind
_ALLOWED_CURVES = (ec.SECP256R1, ec.SECP384R1, ec.SECP521R1)
#: How long a published CRL is valid (``nextUpdate``); revoking again re-signs it.
CRL_VALIDITY = timedelta(days=7)
CRL_FILE = "crl.pem"


def _new_key(key_type: str, rsa_bits: int) -> CAKey:
    if key_type in ("ec", "ecdsa"):
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=rsa_bits)
    raise ValueError(f"unsupported CA key type {key_type!r} (use 'ec' or 'rsa')")


def _hash_for(key: CAKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size > 256:
        return hashes.SHA384()
    return hashes.SHA256()


def _write_file(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file in the same directory + rename) with ``mode`` from the start."""
    write_atomic(path, data, mode, durable=False)


class LocalCA:
    """A CA whose key lives in this process; implements :class:`~ca_adapters.base.CAAdapter`."""

    def __init__(
        self,
        cert: x509.Certificate,
        key: CAKey,
        chain: Sequence[x509.Certificate] = (),
        *,
        name: str = "local",
        validity_s: float = DEFAULT_VALIDITY_S,
        max_validity_s: float = DEFAULT_MAX_VALIDITY_S,
        offload: bool | None = None,
        crl_path: str | Path | None = None,
    ) -> None:
        if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError("the CA key must be an EC or RSA private key")
        pub = serialization.PublicFormat.SubjectPublicKeyInfo
        der = serialization.Encoding.DER
        if cert.public_key().public_bytes(der, pub) != key.public_key().public_bytes(der, pub):
            raise ValueError("the CA key does not belong to the CA certificate")
        try:
            if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
                raise ValueError("the CA certificate is not a CA (basicConstraints CA:FALSE)")
        except x509.ExtensionNotFound as exc:
            raise ValueError("the CA certificate has no basicConstraints extension") from exc
        self.name = name
        self.cert = cert
        self.key = key
        self.chain = list(chain)
        self.validity_s = validity_s
        self.max_validity_s = max_validity_s
        self.offload = isinstance(key, rsa.RSAPrivateKey) if offload is None else offload
        self._hash = _hash_for(key)
        self._ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        self._aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(self._ski)
        self._chain_pem = dump_pem_chain([cert, *self.chain])
        # What every leaf shares (issuer, algorithm, fixed extensions), encoded once.
        self._leaf = LeafTemplate(cert.subject, key, self._hash, self._aki)
        #: Where the CRL is published (None: kept in memory only).
        self.crl_path = Path(crl_path) if crl_path is not None else None
        self._crl: x509.CertificateRevocationList | None = None
        self._crl_lock = threading.Lock()

    # -- construction -------------------------------------------------------------------------

    @classmethod
    def generate(
        cls,
        key_type: KeyType = "ec",
        common_name: str = "Fleet Development CA",
        *,
        parent: LocalCA | None = None,
        ca_validity_s: float = 10 * 365 * 86400.0,
        rsa_bits: int = 2048,
        name: str = "local",
        validity_s: float = DEFAULT_VALIDITY_S,
        max_validity_s: float = DEFAULT_MAX_VALIDITY_S,
        offload: bool | None = None,
    ) -> LocalCA:
        """A fresh self-signed root, or an intermediate signed by ``parent``."""
        key = _new_key(key_type, rsa_bits)
        subject = x509.Name(
            [
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Fleet Provisioner"),
                x509.NameAttribute(NameOID.COMMON_NAME, common_name),
            ]
        )
        now = datetime.now(UTC)
        ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
        issuer_name = parent.cert.subject if parent else subject
        signing_key: CAKey = parent.key if parent else key
        builder = (
            x509.CertificateBuilder()
            .subject_name(subject)
            .issuer_name(issuer_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + timedelta(seconds=ca_validity_s))
            .add_extension(
                x509.BasicConstraints(ca=True, path_length=None if not parent else 0), True
            )
            .add_extension(
                x509.KeyUsage(
                    digital_signature=True,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(ski, critical=False)
        )
        if parent:
            builder = builder.add_extension(parent._aki, critical=False)
        cert = builder.sign(signing_key, _hash_for(signing_key))
        chain = [parent.cert, *parent.chain] if parent else []
        return cls(
            cert,
            key,
            chain,
            name=name,
            validity_s=validity_s,
            max_validity_s=max_validity_s,
            offload=offload,
        )

    @classmethod
    def from_files(
        cls,
        cert: str | Path,
        key: str | Path,
        chain: str | Path | None = None,
        *,
        password: bytes | None = None,
        name: str = "local",
        validity_s: float = DEFAULT_VALIDITY_S,
        max_validity_s: float = DEFAULT_MAX_VALIDITY_S,
        offload: bool | None = None,
    ) -> LocalCA:
        """Load a root or intermediate CA. ``chain`` holds the certificates above it.

        Its CRL is kept in ``crl.pem`` beside ``key`` (see the module docstring).
        """
        try:
            ca_cert = x509.load_pem_x509_certificate(Path(cert).read_bytes())
            ca_key = serialization.load_pem_private_key(Path(key).read_bytes(), password=password)
            chain_certs = x509.load_pem_x509_certificates(Path(chain).read_bytes()) if chain else []
        except (OSError, ValueError, TypeError) as exc:
            # The message of a key load error never contains key material.
            raise ValueError(f"cannot load the local CA from {cert} / {key}: {exc}") from exc
        if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise ValueError(f"{key}: the CA key must be an EC or RSA private key")
        return cls(
            ca_cert,
            ca_key,
            chain_certs,
            name=name,
            validity_s=validity_s,
            max_validity_s=max_validity_s,
            offload=offload,
            crl_path=Path(key).parent / CRL_FILE,
        )

    def write(self, directory: str | Path) -> tuple[Path, Path]:
        """Write ``ca.pem`` (certificate + chain, 0644) and ``ca-key.pem`` (0600)."""
        d = Path(directory)
        d.mkdir(parents=True, exist_ok=True)
        cert_path, key_path = d / "ca.pem", d / "ca-key.pem"
        key_pem = self.key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        _write_file(key_path, key_pem, 0o600)
        _write_file(cert_path, self._chain_pem.encode(), 0o644)
        return cert_path, key_path

    @property
    def chain_pem(self) -> str:
        """This CA's certificate followed by the certificates above it."""
        return self._chain_pem

    # -- signing ------------------------------------------------------------------------------

    def _check_node_key(self, key: object) -> None:
        if isinstance(key, rsa.RSAPublicKey):
            if key.key_size < 2048:
                raise CAError(
                    f"{self.name}: RSA key of {key.key_size} bits is too small (>= 2048)",
                    ca=self.name,
                )
        elif isinstance(key, ec.EllipticCurvePublicKey):
            if not isinstance(key.curve, _ALLOWED_CURVES):
                raise CAError(f"{self.name}: EC curve {key.curve.name} not allowed", ca=self.name)
        elif not isinstance(key, ed25519.Ed25519PublicKey):
            raise CAError(f"{self.name}: unsupported CSR key type", ca=self.name)

    def sign_sync(self, req: SignRequest) -> SignResult:
        """Sign synchronously (no I/O). Raises :class:`CAError` (permanent) on bad input."""
        check_request_names(req, ca=self.name)
        csr = parse_csr(req.csr_pem, ca=self.name)  # parsed, its signature verified (cached)
        node_key, node_spki = verified_csr_key(req.csr_pem, csr)
        self._check_node_key(node_key)
        ttl = self.validity_s if req.ttl_s is None else req.ttl_s
        if ttl <= 0:
            raise CAError(f"{self.name}: ttl must be positive", ca=self.name)
        now = datetime.now(UTC)
        not_after = min(
            now + timedelta(seconds=min(ttl, self.max_validity_s)), self.cert.not_valid_after_utc
        )
        not_before = (now - _BACKDATE).replace(microsecond=0)
        not_after = not_after.replace(microsecond=0)  # DER times are whole seconds
        serial = x509.random_serial_number()
        template = self._leaf
        tbs = template.tbs(
            identity=req.identity,
            dns_names=req.all_dns_names(),
            ip_addresses=tuple(dict.fromkeys(req.ip_sans)),
            spki=node_spki,  # the parsed key re-encoded (never the CSR's bytes), checked above
            node_rsa=isinstance(node_key, rsa.RSAPublicKey),
            serial=serial,
            not_before=not_before,
            not_after=not_after,
        )
        return SignResult(
            certificate_pem=template.sign(tbs),
            chain_pem=self._chain_pem,
            serial=serial_hex(serial),
            not_after=not_after,
        )

    async def sign(self, req: SignRequest) -> SignResult:
        if self.offload:
            import asyncio  # here, not at the top: an exec helper signing inline never needs it

            return await asyncio.to_thread(self.sign_sync, req)
        return self.sign_sync(req)

    async def ca_chain(self) -> str:
        return self._chain_pem

    async def health(self) -> bool:
        return datetime.now(UTC) < self.cert.not_valid_after_utc

    async def aclose(self) -> None:
        return None

    # -- revocation ---------------------------------------------------------------------------

    async def revoke(self, serial: str, reason: str) -> None:
        """Add ``serial`` (hex) to the CRL and publish it; revoking twice changes nothing."""
        import asyncio  # see sign()

        number = parse_serial(serial, ca=self.name)
        await asyncio.to_thread(self._revoke_sync, number, crl_reason(reason))

    def _revoke_sync(self, number: int, reason: str) -> None:
        with self._crl_lock, _file_lock(self.crl_path):
            current = self._read_crl()
            entries = {r.serial_number: r for r in current} if current is not None else {}
            if number in entries:
                return
            entry = x509.RevokedCertificateBuilder().serial_number(number)
            entry = entry.revocation_date(datetime.now(UTC))
            if reason != "unspecified":  # RFC 5280: unspecified is expressed by omission
                entry = entry.add_extension(x509.CRLReason(x509.ReasonFlags(reason)), False)
            entries[number] = entry.build()
            self._publish(entries, _crl_number(current) + 1)

    def crl(self) -> x509.CertificateRevocationList:
        """The current CRL, signed by this CA (an empty one when nothing was revoked)."""
        with self._crl_lock:
            current = self._read_crl()
            if current is None:
                current = self._sign_crl({}, 1)
                self._crl = current
            return current

    def crl_pem(self) -> str:
        return self.crl().public_bytes(serialization.Encoding.PEM).decode()

    def _read_crl(self) -> x509.CertificateRevocationList | None:
        """The published CRL (checked: issued and signed by this CA), or the in-memory one."""
        if self.crl_path is None or not self.crl_path.exists():
            return self._crl
        try:
            crl = x509.load_pem_x509_crl(self.crl_path.read_bytes())
        except (OSError, ValueError) as exc:
            raise CAError(
                f"{self.name}: cannot read the CRL {self.crl_path}: {exc}", ca=self.name
            ) from exc
        if crl.issuer != self.cert.subject or not crl.is_signature_valid(self.key.public_key()):
            raise CAError(
                f"{self.name}: {self.crl_path} is not a CRL signed by this CA", ca=self.name
            )
        return crl

    def _sign_crl(
        self, entries: dict[int, x509.RevokedCertificate], number: int
    ) -> x509.CertificateRevocationList:
        now = datetime.now(UTC)
        builder = (
            x509.CertificateRevocationListBuilder()
            .issuer_name(self.cert.subject)
            .last_update(now - _BACKDATE)
            .next_update(now + CRL_VALIDITY)
            .add_extension(self._aki, critical=False)
            .add_extension(x509.CRLNumber(number), critical=False)
        )
        for serial in sorted(entries):
            builder = builder.add_revoked_certificate(entries[serial])
        return builder.sign(self.key, self._hash)

    def _publish(self, entries: dict[int, x509.RevokedCertificate], number: int) -> None:
        crl = self._sign_crl(entries, number)
        if self.crl_path is not None:
            pem = crl.public_bytes(serialization.Encoding.PEM)
            write_atomic(self.crl_path, pem, 0o644, durable=True)
        self._crl = crl


def _crl_number(crl: x509.CertificateRevocationList | None) -> int:
    if crl is None:
        return 0
    try:
        return int(crl.extensions.get_extension_for_class(x509.CRLNumber).value.crl_number)
    except x509.ExtensionNotFound:
        return 0


@contextlib.contextmanager
def _file_lock(path: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``<crl>.lock`` while the CRL is rewritten (none without a
    path): the helper and the provisioner may revoke with the same CA files."""
    if path is None:
        yield
        return
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock

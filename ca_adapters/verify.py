"""Re-verify what a CA returned before anything is handed to a node.

CAs substitute silently: cfssl falls back to its default profile for an unknown profile, and
Vault uses the CSR's CN and SANs instead of the ones asked for (only a warning says so). So
every adapter passes the returned certificate through :func:`verify_issued`, which checks, with
``cryptography`` only:

- the certificate's public key is the CSR's public key (nobody swapped the node's key);
- the CN is the identity and the SANs are exactly the names asked for (identity at least);
- it is a leaf (no CA flag) signed by the issuing certificate of the *configured* chain;
- its validity is sane (starts no later than now + skew, not expired, not absurdly long, and
  matches the expected lifetime when the caller knows it);
- serverAuth + clientAuth are in the EKU when required (Choria uses the cert both ways).

Any failure raises :class:`~ca_adapters.base.CAVerificationError` (permanent).
"""

from __future__ import annotations

import ipaddress
import re
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from functools import lru_cache

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.types import PublicKeyTypes
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from choria_core.errors import FleetError

from .base import CAError, CAVerificationError, SignRequest, SignResult

DEFAULT_MAX_VALIDITY_S = 398 * 86400.0
DEFAULT_SKEW_S = 300.0


@dataclass(frozen=True)
class Expectations:
    """What a returned certificate must satisfy, beyond key, names and issuer."""

    require_eku: bool = True
    max_validity_s: float = DEFAULT_MAX_VALIDITY_S
    skew_s: float = DEFAULT_SKEW_S
    # When the CA's profile fixes the lifetime (cfssl), not_after must be now + this, give or
    # take ``lifetime_tolerance_s`` (cfssl rounds to the minute and backdates by 5 minutes).
    expected_lifetime_s: float | None = None
    lifetime_tolerance_s: float = 900.0
    # Upper bound when we asked for a TTL (Vault caps it but must never exceed it).
    max_lifetime_s: float | None = None


def load_pem_chain(pem: str | bytes, *, ca: str = "ca") -> list[x509.Certificate]:
    """Parse a PEM bundle; an empty or broken bundle is a :class:`CAVerificationError`."""
    data = pem.encode() if isinstance(pem, str) else pem
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError as exc:
        raise CAVerificationError(f"{ca}: CA chain is not valid PEM: {exc}", ca=ca) from exc
    return certs


def dump_pem_chain(certs: Sequence[x509.Certificate]) -> str:
    return "".join(c.public_bytes(serialization.Encoding.PEM).decode() for c in certs)


def _spki(key: object) -> bytes:
    public_bytes = getattr(key, "public_bytes", None)
    if public_bytes is None:
        raise TypeError("not a public key")
    out = public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert isinstance(out, bytes)
    return out


def _cn(cert: x509.Certificate) -> str | None:
    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    if not attrs:
        return None
    value = attrs[0].value
    return value if isinstance(value, str) else value.decode()


def find_issuer(cert: x509.Certificate, chain: Sequence[x509.Certificate]) -> x509.Certificate:
    """The certificate of ``chain`` that signed ``cert`` (matched by name, checked by signature)."""
    for candidate in chain:
        if candidate.subject != cert.issuer:
            continue
        try:
            cert.verify_directly_issued_by(candidate)
        except (ValueError, TypeError, InvalidSignature):
            continue
        return candidate
    raise LookupError(cert.issuer.rfc4514_string())


_Fail = Callable[[str], CAVerificationError]


def verify_issued(
    cert_pem: str,
    *,
    csr: x509.CertificateSigningRequest,
    identity: str,
    dns_sans: Sequence[str] = (),
    ip_sans: Sequence[str] = (),
    ca_chain: Sequence[x509.Certificate],
    ca: str,
    expect: Expectations | None = None,
    now: datetime | None = None,
) -> x509.Certificate:
    """Check a returned leaf certificate; return it parsed, or raise CAVerificationError."""
    expect = expect or Expectations()
    now = now or datetime.now(UTC)

    def fail(what: str) -> CAVerificationError:
        return CAVerificationError(f"{ca}: returned certificate refused: {what}", ca=ca)

    try:
        certs = x509.load_pem_x509_certificates(cert_pem.encode())
    except ValueError as exc:
        raise fail(f"not a PEM certificate ({exc})") from exc
    cert = certs[0]  # some CAs append the chain after the leaf
    _check_key(cert, csr, fail)
    _check_names(cert, identity, dns_sans, ip_sans, fail)
    _check_issuer(cert, ca_chain, fail)
    _check_validity(cert, expect, now, fail)
    if expect.require_eku:
        _check_eku(cert, fail)
    return cert


def _check_key(cert: x509.Certificate, csr: x509.CertificateSigningRequest, fail: _Fail) -> None:
    """The node's key, not another one."""
    if _spki(cert.public_key()) != _spki(csr.public_key()):
        raise fail("its public key is not the key of the CSR")


def _check_names(
    cert: x509.Certificate,
    identity: str,
    dns_sans: Sequence[str],
    ip_sans: Sequence[str],
    fail: _Fail,
) -> None:
    """Names exactly as asked: CN = identity, SANs = identity + extras, nothing else."""
    cn = _cn(cert)
    if cn != identity:
        raise fail(f"CN is {cn!r}, expected {identity!r}")
    want_dns = {identity.lower(), *(n.lower() for n in dns_sans)}
    want_ip = {ipaddress.ip_address(ip) for ip in ip_sans}
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound as exc:
        raise fail("it has no subjectAltName (the identity must be a DNS SAN)") from exc
    got_dns = {n.lower() for n in san.get_values_for_type(x509.DNSName)}
    got_ip = set(san.get_values_for_type(x509.IPAddress))
    other = [g for g in san if not isinstance(g, x509.DNSName | x509.IPAddress)]
    if got_dns != want_dns:
        raise fail(f"DNS SANs are {sorted(got_dns)}, expected {sorted(want_dns)}")
    if got_ip != want_ip:
        raise fail(f"IP SANs are {sorted(map(str, got_ip))}, expected {sorted(map(str, want_ip))}")
    if other:
        raise fail(f"unexpected SAN entries {[str(g.value) for g in other]}")


def _check_issuer(
    cert: x509.Certificate, ca_chain: Sequence[x509.Certificate], fail: _Fail
) -> None:
    """A leaf, signed by the configured CA."""
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
        if bc.ca:
            raise fail("it is a CA certificate (basicConstraints CA:TRUE)")
    except x509.ExtensionNotFound:
        pass
    if not ca_chain:
        raise fail("no CA chain is configured to verify it against")
    try:
        find_issuer(cert, ca_chain)
    except LookupError as exc:
        raise fail(
            f"it is not signed by the configured CA (issuer {cert.issuer.rfc4514_string()!r})"
        ) from exc


def _check_validity(
    cert: x509.Certificate, expect: Expectations, now: datetime, fail: _Fail
) -> None:
    """Valid now, not absurdly long, and as long as the profile or the asked TTL says."""
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    if nb > now + timedelta(seconds=expect.skew_s):
        raise fail(f"it is not valid before {nb.isoformat()} (in the future)")
    if na <= now:
        raise fail(f"it expired at {na.isoformat()}")
    lifetime = (na - nb).total_seconds()
    if lifetime > expect.max_validity_s:
        raise fail(f"validity of {lifetime / 86400:.1f} days exceeds the allowed maximum")
    remaining = (na - now).total_seconds()
    if expect.max_lifetime_s is not None and remaining > expect.max_lifetime_s + expect.skew_s:
        raise fail(
            f"it is valid for {remaining / 3600:.1f}h, more than the "
            f"{expect.max_lifetime_s / 3600:.1f}h asked for"
        )
    if expect.expected_lifetime_s is not None and (
        abs(remaining - expect.expected_lifetime_s) > expect.lifetime_tolerance_s
    ):
        raise fail(
            f"it is valid for {remaining / 3600:.1f}h but the profile promises "
            f"{expect.expected_lifetime_s / 3600:.1f}h (wrong or unknown profile?)"
        )


def _check_eku(cert: x509.Certificate, fail: _Fail) -> None:
    """Usable both as a server and as a client certificate (Choria uses it both ways)."""
    try:
        eku = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound as exc:
        raise fail("it has no extendedKeyUsage (serverAuth+clientAuth required)") from exc
    missing = [
        name
        for oid, name in (
            (ExtendedKeyUsageOID.SERVER_AUTH, "serverAuth"),
            (ExtendedKeyUsageOID.CLIENT_AUTH, "clientAuth"),
        )
        if oid not in eku
    ]
    if missing:
        raise fail(f"extendedKeyUsage lacks {', '.join(missing)}")


class CSRSignatureError(FleetError, ValueError):
    """The CSR parsed but its self-signature does not verify."""

    reason = "csr"


#: How many verified CSRs :func:`load_verified_csr` remembers (by their exact PEM text), and
#: the longest PEM it remembers: a node's CSR is 0.5-5 KiB, so at most ~4 MiB are retained.
VERIFIED_CSR_CACHE = 512
VERIFIED_CSR_MAX_PEM = 8192


def load_verified_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and verify its self-signature, once per distinct PEM text.

    The provisioner's CSR check, the reference helper (python mode, same process) and the CA
    adapter all need the same node CSR parsed and its signature verified (the verification is
    ~0.12 ms for P-256, the bulk of the cost); this cache keyed by the exact PEM text makes that
    one parse and one verification per node. Only CSRs that parse *and* verify are cached (a
    failure raises and is not remembered); a parsed CSR is immutable, so sharing it is safe.
    Raises ``ValueError`` when the text is not a PEM CSR and :class:`CSRSignatureError` (a
    ``ValueError``) when the signature does not verify. A PEM longer than
    :data:`VERIFIED_CSR_MAX_PEM` is checked without being remembered.
    """
    if len(csr_pem) > VERIFIED_CSR_MAX_PEM:
        return _verified_csr(csr_pem)
    return _cached_verified_csr(csr_pem)


def _verified_csr(csr_pem: str) -> x509.CertificateSigningRequest:
    csr = x509.load_pem_x509_csr(csr_pem.encode())
    if not csr.is_signature_valid:
        raise CSRSignatureError("the CSR's signature does not verify")
    return csr


_cached_verified_csr = lru_cache(maxsize=VERIFIED_CSR_CACHE)(_verified_csr)


def verified_csr_key(
    csr_pem: str, csr: x509.CertificateSigningRequest | None = None
) -> tuple[PublicKeyTypes, bytes]:
    """The public key of a verified CSR and its DER SubjectPublicKeyInfo, once per PEM text.

    Loading the key from the CSR costs about as much as parsing it; the provisioner's CSR
    check, the python-mode helper's CA and the certificate check each need it. Same rules as
    :func:`load_verified_csr` (only keys of CSRs that verify are remembered; errors are raised
    again on every call: ``ValueError``, :class:`CSRSignatureError`, ``UnsupportedAlgorithm``
    for a key type ``cryptography`` does not know). The key object is immutable.
    """
    if len(csr_pem) > VERIFIED_CSR_MAX_PEM:
        # not remembered; ``csr``: the caller's verified CSR of this PEM, not verified again
        key = (csr if csr is not None else load_verified_csr(csr_pem)).public_key()
        return key, _spki(key)
    return _cached_csr_key(csr_pem)


def _csr_key(csr_pem: str) -> tuple[PublicKeyTypes, bytes]:
    key = load_verified_csr(csr_pem).public_key()
    return key, _spki(key)


_cached_csr_key = lru_cache(maxsize=VERIFIED_CSR_CACHE)(_csr_key)


def verified_csr_subject(
    csr_pem: str, csr: x509.CertificateSigningRequest | None = None
) -> x509.Name:
    """The subject of a verified CSR, parsed once per PEM text and without warnings.

    ``cryptography`` parses a CSR's subject again on every ``csr.subject`` (~10 us); the
    provisioner's CN check, its PKI policy and the python-mode helper each read it. Parsed
    under ``warnings.catch_warnings`` (a malformed country name is refused by the policy, not
    logged). Same rules as :func:`verified_csr_key`: only subjects of CSRs that verify are
    remembered; ``csr``, when given, is the caller's verified CSR of this PEM. An
    ``x509.Name`` is immutable, so sharing it is safe.
    """
    if len(csr_pem) > VERIFIED_CSR_MAX_PEM:
        return _quiet_subject(csr if csr is not None else load_verified_csr(csr_pem))
    return _cached_csr_subject(csr_pem)


def _quiet_subject(csr: x509.CertificateSigningRequest) -> x509.Name:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return csr.subject


def _csr_subject(csr_pem: str) -> x509.Name:
    return _quiet_subject(load_verified_csr(csr_pem))


_cached_csr_subject = lru_cache(maxsize=VERIFIED_CSR_CACHE)(_csr_subject)


def parse_csr(csr_pem: str, *, ca: str) -> x509.CertificateSigningRequest:
    """Parse a CSR and check its self-signature (proof the node holds the key)."""
    try:
        return load_verified_csr(csr_pem)
    except CSRSignatureError:
        raise CAError(f"{ca}: the CSR's signature does not verify", ca=ca) from None
    except ValueError as exc:
        raise CAError(f"{ca}: the CSR is not valid PEM: {exc}", ca=ca) from exc


def serial_hex(cert: x509.Certificate | int) -> str:
    """Colon-separated lowercase hex, the way Vault and openssl print serials (of a
    certificate's serial number, or of the number itself)."""
    raw = format(cert if isinstance(cert, int) else cert.serial_number, "x")
    raw = raw if len(raw) % 2 == 0 else "0" + raw
    return bytes.fromhex(raw).hex(":")


# A DNS-style name: labels of letters, digits, '-' and '_' (Choria identities allow '_'),
# no wildcard, no whitespace, no trailing dot.
_NAME_RE = re.compile(
    r"^(?=.{1,253}$)[A-Za-z0-9_][A-Za-z0-9_-]{0,62}(?:\.[A-Za-z0-9_][A-Za-z0-9_-]{0,62})*$"
)


def check_request_names(req: SignRequest, *, ca: str) -> None:
    """Refuse (permanently) names no CA should be asked to certify."""
    for name in (req.identity, *req.dns_sans):
        if not _NAME_RE.match(name):
            raise CAError(f"{ca}: {name!r} is not a valid DNS name for a certificate", ca=ca)
    for ip in req.ip_sans:
        try:
            ipaddress.ip_address(ip)
        except ValueError as exc:
            raise CAError(f"{ca}: {ip!r} is not a valid IP address", ca=ca) from exc


def result_for(cert: x509.Certificate, chain_pem: str, warnings: Sequence[str] = ()) -> SignResult:
    """Build the :class:`SignResult` for a verified certificate.

    The leaf is re-encoded from the parsed certificate, which drops anything a CA appended.
    """
    return SignResult(
        certificate_pem=cert.public_bytes(serialization.Encoding.PEM).decode(),
        chain_pem=chain_pem,
        serial=serial_hex(cert),
        not_after=cert.not_valid_after_utc,
        warnings=tuple(warnings),
    )

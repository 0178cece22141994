"""The PKI policy the provisioner enforces itself, whatever the node sends or the helper returns.

A careless helper (a CA front end that copies whatever the CSR asks for) must not be able to
issue a node anything but a plain leaf certificate for its own name. So the provisioner checks:

* the node's CSR, before any helper sees it (:func:`check_csr`): valid signature with a strong
  hash; the subject is exactly ``CN = identity`` plus only the attributes the provisioner asked
  for in ``gencsr`` (it asks for none: such attributes may appear only empty, as go-choria
  writes them, unless ``pki_policy.csr_allowed_attributes`` names them); no CSR attribute but
  the extension request, and no requested extension except a subjectAltName that is exactly
  ``DNS:identity``; an allowed key type and size;
* the helper's certificate, before anything is written to the node (:func:`check_certificate`):
  exactly one CN, equal to the identity, no other subject attribute unless allowed; DNS SANs
  only, each the identity or a configured SAN template; not a CA (basicConstraints ``CA:FALSE``
  or absent, no ``keyCertSign``); valid now (within ``clock_skew``) and for at most
  ``max_validity``; an allowed key equal to the key the node will hold; signed by a CA in the
  ``ca`` bundle the helper returned, and, with ``trust_anchors`` configured, every certificate
  of that bundle is or chains to an anchor.

A refusal raises :class:`PolicyRefusal` naming the rule; messages quote remote strings with
``repr`` cut to :data:`SHOW` characters, and never carry key material.
"""

from __future__ import annotations

import re
import string
import warnings
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime, timedelta
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.x509.oid import ExtensionOID, NameOID
from pydantic import Field, PrivateAttr, field_validator, model_validator

from choria_core.errors import FleetError
from choria_core.strictmodel import Duration, StrictModel

__all__ = [
    "DEFAULT_ALLOWED_KEYS",
    "KeyKind",
    "PkiPolicyConfig",
    "PolicyRefusal",
    "check_certificate",
    "check_csr",
    "load_anchors",
    "load_certificate",
    "render_sans",
]

KeyKind = Literal["rsa", "ec-p256", "ec-p384", "ec-p521", "ed25519", "ed448"]
SubjectAttr = Literal["C", "ST", "L", "O", "OU"]
DEFAULT_ALLOWED_KEYS: tuple[KeyKind, ...] = ("rsa", "ec-p256", "ec-p384", "ed25519")
#: Template fields a SAN may use: none of them is controlled by the node.
TEMPLATE_FIELDS = frozenset({"identity", "site", "overlay"})
#: How much of a remote string a message quotes.
SHOW = 80
MAX_CHAIN = 8  # certificates in a CA bundle / depth of a chain
MAX_ATTRIBUTE = 64  # characters of an allowed subject attribute (X.520 upper bound)

_ATTR_OIDS: dict[str, x509.ObjectIdentifier] = {
    "C": NameOID.COUNTRY_NAME,
    "ST": NameOID.STATE_OR_PROVINCE_NAME,
    "L": NameOID.LOCALITY_NAME,
    "O": NameOID.ORGANIZATION_NAME,
    "OU": NameOID.ORGANIZATIONAL_UNIT_NAME,
}
_OID_NAMES = {oid: name for name, oid in _ATTR_OIDS.items()}
_CURVES = {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}
_EXTENSION_REQUEST = x509.ObjectIdentifier("1.2.840.113549.1.9.14")
_STRONG_HASHES = (hashes.SHA256, hashes.SHA384, hashes.SHA512)
_DNS_LABEL = r"(?!-)[a-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"{_DNS_LABEL}(\.{_DNS_LABEL})*\Z")
_PRINTABLE = re.compile(r"[^\x00-\x1f\x7f]*\Z")


class PolicyRefusal(FleetError, ValueError, reason="pki_policy"):
    """A CSR or certificate broke a rule of the PKI policy; ``rule`` names it."""

    def __init__(self, rule: str, message: str) -> None:
        self.rule = rule
        super().__init__(f"{rule}: {message}")


def show(value: object) -> str:
    """A remote string as it may appear in a message: escaped (``repr``) and bounded."""
    text = str(value)
    cut = text[:SHOW]
    return repr(cut) + ("..." if len(text) > SHOW else "")


# ----------------------------------------------------------------------------- configuration


def _template_problem(template: str) -> str | None:
    try:
        parts = list(string.Formatter().parse(template))
    except ValueError as exc:
        return f"{template!r} is not a valid template: {exc}"
    sample = []
    for literal, field, spec, conversion in parts:
        sample.append(literal)
        if field is None:
            continue
        if field not in TEMPLATE_FIELDS or spec or conversion:
            return (
                f"{template!r} uses {{{field}}}: a SAN template may only use "
                "{identity}, {site} or {overlay} (never node facts, inventory or token claims)"
            )
        sample.append("x")
    if not _DNS_NAME.match("".join(sample).lower()):
        return f"{template!r} does not make a DNS name (no wildcards, IPs or URIs)"
    return None


def load_anchors(paths: Iterable[str]) -> list[x509.Certificate]:
    """The CA certificates in the PEM files ``paths`` (each must hold at least one CA)."""
    anchors: list[x509.Certificate] = []
    for path in paths:
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise ValueError(f"trust anchor file {path} cannot be read: {exc.strerror}") from None
        try:
            certs = x509.load_pem_x509_certificates(data)
        except ValueError:
            raise ValueError(f"trust anchor file {path} holds no PEM certificate") from None
        for cert in certs:
            if not _is_ca(cert):
                raise ValueError(f"trust anchor file {path} holds a certificate that is not a CA")
        anchors.extend(certs)
    return anchors


class PkiPolicyConfig(StrictModel):
    """``pki_policy``: what a node's CSR and the helper's certificate must look like."""

    allowed_keys: list[KeyKind] = Field(default_factory=lambda: list(DEFAULT_ALLOWED_KEYS))
    min_rsa_bits: int = Field(default=2048, ge=2048, le=16384)
    csr_allowed_attributes: list[SubjectAttr] = Field(default_factory=list)
    certificate_allowed_attributes: list[SubjectAttr] = Field(default_factory=list)
    san_templates: list[str] = Field(default_factory=lambda: ["{identity}"])
    max_validity: Duration = Field(default=398 * 86400.0, gt=0)
    clock_skew: Duration = Field(default=300.0, ge=0, le=86400.0)
    trust_anchors: list[str] = Field(default_factory=list)

    _anchors: list[x509.Certificate] = PrivateAttr(default_factory=list)

    @property
    def anchors(self) -> list[x509.Certificate]:
        """The trust anchors' certificates, loaded when the configuration was."""
        return self._anchors

    @field_validator("allowed_keys")
    @classmethod
    def _keys(cls, v: list[KeyKind]) -> list[KeyKind]:
        if not v:
            raise ValueError("at least one key type must be allowed, e.g. [rsa, ec-p256]")
        return v

    @field_validator("trust_anchors", mode="before")
    @classmethod
    def _anchor_list(cls, v: Any) -> Any:
        return [v] if isinstance(v, str) else v

    @field_validator("san_templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        for template in v:
            problem = _template_problem(template)
            if problem:
                raise ValueError(problem)
        return v

    @model_validator(mode="after")
    def _load(self) -> PkiPolicyConfig:
        self._anchors = load_anchors(self.trust_anchors)
        return self


# ----------------------------------------------------------------------------- shared rules


#: Key classes seen by :func:`key_kind` and their kind ("ec": by curve); an ABC
#: ``isinstance`` costs ~0.5 us, and every node's CSR and certificate key is classified.
_KIND_BY_CLASS: dict[type, str] = {}


def key_kind(key: Any) -> str:
    """``rsa``, ``ec-p256``..., ``ed25519``, ``ed448`` or the key's class name."""
    kind = _KIND_BY_CLASS.get(type(key))
    if kind is None:
        kind = _KIND_BY_CLASS.setdefault(type(key), _class_kind(key))
    if kind == "ec":
        return _CURVES.get(key.curve.name, f"ec-{key.curve.name}")
    return kind


def _class_kind(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "rsa"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return "ec"
    if isinstance(key, ed25519.Ed25519PublicKey):
        return "ed25519"
    if isinstance(key, ed448.Ed448PublicKey):
        return "ed448"
    return type(key).__name__


def check_key(key: Any, policy: PkiPolicyConfig, what: str) -> None:
    """The key type is allowed, and an RSA key has at least ``min_rsa_bits``."""
    kind = key_kind(key)
    if kind not in policy.allowed_keys:
        raise PolicyRefusal("key_type", f"{what} key type {kind} is not allowed")
    if kind == "rsa" and key.key_size < policy.min_rsa_bits:
        raise PolicyRefusal(
            "key_size",
            f"{what} RSA key has {key.key_size} bits, at least {policy.min_rsa_bits} are required",
        )


def spki(key: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key (to compare keys of any type)."""
    der: bytes = key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def _subject(
    name: x509.Name, identity: str, allowed: Sequence[str], what: str, *, empty_ok: bool
) -> None:
    """Exactly one CN = identity; other attributes only when allowed (or empty, if tolerated)."""
    cns = 0
    for attr in name:
        oid = attr.oid
        value = attr.value if isinstance(attr.value, str) else repr(attr.value)
        if oid == NameOID.COMMON_NAME:
            cns += 1
            if cns > 1:
                raise PolicyRefusal("subject", f"{what} has more than one common name")
            if value != identity:
                raise PolicyRefusal(
                    "subject", f"{what} common name {show(value)} is not the identity"
                )
            continue
        short = _OID_NAMES.get(oid)
        if short is not None and empty_ok and value == "":
            continue  # go-choria writes the gencsr fields it was not given as empty values
        if short is None or short not in allowed:
            label = short or oid.dotted_string
            raise PolicyRefusal(
                "subject", f"{what} subject attribute {label}={show(value)} is not allowed"
            )
        if len(value) > MAX_ATTRIBUTE or not _PRINTABLE.match(value):
            raise PolicyRefusal("subject", f"{what} subject attribute {short} is malformed")
    if cns == 0:
        raise PolicyRefusal("subject", f"{what} has no common name")


def _quiet_subject(obj: x509.CertificateSigningRequest | x509.Certificate) -> x509.Name:
    """The subject, parsed without warnings (a malformed country name is refused, not logged)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return obj.subject


# ----------------------------------------------------------------------------- the CSR


def check_csr(
    csr: x509.CertificateSigningRequest,
    identity: str,
    policy: PkiPolicyConfig,
    *,
    signature_verified: bool = False,
    public_key: Any = None,
    subject: x509.Name | None = None,
) -> None:
    """The node's CSR asks for nothing but a leaf certificate for ``identity`` (see module).

    ``signature_verified``: the caller obtained ``csr`` from
    :func:`ca_adapters.verify.load_verified_csr`, which verified its signature already.
    ``public_key``: the CSR's public key when the caller loaded it already
    (:func:`ca_adapters.verify.verified_csr_key`); None loads it here. ``subject``: the CSR's
    subject when the caller parsed it already (:func:`ca_adapters.verify.verified_csr_subject`);
    None parses it here.
    """
    _signature_hash(csr, "CSR")
    if not signature_verified and not csr.is_signature_valid:
        raise PolicyRefusal("signature", "CSR signature does not verify")
    if subject is None:
        subject = _quiet_subject(csr)
    _subject(subject, identity, policy.csr_allowed_attributes, "CSR", empty_ok=True)
    for attribute in csr.attributes:
        if attribute.oid != _EXTENSION_REQUEST:
            raise PolicyRefusal(
                "attributes", f"CSR attribute {attribute.oid.dotted_string} is not allowed"
            )
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise PolicyRefusal("extensions", "CSR extensions do not parse") from None
    for ext in extensions:
        if ext.oid != ExtensionOID.SUBJECT_ALTERNATIVE_NAME:
            name = getattr(ext.oid, "_name", "") or ext.oid.dotted_string
            raise PolicyRefusal("extensions", f"CSR requests the extension {name}")
        assert isinstance(ext.value, x509.SubjectAlternativeName)
        names = list(ext.value)
        if [type(n) for n in names] != [x509.DNSName] or (
            str(names[0].value).lower() != identity.lower()
        ):
            shown = ", ".join(_general_name(n) for n in names[:4])
            raise PolicyRefusal(
                "san", f"CSR subjectAltName may only be the identity, not {show(shown)}"
            )
    check_key(csr.public_key() if public_key is None else public_key, policy, "CSR")


def _signature_hash(obj: x509.CertificateSigningRequest | x509.Certificate, what: str) -> None:
    try:
        algorithm = obj.signature_hash_algorithm
    except UnsupportedAlgorithm:
        raise PolicyRefusal("signature", f"{what} signature algorithm is not supported") from None
    if algorithm is not None and not isinstance(algorithm, _STRONG_HASHES):
        raise PolicyRefusal("signature", f"{what} is signed with weak hash {algorithm.name}")


def _general_name(name: x509.GeneralName) -> str:
    kind = {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.UniformResourceIdentifier: "URI",
        x509.RFC822Name: "email",
    }.get(type(name), type(name).__name__)
    return f"{kind}:{name.value}"


# ----------------------------------------------------------------------------- the certificate


def render_sans(policy: PkiPolicyConfig, identity: str, site: str, overlay: str | None) -> set[str]:
    """The DNS names a certificate may carry: the rendered ``san_templates`` (lower case).

    A template whose fields do not all render to DNS labels (an unset overlay, say) is skipped.
    """
    values = {
        "identity": identity.lower(),
        "site": site.lower(),
        "overlay": (overlay or "").lower(),
    }
    names = {identity.lower()}
    for template in policy.san_templates:
        fields = _template_fields(template)
        if any(f != "identity" and not re.fullmatch(_DNS_LABEL, values[f]) for f in fields):
            continue
        rendered = template.format_map(values).lower()
        if _DNS_NAME.match(rendered):
            names.add(rendered)
    return names


@lru_cache(maxsize=64)
def _template_fields(template: str) -> frozenset[str]:
    """The fields a (validated) SAN template uses, parsed once per template."""
    return frozenset(f for _, f, _, _ in string.Formatter().parse(template) if f)


def check_certificate(
    cert: x509.Certificate,
    ca_pem: str,
    *,
    identity: str,
    expected_key: bytes | None,
    policy: PkiPolicyConfig,
    allowed_sans: set[str],
    now: datetime | None = None,
    expected_public_key: Any = None,
) -> None:
    """The helper's certificate is a plain leaf for ``identity`` from the CA it returned.

    ``expected_public_key``: the key object ``expected_key`` encodes, when the caller has it
    (the verified CSR's key): an equal key is recognised without encoding the certificate's
    key (~10 us); anything else is compared by ``expected_key`` as before.
    """
    now = now or datetime.now(UTC)
    _signature_hash(cert, "certificate")
    _subject(
        _quiet_subject(cert),
        identity,
        policy.certificate_allowed_attributes,
        "certificate",
        empty_ok=False,
    )
    _leaf_extensions(cert, allowed_sans)
    _validity(cert, policy, now)
    key = cert.public_key()
    check_key(key, policy, "certificate")
    same = expected_public_key is not None and type(key) is type(expected_public_key)
    if (
        expected_key is not None
        and not (same and key == expected_public_key)
        and (spki(key) != expected_key)
    ):
        raise PolicyRefusal("public_key", "certificate is not for the key the node will hold")
    _chain(cert, ca_pem, policy, now)


def _leaf_extensions(cert: x509.Certificate, allowed_sans: set[str]) -> None:
    try:
        extensions = list(cert.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        raise PolicyRefusal("extensions", "certificate extensions do not parse") from None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise PolicyRefusal("ca", "certificate is a CA certificate (basicConstraints CA:TRUE)")
        if isinstance(value, x509.KeyUsage) and (value.key_cert_sign or value.crl_sign):
            raise PolicyRefusal("ca", "certificate may sign certificates (keyUsage keyCertSign)")
        if isinstance(value, x509.SubjectAlternativeName):
            for name in value:
                if not isinstance(name, x509.DNSName):
                    raise PolicyRefusal(
                        "san", f"certificate SAN {show(_general_name(name))} is not allowed"
                    )
                if name.value.lower() not in allowed_sans:
                    raise PolicyRefusal(
                        "san", f"certificate SAN {show(name.value)} is not an allowed name"
                    )


def _validity(cert: x509.Certificate, policy: PkiPolicyConfig, now: datetime) -> None:
    skew = timedelta(seconds=policy.clock_skew)
    if cert.not_valid_before_utc > now + skew:
        raise PolicyRefusal("validity", "certificate is not valid yet")
    if cert.not_valid_after_utc <= now:
        raise PolicyRefusal("validity", "certificate has expired")
    if cert.not_valid_after_utc > now + timedelta(seconds=policy.max_validity) + skew:
        days = (cert.not_valid_after_utc - now).total_seconds() / 86400
        raise PolicyRefusal(
            "validity",
            f"certificate is valid for {days:.0f} more days, longer than max_validity "
            f"({policy.max_validity / 86400:.0f} days)",
        )


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except (x509.ExtensionNotFound, ValueError):
        return False
    return bool(bc.ca)


def _issued_by(cert: x509.Certificate, issuer: x509.Certificate) -> bool:
    try:
        cert.verify_directly_issued_by(issuer)
    except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
        return False
    return True


#: Certificates :func:`load_certificate` remembers, and the longest PEM it remembers (a leaf
#: is 0.6-2 KiB): at most ~4 MiB retained, whatever a helper returns.
CERTIFICATE_CACHE = 256
CERTIFICATE_CACHE_MAX_PEM = 16384


def load_certificate(pem: str) -> x509.Certificate:
    """The first certificate of a PEM text, parsed once per distinct text.

    A node's certificate is read by the audit record, the certificate check and the inventory
    record of the same attempt; a parsed certificate is immutable, so they share one parse
    (``ValueError`` when it does not parse; failures are not cached; a PEM longer than
    :data:`CERTIFICATE_CACHE_MAX_PEM` is parsed without being remembered).
    """
    if len(pem) > CERTIFICATE_CACHE_MAX_PEM:
        return _parse_certificate(pem)
    return _cached_certificate(pem)


def _parse_certificate(pem: str) -> x509.Certificate:
    return x509.load_pem_x509_certificate(pem.encode("utf-8"))


_cached_certificate = lru_cache(maxsize=CERTIFICATE_CACHE)(_parse_certificate)


@lru_cache(maxsize=16)
def _ca_bundle(ca_pem: str) -> tuple[x509.Certificate, ...]:
    """The parsed CA bundle (cached: a helper returns the same few bundles for every node;
    a bundle that does not parse raises ``ValueError`` and is not cached)."""
    return tuple(x509.load_pem_x509_certificates(ca_pem.encode("utf-8")))


def _chain(cert: x509.Certificate, ca_pem: str, policy: PkiPolicyConfig, now: datetime) -> None:
    """Signed by a CA of the returned bundle; with anchors, the whole bundle is anchored."""
    bundle: list[x509.Certificate] = []
    if ca_pem.strip():
        try:
            bundle = list(_ca_bundle(ca_pem))
        except ValueError:
            raise PolicyRefusal("chain", "the helper's CA bundle does not parse") from None
    anchors = policy.anchors  # a pydantic private attribute: read once
    if not bundle and not anchors:
        raise PolicyRefusal("chain", "the helper returned a certificate without its CA")
    if len(bundle) > MAX_CHAIN:
        raise PolicyRefusal("chain", f"the helper's CA bundle has more than {MAX_CHAIN} entries")
    issuers = bundle or anchors
    issuer = next((c for c in issuers if _issued_by(cert, c)), None)
    if issuer is None:
        raise PolicyRefusal("chain", "certificate is not signed by the CA the helper returned")
    if not _is_ca(issuer):
        raise PolicyRefusal("chain", "certificate's issuer is not a CA certificate")
    if issuer.not_valid_after_utc <= now:
        raise PolicyRefusal("chain", "certificate's issuing CA has expired")
    if anchors:
        for ca in bundle:
            if not _anchored(ca, bundle, anchors):
                raise PolicyRefusal(
                    "trust_anchor",
                    f"CA {show(ca.subject.rfc4514_string())} does not chain to a trust anchor",
                )


def _anchored(
    ca: x509.Certificate, bundle: Sequence[x509.Certificate], anchors: Sequence[x509.Certificate]
) -> bool:
    anchor_der = {a.public_bytes(serialization.Encoding.DER) for a in anchors}
    current = ca
    for _ in range(MAX_CHAIN):
        if current.public_bytes(serialization.Encoding.DER) in anchor_der:
            return True
        if any(_issued_by(current, a) for a in anchors):
            return True
        parent = next(
            (c for c in bundle if c is not current and _is_ca(c) and _issued_by(current, c)), None
        )
        if parent is None:
            return False
        current = parent
    return False

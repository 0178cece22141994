"""Certificate and key checks of the pipeline: nothing unusable reaches a node.

* :func:`validate_csr` (step ``csr_check``, pki feature): the node's CSR is well formed,
  self-signed, for CN = identity and names nothing on ``cert_deny_list``;
* :func:`check_output` (step ``check_output``): the helper's configuration turns provisioning
  off, and its certificate parses and is for the key the node will hold.

Each check fails the attempt with a :class:`~provisioner.reasons.Reason` (``csr_invalid``,
``csr_cn_mismatch``, ``csr_denied``, ``helper_refused``) and a message an operator can act on.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from datetime import UTC
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from helpers.models import HelperOutput, provisioning_left_enabled
from provisioner.attempt import Attempt, PipelineContext, fail
from provisioner.reasons import Reason


def compile_deny_list(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    """Anchor semantics: ``/re/`` or ``re``, both searched (unanchored) in each name."""
    out = []
    for p in patterns:
        if len(p) > 2 and p.startswith("/") and p.endswith("/"):
            p = p[1:-1]
        out.append(re.compile(p))
    return out


def _deny_match(name: str, patterns: Sequence[re.Pattern[str]]) -> re.Pattern[str] | None:
    for pattern in patterns:
        if pattern.search(name):
            return pattern
    return None


def csr_fingerprint(csr_pem: str) -> str:
    """sha256 (hex) of a PEM CSR's DER (as recorded in the audit log)."""
    csr = x509.load_pem_x509_csr(csr_pem.encode("utf-8"))
    return hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()


def _spki(public_key: Any) -> bytes:
    """The DER SubjectPublicKeyInfo of a public key (to compare keys of any type)."""
    der: bytes = public_key.public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return der


def validate_csr(ctx: PipelineContext, att: Attempt) -> None:
    """The CSR must be well formed, self-signed, for CN = identity and no denied name."""
    assert att.csr is not None
    try:
        csr = x509.load_pem_x509_csr(att.csr["csr"].encode("utf-8"))
    except ValueError:
        raise fail(
            att, Reason.CSR_INVALID, f"CSR from {att.identity} could not be parsed"
        ) from None
    att.csr_sha256 = hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()
    if not csr.is_signature_valid:
        raise fail(att, Reason.CSR_INVALID, f"CSR from {att.identity} has an invalid signature")
    cns = [str(a.value) for a in csr.subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    cn = cns[0] if cns else ""
    if cn != att.identity:
        raise fail(
            att,
            Reason.CSR_CN_MISMATCH,
            f"CSR common name {cn[:80]!r} does not match identity {att.identity}",
        )
    names = [cn]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.extend(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    for name in names:
        pattern = _deny_match(name, ctx.deny_list)
        if pattern is not None:
            raise fail(
                att,
                Reason.CSR_DENIED,
                f"CSR name {name[:80]!r} matches denied certificate pattern {pattern.pattern!r}",
            )


def check_output(ctx: PipelineContext, att: Attempt) -> None:
    """Refuse output that cannot work, before anything is written to the node."""
    out = att.output
    assert out is not None
    if not out.configuration:
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        raise fail(att, Reason.HELPER_REFUSED, "helper returned an empty configuration")
    if provisioning_left_enabled(out):
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        value = out.configuration.get("plugin.choria.server.provision")
        detail = "does not set it" if value is None else f"sets it to {value[:20]!r}"
        raise fail(
            att,
            Reason.HELPER_REFUSED,
            "helper output would leave provisioning enabled: the configuration must set "
            f"plugin.choria.server.provision = false, but it {detail}; "
            "the node would re-provision forever",
        )
    if out.certificate:
        check_certificate(att, out)


def check_certificate(att: Attempt, out: HelperOutput) -> None:
    """The certificate must parse and belong to the key the node will hold."""
    try:
        cert = x509.load_pem_x509_certificate(out.certificate.encode("utf-8"))
    except ValueError:
        raise fail(
            att, Reason.HELPER_REFUSED, "helper returned a certificate that does not parse"
        ) from None
    att.cert_serial = format(cert.serial_number, "x")
    att.cert_not_after = cert.not_valid_after_utc.astimezone(UTC).isoformat()
    expected = _expected_key(att, out)
    if expected is not None and _spki(cert.public_key()) != expected:
        raise fail(
            att,
            Reason.HELPER_REFUSED,
            f"the helper's certificate for {att.identity} is not for the node's key",
        )


def _expected_key(att: Attempt, out: HelperOutput) -> bytes | None:
    """The key the node will hold: the helper's private key if it sent one, else the CSR's."""
    if out.key:
        try:
            key = serialization.load_pem_private_key(out.key.encode("utf-8"), password=None)
        except (ValueError, TypeError):
            raise fail(
                att, Reason.HELPER_REFUSED, "helper returned a private key that does not parse"
            ) from None
        return _spki(key.public_key())
    if att.csr is not None:
        return _spki(x509.load_pem_x509_csr(att.csr["csr"].encode("utf-8")).public_key())
    return None

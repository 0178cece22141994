"""Certificate and key checks of the pipeline: nothing unusable or over-privileged reaches a node.

* :func:`validate_csr` (step ``csr_check``, pki feature): the node's CSR is well formed,
  self-signed, for CN = identity, names nothing on ``cert_deny_list`` (matched without regard
  to case: identities are DNS names) and satisfies the ``pki_policy``
  (:func:`provisioner.pki_policy.check_csr`); a refused CSR never reaches the helper;
* :func:`check_output` (step ``check_output``): the helper's configuration turns provisioning
  off, and its certificate parses, is for the key the node will hold and satisfies the
  ``pki_policy`` (:func:`provisioner.pki_policy.check_certificate`).

The checks sit in the pipeline, so they hold whichever helper mode (python, exec, persistent)
produced the output. Each check fails the attempt with a :class:`~provisioner.reasons.Reason`
(``csr_invalid``, ``csr_cn_mismatch``, ``csr_denied``, ``csr_policy``, ``helper_refused``,
``certificate_policy``) and a bounded message naming the rule; policy refusals are also
counted by reason and rule (``choria_provisioner_pki_policy_refusals_total``).
"""

from __future__ import annotations

import contextlib
import hashlib
import re
from collections.abc import Iterable, Sequence
from datetime import UTC
from typing import Any

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.x509.oid import NameOID

from ca_adapters.verify import (
    CSRSignatureError,
    load_verified_csr,
    verified_csr_key,
    verified_csr_subject,
)
from helpers.models import HelperOutput, provisioning_left_enabled
from provisioner.attempt import Attempt, PipelineContext, PipelineError, fail
from provisioner.pki_policy import (
    PolicyRefusal,
    check_certificate,
    check_csr,
    load_certificate,
    render_sans,
    show,
)
from provisioner.pki_policy import spki as _spki
from provisioner.reasons import Reason

#: A PEM CSR longer than this is refused unparsed (an RSA-16384 CSR is about 5 KiB).
MAX_CSR_PEM = 64 * 1024


def compile_deny_list(patterns: Sequence[str]) -> list[re.Pattern[str]]:
    """Anchor semantics: ``/re/`` or ``re``, both searched (unanchored) in each name.

    Matching ignores case (identities are DNS names): ``hx.Privileged.Choria`` is denied by
    ``\\.privileged.choria$``. A pattern may opt back in with an inline ``(?-i:...)`` group.
    """
    out = []
    for p in patterns:
        if len(p) > 2 and p.startswith("/") and p.endswith("/"):
            p = p[1:-1]
        out.append(re.compile(p, re.IGNORECASE))
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


def _refused(
    ctx: PipelineContext, att: Attempt, reason: Reason, exc: PolicyRefusal
) -> PipelineError:
    ctx.metrics.pki_policy_refusals.labels(ctx.metrics.site, str(reason), exc.rule).inc()
    return fail(att, reason, str(exc))


def _denied(ctx: PipelineContext, names: Iterable[str]) -> str | None:
    """Why one of ``names`` is denied by ``cert_deny_list`` (None when none is)."""
    for name in names:
        pattern = _deny_match(name, ctx.deny_list)
        if pattern is not None:
            return f"deny_list: name {show(name)} matches denied pattern {pattern.pattern!r}"
    return None


def validate_csr(ctx: PipelineContext, att: Attempt) -> None:
    """The CSR must be well formed, self-signed, for CN = identity, no denied name, policy."""
    assert att.csr is not None
    pem = att.csr["csr"]
    try:
        if len(pem) > MAX_CSR_PEM:
            raise ValueError("too long")
        # Parsed and its signature verified once per node: the helper (python mode) and the
        # CA adapter get the same verified CSR from this cache (ca_adapters.verify).
        csr = load_verified_csr(pem)
    except CSRSignatureError:
        att.csr_sha256 = csr_fingerprint(pem)
        raise fail(
            att, Reason.CSR_INVALID, f"CSR from {att.identity} has an invalid signature"
        ) from None
    except ValueError:
        raise fail(
            att, Reason.CSR_INVALID, f"CSR from {att.identity} could not be parsed"
        ) from None
    att.csr_sha256 = hashlib.sha256(csr.public_bytes(serialization.Encoding.DER)).hexdigest()
    # parsed once per CSR, without warnings (a malformed attribute is refused by the policy,
    # not logged): check_csr and the python-mode helper read the same parsed subject
    subject = verified_csr_subject(pem, csr)
    cns = [str(a.value) for a in subject.get_attributes_for_oid(NameOID.COMMON_NAME)]
    cn = cns[0] if cns else ""
    if cn != att.identity:
        raise fail(
            att,
            Reason.CSR_CN_MISMATCH,
            f"CSR common name {show(cn)} does not match identity {att.identity}",
        )
    names = [cn]
    try:
        san = csr.extensions.get_extension_for_class(x509.SubjectAlternativeName)
        names.extend(san.value.get_values_for_type(x509.DNSName))
    except x509.ExtensionNotFound:
        pass
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType):
        pass  # the policy below refuses extensions that do not parse
    denied = _denied(ctx, names)
    if denied:
        raise fail(att, Reason.CSR_DENIED, denied)
    key: Any = None
    with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
        # loaded once per node: the python-mode helper's CA and check_output use it too
        key, key_der = verified_csr_key(pem, csr)
        att.csr_spki = (pem, key_der)
    try:
        check_csr(
            csr,
            att.identity,
            ctx.config.pki_policy,
            signature_verified=True,
            public_key=key,
            subject=subject,
        )
    except PolicyRefusal as exc:
        raise _refused(ctx, att, Reason.CSR_POLICY, exc) from None


def check_output(ctx: PipelineContext, att: Attempt) -> None:
    """Refuse output that cannot work, before anything is written to the node."""
    out = att.output
    assert out is not None
    if not out.configuration:
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        raise fail(att, Reason.HELPER_REFUSED, "helper returned an empty configuration")
    if provisioning_left_enabled(out):
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        # Absent, the node's token (chpd) decides, as in go-choria; set to true, never.
        value = out.configuration.get("plugin.choria.server.provision", "")
        raise fail(
            att,
            Reason.HELPER_REFUSED,
            "helper output would leave provisioning enabled: the configuration sets "
            f"plugin.choria.server.provision to {value[:20]!r}; it must be "
            "false or absent, the node would re-provision forever",
        )
    if (
        "plugin.choria.server.provision" not in out.configuration
        and (att.claims or {}).get("chpd") is True
    ):
        # Without the setting the node's token decides, and this one says "provision": the
        # node would boot into provisioning again. Known only with the jwt feature on.
        ctx.metrics.helper_errors.labels(ctx.metrics.site).inc()
        raise fail(
            att,
            Reason.HELPER_REFUSED,
            "helper output does not set plugin.choria.server.provision and the node's "
            "provisioning token has chpd (provision by default) true: the node would "
            "re-provision forever; the configuration must set it to false",
        )
    if out.certificate:
        _check_helper_certificate(ctx, att, out)


def _check_helper_certificate(ctx: PipelineContext, att: Attempt, out: HelperOutput) -> None:
    """The certificate must parse, belong to the key the node will hold and obey the policy."""
    try:
        cert = load_certificate(out.certificate)
    except ValueError:
        raise fail(
            att, Reason.HELPER_REFUSED, "helper returned a certificate that does not parse"
        ) from None
    att.cert_serial = format(cert.serial_number, "x")
    att.cert_not_after = cert.not_valid_after_utc.astimezone(UTC).isoformat()
    expected = _expected_key(att, out)
    expected_obj = _expected_public_key(att, out, expected)
    policy = ctx.config.pki_policy
    allowed = render_sans(policy, att.identity, ctx.config.site, out.overlay)
    try:
        denied = _denied(ctx, sorted(allowed))
        if denied:
            raise PolicyRefusal("deny_list", denied.removeprefix("deny_list: "))
        check_certificate(
            cert,
            out.ca or "",
            identity=att.identity,
            expected_key=expected,
            policy=policy,
            allowed_sans=allowed,
            expected_public_key=expected_obj,
        )
    except PolicyRefusal as exc:
        raise _refused(ctx, att, Reason.CERTIFICATE_POLICY, exc) from None


def _expected_key(att: Attempt, out: HelperOutput) -> bytes | None:
    """The key the node will hold: the helper's private key if it sent one, else the CSR's."""
    if out.key:
        try:
            key: Any = serialization.load_pem_private_key(out.key.encode("utf-8"), password=None)
        except (ValueError, TypeError):
            raise fail(
                att, Reason.HELPER_REFUSED, "helper returned a private key that does not parse"
            ) from None
        return _spki(key.public_key())
    if att.csr is not None:
        if att.csr_spki is not None and att.csr_spki[0] == att.csr["csr"]:
            return att.csr_spki[1]
        return _spki(x509.load_pem_x509_csr(att.csr["csr"].encode("utf-8")).public_key())
    return None


def _expected_public_key(att: Attempt, out: HelperOutput, expected: bytes | None) -> Any:
    """The key object of ``expected`` when it is the checked CSR's key (cached by
    :func:`ca_adapters.verify.verified_csr_key`), else None."""
    if out.key or expected is None or att.csr is None or att.csr_spki is None:
        return None
    pem = att.csr["csr"]
    if att.csr_spki[0] != pem or att.csr_spki[1] != expected:
        return None
    with contextlib.suppress(ValueError, TypeError, UnsupportedAlgorithm):
        key, der = verified_csr_key(pem)
        if der == expected:
            return key
    return None

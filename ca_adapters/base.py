"""The CA adapter protocol: what the provisioner asks a CA for, what it gets back, and errors.

Every CA backend (the in-process :class:`~ca_adapters.local.LocalCA`, cfssl, Vault/OpenBao)
implements :class:`CAAdapter`; the provisioner never knows which one it holds. Errors are
:class:`CAError` with a ``retryable`` flag the caller (and :class:`~ca_adapters.guard.GuardedCA`)
acts on. Messages name the CA and quote the server's error text, never a token or key.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Protocol, runtime_checkable

from choria_core.errors import FleetError


class CAError(FleetError, reason="ca"):
    """A CA could not sign (or answer). ``retryable`` says whether trying again may help."""

    def __init__(
        self, message: str, *, ca: str = "ca", retryable: bool = False, status: int | None = None
    ) -> None:
        super().__init__(message)
        self.ca = ca
        self.retryable = retryable
        self.status = status


class CAVerificationError(CAError, reason="ca_verification"):
    """The CA answered, but what it returned is wrong (other key, other name, other issuer...).

    Never retryable: the same request would get the same wrong answer, and a CA that hands
    out wrong certificates must not be hammered with retries.
    """

    def __init__(self, message: str, *, ca: str = "ca", status: int | None = None) -> None:
        super().__init__(message, ca=ca, retryable=False, status=status)


@dataclass(frozen=True)
class SignRequest:
    """A node's CSR plus what the provisioner decided the certificate must say.

    ``identity`` becomes the CN and is always a DNS SAN; ``dns_sans``/``ip_sans`` are extra
    names. ``profile`` is the cfssl profile or Vault role override, ``ttl_s`` the wanted
    lifetime (the CA may cap it). ``metadata`` is for audit only and is never sent to the CA.
    """

    identity: str
    csr_pem: str
    dns_sans: tuple[str, ...] = ()
    ip_sans: tuple[str, ...] = ()
    ttl_s: float | None = None
    profile: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def all_dns_names(self) -> tuple[str, ...]:
        """The identity followed by the extra DNS SANs, without duplicates, in order."""
        seen: dict[str, None] = {self.identity: None}
        for name in self.dns_sans:
            seen.setdefault(name, None)
        return tuple(seen)


@dataclass(frozen=True)
class SignResult:
    """A verified leaf certificate and the configured CA chain it verified against."""

    certificate_pem: str
    chain_pem: str
    serial: str
    not_after: datetime
    warnings: tuple[str, ...] = ()


@runtime_checkable
class CAAdapter(Protocol):
    """One small async interface, one implementation per CA."""

    name: str

    async def sign(self, req: SignRequest) -> SignResult:
        """Sign the CSR; raise :class:`CAError` (or :class:`CAVerificationError`)."""
        ...

    async def ca_chain(self) -> str:
        """The PEM bundle of the issuing CA (and intermediates up to the root)."""
        ...

    async def health(self) -> bool:
        """True when the CA answers; never raises."""
        ...

    async def revoke(self, serial: str, reason: str) -> None:
        """Revoke the certificate with hex ``serial``; ``reason`` is free text (an RFC 5280
        reason name such as ``keyCompromise`` is passed on, anything else is ``unspecified``).
        Revoking an already revoked certificate succeeds; an unknown serial is a
        :class:`CAError`."""
        ...

    async def aclose(self) -> None:
        """Release connections and background resources."""
        ...


#: RFC 5280 CRLReason names (as cfssl spells them), by lower-cased name.
CRL_REASONS: dict[str, str] = {
    name.lower(): name
    for name in (
        "unspecified",
        "keyCompromise",
        "cACompromise",
        "affiliationChanged",
        "superseded",
        "cessationOfOperation",
        "certificateHold",
        "removeFromCRL",
        "privilegeWithdrawn",
        "aACompromise",
    )
}
_MAX_SERIAL_HEX = 40  # RFC 5280: serials are at most 20 octets


def crl_reason(reason: str) -> str:
    """The RFC 5280 reason name for an operator's free-text ``reason`` (else ``unspecified``):
    the whole text, or what comes before a ``:`` (``keyCompromise: laptop stolen``).

    ``removeFromCRL`` is not a revocation reason and maps to ``unspecified``.
    """
    head = reason.split(":", 1)[0]
    name = CRL_REASONS.get(head.strip().lower().replace(" ", "").replace("_", ""), "")
    return name if name and name != "removeFromCRL" else "unspecified"


def parse_serial(serial: str, *, ca: str = "ca") -> int:
    """A certificate serial given as hex (``0a1b``, ``0x0a1b`` or ``0a:1b``); CAError if not."""
    text = serial.strip().lower().removeprefix("0x").replace(":", "").replace("-", "")
    if not text or len(text) > _MAX_SERIAL_HEX or any(c not in "0123456789abcdef" for c in text):
        raise CAError(f"{ca}: revoke: not a hex certificate serial", ca=ca)
    value = int(text, 16)
    if value <= 0:
        raise CAError(f"{ca}: revoke: a certificate serial is positive", ca=ca)
    return value


def is_retryable_status(status: int) -> bool:
    """Shared HTTP classification: 5xx, 429 (rate limit, Vault standby), 412 (Vault eventual
    consistency), 408 (timeout) are worth retrying; other 4xx are policy/auth/bad input."""
    return status >= 500 or status in (408, 412, 429)

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

    async def aclose(self) -> None:
        """Release connections and background resources."""
        ...


def is_retryable_status(status: int) -> bool:
    """Shared HTTP classification: 5xx, 429 (rate limit, Vault standby), 412 (Vault eventual
    consistency), 408 (timeout) are worth retrying; other 4xx are policy/auth/bad input."""
    return status >= 500 or status in (408, 412, 429)

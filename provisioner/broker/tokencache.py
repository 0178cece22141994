"""The auth callout's memory of provisioning tokens it verified, until their expiry.

A fleet usually boots with one provisioning token baked into every node, so the callout sees
the same token thousands of times in a row; verifying its signature and policy each time was
the largest single cost of an admission. :class:`VerifiedTokens` verifies a token in full the
first time (``jwt_tools.verify_provisioning_token``: shape, ``alg`` allow-list, signature,
times, lifetime policy, purpose, content) and then answers from memory while that verdict
cannot have changed:

- the signature, the ``alg``, the purpose, the content and the verification keys do not
  change with time (the keys are fixed for the life of a callout);
- the ``nbf`` and lifetime checks, once passed, keep passing as time goes forward;
- only the expiry can turn the verdict, so an entry is used only while
  ``verified_at <= now < exp + leeway`` (and ``< issexp + leeway`` for chain-issued tokens,
  whose issuer expiry is checked the same way). Past that, or if the clock went back, or
  after ``max_age`` seconds, the token is verified in full again, which gives the exact refusal.

Only tokens that passed are remembered (a refusal is never cached, so a bad token costs a full
verification every time, as before), keyed by the SHA-256 of the token (the token itself is not
kept), at most ``max_entries`` of them (least recently used forgotten first). Revocation and
the per-token limits are not part of this: token governance runs on every admission.
"""

from __future__ import annotations

import collections
import hashlib
import time
from collections.abc import Callable
from typing import Any

__all__ = ["VerifiedTokens"]

#: ``verify(token, now)``: the claims of a valid token, or raises.
Verifier = Callable[[str, float], dict[str, Any]]


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


class VerifiedTokens:
    """Tokens verified by ``verify`` and their claims, reused until the verdict could change."""

    def __init__(
        self,
        verify: Verifier,
        *,
        leeway: float,
        max_entries: int = 1024,
        max_age: float = 300.0,
    ) -> None:
        self._verify = verify
        self._leeway = max(0.0, leeway)
        self.max_entries = max(1, max_entries)
        self.max_age = max_age
        self._entries: collections.OrderedDict[bytes, tuple[dict[str, Any], float, float]] = (
            collections.OrderedDict()
        )
        self.hits = 0
        self.verifications = 0

    def __len__(self) -> int:
        return len(self._entries)

    def verify(self, token: str) -> dict[str, Any]:
        """The token's claims (a copy the caller may keep), or whatever ``verify`` raises."""
        now = time.time()
        key = hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()
        entry = self._entries.get(key)
        if entry is not None:
            claims, verified_at, until = entry
            if verified_at <= now < until and now - verified_at < self.max_age:
                self._entries.move_to_end(key)
                self.hits += 1
                return dict(claims)
            del self._entries[key]
        self.verifications += 1
        claims = self._verify(token, now)
        valid_until = self._valid_until(claims)
        if valid_until is not None and now < valid_until:
            self._entries[key] = (dict(claims), now, valid_until)
            if len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
        return claims

    def _valid_until(self, claims: dict[str, Any]) -> float | None:
        """When the verdict turns (expiry plus leeway); None: do not remember this token."""
        exp = _number(claims.get("exp"))
        if exp is None:
            return None
        until = exp + self._leeway
        if claims.get("tcs"):
            issexp = _number(claims.get("issexp"))
            if issexp is None:
                return None
            until = min(until, issexp + self._leeway)
        return until

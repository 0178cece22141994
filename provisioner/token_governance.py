"""Provisioning token governance: revoked tokens and per-token limits, shared through KV.

A provisioning token baked into an image can leak; on its own it admits any identity until it
expires. Governance bounds what one token may still do, and is enforced in two places with the
same rules (defence in depth): the auth callout (:mod:`provisioner.broker.callout`) and the
pipeline (its ``token_governance`` step).

- **Revoked tokens**: JTIs revoked with a reason and a time, one key each in a JetStream KV
  bucket (``PROVISIONER_TOKENS`` by default; key ``revoked.<sha256(jti)[:40]>``). Every
  enforcer watches the keys and keeps them in a dict, so a check is one hash and one look-up,
  and a revocation (``provisioner jwt revoke``) reaches every replica in well under a second.
- **Limits** (``token_governance.limits`` in the configuration), for a token named by its
  ``jti`` or by the SHA-256 (hex) of its ``cht``, so the secret is never written in a config:
  ``max_identities`` (distinct identities admitted with it, kept in the key
  ``identities.<label>`` as a list of short identity hashes and updated with compare-and-set,
  so two replicas cannot both admit the N+1th), ``identity_pattern`` (the identity must fully
  match it) and ``expires`` (a time, or a duration after the token's ``iat``, past which it is
  refused whatever its ``exp``).

Refusal codes are below (the callout's and the pipeline's); metrics carry a *label*: 12
hex characters of a SHA-256 of the token's ``jti`` (or ``cht`` hash), never a secret.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import hashlib
import json
import logging
import random
import re
import time
import weakref
from collections.abc import Mapping
from typing import Any

import nats.errors
import nats.js.errors
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge
from pydantic import Field, PrivateAttr, field_validator, model_validator

from choria_core.durations import parse_duration
from choria_core.errors import FleetError
from choria_core.remote_text import clean_remote_text
from choria_core.strictmodel import StrictModel

__all__ = [
    "DEFAULT_BUCKET",
    "MAX_IDENTITIES_LIMIT",
    "GovernanceMetrics",
    "RevokedToken",
    "TokenGovernance",
    "TokenGovernanceConfig",
    "TokenLimit",
    "TokenRefused",
    "check_jti",
    "cht_sha256",
    "list_revoked",
    "open_bucket",
    "revoke",
    "token_label",
    "unrevoke",
]

log = logging.getLogger(__name__)

DEFAULT_BUCKET = "PROVISIONER_TOKENS"
#: The largest ``max_identities``: the identity list of one token stays one KV value < 1 MB.
MAX_IDENTITIES_LIMIT = 20_000
REVOKED_PREFIX = "revoked."
IDENTITIES_PREFIX = "identities."
#: Distinct token labels a process counts in metrics; later ones share the label ``other``.
MAX_LABELS = 1000
_MAX_JTI = 256
_MAX_REASON = 1024
_CAS_ATTEMPTS = 50
_ID_HASH_RE = re.compile(r"[0-9a-f]{16}")
_BUCKET_RE = re.compile(r"[A-Za-z0-9_-]{1,64}")
_HEX64_RE = re.compile(r"[0-9a-f]{64}")

# Refusal codes: the callout's refused{reason} and the pipeline's reason alike.
REVOKED = "token_revoked"
EXPIRED_OVERRIDE = "token_expired_override"
IDENTITY_PATTERN = "token_identity_pattern"
IDENTITY_LIMIT = "token_identity_limit"
UNAVAILABLE = "token_governance_unavailable"


class TokenRefused(FleetError, reason="token_governance"):
    """Refused for this identity; ``reason``: a code above; the text has no secret."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason


# ------------------------------------------------------------------------------ configuration


def cht_sha256(cht: str) -> str:
    """The SHA-256 (hex) of a token's ``cht``: how a limit names a token by its secret."""
    return hashlib.sha256(cht.encode("utf-8")).hexdigest()


def _label(kind: str, value: str) -> str:
    return hashlib.sha256(f"{kind}:{value}".encode()).hexdigest()[:12]


def _parse_time(text: str) -> float | None:
    try:
        when = dt.datetime.fromisoformat(text)
    except ValueError:
        return None
    if when.tzinfo is None:
        raise ValueError("expires: a time needs a time zone (e.g. 2027-01-01T00:00:00Z)")
    return when.timestamp()


class TokenLimit(StrictModel):
    """One ``token_governance.limits`` entry: its token (``jti`` or ``cht_sha256``), limits."""

    jti: str | None = Field(default=None, min_length=1, max_length=_MAX_JTI)
    cht_sha256: str | None = None
    max_identities: int | None = Field(default=None, ge=1, le=MAX_IDENTITIES_LIMIT)
    identity_pattern: str | None = Field(default=None, min_length=1, max_length=1024)
    expires: str | None = None

    _pattern: re.Pattern[str] | None = PrivateAttr(default=None)
    _expires_at: float | None = PrivateAttr(default=None)
    _expires_after: float | None = PrivateAttr(default=None)

    @field_validator("expires", mode="before")
    @classmethod
    def _expires_text(cls, v: Any) -> Any:
        # YAML reads an unquoted 2027-01-01T00:00:00Z as a datetime; numbers are seconds.
        if isinstance(v, dt.datetime):
            return v.isoformat()
        if isinstance(v, int | float) and not isinstance(v, bool):
            return str(v)
        return v

    @field_validator("cht_sha256")
    @classmethod
    def _hex(cls, v: str | None) -> str | None:
        if v is not None and not _HEX64_RE.fullmatch(v.lower()):
            raise ValueError("must be the SHA-256 of the token's cht as 64 hex characters")
        return v.lower() if v is not None else None

    @model_validator(mode="after")
    def _compile(self) -> TokenLimit:
        if (self.jti is None) == (self.cht_sha256 is None):
            raise ValueError("give exactly one of jti or cht_sha256")
        if self.identity_pattern is not None:
            try:
                self._pattern = re.compile(self.identity_pattern)
            except re.error as exc:
                raise ValueError(f"identity_pattern is not a regular expression: {exc}") from None
        if self.expires is not None:
            at = _parse_time(self.expires)
            if at is None:
                self._expires_after = parse_duration(self.expires)  # ValueError if neither
            else:
                self._expires_at = at
        return self

    @property
    def label(self) -> str:
        """The token's short label (metrics, logs and its identities key)."""
        return (
            _label("jti", self.jti) if self.jti is not None else _label("cht", str(self.cht_sha256))
        )

    def deadline(self, claims: Mapping[str, Any]) -> float | None:
        """When ``expires`` ends this token; a duration counts from its ``iat`` (or ``nbf``)."""
        if self._expires_at is not None:
            return self._expires_at
        if self._expires_after is None:
            return None
        start = claims.get("iat") or claims.get("nbf")
        if isinstance(start, int | float) and not isinstance(start, bool) and start > 0:
            return float(start) + self._expires_after
        return 0.0  # no issue time: the override cannot be honoured, so it refuses (closed)

    def matches_identity(self, identity: str) -> bool:
        return self._pattern is None or self._pattern.fullmatch(identity) is not None


class TokenGovernanceConfig(StrictModel):
    """``token_governance:``: revoked tokens and per-token limits (off by default)."""

    enabled: bool = False
    bucket: str = DEFAULT_BUCKET
    limits: list[TokenLimit] = Field(default_factory=list)

    _index: dict[str, TokenLimit] = PrivateAttr(default_factory=dict)

    @field_validator("bucket")
    @classmethod
    def _bucket(cls, v: str) -> str:
        if not _BUCKET_RE.fullmatch(v):
            raise ValueError("a KV bucket name: letters, digits, '-' and '_' (at most 64)")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> TokenGovernanceConfig:
        if self.limits and not self.enabled:
            raise ValueError("limits are only enforced with token_governance.enabled: true")
        self._index = {}
        for limit in self.limits:
            key = f"jti:{limit.jti}" if limit.jti is not None else f"cht:{limit.cht_sha256}"
            if key in self._index:
                raise ValueError(f"two limits for the same token ({key[:3]})")
            self._index[key] = limit
        return self


def find_limit(config: TokenGovernanceConfig, claims: Mapping[str, Any]) -> TokenLimit | None:
    """The limit of the token with these claims: by ``jti`` first, then by ``cht`` hash."""
    jti, cht = claims.get("jti"), claims.get("cht")
    limit = config._index.get(f"jti:{jti}") if isinstance(jti, str) else None
    if limit is None and isinstance(cht, str) and cht:
        limit = config._index.get(f"cht:{cht_sha256(cht)}")
    return limit


def token_label(claims: Mapping[str, Any]) -> str:
    """A token's label: from its ``jti``, else from its ``cht`` hash (never the secret)."""
    jti, cht = claims.get("jti"), claims.get("cht")
    if isinstance(jti, str) and jti:
        return _label("jti", jti)
    if isinstance(cht, str) and cht:
        return _label("cht", cht_sha256(cht))
    return "none"


def _jti_key(jti: str) -> str:
    return REVOKED_PREFIX + hashlib.sha256(jti.encode("utf-8")).hexdigest()[:40]


def _identity_hash(identity: str) -> str:
    return hashlib.sha256(identity.encode("utf-8")).hexdigest()[:16]


# ------------------------------------------------------------------------------ metrics


@dataclasses.dataclass(frozen=True)
class GovernanceMetrics:
    """Per-token counters (label ``token``: the short label, never the token)."""

    admitted: Counter
    refused: Counter
    identities: Gauge

    @classmethod
    def create(cls, prefix: str, registry: CollectorRegistry = REGISTRY) -> GovernanceMetrics:
        """The metrics ``<prefix>_token_*`` in ``registry`` (made once per registry)."""
        made = _MADE.setdefault(registry, {})
        if prefix in made:
            return made[prefix]
        made[prefix] = metrics = cls(
            admitted=Counter(
                f"{prefix}_token_admitted_total",
                "Admissions that passed token governance, by token label",
                ["token"],
                registry=registry,
            ),
            refused=Counter(
                f"{prefix}_token_refused_total",
                "Admissions refused by token governance, by token label and reason",
                ["token", "reason"],
                registry=registry,
            ),
            identities=Gauge(
                f"{prefix}_token_identities",
                "Distinct identities admitted with a token that has max_identities",
                ["token"],
                registry=registry,
            ),
        )
        return metrics


_MADE: weakref.WeakKeyDictionary[CollectorRegistry, dict[str, GovernanceMetrics]] = (
    weakref.WeakKeyDictionary()
)


# ------------------------------------------------------------------------------ revocations


@dataclasses.dataclass(frozen=True)
class RevokedToken:
    """One revocation: the JTI, why, when (unix seconds) and by whom."""

    jti: str
    reason: str
    revoked_at: float
    by: str = ""

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_bytes(cls, data: bytes) -> RevokedToken | None:
        """Parse a stored value; None when it is not one (the bucket is not trusted blindly)."""
        if len(data) > 8 * 1024:
            return None
        try:
            raw = json.loads(data)
        except ValueError:
            return None
        if not isinstance(raw, dict):
            return None
        jti, reason, at, by = (raw.get(k) for k in ("jti", "reason", "revoked_at", "by"))
        if not (isinstance(jti, str) and isinstance(reason, str)):
            return None
        try:
            jti = check_jti(jti)
        except ValueError:
            return None
        if isinstance(at, bool) or not isinstance(at, int | float):
            at = 0.0
        return cls(
            jti=jti,
            reason=clean_remote_text(reason, _MAX_REASON),
            revoked_at=float(at),
            by=clean_remote_text(by, 256) if isinstance(by, str) else "",
        )


async def open_bucket(js: Any, bucket: str = DEFAULT_BUCKET) -> Any:
    """The governance KV bucket, created (history 1, no TTL) when it does not exist."""
    try:
        return await js.key_value(bucket)
    except nats.js.errors.BucketNotFoundError:
        try:
            return await js.create_key_value(bucket=bucket, history=1)
        except nats.js.errors.BadRequestError:  # created by someone else meanwhile
            return await js.key_value(bucket)


def check_jti(jti: str) -> str:
    jti = jti.strip()
    if not 0 < len(jti) <= _MAX_JTI or not jti.isprintable():
        raise ValueError(f"a JTI is 1 to {_MAX_JTI} printable characters")
    return jti


async def revoke(kv: Any, jti: str, reason: str, *, by: str = "") -> RevokedToken:
    """Revoke ``jti`` (idempotent: a second revocation replaces the reason and time)."""
    record = RevokedToken(
        jti=check_jti(jti),
        reason=clean_remote_text(reason, _MAX_REASON),
        revoked_at=round(time.time(), 3),
        by=clean_remote_text(by, 256),
    )
    await kv.put(_jti_key(record.jti), json.dumps(record.to_json()).encode())
    return record


async def unrevoke(kv: Any, jti: str) -> bool:
    """Lift the revocation of ``jti``; False if it was not revoked."""
    key = _jti_key(check_jti(jti))
    try:
        await kv.get(key)
    except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
        return False
    await kv.delete(key)
    return True


async def list_revoked(kv: Any, timeout: float = 5.0) -> list[RevokedToken]:
    """Every revoked JTI in the bucket, oldest first."""
    out: dict[str, RevokedToken] = {}
    watcher = await kv.watch(f"{REVOKED_PREFIX}>")
    try:
        while True:
            entry = await watcher.updates(timeout=timeout)
            if entry is None:
                break
            _apply(out, entry)
    finally:
        with contextlib.suppress(Exception):
            await watcher.stop()
    return sorted(out.values(), key=lambda r: (r.revoked_at, r.jti))


def _apply(cache: dict[str, RevokedToken], entry: Any) -> None:
    key = entry.key
    if not isinstance(key, str) or not key.startswith(REVOKED_PREFIX):
        return
    if entry.operation in ("DEL", "PURGE") or not entry.value:
        cache.pop(key, None)
        return
    record = RevokedToken.from_bytes(entry.value)
    if record is None or _jti_key(record.jti) != key:
        log.warning("ignored an unreadable revocation record in the token bucket")
        cache.pop(key, None)
        return
    cache[key] = record


# ------------------------------------------------------------------------------ enforcement


class TokenGovernance:
    """The enforcer: a watched cache of revocations, the limits, the shared identity sets."""

    def __init__(
        self,
        config: TokenGovernanceConfig,
        kv: Any,
        *,
        metrics: GovernanceMetrics | None = None,
    ) -> None:
        self.config = config
        self._kv = kv
        self._metrics = metrics
        self._revoked: dict[str, RevokedToken] = {}
        self._synced = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._labels: set[str] = set()

    @classmethod
    async def open(
        cls,
        js: Any,
        config: TokenGovernanceConfig,
        *,
        metrics: GovernanceMetrics | None = None,
        timeout: float = 10.0,
    ) -> TokenGovernance:
        """Open (or create) the bucket and start watching; returns once the cache is loaded.

        Raises :class:`TokenRefused` (``token_governance_unavailable``) if the bucket is unusable.
        """
        gov = None
        try:
            gov = cls(config, await open_bucket(js, config.bucket), metrics=metrics)
            gov._task = asyncio.create_task(gov._watch(), name="token-governance-watch")
            await asyncio.wait_for(gov._synced.wait(), timeout)
            return gov
        except Exception as exc:
            if gov is not None:
                await gov.close()
            raise TokenRefused(
                UNAVAILABLE,
                f"cannot use the token bucket {config.bucket} (token_governance needs "
                f"JetStream): {type(exc).__name__}",
            ) from None

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task

    def revocation(self, jti: object) -> RevokedToken | None:
        """The revocation of ``jti``, or None (a dict look-up)."""
        if not isinstance(jti, str) or not jti:
            return None
        return self._revoked.get(_jti_key(jti))

    async def _watch(self) -> None:
        """Follow ``revoked.>``; a lost watch is started again (its snapshot re-applied)."""
        while True:
            watcher = None
            try:
                watcher = await self._kv.watch(f"{REVOKED_PREFIX}>")
                async for entry in watcher:
                    if entry is None:
                        self._synced.set()
                    else:
                        _apply(self._revoked, entry)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("token governance watch failed (%s); restarting", type(exc).__name__)
            finally:
                if watcher is not None:
                    with contextlib.suppress(Exception):
                        await watcher.stop()
            await asyncio.sleep(1.0)

    def _metric_label(self, label: str) -> str:
        if label in self._labels or len(self._labels) < MAX_LABELS:
            self._labels.add(label)
            return label
        return "other"

    def _refuse(self, label: str, reason: str, message: str) -> TokenRefused:
        if self._metrics is not None:
            self._metrics.refused.labels(token=self._metric_label(label), reason=reason).inc()
        return TokenRefused(reason, message)

    async def check(
        self, claims: Mapping[str, Any], identity: str, *, now: float | None = None
    ) -> None:
        """Admit ``identity`` with this (verified) token, or raise :class:`TokenRefused`."""
        now = time.time() if now is None else now
        limit = find_limit(self.config, claims)
        label = limit.label if limit is not None else token_label(claims)
        who = f"token {label} identity={clean_remote_text(identity, 256)!r}"
        revoked = self.revocation(claims.get("jti"))
        if revoked is not None:
            raise self._refuse(label, REVOKED, f"{who}: the token is revoked ({revoked.reason})")
        if limit is not None:
            deadline = limit.deadline(claims)
            if deadline is not None and now >= deadline:
                raise self._refuse(
                    label, EXPIRED_OVERRIDE, f"{who}: past the token's governance expiry"
                )
            if not limit.matches_identity(identity):
                raise self._refuse(
                    label, IDENTITY_PATTERN, f"{who}: identity does not match the token's pattern"
                )
            if limit.max_identities is not None:
                await self._count_identity(limit, label, identity, who)
        if self._metrics is not None:
            self._metrics.admitted.labels(token=self._metric_label(label)).inc()

    async def _count_identity(self, limit: TokenLimit, label: str, identity: str, who: str) -> None:
        assert limit.max_identities is not None
        try:
            admitted, count = await self._admit(
                IDENTITIES_PREFIX + label, identity, limit.max_identities
            )
        except (TimeoutError, nats.errors.Error, ValueError) as exc:
            raise self._refuse(
                label, UNAVAILABLE, f"{who}: the token bucket is unavailable ({type(exc).__name__})"
            ) from None
        if self._metrics is not None:
            self._metrics.identities.labels(token=self._metric_label(label)).set(count)
        if not admitted:
            raise self._refuse(
                label,
                IDENTITY_LIMIT,
                f"{who}: the token already admitted its {limit.max_identities} identities",
            )

    async def _admit(self, key: str, identity: str, limit: int) -> tuple[bool, int]:
        """Add ``identity`` to the token's set unless full: (admitted, distinct identities).

        Compare-and-set on the key's revision: of two replicas adding the N+1th identity at
        once, one update fails, re-reads the (now full) set and refuses.
        """
        mine = _identity_hash(identity)
        for attempt in range(_CAS_ATTEMPTS):
            revision: int | None
            try:
                entry = await self._kv.get(key)
                ids, revision = _decode_ids(entry.value), entry.revision
            except (nats.js.errors.KeyNotFoundError, nats.js.errors.KeyDeletedError):
                ids, revision = [], None
            if mine in ids:
                return True, len(ids)
            if len(ids) >= limit:
                return False, len(ids)
            value = json.dumps({"identities": [*ids, mine]}, separators=(",", ":")).encode()
            try:
                if revision is None:
                    await self._kv.create(key, value)
                else:
                    await self._kv.update(key, value, last=revision)
                return True, len(ids) + 1
            except nats.js.errors.KeyWrongLastSequenceError:
                await asyncio.sleep(random.uniform(0, 0.002 * (attempt + 1)))
        raise ValueError("too much contention on the identity set")


def _decode_ids(data: bytes | None) -> list[str]:
    """The identity hashes of a stored set; ValueError (fail closed) when it is not one."""
    raw = json.loads(data or b"{}")
    ids = raw.get("identities", []) if isinstance(raw, dict) else None
    if not isinstance(ids, list) or len(ids) > MAX_IDENTITIES_LIMIT:
        raise ValueError("the identity set is not readable")
    if not all(isinstance(i, str) and _ID_HASH_RE.fullmatch(i) for i in ids):
        raise ValueError("the identity set is not readable")
    return list(dict.fromkeys(ids))


async def open_governance(
    nc: Any, config: TokenGovernanceConfig, registry: CollectorRegistry
) -> TokenGovernance | None:
    """The provisioner's enforcer (metrics ``choria_provisioner_token_*``), None when off."""
    if not config.enabled:
        return None
    metrics = GovernanceMetrics.create("choria_provisioner", registry)
    return await TokenGovernance.open(nc.jetstream(), config, metrics=metrics)


async def close_governance(governance: TokenGovernance | None) -> None:
    if governance is not None:
        await governance.close()

"""Identity pins of the auth callout (trust on first use), in a JetStream KV bucket."""

from __future__ import annotations

import contextlib
import hmac
from typing import Any

import nats.js.errors

__all__ = ["PinStore"]


class PinStore:
    """Identity → node nkey pins in a JetStream KV bucket (trust on first use).

    The bucket's ``max_age`` is the pin TTL, so a pin whose node vanished frees itself. All
    replicas share the bucket; ``create`` is atomic, so two nodes racing for one identity on two
    replicas still end with one winner.
    """

    def __init__(self, kv: Any) -> None:
        self._kv = kv

    @classmethod
    async def open(cls, js: Any, bucket: str, ttl: float) -> PinStore:
        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(bucket=bucket, ttl=ttl, history=1)
        return cls(kv)

    async def holder(self, identity: str) -> str | None:
        try:
            entry = await self._kv.get(identity)
        except nats.js.errors.KeyNotFoundError:
            return None
        return entry.value.decode() if entry.value else None

    async def claim(self, identity: str, nkey: str) -> bool:
        """True if ``nkey`` now holds ``identity`` (new pin, or already its own: TTL refreshed)."""
        for _ in range(3):
            try:
                await self._kv.create(identity, nkey.encode())
                return True
            except nats.js.errors.KeyWrongLastSequenceError:
                pass
            try:
                entry = await self._kv.get(identity)
            except nats.js.errors.KeyNotFoundError:
                continue  # expired or released between our two calls: try to create again
            if not hmac.compare_digest(entry.value or b"", nkey.encode()):
                return False
            with contextlib.suppress(nats.js.errors.KeyWrongLastSequenceError):
                await self._kv.update(identity, nkey.encode(), last=entry.revision)
            return True
        return False

    async def release(self, identity: str) -> None:
        with contextlib.suppress(nats.js.errors.KeyNotFoundError):
            await self._kv.delete(identity)

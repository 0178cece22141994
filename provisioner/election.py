"""Leader election on a NATS JetStream KV bucket (go-choria's streams election, spec §13).

Replicas campaign by *creating* the election key (succeeds only when no live leader holds it),
the leader holds it by *updating* it with the revision it last wrote (compare-and-set), and the
bucket's TTL (stream ``max_age``) makes a dead leader's key vanish so a candidate's next create
succeeds. The revision at which a leader won is its **epoch**: a fencing token that increases
with every leadership change, stored with per-node claims so a deposed leader's late writes are
refused (see :mod:`provisioner.claims`).

Timing with the defaults (TTL 3 s): the leader refreshes every TTL/3 (1 s); candidates campaign
every ``campaign_interval`` (0.5 s, jittered). A SIGKILLed leader's key expires at most TTL
after its last refresh, so failover takes about TTL + campaign_interval. A leader that stops
gracefully deletes the key, so a standby wins within one campaign interval.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from nats.js.api import KeyValueConfig, StorageType
from nats.js.errors import (
    BucketNotFoundError,
    KeyDeletedError,
    KeyNotFoundError,
    KeyWrongLastSequenceError,
    NotFoundError,
)

log = logging.getLogger(__name__)

Callback = Callable[[int], Awaitable[None] | None]

MIN_TTL = 1.0
MAX_TTL = 3600.0


class ElectionError(RuntimeError):
    """The election could not be set up (bad TTL, bucket problems)."""


@dataclass(frozen=True, slots=True)
class LeaderInfo:
    """Who holds the election key, as read from the bucket."""

    identity: str
    since: float
    revision: int
    epoch: int


async def ensure_bucket(js: Any, bucket: str, ttl: float) -> Any:
    """Return the election bucket, creating it with ``ttl`` as its max age if absent."""
    if not MIN_TTL <= ttl <= MAX_TTL:
        raise ElectionError(f"election ttl must be between {MIN_TTL}s and {MAX_TTL}s, got {ttl}s")
    try:
        return await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        pass
    config = KeyValueConfig(
        bucket=bucket,
        history=1,
        ttl=ttl,
        storage=StorageType.FILE,
        max_value_size=1024,
        description="fleet-provisioner leader election",
    )
    try:
        return await js.create_key_value(config=config)
    except Exception as exc:  # a concurrent replica may have created it first
        try:
            return await js.key_value(bucket)
        except Exception:
            raise ElectionError(f"cannot create election bucket {bucket!r}: {exc}") from exc


async def read_leader(js: Any, bucket: str, key: str = "provisioner") -> LeaderInfo | None:
    """The current leader, or None when nobody holds the key (or the bucket is absent)."""
    try:
        kv = await js.key_value(bucket)
        entry = await kv.get(key)
    except (BucketNotFoundError, NotFoundError, KeyNotFoundError, KeyDeletedError):
        return None
    if entry.value is None:
        return None
    try:
        data = json.loads(entry.value)
        return LeaderInfo(
            identity=str(data["identity"]),
            since=float(data.get("since", 0)),
            revision=int(entry.revision or 0),
            epoch=int(data.get("epoch", entry.revision or 0)),
        )
    except (ValueError, KeyError, TypeError):
        # go-choria stores the bare identity as the value
        return LeaderInfo(
            identity=entry.value.decode(errors="replace"),
            since=0.0,
            revision=int(entry.revision or 0),
            epoch=int(entry.revision or 0),
        )


class Election:
    """Campaign for and hold one election key; call back on winning and losing."""

    def __init__(
        self,
        js: Any,
        *,
        identity: str,
        bucket: str = "CHORIA_LEADER_ELECTION",
        key: str = "provisioner",
        ttl: float = 3.0,
        campaign_interval: float | None = None,
        on_won: Callback | None = None,
        on_lost: Callback | None = None,
        won_delay: float = 0.2,
    ) -> None:
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ElectionError(f"election ttl must be between {MIN_TTL}s and {MAX_TTL}s")
        self._js = js
        self.identity = identity
        self.bucket = bucket
        self.key = key
        self.ttl = ttl
        self.campaign_interval = campaign_interval or min(0.5, ttl / 4)
        self.refresh_interval = ttl / 3
        self._on_won = on_won
        self._on_lost = on_lost
        self._won_delay = won_delay
        self._kv: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._revision = 0
        self._last_renewal = 0.0
        self.epoch = 0
        self.is_leader = False
        self.terms = 0
        self.campaigns = 0

    async def start(self) -> None:
        """Ensure the bucket exists and start campaigning in the background."""
        self._kv = await ensure_bucket(self._js, self.bucket, self.ttl)
        self._stopping.clear()
        self._task = asyncio.create_task(self._loop(), name=f"election:{self.key}")

    async def stop(self) -> None:
        """Stop campaigning; a leader deletes its key so a standby takes over at once."""
        self._stopping.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.is_leader:
            with contextlib.suppress(Exception):
                await self._kv.delete(self.key, last=self._revision)
            await self._lose("stopped")

    def _value(self) -> bytes:
        return json.dumps(
            {"identity": self.identity, "since": time.time(), "epoch": self.epoch}
        ).encode()

    async def _loop(self) -> None:
        await asyncio.sleep(random.uniform(0, self.campaign_interval))
        while not self._stopping.is_set():
            try:
                if self.is_leader:
                    await self._renew()
                else:
                    await self._campaign()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # broker gone, timeouts: keep trying
                log.warning("election %s: %s: %s", self.key, type(exc).__name__, exc)
                if self.is_leader and time.monotonic() - self._last_renewal > self.ttl:
                    await self._lose("could not renew within ttl")
            delay = self.refresh_interval if self.is_leader else self.campaign_interval
            await asyncio.sleep(delay * random.uniform(0.8, 1.2))

    async def _campaign(self) -> None:
        self.campaigns += 1
        try:
            # The epoch must be known before the value is written; the create's revision is it.
            self.epoch = 0
            rev = await self._kv.create(self.key, self._value())
        except KeyWrongLastSequenceError:
            return
        self._revision = rev
        self.epoch = rev
        # Rewrite the value with the epoch and prove we can hold the key before acting.
        self._revision = await self._kv.update(self.key, self._value(), last=rev)
        self._last_renewal = time.monotonic()
        await asyncio.sleep(self._won_delay)
        self.is_leader = True
        self.terms += 1
        log.info("election %s: %s won (epoch %d)", self.key, self.identity, self.epoch)
        await _call(self._on_won, self.epoch)

    async def _renew(self) -> None:
        try:
            self._revision = await self._kv.update(self.key, self._value(), last=self._revision)
            self._last_renewal = time.monotonic()
        except (KeyWrongLastSequenceError, KeyNotFoundError, KeyDeletedError):
            await self._lose("key taken over or expired")

    async def _lose(self, why: str) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        log.warning("election %s: %s lost leadership: %s", self.key, self.identity, why)
        await _call(self._on_lost, self.epoch)

    def still_leader(self) -> bool:
        """True if leader and the lease was renewed within the TTL (a safe-point check)."""
        return self.is_leader and time.monotonic() - self._last_renewal < self.ttl


async def _call(cb: Callback | None, epoch: int) -> None:
    if cb is None:
        return
    result = cb(epoch)
    if asyncio.iscoroutine(result):
        await result

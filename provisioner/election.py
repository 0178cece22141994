"""Leader election on a NATS JetStream KV bucket (as go-choria's streams election).

Replicas campaign by *creating* the election key (succeeds only when no live leader holds it),
the leader holds it by *updating* it with the revision it last wrote (compare-and-set), and the
bucket's TTL (stream ``max_age``) makes a dead leader's key vanish so a candidate's next create
succeeds. The revision at which a leader won is its **epoch**: a fencing token that increases
with every leadership change, stored with per-node claims so a deposed leader's late writes are
refused (see :mod:`provisioner.claims`).

Timing with the defaults (TTL 3 s): the leader refreshes every TTL/3 (1 s); candidates campaign
every ``campaign_interval`` (0.25 s, jittered). A SIGKILLed leader's key expires at most TTL
after its last refresh, so failover takes about TTL + campaign_interval. A leader that stops
gracefully deletes the key, so a standby wins within one campaign interval.

The TTL that matters is the bucket's ``max_age``: it is fixed when the bucket is created. If an
existing bucket has a different one, the election adopts the bucket's TTL (like go-choria, which
reads it from the bucket status) and logs a warning; recreate the bucket to change it.

Candidates remember who holds the key (:attr:`Election.current`, refreshed at every campaign),
so a standby's status can say who leads without a KV read.

**Imported bucket (a Choria Broker, ``election.api_prefix: choria.streams``).** The provisioning
account has no JetStream of its own; the broker imports only ``STREAM.INFO`` of the bucket's
stream (under the prefix) and publishing to ``$KV.<bucket>.provisioner``. With ``imported=True``
the election uses nothing else, as go-choria's own election does: the bucket must exist (never
created), campaigning is a publish expecting no previous value (``update`` with ``last=0``; not
``kv.create``, whose tombstone check reads the key), holding is ``update`` with the last
revision, the value is the bare identity (what go-choria writes and ``choria election info``
shows). Nothing is ever read or deleted: a standby does not know who leads
(:attr:`Election.current` stays None), and a leader that stops gracefully cannot delete its key,
so a standby takes over when the key's last value ages out (at most the bucket's TTL later).
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

from choria_core.errors import FleetError

log = logging.getLogger(__name__)

Callback = Callable[[int], Awaitable[None] | None]

MIN_TTL = 1.0
MAX_TTL = 3600.0

#: The JetStream API prefix of an account's own JetStream (nats-py's default).
DEFAULT_API_PREFIX = "$JS.API"


class ElectionError(FleetError, RuntimeError, reason="election"):
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


async def open_imported_bucket(js: Any, bucket: str) -> Any:
    """The election bucket reached through an import: it must exist, it is never created."""
    try:
        return await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        raise ElectionError(
            f"election bucket {bucket!r} does not exist behind the imported API: create it in "
            "the account that holds it (a Choria Broker makes CHORIA_LEADER_ELECTION when "
            "Choria Streams is enabled)"
        ) from None
    except Exception as exc:  # no responders, timeout: the import is missing
        raise ElectionError(
            f"cannot reach election bucket {bucket!r} through the imported JetStream API "
            f"({type(exc).__name__}): does the broker import STREAM.INFO.KV_{bucket} under "
            "election.api_prefix for this account?"
        ) from None


async def read_leader(js: Any, bucket: str, key: str = "provisioner") -> LeaderInfo | None:
    """The current leader, or None when nobody holds the key (or the bucket is absent)."""
    try:
        kv = await js.key_value(bucket)
    except (BucketNotFoundError, NotFoundError):
        return None
    return await _read_key(kv, key)


async def _read_key(kv: Any, key: str) -> LeaderInfo | None:
    try:
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
            # epoch 0: the value written by the create itself, whose revision is the epoch
            epoch=int(data.get("epoch") or entry.revision or 0),
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
        imported: bool = False,
    ) -> None:
        if not MIN_TTL <= ttl <= MAX_TTL:
            raise ElectionError(f"election ttl must be between {MIN_TTL}s and {MAX_TTL}s")
        self._js = js
        self.identity = identity
        self.bucket = bucket
        self.key = key
        self.ttl = ttl
        # Campaigning is one KV create (and a read of the holder): cheap enough to do often.
        self.campaign_interval = campaign_interval or min(0.25, ttl / 4)
        self.refresh_interval = ttl / 3
        self._on_won = on_won
        self._on_lost = on_lost
        self._won_delay = won_delay
        #: The bucket is reached through a Choria Broker style import (see the module docstring).
        self.imported = imported
        self._kv: Any = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self._revision = 0
        self._last_renewal = 0.0
        self.epoch = 0
        #: Wall-clock time this replica last became leader (0 when it never was).
        self.since = 0.0
        self.is_leader = False
        self.terms = 0
        self.campaigns = 0
        #: Why leadership was last lost (for the audit record).
        self.lost_reason = ""
        #: Who holds the key as last seen (our own term while leader; None: nobody / unknown).
        self.current: LeaderInfo | None = None
        #: The holder seen before our latest win (None: unknown).
        self.previous: LeaderInfo | None = None
        # The last holder other than us ever seen: a read that lands just after a graceful
        # leader deleted its key sees nobody, but the handover still came from that leader.
        self._last_holder: LeaderInfo | None = None

    async def start(self) -> None:
        """Ensure the bucket exists and start campaigning in the background."""
        if self.imported:
            self._kv = await open_imported_bucket(self._js, self.bucket)
        else:
            self._kv = await ensure_bucket(self._js, self.bucket, self.ttl)
        await self._adopt_bucket_ttl()
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
            if not self.imported:  # an import allows no delete: the key ages out instead
                with contextlib.suppress(Exception):
                    await self._kv.delete(self.key, last=self._revision)
            await self._lose("stopped")

    async def _adopt_bucket_ttl(self) -> None:
        """Hold the lease by the bucket's real TTL when it differs from the configured one."""
        try:
            status = await self._kv.status()
            bucket_ttl = status.ttl
        except Exception as exc:  # status is advisory; the configured TTL still works
            log.debug("election %s: cannot read bucket status: %s", self.bucket, exc)
            return
        if not bucket_ttl or abs(float(bucket_ttl) - self.ttl) < 0.01:
            return
        bucket_ttl = float(bucket_ttl)
        # An imported bucket's TTL is the broker's to set: expected to differ, not a warning.
        log.log(
            logging.INFO if self.imported else logging.WARNING,
            "election bucket %s has ttl %.3gs, not the configured %.3gs: using %.3gs "
            "(delete the bucket to change it)",
            self.bucket,
            bucket_ttl,
            self.ttl,
            bucket_ttl,
        )
        self.ttl = min(max(bucket_ttl, MIN_TTL), MAX_TTL)
        self.refresh_interval = self.ttl / 3
        self.campaign_interval = min(self.campaign_interval, self.ttl / 2)

    def _value(self, epoch: int) -> bytes:
        if self.imported:  # as go-choria: the bare identity (nobody can read more anyway)
            return self.identity.encode()
        return json.dumps({"identity": self.identity, "since": self.since, "epoch": epoch}).encode()

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
        since = time.time()
        try:
            # The epoch is the create's revision, only known after the write: the first value
            # carries epoch 0 and is rewritten at once with the real epoch.
            self.since = since
            if self.imported:
                # kv.create would read the key after a refusal (tombstone check): not imported
                rev = await self._kv.update(self.key, self._value(0), last=0)
            else:
                rev = await self._kv.create(self.key, self._value(0))
        except KeyWrongLastSequenceError:
            await self._observe()
            return
        # Rewrite the value with the epoch and prove we can hold the key before acting.
        revision = await self._kv.update(self.key, self._value(rev), last=rev)
        self._revision = revision
        self.epoch = rev
        self._last_renewal = time.monotonic()
        await asyncio.sleep(self._won_delay)
        self.is_leader = True
        self.terms += 1
        # Who held the key before us, as last seen while campaigning (shows the handover).
        self.previous = self.current or self._last_holder
        self.current = LeaderInfo(self.identity, since, revision, rev)
        log.info("election %s: %s won (epoch %d)", self.key, self.identity, self.epoch)
        await _call(self._on_won, self.epoch)

    async def _observe(self) -> None:
        """Remember who holds the key (status of a standby); never fails the campaign."""
        if self.imported:  # the key cannot be read through the import
            self.current = None
            return
        try:
            self.current = await _read_key(self._kv, self.key)
            if self.current is not None and self.current.identity != self.identity:
                self._last_holder = self.current
        except Exception as exc:
            log.debug("election %s: cannot read the leader: %s", self.key, exc)

    async def _renew(self) -> None:
        try:
            self._revision = await self._kv.update(
                self.key, self._value(self.epoch), last=self._revision
            )
            self._last_renewal = time.monotonic()
        except KeyWrongLastSequenceError:
            # An update that timed out on our side may have been applied (broker restart): if
            # the key still holds our own term, carry on from its revision.
            if not await self._resync():
                await self._lose("key taken over")
        except (KeyNotFoundError, KeyDeletedError):
            await self._lose("key expired")

    async def _resync(self) -> bool:
        if self.imported:  # needs a read
            return False
        try:
            entry = await self._kv.get(self.key)
            data = json.loads(entry.value or b"{}")
        except Exception:
            return False
        if data.get("identity") != self.identity or data.get("epoch") != self.epoch:
            return False
        self._revision = int(entry.revision or 0)
        self._revision = await self._kv.update(
            self.key, self._value(self.epoch), last=self._revision
        )
        self._last_renewal = time.monotonic()
        log.info("election %s: resynchronised the lease at revision %d", self.key, self._revision)
        return True

    async def _lose(self, why: str) -> None:
        if not self.is_leader:
            return
        self.is_leader = False
        self.current = None
        self.lost_reason = why
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

"""The capacity ledger on a NATS JetStream KV bucket, shared by any number of placers.

Keys (bucket ``OVERLAY_LEDGER`` by default, history 1):

- ``cnt.<overlay>``: the number of places held (reserved + committed), ASCII digits. Only
  changed by compare-and-set (``kv.update(last=rev)``), so it never passes the capacity.
- ``node.<identity>``: the node's place, JSON ``{"o": overlay, "s": "r"|"c", "e": expiry,
  "g": group, "i": identity}``, created with ``kv.create`` so a node holds one place only.
- ``grp.<sha256>``: an affinity group's overlays, home first, JSON ``{"g": group, "o": [...]}``.

Order of writes, chosen so that a crash between two writes can only *over*-count (which
costs a place until an operator reconciles) and never lets an overlay overfill:
reserve = counter +1, then create the node key (on conflict: counter -1);
release/reclaim = delete the node key by revision, then counter -1.

Hot path: counter changes for one overlay are batched per process (group commit: the
coroutine holding the overlay's lock applies every pending +1/-1 in one CAS), so concurrency
inside a process does not turn into CAS retries. Expired reservations are reclaimed by
``sweep`` (the placer calls it before deferring for lack of room) and by a later ``reserve``
of the same node.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import nats.errors
import nats.js.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from overlays.ledger import AlreadyAssigned, Assignment, LedgerError, ReservationLost


@dataclass(frozen=True, slots=True)
class _ScanEntry:
    key: str
    value: bytes
    revision: int


DEFAULT_BUCKET = "OVERLAY_LEDGER"
_SAFE_IDENTITY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")
_WRONG_SEQ_CODES = (10071, 10164)
_MAX_TRIES = 16


def node_key(identity: str) -> str:
    """KV key of a node; identities outside the KV key alphabet are base64url-encoded."""
    if _SAFE_IDENTITY.match(identity) and len(identity) <= 255:
        return "node." + identity
    return "node.=" + base64.urlsafe_b64encode(identity.encode()).decode().rstrip("=")


def group_key(group: str) -> str:
    """KV key of an affinity group (hashed: group values are free text)."""
    return "grp." + hashlib.sha256(group.encode()).hexdigest()[:40]


def _wrong_seq(err: Exception) -> bool:
    if isinstance(err, nats.js.errors.KeyWrongLastSequenceError):
        return True
    return isinstance(err, nats.js.errors.APIError) and err.err_code in _WRONG_SEQ_CODES


@dataclass
class _Counter:
    value: int = 0
    rev: int | None = None  # None: unknown; 0: the key does not exist yet
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: list[tuple[int, int, asyncio.Future[bool]]] = field(default_factory=list)


class _Counters:
    """The ``cnt.<overlay>`` keys, changed by group commit.

    The coroutine holding an overlay's lock applies every pending +1/-1 in one CAS, so
    concurrency inside a process does not turn into CAS retries.
    """

    def __init__(self, kv: Callable[[], Awaitable[Any]]) -> None:
        self._kv = kv
        self._counters: dict[str, _Counter] = {}

    async def _load(self, overlay: str, c: _Counter) -> None:
        kv = await self._kv()
        try:
            entry = await kv.get("cnt." + overlay)
            c.value, c.rev = int(entry.value or b"0"), entry.revision
        except nats.js.errors.KeyNotFoundError:
            c.value, c.rev = 0, 0

    async def adjust(self, overlay: str, delta: int, capacity: int) -> bool:
        """Add ``delta`` to the overlay's count; a +1 is refused (False) past ``capacity``."""
        c = self._counters.setdefault(overlay, _Counter())
        fut: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        c.pending.append((delta, capacity, fut))
        async with c.lock:
            if not fut.done():
                batch, c.pending = c.pending, []
                try:
                    await self._apply(overlay, c, batch)
                except BaseException as err:
                    # The write may or may not have landed: forget the cached revision and
                    # fail the batch (a lost +1 only over-counts, which is the safe side).
                    c.rev = None
                    failure = err if isinstance(err, Exception) else LedgerError("interrupted")
                    for _, _, f in batch:
                        if not f.done():
                            f.set_exception(failure)
                    raise
        return fut.result()

    async def _apply(
        self, overlay: str, c: _Counter, batch: list[tuple[int, int, asyncio.Future[bool]]]
    ) -> None:
        kv = await self._kv()
        for _ in range(1000):
            fresh = False
            if c.rev is None:
                await self._load(overlay, c)
                fresh = True
            value = c.value
            results: list[bool] = []
            for delta, cap, _ in batch:
                if delta > 0:
                    ok = value + delta <= cap
                    value += delta if ok else 0
                    results.append(ok)
                else:
                    value = max(0, value + delta)
                    results.append(True)
            if not all(results) and not fresh:
                # Never deny on a cached count: others may have released places.
                c.rev = None
                continue
            if value != c.value:
                try:
                    if c.rev == 0:
                        rev = await kv.create("cnt." + overlay, str(value).encode())
                    else:
                        rev = await kv.update("cnt." + overlay, str(value).encode(), last=c.rev)
                except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as err:
                    if not _wrong_seq(err):
                        raise
                    c.rev = None
                    continue
                c.value, c.rev = value, rev
            for (_, _, f), ok in zip(batch, results, strict=True):
                f.set_result(ok)
            return
        raise LedgerError(f"counter for overlay {overlay!r}: CAS did not converge")


class KVLedger:
    """:class:`overlays.ledger.Ledger` on JetStream KV (atomic CAS on revisions)."""

    def __init__(
        self,
        js: Any,
        bucket: str = DEFAULT_BUCKET,
        *,
        replicas: int = 1,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._js = js
        self.bucket = bucket
        self._replicas = replicas
        self._clock = clock
        self._kv_obj: Any = None
        self._init_lock = asyncio.Lock()
        self._counters = _Counters(self._kv)
        self._groups: dict[str, tuple[list[str], int]] = {}
        self._mine: dict[str, tuple[Assignment, int]] = {}

    @classmethod
    async def open(cls, js: Any, bucket: str = DEFAULT_BUCKET, **kwargs: Any) -> KVLedger:
        """Construct and make sure the bucket exists (creating it if needed)."""
        ledger = cls(js, bucket, **kwargs)
        await ledger._guard("open", ledger._kv())
        return ledger

    async def _kv(self) -> Any:
        if self._kv_obj is None:
            async with self._init_lock:
                if self._kv_obj is None:
                    try:
                        self._kv_obj = await self._js.key_value(self.bucket)
                    except nats.js.errors.BucketNotFoundError:
                        # Concurrent creation with the same config is idempotent in JetStream.
                        self._kv_obj = await self._js.create_key_value(
                            bucket=self.bucket,
                            history=1,
                            replicas=self._replicas,
                            direct=True,
                            description="overlay capacity ledger (fleet provisioner)",
                        )
        return self._kv_obj

    async def _guard(self, op: str, coro: Any) -> Any:
        try:
            return await coro
        except (nats.errors.Error, TimeoutError) as err:
            raise LedgerError(f"ledger {self.bucket} {op}: {type(err).__name__}: {err}") from err

    # -- node keys -----------------------------------------------------------------------------

    @staticmethod
    def _decode(identity: str, value: bytes | None) -> Assignment | None:
        try:
            rec = json.loads(value or b"")
            return Assignment(
                identity=str(rec.get("i", identity)),
                overlay=str(rec["o"]),
                state="committed" if rec["s"] == "c" else "reserved",
                expires=rec.get("e"),
                group=rec.get("g"),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @staticmethod
    def _encode(a: Assignment) -> bytes:
        rec = {
            "o": a.overlay,
            "s": "c" if a.state == "committed" else "r",
            "e": a.expires,
            "g": a.group,
            "i": a.identity,
        }
        return json.dumps(rec, separators=(",", ":")).encode()

    async def _get_node(self, identity: str) -> tuple[Assignment, int] | None:
        kv = await self._kv()
        try:
            entry = await kv.get(node_key(identity))
        except nats.js.errors.KeyNotFoundError:
            return None
        a = self._decode(identity, entry.value)
        if a is None:
            # A corrupt record holds no place we can account for; treat it as absent
            # but keep its revision so that create() fails and we overwrite by CAS.
            return Assignment(identity, "", "reserved", 0.0), entry.revision
        return a, entry.revision

    async def _delete_node(self, identity: str, rev: int) -> bool:
        kv = await self._kv()
        try:
            await kv.delete(node_key(identity), last=rev)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as err:
            if _wrong_seq(err):
                return False
            raise
        return True

    async def _reclaim(self, a: Assignment, rev: int) -> bool:
        """Delete an expired or released place (by revision), then give its slot back."""
        if not await self._delete_node(a.identity, rev):
            return False
        if a.overlay:
            await self._counters.adjust(a.overlay, -1, 0)
        return True

    # -- Ledger API ----------------------------------------------------------------------------

    async def reserve(
        self,
        overlay: str,
        identity: str,
        *,
        capacity: int,
        ttl_s: float,
        group: str | None = None,
    ) -> bool:
        result: bool = await self._guard(
            "reserve", self._reserve(overlay, identity, capacity, ttl_s, group)
        )
        return result

    async def _reserve(
        self, overlay: str, identity: str, capacity: int, ttl_s: float, group: str | None
    ) -> bool:
        kv = await self._kv()
        key = node_key(identity)
        for _ in range(_MAX_TRIES):
            now = self._clock()
            mine = Assignment(identity, overlay, "reserved", now + ttl_s, group)
            if await self._counters.adjust(overlay, +1, capacity):
                try:
                    rev = await kv.create(key, self._encode(mine))
                    self._remember(mine, rev)
                    return True
                except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as err:
                    if not _wrong_seq(err):
                        await self._counters.adjust(overlay, -1, capacity)
                        raise
                await self._counters.adjust(overlay, -1, capacity)
                full = False
            else:
                full = True
            held = await self._get_node(identity)
            if held is None:
                if full:
                    return False
                continue  # released meanwhile: try again
            current, rev = held
            if current.live(now) and current.overlay:
                if current.overlay != overlay:
                    raise AlreadyAssigned(identity, current.overlay)
                if current.state == "committed":
                    return True
                if group is None:
                    mine = Assignment(identity, overlay, "reserved", mine.expires, current.group)
                try:
                    await kv.update(key, self._encode(mine), last=rev)  # refresh the expiry
                    return True
                except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as err:
                    if not _wrong_seq(err):
                        raise
                    continue
            await self._reclaim(current, rev)
            if full and not current.overlay == overlay:
                return False
        raise LedgerError(f"reserve {identity!r}: too much contention")

    async def commit(self, overlay: str, identity: str) -> None:
        await self._guard("commit", self._commit(overlay, identity))

    def _remember(self, a: Assignment, rev: int) -> None:
        # Revision of our own fresh reservation, so commit can CAS without reading first.
        if len(self._mine) >= 100_000:
            self._mine.clear()
        self._mine[a.identity] = (a, rev)

    async def _commit(self, overlay: str, identity: str) -> None:
        kv = await self._kv()
        mine = self._mine.pop(identity, None)
        if mine is not None and mine[0].overlay == overlay and mine[0].live(self._clock()):
            done = Assignment(identity, overlay, "committed", None, mine[0].group)
            try:
                await kv.update(node_key(identity), self._encode(done), last=mine[1])
                return
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as err:
                if not _wrong_seq(err):
                    raise
                # Changed since we reserved (refreshed, reclaimed...): read and decide below.
        for _ in range(_MAX_TRIES):
            held = await self._get_node(identity)
            if held is None or held[0].overlay != overlay or not held[0].live(self._clock()):
                raise ReservationLost(
                    f"node {identity!r} holds no live reservation in overlay {overlay!r}"
                )
            current, rev = held
            if current.state == "committed":
                return
            done = Assignment(identity, overlay, "committed", None, current.group)
            try:
                await kv.update(node_key(identity), self._encode(done), last=rev)
                return
            except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as err:
                if not _wrong_seq(err):
                    raise
        raise LedgerError(f"commit {identity!r}: too much contention")

    async def release(self, overlay: str, identity: str) -> None:
        await self._guard("release", self._release(overlay, identity))

    async def _release(self, overlay: str, identity: str) -> None:
        for _ in range(_MAX_TRIES):
            held = await self._get_node(identity)
            if held is None or held[0].overlay != overlay:
                return
            if await self._reclaim(*held):
                return
        raise LedgerError(f"release {identity!r}: too much contention")

    async def counts(self) -> dict[str, int]:
        result: dict[str, int] = await self._guard("counts", self._counts())
        return result

    async def _counts(self) -> dict[str, int]:
        # Stream info lists the counter subjects without creating a consumer (a watcher per
        # call would pile up ephemeral consumers on a busy placer); then one get per counter.
        kv = await self._kv()
        prefix = f"$KV.{self.bucket}.cnt."
        info = await self._js.stream_info(f"KV_{self.bucket}", subjects_filter=prefix + ">")
        names = sorted(s[len(prefix) :] for s in (info.state.subjects or {}))
        out: dict[str, int] = {}
        for name in names:
            try:
                entry = await kv.get("cnt." + name)
            except nats.js.errors.KeyNotFoundError:
                continue
            value = int(entry.value or b"0")
            if value:
                out[name] = value
        return out

    async def assignment(self, identity: str) -> str | None:
        a = await self.entry(identity)
        return a.overlay if a else None

    async def entry(self, identity: str) -> Assignment | None:
        held = await self._guard("get", self._get_node(identity))
        if held is None or not held[0].overlay or not held[0].live(self._clock()):
            return None
        a: Assignment = held[0]
        return a

    async def _node_entries(self) -> list[tuple[Assignment, int]]:
        out = []
        for e in await self._scan("node."):
            a = self._decode(e.key[5:], e.value)
            if a is not None:
                out.append((a, e.revision))
        return out

    async def assignments(self) -> dict[str, Assignment]:
        now = self._clock()
        entries = await self._guard("scan", self._node_entries())
        return {a.identity: a for a, _ in entries if a.live(now)}

    async def sweep(self) -> int:
        return int(await self._guard("sweep", self._sweep()))

    async def _sweep(self) -> int:
        now = self._clock()
        reclaimed = 0
        for a, rev in await self._node_entries():
            if not a.live(now) and await self._reclaim(a, rev):
                reclaimed += 1
        return reclaimed

    async def _scan(self, prefix: str) -> list[Any]:
        """All live entries under ``prefix`` (last value per key), read with a pull consumer.

        nats-py's KV watcher signals "initial values done" from a consumer-info snapshot taken
        while already-delivered messages may still wait in its callback, so under load it can
        report an empty bucket. A pull consumer delivers nothing before ``fetch``; its pending
        count is exact, and each message says how many remain.
        """
        stream = f"KV_{self.bucket}"
        base = f"$KV.{self.bucket}."
        config = ConsumerConfig(
            deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
            ack_policy=AckPolicy.NONE,
            inactive_threshold=5.0,
            mem_storage=True,
        )
        sub = await self._js.pull_subscribe(base + prefix + ">", stream=stream, config=config)
        out: list[Any] = []
        consumer_name: str | None = None
        try:
            info = await sub.consumer_info()
            consumer_name = info.name
            remaining = int(info.num_pending)
            while remaining > 0:
                for msg in await sub.fetch(min(remaining, 2048), timeout=10.0):
                    remaining = int(msg.metadata.num_pending)
                    op = (msg.headers or {}).get("KV-Operation")
                    if op in ("DEL", "PURGE"):
                        continue
                    out.append(
                        _ScanEntry(
                            key=msg.subject[len(base) :],
                            value=msg.data,
                            revision=int(msg.metadata.sequence.stream),
                        )
                    )
        finally:
            if consumer_name is not None:
                with contextlib.suppress(Exception):
                    await self._js.delete_consumer(stream, consumer_name)
            with contextlib.suppress(Exception):
                await sub.unsubscribe()
        return out

    # -- affinity groups ------------------------------------------------------------------------

    async def _load_group(self, group: str) -> tuple[list[str], int]:
        kv = await self._kv()
        try:
            entry = await kv.get(group_key(group))
        except nats.js.errors.KeyNotFoundError:
            state: tuple[list[str], int] = ([], 0)
        else:
            try:
                members = [str(o) for o in json.loads(entry.value or b"{}").get("o", [])]
            except (ValueError, AttributeError):
                members = []
            state = (members, entry.revision)
        self._groups[group] = state
        return state

    async def group_overlays(self, group: str, *, fresh: bool = False) -> list[str]:
        # Group lists only grow, so a cached list is a correct prefix: the placer tries the
        # cached overlays first and extend_group's CAS catches a stale cache.
        cached = self._groups.get(group)
        if cached is not None and not fresh:
            return list(cached[0])
        members, _ = await self._guard("group", self._load_group(group))
        return list(members)

    async def extend_group(self, group: str, expected: Sequence[str], overlay: str) -> list[str]:
        result: list[str] = await self._guard(
            "group", self._extend_group(group, list(expected), overlay)
        )
        return result

    async def _extend_group(self, group: str, expected: list[str], overlay: str) -> list[str]:
        kv = await self._kv()
        cached = self._groups.get(group)
        members, rev = cached if cached is not None else await self._load_group(group)
        if members != expected:
            members, rev = await self._load_group(group)
            if members != expected or overlay in members:
                return list(members)
        new = [*members, overlay]
        body = json.dumps({"g": group, "o": new}, separators=(",", ":")).encode()
        try:
            if rev == 0:
                rev = await kv.create(group_key(group), body)
            else:
                rev = await kv.update(group_key(group), body, last=rev)
        except (nats.js.errors.KeyWrongLastSequenceError, nats.js.errors.APIError) as err:
            if not _wrong_seq(err):
                raise
            members, rev = await self._load_group(group)
            return list(members)
        self._groups[group] = (new, rev)
        return list(new)

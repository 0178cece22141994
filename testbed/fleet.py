"""Fleet simulator: many :class:`~node_agent.node.NodeAgent` instances for tests, demo and bench.

Node ``i`` gets identity :func:`~node_agent.facts.synthetic_identity` ``(start + i)`` and the
deterministic facts :func:`~node_agent.facts.synthetic_facts` ``(start + i, seed)``, and its own
state directory ``<workdir>/nodes/<identity>``. All nodes of one OS process share one asyncio
event loop (no thread per node); keys are made lazily at ``gencsr`` time, optionally from a
pre-generated :class:`~node_agent.keys.KeyPool`.

``processes=P`` splits the nodes over P worker processes (``python -m testbed.fleet``), each
running its share in one loop and reporting counts as JSON lines on stdout; the parent reads them.
``connections="shared"`` multiplexes a process's nodes on one NATS connection (benchmarks only:
it bypasses per-node authentication and broker permissions).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import logging
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil

from node_agent.facts import synthetic_facts, synthetic_identity
from node_agent.keys import KeyPool, KeyType
from node_agent.node import NodeAgent, NodeError, NodeMode, Transport
from node_agent.transport import SharedConnections

__all__ = ["Fleet", "FleetSpec", "count_modes"]

log = logging.getLogger(__name__)

Connections = Literal["per-node", "shared"]
#: ``nats-py`` makes per-node connections use nats-py instead of the lean client (A/B runs).
TRANSPORT_ENV = "FLEET_TRANSPORT"
#: The worker processes' log level (default WARNING; INFO shows connect retries).
LOG_LEVEL_ENV = "FLEET_LOG_LEVEL"
#: Set to a directory to run each worker process under cProfile (``fleet-<start>.pstats`` there).
PROFILE_ENV = "FLEET_PROFILE_DIR"
_COUNT_KEYS = ("total", "starting", "provisioning", "normal", "stopped", "failed")


@dataclass(slots=True)
class FleetSpec:
    """Everything a worker process needs to run its share of the fleet (JSON-serialisable)."""

    start: int
    count: int
    token_path: str
    workdir: str
    broker_urls: list[str] | None = None
    seed: int = 0
    key_type: str = "ec"
    connections: str = "per-node"
    domain: str = "fleet.example.net"
    restart_delay_scale: float = 1.0
    key_pool: bool = False
    tls_ca: str | None = None
    connect_concurrency: int = 64
    report_interval: float = 0.25
    transport: str = "lean"


def count_modes(nodes: Sequence[NodeAgent], failed: int = 0, starting: int = 0) -> dict[str, int]:
    """Counts by mode (``starting`` = not yet up, ``failed`` = could not start)."""
    counts = dict.fromkeys(_COUNT_KEYS, 0)
    counts["total"] = len(nodes)
    for node in nodes:
        if node.mode in counts:
            counts[node.mode] += 1
    counts["stopped"] -= failed + starting
    counts["failed"] = failed
    counts["starting"] = starting
    return counts


class _FleetNode(NodeAgent):
    """A simulated node that keeps its fleet's per-mode tally as its mode changes (so a count
    report is O(1), not a walk over every node) and makes its synthetic facts when asked
    (``rpcutil#inventory``, ``get_fact``) instead of holding them for its whole life."""

    def __init__(self, tally: dict[str, int], index: int, seed: int, **kwargs: Any) -> None:
        self._tally = tally
        self._mode: NodeMode | None = None
        self._index, self._seed = index, seed
        super().__init__(**kwargs)

    @property
    def mode(self) -> NodeMode:
        assert self._mode is not None
        return self._mode

    @mode.setter
    def mode(self, value: NodeMode) -> None:
        old, self._mode = self._mode, value
        if old != value:
            if old is not None:
                self._tally[old] -= 1
            self._tally[value] = self._tally.get(value, 0) + 1

    def facts(self) -> dict[str, Any]:
        # Deterministic in (index, seed): the same answer every time, no per-node copy kept.
        return synthetic_facts(self._index, self._seed)


class _LocalFleet:
    """The nodes of one process, all in the running event loop.

    Nodes are made as they start (a few workers of ``connect_concurrency`` each take the next
    index), so the first node is up at once rather than after every node object exists."""

    def __init__(self, spec: FleetSpec) -> None:
        self.spec = spec
        self.shared = SharedConnections() if spec.connections == "shared" else None
        workdir = Path(spec.workdir)
        self._pool = (
            KeyPool(workdir / "keypool", spec.key_type, offset=spec.start)  # type: ignore[arg-type]
            if spec.key_pool
            else None
        )
        self._nodes_dir = (workdir / "nodes").absolute()
        self._token_path = Path(spec.token_path)
        self._tls_ca = Path(spec.tls_ca) if spec.tls_ca else None
        self._key_type: KeyType = "rsa" if spec.key_type == "rsa" else "ec"
        self._transport: Transport = "nats-py" if spec.transport == "nats-py" else "lean"
        #: Nodes by mode, kept by the nodes themselves (see :class:`_FleetNode`).
        self.tally: dict[str, int] = {}
        self.nodes: list[NodeAgent] = []
        self.failed = 0
        self.starting = spec.count
        #: Move the nodes made so far out of the cyclic collector's way every this many nodes
        #: (worker processes only: ``gc.freeze`` is process-wide).
        self.freeze_every = 0

    def _make(self, i: int) -> NodeAgent:
        identity = synthetic_identity(i, self.spec.domain)
        node = _FleetNode(
            self.tally,
            i,
            self.spec.seed,
            identity=identity,
            token_path=self._token_path,
            state_dir=self._nodes_dir / identity,
            facts=None,
            key_type=self._key_type,
            broker_urls=self.spec.broker_urls,
            tls_ca=self._tls_ca,
            key_pool=self._pool,
            shared=self.shared,
            restart_delay_scale=self.spec.restart_delay_scale,
            durable=False,
            transport=self._transport,
        )
        self.nodes.append(node)
        if self.freeze_every and len(self.nodes) % self.freeze_every == 0:
            gc.freeze()
        return node

    async def start(self) -> None:
        indices = iter(range(self.spec.start, self.spec.start + self.spec.count))

        async def _worker() -> None:
            for i in indices:
                node = self._make(i)
                try:
                    await node.start()
                except (NodeError, OSError) as exc:
                    self.failed += 1
                    log.error("node %s failed to start: %s", node.identity, exc)
                finally:
                    self.starting -= 1

        workers = min(max(1, self.spec.connect_concurrency), max(1, self.spec.count))
        await asyncio.gather(*(_worker() for _ in range(workers)))

    def counts(self) -> dict[str, int]:
        """Counts by mode, as :func:`count_modes` over every node would give (nodes not made
        yet are ``stopped``, then counted as ``starting``), in O(1)."""
        counts = dict.fromkeys(_COUNT_KEYS, 0)
        for mode, n in self.tally.items():
            if mode in counts:
                counts[mode] += n
        counts["total"] = self.spec.count
        counts["stopped"] += self.spec.count - len(self.nodes) - self.failed - self.starting
        counts["failed"] = self.failed
        counts["starting"] = self.starting
        return counts

    async def stop(self) -> None:
        await asyncio.gather(*(n.stop() for n in self.nodes), return_exceptions=True)
        if self.shared is not None:
            await self.shared.close()


@dataclass(slots=True)
class _Worker:
    proc: asyncio.subprocess.Process
    counts: dict[str, int] = field(default_factory=dict)
    rss: int = 0
    ready: asyncio.Event = field(default_factory=asyncio.Event)
    reader: asyncio.Task[None] | None = None


class Fleet:
    """A simulated fleet of ``nodes`` nodes. Use ``await start()``, ``counts()``,
    ``await wait_all_normal(t)``, ``await stop()``; ``rss_bytes()`` reports memory use."""

    def __init__(
        self,
        nodes: int,
        token_path: Path,
        broker_urls: Sequence[str] | None,
        workdir: Path,
        *,
        seed: int = 0,
        key_type: KeyType = "ec",
        processes: int = 1,
        connections: Connections = "per-node",
        key_pool: bool = False,
        start_index: int = 0,
        domain: str = "fleet.example.net",
        restart_delay_scale: float = 1.0,
        tls_ca: Path | None = None,
        connect_concurrency: int = 64,
        transport: Transport | None = None,
    ) -> None:
        if transport is None:
            transport = "nats-py" if os.environ.get(TRANSPORT_ENV) == "nats-py" else "lean"
        if nodes < 0:
            raise ValueError("nodes must be >= 0")
        if processes < 1:
            raise ValueError("processes must be >= 1")
        if connections not in ("per-node", "shared"):
            raise ValueError("connections must be 'per-node' or 'shared'")
        self.nodes = nodes
        self.processes = min(processes, max(1, nodes))
        self.workdir = Path(workdir)
        self.key_type: KeyType = key_type
        self._spec = FleetSpec(
            start=start_index,
            count=nodes,
            token_path=str(Path(token_path).absolute()),
            workdir=str(self.workdir.absolute()),
            broker_urls=list(broker_urls) if broker_urls else None,
            seed=seed,
            key_type=key_type,
            connections=connections,
            domain=domain,
            restart_delay_scale=restart_delay_scale,
            key_pool=key_pool,
            tls_ca=str(tls_ca) if tls_ca else None,
            connect_concurrency=connect_concurrency,
            transport=transport,
        )
        self._local: _LocalFleet | None = None
        self._workers: list[_Worker] = []

    @property
    def local_nodes(self) -> list[NodeAgent]:
        """The NodeAgent objects when running in this process (``processes == 1``)."""
        return self._local.nodes if self._local is not None else []

    def identities(self) -> list[str]:
        """All node identities, in index order."""
        s = self._spec
        return [synthetic_identity(i, s.domain) for i in range(s.start, s.start + s.count)]

    async def prepare_key_pool(self) -> int:
        """Fill the on-disk key pool for every node (process pool); returns keys generated."""
        pool = KeyPool(self.workdir / "keypool", self.key_type)
        return await asyncio.to_thread(pool.ensure, self.nodes, start=self._spec.start)

    async def start(self) -> None:
        """Start every node; returns once each is up (or failed)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self._spec.key_pool:
            await self.prepare_key_pool()
        if self.processes == 1:
            self._local = _LocalFleet(self._spec)
            await self._local.start()
            return
        per, extra = divmod(self.nodes, self.processes)
        start = self._spec.start
        for p in range(self.processes):
            count = per + (1 if p < extra else 0)
            spec = FleetSpec(**{**asdict(self._spec), "start": start, "count": count})
            start += count
            proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "testbed.fleet",
                json.dumps(asdict(spec)),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            worker = _Worker(proc)
            worker.reader = asyncio.get_running_loop().create_task(self._read(worker))
            self._workers.append(worker)
        await asyncio.gather(*(w.ready.wait() for w in self._workers))

    async def _read(self, worker: _Worker) -> None:
        assert worker.proc.stdout is not None
        async for line in worker.proc.stdout:
            try:
                msg = json.loads(line)
            except ValueError:
                continue
            worker.counts = msg.get("counts", worker.counts)
            worker.rss = int(msg.get("rss", worker.rss))
            if msg.get("event") in ("ready", "stopped"):
                worker.ready.set()
        worker.ready.set()  # a dead worker must not hang start()

    def counts(self) -> dict[str, int]:
        """Node counts by mode across all processes."""
        if self._local is not None:
            return self._local.counts()
        total = dict.fromkeys(_COUNT_KEYS, 0)
        for w in self._workers:
            for k in _COUNT_KEYS:
                total[k] += int(w.counts.get(k, 0))
        return total

    def rss_bytes(self) -> int:
        """Resident memory of the processes running nodes (this one, or the workers)."""
        if self._workers:
            return sum(w.rss for w in self._workers)
        return int(psutil.Process().memory_info().rss)

    async def wait_all_normal(self, timeout: float) -> None:
        """Wait until every node is in normal mode; TimeoutError with the counts otherwise."""
        deadline = time.monotonic() + timeout
        while True:
            counts = self.counts()
            if counts["normal"] >= self.nodes:
                return
            if time.monotonic() >= deadline:
                raise TimeoutError(f"not all nodes reached normal mode in {timeout}s: {counts}")
            await asyncio.sleep(0.1)

    async def stop(self) -> None:
        """Stop every node and worker process."""
        if self._local is not None:
            await self._local.stop()
        for w in self._workers:
            if w.proc.returncode is None and w.proc.stdin is not None:
                with contextlib.suppress(OSError):
                    w.proc.stdin.write(b"stop\n")
                    await w.proc.stdin.drain()
                    w.proc.stdin.close()
        for w in self._workers:
            try:
                await asyncio.wait_for(w.proc.wait(), 30)
            except TimeoutError:
                w.proc.kill()
                await w.proc.wait()
            if w.reader is not None:
                await w.reader


# --- worker process -------------------------------------------------------------------------


async def _worker_main(spec: FleetSpec) -> None:
    fleet = _LocalFleet(spec)
    fleet.freeze_every = 2_000
    # The nodes live as long as the process: keep them (and the imported modules) out of the
    # cyclic collector's way (again once they all exist), and collect young objects less often.
    gc.freeze()
    gc.set_threshold(10_000, 20, 20)
    gc_stats = _gc_timer() if os.environ.get("FLEET_GC_STATS") else None
    proc = psutil.Process()

    def report(event: str) -> None:
        msg = {"event": event, "counts": fleet.counts(), "rss": proc.memory_info().rss}
        sys.stdout.write(json.dumps(msg) + "\n")
        sys.stdout.flush()

    await fleet.start()
    gc.freeze()
    report("ready")
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    stop_line = loop.create_task(reader.readline())
    while not stop_line.done():
        await asyncio.wait({stop_line}, timeout=spec.report_interval)
        report("counts")
    await fleet.stop()
    report("stopped")
    if gc_stats is not None:
        sys.stderr.write(f"gc: {gc_stats} cpu: {time.process_time():.2f}s\n")


def _gc_timer() -> dict[str, float]:
    stats = {"collections": 0, "seconds": 0.0, "gen2": 0}
    started = [0.0]

    def _cb(phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            started[0] = time.process_time()
        else:
            stats["collections"] += 1
            stats["gen2"] += info["generation"] == 2
            stats["seconds"] += time.process_time() - started[0]

    gc.callbacks.append(_cb)
    return stats


def main(argv: Sequence[str] | None = None) -> None:
    """Worker entry point: ``python -m testbed.fleet '<FleetSpec JSON>'``."""
    parser = argparse.ArgumentParser(description="fleet simulator worker process (internal)")
    parser.add_argument("spec", help="FleetSpec as JSON")
    args = parser.parse_args(argv)
    spec = FleetSpec(**json.loads(args.spec))
    logging.basicConfig(
        level=os.environ.get(LOG_LEVEL_ENV, "WARNING").upper(),
        stream=sys.stderr,
        format="%(asctime)s %(name)s %(levelname)s %(message)s",
    )
    profile_dir = os.environ.get(PROFILE_ENV)
    if not profile_dir:
        asyncio.run(_worker_main(spec))
        return
    # Developer aid: profile this worker (cProfile, CPU time) or sample it (pyinstrument when
    # FLEET_PROFILER=pyinstrument) and leave <dir>/fleet-<start>.{pstats,txt} behind.
    if os.environ.get("FLEET_PROFILER") == "pyinstrument":
        from pyinstrument import Profiler

        sampler = Profiler(interval=0.0005, async_mode="disabled")
        sampler.start()
        try:
            asyncio.run(_worker_main(spec))
        finally:
            sampler.stop()
            text = sampler.output_text(unicode=False, show_all=False)
            (Path(profile_dir) / f"fleet-{spec.start}.txt").write_text(text)
        return
    import cProfile

    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        asyncio.run(_worker_main(spec))
    finally:
        profiler.disable()
        profiler.dump_stats(str(Path(profile_dir) / f"fleet-{spec.start}.pstats"))


if __name__ == "__main__":
    main()

"""The floor: the best nodes/minute this machine could do for our round trips and signatures.

Two raw rates, each measured with the whole machine at its disposal: NATS request/reply between
a requester and tiny responder processes (payload sizes like our RPCs), and the CA's signing
rate. :func:`floor_model` turns them into nodes/minute (``docs/benchmarks.md``, "The floor").
"""

from __future__ import annotations

import asyncio
import contextlib
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
import psutil
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA, SignRequest, adapter_from_config
from node_agent.facts import synthetic_identity
from testbed.bench.options import (
    RPC_PAYLOADS,
    RPCS_PER_NODE,
    SIGNATURES_PER_NODE,
    BenchError,
    KeyType,
)
from testbed.bench.stats import loadavg, ms_percentile
from testbed.natsserver import start_nats_server

__all__ = [
    "floor_model",
    "make_csrs",
    "measure_floor",
    "measure_rpc_floor",
    "measure_sign_floor",
    "responder_main",
]

_FLOOR_SUBJECT = "bench.floor.req"
_FLOOR_QUEUE = "bench-floor"
_FLOOR_REPLY_PREFIX = "bench.floor.rep"
_MSGS_LIMIT, _BYTES_LIMIT = 1_000_000, 1024 * 1024 * 1024


def _floor_payloads() -> list[tuple[bytes, bytes]]:
    """(request, reply) bodies per round trip; the first byte says which reply to send."""
    out = []
    for i, name in enumerate(RPCS_PER_NODE):
        req_size, rep_size = RPC_PAYLOADS[name]
        out.append((bytes([48 + i]) + b"q" * (req_size - 1), b"r" * rep_size))
    return out


async def responder_main(url: str) -> None:
    """The floor's responder process: answer every request with the reply of its size."""
    replies = [rep for _req, rep in _floor_payloads()]
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)

    async def cb(msg: Any) -> None:
        idx = msg.data[0] - 48 if msg.data else 0
        await nc.publish(msg.reply, replies[idx if 0 <= idx < len(replies) else 0])

    await nc.subscribe(
        _FLOOR_SUBJECT,
        queue=_FLOOR_QUEUE,
        cb=cb,
        pending_msgs_limit=_MSGS_LIMIT,
        pending_bytes_limit=_BYTES_LIMIT,
    )
    await nc.flush()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # until the parent closes stdin
    await nc.drain()


async def _start_responders(url: str, count: int) -> list[asyncio.subprocess.Process]:
    procs: list[asyncio.subprocess.Process] = []
    for _ in range(max(1, count)):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "testbed.bench", "responder", url,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
        )  # fmt: skip
        procs.append(proc)
    return procs


async def _wait_responders(procs: Sequence[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        assert proc.stdout is not None
        line = await asyncio.wait_for(proc.stdout.readline(), 30)
        if line.strip() != b"ready":
            raise BenchError("the floor responder process did not start")


async def _stop_responders(procs: Sequence[asyncio.subprocess.Process]) -> None:
    for proc in procs:
        if proc.stdin is not None:
            with contextlib.suppress(Exception):
                proc.stdin.close()
    for proc in procs:
        try:
            await asyncio.wait_for(proc.wait(), 10)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()


@dataclass
class _Requester:
    """``in_flight`` workers, each with one request outstanding at a time, on one connection
    with one wildcard reply subscription (like the provisioner's RPC client)."""

    nc: Any
    counting: bool = False
    done: int = 0
    stop_at: float = 0.0
    latencies: list[float] = field(default_factory=list)
    waiting: dict[str, asyncio.Future[None]] = field(default_factory=dict)

    async def subscribe(self) -> None:
        async def on_reply(msg: Any) -> None:
            fut = self.waiting.pop(msg.subject, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

        await self.nc.subscribe(
            f"{_FLOOR_REPLY_PREFIX}.>",
            cb=on_reply,
            pending_msgs_limit=_MSGS_LIMIT,
            pending_bytes_limit=_BYTES_LIMIT,
        )
        await self.nc.flush()

    async def worker(self, w: int) -> None:
        payloads = [req for req, _rep in _floor_payloads()]
        loop = asyncio.get_running_loop()
        seq = 0
        while True:
            subject = f"{_FLOOR_REPLY_PREFIX}.{w}.{seq}"
            payload = payloads[seq % len(payloads)]
            seq += 1
            fut: asyncio.Future[None] = loop.create_future()
            self.waiting[subject] = fut
            t0 = time.perf_counter()
            await self.nc.publish(_FLOOR_SUBJECT, payload, reply=subject)
            try:
                await asyncio.wait_for(fut, 10)
            except TimeoutError:
                self.waiting.pop(subject, None)
                continue
            if self.counting:
                self.done += 1
                if len(self.latencies) < 200_000:
                    self.latencies.append(time.perf_counter() - t0)
            if self.stop_at and time.monotonic() >= self.stop_at:
                return


async def _measure(req: _Requester, in_flight: int, seconds: float) -> tuple[int, float, float]:
    """(round trips counted, seconds, requester CPU seconds) after a warm-up."""
    tasks = [asyncio.create_task(req.worker(w)) for w in range(in_flight)]
    await asyncio.sleep(min(1.0, seconds / 3))  # warm up
    req.counting = True
    t_start = time.monotonic()
    cpu_start = psutil.Process().cpu_times()
    await asyncio.sleep(seconds)
    req.counting = False
    elapsed = time.monotonic() - t_start
    counted = req.done
    cpu_end = psutil.Process().cpu_times()
    req.stop_at = time.monotonic()
    await asyncio.wait(tasks, timeout=15)
    for t in tasks:
        t.cancel()
    cpu = (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system)
    return counted, elapsed, cpu


async def measure_rpc_floor(
    url: str, *, responders: int = 1, in_flight: int = 256, seconds: float = 3.0
) -> dict[str, Any]:
    """Round trips per second between this process and ``responders`` responder processes.

    Like the provisioner's RPC client: one connection, one wildcard reply subscription, requests
    matched to replies by subject, ``in_flight`` requests outstanding at all times, the six
    round trips of a node in turn with their payload sizes.
    """
    procs: list[asyncio.subprocess.Process] = []
    nc: Any = None
    try:
        procs = await _start_responders(url, responders)
        await _wait_responders(procs)
        nc = await nats.connect(url, pending_size=256 * 1024 * 1024, flusher_queue_size=65536)
        req = _Requester(nc)
        await req.subscribe()
        counted, elapsed, cpu = await _measure(req, in_flight, seconds)
        return {
            "round_trips_per_s": round(counted / elapsed, 1) if elapsed else 0.0,
            "round_trips": counted,
            "seconds": round(elapsed, 3),
            "in_flight": in_flight,
            "responders": len(procs),
            "requester_cpu_s": round(cpu, 3),
            "latency_p50_ms": ms_percentile(req.latencies, 50),
            "latency_p95_ms": ms_percentile(req.latencies, 95),
            "payloads": {k: {"request": v[0], "reply": v[1]} for k, v in RPC_PAYLOADS.items()},
        }
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
        await _stop_responders(procs)


def make_csrs(key_type: KeyType, count: int) -> list[tuple[str, str]]:
    """(identity, CSR PEM) pairs with node keys of ``key_type`` (CN = identity)."""
    out = []
    for i in range(count):
        ident = synthetic_identity(900_000 + i)
        key: Any = (
            rsa.generate_private_key(public_exponent=65537, key_size=2048)
            if key_type == "rsa"
            else ec.generate_private_key(ec.SECP256R1())
        )
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident)]))
            .sign(key, hashes.SHA256())
        )
        out.append((ident, csr.public_bytes(serialization.Encoding.PEM).decode()))
    return out


def _local_sign_loop(
    ca: LocalCA, reqs: Sequence[SignRequest], seconds: float, latencies: list[float]
) -> tuple[int, float]:
    for r in reqs[:5]:
        ca.sign_sync(r)
    n = 0
    t0 = time.perf_counter()
    while True:
        t1 = time.perf_counter()
        ca.sign_sync(reqs[n % len(reqs)])
        t2 = time.perf_counter()
        latencies.append(t2 - t1)
        n += 1
        if t2 - t0 >= seconds:
            return n, t2 - t0


async def _remote_sign_loop(
    adapter: Any,
    reqs: Sequence[SignRequest],
    seconds: float,
    concurrency: int,
    latencies: list[float],
) -> tuple[int, float]:
    for r in reqs[:5]:  # warm up: connections, AppRole login, /info
        await adapter.sign(r)
    n = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds

    async def worker(k: int) -> None:
        nonlocal n
        i = k
        while time.perf_counter() < deadline:
            t1 = time.perf_counter()
            await adapter.sign(reqs[i % len(reqs)])
            latencies.append(time.perf_counter() - t1)
            n += 1
            i += concurrency

    await asyncio.gather(*(worker(k) for k in range(concurrency)))
    return n, time.perf_counter() - t0


async def measure_sign_floor(
    ca_cfg: Mapping[str, Any],
    base_dir: Path,
    csrs: Sequence[tuple[str, str]],
    *,
    seconds: float = 2.0,
    concurrency: int = 8,
) -> dict[str, Any]:
    """Signatures per second of the CA the run uses.

    The local CA: ``LocalCA.sign_sync`` in a tight loop (what the CA itself can do in one
    process). A remote CA (cfssl, OpenBao): ``adapter.sign`` with ``concurrency`` requests
    in flight against the same server the run uses.
    """
    reqs = [SignRequest(identity=i, csr_pem=pem, ttl_s=30 * 86400.0) for i, pem in csrs]
    adapter = adapter_from_config(ca_cfg, base_dir=base_dir)
    latencies: list[float] = []
    try:
        if isinstance(adapter, LocalCA):
            loop = _local_sign_loop
            n, elapsed = await asyncio.to_thread(loop, adapter, reqs, seconds, latencies)
            method = "LocalCA.sign_sync loop (1 thread)"
        else:
            n, elapsed = await _remote_sign_loop(adapter, reqs, seconds, concurrency, latencies)
            method = f"adapter.sign, {concurrency} in flight"
    finally:
        await adapter.aclose()
    return {
        "signs_per_s": round(n / elapsed, 1) if elapsed else 0.0,
        "signs": n,
        "seconds": round(elapsed, 3),
        "method": method,
        "latency_p50_ms": ms_percentile(latencies, 50),
        "latency_p95_ms": ms_percentile(latencies, 95),
    }


def floor_model(
    round_trips_per_s: float,
    signs_per_s: float,
    *,
    rpcs_per_node: int = len(RPCS_PER_NODE),
    signs_per_node: int = SIGNATURES_PER_NODE,
) -> dict[str, Any]:
    """The best nodes/minute for this machine (see ``docs/benchmarks.md``, "The floor").

    Each raw rate was measured with the whole machine at its disposal, so a node's round trips
    and its signature compete for the same cores: their costs add. One node costs
    ``rpcs/R_rpc + signs/R_sign`` seconds of the machine, and the floor is the inverse. The
    optimistic ``bottleneck`` figure assumes the two never compete (separate machines).
    """
    if round_trips_per_s <= 0 or signs_per_s <= 0:
        return {"nodes_per_minute": None, "bottleneck_nodes_per_minute": None}
    per_node_s = rpcs_per_node / round_trips_per_s + signs_per_node / signs_per_s
    bottleneck = min(round_trips_per_s / rpcs_per_node, signs_per_s / signs_per_node)
    return {
        "rpcs_per_node": rpcs_per_node,
        "signs_per_node": signs_per_node,
        "machine_s_per_node": round(per_node_s, 7),
        "nodes_per_minute": round(60.0 / per_node_s, 1),
        "bottleneck_nodes_per_minute": round(60.0 * bottleneck, 1),
        "rpc_only_nodes_per_minute": round(60.0 * round_trips_per_s / rpcs_per_node, 1),
        "sign_only_nodes_per_minute": round(60.0 * signs_per_s / signs_per_node, 1),
    }


async def measure_floor(
    workdir: Path,
    ca_cfg: Mapping[str, Any],
    ca_base_dir: Path,
    *,
    key_type: KeyType,
    responders: int,
    in_flight: int,
    seconds: float,
    trials: int = 3,
) -> dict[str, Any]:
    """Both raw rates (median of ``trials``) and the floor model (a plain nats-server is
    started and stopped for the round trips)."""
    text = (
        "listen: 127.0.0.1:{port}\nhttp: 127.0.0.1:{monitor_port}\nmax_payload: 4MB\n"
        "write_deadline: 10s\n"
    )
    server = await asyncio.to_thread(
        start_nats_server, workdir / "floor-nats", config_text=text, jetstream=False
    )
    rpc_trials: list[dict[str, Any]] = []
    try:
        # The machine is shared and noisy: three short trials, the median counts.
        for _ in range(trials):
            rpc_trials.append(
                await measure_rpc_floor(
                    server.url, responders=responders, in_flight=in_flight, seconds=seconds
                )
            )
    finally:
        await asyncio.to_thread(server.stop)
    rpc = _median_trial(rpc_trials, "round_trips_per_s")
    csrs = await asyncio.to_thread(make_csrs, key_type, 8 if key_type == "rsa" else 32)
    sign_trials = [
        await measure_sign_floor(ca_cfg, ca_base_dir, csrs, seconds=max(1.0, seconds * 2 / 3))
        for _ in range(trials)
    ]
    sign = _median_trial(sign_trials, "signs_per_s")
    model = floor_model(rpc["round_trips_per_s"], sign["signs_per_s"])
    return {"rpc": rpc, "sign": sign, "model": model, "loadavg": loadavg()}


def _median_trial(trials: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """The trial with the median ``key``, with every trial's ``key`` listed under ``trials``."""
    ordered = sorted(trials, key=lambda t: float(t[key]))
    chosen = dict(ordered[(len(ordered) - 1) // 2])
    chosen["trials"] = [t[key] for t in trials]
    return chosen

"""``provisioner bench``: how fast we provision, how close that is to the machine's floor.

One run (:func:`run_bench`) does, on 127.0.0.1 inside one work directory:

1. **The floor** (:func:`measure_floor`): the raw NATS request/reply rate between two kinds of
   process on this machine (a tiny responder process per simulator process and one requester
   with many requests in flight, payload sizes like our RPCs), and the CA's raw signing rate
   (``LocalCA.sign_sync`` in a loop, or ``adapter.sign`` against the cfssl/OpenBao server the
   run uses). :func:`floor_model` turns them into the best nodes/minute this machine could do
   for the same number of round trips and signatures per node (``docs/benchmarks.md``).
2. **The run**: the provisioning broker (nats-server with the auth callout; or the static
   go-choria layout for shared simulator connections), the CA, one plain nats-server standing in
   for every overlay's brokers (provisioned nodes restart into it), the provisioner as a
   separate process (``provisioner run --config``) with the reference helper in the chosen mode,
   then ``N`` simulated nodes (:class:`testbed.fleet.Fleet`) in separate processes, from cold
   until every node is provisioned.
3. **The figures**: nodes/minute (cold start to the last node), time-to-provision percentiles
   (first sighting to ``restart`` acknowledged), per-stage latency percentiles (each RPC, the
   helper, from the audit log's stage timings; the provisioner's Prometheus histograms as a
   cross-check), CPU seconds of every process (psutil, sampled) and the provisioner's peak RSS.

It is a measurement, not a test: a slow run is reported, never failed. The result is written
to ``<results_dir>/<YYYY-MM-DD>-<name>.json`` with a markdown table appended as ``markdown``.

``python -m testbed.bench responder URL`` is the floor's responder process (internal).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import json
import logging
import math
import os
import platform
import re
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import yaml

log = logging.getLogger(__name__)

__all__ = [
    "RPCS_PER_NODE",
    "BenchError",
    "BenchOptions",
    "floor_model",
    "measure_floor",
    "parse_prometheus",
    "render_markdown",
    "run_bench",
    "write_result",
]

HelperMode = Literal["exec", "persistent", "python"]
CAKind = Literal["local", "cfssl", "openbao"]
KeyType = Literal["rsa", "ec"]
Connections = Literal["per-node", "shared"]
BrokerKind = Literal["auto", "callout", "static"]
Profiler = Literal["none", "pyinstrument", "cprofile"]

#: The round trips one node costs in our pipeline: the discovery (the node's ``startup`` event,
#: or a broadcast sweep reply) and the five directed RPCs of the happy path. The ``validate``,
#: ``csr_check``, ``check_output`` stages are local computation, not round trips.
RPCS_PER_NODE: tuple[str, ...] = ("discovery", "jwt", "inventory", "gencsr", "configure", "restart")
SIGNATURES_PER_NODE = 1

#: (request bytes, reply bytes) on the wire per round trip, sniffed from a 40-node run of this
#: pipeline (transport JSON, base64 bodies; replies 821-1749 bytes, mean 1386); the floor sends
#: payloads of the same sizes. Discovery is the node's ``startup`` event (461 bytes) and its
#: ``provisioned`` event (450), counted as one round trip.
RPC_PAYLOADS: dict[str, tuple[int, int]] = {
    "discovery": (461, 450),
    "jwt": (1087, 1700),
    "inventory": (987, 1750),
    "gencsr": (1155, 1700),
    "configure": (4769, 850),
    "restart": (1115, 820),
}

PROVISIONER_IDENTITY = "bench-provisioner.fleet.example.net"
SITE = "bench"
_FLOOR_SUBJECT = "bench.floor.req"
_FLOOR_QUEUE = "bench-floor"
_FLOOR_REPLY_PREFIX = "bench.floor.rep"


#: How the result file describes the exec example helpers.
_HELPER_LABELS = {
    "lean": "lean stdlib exec helper (helpers/examples/cfssl_authsign.py)",
    "go": "compiled Go exec helper (helpers/examples/go/cfssl-authsign)",
}


class BenchError(RuntimeError):
    """The benchmark could not set something up (the message says what)."""


# ===================================================================================== options


@dataclass(slots=True)
class BenchOptions:
    """What one ``provisioner bench`` run is asked for."""

    nodes: int = 1000
    helper_mode: HelperMode = "python"
    #: "reference": the reference helper (placement, CA adapter, templating) in ``helper_mode``;
    #: "lean": helpers/examples/cfssl_authsign.py, a stdlib-only exec helper (needs --ca cfssl);
    #: "go": the same helper compiled from helpers/examples/go/cfssl-authsign (needs Go)
    helper: Literal["reference", "lean", "go"] = "reference"
    ca: CAKind = "local"
    key_type: KeyType = "ec"
    connections: Connections = "per-node"
    sim_processes: int = 2
    name: str | None = None
    results_dir: Path | None = None
    workdir: Path | None = None
    #: nodes in flight in the provisioner (its ``concurrency``)
    concurrency: int = 256
    helper_pool_size: int = 2
    #: "auto": the auth-callout broker for per-node connections, the static go-choria layout for
    #: shared connections (a shared connection carries many identities, which the callout's
    #: per-identity permissions rightly refuse).
    broker: BrokerKind = "auto"
    callout_mode: Literal["task", "process"] = "process"
    tls: bool = False
    loglevel: str = "warn"
    profile: Profiler = "none"
    floor: bool = True
    floor_seconds: float = 2.0
    #: give up (and report) after this long; None: 120 s + a generous per-node allowance
    timeout: float | None = None
    #: give up (and report) when nothing got provisioned for this long
    stall_timeout: float = 90.0
    seed: int = 0
    restart_delay_scale: float = 1.0
    keep_workdir: bool = False
    #: where the simulated nodes keep their files: "auto" (tmpfs /dev/shm when there is one,
    #: else the work directory), "disk" (the work directory) or a directory path
    sim_dir: str = "auto"

    def effective_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        per_node = 0.3 if self.helper_mode == "exec" else 0.05
        return 120.0 + self.nodes * per_node

    def broker_kind(self) -> Literal["callout", "static"]:
        if self.broker != "auto":
            return self.broker
        return "static" if self.connections == "shared" else "callout"

    def default_name(self) -> str:
        conns = "shared" if self.connections == "shared" else "pernode"
        mode = f"{self.helper}-exec" if self.helper != "reference" else self.helper_mode
        return f"{self.nodes}-{mode}-{self.ca}-{self.key_type}-{conns}"

    def validate(self) -> None:
        if self.nodes < 1:
            raise BenchError("--nodes must be at least 1")
        if self.sim_processes < 1:
            raise BenchError("--sim-processes must be at least 1")
        if self.helper_mode not in ("exec", "persistent", "python"):
            raise BenchError("--helper-mode must be exec, persistent or python")
        if self.ca not in ("local", "cfssl", "openbao"):
            raise BenchError("--ca must be local, cfssl or openbao")
        if self.helper not in ("reference", "lean", "go"):
            raise BenchError("--helper must be reference, lean or go")
        if self.helper != "reference" and (self.helper_mode != "exec" or self.ca != "cfssl"):
            raise BenchError(f"--helper {self.helper} is an exec helper signing through cfssl: "
                             "use it with --helper-mode exec --ca cfssl")  # fmt: skip
        if self.key_type not in ("rsa", "ec"):
            raise BenchError("--key-type must be rsa or ec")
        if self.connections not in ("per-node", "shared"):
            raise BenchError("--connections must be per-node or shared")
        if self.broker not in ("auto", "callout", "static"):
            raise BenchError("--broker must be auto, callout or static")
        if self.profile not in ("none", "pyinstrument", "cprofile"):
            raise BenchError("--profile must be none, pyinstrument or cprofile")
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", self.name):
            raise BenchError("--name may hold letters, digits, '.', '_' and '-' only")
        if self.connections == "shared" and self.broker == "callout":
            raise BenchError(
                "--connections shared needs --broker static: a shared connection carries many "
                "node identities and the auth callout grants each connection one identity"
            )
        per_process = math.ceil(self.nodes / self.sim_processes)
        soft, _hard = _nofile_limits()
        if self.connections == "per-node" and soft and per_process + 500 > soft:
            raise BenchError(
                f"{per_process} per-node connections per simulator process exceed the open-file "
                f"limit ({soft}): use more --sim-processes or --connections shared"
            )


def _nofile_limits() -> tuple[int, int]:
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return int(soft), int(hard)
    except (ImportError, OSError, ValueError):
        return 0, 0


# ===================================================================================== utilities


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100), linear interpolation; ``None`` without values."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return float(data[0])
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return float(data[lo] + (data[hi] - data[lo]) * (pos - lo))


def _r(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def machine_info() -> dict[str, Any]:
    """nproc, memory, CPU model, Python and nats-server versions (for the docs and results)."""
    cpu_model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    nats_version = ""
    with contextlib.suppress(Exception):
        from testbed.natsserver import find_nats_server

        out = subprocess.run(
            [find_nats_server(), "--version"], capture_output=True, text=True, timeout=10
        )
        nats_version = out.stdout.strip() or out.stderr.strip()
    import importlib.metadata

    import cryptography

    try:
        nats_py = importlib.metadata.version("nats-py")
    except importlib.metadata.PackageNotFoundError:
        nats_py = ""
    return {
        "nproc": os.cpu_count(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "cpu_model": cpu_model,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "nats_server": nats_version,
        "nats_py": nats_py,
        "cryptography": cryptography.__version__,
        "nofile_limit": _nofile_limits()[0],
    }


def loadavg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# ===================================================================================== floor


def _floor_payloads() -> list[tuple[bytes, bytes]]:
    """(request, reply) bodies per round trip; the first byte says which reply to send."""
    out = []
    for i, name in enumerate(RPCS_PER_NODE):
        req_size, rep_size = RPC_PAYLOADS[name]
        out.append((bytes([48 + i]) + b"q" * (req_size - 1), b"r" * rep_size))
    return out


async def _responder_main(url: str) -> None:
    """The floor's responder process: answer every request with the reply of its size."""
    import nats

    replies = [rep for _req, rep in _floor_payloads()]
    nc = await nats.connect(url, pending_size=64 * 1024 * 1024)

    async def cb(msg: Any) -> None:
        idx = msg.data[0] - 48 if msg.data else 0
        await nc.publish(msg.reply, replies[idx if 0 <= idx < len(replies) else 0])

    await nc.subscribe(
        _FLOOR_SUBJECT, queue=_FLOOR_QUEUE, cb=cb, pending_msgs_limit=1_000_000,
        pending_bytes_limit=1024 * 1024 * 1024,
    )  # fmt: skip
    await nc.flush()
    sys.stdout.write("ready\n")
    sys.stdout.flush()
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    await reader.read()  # until the parent closes stdin
    await nc.drain()


async def measure_rpc_floor(
    url: str, *, responders: int = 1, in_flight: int = 256, seconds: float = 3.0
) -> dict[str, Any]:
    """Round trips per second between this process and ``responders`` responder processes.

    Like the provisioner's RPC client: one connection, one wildcard reply subscription, requests
    matched to replies by subject, ``in_flight`` requests outstanding at all times, the six
    round trips of a node in turn with their payload sizes.
    """
    import nats

    procs: list[asyncio.subprocess.Process] = []
    nc: Any = None
    try:
        for _ in range(max(1, responders)):
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "testbed.bench", "responder", url,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            )  # fmt: skip
            procs.append(proc)
        for proc in procs:
            assert proc.stdout is not None
            line = await asyncio.wait_for(proc.stdout.readline(), 30)
            if line.strip() != b"ready":
                raise BenchError("the floor responder process did not start")
        nc = await nats.connect(url, pending_size=256 * 1024 * 1024, flusher_queue_size=65536)
        waiting: dict[str, asyncio.Future[None]] = {}

        async def on_reply(msg: Any) -> None:
            fut = waiting.pop(msg.subject, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

        await nc.subscribe(
            f"{_FLOOR_REPLY_PREFIX}.>", cb=on_reply, pending_msgs_limit=1_000_000,
            pending_bytes_limit=1024 * 1024 * 1024,
        )  # fmt: skip
        await nc.flush()
        payloads = [req for req, _rep in _floor_payloads()]
        loop = asyncio.get_running_loop()
        counting = False
        done = 0
        latencies: list[float] = []
        stop_at = 0.0

        async def worker(w: int) -> None:
            nonlocal done
            seq = 0
            while True:
                subject = f"{_FLOOR_REPLY_PREFIX}.{w}.{seq}"
                payload = payloads[seq % len(payloads)]
                seq += 1
                fut: asyncio.Future[None] = loop.create_future()
                waiting[subject] = fut
                t0 = time.perf_counter()
                await nc.publish(_FLOOR_SUBJECT, payload, reply=subject)
                try:
                    await asyncio.wait_for(fut, 10)
                except TimeoutError:
                    waiting.pop(subject, None)
                    continue
                if counting:
                    done += 1
                    if len(latencies) < 200_000:
                        latencies.append(time.perf_counter() - t0)
                if stop_at and time.monotonic() >= stop_at:
                    return

        cpu0 = psutil.Process().cpu_times()
        tasks = [asyncio.create_task(worker(w)) for w in range(in_flight)]
        await asyncio.sleep(min(1.0, seconds / 3))  # warm up
        counting = True
        t_start = time.monotonic()
        cpu_start = psutil.Process().cpu_times()
        await asyncio.sleep(seconds)
        counting = False
        elapsed = time.monotonic() - t_start
        counted = done
        cpu_end = psutil.Process().cpu_times()
        stop_at = time.monotonic()
        await asyncio.wait(tasks, timeout=15)
        for t in tasks:
            t.cancel()
        _ = cpu0
        return {
            "round_trips_per_s": round(counted / elapsed, 1) if elapsed else 0.0,
            "round_trips": counted,
            "seconds": round(elapsed, 3),
            "in_flight": in_flight,
            "responders": len(procs),
            "requester_cpu_s": round(
                (cpu_end.user + cpu_end.system) - (cpu_start.user + cpu_start.system), 3
            ),
            "latency_p50_ms": _r((percentile(latencies, 50) or 0) * 1000),
            "latency_p95_ms": _r((percentile(latencies, 95) or 0) * 1000),
            "payloads": {k: {"request": v[0], "reply": v[1]} for k, v in RPC_PAYLOADS.items()},
        }
    finally:
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()
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


def make_csrs(key_type: KeyType, count: int) -> list[tuple[str, str]]:
    """(identity, CSR PEM) pairs with node keys of ``key_type`` (CN = identity)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa
    from cryptography.x509.oid import NameOID

    from node_agent.facts import synthetic_identity

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
    from ca_adapters import LocalCA, SignRequest, adapter_from_config

    reqs = [SignRequest(identity=i, csr_pem=pem, ttl_s=30 * 86400.0) for i, pem in csrs]
    adapter = adapter_from_config(ca_cfg, base_dir=base_dir)
    latencies: list[float] = []
    try:
        if isinstance(adapter, LocalCA):
            ca = adapter

            def loop() -> tuple[int, float]:
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

            n, elapsed = await asyncio.to_thread(loop)
            method = "LocalCA.sign_sync loop (1 thread)"
        else:
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
            elapsed = time.perf_counter() - t0
            method = f"adapter.sign, {concurrency} in flight"
    finally:
        await adapter.aclose()
    return {
        "signs_per_s": round(n / elapsed, 1) if elapsed else 0.0,
        "signs": n,
        "seconds": round(elapsed, 3),
        "method": method,
        "latency_p50_ms": _r((percentile(latencies, 50) or 0) * 1000),
        "latency_p95_ms": _r((percentile(latencies, 95) or 0) * 1000),
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
    from testbed.natsserver import start_nats_server

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


# ===================================================================================== metrics


_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(.*)\})?\s+(\S+)")
_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_prometheus(text: str) -> list[tuple[str, dict[str, str], float]]:
    """Samples of a Prometheus text exposition: (name, labels, value)."""
    out = []
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(_LABEL.findall(m.group(3) or ""))
        try:
            value = float(m.group(4))
        except ValueError:
            continue
        out.append((m.group(1), labels, value))
    return out


def sample(samples: Iterable[tuple[str, dict[str, str], float]], name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total = 0.0
    for n, lab, v in samples:
        if n == name and all(lab.get(k) == val for k, val in labels.items()):
            total += v
    return total


def histogram_quantiles(
    samples: Sequence[tuple[str, dict[str, str], float]], name: str, by: str
) -> dict[str, dict[str, float | None]]:
    """p50/p95 (linear within a bucket), count and mean per value of label ``by``."""
    buckets: dict[str, list[tuple[float, float]]] = {}
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for n, lab, v in samples:
        key = lab.get(by)
        if key is None:
            continue
        if n == f"{name}_bucket":
            le = lab.get("le", "+Inf")
            buckets.setdefault(key, []).append((math.inf if le == "+Inf" else float(le), v))
        elif n == f"{name}_count":
            counts[key] = v
        elif n == f"{name}_sum":
            sums[key] = v
    out: dict[str, dict[str, float | None]] = {}
    for key, bs in buckets.items():
        bs.sort()
        total = counts.get(key, bs[-1][1] if bs else 0.0)

        def q(
            frac: float, bs: list[tuple[float, float]] = bs, total: float = total
        ) -> float | None:
            if total <= 0:
                return None
            target = frac * total
            prev_le, prev_c = 0.0, 0.0
            for le, c in bs:
                if c >= target:
                    if math.isinf(le):
                        return prev_le
                    span = c - prev_c
                    return prev_le + (le - prev_le) * ((target - prev_c) / span if span else 1.0)
                prev_le, prev_c = le, c
            return prev_le

        out[key] = {
            "count": total,
            "mean_ms": _r(sums.get(key, 0.0) / total * 1000) if total else None,
            "p50_ms": _r((q(0.5) or 0.0) * 1000) if total else None,
            "p95_ms": _r((q(0.95) or 0.0) * 1000) if total else None,
        }
    return out


# ===================================================================================== processes


class ProcSampler:
    """Samples CPU time and RSS of the run's processes by role, in a thread (psutil)."""

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self._roles: dict[str, Callable[[], list[psutil.Process]]] = {}
        self._last: dict[tuple[str, int], float] = {}
        self._base: dict[tuple[str, int], float] = {}
        self._peak_rss: dict[str, int] = {}
        self._rss_now: dict[str, int] = {}
        self._reaped_base: float | None = None
        self._reaped_last = 0.0
        self._provisioner: psutil.Process | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._baseline_taken = False
        self._procs: dict[int, psutil.Process] = {}

    def add_role(self, role: str, finder: Callable[[], list[psutil.Process]]) -> None:
        with self._lock:
            self._roles[role] = finder

    def set_provisioner(self, proc: psutil.Process) -> None:
        self._provisioner = proc

    def _proc(self, pid: int) -> psutil.Process | None:
        # Keep one psutil.Process per pid: cpu_percent state and pid-reuse checks live there.
        p = self._procs.get(pid)
        if p is None:
            try:
                p = psutil.Process(pid)
            except psutil.Error:
                return None
            self._procs[pid] = p
        return p

    def sample(self) -> None:
        with self._lock:
            roles = dict(self._roles)
        for role, finder in roles.items():
            try:
                procs = finder()
            except psutil.Error:
                continue
            rss_total = 0
            for proc in procs:
                try:
                    with proc.oneshot():
                        t = proc.cpu_times()
                        rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                key = (role, proc.pid)
                self._last[key] = t.user + t.system
                rss_total += rss
            self._rss_now[role] = rss_total
            self._peak_rss[role] = max(self._peak_rss.get(role, 0), rss_total)
        prov = self._provisioner
        if prov is not None:
            with contextlib.suppress(psutil.Error):
                t = prov.cpu_times()
                reaped = t.children_user + t.children_system
                self._reaped_last = reaped
                if self._reaped_base is None:
                    self._reaped_base = reaped

    def baseline(self) -> None:
        """Start of the measured window: CPU from here on counts."""
        self.sample()
        self._base = dict(self._last)
        self._reaped_base = self._reaped_last
        self._peak_rss = dict(self._rss_now)
        self._baseline_taken = True

    def cpu_seconds(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for (role, pid), value in self._last.items():
            base = self._base.get((role, pid), 0.0)
            out[role] = out.get(role, 0.0) + max(0.0, value - base)
        # Children the provisioner reaped (exec-mode helper processes) are helper CPU.
        reaped = max(0.0, self._reaped_last - (self._reaped_base or 0.0))
        if reaped:
            out["helpers"] = out.get("helpers", 0.0) + reaped
        return {k: round(v, 2) for k, v in sorted(out.items())}

    def peak_rss_mb(self) -> dict[str, float]:
        return {k: round(v / 2**20, 1) for k, v in sorted(self._peak_rss.items())}

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sample()
            except Exception as exc:  # a sampling hiccup must not end the benchmark
                log.debug("sampling failed: %s", exc)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="bench-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        with contextlib.suppress(Exception):
            self.sample()


def _children_matching(parent: psutil.Process, *needles: str) -> list[psutil.Process]:
    out = []
    with contextlib.suppress(psutil.Error):
        for child in parent.children(recursive=True):
            with contextlib.suppress(psutil.Error):
                cmd = " ".join(child.cmdline())
                if any(n in cmd for n in needles):
                    out.append(child)
    return out


def _pid_finder(pid: int | None) -> Callable[[], list[psutil.Process]]:
    cache: list[psutil.Process] = []

    def find() -> list[psutil.Process]:
        if pid is None:
            return []
        if not cache:
            with contextlib.suppress(psutil.Error):
                cache.append(psutil.Process(pid))
        return [p for p in cache if p.is_running()]

    return find


# ===================================================================================== the run


Cleanup = Callable[[], Awaitable[None]]


def _write_secret(path: Path, data: bytes) -> None:
    from jwt_tools import write_private_file

    path.parent.mkdir(parents=True, exist_ok=True)
    write_private_file(path, data)


@dataclass(slots=True)
class _Progress:
    t: float
    provisioned: int
    waiting: int
    in_flight: int


@dataclass(slots=True)
class RunState:
    """What the run learns while it goes (kept for the result)."""

    t0: float = 0.0
    t_end: float = 0.0
    timed_out: bool = False
    stalled: bool = False
    fleet_started_s: float | None = None
    timeline: list[_Progress] = field(default_factory=list)
    peak_waiting: int = 0
    notes: list[str] = field(default_factory=list)


class Bench:
    """Everything one run starts; ``await setup()``, ``await run()``, ``await collect()``, and
    always ``await close()`` (stops what was started, in reverse order; never raises)."""

    def __init__(self, options: BenchOptions) -> None:
        options.validate()
        self.o = options
        self._own_workdir = options.workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="provisioner-bench-"))
            if options.workdir is None
            else Path(options.workdir).absolute()
        )
        self._cleanups: list[tuple[str, Cleanup]] = []
        self._closed = False
        self.admin_token = secrets.token_urlsafe(24)
        self.broker_url = ""
        self.broker_pid: int | None = None
        self.overlay_pid: int | None = None
        self.overlay_url = ""
        self.lean_env: dict[str, str] = {}
        self.ca_pid: int | None = None
        self.ca_cfg: dict[str, Any] = {}
        self.ca_label = ""
        self.token_path = self.workdir / "keys" / "provisioning.jwt"
        self.sim_dir, self._own_sim_dir = _simulator_dir(options.sim_dir, self.workdir)
        self.prov_proc: subprocess.Popen[bytes] | None = None
        self.admin_port = 0
        self.fleet: Any = None
        self.fleet_task: asyncio.Task[None] | None = None
        self.sampler = ProcSampler()
        self.state = RunState()
        self.floor: dict[str, Any] | None = None
        self.profile_out: Path | None = None
        self._http: Any = None
        self._broker: Any = None

    def _push(self, what: str, fn: Cleanup) -> None:
        self._cleanups.append((what, fn))

    # ------------------------------------------------------------------ setup

    async def setup(self, say: Callable[[str], None]) -> None:
        o = self.o
        self.workdir.mkdir(parents=True, exist_ok=True)
        say(f"work directory {self.workdir}")
        signer_key, verify_path, cht = await asyncio.to_thread(self._make_keys)

        say(f"provisioning broker ({o.broker_kind()})")
        prov_user, prov_password, node_creds = await self._start_broker(verify_path)
        await asyncio.to_thread(self._write_token, signer_key, cht, node_creds)

        say(f"CA ({o.ca})")
        await self._start_ca()

        if o.floor:
            say("floor: raw NATS request/reply and raw CA signing")
            self.floor = await measure_floor(
                self.workdir,
                self.ca_cfg,
                self.workdir / "ca",
                key_type=o.key_type,
                responders=o.sim_processes,
                in_flight=o.concurrency,
                seconds=o.floor_seconds,
            )
            m = self.floor["model"]
            say(
                f"floor: {self.floor['rpc']['round_trips_per_s']:.0f} round trips/s, "
                f"{self.floor['sign']['signs_per_s']:.0f} signatures/s "
                f"-> {m['nodes_per_minute']:.0f} nodes/min"
            )

        say("overlay broker (plain nats-server for provisioned nodes)")
        overlays_path = await self._start_overlay()
        helper_cfg = await asyncio.to_thread(self._write_helper_config, overlays_path)

        if o.key_type == "rsa":
            say("RSA key pool for the simulated nodes (not timed)")
            from node_agent.keys import KeyPool

            pool = KeyPool(self.sim_dir / "keypool", "rsa")
            await asyncio.to_thread(pool.ensure, o.nodes)

        say(f"provisioner process ({o.helper_mode} helper)")
        await self._start_provisioner(prov_user, prov_password, cht, verify_path, helper_cfg,
                                      overlays_path)  # fmt: skip

    def _make_keys(self) -> tuple[Any, Path, str]:
        from jwt_tools import generate_keypair, load_signing_key, write_public_file

        keys = self.workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        priv, pub = generate_keypair("ed25519")
        signer_path, verify_path = keys / "signer.seed", keys / "signer.pub"
        _write_secret(signer_path, priv)
        write_public_file(verify_path, pub)
        return load_signing_key(signer_path), verify_path, secrets.token_urlsafe(24)

    def _write_token(self, signer_key: Any, cht: str, node_creds: tuple[str, str] | None) -> None:
        from jwt_tools import create_provisioning_token

        kwargs: dict[str, Any] = {}
        if node_creds is not None:
            kwargs = {"username": node_creds[0], "password": node_creds[1]}
        jwt = create_provisioning_token(
            signer_key,
            token=cht,
            urls=[self.broker_url],
            validity_s=86400,
            default=True,
            secure=False,
            **kwargs,
        )
        _write_secret(self.token_path, jwt.encode())

    async def _start_broker(self, verify_path: Path) -> tuple[str, str, tuple[str, str] | None]:
        """Returns (provisioner user, password, node user/password for the token or None)."""
        o = self.o
        if o.broker_kind() == "callout":
            from testbed.isolated_broker import start_isolated_broker

            broker = await start_isolated_broker(
                self.workdir / "broker",
                [str(verify_path)],
                tls=o.tls,
                callout_mode=o.callout_mode,
            )
            self._broker = broker
            self._push("provisioning broker", broker.stop)
            self.broker_url = broker.url
            self.broker_pid = broker.server.pid
            user, password = broker.provisioner_credentials
            return user, password, None
        if o.tls:
            raise BenchError("--tls needs the callout broker (per-node connections)")
        from testbed.natsserver import start_nats_server

        server = await asyncio.to_thread(start_nats_server, self.workdir / "broker")
        self._push("provisioning broker", lambda: asyncio.to_thread(server.stop))
        self.broker_url = server.url
        self.broker_pid = server.pid
        user, password = server.users["provisioner"]
        return user, password, server.users["node"]

    async def _start_ca(self) -> None:
        from ca_adapters import LocalCA

        ca_dir = self.workdir / "ca"
        if self.o.ca == "local":
            ca = await asyncio.to_thread(LocalCA.generate, "ec", "Fleet Bench CA")
            cert, key = await asyncio.to_thread(ca.write, ca_dir)
            self.ca_cfg = {"type": "local", "cert": str(cert), "key": str(key)}
            self.ca_label = "local (EC P-256, in the helper's process)"
            return
        from testbed.ca_servers import ServerNotAvailable, start_cfssl, start_openbao

        try:
            if self.o.ca == "cfssl":
                cfssl = await asyncio.to_thread(start_cfssl, ca_dir)
                self._push("cfssl serve", lambda: asyncio.to_thread(cfssl.stop))
                auth = ca_dir / "auth-key.hex"
                _write_secret(auth, cfssl.auth_key_hex.encode())
                self.ca_cfg = {
                    "type": "cfssl",
                    "url": cfssl.url,
                    "auth_key_file": str(auth),
                    "profile": "node",
                    "ca_file": str(cfssl.ca_cert_path),
                }
                self.ca_pid = cfssl.pid
                self.ca_label = "cfssl serve (authsign, plain HTTP)"
                self.lean_env = {
                    "CFSSL_URL": cfssl.url,
                    "CFSSL_AUTH_KEY_FILE": str(auth),
                    "CFSSL_PROFILE": "node",
                    "CFSSL_CA_FILE": str(cfssl.ca_cert_path),
                }
                return
            bao = await asyncio.to_thread(
                start_openbao, ca_dir, allowed_domains=("fleet.example.net",)
            )
            self._push("openbao", lambda: asyncio.to_thread(bao.stop))
            ca_file = ca_dir / "bao-ca.pem"
            ca_file.write_text(bao.ca_pem)
            secret_id = ca_dir / "secret-id"
            _write_secret(secret_id, bao.secret_id.encode())
            role_id = ca_dir / "role-id"
            _write_secret(role_id, bao.role_id.encode())
            self.ca_cfg = {
                "type": "openbao",
                "url": bao.url,
                "mount": "pki",
                "role": "node",
                "approle": {"role_id_file": str(role_id), "secret_id_file": str(secret_id)},
                "ca_file": str(ca_file),
            }
            self.ca_pid = bao.pid
            self.ca_label = "OpenBao dev server (pki/sign, AppRole, plain HTTP)"
        except ServerNotAvailable as exc:
            raise BenchError(f"--ca {self.o.ca}: {exc}") from None

    async def _start_overlay(self) -> Path:
        from overlays import load_sample_registry
        from testbed.demo import overlay_server_config
        from testbed.natsserver import start_nats_server

        text = overlay_server_config("bench", tls=None, max_connections=self.o.nodes + 1000)
        server = await asyncio.to_thread(
            start_nats_server, self.workdir / "overlay", config_text=text, jetstream=False
        )
        self._push("overlay broker", lambda: asyncio.to_thread(server.stop))
        self.overlay_pid = server.pid
        self.overlay_url = server.url
        raw = load_sample_registry().to_dict()
        for ov in raw["overlays"]:
            # One nats-server stands in for every overlay; capacity never defers a bench node.
            ov["brokers"] = [server.url]
            ov["capacity"] = max(int(ov.get("capacity") or 0), self.o.nodes)
        path = self.workdir / "overlays.yaml"
        path.write_text(
            "# The packaged sample registry; brokers -> the bench overlay server, capacity "
            "raised so no node is deferred.\n" + yaml.safe_dump(raw, sort_keys=False)
        )
        return path

    def _write_helper_config(self, overlays_path: Path) -> Path:
        cfg = {
            "overlays": str(overlays_path),
            "ca": self.ca_cfg,
            "certificate": {"ttl": "30d", "use_overlay_profile": self.o.ca == "local"},
            "collectives": ["mcollective"],
            "main_collective": "mcollective",
            "configuration": {
                "loglevel": "info",
                "plugin.choria.status_file_path": "/var/lib/choria/status.json",
            },
        }
        path = self.workdir / "helper" / "reference.yaml"
        _write_secret(path, yaml.safe_dump(cfg, sort_keys=False).encode())
        return path

    async def _start_provisioner(
        self,
        user: str,
        password: str,
        cht: str,
        verify_path: Path,
        helper_cfg: Path,
        overlays_path: Path,
    ) -> None:
        from testbed.natsserver import free_port

        o = self.o
        self.admin_port = free_port()
        # the example exec helpers take their CFSSL settings and brokers from the environment
        lean_env = {**self.lean_env, "BROKERS": self.overlay_url} if o.helper != "reference" else {}
        if o.helper == "lean":
            from helpers.examples import cfssl_authsign

            helper = f"{sys.executable} -S -E {cfssl_authsign.__file__}"
        elif o.helper == "go":
            from helpers.examples import gobuild

            try:
                binary = await asyncio.to_thread(gobuild.build, "cfssl-authsign")
            except gobuild.GoBuildError as exc:
                raise BenchError(str(exc)) from None
            helper = shlex.quote(str(binary))
        elif o.helper_mode == "python":
            helper = "helpers.reference:handler"
        else:
            helper = f"{sys.executable} -m helpers.reference --config {helper_cfg}"
        cfg: dict[str, Any] = {
            "identity": PROVISIONER_IDENTITY,
            "site": SITE,
            "broker_urls": [self.broker_url],
            "broker_user": user,
            "broker_provisioning_password": password,
            "token": cht,
            "jwt_verify_cert": str(verify_path),
            "features": {"pki": True},
            "helper": helper,
            "helper_mode": o.helper_mode,
            "helper_timeout": 60 if o.helper_mode == "exec" else 30,
            "helper_pool_size": o.helper_pool_size,
            "concurrency": o.concurrency,
            "queue_size": max(200_000, o.nodes * 2),
            "rpc_timeout": 20,
            "loglevel": o.loglevel,
            "logfile": str(self.workdir / "provisioner.log"),
            "audit_log": str(self.workdir / "audit.jsonl"),
            "overlays": str(overlays_path),
            "admin": {
                "enabled": True,
                "host": "127.0.0.1",
                "port": self.admin_port,
                "token": self.admin_token,
            },
        }
        if self._broker is not None and self._broker.tls_ca is not None:
            cfg["tls"] = {"ca": str(self._broker.tls_ca)}
        path = self.workdir / "provisioner.yaml"
        _write_secret(path, yaml.safe_dump(cfg, sort_keys=False).encode())
        env = {
            **os.environ,
            "REFERENCE_HELPER_CONFIG": str(helper_cfg),
            "PYTHONUNBUFFERED": "1",
            **lean_env,
        }
        run = ["-m", "provisioner", "run", "--config", str(path), "--log-format", "json"]
        if o.profile == "pyinstrument":
            self.profile_out = self.workdir / "provisioner.pyisession"
            argv = [sys.executable, "-m", "pyinstrument", "-r", "pyisession", "-o",
                    str(self.profile_out), *run]  # fmt: skip
        elif o.profile == "cprofile":
            self.profile_out = self.workdir / "provisioner.prof"
            argv = [sys.executable, "-m", "cProfile", "-o", str(self.profile_out), *run]
        else:
            argv = [sys.executable, *run]
        out = (self.workdir / "provisioner.stderr").open("ab")
        try:
            # Popen returns at once; the process is supervised by pid and polled.
            self.prov_proc = subprocess.Popen(  # noqa: ASYNC220
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(self.workdir),
            )
        finally:
            out.close()
        self._push("provisioner", self._stop_provisioner)
        import httpx

        self._http = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.admin_port}",
            headers={"Authorization": f"Bearer {self.admin_token}"},
            timeout=60,
        )
        self._push("http client", self._http.aclose)
        deadline = time.monotonic() + 60
        while True:
            if self.prov_proc.poll() is not None:
                raise BenchError(
                    f"the provisioner exited with code {self.prov_proc.returncode}: "
                    f"{self._stderr_tail()}"
                )
            with contextlib.suppress(Exception):
                resp = await self._http.get("/readyz")
                if resp.status_code == 200:
                    break
            if time.monotonic() > deadline:
                raise BenchError(f"the provisioner did not become ready: {self._stderr_tail()}")
            await asyncio.sleep(0.1)
        proc = psutil.Process(self.prov_proc.pid)
        self.sampler.set_provisioner(proc)
        self.sampler.add_role("provisioner", lambda: [proc] if proc.is_running() else [])
        self.sampler.add_role(
            "helpers", lambda: [c for c in _safe_children(proc) if c.is_running()]
        )

    def _stderr_tail(self, lines: int = 15) -> str:
        try:
            text = (self.workdir / "provisioner.stderr").read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])

    async def _stop_provisioner(self) -> None:
        proc = self.prov_proc
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGTERM)
        try:
            # A profiled provisioner writes its profile on the way out: give it time.
            await asyncio.to_thread(proc.wait, 120 if self.o.profile != "none" else 40)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGKILL)
            await asyncio.to_thread(proc.wait, 10)

    # ------------------------------------------------------------------ run

    async def _scrape(self) -> list[tuple[str, dict[str, str], float]]:
        resp = await self._http.get("/metrics")
        resp.raise_for_status()
        return parse_prometheus(resp.text)

    async def run(self, say: Callable[[str], None]) -> None:
        """Start the fleet and wait until every node is provisioned (or timeout/stall)."""
        from testbed.fleet import Fleet

        o = self.o
        me = psutil.Process()
        self.sampler.add_role("simulator", lambda: _children_matching(me, "testbed.fleet"))
        self.sampler.add_role("nats-server", _pid_finder(self.broker_pid))
        self.sampler.add_role("overlay-nats", _pid_finder(self.overlay_pid))
        if self.ca_pid is not None:
            self.sampler.add_role("ca-server", _pid_finder(self.ca_pid))
        if o.broker_kind() == "callout" and o.callout_mode == "process":
            self.sampler.add_role("callout", lambda: _children_matching(me, "broker auth"))
        self.sampler.add_role("bench", lambda: [me])
        self.fleet = Fleet(
            o.nodes,
            self.token_path,
            None,
            self.sim_dir,
            seed=o.seed,
            key_type=o.key_type,
            processes=o.sim_processes,
            connections=o.connections,
            key_pool=o.key_type == "rsa",
            restart_delay_scale=o.restart_delay_scale,
        )
        self._push("fleet", self._stop_fleet)
        self.sampler.baseline()
        self.sampler.start()
        st = self.state
        st.t0 = time.time()
        say(f"starting {o.nodes} nodes in {self.fleet.processes} simulator processes")
        self.fleet_task = asyncio.create_task(self._start_fleet(), name="bench-fleet")
        deadline = time.monotonic() + o.effective_timeout()
        last_count, last_change = -1, time.monotonic()
        last_say = 0.0
        while True:
            # Once a second: a scrape costs the provisioner ~14 ms of CPU (measured under
            # pyinstrument: /metrics was 2.6% of its samples at two scrapes a second).
            await asyncio.sleep(1.0)
            if self.fleet_task.done() and self.fleet_task.exception() is not None:
                raise BenchError(f"the fleet did not start: {self.fleet_task.exception()}")
            if self.prov_proc is not None and self.prov_proc.poll() is not None:
                st.notes.append(f"provisioner exited early: {self._stderr_tail(5)}")
                break
            try:
                samples = await self._scrape()
            except Exception as exc:
                st.notes.append(f"metrics scrape failed: {type(exc).__name__}: {exc}")
                continue
            provisioned = int(sample(samples, "choria_provisioner_provisioned", site=SITE))
            waiting = int(sample(samples, "choria_provisioner_work_queue_entries", site=SITE))
            in_flight = int(sample(samples, "choria_provisioner_busy_workers", site=SITE))
            now = time.time()
            st.timeline.append(_Progress(now - st.t0, provisioned, waiting, in_flight))
            st.peak_waiting = max(st.peak_waiting, waiting)
            if provisioned != last_count:
                last_count, last_change = provisioned, time.monotonic()
            if time.monotonic() - last_say >= 5:
                last_say = time.monotonic()
                say(
                    f"  {now - st.t0:6.1f}s provisioned {provisioned}/{o.nodes} "
                    f"waiting {waiting} in flight {in_flight} load {loadavg()[0]}"
                )
            if provisioned >= o.nodes:
                break
            if time.monotonic() - last_change > o.stall_timeout and self.fleet_task.done():
                st.stalled = True
                st.notes.append(f"no progress for {o.stall_timeout:.0f}s: stopped waiting")
                break
            if time.monotonic() > deadline:
                st.timed_out = True
                st.notes.append(f"timeout after {o.effective_timeout():.0f}s")
                break
        st.t_end = time.time()
        self.sampler.stop()

    async def _start_fleet(self) -> None:
        t = time.monotonic()
        await self.fleet.start()
        self.state.fleet_started_s = time.monotonic() - t

    async def _stop_fleet(self) -> None:
        if self.fleet_task is not None and not self.fleet_task.done():
            self.fleet_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self.fleet_task
        if self.fleet is not None:
            await self.fleet.stop()

    # ------------------------------------------------------------------ collect

    async def _all_nodes(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        offset = 0
        while True:
            resp = await self._http.get(
                "/api/v1/nodes", params={"limit": 100_000, "offset": offset}
            )
            resp.raise_for_status()
            body = resp.json()
            page = body.get("nodes", body) if isinstance(body, dict) else body
            out.extend(page)
            total = int(body.get("total", len(out))) if isinstance(body, dict) else len(out)
            offset += len(page)
            if not page or offset >= total:
                return out

    async def collect(self) -> dict[str, Any]:
        """Everything measured, as the result document (without ``markdown``)."""
        o, st = self.o, self.state
        samples: list[tuple[str, dict[str, str], float]] = []
        nodes: list[dict[str, Any]] = []
        try:
            samples = await self._scrape()
            nodes = await self._all_nodes()
        except Exception as exc:  # e.g. the provisioner died: report what the run saw
            st.notes.append(f"could not read the provisioner's figures: {type(exc).__name__}")
        fleet_counts = self.fleet.counts() if self.fleet is not None else {}
        by_state: dict[str, int] = {}
        errors: dict[str, int] = {}
        ttp: list[float] = []
        queue_wait: list[float] = []
        finished: list[float] = []
        for rec in nodes:
            state = str(rec.get("state"))
            by_state[state] = by_state.get(state, 0) + 1
            if state == "provisioned" and rec.get("finished_at") and rec.get("first_seen"):
                fin = float(rec["finished_at"])
                finished.append(fin)
                ttp.append(fin - float(rec["first_seen"]))
                if rec.get("started_at"):
                    queue_wait.append(float(rec["started_at"]) - float(rec["first_seen"]))
            elif rec.get("last_error"):
                key = f"{state}: {str(rec['last_error'])[:120]}"
                errors[key] = errors.get(key, 0) + 1
        provisioned = by_state.get("provisioned", 0)
        if not nodes and st.timeline:
            provisioned = st.timeline[-1].provisioned
        t_last = max(finished) if finished else st.t_end
        span = max(1e-6, t_last - st.t0)
        nodes_per_minute = provisioned / span * 60.0 if provisioned else 0.0
        steady = _steady_rate(sorted(finished), o.nodes)
        # Stage timings: from the node records (the admin API); the audit log is the fallback
        # (its scrubber drops a key named "jwt", so it has no jwt stage).
        timings = [
            rec["stage_times"]
            for rec in nodes
            if rec.get("state") == "provisioned" and rec.get("stage_times")
        ]
        source = "node records (admin API)"
        if not timings:
            timings = await asyncio.to_thread(audit_timings, self.workdir / "audit.jsonl")
            source = "audit log"
        stages = stage_percentiles(timings)
        audit_lines = await asyncio.to_thread(_count_lines, self.workdir / "audit.jsonl")
        cpu = self.sampler.cpu_seconds()
        rss = self.sampler.peak_rss_mb()
        floor = self.floor or {}
        floor_npm = (floor.get("model") or {}).get("nodes_per_minute")
        result: dict[str, Any] = {
            "benchmark": "provision",
            "name": o.name or o.default_name(),
            "date": dt.date.today().isoformat(),
            "time": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
            "nodes": o.nodes,
            "provisioned": provisioned,
            "failed": by_state.get("failed", 0),
            "deferred": by_state.get("deferred", 0),
            "states": dict(sorted(by_state.items())),
            "nodes_per_minute": round(nodes_per_minute, 1),
            "steady_nodes_per_minute": _r(steady, 1),
            "floor_nodes_per_minute": floor_npm,
            "ratio_to_floor": round(nodes_per_minute / floor_npm, 4) if floor_npm else None,
            "cold_start_to_last_s": round(span, 2),
            "p50_s": _r(percentile(ttp, 50)),
            "p95_s": _r(percentile(ttp, 95)),
            "p99_s": _r(percentile(ttp, 99)),
            "queue_wait_p50_s": _r(percentile(queue_wait, 50)),
            "queue_wait_p95_s": _r(percentile(queue_wait, 95)),
            "stages": stages,
            "stages_source": source,
            "audit_records": audit_lines,
            "metrics_stages": histogram_quantiles(
                samples, "choria_provisioner_stage_seconds", "stage"
            ),
            "rpc_time_mean_ms": _summary_means(samples, "choria_provisioner_rpc_time", "rpc"),
            "helper_time_mean_ms": _summary_means(samples, "choria_provisioner_helper_time", None),
            "provisioner_cpu_s": cpu.get("provisioner"),
            # What the provisioner process alone could sustain on one core at this CPU cost
            # per node (the simulated fleet and the brokers share this machine's cores).
            "provisioner_one_core_nodes_per_minute": (
                round(60.0 * provisioned / cpu["provisioner"], 0)
                if provisioned and cpu.get("provisioner")
                else None
            ),
            "provisioner_peak_rss_mb": rss.get("provisioner"),
            "cpu_s": cpu,
            "peak_rss_mb": rss,
            "cpu_total_s": round(sum(cpu.values()), 2),
            "cpu_total_ms_per_node": (
                round(sum(cpu.values()) / provisioned * 1000, 2) if provisioned else None
            ),
            "cpu_ms_per_node": {
                k: round(v / provisioned * 1000, 3) for k, v in cpu.items() if provisioned
            },
            "peak_waiting": st.peak_waiting,
            "fleet_counts": fleet_counts,
            "fleet_start_s": _r(st.fleet_started_s, 2),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:10]),
            "timed_out": st.timed_out,
            "stalled": st.stalled,
            "notes": st.notes,
            "floor": floor,
            "options": _options_dict(o),
            "setup": {
                "broker": o.broker_kind(),
                "ca": self.ca_label,
                "helper": _HELPER_LABELS.get(o.helper, f"reference helper, {o.helper_mode} mode"),
                "callout_mode": o.callout_mode if o.broker_kind() == "callout" else None,
                "simulator_files": "tmpfs" if _is_tmpfs_path(self.sim_dir) else "disk",
            },
            "machine": machine_info(),
            "loadavg_end": loadavg(),
            "timeline": _thin_timeline(st.timeline),
        }
        return result

    async def render_profile(self) -> dict[str, str]:
        """After the provisioner stopped: render its profile (text + html), return the paths."""
        out: dict[str, str] = {}
        if self.profile_out is None or not self.profile_out.exists():
            return out
        if self.o.profile == "pyinstrument":
            renders: tuple[tuple[str, str, list[str]], ...] = (
                ("text", ".txt", ["--show-all", "-p", "processor_options.filter_threshold=0.005"]),
                ("html", ".html", []),
                ("pstats", ".pstats", []),
            )
            for renderer, suffix, extra in renders:
                target = self.profile_out.with_suffix(suffix)
                cmd = [sys.executable, "-m", "pyinstrument", "--load", str(self.profile_out),
                       "-r", renderer, *extra, "-o", str(target)]  # fmt: skip
                await asyncio.to_thread(subprocess.run, cmd, capture_output=True, timeout=600)
                if target.exists():
                    out[renderer] = str(target)
            if "pstats" in out:
                out["top"] = await asyncio.to_thread(_pstats_top, Path(out["pstats"]))
        else:
            import pstats

            target = self.profile_out.with_suffix(".txt")
            with target.open("w") as fh:
                stats = pstats.Stats(str(self.profile_out), stream=fh)
                stats.sort_stats("cumulative").print_stats(60)
                stats.sort_stats("tottime").print_stats(60)
            out["text"] = str(target)
            out["top"] = await asyncio.to_thread(_pstats_top, self.profile_out)
        out["raw"] = str(self.profile_out)
        return out

    # ------------------------------------------------------------------ stop

    async def stop_provisioner(self) -> None:
        await self._stop_provisioner()

    async def close(self) -> None:
        """Stop everything in reverse start order. Never raises."""
        if self._closed:
            return
        self._closed = True
        self.sampler.stop()
        while self._cleanups:
            what, fn = self._cleanups.pop()
            try:
                await asyncio.wait_for(fn(), 150)
            except Exception as exc:
                log.warning("stopping %s: %s: %s", what, type(exc).__name__, exc)
        from testbed.demo import reap_children

        await asyncio.to_thread(reap_children, str(self.workdir))
        if self._own_sim_dir and not self.o.keep_workdir:
            await asyncio.to_thread(shutil.rmtree, self.sim_dir, True)
        if self._own_workdir and not self.o.keep_workdir:
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)


def _simulator_dir(choice: str, workdir: Path) -> tuple[Path, bool]:
    """The simulated nodes' directory, and whether the bench made it outside its workdir.

    Every simulated node writes its certificate, key, CA and configuration; 10,000 nodes on one
    machine turn that into ~2 ms of kernel CPU per node on an ext4 disk (measured here), which
    real nodes, each with its own disk, never put on the provisioner's machine. On tmpfs the
    same writes cost ~0.2 ms. "auto" therefore uses /dev/shm when it is a writable tmpfs.
    """
    if choice == "disk":
        return workdir / "fleet", False
    if choice != "auto":
        return Path(choice).absolute(), False
    shm = Path("/dev/shm")  # noqa: S108 - mkdtemp below makes a private 0700 directory
    if shm.is_dir() and _is_tmpfs_path(shm) and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="provisioner-bench-fleet-", dir=shm)), True
    return workdir / "fleet", False


def _is_tmpfs_path(path: Path) -> bool:
    """Whether ``path`` lies on a tmpfs mount (the longest mount point that holds it)."""
    try:
        mounts = Path("/proc/self/mounts").read_text().splitlines()
    except OSError:
        return False
    best, kind = "", ""
    target = str(path.resolve())
    for line in mounts:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind == "tmpfs"


def _pstats_top(path: Path, n: int = 25) -> str:
    """The ``n`` functions with the most own time, as text (for the report)."""
    import io
    import pstats

    buf = io.StringIO()
    stats = pstats.Stats(str(path), stream=buf)
    stats.sort_stats("tottime").print_stats(n)
    return buf.getvalue()


def _safe_children(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return list(proc.children(recursive=True))
    except psutil.Error:
        return []


def _options_dict(o: BenchOptions) -> dict[str, Any]:
    d = asdict(o)
    for k in ("results_dir", "workdir"):
        d[k] = str(d[k]) if d[k] is not None else None
    return d


def _steady_rate(finished: Sequence[float], nodes: int) -> float | None:
    """Nodes/minute between the 10th and the 90th percentile node (no ramp-up, no tail)."""
    if len(finished) < 20:
        return None
    lo, hi = int(len(finished) * 0.1), int(len(finished) * 0.9)
    span = finished[hi] - finished[lo]
    return (hi - lo) / span * 60.0 if span > 0 else None


#: Pipeline order of the stages (for tables); unknown stages follow in name order.
STAGE_ORDER = (
    "jwt", "validate", "ed25519", "inventory", "csr", "csr_check", "helper", "check_output",
    "sign", "encrypt", "configure", "restart", "pipeline_total",
)  # fmt: skip


def stage_percentiles(timings: Iterable[Mapping[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per-stage latency percentiles (ms) over attempts' ``{stage: seconds}`` timings, plus
    ``pipeline_total`` (the sum of an attempt's stages)."""
    per: dict[str, list[float]] = {}
    totals: list[float] = []
    for t in timings:
        if not t:
            continue
        for stage, secs in t.items():
            per.setdefault(str(stage), []).append(float(secs))
        totals.append(sum(float(v) for v in t.values()))
    per["pipeline_total"] = totals
    order = {name: i for i, name in enumerate(STAGE_ORDER)}
    out = {}
    for stage in sorted(per, key=lambda s: (order.get(s, len(order) - 1), s)):
        values = per[stage]
        if not values:
            continue
        out[stage] = {
            "count": len(values),
            "p50_ms": _r((percentile(values, 50) or 0) * 1000),
            "p95_ms": _r((percentile(values, 95) or 0) * 1000),
            "p99_ms": _r((percentile(values, 99) or 0) * 1000),
            "mean_ms": _r(sum(values) / len(values) * 1000),
        }
    return out


def audit_timings(path: Path) -> list[dict[str, float]]:
    """The stage timings of the provisioned attempts in the audit log."""
    out: list[dict[str, float]] = []
    try:
        fh = path.open()
    except OSError:
        return out
    with fh:
        for line in fh:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if rec.get("decision") == "provisioned" and rec.get("timings"):
                out.append(rec["timings"])
    return out


def _count_lines(path: Path) -> int:
    try:
        with path.open("rb") as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def _summary_means(
    samples: Sequence[tuple[str, dict[str, str], float]], name: str, by: str | None
) -> dict[str, float | None] | float | None:
    counts: dict[str, float] = {}
    sums: dict[str, float] = {}
    for n, lab, v in samples:
        key = lab.get(by, "") if by else ""
        if n == f"{name}_count":
            counts[key] = counts.get(key, 0.0) + v
        elif n == f"{name}_sum":
            sums[key] = sums.get(key, 0.0) + v
    means = {k: _r(sums.get(k, 0.0) / c * 1000) if c else None for k, c in counts.items()}
    if by is None:
        return means.get("")
    return dict(sorted(means.items()))


def _thin_timeline(points: Sequence[_Progress], max_points: int = 240) -> list[list[float]]:
    step = max(1, math.ceil(len(points) / max_points))
    return [
        [round(p.t, 1), p.provisioned, p.waiting, p.in_flight]
        for i, p in enumerate(points)
        if i % step == 0 or i == len(points) - 1
    ]


# ===================================================================================== results


def _fmt(value: Any, digits: int = 0) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


RESULT_HEADER = (
    "| run | nodes | helper | CA | keys | conns | provisioned | nodes/min | floor nodes/min "
    "| ratio | p50 s | p95 s | prov CPU s | prov peak RSS MB | load |\n"
    "|---|---:|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


def result_row(r: Mapping[str, Any]) -> str:
    o = r.get("options") or {}
    load = r.get("loadavg_start") or [None]
    return (
        f"| {r.get('name')} | {_fmt(r.get('nodes'))} | {o.get('helper_mode')} | {o.get('ca')} "
        f"| {o.get('key_type')} | {o.get('connections')} "
        f"| {_fmt(r.get('provisioned'))} | {_fmt(r.get('nodes_per_minute'))} "
        f"| {_fmt(r.get('floor_nodes_per_minute'))} | {_fmt(r.get('ratio_to_floor'), 2)} "
        f"| {_fmt(r.get('p50_s'), 2)} | {_fmt(r.get('p95_s'), 2)} "
        f"| {_fmt(r.get('provisioner_cpu_s'), 1)} | {_fmt(r.get('provisioner_peak_rss_mb'), 0)} "
        f"| {_fmt(load[0], 1)} |"
    )


def render_markdown(r: Mapping[str, Any]) -> str:
    """The run as markdown: headline table, stage latencies, CPU by process, the floor."""
    lines = [RESULT_HEADER, result_row(r), ""]
    stages = r.get("stages") or {}
    if stages:
        lines += ["| stage | p50 ms | p95 ms | p99 ms | mean ms |", "|---|---:|---:|---:|---:|"]
        for name, s in stages.items():
            lines.append(
                f"| {name} | {_fmt(s.get('p50_ms'), 2)} | {_fmt(s.get('p95_ms'), 2)} "
                f"| {_fmt(s.get('p99_ms'), 2)} | {_fmt(s.get('mean_ms'), 2)} |"
            )
        lines.append("")
    cpu = r.get("cpu_s") or {}
    if cpu:
        rss = r.get("peak_rss_mb") or {}
        per = r.get("cpu_ms_per_node") or {}
        lines += [
            "| process | CPU s | CPU ms/node | peak RSS MB |",
            "|---|---:|---:|---:|",
        ]
        for name, secs in cpu.items():
            lines.append(
                f"| {name} | {_fmt(secs, 1)} | {_fmt(per.get(name), 2)} "
                f"| {_fmt(rss.get(name), 0)} |"
            )
        lines.append("")
    floor = r.get("floor") or {}
    if floor:
        rpc, sign, model = floor.get("rpc", {}), floor.get("sign", {}), floor.get("model", {})
        lines.append(
            f"Floor: {_fmt(rpc.get('round_trips_per_s'))} NATS round trips/s "
            f"({rpc.get('responders')} responder processes, {rpc.get('in_flight')} in flight), "
            f"{_fmt(sign.get('signs_per_s'))} CA signatures/s ({sign.get('method')}); "
            f"{model.get('rpcs_per_node')} round trips + {model.get('signs_per_node')} signature "
            f"per node -> {_fmt(model.get('nodes_per_minute'))} nodes/min "
            f"(bottleneck bound {_fmt(model.get('bottleneck_nodes_per_minute'))})."
        )
    extra = []
    if r.get("steady_nodes_per_minute") is not None:
        extra.append(f"steady (10th-90th percentile node) {_fmt(r['steady_nodes_per_minute'])}/min")
    extra.append(f"cold start to last node {_fmt(r.get('cold_start_to_last_s'), 1)} s")
    extra.append(f"peak waiting {_fmt(r.get('peak_waiting'))}")
    extra.append(f"load {r.get('loadavg_start')} → {r.get('loadavg_end')}")
    lines.append("Run: " + "; ".join(extra) + ".")
    if r.get("timed_out") or r.get("stalled") or r.get("errors"):
        lines.append(f"Incomplete: {r.get('notes')} errors: {r.get('errors')}")
    return "\n".join(lines)


def write_result(result: dict[str, Any], results_dir: Path) -> Path:
    """``<results_dir>/<YYYY-MM-DD>-<name>.json`` (an existing file of that name is replaced)."""
    results_dir.mkdir(parents=True, exist_ok=True)
    path = results_dir / f"{result['date']}-{result['name']}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, path)
    return path


def default_results_dir() -> Path:
    """``bench/results`` of the source tree (the working directory's, else next to the package)."""
    here = Path(__file__).resolve().parent.parent / "bench" / "results"
    cwd = Path.cwd() / "bench" / "results"
    return cwd if cwd.parent.is_dir() else here


async def run_bench(
    options: BenchOptions, say: Callable[[str], None] | None = None
) -> tuple[dict[str, Any], Path]:
    """One complete run; returns (result document, file written)."""
    say = say or (lambda _m: None)
    bench = Bench(options)
    load_start = loadavg()
    result: dict[str, Any] | None = None
    try:
        await bench.setup(say)
        await bench.run(say)
        say("collecting figures")
        result = await bench.collect()
        result["loadavg_start"] = load_start
        result["workdir"] = str(bench.workdir) if options.keep_workdir else None
        if options.profile != "none":
            await bench._stop_fleet()
            await bench.stop_provisioner()
            say("rendering the profile")
            result["profile"] = await bench.render_profile()
    finally:
        await bench.close()
    result["markdown"] = render_markdown(result)
    path = write_result(result, options.results_dir or default_results_dir())
    return result, path


# ===================================================================================== internal


def main(argv: Sequence[str] | None = None) -> None:
    """``python -m testbed.bench responder URL`` (the floor's responder process)."""
    parser = argparse.ArgumentParser(prog="python -m testbed.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    resp = sub.add_parser("responder", help="floor responder (internal)")
    resp.add_argument("url")
    args = parser.parse_args(argv)
    if args.cmd == "responder":
        asyncio.run(_responder_main(args.url))


if __name__ == "__main__":
    main()

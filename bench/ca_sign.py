"""Benchmark: signing throughput and latency of each CA adapter against real servers.

Run: ``.venv/bin/python bench/ca_sign.py [--requests 200] [--concurrency 1 8]``

Adapters: local CA (P-256 and RSA-2048 CA keys, in-process), cfssl serve ``/sign`` and
``/authsign``, multirootca ``/authsign`` and OpenBao ``pki/sign`` (AppRole). Every server is a
real process on 127.0.0.1 started by :mod:`testbed.ca_servers`, plain HTTP (TLS cost is not
the subject here). The measured time is a full ``adapter.sign()``: request, CA signature and
our re-verification of the answer. Node CSRs (P-256) are made before the clock starts.

Writes ``bench/results/<YYYY-MM-DD>-ca-sign.json`` and prints a markdown table. This is a
measurement, not a test: nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from contextlib import ExitStack
from datetime import date
from pathlib import Path
from typing import Any

import cryptography
import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters import CAAdapter, CFSSLAdapter, LocalCA, SignRequest, VaultAdapter
from testbed.ca_servers import (
    ServerNotAvailable,
    start_cfssl,
    start_multirootca,
    start_openbao,
)

ROOT = Path(__file__).resolve().parent.parent


def make_requests(n: int) -> list[SignRequest]:
    reqs = []
    for i in range(n):
        ident = f"node-{i:05d}.fleet.example.net"
        key = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, ident)]))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(ident)]), critical=False)
            .sign(key, hashes.SHA256())
        )
        reqs.append(SignRequest(ident, csr.public_bytes(serialization.Encoding.PEM).decode()))
    return reqs


async def run_one(adapter: CAAdapter, reqs: list[SignRequest], concurrency: int) -> dict[str, Any]:
    for r in reqs[:5]:  # warm up connections and caches (/info, AppRole login)
        await adapter.sign(r)
    latencies: list[float] = []
    errors = 0
    queue = list(reqs)

    async def worker() -> None:
        nonlocal errors
        while queue:
            req = queue.pop()
            t0 = time.perf_counter()
            try:
                await adapter.sign(req)
            except Exception as exc:  # a measurement: count and go on
                errors += 1
                if errors == 1:
                    print(f"  first error: {exc}", file=sys.stderr)
                continue
            latencies.append(time.perf_counter() - t0)

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    elapsed = time.perf_counter() - start
    latencies.sort()

    def pct(p: float) -> float:
        if not latencies:
            return float("nan")
        return latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000

    return {
        "requests": len(reqs),
        "ok": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 4),
        "per_second": round(len(latencies) / elapsed, 1) if elapsed else None,
        "p50_ms": round(pct(0.50), 3),
        "p95_ms": round(pct(0.95), 3),
        "p99_ms": round(pct(0.99), 3),
        "mean_ms": round(statistics.fmean(latencies) * 1000, 3) if latencies else None,
    }


async def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=200)
    ap.add_argument("--concurrency", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results")
    args = ap.parse_args()

    load_before = os.getloadavg()
    reqs = make_requests(args.requests)
    results: list[dict[str, Any]] = []
    skipped: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="ca-bench-") as tmp, ExitStack() as stack:
        work = Path(tmp)
        factories: dict[str, Callable[[], CAAdapter]] = {
            "local EC (P-256)": lambda: LocalCA.generate("ec"),
            "local RSA-2048": lambda: LocalCA.generate("rsa"),
        }
        try:
            cfssl = start_cfssl(work / "cfssl")
            stack.callback(cfssl.stop)
            factories["cfssl sign"] = lambda: CFSSLAdapter(cfssl.url, ca_pem=cfssl.ca_pem)
            factories["cfssl authsign"] = lambda: CFSSLAdapter(
                cfssl.url, ca_pem=cfssl.ca_pem, auth_key_hex=cfssl.auth_key_hex, profile="node"
            )
            mroot = start_multirootca(work / "multirootca")
            stack.callback(mroot.stop)
            factories["multirootca authsign"] = lambda: CFSSLAdapter(
                mroot.url,
                label=mroot.label,
                ca_pem=mroot.ca_pem,
                auth_key_hex=mroot.auth_key_hex,
                profile="node",
            )
        except ServerNotAvailable as exc:
            skipped["cfssl"] = str(exc)
        try:
            bao = start_openbao(work / "openbao", allowed_domains=("fleet.example.net",))
            stack.callback(bao.stop)
            factories["openbao sign (AppRole)"] = lambda: VaultAdapter(
                bao.url, role_id=bao.role_id, secret_id=bao.secret_id, ca_pem=bao.ca_pem
            )
        except ServerNotAvailable as exc:
            skipped["openbao"] = str(exc)

        for name, factory in factories.items():
            for conc in args.concurrency:
                adapter = factory()
                try:
                    r = await run_one(adapter, reqs, conc)
                finally:
                    await adapter.aclose()
                r.update({"adapter": name, "concurrency": conc})
                results.append(r)
                print(
                    f"{name:24s} c={conc}: {r['per_second']}/s p50={r['p50_ms']}ms "
                    f"p95={r['p95_ms']}ms errors={r['errors']}",
                    file=sys.stderr,
                )

    doc = {
        "benchmark": "ca-sign",
        "date": date.today().isoformat(),
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cryptography": cryptography.__version__,
            "httpx": httpx.__version__,
            # The box is shared: a high load average means the numbers are pessimistic.
            "loadavg_before": [round(x, 2) for x in load_before],
            "loadavg_after": [round(x, 2) for x in os.getloadavg()],
        },
        "notes": "full adapter.sign() incl. re-verification; servers on 127.0.0.1, plain HTTP; "
        "node CSRs P-256; CA keys P-256 except 'local RSA-2048'",
        "requests_per_run": args.requests,
        "results": results,
        "skipped": skipped,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    out = args.out / f"{date.today().isoformat()}-ca-sign.json"
    out.write_text(json.dumps(doc, indent=2) + "\n")

    print("| adapter | concurrency | signs/s | p50 ms | p95 ms | errors |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in results:
        print(
            f"| {r['adapter']} | {r['concurrency']} | {r['per_second']} | {r['p50_ms']} "
            f"| {r['p95_ms']} | {r['errors']} |"
        )
    for what, why in skipped.items():
        print(f"\nskipped {what}: {why}")
    print(f"\nwritten {out.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(asyncio.run(main()))

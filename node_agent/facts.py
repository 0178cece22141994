"""Deterministic, realistic facts for simulated nodes.

The fleet simulator, the overlay what-if planner, the demo and the benchmark all need the same
synthetic fleet: node ``i`` with seed ``s`` always gets the same identity and facts, whichever
process computes them. Customers follow a skewed (Zipf-like) size distribution, as real fleets
do: a few large customers and a long tail of small ones, which is what makes affinity placement
interesting.
"""

from __future__ import annotations

import hashlib
import random
from functools import lru_cache
from typing import Any

REGIONS: dict[str, tuple[str, ...]] = {
    "eu-west": ("dub1", "dub2", "ams1"),
    "us-east": ("iad1", "iad2", "nyc1"),
    "ap-south": ("bom1", "sin1"),
}
SERVICES = ("web", "api", "db", "cache", "queue", "batch", "search", "storage")
ROLES = ("frontend", "backend", "worker", "primary", "replica")
OSES = (
    ("Debian", "12"),
    ("Ubuntu", "24.04"),
    ("RedHat", "9"),
    ("Rocky", "9"),
)
CPU_COUNTS = (2, 4, 8, 16, 32, 64)
MEMORY_MB = (4096, 8192, 16384, 32768, 65536, 131072)
CUSTOMER_COUNT = 200


def synthetic_identity(index: int, domain: str = "fleet.example.net") -> str:
    """The identity of simulated node ``index``: ``node-00001.fleet.example.net``."""
    if index < 0:
        raise ValueError("node index must be >= 0")
    return f"node-{index:05d}.{domain}"


@lru_cache(maxsize=8)
def _customer_weights(seed: int) -> tuple[list[str], list[float]]:
    names = [f"cust-{i:03d}" for i in range(CUSTOMER_COUNT)]
    # Zipf-ish weights: customer k has weight 1/(k+1)^1.1
    weights = [1.0 / (k + 1) ** 1.1 for k in range(CUSTOMER_COUNT)]
    rng = random.Random(seed)
    rng.shuffle(names)
    return names, weights


def _rng(index: int, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def synthetic_facts(index: int, seed: int = 0) -> dict[str, Any]:
    """Facts of simulated node ``index`` (deterministic in ``index`` and ``seed``)."""
    rng = _rng(index, seed)
    names, weights = _customer_weights(seed)
    customer = rng.choices(names, weights=weights, k=1)[0]
    region = rng.choice(tuple(REGIONS))
    datacenter = rng.choice(REGIONS[region])
    service = rng.choice(SERVICES)
    os_name, os_release = rng.choice(OSES)
    cpu = rng.choice(CPU_COUNTS)
    memory = rng.choice(MEMORY_MB)
    octets = (10, rng.randrange(256), rng.randrange(256), rng.randrange(1, 255))
    return {
        "identity": synthetic_identity(index),
        "region": region,
        "datacenter": datacenter,
        "customer": customer,
        "service": service,
        "role": rng.choice(ROLES),
        "environment": rng.choices(("production", "staging", "development"), (8, 1, 1))[0],
        "os": {"family": os_name, "release": os_release},
        "cpu_count": cpu,
        "memory_mb": memory,
        "ip": ".".join(str(o) for o in octets),
        "serial": hashlib.sha256(f"serial:{seed}:{index}".encode()).hexdigest()[:12].upper(),
    }

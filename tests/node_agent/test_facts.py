"""Synthetic facts are deterministic, realistic and skewed by customer."""

from __future__ import annotations

from collections import Counter

import pytest

from node_agent.facts import REGIONS, synthetic_facts, synthetic_identity


def test_identity_format_and_validation() -> None:
    assert synthetic_identity(1) == "node-00001.fleet.example.net"
    assert synthetic_identity(123456, "x.test") == "node-123456.x.test"
    with pytest.raises(ValueError):
        synthetic_identity(-1)


def test_facts_are_deterministic_per_index_and_seed() -> None:
    assert synthetic_facts(42, seed=7) == synthetic_facts(42, seed=7)
    assert synthetic_facts(42, seed=7) != synthetic_facts(42, seed=8)
    assert synthetic_facts(41) != synthetic_facts(42)


def test_facts_are_realistic() -> None:
    f = synthetic_facts(3)
    assert f["datacenter"] in REGIONS[f["region"]]
    for key in ("customer", "service", "role", "os", "cpu_count", "memory_mb", "ip"):
        assert key in f
    assert f["identity"] == synthetic_identity(3)


def test_customer_distribution_is_skewed() -> None:
    counts = Counter(synthetic_facts(i)["customer"] for i in range(5000))
    top = counts.most_common(1)[0][1]
    # a Zipf-like tail: the biggest customer is far bigger than the median one
    median = sorted(counts.values())[len(counts) // 2]
    assert top > 5 * median

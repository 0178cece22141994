"""Registry loading and validation: errors name the source, the overlay and the field."""

from __future__ import annotations

from pathlib import Path

import nats
import pytest

from overlays import Overlay, OverlayConfigError, OverlayRegistry, load_sample_registry

GOOD = """
overlays:
  - name: a
    region: eu
    brokers: [nats://a1.example.net:4222, tls://a2.example.net:4222]
    capacity: 100
    labels: {tier: gold}
  - name: b
    brokers: [nats://b.example.net:4222]
    state: cordoned
    weight: 2
    ca_profile: fleet-b
placement:
  affinity: customer
  pins:
    - {match: {customer: "bank-*"}, overlay: a}
"""


def _err(text: str) -> str:
    with pytest.raises(OverlayConfigError) as exc:
        OverlayRegistry.from_text(text, source="ov.yaml")
    return str(exc.value)


def test_loads_fields_and_defaults(tmp_path: Path) -> None:
    path = tmp_path / "ov.yaml"
    path.write_text(GOOD)
    reg = OverlayRegistry.from_yaml(path)
    assert reg.names == ["a", "b"]
    a, b = reg.get("a"), reg.get("b")
    assert a.capacity == 100 and a.labels == {"tier": "gold"} and a.state == "active"
    assert b.capacity == 20_000 and b.weight == 2 and b.ca_profile == "fleet-b"
    assert a.accepts_new and not b.accepts_new  # cordoned takes nothing new
    assert reg.placement.affinity == "customer"
    assert reg.placement.pins[0].overlays == ["a"]  # `overlay:` shorthand
    assert reg.placement.ranker == "least_filled"
    # Round trip through the mapping form.
    again = OverlayRegistry.from_dict(reg.to_dict())
    assert again.overlays == reg.overlays and again.placement == reg.placement


@pytest.mark.parametrize(
    ("old", "new", "needles"),
    [
        ("capacity: 100", "capacity: -5", ["overlay 'a'", "'capacity'", "greater than or equal"]),
        (
            "[nats://a1.example.net:4222, tls",
            "[http://a1.example.net, tls",
            ["overlay 'a'", "'brokers'", "broker URL"],
        ),
        ("- name: b", "- name: 'b c'", ["overlay 'b c'", "'name'"]),
        ("state: cordoned", "state: paused", ["overlay 'b'", "'state'"]),
        ("weight: 2", "weight: heavy", ["overlay 'b'", "'weight'"]),
        (
            "labels: {tier: gold}",
            "labels: {tier: gold}\n    colour: red",
            ["overlay 'a'", "'colour'"],
        ),
        ("overlay: a}", "overlay: nope}", ["placement.pins[0]", "unknown overlay 'nope'"]),
        (
            "affinity: customer",
            "affinity: customer\n  policies: [least_filled, pinned]",
            ["placement", "'policies'", "ranker"],
        ),
        (
            "affinity: customer",
            "affinity: customer\n  policies: [pinned, bogus, hash]",
            ["unknown policy 'bogus'"],
        ),
        ("- name: b", "- name: a", ["overlay 'a' is defined twice"]),
    ],
)
def test_invalid_registry_messages(old: str, new: str, needles: list[str]) -> None:
    text = GOOD.replace(old, new, 1)
    assert text != GOOD
    message = _err(text)
    assert message.startswith("ov.yaml:")
    for needle in needles:
        assert needle in message, message


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("", "top level must be a mapping"),
        ("overlays: []", "non-empty list"),
        ("overlays: [{name: a, brokers: [nats://a:1]}]\nextra: 1", "unknown top-level key"),
        ("overlays: [{name: a}]", "'brokers'"),
        (
            "overlays: [{name: a, brokers: [nats://a:1]}]\nplacement: [1]",
            "'placement' must be a mapping",
        ),
        ("overlays: [a: [", "not valid YAML"),
    ],
)
def test_invalid_structure(text: str, needle: str) -> None:
    assert needle in _err(text)


def test_missing_file_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(OverlayConfigError, match="cannot read"):
        OverlayRegistry.from_yaml(tmp_path / "absent.yaml")


def test_sample_registry() -> None:
    reg = load_sample_registry()
    assert 3 <= len(reg) <= 4
    assert len({o.region for o in reg}) >= 3
    assert reg.placement.affinity == "customer"
    assert reg.placement.pins, "the sample shows a pinned rule"
    assert all(isinstance(o, Overlay) and o.brokers for o in reg)


def test_with_state_copies() -> None:
    reg = load_sample_registry()
    first = reg.names[0]
    drained = reg.with_state(first, "draining")
    assert drained.get(first).state == "draining"
    assert reg.get(first).state == "active"
    with pytest.raises(KeyError, match="unknown overlay"):
        reg.with_state("nope", "cordoned")


@pytest.mark.integration
async def test_publish_and_load_from_kv(shared_nats_server) -> None:
    user, password = shared_nats_server.users["provisioner"]
    nc = await nats.connect(shared_nats_server.url, user=user, password=password)
    try:
        js = nc.jetstream()
        with pytest.raises(OverlayConfigError, match="no registry published"):
            await OverlayRegistry.from_kv(js, "OVREG_TEST_EMPTY")
        reg = OverlayRegistry.from_text(GOOD)
        rev = await reg.publish(js, "OVREG_TEST")
        assert rev > 0
        loaded = await OverlayRegistry.from_kv(js, "OVREG_TEST")
        assert loaded.overlays == reg.overlays
        assert loaded.placement == reg.placement
        assert loaded.source == "kv://OVREG_TEST/registry"
    finally:
        await nc.close()

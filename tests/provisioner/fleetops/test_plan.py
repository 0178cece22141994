"""Job planning and the overlay client identity in the registry (no servers needed)."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlays import OverlayRegistry
from overlays.model import OverlayConfigError
from provisioner.fleetops.model import JobSpec
from provisioner.fleetops.plan import PlanError, build_targets, plan

TLS = {"certificate": "pki/prov.pem", "key": "pki/prov-key.pem", "ca": "/etc/ca.pem"}


def _registry(tmp_path: Path) -> OverlayRegistry:
    path = tmp_path / "overlays.yaml"
    path.write_text(
        "overlays:\n"
        "  - {name: eu-1, brokers: ['tls://eu.example.net:4222'], client: "
        "{certificate: pki/prov.pem, key: pki/prov-key.pem, ca: /etc/ca.pem}}\n"
        "  - {name: us-1, brokers: ['nats://us.example.net:4222'], client: "
        "{jwt: creds/us.jwt, seed: creds/us.nk}}\n"
        "  - {name: ap-1, brokers: ['nats://ap.example.net:4222']}\n"
    )
    return OverlayRegistry.from_yaml(path)


def test_client_paths_resolve_against_the_registry_file(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    eu = reg.get("eu-1").client
    assert eu is not None and eu.mode == "tls"
    assert eu.certificate == str(tmp_path / "pki/prov.pem") and eu.ca == "/etc/ca.pem"
    us = reg.get("us-1").client
    assert us is not None and us.mode == "jwt" and us.seed == str(tmp_path / "creds/us.nk")
    assert reg.get("ap-1").client is None


@pytest.mark.parametrize(
    "client",
    [
        {},
        {"certificate": "a.pem"},
        {"jwt": "a.jwt"},
        {"certificate": "a.pem", "key": "k.pem", "jwt": "a.jwt", "seed": "s.nk"},
        {"certificate": "a.pem", "key": "k.pem", "password": "x"},
    ],
)
def test_client_identity_must_be_one_whole_form(client: dict[str, str]) -> None:
    doc = {"overlays": [{"name": "a", "brokers": ["nats://a:4222"], "client": client}]}
    with pytest.raises(OverlayConfigError, match="client"):
        OverlayRegistry.from_dict(doc)


def test_plan_paces_targets_and_names_brokers(tmp_path: Path) -> None:
    reg = _registry(tmp_path)
    spec = JobSpec(
        targets=[{"identity": f"n{i}.example.net"} for i in range(4)], overlay="eu-1", rate=20
    )
    out = plan(spec, reg, default_rate=60)
    assert [t["at"] for t in out["targets"]] == [0.0, 3.0, 6.0, 9.0]
    assert out["targets"][0]["brokers"] == ["tls://eu.example.net:4222"]
    assert out["duration"] == 9.0
    located = build_targets(
        JobSpec(targets=[{"identity": "x.example.net"}]), reg, lambda _i: "us-1"
    )
    assert located[0].overlay == "us-1"


@pytest.mark.parametrize(
    ("targets", "overlay", "message"),
    [
        ([{"identity": "a.example.net"}], None, "no overlay given"),
        ([{"identity": "a.example.net", "overlay": "nowhere"}], None, "unknown overlay"),
        ([{"identity": "a.example.net"}], "ap-1", "no client identity"),
        ([{"identity": "a..b"}], "eu-1", "not a node identity"),
        ([{"identity": "a.example.net"}] * 2, "eu-1", "listed twice"),
        ([{"identity": "a.example.net", "extra": "1"}], "eu-1", "unknown keys"),
    ],
)
def test_jobs_that_cannot_run_are_refused(
    tmp_path: Path, targets: list[dict[str, str]], overlay: str | None, message: str
) -> None:
    with pytest.raises(PlanError, match=message):
        build_targets(JobSpec(targets=targets, overlay=overlay), _registry(tmp_path))


def test_unknown_kind_and_missing_registry(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="unknown job kind"):
        build_targets(JobSpec(kind="no_such", targets=[{"identity": "a.b"}]), _registry(tmp_path))
    with pytest.raises(PlanError, match="no overlay registry"):
        build_targets(JobSpec(targets=[{"identity": "a.b"}], overlay="eu-1"), None)

"""The demo's own verification must be able to fail: each check refuses what it should."""

from __future__ import annotations

import asyncio
from pathlib import Path

import nats
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA, SignRequest
from provisioner.cli import demo as demo_cli
from testbed.demo import (
    DEFAULT_NODES,
    Demo,
    DemoError,
    DemoOptions,
    DemoUsageError,
    percentile,
    verify_node_certificate,
)
from testbed.demo.verify import connz_names
from testbed.natsserver import start_nats_server
from testbed.overlay_brokers import overlay_server_config
from tests.e2e.support import require_nats_server

IDENTITY = "node-00001.fleet.example.net"


def _node_files(
    tmp: Path, ca: LocalCA, *, cn: str = IDENTITY, sans: tuple[str, ...] = ()
) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    res = ca.sign_sync(
        SignRequest(
            identity=cn,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
            dns_sans=sans,
        )
    )
    cert_path, key_path = tmp / "certificate.pem", tmp / "private.pem"
    cert_path.write_text(res.certificate_pem)
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture(scope="module")
def ca() -> LocalCA:
    return LocalCA.generate("ec", "Verify Test CA")


def test_a_good_certificate_verifies(tmp_path: Path, ca: LocalCA) -> None:
    cert, key = _node_files(tmp_path, ca)
    assert verify_node_certificate(IDENTITY, cert, key, ca.cert) == []


def test_a_certificate_from_another_ca_is_refused(tmp_path: Path, ca: LocalCA) -> None:
    other = LocalCA.generate("ec", "Verify Test CA")  # same name, different key
    cert, key = _node_files(tmp_path, other)
    problems = verify_node_certificate(IDENTITY, cert, key, ca.cert)
    assert any("CA" in p for p in problems), problems


def test_a_certificate_for_another_identity_is_refused(tmp_path: Path, ca: LocalCA) -> None:
    cert, key = _node_files(tmp_path, ca, cn="node-00002.fleet.example.net")
    problems = verify_node_certificate(IDENTITY, cert, key, ca.cert)
    assert any("CN" in p for p in problems)
    assert any("SAN" in p for p in problems)


def test_a_certificate_not_matching_private_pem_is_refused(tmp_path: Path, ca: LocalCA) -> None:
    cert, _key = _node_files(tmp_path, ca)
    other_dir = tmp_path / "other"
    other_dir.mkdir()
    _cert2, other_key = _node_files(other_dir, ca)
    problems = verify_node_certificate(IDENTITY, cert, other_key, ca.cert)
    assert problems == ["certificate does not match the node's private.pem"]


def test_missing_files_are_reported(tmp_path: Path, ca: LocalCA) -> None:
    problems = verify_node_certificate(
        IDENTITY, tmp_path / "nope.pem", tmp_path / "nokey.pem", ca.cert
    )
    assert problems and "no readable certificate" in problems[0]


def test_percentile() -> None:
    assert percentile([], 50) is None
    assert percentile([3.0], 95) == 3.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([float(i) for i in range(101)], 95) == 95.0


def test_bad_options_are_refused_before_anything_starts(tmp_path: Path) -> None:
    with pytest.raises(DemoUsageError, match="--nodes"):
        Demo(DemoOptions(nodes=0, workdir=tmp_path))
    with pytest.raises(DemoError, match="--start-rate"):
        Demo(DemoOptions(nodes=5, start_rate=10, processes=2, workdir=tmp_path))


@pytest.mark.integration
async def test_connz_lookup_pages_through_every_connection(tmp_path: Path) -> None:
    require_nats_server()
    text = overlay_server_config("paging", tls=None, max_connections=100)
    server = start_nats_server(tmp_path, config_text=text, jetstream=False)
    conns = []
    try:
        conns = [await nats.connect(server.url, name=f"node-{i}") for i in range(5)]
        names = await asyncio.to_thread(connz_names, server.monitor_port, 2)
        assert names == {f"node-{i}" for i in range(5)}
    finally:
        for nc in conns:
            await nc.close()
        server.stop()


def test_the_cli_default_fleet_size_is_the_demos() -> None:
    # provisioner/cli/demo.py repeats it so that `provisioner --help` does not load the demo
    assert demo_cli.DEFAULT_NODES == DEFAULT_NODES

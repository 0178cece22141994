"""End to end with real CAs: a simulated fleet provisioned through the reference helper.

Each test provisions 60 EC-key nodes over the isolated provisioning broker with the real
provisioner and the reference helper, whose CA adapter talks to a real CA:

- ``cfssl serve`` through the CFSSL adapter with the HMAC-authenticated ``node`` profile
  (``/authsign``), the helper running in persistent mode (its own processes);
- an OpenBao dev server (TLS) through the Vault adapter logging in with AppRole and signing
  with role ``node``, the helper running in python mode (in-process).

Every node must end in normal mode on the overlay broker with a certificate whose CN and SAN
are its identity, whose public key is the one of the node's own ``private.pem`` and which was
issued by the CA certificate fetched from the CA itself (cfssl ``/info``, OpenBao ``ca_chain``).
"""

from __future__ import annotations

import os
import ssl
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography import x509

from helpers.reference import make_handler
from provisioner.helper_runner import HelperRunner, PythonHelper
from provisioner.service import Provisioner
from testbed.ca_servers import (
    CFSSL_HINT,
    OPENBAO_HINT,
    CFSSLServer,
    OpenBaoServer,
    start_cfssl,
    start_openbao,
)
from testbed.fleet import Fleet
from tests.provisioner.e2e.env import (
    ProvEnv,
    check_node_certificate,
    prov_env,
    write_overlays_yaml,
    write_reference_yaml,
)
from tests.support import require_binary

__all__ = ["prov_env"]

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FLEET_SIZE = 60
OVERLAY = "ca-e2e"


def _secret_file(path: Path, text: str) -> Path:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(text)
    return path


@pytest.fixture
def cfssl(tmp_path: Path) -> Iterator[CFSSLServer]:
    require_binary("cfssl", CFSSL_HINT)
    server = start_cfssl(tmp_path / "cfssl")
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def openbao(tmp_path: Path) -> Iterator[OpenBaoServer]:
    require_binary("bao", OPENBAO_HINT)
    server = start_openbao(tmp_path / "openbao", tls=True)
    try:
        yield server
    finally:
        server.stop()


def _cfssl_ca_cert(server: CFSSLServer) -> x509.Certificate:
    """The CA certificate as cfssl itself publishes it (``/api/v1/cfssl/info``)."""
    r = httpx.post(f"{server.url}/api/v1/cfssl/info", json={}, timeout=10)
    r.raise_for_status()
    return x509.load_pem_x509_certificate(r.json()["result"]["certificate"].encode())


def _verify(server: OpenBaoServer) -> ssl.SSLContext | bool:
    if server.tls_ca_path is None:
        return True
    return ssl.create_default_context(cafile=str(server.tls_ca_path))


def _openbao_ca_cert(server: OpenBaoServer) -> x509.Certificate:
    """The issuing CA as OpenBao publishes it (``pki/ca_chain``, or ``pki/cert/ca_chain``)."""
    verify = _verify(server)
    r = httpx.get(f"{server.url}/v1/pki/ca_chain", timeout=10, verify=verify)
    pem = r.text if r.status_code == 200 and "BEGIN CERTIFICATE" in r.text else ""
    if not pem:
        r = httpx.get(f"{server.url}/v1/pki/cert/ca_chain", timeout=10, verify=verify)
        r.raise_for_status()
        data = r.json()["data"]
        pem = data.get("ca_chain") or data["certificate"]
    certs = x509.load_pem_x509_certificates(pem.encode())
    # The node certificates are issued by the chain's first certificate (here the root).
    return certs[0]


async def _provision_fleet(
    env: ProvEnv,
    tmp_path: Path,
    reference_yaml: Path,
    *,
    mode: str,
    ca_cert: x509.Certificate,
) -> list[x509.Certificate]:
    """Provision FLEET_SIZE nodes through the reference helper; check every node and the audit.

    Returns the nodes' certificates."""
    helper: HelperRunner | None = None
    handle: Any = None
    overrides: dict[str, Any] = {"concurrency": 64, "rpc_timeout": 10, "helper_timeout": 30}
    if mode == "persistent":
        overrides |= {
            "helper": f"{sys.executable} -m helpers.reference",
            "helper_args": ["--config", str(reference_yaml), "--persistent"],
            "helper_mode": "persistent",
            # One process: the in-memory capacity ledger is counted per helper process.
            "helper_pool_size": 1,
        }
    else:
        handle = make_handler(reference_yaml)
        helper = PythonHelper(handle, timeout=30)
        overrides |= {"helper": "helpers.reference:handler", "helper_mode": "python"}
    prov = Provisioner(env.config(**overrides), helper=helper, discovery_timeout=0.5)
    fleet = Fleet(
        FLEET_SIZE,
        env.token_path,
        [env.broker_url],
        tmp_path / "fleet",
        key_type="ec",
        restart_delay_scale=0.01,
    )
    await prov.start()
    try:
        await fleet.start()
        await fleet.wait_all_normal(90)
        nodes = fleet.local_nodes
        assert len(nodes) == FLEET_SIZE
        certs = []
        for node in nodes:
            assert node.mode == "normal"
            assert node.connected_url.endswith(f":{env.overlay.port}")  # on the overlay broker
            certs.append(check_node_certificate(node, ca_cert))
        assert len({c.serial_number for c in certs}) == FLEET_SIZE
        identities = {n.identity for n in nodes}
    finally:
        await prov.stop()
        await fleet.stop()
        if handle is not None:
            await handle.helper.aclose()
    records = env.audit()
    provisioned = Counter(r["identity"] for r in records if r["decision"] == "provisioned")
    assert provisioned == Counter(identities)  # each node exactly once
    assert {r["overlay"] for r in records if r["decision"] == "provisioned"} == {OVERLAY}
    # The isolated broker admitted the nodes through the callout (no static node user).
    assert env.broker is not None and env.broker.callout_stats.admitted >= FLEET_SIZE
    return certs


def _lifetime_h(cert: x509.Certificate) -> float:
    return (cert.not_valid_after_utc - cert.not_valid_before_utc).total_seconds() / 3600


async def test_fleet_signed_by_cfssl_serve_authsign(
    prov_env: ProvEnv, cfssl: CFSSLServer, tmp_path: Path
) -> None:
    overlays = [(OVERLAY, prov_env.overlay)]
    key_file = _secret_file(tmp_path / "cfssl-auth.key", cfssl.auth_key_hex)
    ref = write_reference_yaml(
        tmp_path / "reference.yaml",
        overlays_file=write_overlays_yaml(tmp_path / "overlays.yaml", overlays, capacity=1000),
        overlays=overlays,
        # The "node" profile requires the HMAC key: the adapter must use /authsign.
        ca={"type": "cfssl", "url": cfssl.url, "profile": "node", "auth_key_file": str(key_file)},
    )
    ca_cert = _cfssl_ca_cert(cfssl)
    certs = await _provision_fleet(prov_env, tmp_path, ref, mode="persistent", ca_cert=ca_cert)
    # Signed with the authenticated "node" profile (720h), not the default one (168h).
    assert all(abs(_lifetime_h(c) - 720) < 1 for c in certs)


async def test_fleet_signed_by_openbao_approle(
    prov_env: ProvEnv, openbao: OpenBaoServer, tmp_path: Path
) -> None:
    overlays = [(OVERLAY, prov_env.overlay)]
    secret_id = _secret_file(tmp_path / "approle-secret-id", openbao.secret_id)
    assert openbao.tls_ca_path is not None
    ref = write_reference_yaml(
        tmp_path / "reference.yaml",
        overlays_file=write_overlays_yaml(tmp_path / "overlays.yaml", overlays, capacity=1000),
        overlays=overlays,
        ca={
            "type": "vault",
            "url": openbao.url,
            "role": "node",
            "approle": {"role_id": openbao.role_id, "secret_id_file": str(secret_id)},
            "tls": {"ca_file": str(openbao.tls_ca_path)},
        },
    )
    ca_cert = _openbao_ca_cert(openbao)
    certs = await _provision_fleet(prov_env, tmp_path, ref, mode="python", ca_cert=ca_cert)
    # OpenBao issued them: its PKI lists every serial it signed.
    listed = {int(k.replace("-", "").replace(":", ""), 16) for k in _list_certs(openbao)}
    assert {c.serial_number for c in certs} <= listed


def _list_certs(server: OpenBaoServer) -> list[str]:
    verify = _verify(server)
    r = httpx.request(
        "LIST",
        f"{server.url}/v1/pki/certs",
        headers={"X-Vault-Token": server.root_token},
        timeout=10,
        verify=verify,
    )
    r.raise_for_status()
    return [str(k) for k in r.json()["data"]["keys"]]

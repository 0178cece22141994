"""The lean stdlib exec helper signs through real cfssl serve /authsign, run by ExecHelper."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

import helpers.examples.cfssl_authsign as example
from ca_adapters.servers import CFSSL_HINT, CFSSLServer, start_cfssl
from helpers.models import HelperInput
from provisioner.cli.helper import synthetic_csr
from provisioner.helper_runner import ExecHelper, HelperError
from tests.support import require_binary

pytestmark = pytest.mark.integration

IDENTITY = "node-00007.fleet.example.net"


@pytest.fixture(scope="module")
def cfssl(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CFSSLServer]:
    require_binary("cfssl", CFSSL_HINT)
    server = start_cfssl(tmp_path_factory.mktemp("cfssl-example"))
    try:
        yield server
    finally:
        server.stop()


def _input() -> HelperInput:
    inventory = {"agents": ["choria_provision"], "facts": {}, "version": "0.29.4"}
    return HelperInput(
        identity=IDENTITY,
        csr=synthetic_csr(IDENTITY, ssldir="/etc/choria/ssl"),
        inventory=json.dumps(inventory),
    )


def _runner(env: dict[str, str]) -> ExecHelper:
    return ExecHelper([sys.executable, "-S", "-E", example.__file__], timeout=10, env=env)


async def test_signs_through_authsign_and_configures_the_node(
    cfssl: CFSSLServer, tmp_path: Path
) -> None:
    key_file = tmp_path / "hmac.key"
    key_file.write_text(cfssl.auth_key_hex + "\n")
    env = {
        "CFSSL_URL": cfssl.url,
        "CFSSL_AUTH_KEY_FILE": str(key_file),
        "BROKERS": "nats://overlay-a.example.net:4222",
    }
    out = await _runner(env).run(_input())
    assert out.configuration["plugin.choria.server.provision"] == "false"
    assert out.configuration["plugin.choria.middleware_hosts"] == env["BROKERS"]
    assert out.ssldir == "/etc/choria/ssl"
    cert = x509.load_pem_x509_certificate(out.certificate.encode())  # type: ignore[union-attr]
    ca = x509.load_pem_x509_certificate(out.ca.encode())  # type: ignore[union-attr]
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == IDENTITY
    cert.verify_directly_issued_by(ca)
    # the authenticated "node" profile (720h), not the default (168h)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() > 500 * 3600


async def test_wrong_hmac_key_is_a_clear_helper_failure(cfssl: CFSSLServer, tmp_path: Path) -> None:
    key_file = tmp_path / "wrong.key"
    key_file.write_text("00" * 16)
    env = {"CFSSL_URL": cfssl.url, "CFSSL_AUTH_KEY_FILE": str(key_file), "BROKERS": "nats://x:1"}
    with pytest.raises(HelperError) as err:
        await _runner(env).run(_input())
    assert err.value.reason == "exit_code"
    assert "invalid token" in str(err.value) + err.value.stderr
    assert "00" * 16 not in str(err.value) + err.value.stderr


async def test_unreachable_ca_is_a_clear_helper_failure(tmp_path: Path) -> None:
    from provisioner.process import free_port

    key_file = tmp_path / "k.key"
    key_file.write_text("11" * 16)
    env = {
        "CFSSL_URL": f"http://127.0.0.1:{free_port()}",
        "CFSSL_AUTH_KEY_FILE": str(key_file),
        "BROKERS": "nats://x:1",
    }
    with pytest.raises(HelperError) as err:
        await _runner(env).run(_input())
    assert err.value.reason == "exit_code"
    assert "cannot reach" in str(err.value) + err.value.stderr

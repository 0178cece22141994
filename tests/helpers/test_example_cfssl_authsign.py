"""The lean exec helpers (Python stdlib and compiled Go) sign through real cfssl serve /authsign.

Both are run by ExecHelper exactly as the provisioner runs them; every test runs against both.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

import helpers.examples.cfssl_authsign as example
from helpers.models import HelperInput
from provisioner.cli.helper import synthetic_csr
from provisioner.helper_runner import ExecHelper, HelperError
from testbed.ca_servers import CFSSL_HINT, CFSSLServer, start_cfssl
from tests.support import require_binary, require_go_example

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


def _env(tmp_path: Path, url: str, key_hex: str, brokers: str = "nats://b:1") -> dict[str, str]:
    """The helper's environment: the CFSSL URL, a key file holding ``key_hex``, the brokers."""
    key_file = tmp_path / "hmac.key"
    key_file.write_text(key_hex + "\n")
    return {"CFSSL_URL": url, "CFSSL_AUTH_KEY_FILE": str(key_file), "BROKERS": brokers}


@pytest.fixture(scope="module", params=["python", "go"])
def command(request: pytest.FixtureRequest) -> list[str]:
    """The helper's argv: the stdlib Python helper, or the Go one built from source."""
    if request.param == "python":
        return [sys.executable, "-S", "-E", example.__file__]
    return [str(require_go_example("cfssl-authsign"))]


@pytest.fixture
def run(command: list[str]) -> Callable[[dict[str, str]], Awaitable[Any]]:
    async def go(env: dict[str, str], inp: HelperInput | None = None) -> Any:
        return await ExecHelper(command, timeout=10, env=env).run(inp or _input())

    return go


async def test_signs_through_authsign_and_configures_the_node(
    cfssl: CFSSLServer, tmp_path: Path, run: Any
) -> None:
    env = _env(tmp_path, cfssl.url, cfssl.auth_key_hex, "nats://overlay-a.example.net:4222")
    out = await run(env)
    assert out.configuration["plugin.choria.server.provision"] == "false"
    assert out.configuration["plugin.choria.middleware_hosts"] == env["BROKERS"]
    assert out.ssldir == "/etc/choria/ssl"
    cert = x509.load_pem_x509_certificate(out.certificate.encode())
    ca = x509.load_pem_x509_certificate(out.ca.encode())
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == IDENTITY
    cert.verify_directly_issued_by(ca)
    # the authenticated "node" profile (720h), not the default (168h)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert lifetime.total_seconds() > 500 * 3600


async def test_wrong_hmac_key_is_a_clear_helper_failure(
    cfssl: CFSSLServer, tmp_path: Path, run: Any
) -> None:
    env = _env(tmp_path, cfssl.url, "00" * 16)
    with pytest.raises(HelperError) as err:
        await run(env)
    assert err.value.reason == "exit_code"
    assert "invalid token" in str(err.value) + err.value.stderr
    assert "00" * 16 not in str(err.value) + err.value.stderr


async def test_unreachable_ca_is_a_clear_helper_failure(tmp_path: Path, run: Any) -> None:
    from testbed.process import free_port

    env = _env(tmp_path, f"http://127.0.0.1:{free_port()}", "11" * 16)
    with pytest.raises(HelperError) as err:
        await run(env)
    assert err.value.reason == "exit_code"
    assert "cannot reach" in str(err.value) + err.value.stderr


async def test_ca_fetched_from_info_when_no_ca_file(
    cfssl: CFSSLServer, tmp_path: Path, run: Any
) -> None:
    env = _env(tmp_path, cfssl.url, cfssl.auth_key_hex)
    out = await run(env)
    assert out.ca.strip() == cfssl.ca_cert_path.read_text().strip()
    env["CFSSL_CA_FILE"] = str(cfssl.ca_cert_path)
    assert (await run(env)).ca == cfssl.ca_cert_path.read_text()


async def test_request_without_csr_is_refused_before_signing(
    cfssl: CFSSLServer, tmp_path: Path, run: Any
) -> None:
    env = _env(tmp_path, cfssl.url, cfssl.auth_key_hex)
    with pytest.raises(HelperError) as err:
        await run(env, HelperInput(identity=IDENTITY, inventory="{}"))
    assert err.value.reason == "exit_code"
    assert "is the pki feature on" in err.value.stderr


async def test_bad_csr_is_cfssls_clear_error(cfssl: CFSSLServer, tmp_path: Path, run: Any) -> None:
    env = _env(tmp_path, cfssl.url, cfssl.auth_key_hex)
    inp = _input()
    assert inp.csr is not None
    inp.csr.csr = (
        "-----BEGIN CERTIFICATE REQUEST-----\ngarbage\n-----END CERTIFICATE REQUEST-----\n"
    )
    with pytest.raises(HelperError) as err:
        await run(env, inp)
    assert err.value.reason == "exit_code"
    assert "authsign" in err.value.stderr


async def test_missing_settings_name_the_variable(tmp_path: Path, run: Any) -> None:
    with pytest.raises(HelperError) as err:
        await run({"CFSSL_URL": "http://127.0.0.1:1", "BROKERS": "nats://b:1"})
    assert "CFSSL_AUTH_KEY_FILE is not set" in err.value.stderr


async def test_redirect_is_not_followed_with_the_signed_request(tmp_path: Path, run: Any) -> None:
    """A 3xx from "CFSSL" fails the helper; the HMAC-signed body never goes elsewhere."""
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    stolen: list[bytes] = []

    class Thief(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            stolen.append(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    thief = ThreadingHTTPServer(("127.0.0.1", 0), Thief)

    class Redirector(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("Content-Length", "0")))
            self.send_response(307)
            self.send_header("Location", f"http://127.0.0.1:{thief.server_port}/steal")
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    redirector = ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    servers = [thief, redirector]
    threads = [threading.Thread(target=s.serve_forever, daemon=True) for s in servers]
    for t in threads:
        t.start()
    try:
        env = _env(tmp_path, f"http://127.0.0.1:{redirector.server_port}", "22" * 16)
        with pytest.raises(HelperError) as err:
            await run(env)
        assert err.value.reason == "exit_code"
        assert "307" in err.value.stderr
        assert stolen == []
    finally:
        for s in servers:
            s.shutdown()
            s.server_close()

"""CFSSLAdapter against real ``cfssl serve`` and ``multirootca`` (and a lying CA peer)."""

from __future__ import annotations

import asyncio
import base64
import json
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID

from ca_adapters import CAError, CAVerificationError, CFSSLAdapter, GuardedCA, LocalCA, SignRequest
from testbed.ca_servers import CFSSLServer, start_cfssl
from tests.ca_adapters.conftest import need_cfssl
from tests.ca_adapters.helpers import load_cert, make_csr, pem_of, spki

pytestmark = pytest.mark.integration

ID = "node1.example.net"


def adapter_for(server: CFSSLServer, **kw: object) -> CFSSLAdapter:
    kw.setdefault("ca_pem", server.ca_pem)
    return CFSSLAdapter(server.url, label=server.label, **kw)  # type: ignore[arg-type]


def assert_issued(pem: str, key: object, server_ca_pem: str, *, days: float) -> x509.Certificate:
    cert = load_cert(pem)
    assert cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == ID
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == [ID]
    assert spki(cert.public_key()) == spki(key)
    cert.verify_directly_issued_by(load_cert(server_ca_pem))
    left = cert.not_valid_after_utc - datetime.now(UTC)
    assert abs(left - timedelta(days=days)) < timedelta(minutes=15)
    return cert


# -- cfssl serve --------------------------------------------------------------------------------


async def test_sign_default_profile(cfssl_server: CFSSLServer) -> None:
    csr, key = make_csr(ID)
    ca = adapter_for(cfssl_server)
    try:
        res = await ca.sign(SignRequest(ID, csr))
        assert_issued(res.certificate_pem, key, cfssl_server.ca_pem, days=7)  # default: 168h
        assert res.chain_pem == pem_of(load_cert(cfssl_server.ca_pem))
        assert await ca.health() is True
    finally:
        await ca.aclose()


async def test_authsign_node_profile(cfssl_server: CFSSLServer) -> None:
    csr, key = make_csr(ID)
    ca = adapter_for(cfssl_server, auth_key_hex=cfssl_server.auth_key_hex, profile="node")
    try:
        res = await ca.sign(SignRequest(ID, csr))
        assert_issued(res.certificate_pem, key, cfssl_server.ca_pem, days=30)  # node: 720h
    finally:
        await ca.aclose()


async def test_ca_chain_from_info_when_not_pinned(cfssl_server: CFSSLServer) -> None:
    ca = CFSSLAdapter(cfssl_server.url)
    try:
        assert load_cert(await ca.ca_chain()) == load_cert(cfssl_server.ca_pem)
    finally:
        await ca.aclose()


async def test_wrong_hmac_key_is_permanent_and_not_leaked(cfssl_server: CFSSLServer) -> None:
    wrong = "ab" * 16
    csr, _ = make_csr(ID)
    ca = adapter_for(cfssl_server, auth_key_hex=wrong, profile="node")
    try:
        with pytest.raises(CAError, match="invalid token") as info:
            await ca.sign(SignRequest(ID, csr))
        assert info.value.retryable is False and info.value.status == 400
        assert wrong not in str(info.value)
        assert "cfssl" in str(info.value)
    finally:
        await ca.aclose()


async def test_sign_on_auth_profile_without_key_is_refused(cfssl_server: CFSSLServer) -> None:
    csr, _ = make_csr(ID)
    ca = adapter_for(cfssl_server, profile="node", profiles={"node": 720 * 3600})
    try:
        with pytest.raises(CAError, match="authentication required") as info:
            await ca.sign(SignRequest(ID, csr))
        assert not info.value.retryable
    finally:
        await ca.aclose()


async def test_unknown_profile_silent_fallback_is_refused(cfssl_server: CFSSLServer) -> None:
    csr, _ = make_csr(ID)
    # The server really does fall back: it signs "nope" with the default profile.
    raw = httpx.post(
        f"{cfssl_server.url}/api/v1/cfssl/sign",
        json={"certificate_request": csr, "hosts": [ID], "profile": "nope"},
    )
    assert raw.status_code == 200 and raw.json()["success"] is True
    # Undeclared profile that looks exactly like the default: refused before signing.
    ca = adapter_for(cfssl_server, profile="nope")
    try:
        with pytest.raises(CAVerificationError, match="silently falls back"):
            await ca.sign(SignRequest(ID, csr))
    finally:
        await ca.aclose()
    # Declared expectation (720h): the server signs with 168h, the certificate is refused.
    ca = adapter_for(cfssl_server, profile="nope", profiles={"nope": 720 * 3600})
    try:
        with pytest.raises(CAVerificationError, match="profile promises"):
            await ca.sign(SignRequest(ID, csr))
    finally:
        await ca.aclose()


async def test_bad_csr_is_refused_before_calling_the_ca(cfssl_server: CFSSLServer) -> None:
    ca = adapter_for(cfssl_server)
    try:
        with pytest.raises(CAError, match="not valid PEM") as info:
            await ca.sign(SignRequest(ID, "junk"))
        assert not info.value.retryable
    finally:
        await ca.aclose()


async def test_tls_pinned_and_wrong_pin(tmp_path: Path) -> None:
    need_cfssl()
    server = start_cfssl(tmp_path / "tls", tls=True, ca_source="local")
    try:
        assert server.tls_ca_path is not None and server.url.startswith("https://")
        csr, key = make_csr(ID)
        ca = adapter_for(server, tls_verify=str(server.tls_ca_path))
        try:
            res = await ca.sign(SignRequest(ID, csr))
            assert_issued(res.certificate_pem, key, server.ca_pem, days=7)
        finally:
            await ca.aclose()
        # Trusting another CA for the TLS connection: a permanent error, no signing.
        (tmp_path / "other.pem").write_text(LocalCA.generate("ec").chain_pem)
        ca = adapter_for(server, tls_verify=str(tmp_path / "other.pem"))
        try:
            with pytest.raises(CAError, match="TLS verification") as info:
                await ca.sign(SignRequest(ID, csr))
            assert not info.value.retryable
        finally:
            await ca.aclose()
    finally:
        server.stop()


async def test_ca_down_opens_breaker_and_recovers(tmp_path: Path) -> None:
    need_cfssl()
    server = start_cfssl(tmp_path / "down")
    csr, key = make_csr(ID)
    inner = adapter_for(server, auth_key_hex=server.auth_key_hex, profile="node")
    guarded = GuardedCA(inner, breaker_failures=3, breaker_reset_s=0.3)
    try:
        assert (await guarded.sign(SignRequest(ID, csr))).certificate_pem
        server.stop()
        assert await guarded.health() is False
        for _ in range(3):
            with pytest.raises(CAError, match="cannot connect") as info:
                await guarded.sign(SignRequest(ID, csr))
            assert info.value.retryable
        assert guarded.state == "open"
        with pytest.raises(CAError, match="circuit open") as info:
            await guarded.sign(SignRequest(ID, csr))
        assert info.value.retryable and guarded.rejected == 1
        server.start()  # same port, same CA files
        await asyncio.sleep(0.35)
        assert guarded.state == "half_open"
        res = await guarded.sign(SignRequest(ID, csr))
        assert_issued(res.certificate_pem, key, server.ca_pem, days=30)
        assert guarded.state == "closed"
    finally:
        await guarded.aclose()
        server.stop()


# -- multirootca ----------------------------------------------------------------------------


async def test_multirootca_authsign_with_label(multirootca_server: CFSSLServer) -> None:
    assert multirootca_server.label == "fleet"
    csr, key = make_csr(ID)
    ca = adapter_for(
        multirootca_server, auth_key_hex=multirootca_server.auth_key_hex, profile="node"
    )
    try:
        assert ca.name == "multirootca"
        res = await ca.sign(SignRequest(ID, csr))
        assert_issued(res.certificate_pem, key, multirootca_server.ca_pem, days=30)
        assert await ca.health() is True
    finally:
        await ca.aclose()


async def test_multirootca_unknown_profile_is_an_error(multirootca_server: CFSSLServer) -> None:
    csr, _ = make_csr(ID)
    ca = adapter_for(
        multirootca_server,
        auth_key_hex=multirootca_server.auth_key_hex,
        profile="nope",
        profiles={"nope": 720 * 3600},
    )
    try:
        with pytest.raises(CAError, match="invalid profile") as info:
            await ca.sign(SignRequest(ID, csr))
        assert not info.value.retryable and not isinstance(info.value, CAVerificationError)
    finally:
        await ca.aclose()


async def test_multirootca_wrong_key(multirootca_server: CFSSLServer) -> None:
    csr, _ = make_csr(ID)
    ca = adapter_for(multirootca_server, auth_key_hex="cd" * 16, profile="node")
    try:
        with pytest.raises(CAError, match="invalid token") as info:
            await ca.sign(SignRequest(ID, csr))
        assert not info.value.retryable and "cd" * 16 not in str(info.value)
    finally:
        await ca.aclose()


# -- a real HTTP peer that speaks cfssl but lies ----------------------------------------------

LYING_CA = LocalCA.generate("ec", "Lying Peer CA", validity_s=720 * 3600)


class _LyingHandler(BaseHTTPRequestHandler):
    mode = "honest"

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path.endswith("/info"):
            result = {
                "certificate": pem_of(LYING_CA.cert),
                "usages": ["digital signature", "server auth", "client auth"],
                "expiry": "720h",
            }
        else:
            inner = json.loads(base64.b64decode(body["request"])) if "request" in body else body
            csr, ident = inner["certificate_request"], inner["hosts"][0]
            if self.mode == "other-key":
                csr, _ = make_csr(ident)  # a certificate for somebody else's key
            elif self.mode == "other-name":
                ident = "intruder.example.net"
            result = {"certificate": LYING_CA.sign_sync(SignRequest(ident, csr)).certificate_pem}
        out = json.dumps({"success": True, "result": result, "errors": [], "messages": []})
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(out)))
        self.end_headers()
        self.wfile.write(out.encode())

    def log_message(self, format: str, *args: object) -> None:
        pass


@pytest.fixture
def lying_peer() -> Iterator[tuple[str, type[_LyingHandler]]]:
    handler = type("Handler", (_LyingHandler,), {})
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=httpd.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}", handler
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


@pytest.mark.parametrize(
    ("mode", "match"),
    [("honest", None), ("other-key", "public key is not the key"), ("other-name", "CN is")],
)
async def test_a_ca_returning_someone_elses_certificate_is_refused(
    lying_peer: tuple[str, type[_LyingHandler]], mode: str, match: str | None
) -> None:
    url, handler = lying_peer
    handler.mode = mode
    csr, key = make_csr(ID)
    ca = CFSSLAdapter(
        url,
        auth_key_hex="00" * 16,
        profile="node",
        ca_pem=LYING_CA.chain_pem,
        check_profile_fallback=False,  # this peer has a single profile
    )
    try:
        if match is None:  # control: the same peer telling the truth is accepted
            res = await ca.sign(SignRequest(ID, csr))
            assert spki(load_cert(res.certificate_pem).public_key()) == spki(key)
        else:
            with pytest.raises(CAVerificationError, match=match):
                await ca.sign(SignRequest(ID, csr))
    finally:
        await ca.aclose()


async def test_concurrent_signs_share_one_info_request(cfssl_server: CFSSLServer) -> None:
    """A burst of signs on a cold adapter asks cfssl's /info once, not once per sign."""
    import asyncio

    adapter = adapter_for(cfssl_server)
    calls = 0
    real = adapter._fetch_info

    async def counting(cache_key: str, profile: str | None) -> object:
        nonlocal calls
        calls += 1
        return await real(cache_key, profile)

    adapter._fetch_info = counting  # type: ignore[method-assign]
    try:
        infos = await asyncio.gather(*(adapter.info(None) for _ in range(20)))
        assert calls == 1
        assert len({i.certificate_pem for i in infos}) == 1
    finally:
        await adapter.aclose()

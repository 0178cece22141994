"""The overlay brokers of a local stack: nats-servers that provisioned nodes restart into.

Either one server standing in for every overlay (the tests, the benchmark) or one server per
overlay of a registry (the demo). A server may require TLS client certificates issued by the
stack's CA (``verify: true``): a node that connects has then *proved* its new certificate chains
to that CA.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA, SignRequest
from jwt_tools import write_private_file
from provisioner.broker.config import nats_conf_quote
from testbed.natsserver import NatsServer

__all__ = ["OverlayBroker", "client_certificate", "overlay_server_config", "server_certificate"]


@dataclass(slots=True)
class OverlayBroker:
    """A nats-server standing in for one overlay's brokers."""

    name: str
    region: str
    url: str
    server: NatsServer

    @property
    def monitor_port(self) -> int:
        return int(self.server.monitor_port)


def client_certificate(ca: LocalCA, identity: str, directory: Path) -> tuple[Path, Path]:
    """A client certificate (CN ``identity``) signed by ``ca``, as the provisioner presents it
    to the overlay brokers (``client:`` in the registry): (cert, key) files in ``directory``."""
    return server_certificate(ca, identity, directory, cn=identity, prefix="client")


def server_certificate(
    ca: LocalCA, name: str, directory: Path, *, cn: str = "", prefix: str = "server"
) -> tuple[Path, Path]:
    """A TLS server certificate for 127.0.0.1/localhost signed by ``ca``: (cert, key) files.

    The CA adds both serverAuth and clientAuth: the same shape serves :func:`client_certificate`.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    cn = cn or f"{name}.brokers.demo.internal"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
        .sign(key, hashes.SHA256())
    )
    res = ca.sign_sync(
        SignRequest(
            identity=cn,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
            dns_sans=("localhost",),
            ip_sans=("127.0.0.1",),
            ttl_s=86400,
        )
    )
    directory.mkdir(parents=True, exist_ok=True)
    cert_path, key_path = directory / f"{prefix}.pem", directory / f"{prefix}-key.pem"
    cert_path.write_text(res.certificate_pem)
    write_private_file(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return cert_path, key_path


def overlay_server_config(
    name: str, *, tls: tuple[Path, Path, Path] | None, max_connections: int
) -> str:
    """nats-server config text (``start_nats_server`` placeholders) for one overlay broker.

    With TLS, ``verify: true`` makes the server demand a client certificate that chains to the
    CA: a node that connects has proved its new certificate is good. No accounts: the overlay
    is open to any holder of such a certificate.
    """
    lines = [
        f"server_name: {nats_conf_quote('overlay_' + name.replace('-', '_'))}",
        "listen: 127.0.0.1:{port}",
        "http: 127.0.0.1:{monitor_port}",
        f"max_connections: {max_connections}",
    ]
    if tls is not None:
        cert, key, ca = tls
        lines += [
            "tls {{",
            f"  cert_file: {nats_conf_quote(str(cert))}",
            f"  key_file: {nats_conf_quote(str(key))}",
            f"  ca_file: {nats_conf_quote(str(ca))}",
            "  verify: true",
            "  timeout: 5",
            "}}",
        ]
    return "\n".join(lines) + "\n"

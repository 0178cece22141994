"""Generate the provisioning broker: nats-server config, callout config and their secrets.

One call writes everything an operator needs into one directory:

- ``nats-server.conf``: accounts ``AUTH`` (the callout service only), ``PROVISIONING``
  (unprovisioned nodes, admitted one by one by the callout, and the provisioner user),
  ``CHORIA`` (read-only observers of provisioning lifecycle events) and ``SYS``; JetStream
  (store under ``DIR/jetstream``) for the provisioner's KV buckets and the callout's pin bucket;
  TLS for every listener that is not loopback-only (see below); the ``auth_callout`` block
  with ``xkey`` so credentials never cross the broker in clear.
- ``broker-auth.yaml``: the callout service's config, including its nkey, issuer and xkey seeds.
- ``provisioner.password``, ``choria.password``, ``sys.password``.
- ``tls/`` (generated TLS): a local CA (``ca.pem``, ``ca-key.pem``) and the server certificate.

TLS is the default: node tokens, passwords and the ECDH public keys the provisioner encrypts
central keys to travel over this listener, so a listener reachable from the network gets TLS
(a generated CA and certificate, or the operator's ``tls_cert``/``tls_key``). A plain-text
config is written only for a loopback listener (the test bed, the demo) or with ``insecure``;
otherwise :class:`BrokerConfigError` is raised before anything is written.

Every file holding a secret is written 0600 via a temp file and ``os.replace``.
"""

from __future__ import annotations

import ipaddress
import os
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID

from ca_adapters.base import SignRequest
from ca_adapters.local import LocalCA
from choria_core.errors import FleetError
from choria_core.securefile import write_atomic
from jwt_tools.nats_jwt import PREFIX_ACCOUNT, PREFIX_USER, CurveKey, NKey

__all__ = [
    "AGENT_BROADCASTS",
    "AUTH_ACCOUNT",
    "CHORIA_ACCOUNT",
    "DEFAULT_PIN_BUCKET",
    "PROVISIONING_ACCOUNT",
    "SYS_ACCOUNT",
    "BrokerConfigError",
    "BrokerFiles",
    "BrokerSettings",
    "generate_broker_config",
    "nats_conf_quote",
    "render_server_config",
    "write_secret_file",
]

AUTH_ACCOUNT = "AUTH"
PROVISIONING_ACCOUNT = "PROVISIONING"
CHORIA_ACCOUNT = "CHORIA"
SYS_ACCOUNT = "SYS"
DEFAULT_PIN_BUCKET = "BROKER_IDENTITY_PINS"
AGENT_BROADCASTS = ("discovery", "rpcutil", "choria_util", "choria_provision")
# Node lifecycle events the callout listens to (pin release) and CHORIA may observe.
NODE_LIFECYCLE = "choria.lifecycle.event.*.provision_mode_server"
PROVISIONED_EVENT = "choria.lifecycle.event.provisioned.provision_mode_server"
# Buckets the provisioner creates in PROVISIONING's JetStream (documented in the config).
PROVISIONER_BUCKETS = ("CHORIA_LEADER_ELECTION", "OVERLAY_LEDGER")


class BrokerConfigError(FleetError, reason="broker_config"):
    """The broker config cannot be written as asked (a plain-text network listener, bad TLS)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` listens on the loopback interface only (``0.0.0.0``/``::`` do not)."""
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def write_secret_file(path: Path, data: str | bytes, mode: int = 0o600) -> Path:
    """Write ``data`` atomically with ``mode`` (temp file in the same directory, then replace)."""
    raw = data.encode() if isinstance(data, str) else data
    return write_atomic(path, raw, mode, durable=False, make_parents=0o777)


def nats_conf_quote(value: str) -> str:
    """``value`` as a double-quoted nats-server config string (backslashes and quotes escaped)."""
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


_q = nats_conf_quote


def _qlist(values: Sequence[str]) -> str:
    return "[" + ", ".join(_q(v) for v in values) + "]"


@dataclass
class BrokerSettings:
    """Everything :func:`render_server_config` needs (secrets included, never logged)."""

    port: int = 4222
    monitor_port: int = 8222
    listen_host: str = "0.0.0.0"
    monitor_host: str = "127.0.0.1"
    store_dir: Path = Path("jetstream")
    server_name: str = "provisioning_broker"
    provisioner_password: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    choria_password: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    sys_password: str = field(default_factory=lambda: secrets.token_urlsafe(32), repr=False)
    auth_user_public: str = ""
    issuer_public: str = ""
    xkey_public: str = ""
    tls_cert: Path | None = None
    tls_key: Path | None = None
    auth_timeout_s: float = 2.0


def render_server_config(s: BrokerSettings) -> str:
    """The nats-server configuration text for ``s`` (literal braces, not a format template)."""
    tls = ""
    if s.tls_cert and s.tls_key:
        # No client certificates: unprovisioned nodes have none before they are provisioned;
        # the auth callout decides who may connect.
        tls = (
            "tls {\n"
            f"  cert_file: {_q(str(s.tls_cert))}\n"
            f"  key_file: {_q(str(s.tls_key))}\n"
            "  timeout: 5\n"
            "}\n"
        )
    broadcasts = [f"provisioning.broadcast.agent.{a}" for a in AGENT_BROADCASTS]
    return f"""# Generated by `provisioner broker config`. Holds secrets: keep it 0600.
# Provisioning broker: unprovisioned nodes are admitted one by one by the auth callout
# (`provisioner broker auth`) into PROVISIONING with permissions for their own identity only.
server_name: {_q(s.server_name)}
listen: {_q(f"{s.listen_host}:{s.port}")}
http: {_q(f"{s.monitor_host}:{s.monitor_port}")}
max_payload: 4MB
max_connections: 200000
max_control_line: 4KB
write_deadline: "10s"

jetstream {{
  store_dir: {_q(str(s.store_dir))}
  max_memory_store: 256MB
  max_file_store: 2GB
}}
{tls}
accounts {{
  # Only the callout service lives here. It receives the (xkey-sealed) connection requests on
  # $SYS.REQ.USER.AUTH and keeps identity pins in its own JetStream KV bucket.
  {AUTH_ACCOUNT} {{
    jetstream: enabled
    users: [ {{ nkey: {_q(s.auth_user_public)} }} ]
    imports: [
      {{ stream: {{ account: {PROVISIONING_ACCOUNT}, subject: {_q(PROVISIONED_EVENT)} }} }}
    ]
  }}
  # Unprovisioned nodes (users minted by the callout) and the provisioner. The provisioner
  # creates its KV buckets here: {", ".join(PROVISIONER_BUCKETS)}.
  {PROVISIONING_ACCOUNT} {{
    jetstream: enabled
    users: [
      {{ user: "provisioner", password: {_q(s.provisioner_password)} }}
    ]
    exports: [
      {{ stream: {_q(NODE_LIFECYCLE)} }}
    ]
  }}
  # Observers: sees provisioning-mode lifecycle events, nothing else of PROVISIONING.
  {CHORIA_ACCOUNT} {{
    users: [
      {{ user: "choria", password: {_q(s.choria_password)},
        permissions: {{
          publish: {{ deny: [">"] }}
          subscribe: {{ allow: ["choria.lifecycle.>"] }}
        }} }}
    ]
    imports: [
      {{ stream: {{ account: {PROVISIONING_ACCOUNT}, subject: {_q(NODE_LIFECYCLE)} }} }}
    ]
  }}
  {SYS_ACCOUNT} {{
    users: [ {{ user: "sys", password: {_q(s.sys_password)} }} ]
  }}
}}
system_account: {SYS_ACCOUNT}

# Node subjects granted by the callout: sub provisioning.node.<identity>,
# {", ".join(broadcasts)}.
authorization {{
  timeout: {s.auth_timeout_s}
  auth_callout {{
    issuer: {_q(s.issuer_public)}
    account: {AUTH_ACCOUNT}
    # These users authenticate statically; every other connection goes to the callout.
    auth_users: {_qlist([s.auth_user_public, "provisioner", "choria", "sys"])}
    xkey: {_q(s.xkey_public)}
  }}
}}
"""


@dataclass
class BrokerFiles:
    """Paths written by :func:`generate_broker_config` and the settings used."""

    directory: Path
    server_config: Path
    auth_config: Path
    provisioner_password_file: Path
    settings: BrokerSettings
    tls_ca: Path | None = None
    verify_key_files: list[Path] = field(default_factory=list)

    @property
    def server_config_text(self) -> str:
        return self.server_config.read_text()


def _write_tls(directory: Path, hosts: Sequence[str]) -> tuple[Path, Path, Path]:
    """A local CA plus a server certificate for ``hosts``; returns (ca, cert, key)."""
    ca = LocalCA.generate("ec", "Provisioning Broker CA")
    ca_cert, _ = ca.write(directory)
    key = ec.generate_private_key(ec.SECP256R1())
    dns = [h for h in hosts if not _is_ip(h)]
    ips = [h for h in hosts if _is_ip(h)]
    identity = dns[0] if dns else "localhost"
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .sign(key, hashes.SHA256())
    )
    result = ca.sign_sync(
        SignRequest(
            identity=identity,
            csr_pem=csr.public_bytes(serialization.Encoding.PEM).decode(),
            dns_sans=tuple(dns[1:]),
            ip_sans=tuple(ips),
            ttl_s=825 * 86400.0,
        )
    )
    cert_path = directory / "server.pem"
    key_path = directory / "server-key.pem"
    write_secret_file(cert_path, result.certificate_pem + result.chain_pem, 0o644)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    write_secret_file(key_path, key_pem, 0o600)
    return ca_cert, cert_path, key_path


_AUTH_HEADER = (
    "# Auth callout config for `provisioner broker auth --config <this file>`.\n"
    "# Holds the callout's nkey, issuer and xkey seeds: keep it 0600.\n"
)
_ADMISSION_DEFAULTS: dict[str, float] = {
    "max_pending": 1000,
    "workers": 8,
    "source_rate": 10.0,
    "source_burst": 50,
}


def _admission_settings(overrides: Mapping[str, float] | None) -> dict[str, float]:
    out = dict(_ADMISSION_DEFAULTS)
    for key, value in (overrides or {}).items():
        if key not in out:
            raise BrokerConfigError(f"unknown admission setting {key!r}")
        out[key] = value
    return out


def _cert_hosts(tls_hosts: Sequence[str], listen_host: str) -> list[str]:
    """The generated certificate's names: as asked, plus loopback (the callout's URL) and a
    specific listen address."""
    hosts = list(dict.fromkeys([*tls_hosts, "localhost", "127.0.0.1"]))
    if not is_loopback(listen_host) and listen_host not in ("0.0.0.0", "::", ""):
        hosts.append(listen_host)
    return hosts


def _tls_wanted(tls: bool | None, own_tls: bool, listen_host: str, insecure: bool) -> bool:
    """Whether to generate TLS; refuses plain text on a network listener unless ``insecure``."""
    if tls is None:
        tls = not own_tls and not is_loopback(listen_host)
    if not (tls or own_tls or insecure or is_loopback(listen_host)):
        raise BrokerConfigError(
            f"refusing a plain-text listener on {listen_host}: provisioning tokens, passwords and "
            "ECDH public keys would cross the network in clear"
        )
    return tls


def _check_tls_files(
    cert: Path | None, key: Path | None, ca: Path | None, tls: bool | None
) -> bool:
    """True when the operator gave a certificate and key (checked: they parse and match)."""
    if cert is None and key is None:
        if ca is not None:
            raise BrokerConfigError("a TLS CA was given without a certificate and key")
        return False
    if cert is None or key is None:
        raise BrokerConfigError("a TLS certificate and its key go together: give both")
    if tls is False:
        raise BrokerConfigError("a TLS certificate and key were given but TLS was turned off")
    try:
        cert_obj = x509.load_pem_x509_certificate(Path(cert).read_bytes())
        key_obj = serialization.load_pem_private_key(Path(key).read_bytes(), password=None)
        if ca is not None:
            x509.load_pem_x509_certificates(Path(ca).read_bytes())
    except (OSError, ValueError, TypeError) as exc:
        raise BrokerConfigError(f"cannot use the TLS files: {type(exc).__name__}: {exc}") from None
    spki = serialization.PublicFormat.SubjectPublicKeyInfo
    pem = serialization.Encoding.PEM
    if cert_obj.public_key().public_bytes(pem, spki) != key_obj.public_key().public_bytes(
        pem, spki
    ):
        raise BrokerConfigError("the TLS key does not belong to the TLS certificate")
    return True


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _verify_key_sources(directory: Path, keys: Sequence[Any]) -> list[str]:
    """Turn paths, inline hex and key objects into sources for ``jwt_tools.load_verify_key``."""
    out: list[str] = []
    for i, key in enumerate(keys):
        if isinstance(key, ed25519.Ed25519PublicKey | rsa.RSAPublicKey):
            pem = key.public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            path = write_secret_file(directory / "verify-keys" / f"key-{i}.pem", pem, 0o644)
            out.append(str(path.resolve()))
        elif isinstance(key, Path) or (isinstance(key, str) and Path(key).exists()):
            out.append(str(Path(key).resolve()))
        elif isinstance(key, str):
            out.append(key)  # inline hex ed25519 public key
        else:
            raise TypeError(f"verify key #{i}: expected a path, inline hex or a public key object")
    if not out:
        raise ValueError("at least one provisioning token verify key is required")
    return out


def generate_broker_config(
    out_dir: Path,
    verify_keys: Sequence[Any],
    *,
    port: int = 4222,
    monitor_port: int = 8222,
    listen_host: str = "0.0.0.0",
    tls: bool | None = None,
    tls_hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    tls_cert: Path | None = None,
    tls_key: Path | None = None,
    tls_ca: Path | None = None,
    insecure: bool = False,
    connect_url: str | None = None,
    pinning: bool = False,
    require_nkey: bool = False,
    pin_ttl_s: float = 3600.0,
    user_jwt_ttl_s: float = 3600.0,
    server_name: str = "provisioning_broker",
    admission: Mapping[str, float] | None = None,
) -> BrokerFiles:
    """Write the broker's config, the callout config and the secrets into ``out_dir``.

    ``verify_keys`` are the provisioning-token verification keys: paths (certificate, public key
    PEM or hex file), inline hex ed25519 keys, or public key objects (written as PEM files).
    Fresh secrets are generated on every call. TLS: ``tls_cert``/``tls_key`` (+ ``tls_ca``)
    are the operator's; ``tls=True`` generates a CA and certificate; ``tls=None`` generates them
    unless ``listen_host`` is loopback-only; plain text on a network listener raises
    :class:`BrokerConfigError` unless ``insecure``. ``admission``: the callout's
    ``max_pending``, ``workers``, ``source_rate``, ``source_burst``.
    """
    own_tls = _check_tls_files(tls_cert, tls_key, tls_ca, tls)
    tls = _tls_wanted(tls, own_tls, listen_host, insecure)
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(out_dir, 0o700)
    store_dir = out_dir / "jetstream"
    store_dir.mkdir(exist_ok=True)

    auth_user = NKey.generate(PREFIX_USER)
    issuer = NKey.generate(PREFIX_ACCOUNT)
    xkey = CurveKey.generate()
    settings = BrokerSettings(
        port=port,
        monitor_port=monitor_port,
        listen_host=listen_host,
        store_dir=store_dir,
        server_name=server_name,
        auth_user_public=auth_user.public_key,
        issuer_public=issuer.public_key,
        xkey_public=xkey.public_key,
    )
    if own_tls:
        assert tls_cert is not None and tls_key is not None
        settings.tls_cert, settings.tls_key = Path(tls_cert).resolve(), Path(tls_key).resolve()
        tls_ca = tls_ca.resolve() if tls_ca else None
    elif tls:
        tls_ca, settings.tls_cert, settings.tls_key = _write_tls(
            out_dir / "tls", _cert_hosts(tls_hosts, listen_host)
        )

    sources = _verify_key_sources(out_dir, verify_keys)
    scheme = "tls" if tls or own_tls else "nats"
    auth_cfg: dict[str, Any] = {
        "servers": [connect_url or f"{scheme}://127.0.0.1:{port}"],
        "tls_ca": str(tls_ca) if tls_ca else None,
        "auth_user_seed": auth_user.seed,
        "issuer_seed": issuer.seed,
        "xkey_seed": xkey.seed,
        "target_account": PROVISIONING_ACCOUNT,
        "verify_keys": sources,
        "queue_group": "broker-auth",
        "user_jwt_ttl": user_jwt_ttl_s,
        "response_ttl": 60,
        "token_leeway": 30,
        **_admission_settings(admission),
        "pinning": {
            "enabled": pinning,
            "bucket": DEFAULT_PIN_BUCKET,
            "ttl": pin_ttl_s,
            "require_nkey": require_nkey,
            "release_on_provisioned": True,
        },
    }
    server_config = write_secret_file(out_dir / "nats-server.conf", render_server_config(settings))
    auth_config = write_secret_file(
        out_dir / "broker-auth.yaml", _AUTH_HEADER + yaml.safe_dump(auth_cfg, sort_keys=False)
    )
    pw_file = write_secret_file(out_dir / "provisioner.password", settings.provisioner_password)
    for name, secret in (("choria", settings.choria_password), ("sys", settings.sys_password)):
        write_secret_file(out_dir / f"{name}.password", secret)
    return BrokerFiles(
        directory=out_dir,
        server_config=server_config,
        auth_config=auth_config,
        provisioner_password_file=pw_file,
        settings=settings,
        tls_ca=tls_ca,
        verify_key_files=[Path(s) for s in sources if Path(s).exists()],
    )

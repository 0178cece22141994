"""``provisioner demo``: the whole system doing its real job on one machine, nothing to configure.

:class:`Demo` starts, on 127.0.0.1 and inside one work directory:

1. a token signing key pair and a provisioning token whose ``chu`` is the provisioning broker;
2. the provisioning broker: nats-server with the auth callout
   (:func:`provisioner.broker.start_isolated_broker`), TLS as go-choria nodes expect;
3. a CA: the built-in :class:`ca_adapters.LocalCA` (EC), or ``cfssl serve`` with ``ca="cfssl"``;
4. one small nats-server per overlay of the packaged sample registry, each requiring TLS
   client certificates issued by that CA (so a node that connects has *proved* its
   certificate chains), and the registry rewritten to point at them;
5. the reference helper (python mode by default) configured for those overlays and the CA;
6. the provisioner with its admin API and status page on a free port;
7. ``N`` simulated nodes (:class:`testbed.fleet.Fleet`, EC keys).

It then waits until every node is provisioned and back in normal mode, and **verifies** the
result independently of the provisioner's own bookkeeping: every node's certificate (read from
the node's ssldir on disk) chains to the CA, has CN and SAN = identity and matches the node's
``private.pem``; every node is connected, by name, to the nats-server of the overlay it was
placed in (the servers' ``/connz`` monitoring endpoint). :meth:`Demo.close` stops everything it
started, in reverse order, also after Ctrl-C.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import secrets
import shutil
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import psutil
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_NODES",
    "Demo",
    "DemoError",
    "DemoOptions",
    "DemoResult",
    "NodeCheck",
    "verify_node_certificate",
]

#: Default fleet size: provisions in ~15 s on a 2-core machine (see docs/quickstart.md).
DEFAULT_NODES = 250

CAKind = Literal["local", "cfssl"]
HelperMode = Literal["python", "persistent", "exec"]

PROVISIONER_IDENTITY = "demo-provisioner.fleet.example.net"
# Every attempt of a node ends in one of these states (until its next event or sweep).
_SETTLED = ("provisioned", "failed", "deferred", "shut_down")
# Longer than a node's restart delay (2 s after ``restart`` with splay 1).
SETTLE_S = 5.0


class DemoError(RuntimeError):
    """The demo could not set something up; the message says what and how to fix it."""


@dataclass(slots=True)
class DemoOptions:
    """What ``provisioner demo`` was asked for."""

    nodes: int = DEFAULT_NODES
    ca: CAKind = "local"
    helper_mode: HelperMode = "python"
    processes: int = 1
    workdir: Path | None = None
    #: Start nodes gradually (nodes per second) instead of all at once.
    start_rate: float | None = None
    #: Overall limit for provisioning; ``None``: generous, from the fleet size.
    timeout: float | None = None
    seed: int = 0
    #: TLS on the provisioning broker and mutual TLS on the overlay brokers.
    tls: bool = True
    #: Scales the node's restart delay (go-choria restarts 2 s after ``restart`` with splay 1).
    restart_delay_scale: float = 1.0

    def effective_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        start = self.nodes / self.start_rate if self.start_rate else 0.0
        per_node = 0.3 if self.helper_mode == "exec" else 0.05
        return 60.0 + start + self.nodes * per_node


@dataclass(slots=True)
class OverlayBroker:
    """A nats-server standing in for one overlay's brokers."""

    name: str
    region: str
    url: str
    server: Any  # testbed.natsserver.NatsServer

    @property
    def monitor_port(self) -> int:
        return int(self.server.monitor_port)


@dataclass(slots=True)
class NodeCheck:
    """What the verification found for one node."""

    identity: str
    overlay: str | None = None
    certificate_ok: bool = False
    connected_to: str | None = None  # overlay whose server has a connection named identity
    mode: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def connected_ok(self) -> bool:
        return self.overlay is not None and self.connected_to == self.overlay


@dataclass(slots=True)
class DemoResult:
    """The verified outcome (``to_json`` is the ``--json`` line)."""

    nodes: int
    provisioned: int
    failed: int
    deferred: int
    verified: int
    connected: int
    nodes_per_minute: float
    p50_s: float | None
    p95_s: float | None
    p50_normal_s: float | None
    overlays: dict[str, int]
    elapsed_s: float
    provision_s: float
    ca: str
    helper_mode: str
    tls: bool
    timed_out: bool = False
    problems: list[str] = field(default_factory=list)
    checks: list[NodeCheck] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Every node provisioned, its certificate verified and connected to its overlay."""
        return (
            not self.timed_out
            and self.provisioned == self.nodes
            and self.verified == self.nodes
            and self.connected == self.nodes
            and self.failed == 0
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "nodes": self.nodes,
            "provisioned": self.provisioned,
            "failed": self.failed,
            "deferred": self.deferred,
            "verified": self.verified,
            "connected": self.connected,
            "nodes_per_minute": round(self.nodes_per_minute, 1),
            "p50_s": _round(self.p50_s),
            "p95_s": _round(self.p95_s),
            "p50_normal_s": _round(self.p50_normal_s),
            "overlays": dict(sorted(self.overlays.items())),
            "elapsed_s": round(self.elapsed_s, 2),
            "provision_s": round(self.provision_s, 2),
            "ca": self.ca,
            "helper_mode": self.helper_mode,
            "tls": self.tls,
            "timed_out": self.timed_out,
            "problems": self.problems[:20],
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


def percentile(values: list[float], q: float) -> float | None:
    """The ``q``-th percentile (0..100) by linear interpolation; ``None`` without values."""
    if not values:
        return None
    data = sorted(values)
    if len(data) == 1:
        return data[0]
    pos = (len(data) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


# --------------------------------------------------------------------------------- verification


def _public_der(key: Any) -> bytes:
    return bytes(
        key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )


def verify_node_certificate(
    identity: str,
    cert_path: Path,
    key_path: Path,
    ca_cert: x509.Certificate,
    *,
    now: float | None = None,
) -> list[str]:
    """Check one node's files on disk; returns the problems found (empty: verified).

    The certificate must be signed by ``ca_cert`` (signature and issuer), be valid now, have
    CN = identity and the identity among its DNS SANs, and hold the public key of the node's
    private key.
    """
    problems: list[str] = []
    try:
        cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
    except (OSError, ValueError) as exc:
        return [f"no readable certificate at {cert_path}: {type(exc).__name__}"]
    try:
        cert.verify_directly_issued_by(ca_cert)
    except (ValueError, TypeError) as exc:
        problems.append(f"certificate is not issued by the demo CA: {exc}")
    except Exception as exc:  # cryptography's InvalidSignature carries no message
        problems.append(
            f"certificate signature does not verify against the CA ({type(exc).__name__})"
        )
    ts = time.time() if now is None else now
    if not cert.not_valid_before_utc.timestamp() <= ts <= cert.not_valid_after_utc.timestamp():
        problems.append("certificate is not valid now")
    cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    cn = str(cns[0].value) if cns else ""
    if cn != identity:
        problems.append(f"certificate CN is {cn!r}, not the identity")
    try:
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        dns = sans.get_values_for_type(x509.DNSName)
    except x509.ExtensionNotFound:
        dns = []
    if identity not in dns:
        problems.append("identity missing from the certificate's DNS SANs")
    try:
        key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    except (OSError, ValueError, TypeError) as exc:
        problems.append(f"no readable private key at {key_path}: {type(exc).__name__}")
    else:
        if _public_der(key.public_key()) != _public_der(cert.public_key()):
            problems.append("certificate does not match the node's private.pem")
    return problems


def _node_tls_files(state_dir: Path) -> tuple[Path, Path, Path]:
    """Where the node's config says its certificate, key and CA are (defaults: ``ssl/``)."""
    from node_agent.files import ConfigFileError, read_config

    ssldir = state_dir / "ssl"
    cfg: dict[str, str] = {}
    conf = state_dir / "server.conf"
    if conf.exists():
        with contextlib.suppress(ConfigFileError):
            cfg = read_config(conf)
    if cfg.get("plugin.choria.ssldir"):
        ssldir = Path(cfg["plugin.choria.ssldir"])
    return (
        Path(cfg.get("plugin.security.file.certificate") or ssldir / "certificate.pem"),
        Path(cfg.get("plugin.security.file.key") or ssldir / "private.pem"),
        Path(cfg.get("plugin.security.file.ca") or ssldir / "ca.pem"),
    )


def _connz_names(monitor_port: int, page: int = 1024) -> set[str]:
    """Names of all client connections of a nats-server (``/connz``, paged by ``offset``)."""
    names: set[str] = set()
    offset = 0
    while True:
        url = f"http://127.0.0.1:{monitor_port}/connz?limit={page}&offset={offset}"
        # loopback monitoring port of a server we started
        with urllib.request.urlopen(url, timeout=5) as resp:
            data = json.loads(resp.read())
        conns = data.get("connections") or []
        names.update(str(c.get("name") or "") for c in conns)
        offset += len(conns)
        if not conns or offset >= int(data.get("total") or 0):
            return names


# --------------------------------------------------------------------------------- files


def _write_secret(path: Path, data: bytes) -> None:
    from jwt_tools import write_private_file

    write_private_file(path, data)


def _server_certificate(ca: Any, name: str, directory: Path) -> tuple[Path, Path]:
    """A TLS server certificate for 127.0.0.1/localhost signed by the demo CA (LocalCA)."""
    from ca_adapters import SignRequest

    key = ec.generate_private_key(ec.SECP256R1())
    cn = f"{name}.brokers.demo.internal"
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
    cert_path, key_path = directory / "server.pem", directory / "server-key.pem"
    cert_path.write_text(res.certificate_pem)
    _write_secret(
        key_path,
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ),
    )
    return cert_path, key_path


def _quote(value: str | Path) -> str:
    return json.dumps(str(value))


def overlay_server_config(
    name: str, *, tls: tuple[Path, Path, Path] | None, max_connections: int
) -> str:
    """nats-server config text (``start_nats_server`` placeholders) for one overlay broker.

    With TLS, ``verify: true`` makes the server demand a client certificate that chains to the
    CA: a node that connects has proved its new certificate is good. No accounts: the demo
    overlay is open to any holder of such a certificate.
    """
    lines = [
        f"server_name: {_quote('overlay_' + name.replace('-', '_'))}",
        "listen: 127.0.0.1:{port}",
        "http: 127.0.0.1:{monitor_port}",
        f"max_connections: {max_connections}",
    ]
    if tls is not None:
        cert, key, ca = tls
        lines += [
            "tls {{",
            f"  cert_file: {_quote(cert)}",
            f"  key_file: {_quote(key)}",
            f"  ca_file: {_quote(ca)}",
            "  verify: true",
            "  timeout: 5",
            "}}",
        ]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------- the demo

Cleanup = Callable[[], Awaitable[None]]


class Demo:
    """Everything the demo runs. ``await start()``, ``await run()``, ``await verify()``,
    and always ``await close()`` (idempotent; stops what was started, in reverse order)."""

    def __init__(self, options: DemoOptions) -> None:
        if options.nodes < 1:
            raise DemoError("--nodes must be at least 1")
        if options.processes < 1:
            raise DemoError("--processes must be at least 1")
        if options.start_rate is not None and options.start_rate <= 0:
            raise DemoError("--start-rate must be a positive number of nodes per second")
        if options.start_rate is not None and options.processes > 1:
            raise DemoError("--start-rate works with in-process nodes only (--processes 1)")
        self.options = options
        self._own_workdir = options.workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="provisioner-demo-"))
            if options.workdir is None
            else Path(options.workdir).absolute()
        )
        self._cleanups: list[tuple[str, Cleanup]] = []
        self._closed = False
        self.admin_token = secrets.token_urlsafe(24)
        self.broker: Any = None
        self.provisioner: Any = None
        self.fleets: list[Any] = []
        self.overlay_brokers: dict[str, OverlayBroker] = {}
        self.ca_cert: x509.Certificate | None = None
        self.ca_label: str = options.ca
        self.started_at = time.time()
        self.fleet_started_at: float | None = None
        self.provisioned_at: dict[str, float] = {}
        self.normal_at: dict[str, float] = {}
        self.setup_s = 0.0
        self._timed_out = False
        self._fleet_task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ addresses

    @property
    def admin_port(self) -> int | None:
        return getattr(self.provisioner, "http_port", None) if self.provisioner else None

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def status_page_url(self) -> str:
        """The status page with the token in the URL fragment (never sent to the server)."""
        return f"{self.admin_url}/#token={self.admin_token}"

    @property
    def nodes_dir(self) -> Path:
        return self.workdir / "fleet" / "nodes"

    def _push(self, what: str, fn: Cleanup) -> None:
        self._cleanups.append((what, fn))

    # ------------------------------------------------------------------ start

    async def start(self, step: Callable[[str], None] | None = None) -> None:
        """Start every part (not the fleet); ``step`` is told what is being started.

        Raises :class:`DemoError` when a part cannot start (e.g. nats-server not installed);
        what was started until then is stopped by :meth:`close`.
        """
        from testbed.ca_servers import ServerStartError
        from testbed.natsserver import NatsServerError, NatsServerNotFound

        try:
            await self._start(step)
        except (NatsServerNotFound, NatsServerError, ServerStartError) as exc:
            raise DemoError(str(exc)) from None

    async def _start(self, step: Callable[[str], None] | None) -> None:
        say = step or (lambda _msg: None)
        t0 = time.monotonic()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self._push("work directory", self._remove_workdir)
        opts = self.options

        say("token signing key and provisioning token")
        signer_key, verify_path, cht = await asyncio.to_thread(self._make_keys)

        say("provisioning broker (nats-server + auth callout)")
        from testbed.isolated_broker import start_isolated_broker

        self.broker = await start_isolated_broker(
            self.workdir / "broker", [str(verify_path)], tls=opts.tls
        )
        self._push("provisioning broker", self.broker.stop)
        token_path = await asyncio.to_thread(self._write_token, signer_key, cht)
        self.token_path = token_path

        say(f"certificate authority ({opts.ca})")
        ca_signer, ca_cfg, ca_pem_path = await self._start_ca()
        self.ca_cert = x509.load_pem_x509_certificate(ca_pem_path.read_bytes())

        say("overlay brokers (one nats-server per overlay)")
        overlays_path = await self._start_overlays(ca_signer, ca_pem_path)

        say(f"reference helper ({opts.helper_mode} mode)")
        helper_cfg_path = await asyncio.to_thread(self._write_helper_config, overlays_path, ca_cfg)

        say("provisioner and admin API")
        await self._start_provisioner(verify_path, cht, helper_cfg_path, overlays_path)
        self.setup_s = time.monotonic() - t0

    def _make_keys(self) -> tuple[Any, Path, str]:
        from jwt_tools import generate_keypair, load_signing_key, write_public_file

        keys = self.workdir / "keys"
        keys.mkdir(parents=True, exist_ok=True)
        priv, pub = generate_keypair("ed25519")
        signer_path, verify_path = (
            keys / "provisioning-signer.seed",
            keys / "provisioning-signer.pub",
        )
        _write_secret(signer_path, priv)
        write_public_file(verify_path, pub)
        return load_signing_key(signer_path), verify_path, secrets.token_urlsafe(24)

    def _write_token(self, signer_key: Any, cht: str) -> Path:
        from jwt_tools import create_provisioning_token

        jwt = create_provisioning_token(
            signer_key,
            token=cht,
            urls=[self.broker.url],
            validity_s=86400,
            default=True,
            secure=False,
        )
        path = self.workdir / "keys" / "provisioning.jwt"
        _write_secret(path, jwt.encode())
        return path

    async def _start_ca(self) -> tuple[Any, dict[str, Any], Path]:
        """Returns (a LocalCA for the overlay server certificates, the helper's ``ca:``
        section, the CA certificate file)."""
        from ca_adapters import LocalCA

        ca_dir = self.workdir / "ca"
        if self.options.ca == "local":
            ca = await asyncio.to_thread(
                LocalCA.generate, "ec", "Fleet Demo CA", validity_s=30 * 86400.0
            )
            cert_path, key_path = await asyncio.to_thread(ca.write, ca_dir)
            self.ca_label = "local (EC P-256, in-process)"
            return ca, {"type": "local", "cert": str(cert_path), "key": str(key_path)}, cert_path

        from testbed.ca_servers import ServerNotAvailable, start_cfssl

        try:
            server = await asyncio.to_thread(start_cfssl, ca_dir, ca_source="local")
        except ServerNotAvailable as exc:
            raise DemoError(f"--ca cfssl: {exc}") from None
        self._push("cfssl serve", lambda: asyncio.to_thread(server.stop))
        auth_file = ca_dir / "auth-key.hex"
        _write_secret(auth_file, server.auth_key_hex.encode())
        ca = await asyncio.to_thread(LocalCA.from_files, server.ca_cert_path, server.ca_key_path)
        self.ca_label = f"cfssl serve at {server.url} (pid {server.pid})"
        cfg = {
            "type": "cfssl",
            "url": server.url,
            "auth_key_file": str(auth_file),
            "profile": "node",
            "ca_file": str(server.ca_cert_path),
        }
        return ca, cfg, Path(server.ca_cert_path)

    async def _start_overlays(self, ca: Any, ca_pem: Path) -> Path:
        from overlays import load_sample_registry
        from testbed.natsserver import start_nats_server

        registry = load_sample_registry()
        raw = registry.to_dict()
        max_conn = self.options.nodes + 1000

        async def one(ov: dict[str, Any]) -> OverlayBroker:
            name = str(ov["name"])
            directory = self.workdir / "overlays" / name
            tls = None
            if self.options.tls:
                cert, key = await asyncio.to_thread(_server_certificate, ca, name, directory)
                tls = (cert, key, ca_pem)
            text = overlay_server_config(name, tls=tls, max_connections=max_conn)
            server = await asyncio.to_thread(
                start_nats_server, directory, config_text=text, jetstream=False
            )
            scheme = "tls" if self.options.tls else "nats"
            return OverlayBroker(
                name=name,
                region=str(ov.get("region") or ""),
                url=f"{scheme}://127.0.0.1:{server.port}",
                server=server,
            )

        results = await asyncio.gather(*(one(ov) for ov in raw["overlays"]), return_exceptions=True)
        for res in results:
            if isinstance(res, OverlayBroker):
                self.overlay_brokers[res.name] = res
                self._push(f"overlay broker {res.name}", _stopper(res.server))
        for res in results:
            if isinstance(res, BaseException):
                raise res
        for ov in raw["overlays"]:
            ov["brokers"] = [self.overlay_brokers[str(ov["name"])].url]
        path = self.workdir / "overlays.yaml"
        text = "# The packaged sample registry, brokers rewritten to the demo's nats-servers.\n"
        path.write_text(text + yaml.safe_dump(raw, sort_keys=False))
        return path

    def _write_helper_config(self, overlays_path: Path, ca_cfg: dict[str, Any]) -> Path:
        cfg = {
            "overlays": str(overlays_path),
            "ca": ca_cfg,
            "certificate": {"ttl": "30d", "use_overlay_profile": self.options.ca != "cfssl"},
            "collectives": ["mcollective"],
            "main_collective": "mcollective",
            "configuration": {
                "loglevel": "info",
                "plugin.choria.status_file_path": "/var/lib/choria/status.json",
            },
        }
        directory = self.workdir / "helper"
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / "reference.yaml"
        _write_secret(path, yaml.safe_dump(cfg, sort_keys=False).encode())
        return path

    async def _start_provisioner(
        self, verify_path: Path, cht: str, helper_cfg: Path, overlays_path: Path
    ) -> None:
        import sys

        from provisioner.config import AdminConfig, Features, ProvisionerConfig, TLSConfig
        from provisioner.helper_runner import HelperRunner, PythonHelper
        from provisioner.service import Provisioner, ProvisionerError
        from testbed.natsserver import free_port

        opts = self.options
        _, password = self.broker.provisioner_credentials
        helper: HelperRunner | None = None
        helper_cmd = f"{sys.executable} -m helpers.reference --config {helper_cfg}"
        if opts.helper_mode == "python":
            from helpers.reference import make_handler

            handle = await asyncio.to_thread(make_handler, helper_cfg)
            helper = PythonHelper(handle, timeout=30 if opts.ca == "cfssl" else 10)
            ref = handle.helper  # type: ignore[attr-defined]
            self._push("reference helper", ref.aclose)
        cfg = ProvisionerConfig(
            identity=PROVISIONER_IDENTITY,
            site="demo",
            broker_urls=[self.broker.url],
            broker_provisioning_password=password,
            tls=TLSConfig(ca=str(self.broker.tls_ca)) if self.broker.tls_ca else TLSConfig(),
            token=cht,
            jwt_verify_cert=str(verify_path),
            features=Features(pki=True),
            helper=helper_cmd,
            helper_mode=opts.helper_mode,
            # A remote CA (cfssl) on a busy 2-core box, or a process per node, can take seconds.
            helper_timeout=30 if opts.helper_mode == "exec" or opts.ca == "cfssl" else 10,
            helper_pool_size=2,
            audit_log=str(self.workdir / "audit.jsonl"),
            overlays=str(overlays_path),
            admin=AdminConfig(
                enabled=True, host="127.0.0.1", port=free_port(), token=self.admin_token
            ),
            rpc_timeout=10,
        )
        prov = Provisioner(cfg, helper=helper, discovery_timeout=1.0, drain_timeout=3.0)
        prov.on_provisioned.append(self._on_provisioned)
        self.provisioner = prov
        self._push("provisioner", prov.stop)
        try:
            await prov.start()
        except ProvisionerError as exc:
            raise DemoError(f"the provisioner did not start: {exc}") from None

    def _on_provisioned(self, rec: Any) -> None:
        self.provisioned_at.setdefault(rec.identity, time.time())

    # ------------------------------------------------------------------ fleet

    async def _start_fleet(self) -> None:
        from testbed.fleet import Fleet

        opts = self.options
        common: dict[str, Any] = {
            "seed": opts.seed,
            "key_type": "ec",
            "restart_delay_scale": opts.restart_delay_scale,
        }
        base = self.workdir / "fleet"
        self.fleet_started_at = time.time()
        if not opts.start_rate:
            fleet = Fleet(
                opts.nodes, self.token_path, None, base, processes=opts.processes, **common
            )
            self.fleets.append(fleet)
            await fleet.start()
            return
        # Gradual start: small in-process fleets every tick (the status page shows the counts
        # moving; a real data centre powers racks on over minutes, not all at once).
        tick = 0.2
        started = 0
        t0 = time.monotonic()
        while started < opts.nodes:
            due = min(opts.nodes, max(1, int((time.monotonic() - t0 + tick) * opts.start_rate)))
            batch = due - started
            if batch > 0:
                fleet = Fleet(batch, self.token_path, None, base, start_index=started, **common)
                self.fleets.append(fleet)
                started += batch
                await fleet.start()
            await asyncio.sleep(tick)

    def fleet_counts(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for fleet in self.fleets:
            for k, v in fleet.counts().items():
                total[k] = total.get(k, 0) + int(v)
        return total

    def _local_nodes(self) -> list[Any]:
        return [n for fleet in self.fleets for n in fleet.local_nodes]

    def _note_normal(self) -> None:
        now = time.time()
        for node in self._local_nodes():
            if node.mode == "normal" and node.identity not in self.normal_at:
                self.normal_at[node.identity] = now

    def progress(self) -> dict[str, Any]:
        """A snapshot for the live display (and tests)."""
        prov = self.provisioner
        status = prov.status() if prov is not None else {"counts": {}, "queue": {}}
        counts = {str(k): int(v) for k, v in status.get("counts", {}).items()}
        fill = prov.overlay_fill() if prov is not None else {}
        return {
            "elapsed": time.time() - (self.fleet_started_at or self.started_at),
            "fleet": self.fleet_counts(),
            "discovered": sum(counts.values()),
            "in_flight": int(status.get("queue", {}).get("in_flight", 0)),
            "waiting": int(status.get("queue", {}).get("waiting", 0)),
            "states": counts,
            "overlays": {
                name: {
                    "count": int(info.get("count", 0)),
                    "capacity": info.get("capacity"),
                    "url": self.overlay_brokers[name].url if name in self.overlay_brokers else "",
                }
                for name, info in fill.items()
            },
        }

    async def run(
        self, on_progress: Callable[[dict[str, Any]], None] | None = None, interval: float = 0.25
    ) -> None:
        """Start the fleet and wait until every node is provisioned and in normal mode (or all
        attempts settled with failures, or the timeout)."""
        opts = self.options
        self._fleet_task = asyncio.create_task(self._start_fleet(), name="demo-fleet-start")
        deadline = time.monotonic() + opts.effective_timeout()
        last_key: tuple[Any, ...] | None = None
        unchanged_since = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            if self._fleet_task.done() and self._fleet_task.exception() is not None:
                raise DemoError(f"the fleet did not start: {self._fleet_task.exception()}")
            self._note_normal()
            snap = self.progress()
            if on_progress is not None:
                on_progress(snap)
            states, fleet = snap["states"], snap["fleet"]
            provisioned = states.get("provisioned", 0)
            normal = fleet.get("normal", 0)
            if self._fleet_task.done() and provisioned >= opts.nodes and normal >= opts.nodes:
                break
            key = (tuple(sorted(states.items())), tuple(sorted(fleet.items())), snap["in_flight"])
            if key != last_key:
                last_key, unchanged_since = key, time.monotonic()
            settled = sum(states.get(s, 0) for s in _SETTLED)
            if (
                self._fleet_task.done()
                and settled >= opts.nodes
                and snap["in_flight"] == 0
                and time.monotonic() - unchanged_since > SETTLE_S
            ):
                # Every attempt ended and nothing moved for a while: failed and deferred nodes
                # wait for their next event or sweep (minutes away), so report now.
                break
            if time.monotonic() > deadline:
                self._timed_out = True
                break
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self._fleet_task), 0.1)

    # ------------------------------------------------------------------ verify

    def identities(self) -> list[str]:
        return [i for fleet in self.fleets for i in fleet.identities()]

    async def verify(self) -> DemoResult:
        """Check every node independently (files on disk, overlay servers' connections)."""
        opts = self.options
        prov = self.provisioner
        assert prov is not None and self.ca_cert is not None
        records = {r["identity"]: r for r in prov.nodes()}
        ca_cert = self.ca_cert
        connected: dict[str, str] = {}
        problems: list[str] = []
        for name, ob in self.overlay_brokers.items():
            try:
                names = await asyncio.to_thread(_connz_names, ob.monitor_port)
            except (OSError, ValueError) as exc:
                problems.append(f"overlay {name}: cannot read /connz: {exc}")
                continue
            for n in names:
                connected[n] = name
        modes = {n.identity: n.mode for n in self._local_nodes()}

        def check_all() -> list[NodeCheck]:
            out = []
            for identity in self.identities():
                chk = NodeCheck(identity=identity)
                rec = records.get(identity)
                chk.overlay = rec.get("overlay") if rec else None
                chk.mode = modes.get(identity)
                state = rec.get("state") if rec else "never discovered"
                if state != "provisioned":
                    err = (rec or {}).get("last_error")
                    chk.problems.append(f"state {state}" + (f": {err}" if err else ""))
                cert, key, _ca = _node_tls_files(self.nodes_dir / identity)
                found = verify_node_certificate(identity, cert, key, ca_cert)
                chk.certificate_ok = not found
                chk.problems += found
                chk.connected_to = connected.get(identity)
                if chk.overlay and not chk.connected_ok:
                    where = chk.connected_to or "no overlay broker"
                    chk.problems.append(f"placed in {chk.overlay} but connected to {where}")
                out.append(chk)
            return out

        checks = await asyncio.to_thread(check_all)
        counts: dict[str, int] = {}
        for rec in records.values():
            counts[str(rec.get("state"))] = counts.get(str(rec.get("state")), 0) + 1
        overlays: dict[str, int] = {}
        for chk in checks:
            if chk.overlay and records.get(chk.identity, {}).get("state") == "provisioned":
                overlays[chk.overlay] = overlays.get(chk.overlay, 0) + 1

        start_times = {n.identity: n.started_at for n in self._local_nodes()}
        ttp: list[float] = []
        ttn: list[float] = []
        for identity, t in self.provisioned_at.items():
            started = start_times.get(identity)
            if started is None:  # nodes in worker processes: from the provisioner's first sighting
                started = float(records.get(identity, {}).get("first_seen") or t)
            ttp.append(max(0.0, t - started))
            if identity in self.normal_at:
                ttn.append(max(0.0, self.normal_at[identity] - started))
        t_first = self.fleet_started_at or self.started_at
        t_last = max(self.provisioned_at.values()) if self.provisioned_at else time.time()
        span = max(1e-6, t_last - t_first)
        provisioned = counts.get("provisioned", 0)
        for chk in checks:
            for p in chk.problems:
                problems.append(f"{chk.identity}: {p}")
        return DemoResult(
            nodes=opts.nodes,
            provisioned=provisioned,
            failed=counts.get("failed", 0),
            deferred=counts.get("deferred", 0),
            verified=sum(1 for c in checks if c.certificate_ok),
            connected=sum(1 for c in checks if c.connected_ok),
            nodes_per_minute=provisioned / span * 60.0 if provisioned else 0.0,
            p50_s=percentile(ttp, 50),
            p95_s=percentile(ttp, 95),
            p50_normal_s=percentile(ttn, 50) if ttn else None,
            overlays=overlays,
            elapsed_s=time.time() - self.started_at,
            provision_s=span,
            ca=self.ca_label,
            helper_mode=opts.helper_mode,
            tls=opts.tls,
            timed_out=self._timed_out,
            problems=problems,
            checks=checks,
        )

    # ------------------------------------------------------------------ stop

    async def _stop_fleet(self) -> None:
        if self._fleet_task is not None and not self._fleet_task.done():
            self._fleet_task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._fleet_task
        await asyncio.gather(*(f.stop() for f in self.fleets), return_exceptions=True)

    async def _remove_workdir(self) -> None:
        if self._own_workdir:
            await asyncio.to_thread(shutil.rmtree, self.workdir, True)

    async def close(self) -> None:
        """Stop the fleet, then everything else in reverse start order. Never raises."""
        if self._closed:
            return
        self._closed = True
        # The provisioner first: its in-flight attempts finish quickly while the nodes are
        # still there to answer (stopping the nodes first would leave them waiting for RPC
        # timeouts). Then the nodes, then the rest in reverse start order.
        if self.provisioner is not None:
            try:
                await asyncio.wait_for(self.provisioner.stop(), 30)
            except Exception as exc:
                log.warning("stopping the provisioner: %s: %s", type(exc).__name__, exc)
        try:
            await asyncio.wait_for(self._stop_fleet(), 30)
        except Exception as exc:
            log.warning("stopping the fleet: %s: %s", type(exc).__name__, exc)
        while self._cleanups:
            what, fn = self._cleanups.pop()
            try:
                await asyncio.wait_for(fn(), 30)
            except Exception as exc:
                log.warning("stopping %s: %s: %s", what, type(exc).__name__, exc)
        await asyncio.to_thread(reap_children, str(self.workdir))


def _stopper(server: Any) -> Cleanup:
    async def stop() -> None:
        await asyncio.to_thread(server.stop)

    return stop


def reap_children(marker: str, timeout: float = 5.0) -> list[int]:
    """Last line of defence: terminate our child processes (by PID) whose command line names
    ``marker`` (the demo's work directory, which every server config lives in).

    Everything is stopped through its handle before this runs; a child still alive here means
    a handle was lost (a bug), and a leftover nats-server must never outlive the demo. Children
    that are not the demo's (a test runner's own servers) are left alone.
    """
    try:
        children = psutil.Process(os.getpid()).children(recursive=True)
    except psutil.Error:
        return []
    ours = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if any(marker in part for part in child.cmdline()):
                ours.append(child)
    for child in ours:
        with contextlib.suppress(psutil.Error):
            log.warning("terminating leftover child process %d (%s)", child.pid, child.name())
            child.terminate()
    _, alive = psutil.wait_procs(ours, timeout=timeout)
    for child in alive:
        with contextlib.suppress(psutil.Error):
            child.kill()
    return [c.pid for c in ours]

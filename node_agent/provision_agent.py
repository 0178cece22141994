"""The ``choria_provision`` agent, as go-choria 0.29.4 answers it, with deliberate differences.

Where this node departs from go-choria on purpose:

* the token is compared in constant time, never logged, and an empty token never passes;
* the provisioning lock is taken only after the token was accepted (no lock-out by strangers);
* ``gencsr`` honours ``ST``, validates the DDL rules and returns an SPKI ``public_key``;
* ``configure`` validates everything first, then commits all files or none, refuses
  traversal, newline injection and a ``key`` without ``certificate``/``ca``/``ssldir``;
* ``restart`` validates ``splay`` and refuses a config that would re-enter provisioning;
* ``release_update`` verifies the release's SHA-256 before anything is installed, bounds every
  download, refuses path tricks and switches releases atomically (:mod:`node_agent.release`).
"""

from __future__ import annotations

import asyncio
import errno
import hmac
import json
import logging
import os
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ed25519

from choria_core import ecdh
from choria_core.protocol import RPCReply, StatusCode
from choria_core.remote_text import clean_remote_text
from choria_core.securefile import read_small
from node_agent.agents import AgentError, Envelope, NodeHost, decode_args, go_duration
from node_agent.files import (
    ConfigFileError,
    FileTransaction,
    UnsafePathError,
    check_policy_name,
    read_config,
    render_config,
    resolve_ssldir_text,
    write_file,
)
from node_agent.keys import CSRFieldError, build_csr, generate_private_key
from node_agent.release import ReleaseError, ReleaseRequest, apply_release

__all__ = ["LOCK_SECONDS", "PROVISION_SETTING", "ProvisionAgent"]

log = logging.getLogger(__name__)

LOCK_SECONDS = 120.0
PROVISION_SETTING = "plugin.choria.server.provision"
#: What reading a file that is not there (or is no regular file) raises.
_NO_FILE = frozenset((errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.EINVAL))
T = TypeVar("T")


async def _io(durable: bool, func: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Run a small file operation: in a thread when it fsyncs (``durable``), else in the loop.

    Without fsync, reading or writing a few small files is a page-cache operation of a few
    microseconds, cheaper than the thread hand-off (a simulated fleet does ten per node)."""
    if durable:
        return await asyncio.to_thread(func, *args, **kwargs)
    return func(*args, **kwargs)


def _read_text(path: Path) -> str:
    return read_small(path).decode("utf-8")


def _config_target(path: Path) -> str:
    """Where to write the config: through a symlinked config file, like go-choria, rather
    than replacing the link (a directory link on the way leads to the same place either way)."""
    text = os.fspath(path)
    return os.path.realpath(text) if os.path.islink(text) else text


def _write_config(path: Path, text: str, durable: bool) -> None:
    # Write through a symlinked config file, like go-choria, rather than replacing the link.
    write_file(os.path.realpath(path), text.encode("utf-8"), 0o600, durable=durable)


# --- choria_provision ------------------------------------------------------------------------


@dataclass(slots=True)
class _Lock:
    owner: str = ""
    until: float = 0.0


@dataclass(slots=True)
class ProvisionAgent:
    """``choria_provision``: jwt, gen25519, gencsr, configure, restart, shutdown, reprovision
    and release_update. All actions are serialised by one mutex."""

    host: NodeHost
    name: str = "choria_provision"
    timeout: float = 20.0
    _mutex: asyncio.Lock = field(default_factory=asyncio.Lock)
    _lock: _Lock = field(default_factory=_Lock)
    #: The private.pem bytes the last ``gencsr`` wrote and its public key (SPKI PEM): a
    #: ``configure`` that finds exactly these bytes knows the public key without parsing them.
    _own_key: tuple[bytes, str] | None = None

    _SPECS: ClassVar[dict[str, dict[str, type]]] = {
        "jwt": {"token": str},
        "gen25519": {"token": str, "nonce": str},
        "gencsr": {"token": str, "cn": str, "C": str, "L": str, "O": str, "OU": str, "ST": str},
        "configure": {
            "token": str,
            "config": str,
            "certificate": str,
            "ca": str,
            "ssldir": str,
            "key": str,
            "ecdh_public": str,
            "server_jwt": str,
            "action_policies": dict,
            "opa_policies": dict,
        },
        "restart": {"token": str, "splay": int},
        "shutdown": {"token": str},
        "reprovision": {"token": str},
        "release_update": {"token": str, "repository": str, "version": str},
    }

    def reset(self) -> None:
        """Forget the lock (a restarted go-choria process starts with none)."""
        self._lock = _Lock()
        self._own_key = None

    async def dispatch(self, action: str, data: dict[str, Any], env: Envelope) -> RPCReply:
        """Decode the arguments and run the action under the agent mutex."""
        spec = self._SPECS.get(action)
        if spec is None:
            raise AgentError(
                f"Unknown action {action} for agent {self.name}", StatusCode.UNKNOWN_ACTION
            )
        args = decode_args(self.name, action, data, spec)
        handler = getattr(self, f"_{action}")
        async with self._mutex:
            result: dict[str, Any] = await handler(args, env)
        return RPCReply(action, data=result)

    # -- shared checks --

    def _require_provision_mode(self, msg: str = "") -> None:
        if self.host.mode != "provisioning":
            raise AgentError(msg or "Cannot reconfigure a server that is not in provisioning mode")

    def _check_token(self, supplied: str, env: Envelope) -> None:
        expected = self.host.provision_token
        # Unlike go-choria an empty configured token never passes, and the supplied token is
        # never logged (go-choria logs a wrong token, and an empty one disables its check).
        if not expected or not hmac.compare_digest(
            supplied.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
        ):
            log.warning(
                "incorrect provision token supplied identity=%s callerid=%s requestid=%s",
                self.host.identity,
                env.callerid,
                env.requestid,
            )
            raise AgentError("Incorrect provision token supplied")

    def _take_lock(self, env: Envelope) -> None:
        key = f"{env.senderid}.{env.callerid}"
        now = time.monotonic()
        lock = self._lock
        if lock.owner and now < lock.until and not hmac.compare_digest(lock.owner, key):
            raise AgentError("Could not obtain provisioning lock")
        lock.owner = key
        lock.until = now + LOCK_SECONDS

    def _locked_checks(self, args: dict[str, Any], env: Envelope) -> None:
        self._require_provision_mode()
        self._check_token(args["token"], env)
        self._take_lock(env)

    # -- actions --

    async def _jwt(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        self._locked_checks(args, env)
        path = self.host.token_path
        if path is None:
            raise AgentError("No Provisioning JWT file has been configured")
        try:
            text = (await _io(self.host.durable, _read_text, path)).strip()
        except FileNotFoundError as exc:
            raise AgentError("Provisioning JWT file does not exist") from exc
        except (OSError, UnicodeDecodeError) as exc:
            raise AgentError(f"Could not read the provisioning JWT: {type(exc).__name__}") from exc
        # A fresh key per call, like go-choria: a later configure must use this one.
        private, public = ecdh.generate_keypair()
        self.host.ecdh_private = private
        return {"jwt": text, "ecdh_public": public, "ecdh_aead": True}

    async def _gen25519(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        self._locked_checks(args, env)
        nonce: str = args["nonce"]
        if not nonce or len(nonce) > 64:
            raise AgentError("Invalid nonce: must be 1 to 64 characters")
        directory = self.host.config_path.parent.absolute()
        jwt_path = directory / "server.jwt"
        try:
            jwt_path.unlink(missing_ok=True)
        except OSError as exc:  # go-choria carries on after this failure; we stop
            raise AgentError(f"Could not remove existing {jwt_path}: {exc.strerror}") from exc
        seed = os.urandom(32)
        key = ed25519.Ed25519PrivateKey.from_private_bytes(seed)
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        write_file(directory / "server.seed", seed.hex().encode(), 0o600, durable=self.host.durable)
        pub = key.public_key().public_bytes(
            serialization.Encoding.Raw, serialization.PublicFormat.Raw
        )
        return {
            "public_key": pub.hex(),
            "signature": key.sign(nonce.encode("utf-8")).hex(),
            "directory": str(directory),
        }

    async def _gencsr(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        self._locked_checks(args, env)
        cn = args["cn"] or self.host.identity
        fields = {k: args[k] for k in ("C", "ST", "L", "O", "OU")}
        try:
            # Keys are made lazily here: a simulated fleet pays nothing until it is provisioned.
            if self.host.key_pool is not None:
                key = await self.host.key_pool.take()
            elif self.host.key_type == "ec":
                key = generate_private_key("ec")  # tens of microseconds: no thread hand-off
            else:
                key = await asyncio.to_thread(generate_private_key, self.host.key_type)
            csr = build_csr(key, cn, fields)
        except CSRFieldError as exc:
            raise AgentError(str(exc)) from exc
        ssldir = os.fspath(self.host.default_ssldir)
        tx = FileTransaction(durable=self.host.durable)
        tx.mkdir(ssldir, 0o700)  # go-choria uses 0771
        tx.write(os.path.join(ssldir, "private.pem"), csr.key_pem, 0o600)
        tx.write(os.path.join(ssldir, "csr.pem"), csr.csr_pem.encode("ascii"), 0o644)
        try:
            await _io(self.host.durable, tx.commit)
        except OSError as exc:
            raise AgentError(f"Could not write the key and CSR: {exc.strerror}") from exc
        self._own_key = (csr.key_pem, csr.public_key_pem)
        return {"csr": csr.csr_pem, "public_key": csr.public_key_pem, "ssldir": ssldir}

    async def _configure(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        host = self.host
        self._locked_checks(args, env)
        if not args["config"]:
            raise AgentError(
                "Did not receive any configuration to write, "
                "cannot write a empty configuration file"
            )
        if args["key"] and not args["ecdh_public"]:
            raise AgentError("EDCH Public Key not supplied while providing a private key")
        try:
            settings = json.loads(args["config"])
        except ValueError as exc:
            raise AgentError(
                f"Could not decode configuration data: {exc.__class__.__name__}"
            ) from exc
        if not isinstance(settings, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in settings.items()
        ):
            raise AgentError(
                "Could not decode configuration data: expected a JSON object of string values"
            )
        header = (
            f"configuration file written in request {env.requestid} from {env.callerid} "
            f"({env.senderid}) at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
        )
        try:
            config_text = render_config(settings, header)
        except ConfigFileError as exc:
            raise AgentError(f"Invalid configuration: {exc}") from exc

        # Stage everything; nothing is written until every check passed.
        tx = FileTransaction(durable=host.durable)
        ssldir = self._stage_tls(tx, args)
        if args["server_jwt"]:
            token = args["server_jwt"]
            if token.count(".") != 2 or any(c.isspace() for c in token):
                raise AgentError("JWT Setup Failed: server_jwt is not a JWT")
            tx.write(
                host.config_path.parent / "server.jwt", token.encode("ascii", "replace"), 0o600
            )
        self._stage_policies(tx, args["action_policies"], ".policy", ("policies",))
        self._stage_policies(tx, args["opa_policies"], ".rego", ("policies", "rego"))
        config_path = await _io(host.durable, _config_target, host.config_path)
        tx.mkdir(os.path.dirname(config_path), 0o700)
        tx.write(config_path, config_text.encode("utf-8"), 0o600)
        try:
            await _io(host.durable, tx.commit)
        except OSError as exc:
            raise AgentError(
                f"Could not write the configuration, nothing was changed: {exc.strerror}"
            ) from exc
        if ssldir is not None:
            host.note_ssldir(Path(ssldir))
        try:
            await host.publish_event("provisioned")
        except Exception as exc:  # go-choria only logs this too
            log.warning("could not publish provisioned event: %s", exc)
        return {"message": f"Wrote {1 + len(settings)} lines to {host.config_path}"}

    def _stage_tls(self, tx: FileTransaction, args: dict[str, Any]) -> str | None:
        cert_pem, ca_pem, ssldir_req, key_text = (
            args["certificate"],
            args["ca"],
            args["ssldir"],
            args["key"],
        )
        if not (cert_pem and ca_pem and ssldir_req):
            if key_text:  # go-choria silently drops the key here
                raise AgentError(
                    "TLS Setup Failed: a private key needs certificate, ca and ssldir as well"
                )
            return None
        try:
            ssldir = resolve_ssldir_text(ssldir_req, self.host.ssl_root)
        except UnsafePathError as exc:
            raise AgentError(f"TLS Setup Failed: {exc}") from exc
        try:
            cert = x509.load_pem_x509_certificate(cert_pem.encode("ascii"))
            x509.load_pem_x509_certificates(ca_pem.encode("ascii"))
        except (ValueError, UnicodeEncodeError) as exc:
            raise AgentError("TLS Setup Failed: certificate or ca is not valid PEM") from exc
        key_pem: bytes | None = None
        own_key = False  # the node's own private.pem (from gencsr) vs a key sent to it
        if key_text:
            if self.host.ecdh_private is None:
                raise AgentError("TLS Setup Failed: private key not set, call jwt first")
            try:
                secret = ecdh.shared_secret(self.host.ecdh_private, args["ecdh_public"])
                key_pem = ecdh.decrypt_private_key(key_text, secret)
            except ecdh.ECDHError as exc:
                raise AgentError(f"TLS Setup Failed: {exc}") from exc
        else:
            try:
                key_pem = read_small(os.path.join(ssldir, "private.pem"))
                own_key = True
            except OSError as exc:  # none there (or not a regular file): no key to check
                if exc.errno not in _NO_FILE:
                    raise
        if key_pem is not None and not self._matches(cert, key_pem, own_key):
            raise AgentError("TLS Setup Failed: certificate does not match the private key")
        tx.mkdir(ssldir, 0o700)
        tx.write(os.path.join(ssldir, "certificate.pem"), cert_pem.encode("ascii"), 0o644)
        tx.write(os.path.join(ssldir, "ca.pem"), ca_pem.encode("ascii"), 0o644)
        if key_text and key_pem is not None:
            tx.write(os.path.join(ssldir, "private.pem"), key_pem, 0o600)
            tx.delete(os.path.join(ssldir, "csr.pem"))
        return ssldir

    def _matches(self, cert: x509.Certificate, key_pem: bytes, own_key: bool) -> bool:
        """Whether ``cert`` is for the private key ``key_pem`` (compared as SPKI)."""
        try:
            cert_spki = cert.public_key().public_bytes(
                serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            memo = self._own_key
            if own_key and memo is not None and hmac.compare_digest(memo[0], key_pem):
                return cert_spki == memo[1].encode("ascii")  # the key gencsr made and wrote
            key = serialization.load_pem_private_key(
                key_pem, password=None, unsafe_skip_rsa_key_validation=own_key
            )
            return bool(
                key.public_key().public_bytes(
                    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
                )
                == cert_spki
            )
        except (ValueError, TypeError) as exc:
            raise AgentError("TLS Setup Failed: the private key could not be loaded") from exc

    def _stage_policies(
        self, tx: FileTransaction, policies: dict[str, str], suffix: str, rel: tuple[str, ...]
    ) -> None:
        if not policies:
            return
        directory = self.host.config_path.parent.joinpath(*rel)
        wanted: dict[str, bytes] = {}
        for name, content in policies.items():
            if not name or not content:
                continue  # go-choria skips empty entries
            try:
                wanted[check_policy_name(name, suffix)] = content.encode("utf-8")
            except UnsafePathError as exc:
                raise AgentError(f"Policy Setup Failed: {exc}") from exc
        tx.mkdir(directory, 0o700)
        # Replace the set of policy files; unlike go-choria's RemoveAll this keeps policies/rego.
        if directory.is_dir():
            for old in directory.iterdir():
                if old.is_file() and old.name.endswith(suffix) and old.name not in wanted:
                    tx.delete(old)
        for name, data in wanted.items():
            tx.write(directory / name, data, 0o400)

    async def _restart(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        host = self.host
        if host.mode != "provisioning" and not host.provision_token:
            raise AgentError(
                "Cannot restart a server that is not in provisioning mode or with no token set"
            )
        self._check_token(args["token"], env)
        splay: int = args["splay"]
        if splay < 0 or splay > 86400:  # a negative splay panics go-choria
            raise AgentError(f"Invalid splay {splay}: must be a whole number of seconds 1..86400")
        if splay == 0:
            splay = 10
        host.check_restart_config()
        delay = random.randrange(splay) + 2
        host.schedule_restart(delay)
        return {"message": f"Restarting Choria Server after {go_duration(delay)}"}

    async def _shutdown(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        host = self.host
        if host.mode != "provisioning" and not host.provision_token:
            raise AgentError(
                "Cannot shutdown a server that is not in provisioning mode or with no token set"
            )
        self._check_token(args["token"], env)
        delay = random.randrange(10)
        host.schedule_shutdown(delay)
        return {"message": f"Shutting Choria Server down after {go_duration(delay)}"}

    async def _reprovision(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        host = self.host
        if host.mode == "provisioning":
            raise AgentError(
                "Server is already in provisioning mode, cannot enable provisioning mode again"
            )
        self._check_token(args["token"], env)
        try:
            current = read_config(host.config_path)
        except ConfigFileError:
            current = {}
        settings = {PROVISION_SETTING: "1", "loglevel": "debug"}
        if current.get("logfile"):
            settings["logfile"] = current["logfile"]
        reg = current.get("plugin.choria.registration.file_content.data")
        if reg:
            settings["registration"] = "file_content"
            settings["plugin.choria.registration.file_content.data"] = reg
        header = (
            f"configuration file written in request {env.requestid} from {env.callerid} "
            f"({env.senderid}) at {time.strftime('%Y-%m-%dT%H:%M:%S%z')}"
        )
        try:
            text = render_config(settings, header)
            await asyncio.to_thread(_write_config, host.config_path, text, host.durable)
        except (ConfigFileError, OSError) as exc:
            raise AgentError(f"Could not write the configuration: {exc}") from exc
        delay = random.randrange(10) + 2
        host.schedule_restart(delay)
        return {"message": f"Restarting after {go_duration(delay)}"}

    async def _release_update(self, args: dict[str, Any], env: Envelope) -> dict[str, Any]:
        host = self.host
        self._require_provision_mode("Cannot update a server that is not in provisioning mode")
        if not host.upgradable:
            raise AgentError("Version updates is not enabled in the configuration")
        self._check_token(args["token"], env)
        self._take_lock(env)
        version: str = args["version"]
        shown = clean_remote_text(version, 64)
        req = ReleaseRequest(
            repository=args["repository"],
            version=version,
            state_dir=host.state_dir,
            max_bytes=host.release_max_bytes,
            durable=host.durable,
        )
        try:
            await asyncio.to_thread(apply_release, req)
        except ReleaseError as exc:
            log.warning("update of %s to %s failed: %s", host.identity, shown, exc)
            raise AgentError(
                f"Update to version {shown} failed, nothing was installed: {exc}"
            ) from None
        log.warning("updated %s from %s to %s, restarting", host.identity, host.version, shown)
        try:
            await host.publish_event("upgraded", new_version=version)
        except Exception as exc:  # go-choria only logs this too
            log.warning("could not publish upgraded event: %s", exc)
        host.schedule_restart(2)
        return {"message": "Restarting Choria Server after 2s"}

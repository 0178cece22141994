"""What a node reads when it boots, and the connection each mode makes.

A go-choria node enters provisioning mode when it has no configuration file, or when the file
sets ``plugin.choria.server.provision`` to true; without that setting the provisioning token's
``chpd`` claim decides. In provisioning mode it connects to the token's brokers (``chu``) with
the token itself as ``auth_token``, ``chusr``/``chpwd`` as user and password, and anonymous
TLS that does not verify the broker. In normal mode it connects to
``plugin.choria.middleware_hosts`` with the file security plugin's certificate for ``tls://``.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import yaml

from choria_core.errors import FleetError
from choria_core.protocol import RequestTrust
from choria_core.securefile import read_small
from jwt_tools import TokenError, parse_provisioning_token_unverified
from node_agent.files import config_bool
from node_agent.provision_agent import PROVISION_SETTING
from node_agent.transport import ConnectOptions, tls_context

__all__ = [
    "PROVISIONING_COLLECTIVE",
    "NodeError",
    "NormalMode",
    "load_facts_file",
    "middleware_hosts",
    "normal_mode",
    "normalise_url",
    "provisioning_options",
    "read_token",
    "request_trust",
    "wants_provisioning",
]

log = logging.getLogger(__name__)

PROVISIONING_COLLECTIVE = "provisioning"
MAX_CA_BYTES = 1024 * 1024
#: ``iss`` of a token issued by an Organization Issuer (``I-<key>``) or a chain issuer
#: (``C-<id>.<key>``): the ed25519 key that also issues the org's client JWTs.
_ISSUER_KEY = re.compile(r"(?:I-|C-[^.]{1,128}\.)([0-9a-fA-F]{64})")


class NodeError(FleetError, RuntimeError, reason="node"):
    """The node cannot start or change mode; the message says what to fix (no secrets)."""


def normalise_url(url: str) -> str:
    """``host:port`` → ``nats://host:port``; a URL with a scheme is kept."""
    url = url.strip()
    return url if "://" in url else f"nats://{url}"


def load_facts_file(path: Path) -> dict[str, Any]:
    """A JSON or YAML facts file as a mapping (empty file: no facts)."""
    text = path.read_text(encoding="utf-8")
    data: Any
    if path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        data = yaml.safe_load(text)  # YAML is a superset of JSON
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError("facts file must hold a mapping")
    return data


def read_token(path: Path | None) -> tuple[dict[str, Any] | None, str | None]:
    """``(claims, text)`` of the provisioning token, read unverified; ``(None, None)`` if absent."""
    if path is None:
        return None, None
    try:
        text = read_small(path).decode("utf-8").strip()
    except FileNotFoundError:
        return None, None
    except (OSError, UnicodeDecodeError) as exc:
        raise NodeError(f"cannot read provisioning token {path}: {exc}") from exc
    try:
        claims = dict(_parse_token(text))  # a copy: every node owns its claims
    except TokenError as exc:
        raise NodeError(f"unusable provisioning token {path}: {exc}") from exc
    return claims, text


@lru_cache(maxsize=16)
def _parse_token(text: str) -> dict[str, Any]:
    # A simulated fleet's nodes (and every boot of one node) read the same token file: the
    # file is read each time, its text parsed once. A refused token raises, and is not cached.
    return parse_provisioning_token_unverified(text)


def wants_provisioning(cfg: Mapping[str, str] | None, claims: Mapping[str, Any] | None) -> bool:
    """Provisioning mode or not, decided as go-choria does (raises ValueError on a bad bool)."""
    if cfg is None:
        return True
    setting = config_bool(cfg.get(PROVISION_SETTING))
    if setting is not None:
        return setting
    # Without the setting the token's chpd decides, as in go-choria.
    return bool(claims and claims.get("chpd"))


def request_trust(
    claims: Mapping[str, Any], *, ca: Path | None, ssldir: Path | None = None
) -> RequestTrust | None:
    """Who may sign requests to this node: None (unsigned requests are fine) unless the token
    says ``chs: true``. Then the CA file ``ca`` (else ``<ssldir>/ca.pem`` if present, where
    ``configure`` writes the CA) for x509 signers and the token's issuer key from ``iss`` for
    its ``ou`` for client JWT signers; with neither, every request is refused."""
    if claims.get("chs") is not True:
        return None
    if ca is None and ssldir is not None and (ssldir / "ca.pem").is_file():
        ca = ssldir / "ca.pem"
    ca_pem = None
    if ca is not None:
        try:
            with ca.open("rb") as fh:
                ca_pem = fh.read(MAX_CA_BYTES + 1)
        except OSError as exc:
            raise NodeError(f"cannot read the CA {ca} for signed requests: {exc}") from exc
        if len(ca_pem) > MAX_CA_BYTES:
            raise NodeError(f"the CA {ca} is larger than {MAX_CA_BYTES} bytes")
    issuers = {}
    match = _ISSUER_KEY.fullmatch(str(claims.get("iss") or ""))
    if match:
        issuers[str(claims.get("ou") or "choria")] = match.group(1).lower()
    try:
        trust = RequestTrust.build(ca_pem=ca_pem, jwt_issuers=issuers)
    except ValueError as exc:
        raise NodeError(f"cannot use the CA {ca} for signed requests: {exc}") from exc
    if trust.empty:
        log.error(
            "the provisioning token sets chs (signed requests) but this node has no CA and the "
            "token names no issuer key: every request will be refused"
        )
    return trust


def middleware_hosts(cfg: Mapping[str, str]) -> list[str]:
    """The broker URLs of normal mode (``plugin.choria.middleware_hosts``)."""
    raw = cfg.get("plugin.choria.middleware_hosts", "")
    return [normalise_url(u) for u in raw.split(",") if u.strip()]


def provisioning_options(
    *,
    identity: str,
    claims: Mapping[str, Any],
    token_text: str,
    broker_urls: Sequence[str] | None,
    tls_ca: Path | None,
) -> ConnectOptions:
    """How to connect in provisioning mode: the token's brokers (or ``broker_urls``)."""
    if broker_urls:
        urls = [normalise_url(u) for u in broker_urls]
    elif claims.get("chu"):
        urls = [normalise_url(u) for u in str(claims["chu"]).split(",") if u.strip()]
    else:
        raise NodeError(
            "the provisioning token names an SRV domain (chsrv); SRV lookup is not "
            "supported, give the broker URLs explicitly"
        )
    user = claims.get("chusr") or None
    if user == "provisioner":
        raise NodeError("the provisioning token's chusr must not be 'provisioner'")
    tls = None
    if tls_ca is not None or any(u.startswith("tls://") for u in urls):
        # go-choria: anonymous TLS without verification; with tls_ca we verify the broker.
        tls = tls_context(ca=tls_ca, verify=tls_ca is not None)
    return ConnectOptions(
        urls=urls,
        name=identity,
        token=token_text,
        user=str(user) if user else None,
        password=str(claims.get("chpwd") or "") if user else None,
        tls=tls,
    )


@dataclass(frozen=True, slots=True)
class NormalMode:
    """The connection and the collectives of normal mode, from the written configuration."""

    options: ConnectOptions
    collectives: list[str]
    main_collective: str


def normal_mode(
    cfg: Mapping[str, str], *, identity: str, config_path: Path, ssldir: Path
) -> NormalMode:
    """Normal mode from ``cfg``; ``ssldir`` is where TLS files are when the config names none."""
    urls = middleware_hosts(cfg)
    if not urls:
        raise NodeError(f"{config_path} sets no plugin.choria.middleware_hosts")
    configured = cfg.get("identity", identity)
    if configured != identity:
        raise NodeError(f"{config_path} is for identity {configured!r}, not {identity!r}")
    collectives = [c.strip() for c in cfg.get("collectives", "choria").split(",") if c.strip()]
    main = cfg.get("main_collective", collectives[0] if collectives else "choria")
    tls = None
    if any(u.startswith("tls://") for u in urls):
        ssldir = Path(cfg["plugin.choria.ssldir"]) if cfg.get("plugin.choria.ssldir") else ssldir
        cert = Path(cfg.get("plugin.security.file.certificate") or ssldir / "certificate.pem")
        key = Path(cfg.get("plugin.security.file.key") or ssldir / "private.pem")
        ca = Path(cfg.get("plugin.security.file.ca") or ssldir / "ca.pem")
        try:
            tls = tls_context(ca=ca, cert=cert, key=key)
        except (OSError, ValueError) as exc:
            raise NodeError(f"cannot load TLS material from {ssldir}: {exc}") from exc
    user = cfg.get("plugin.nats.user") or None
    options = ConnectOptions(
        urls=urls,
        name=identity,
        user=user,
        password=cfg.get("plugin.nats.pass", "") if user else None,
        tls=tls,
    )
    return NormalMode(options, collectives, main)

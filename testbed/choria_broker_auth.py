"""A Choria Broker's login checks, as a nats-server auth callout, for tests and the demo.

go-choria's broker (``broker/network/choria_auth.go``) admits, when an Organization Issuer is
configured (``plugin.security.issuer.names`` / ``plugin.security.issuer.<ou>.public``):

- the **provisioner user** (``provisioner``, ``handleProvisioningUserConnection``): the
  provisioning password (compared in constant time), then a client id JWT in ``auth_token``
  issued by the issuer of the token's ``ou`` with ``permissions.provisioner`` true (unless
  ``provisioner_without_token``) → the provisioning account;
- any other **client** with a client id JWT (``verifyClientJWTBasedAuth``): the JWT verified
  against the issuer, then the CONNECT ``sig`` (base64url, no padding) verified over the
  server nonce with the ed25519 key in the JWT's ``public_key`` (``verifyNonceSignature``) →
  the Choria account, as user ``callerid``.

This module does the same from outside nats-server: :class:`ChoriaBrokerAuth` answers
``$SYS.REQ.USER.AUTH`` (sealed with xkey) and :func:`start_choria_broker` starts nats-server
with the callout plus the dev layout's static users (``node``, ``choria``, ``sys``; they
bypass the callout), so a :class:`testbed.stack.Stack` can use it as its ``dev_server``.
One difference, stricter than go-choria: the provisioner's nonce signature is checked too
(go-choria only checks it for other clients; a go-choria client always sends it). Chained
issuers (``tcs``) are not handled here.

Every refusal text names a reason, never the password, token or signature.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hmac
import json
import logging
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nats
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric import ed25519

from choria_core.errors import FleetError
from choria_core.natsconn import sync_flush
from choria_core.remote_text import clean_remote_text
from jwt_tools.base64url import b64url_encode
from jwt_tools.nats_jwt import (
    PREFIX_ACCOUNT,
    PREFIX_SERVER,
    PREFIX_USER,
    CurveKey,
    NatsJWTError,
    NKey,
    authorization_response_claims,
    decode_jwt,
    encode_jwt,
    user_claims,
    xkey_open,
    xkey_seal,
)
from jwt_tools.tokens import TokenError, decode_unverified
from provisioner.broker.config import nats_conf_quote
from testbed.natsserver import (
    NODE_PUBLISH,
    NODE_SUBSCRIBE,
    NatsServer,
    free_port,
    start_nats_server,
)

log = logging.getLogger(__name__)

__all__ = [
    "ChoriaBroker",
    "ChoriaBrokerAuth",
    "Refusal",
    "issue_client_jwt",
    "start_choria_broker",
]

AUTH_SUBJECT = "$SYS.REQ.USER.AUTH"
XKEY_HEADER = "Nats-Server-Xkey"
PROVISIONING_USER = "provisioner"
CLIENT_ID_PURPOSE = "choria_client_id"


class Refusal(FleetError, reason="broker_auth_refused"):
    """Why a connection is refused (a short reason; no secret in it)."""


def issue_client_jwt(
    issuer: ed25519.Ed25519PrivateKey,
    *,
    caller: str,
    public_key_hex: str,
    ou: str = "choria",
    validity_s: float = 3600.0,
    provisioner: bool = True,
    now: float | None = None,
) -> str:
    """A client id JWT as ``choria jwt client`` with an Organization Issuer makes it (EdDSA,
    ``purpose: choria_client_id``, ``iss: I-<issuer hex>``, ``ou``, ``callerid``,
    ``public_key``, ``permissions.provisioner``)."""
    t = int(now if now is not None else time.time())
    pub = issuer.public_key().public_bytes_raw().hex()
    claims: dict[str, Any] = {
        "purpose": CLIENT_ID_PURPOSE,
        "callerid": caller,
        "public_key": public_key_hex,
        "ou": ou,
        "iss": f"I-{pub}",
        "sub": caller,
        "iat": t,
        "nbf": t,
        "exp": int(t + validity_s),
        "jti": secrets.token_hex(10),
        "permissions": {"provisioner": provisioner} if provisioner else {},
    }
    head = b64url_encode(json.dumps({"alg": "EdDSA", "typ": "JWT"}).encode())
    body = b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    sig = issuer.sign(f"{head}.{body}".encode())
    return f"{head}.{body}.{b64url_encode(sig)}"


def _issuer_key(hex_key: str) -> ed25519.Ed25519PublicKey:
    return ed25519.Ed25519PublicKey.from_public_bytes(bytes.fromhex(hex_key))


def _verify_client_jwt(
    token: str, issuers: Mapping[str, ed25519.Ed25519PublicKey], now: float
) -> dict[str, Any]:
    """``parseClientIDJWTWithIssuer``: the issuer of the token's ``ou``, EdDSA, client id
    purpose, times, callerid and public_key."""
    try:
        header, claims = decode_unverified(token)
    except TokenError:
        raise Refusal("invalid JWT token") from None
    ou = claims.get("ou")
    if not isinstance(ou, str):
        raise Refusal("no ou claim in token")
    issuer = issuers.get(ou)
    if issuer is None:
        raise Refusal(f"no issuer configured for ou {clean_remote_text(ou, 64)!r}")
    if header.get("alg") != "EdDSA":
        raise Refusal("invalid JWT token: not EdDSA")
    head, body, sig = token.strip().split(".")
    try:
        raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        issuer.verify(raw, f"{head}.{body}".encode())
    except (InvalidSignature, ValueError, binascii.Error):
        raise Refusal("invalid JWT token: not signed by the issuer") from None
    if claims.get("purpose") != CLIENT_ID_PURPOSE:
        raise Refusal("not a client id token")
    exp, nbf = claims.get("exp"), claims.get("nbf")
    if isinstance(exp, int | float) and now >= exp:
        raise Refusal("token is expired")
    if isinstance(nbf, int | float) and now < nbf:
        raise Refusal("token is not valid yet")
    if not isinstance(claims.get("callerid"), str) or not claims["callerid"]:
        raise Refusal("no callerid in claims")
    if not isinstance(claims.get("public_key"), str) or not claims["public_key"]:
        raise Refusal("no public key in claims")
    return claims


def _verify_nonce(nonce: Any, sig: Any, public_hex: str) -> None:
    """``verifyNonceSignature``: hex public key, base64url (raw) signature over the nonce."""
    if not isinstance(sig, str) or not sig:
        raise Refusal("connection nonce was not signed")
    if not isinstance(nonce, str) or not nonce:
        raise Refusal("server did not generate a nonce to verify")
    try:
        pub = bytes.fromhex(public_hex)
        if len(pub) != 32:
            raise ValueError
        key = ed25519.Ed25519PublicKey.from_public_bytes(pub)
    except ValueError:
        raise Refusal("invalid nonce signature") from None
    if "=" in sig or len(sig) > 200:
        raise Refusal("invalid url encoded signature")
    try:
        raw = base64.urlsafe_b64decode(sig + "=" * (-len(sig) % 4))
        key.verify(raw, nonce.encode())
    except (InvalidSignature, ValueError, binascii.Error):
        raise Refusal("nonce signature did not verify using pub key in the jwt") from None


@dataclass
class ChoriaBrokerAuth:
    """The callout: decides CONNECTs the way ``ChoriaAuth.Check`` does (see module doc)."""

    servers: list[str]
    auth_seed: str  # the AUTH account's nkey user (makes nats-server send a nonce)
    issuer_seed: str  # the callout issuer account key
    xkey_seed: str
    issuers: dict[str, str]  # ou -> issuer public key (hex)
    provisioner_password: str = field(repr=False)
    provisioner_without_token: bool = False
    provisioning_account: str = "PROVISIONING"
    choria_account: str = "CHORIA"
    admitted: list[str] = field(default_factory=list)
    refused: list[str] = field(default_factory=list)
    #: the CONNECT fields each request carried (names only, never values)
    connect_fields: list[frozenset[str]] = field(default_factory=list)
    _nc: Any = field(default=None, init=False, repr=False)
    _issuer: NKey = field(init=False, repr=False)
    _xkey: CurveKey = field(init=False, repr=False)
    _keys: dict[str, ed25519.Ed25519PublicKey] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self._issuer = NKey.from_seed(self.issuer_seed)
        self._xkey = CurveKey.from_seed(self.xkey_seed)
        self._keys = {ou: _issuer_key(k) for ou, k in self.issuers.items()}

    async def start(self) -> None:
        self._nc = await nats.connect(
            servers=self.servers, nkeys_seed_str=self.auth_seed, max_reconnect_attempts=-1
        )
        await self._nc.subscribe(AUTH_SUBJECT, cb=self._on_request)
        await sync_flush(self._nc)

    async def stop(self) -> None:
        nc, self._nc = self._nc, None
        if nc is not None:
            with contextlib.suppress(Exception):
                await nc.close()

    async def _on_request(self, msg: Any) -> None:
        server_xkey = (msg.headers or {}).get(XKEY_HEADER)
        try:
            raw = xkey_open(self._xkey, server_xkey, msg.data) if server_xkey else msg.data
            request = decode_jwt(raw.decode("ascii"), allowed_issuer_prefixes=[PREFIX_SERVER])
        except (NatsJWTError, UnicodeDecodeError, ValueError):
            log.warning("choria broker auth: unreadable authorization request")
            return
        req = request.get("nats") or {}
        user_nkey, server_id = str(req.get("user_nkey", "")), str(request.get("iss", ""))
        try:
            name, user_jwt = self.decide(req)
            body = authorization_response_claims(
                user_nkey=user_nkey, server_id=server_id, user_jwt=user_jwt
            )
            self.admitted.append(name)
        except Refusal as exc:
            reason = str(exc)
            self.refused.append(reason)
            log.info("choria broker auth: denying connection: %s", reason)
            body = authorization_response_claims(
                user_nkey=user_nkey, server_id=server_id, error=reason
            )
        token = encode_jwt(body, self._issuer).encode()
        reply = xkey_seal(self._xkey, server_xkey, token) if server_xkey else token
        with contextlib.suppress(Exception):
            await msg.respond(reply)

    def decide(self, req: Mapping[str, Any]) -> tuple[str, str]:
        """``(name, user JWT)`` for an admitted connection; raises :class:`Refusal`."""
        opts = req.get("connect_opts") or {}
        client = req.get("client_info") or {}
        self.connect_fields.append(frozenset(k for k in opts if isinstance(k, str)))
        user_nkey = str(req.get("user_nkey", ""))
        now = time.time()
        raw_token = opts.get("auth_token")
        token = raw_token if isinstance(raw_token, str) else ""
        if opts.get("user") == PROVISIONING_USER:
            self._check_provisioner(opts, client, token, now)
            return PROVISIONING_USER, self._user_jwt(
                user_nkey, PROVISIONING_USER, self.provisioning_account
            )
        if not token:
            raise Refusal("no client JWT presented")
        claims = _verify_client_jwt(token, self._keys, now)
        _verify_nonce(client.get("nonce"), opts.get("sig"), claims["public_key"])
        caller = str(claims["callerid"])
        return caller, self._user_jwt(user_nkey, caller, self.choria_account)

    def _check_provisioner(
        self, opts: Mapping[str, Any], client: Mapping[str, Any], token: str, now: float
    ) -> None:
        if not self.provisioner_password:
            raise Refusal("provisioning user password not enabled")
        password = opts.get("pass")
        if not isinstance(password, str) or not password:
            raise Refusal("password required")
        if not hmac.compare_digest(password.encode(), self.provisioner_password.encode()):
            raise Refusal("invalid provisioner password supplied")
        if not token:
            if self.provisioner_without_token:
                return
            raise Refusal("no token provided in connection")
        claims = _verify_client_jwt(token, self._keys, now)
        perms = claims.get("permissions")
        if not isinstance(perms, dict) or perms.get("provisioner") is not True:
            caller = clean_remote_text(str(claims.get("callerid")), 128)
            raise Refusal(f"provisioner claim is false in token with caller id '{caller}'")
        _verify_nonce(client.get("nonce"), opts.get("sig"), claims["public_key"])

    def _user_jwt(self, user_nkey: str, name: str, account: str) -> str:
        claims = user_claims(
            user_nkey=user_nkey, name=name, audience=account, pub_allow=[">"], sub_allow=[">"]
        )
        return encode_jwt(claims, self._issuer)


@dataclass
class ChoriaBroker:
    """nats-server with :class:`ChoriaBrokerAuth` in front (``server`` is a dev-layout
    :class:`NatsServer`: its ``users`` hold the provisioner password and the static users)."""

    server: NatsServer
    auth: ChoriaBrokerAuth

    @property
    def url(self) -> str:
        return self.server.url

    async def stop(self) -> None:
        try:
            await self.auth.stop()
        finally:
            await asyncio.to_thread(self.server.stop)

    async def __aenter__(self) -> ChoriaBroker:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()


def _list(values: list[str]) -> str:
    return "[" + ", ".join(nats_conf_quote(v) for v in values) + "]"


def _config_text(
    port: int,
    monitor_port: int,
    store: Path,
    users: dict[str, tuple[str, str]],
    auth_user: NKey,
    issuer: NKey,
    xkey: CurveKey,
) -> str:
    q = nats_conf_quote
    node_user, node_pw = users["node"]
    choria_user, choria_pw = users["choria"]
    sys_user, sys_pw = users["sys"]
    return f"""
server_name: {q(f"choria_broker_{port}")}
listen: 127.0.0.1:{port}
http: 127.0.0.1:{monitor_port}
max_payload: 4MB
jetstream {{ store_dir: {q(str(store))}, max_memory_store: 256MB, max_file_store: 2GB }}
accounts {{
  AUTH {{ users = [ {{ nkey: {q(auth_user.public_key)} }} ] }}
  PROVISIONING {{
    jetstream: enabled
    users = [
      {{ user: {q(node_user)}, password: {q(node_pw)},
        permissions: {{
          publish: {{ allow: {_list(NODE_PUBLISH)} }}
          subscribe: {{ allow: {_list(NODE_SUBSCRIBE)} }}
          allow_responses: {{ max: 1, expires: "1m" }}
        }} }}
    ]
  }}
  CHORIA {{
    jetstream: enabled
    users = [ {{ user: {q(choria_user)}, password: {q(choria_pw)} }} ]
  }}
  SYS {{ users = [ {{ user: {q(sys_user)}, password: {q(sys_pw)} }} ] }}
}}
system_account: SYS
authorization {{
  auth_callout {{
    issuer: {q(issuer.public_key)}
    account: AUTH
    auth_users: {_list([auth_user.public_key, node_user, choria_user, sys_user])}
    xkey: {q(xkey.public_key)}
  }}
}}
"""


async def start_choria_broker(
    workdir: Path,
    *,
    issuers: Mapping[str, str],
    provisioner_password: str | None = None,
    provisioner_without_token: bool = False,
) -> ChoriaBroker:
    """Start nats-server with the Choria login checks in ``workdir``.

    ``issuers``: Organization Issuer public keys (hex) by ``ou``. Use as
    ``async with await start_choria_broker(...) as broker:``.
    """
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    port, monitor_port = free_port(), free_port()
    password = provisioner_password or secrets.token_urlsafe(16)
    users = {
        "provisioner": (PROVISIONING_USER, password),
        **{role: (role, secrets.token_urlsafe(16)) for role in ("node", "choria", "sys")},
    }
    auth_user, issuer = NKey.generate(PREFIX_USER), NKey.generate(PREFIX_ACCOUNT)
    xkey = CurveKey.generate()
    (workdir / "jetstream").mkdir(exist_ok=True)
    text = _config_text(port, monitor_port, workdir / "jetstream", users, auth_user, issuer, xkey)
    server = await asyncio.to_thread(
        start_nats_server,
        workdir,
        config_text=text.replace("{", "{{").replace("}", "}}"),
        port=port,
        monitor_port=monitor_port,
        users=users,
    )
    auth = ChoriaBrokerAuth(
        servers=[server.url],
        auth_seed=auth_user.seed,
        issuer_seed=issuer.seed,
        xkey_seed=xkey.seed,
        issuers=dict(issuers),
        provisioner_password=password,
        provisioner_without_token=provisioner_without_token,
    )
    try:
        await auth.start()
    except BaseException:
        await asyncio.to_thread(server.stop)
        raise
    return ChoriaBroker(server=server, auth=auth)

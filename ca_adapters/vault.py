"""Vault / OpenBao PKI adapter: ``POST /v1/<mount>/sign/<role>`` with a token or AppRole.

Authentication is a static token (``X-Vault-Token``) or an AppRole login
(``/v1/auth/<approle_mount>/login``). Tokens with a TTL are renewed with
``/v1/auth/token/renew-self`` once two thirds of the lease have passed; when renewal fails or
the server answers 403, an AppRole adapter logs in again (once per request). Only ``sign`` is
used, never ``issue``: the node keeps its private key.

Roles default to ``use_csr_common_name``/``use_csr_sans``: Vault then takes the names from the
CSR and ignores ``common_name``/``alt_names`` (with only a warning). Every certificate is
therefore re-verified (:mod:`ca_adapters.verify`): a CSR naming someone else is refused. The
server's warnings are logged and returned in :attr:`SignResult.warnings`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import httpx
from cryptography import x509

from ._http import TLSVerify, http_error, json_body, make_client, send
from .base import (
    CAError,
    CAVerificationError,
    SignRequest,
    SignResult,
    crl_reason,
    parse_serial,
)
from .verify import (
    DEFAULT_MAX_VALIDITY_S,
    Expectations,
    check_request_names,
    dump_pem_chain,
    load_pem_chain,
    parse_csr,
    result_for,
    verify_issued,
)

log = logging.getLogger(__name__)

# /sys/health: 200 active, 429 standby, 472 DR secondary, 473 performance standby.
_HEALTHY = {200, 429, 472, 473}


def _errors(resp: httpx.Response) -> str:
    body = json_body(resp)
    if isinstance(body, dict) and isinstance(body.get("errors"), list):
        return "; ".join(str(e).strip() for e in body["errors"])
    return resp.text[:200]


class VaultAdapter:
    """A :class:`~ca_adapters.base.CAAdapter` for the Vault/OpenBao PKI secrets engine."""

    def __init__(
        self,
        url: str,
        *,
        name: str = "vault",
        mount: str = "pki",
        role: str = "node",
        token: str | None = None,
        role_id: str | None = None,
        secret_id: str | None = None,
        approle_mount: str = "approle",
        namespace: str | None = None,
        ca_pem: str | None = None,
        tls_verify: TLSVerify = True,
        client_cert: tuple[str, str] | None = None,
        timeout: float = 10.0,
        ttl_s: float | None = None,
        require_eku: bool = True,
        max_validity_s: float = DEFAULT_MAX_VALIDITY_S,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        if token is None and not (role_id and secret_id):
            raise ValueError(f"{name}: give a token, or an AppRole role_id and secret_id")
        self.name = name
        self.mount = mount.strip("/")
        self.role = role
        self._static_token = token
        self._role_id = role_id
        self._secret_id = secret_id
        self._approle_mount = approle_mount.strip("/")
        self._namespace = namespace
        self._secrets = tuple(s for s in (token, secret_id) if s)
        self._pinned = load_pem_chain(ca_pem, ca=name) if ca_pem else None
        self._fetched_chain: list[x509.Certificate] | None = None
        self.ttl_s = ttl_s
        self.require_eku = require_eku
        self.max_validity_s = max_validity_s
        self._client = client or make_client(
            url, verify=tls_verify, client_cert=client_cert, timeout=timeout
        )
        self._token: str | None = token if role_id is None else None
        self._renew_at: float | None = None  # monotonic; None: no known expiry
        self._expires_at: float | None = None
        self._renewable = False
        self._looked_up = role_id is not None
        self._lock = asyncio.Lock()
        self._warned: set[str] = set()
        self.logins = 0  # counters, for metrics and tests
        self.renewals = 0

    @property
    def uses_approle(self) -> bool:
        return self._role_id is not None

    # -- HTTP ---------------------------------------------------------------------------------

    def _headers(self, token: str | None) -> dict[str, str]:
        h: dict[str, str] = {}
        if token:
            h["X-Vault-Token"] = token
        if self._namespace:
            h["X-Vault-Namespace"] = self._namespace
        return h

    async def _call(
        self, method: str, path: str, action: str, *, token: str | None, body: Any = None
    ) -> httpx.Response:
        return await send(
            self._client,
            method,
            f"/v1/{path}",
            ca=self.name,
            action=action,
            json=body,
            headers=self._headers(token),
        )

    def _fail(self, action: str, resp: httpx.Response) -> CAError:
        return http_error(
            ca=self.name,
            action=action,
            status=resp.status_code,
            detail=_errors(resp),
            secrets=self._secrets,
        )

    # -- tokens -------------------------------------------------------------------------------

    def _set_lease(self, auth: dict[str, Any]) -> None:
        lease = float(auth.get("lease_duration") or 0)
        now = time.monotonic()
        if lease > 0:
            self._expires_at = now + lease
            self._renew_at = now + lease * 2 / 3
        else:
            self._expires_at = self._renew_at = None
        self._renewable = bool(auth.get("renewable"))

    async def _login(self) -> str:
        resp = await self._call(
            "POST",
            f"auth/{self._approle_mount}/login",
            "AppRole login",
            token=None,
            body={"role_id": self._role_id, "secret_id": self._secret_id},
        )
        if resp.status_code != 200:
            raise self._fail("AppRole login", resp)
        body = json_body(resp)
        auth = body.get("auth") if isinstance(body, dict) else None
        if not isinstance(auth, dict) or not auth.get("client_token"):
            raise CAError(f"{self.name}: AppRole login answer has no token", ca=self.name)
        self._token = str(auth["client_token"])
        self._set_lease(auth)
        self.logins += 1
        log.info("ca=%s AppRole login ok, lease %ss", self.name, auth.get("lease_duration"))
        return self._token

    async def _renew(self, token: str) -> bool:
        try:
            resp = await self._call(
                "POST", "auth/token/renew-self", "token renewal", token=token, body={}
            )
        except CAError as exc:
            log.warning("ca=%s token renewal failed: %s", self.name, exc)
            return False
        body = json_body(resp)
        if resp.status_code != 200 or not isinstance(body, dict) or not body.get("auth"):
            log.warning("ca=%s token renewal refused (HTTP %s)", self.name, resp.status_code)
            return False
        self._set_lease(body["auth"])
        self.renewals += 1
        lease = float(body["auth"].get("lease_duration") or 0)
        if self.uses_approle and 0 < lease < 60:
            # Near token_max_ttl renewals return ever shorter leases: log in afresh instead.
            return False
        return True

    async def _lookup_static(self, token: str) -> None:
        """Learn a static token's TTL once, so it can be renewed before it expires."""
        self._looked_up = True
        try:
            resp = await self._call("GET", "auth/token/lookup-self", "token lookup", token=token)
        except CAError:
            return
        body = json_body(resp)
        if (
            resp.status_code == 200
            and isinstance(body, dict)
            and isinstance(body.get("data"), dict)
        ):
            data = body["data"]
            self._set_lease({"lease_duration": data.get("ttl"), "renewable": data.get("renewable")})

    async def _get_token(self) -> str:
        async with self._lock:
            if self._token and not self._looked_up:
                await self._lookup_static(self._token)
            now = time.monotonic()
            if self._token and (self._renew_at is None or now < self._renew_at):
                return self._token
            if (
                self._token
                and self._renewable
                and self._expires_at is not None
                and now < self._expires_at
                and await self._renew(self._token)
            ):
                return self._token
            if self.uses_approle:
                return await self._login()
            assert self._token is not None
            return self._token  # a static token past its TTL: the server will say 403

    async def _relogin(self, used: str) -> str:
        async with self._lock:
            if self._token and self._token != used:
                return self._token  # another request already logged in again
            return await self._login()

    def renew_soon(self) -> None:
        """Renew (or log in again) on the next request instead of at 2/3 of the lease."""
        self._renew_at = time.monotonic() - 1

    # -- CAAdapter ----------------------------------------------------------------------------

    async def sign(self, req: SignRequest) -> SignResult:
        check_request_names(req, ca=self.name)
        csr = parse_csr(req.csr_pem, ca=self.name)
        trust = await self._trust()
        role = req.profile or self.role
        ttl = req.ttl_s if req.ttl_s is not None else self.ttl_s
        body: dict[str, Any] = {
            "csr": req.csr_pem,
            "common_name": req.identity,
            "alt_names": ",".join(req.all_dns_names()),
            "format": "pem",
        }
        if req.ip_sans:
            body["ip_sans"] = ",".join(dict.fromkeys(req.ip_sans))
        if ttl is not None:
            body["ttl"] = f"{int(ttl)}s"
        path = f"{self.mount}/sign/{role}"
        token = await self._get_token()
        resp = await self._call("POST", path, "sign", token=token, body=body)
        if resp.status_code == 403 and self.uses_approle:
            log.info("ca=%s sign got 403, logging in again", self.name)
            token = await self._relogin(token)
            resp = await self._call("POST", path, "sign", token=token, body=body)
        if resp.status_code != 200:
            raise self._fail(f"sign (role {role!r})", resp)
        answer = json_body(resp)
        data = answer.get("data") if isinstance(answer, dict) else None
        if not isinstance(data, dict) or not isinstance(data.get("certificate"), str):
            raise CAVerificationError(f"{self.name}: sign answer has no certificate", ca=self.name)
        warnings = tuple(str(w) for w in (answer.get("warnings") or ()))
        for w in warnings:
            self._log_warning(req.identity, w)
        cert = verify_issued(
            data["certificate"],
            csr=csr,
            identity=req.identity,
            dns_sans=req.dns_sans,
            ip_sans=req.ip_sans,
            ca_chain=trust,
            ca=self.name,
            expect=Expectations(
                require_eku=self.require_eku,
                max_validity_s=self.max_validity_s,
                max_lifetime_s=ttl,
            ),
        )
        return result_for(cert, dump_pem_chain(trust), warnings)

    def _log_warning(self, identity: str, warning: str) -> None:
        """Each distinct server warning once at WARNING, repeats at DEBUG.

        A role with ``use_csr_common_name`` warns on every sign; at fleet scale repeating it
        would drown the log. The certificate is verified either way.
        """
        level = logging.DEBUG
        if warning not in self._warned and len(self._warned) < 256:
            self._warned.add(warning)
            level = logging.WARNING
        log.log(level, "ca=%s identity=%s server warning: %s", self.name, identity, warning)

    async def _trust(self) -> list[x509.Certificate]:
        if self._pinned is not None:
            return self._pinned
        if self._fetched_chain is None:
            self._fetched_chain = load_pem_chain(await self._fetch_chain(), ca=self.name)
        return self._fetched_chain

    async def _fetch_chain(self) -> str:
        resp = await self._call("GET", f"{self.mount}/ca_chain", "ca_chain", token=None)
        if resp.status_code == 200 and "BEGIN CERTIFICATE" in resp.text:
            return resp.text
        resp = await self._call("GET", f"{self.mount}/cert/ca_chain", "ca_chain", token=None)
        if resp.status_code != 200:
            raise self._fail("ca_chain", resp)
        body = json_body(resp)
        data = body.get("data") if isinstance(body, dict) else None
        pem = ""
        if isinstance(data, dict):
            pem = str(data.get("ca_chain") or data.get("certificate") or "")
        if "BEGIN CERTIFICATE" not in pem:
            raise CAError(f"{self.name}: ca_chain: no certificate in the answer", ca=self.name)
        return pem

    async def ca_chain(self) -> str:
        return dump_pem_chain(await self._trust())

    async def health(self) -> bool:
        try:
            resp = await self._call("GET", "sys/health", "health", token=None)
        except CAError:
            return False
        return resp.status_code in _HEALTHY

    async def aclose(self) -> None:
        await self._client.aclose()

    async def revoke(self, serial: str, reason: str) -> None:
        """``<mount>/revoke`` with the serial as Vault spells it (``0a:1b:...``).

        Vault keeps no reason code (the operator's reason is in our audit log); the token
        needs ``update`` on ``<mount>/revoke``. Revoking twice succeeds.
        """
        number = parse_serial(serial, ca=self.name)
        digits = format(number, "x")
        digits = digits.zfill(len(digits) + len(digits) % 2)
        body = {"serial_number": ":".join(digits[i : i + 2] for i in range(0, len(digits), 2))}
        path = f"{self.mount}/revoke"
        token = await self._get_token()
        resp = await self._call("POST", path, "revoke", token=token, body=body)
        if resp.status_code == 403 and self.uses_approle:
            token = await self._relogin(token)
            resp = await self._call("POST", path, "revoke", token=token, body=body)
        if resp.status_code not in (200, 204):
            raise self._fail("revoke", resp)
        log.info("ca=%s revoked serial %s (%s)", self.name, digits, crl_reason(reason))

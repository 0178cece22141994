"""CFSSL adapter: ``cfssl serve`` (``/sign``, ``/authsign``) and ``multirootca`` (``/authsign``).

Wire format (CFSSL's HTTP API): every answer is ``{"success", "result", "errors",
"messages"}``. With an auth key the adapter posts to ``/api/v1/cfssl/authsign`` a body
``{"token": b64(HMAC-SHA256(key, request_bytes)), "request": b64(request_bytes)}`` where
``request_bytes`` are the exact JSON bytes of the sign request (standard base64 with padding,
the key is hex). Without a key it posts the sign request to ``/api/v1/cfssl/sign``.
``/api/v1/cfssl/info`` gives the CA certificate, the profile's expiry and usages: it serves
``ca_chain``, ``health`` and the expectations the returned certificate is checked against.
``newcert`` is never used: the node keeps its private key.

The authsign token covers only the request bytes (no timestamp, no nonce): a captured request
can be replayed to get another certificate for the same CSR. Use TLS.

cfssl serve silently signs with the *default* profile when asked for an unknown one (and its
``/info`` answers for the default too). So before signing with a named profile the adapter
checks that the profile is distinguishable from the default (or that the operator declared its
expected expiry), and after signing that the lifetime and EKU match the profile. multirootca
rejects unknown profiles itself ("invalid profile").
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import httpx
from cryptography import x509

from choria_core.durations import parse_duration

from ._http import KeepAliveClient, TLSVerify, http_error, json_body, make_keepalive_client, send
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


@dataclass(frozen=True)
class ProfileInfo:
    """What ``/info`` says about a profile (or what the operator declared)."""

    certificate_pem: str
    expiry_s: float
    usages: tuple[str, ...]


class CFSSLAdapter:
    """A :class:`~ca_adapters.base.CAAdapter` for cfssl serve and multirootca."""

    def __init__(
        self,
        url: str,
        *,
        name: str | None = None,
        auth_key_hex: str | None = None,
        profile: str | None = None,
        label: str | None = None,
        ca_pem: str | None = None,
        tls_verify: TLSVerify = True,
        client_cert: tuple[str, str] | None = None,
        timeout: float = 10.0,
        profiles: Mapping[str, float] | None = None,
        check_profile_fallback: bool | None = None,
        require_eku: bool = True,
        max_validity_s: float = DEFAULT_MAX_VALIDITY_S,
        info_ttl_s: float = 300.0,
        client: httpx.AsyncClient | None = None,
    ) -> None:
        self.name = name or ("multirootca" if label else "cfssl")
        self._key: bytes | None = None
        if auth_key_hex is not None:
            try:
                self._key = bytes.fromhex(auth_key_hex.strip())
            except ValueError:
                raise ValueError(f"{self.name}: auth key is not hex") from None
            if not self._key:
                raise ValueError(f"{self.name}: auth key is empty")
        self._secrets = (auth_key_hex,) if auth_key_hex else ()
        self.profile = profile
        self.label = label
        self._pinned = load_pem_chain(ca_pem, ca=self.name) if ca_pem else None
        # An unknown profile cannot be told apart from the default on cfssl serve; multirootca
        # (recognised by the label) refuses unknown profiles on its own.
        self.check_profile_fallback = (
            label is None if check_profile_fallback is None else check_profile_fallback
        )
        self._declared = dict(profiles or {})
        self.require_eku = require_eku
        self.max_validity_s = max_validity_s
        self._info_ttl = info_ttl_s
        self._info_cache: dict[str, tuple[float, ProfileInfo]] = {}
        # one /info request per profile at a time: a burst of signs shares the answer
        self._info_locks: dict[str, asyncio.Lock] = {}
        # One client for the adapter's life: connections are kept alive between signs.
        self._client: httpx.AsyncClient | KeepAliveClient = client or make_keepalive_client(
            url, verify=tls_verify, client_cert=client_cert, timeout=timeout
        )
        # The parsed CA chain and its PEM, kept while /info returns the same certificate text.
        self._trust_cache: tuple[str, list[x509.Certificate], str] | None = None

    # -- wire ---------------------------------------------------------------------------------

    async def _post(self, endpoint: str, content: bytes, action: str) -> dict[str, Any]:
        resp = await send(
            self._client,
            "POST",
            f"/api/v1/cfssl/{endpoint}",
            ca=self.name,
            action=action,
            content=content,
            headers={"Content-Type": "application/json"},
        )
        body = json_body(resp)
        if not isinstance(body, dict):
            if resp.status_code >= 400:
                raise http_error(
                    ca=self.name,
                    action=action,
                    status=resp.status_code,
                    detail=resp.text[:200],
                    secrets=self._secrets,
                )
            raise CAError(f"{self.name}: {action}: answer is not JSON", ca=self.name)
        errors = "; ".join(
            str(e.get("message", e)) if isinstance(e, dict) else str(e)
            for e in body.get("errors") or []
        )
        if resp.status_code >= 400:
            raise http_error(
                ca=self.name,
                action=action,
                status=resp.status_code,
                detail=errors,
                secrets=self._secrets,
            )
        if not body.get("success") or not isinstance(body.get("result"), dict):
            raise CAError(
                f"{self.name}: {action} refused: {errors or 'success=false'}",
                ca=self.name,
                status=resp.status_code,
            )
        result: dict[str, Any] = body["result"]
        return result

    def _authenticated(self, raw: bytes) -> bytes:
        assert self._key is not None
        token = hmac.new(self._key, raw, hashlib.sha256).digest()
        envelope = {
            "token": base64.b64encode(token).decode(),
            "request": base64.b64encode(raw).decode(),
        }
        return json.dumps(envelope).encode()

    async def info(self, profile: str | None = None) -> ProfileInfo:
        """``/info`` for ``profile`` (cached for ``info_ttl_s``)."""
        cache_key = profile or ""
        hit = self._info_cache.get(cache_key)
        if hit and hit[0] > time.monotonic():
            return hit[1]
        lock = self._info_locks.setdefault(cache_key, asyncio.Lock())
        async with lock:
            hit = self._info_cache.get(cache_key)
            if hit and hit[0] > time.monotonic():
                return hit[1]
            return await self._fetch_info(cache_key, profile)

    async def _fetch_info(self, cache_key: str, profile: str | None) -> ProfileInfo:
        body: dict[str, str] = {}
        if self.label:
            body["label"] = self.label
        if profile:
            body["profile"] = profile
        result = await self._post("info", json.dumps(body).encode(), "info")
        try:
            info = ProfileInfo(
                certificate_pem=str(result["certificate"]),
                expiry_s=parse_duration(str(result.get("expiry") or "0s")),
                usages=tuple(str(u) for u in result.get("usages") or ()),
            )
        except (KeyError, ValueError) as exc:
            raise CAError(f"{self.name}: info: unexpected answer ({exc})", ca=self.name) from exc
        self._info_cache[cache_key] = (time.monotonic() + self._info_ttl, info)
        return info

    async def _trust(self) -> list[x509.Certificate]:
        return (await self._trust_with_pem())[0]

    async def _trust_with_pem(self) -> tuple[list[x509.Certificate], str]:
        """The CA chain, parsed once per distinct PEM (pinned, or from ``/info``)."""
        pem = "" if self._pinned is not None else (await self.info(None)).certificate_pem
        hit = self._trust_cache
        if hit is None or hit[0] != pem:
            certs = self._pinned if self._pinned is not None else load_pem_chain(pem, ca=self.name)
            hit = self._trust_cache = (pem, certs, dump_pem_chain(certs))
        return hit[1], hit[2]

    async def _expected_lifetime(self, profile: str | None) -> float:
        """The lifetime the certificate must have; refuse profiles cfssl may not know."""
        if profile and profile in self._declared:
            return self._declared[profile]
        info = await self.info(profile)
        if self.require_eku and not {"server auth", "client auth"} <= set(info.usages):
            raise CAError(
                f"{self.name}: profile {profile or 'default'!r} does not grant both "
                f"'server auth' and 'client auth' (usages {list(info.usages)})",
                ca=self.name,
            )
        if profile and self.check_profile_fallback:
            default = await self.info(None)
            if (default.expiry_s, set(default.usages)) == (info.expiry_s, set(info.usages)):
                raise CAVerificationError(
                    f"{self.name}: profile {profile!r} looks exactly like the default profile; "
                    "cfssl serve silently falls back to the default for unknown profiles, so "
                    f"this profile cannot be confirmed (declare its expiry under "
                    f"profiles.{profile} if it really equals the default)",
                    ca=self.name,
                )
        return info.expiry_s

    # -- CAAdapter ----------------------------------------------------------------------------

    async def sign(self, req: SignRequest) -> SignResult:
        check_request_names(req, ca=self.name)
        csr = parse_csr(req.csr_pem, ca=self.name)
        profile = req.profile or self.profile
        expected = await self._expected_lifetime(profile)
        trust, trust_pem = await self._trust_with_pem()
        hosts = [*req.all_dns_names(), *dict.fromkeys(req.ip_sans)]
        sign_req: dict[str, Any] = {
            "certificate_request": req.csr_pem,
            "hosts": hosts,
            "subject": {"CN": req.identity},
        }
        if profile:
            sign_req["profile"] = profile
        if self.label:
            sign_req["label"] = self.label
        raw = json.dumps(sign_req).encode()
        if self._key is not None:
            result = await self._post("authsign", self._authenticated(raw), "authsign")
        else:
            result = await self._post("sign", raw, "sign")
        cert_pem = result.get("certificate")
        if not isinstance(cert_pem, str):
            raise CAVerificationError(f"{self.name}: answer has no certificate", ca=self.name)
        cert = verify_issued(
            cert_pem,
            csr=csr,
            identity=req.identity,
            dns_sans=req.dns_sans,
            ip_sans=req.ip_sans,
            ca_chain=trust,
            ca=self.name,
            expect=Expectations(
                require_eku=self.require_eku,
                max_validity_s=self.max_validity_s,
                expected_lifetime_s=expected,
            ),
        )
        return result_for(cert, trust_pem)

    async def ca_chain(self) -> str:
        return dump_pem_chain(await self._trust())

    async def health(self) -> bool:
        try:
            self._info_cache.pop("", None)
            await self.info(None)
        except CAError:
            return False
        return True

    async def aclose(self) -> None:
        await self._client.aclose()

    # -- revocation ---------------------------------------------------------------------------

    async def revoke(self, serial: str, reason: str) -> None:
        """``/api/v1/cfssl/revoke`` (cfssl serve with ``-db-config``; multirootca has none).

        cfssl keys its certificate database by the *decimal* serial and the issuer's key id
        (hex). cfssl 1.2 stores an empty key id, newer versions the issuing CA's: the CA's
        key id is tried first, then the empty one. Revoking twice succeeds.
        """
        number = parse_serial(serial, ca=self.name)
        trust = await self._trust()
        aki = _key_id(trust[0]) if trust else ""
        body = {"serial": str(number), "reason": crl_reason(reason)}
        for key_id in dict.fromkeys((aki, "")):
            raw = json.dumps({**body, "authority_key_id": key_id}).encode()
            try:
                await self._post("revoke", raw, "revoke")
                return
            except CAError as exc:
                if "not found" not in str(exc) or exc.retryable:
                    raise
        raise CAError(f"{self.name}: revoke: certificate {serial} not found", ca=self.name)


def _key_id(cert: x509.Certificate) -> str:
    """The subject key id of ``cert`` (hex), as the certificates it issued name it."""
    try:
        return str(
            cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest.hex()
        )
    except x509.ExtensionNotFound:
        return x509.SubjectKeyIdentifier.from_public_key(cert.public_key()).digest.hex()

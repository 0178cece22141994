"""The reference helper's decision: rules, overlay placement, CA signing, configuration.

For each node, in order:

1. **rules**: `shutdown_facts` → shutdown; server older than `min_version` → defer, shutdown or
   upgrade; `require_facts` not met → defer ("site not ready").
2. **placement** through `overlays.Placer` (MemoryLedger, or KVLedger when `ledger.nats_url` is
   set); no room → defer with the placer's `retry_after`.
3. **signing**: the CSR through the configured CA adapter, CN and SAN = identity, the overlay's
   `ca_profile`; a CA outage is a defer (retryable) and keeps the reservation, a refused CSR
   is an error and frees it. The reservation is committed once the certificate exists.
4. **configuration**: brokers, collectives, file security paths under the node's ssldir,
   identity, the templated settings, and always `plugin.choria.server.provision=false`.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from typing import Any

from cryptography import x509
from cryptography.x509.oid import NameOID

from choria_core.durations import parse_duration
from choria_core.errors import FleetError
from helpers.models import HelperInput, HelperOutput
from helpers.reference.config import ReferenceConfig, ReferenceConfigError
from helpers.reference.rules import Facts, build_configuration, rule_outcome, version_tuple

log = logging.getLogger(__name__)


class ReferenceHelperError(FleetError, reason="helper"):
    """A node the reference helper refuses to decide for (the message says why)."""


class ReferenceHelper:
    """One configured helper; reuse it for many nodes (persistent and python modes)."""

    def __init__(self, cfg: ReferenceConfig) -> None:
        from overlays import MemoryLedger, OverlayRegistry, Placer, load_sample_registry

        self.cfg = cfg
        if cfg.overlays == "sample":
            self.registry = load_sample_registry()
        else:
            self.registry = OverlayRegistry.from_yaml(cfg.path(cfg.overlays))
        # The registry file's path, resolved once: it is stat'ed for every node.
        self._registry_path = None if cfg.overlays == "sample" else str(cfg.path(cfg.overlays))
        self._registry_key = self._registry_file_key()  # see _follow_registry
        self._placer_cls = Placer
        self.placer: Any = None if cfg.ledger.nats_url else Placer(self.registry, MemoryLedger())
        self._nc: Any = None
        self._ca: Any = None
        self._lock = asyncio.Lock()
        self.action_policies = {
            name: cfg.path(f).read_text() for name, f in cfg.policies.action_policies.items()
        }
        self.opa_policies = {
            name: cfg.path(f).read_text() for name, f in cfg.policies.opa_policies.items()
        }
        self.ttl_s = parse_duration(cfg.certificate.ttl)
        self._rule_settings = cfg.rules.model_dump()
        self._settings = {
            "collectives": cfg.collectives,
            "main_collective": cfg.main_collective,
            "configuration": cfg.configuration,
            "overlay_configuration": cfg.overlay_configuration,
        }

    # -- lazily opened resources --------------------------------------------------------------

    async def _get_placer(self) -> Any:
        if self.placer is not None:
            return self.placer
        async with self._lock:
            if self.placer is None:
                import nats

                from overlays import KVLedger

                led = self.cfg.ledger
                opts: dict[str, Any] = {"servers": [led.nats_url], "connect_timeout": 5}
                if led.user:
                    opts["user"] = led.user
                if led.password_env:
                    opts["password"] = os.environ.get(led.password_env, "")
                self._nc = await nats.connect(**opts)
                ledger = await KVLedger.open(self._nc.jetstream(), bucket=led.bucket)
                self.placer = self._placer_cls(self.registry, ledger)
        return self.placer

    async def _get_ca(self) -> Any:
        if self._ca is None:
            async with self._lock:
                if self._ca is None:
                    from ca_adapters import adapter_from_config

                    self._ca = adapter_from_config(self.cfg.ca, base_dir=self.cfg.base_dir)
        return self._ca

    async def aclose(self) -> None:
        """Close the CA adapter and the NATS connection."""
        if self._ca is not None:
            await self._ca.aclose()
            self._ca = None
        if self._nc is not None:
            await self._nc.close()
            self._nc = None

    def _registry_file_key(self) -> tuple[int, int] | None:
        if self._registry_path is None:
            return None
        try:
            st = os.stat(self._registry_path)
        except OSError:
            return None
        return (st.st_mtime_ns, st.st_size)

    def _follow_registry(self) -> None:
        """Re-read the registry file when it changed (mtime, size): an overlay set to
        ``draining`` or ``cordoned`` counts for the next placement without a restart (a file
        that does not load is logged and the registry in use is kept)."""
        key = self._registry_file_key()
        if key is None or key == self._registry_key:
            return
        self._registry_key = key
        from overlays import OverlayRegistry

        try:
            registry = OverlayRegistry.from_yaml(self.cfg.path(self.cfg.overlays))
        except Exception as exc:
            log.warning("overlay registry not reloaded, keeping the previous one: %s", exc)
            return
        self.registry = registry
        if self.placer is not None:
            self.placer.registry = registry

    # -- the decision --------------------------------------------------------------------------

    async def decide(self, inp: HelperInput) -> HelperOutput:
        """The whole decision for one node."""
        inventory = inp.inventory_data()
        facts = inventory.get("facts")  # as inp.facts(), without parsing the inventory again
        if not isinstance(facts, dict):
            facts = {}
        ruled = self._rules(inventory, facts)
        if ruled is not None:
            return ruled

        self._follow_registry()
        placer = await self._get_placer()
        placement = await placer.place(inp.identity, facts)
        if placement.deferred or placement.overlay is None:
            return HelperOutput(
                defer=True,
                msg=f"no overlay for this node yet: {placement.reason}",
                retry_after=placement.retry_after,
            )
        overlay = self.registry.get(placement.overlay)
        ssldir = (inp.csr.ssldir if inp.csr and inp.csr.ssldir else "") or self.cfg.ssldir
        variables: dict[str, Any] = {
            "identity": inp.identity,
            "overlay": overlay.name,
            "region": overlay.region,
            "brokers": ",".join(overlay.brokers),
            "ssldir": ssldir,
            "facts": Facts(facts),
        }
        out = HelperOutput(
            msg=(
                f"placed in overlay {overlay.name} by {placement.policy or 'placement'}: "
                f"{placement.reason}"
            ),
            overlay=overlay.name,
            action_policies=dict(self.action_policies),
            opa_policies=dict(self.opa_policies),
        )

        if inp.csr is not None:
            signed = await self._sign(inp, placement, variables)
            if isinstance(signed, HelperOutput):
                return signed
            out.certificate, out.ca, out.ssldir = signed[0], signed[1], ssldir
        elif inp.ed25519_pubkey is not None:
            out.server_claims = {"collectives": list(self.cfg.collectives)}

        out.configuration = self._configuration(inp, variables)
        # The place is taken for good once the node has credentials for this overlay.
        await placer.commit(inp.identity)
        return out

    def _rules(self, inventory: Mapping[str, Any], facts: Mapping[str, Any]) -> HelperOutput | None:
        fields = rule_outcome(self._rule_settings, inventory, facts)
        return None if fields is None else HelperOutput(**fields)

    async def _sign(
        self, inp: HelperInput, placement: Any, variables: Mapping[str, Any]
    ) -> tuple[str, str] | HelperOutput:
        from ca_adapters import CAError, SignRequest

        assert inp.csr is not None
        self._check_csr(inp.identity, inp.csr.csr)
        sans = tuple(s.format_map(variables) for s in self.cfg.certificate.extra_dns_sans)
        profile = placement.ca_profile if self.cfg.certificate.use_overlay_profile else None
        req = SignRequest(
            identity=inp.identity,
            csr_pem=inp.csr.csr,
            dns_sans=sans,
            ttl_s=self.ttl_s,
            profile=profile,
            metadata={"overlay": str(placement.overlay)},
        )
        ca = await self._get_ca()
        try:
            res = await ca.sign(req)
        except CAError as exc:
            if exc.retryable:
                # Keep the reservation: the retry lands in the same overlay (stable policy).
                return HelperOutput(
                    defer=True,
                    msg=f"CA {exc.ca} unavailable: {exc}",
                    retry_after=30,
                    overlay=placement.overlay,
                )
            await self.placer.release(inp.identity)
            raise ReferenceHelperError(f"CA {exc.ca} refused the CSR: {exc}") from None
        return res.certificate_pem, res.chain_pem

    @staticmethod
    def _check_csr(identity: str, pem: str) -> None:
        # The CN check gives a clear refusal before any CA call. The CSR's self-signature is
        # checked by every CA adapter (ca_adapters.verify.parse_csr). The parse goes through
        # the verified-CSR cache the provisioner's CSR check and the CA adapter share, so in
        # python mode the node's CSR is parsed and verified once per node, not three times.
        from ca_adapters.verify import CSRSignatureError, verified_csr_subject

        try:
            subject = verified_csr_subject(pem)  # the subject the provisioner's check parsed
        except CSRSignatureError:
            # the CA adapter refuses it, as before
            subject = x509.load_pem_x509_csr(pem.encode()).subject
        except ValueError:
            raise ReferenceHelperError("the node's CSR is not a valid PEM CSR") from None
        cns = subject.get_attributes_for_oid(NameOID.COMMON_NAME)
        cn = cns[0].value if cns else "(none)"
        if cn != identity:
            raise ReferenceHelperError(f"the CSR's CN {cn!r} is not the identity {identity!r}")

    def _configuration(self, inp: HelperInput, variables: Mapping[str, Any]) -> dict[str, str]:
        ed = inp.ed25519_pubkey
        return build_configuration(
            self._settings,
            inp.identity,
            variables,
            csr=inp.csr is not None,
            ed25519_dir=None if ed is None else ed.directory,
        )


__all__ = ["ReferenceConfigError", "ReferenceHelper", "ReferenceHelperError", "version_tuple"]

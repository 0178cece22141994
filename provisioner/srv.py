"""Broker URLs from DNS SRV records, the way go-choria finds its middleware.

go-choria (``choria/framework.go`` ``MiddlewareServers`` / ``QuerySrvRecords``), when no
``plugin.choria.middleware_hosts`` are set and ``plugin.choria.use_srv`` is on, looks up
``_mcollective-server._tcp.<domain>`` and, when that has no answer,
``_x-puppet-mcollective._tcp.<domain>``; the first name that answers gives the brokers, in the
order of RFC 2782 (Go's ``net.LookupSRV``): lowest priority first, within a priority a random
order weighted by ``weight``. Each target becomes ``nats://host:port`` (go-choria's default
scheme; TLS is then decided by the TLS settings), or ``tls://host:port`` when asked.

Everything in a DNS answer is hostile: at most :data:`MAX_RECORDS` records are used, targets
must be host names, ports 1-65535, a target of ``.`` ("no service here") is skipped, and
names are escaped before they are logged or put in an error.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Sequence
from dataclasses import dataclass

import dns.asyncresolver
import dns.exception
import dns.rdatatype
import dns.resolver

from choria_core.errors import FleetError
from choria_core.remote_text import clean_remote_text

__all__ = [
    "MAX_RECORDS",
    "SRV_RECORDS",
    "SrvError",
    "SrvTarget",
    "order_targets",
    "resolve_broker_urls",
]

log = logging.getLogger(__name__)

#: The record names go-choria tries for middleware servers, in order.
SRV_RECORDS: tuple[str, ...] = ("_mcollective-server._tcp", "_x-puppet-mcollective._tcp")
#: The most records of one answer that are used.
MAX_RECORDS = 64
_HOST = re.compile(
    r"(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9])?)*"
)


class SrvError(FleetError, RuntimeError, reason="srv"):
    """No usable SRV records (or the lookup failed)."""


@dataclass(frozen=True)
class SrvTarget:
    priority: int
    weight: int
    port: int
    target: str

    def url(self, scheme: str = "nats") -> str:
        return f"{scheme}://{self.target}:{self.port}"


def order_targets(
    targets: Sequence[SrvTarget], rng: random.Random | None = None
) -> list[SrvTarget]:
    """RFC 2782 order: by priority, then a weighted random order inside each priority."""
    rng = rng or random.SystemRandom()
    out: list[SrvTarget] = []
    for prio in sorted({t.priority for t in targets}):
        group = [t for t in targets if t.priority == prio]
        # zero-weight entries first, as RFC 2782 asks, so they have a small chance early on
        group.sort(key=lambda t: t.weight != 0)
        while group:
            total = sum(t.weight for t in group)
            if total == 0:
                out.extend(group)
                break
            pick = rng.randint(0, total)
            running = 0
            for i, t in enumerate(group):
                running += t.weight
                if running >= pick:
                    out.append(group.pop(i))
                    break
    return out


def _resolver(nameservers: Sequence[str] | None, timeout: float) -> dns.asyncresolver.Resolver:
    if not nameservers:
        res = dns.asyncresolver.Resolver()
    else:
        res = dns.asyncresolver.Resolver(configure=False)
        hosts: list[str] = []
        for ns in nameservers:
            host, _, port = ns.rpartition(":") if ns.count(":") == 1 else (ns, "", "")
            hosts.append(host or ns)
            if port:
                res.port = int(port)
        res.nameservers = hosts
    res.lifetime = timeout
    res.timeout = timeout
    return res


def _targets(answer: dns.resolver.Answer, name: str) -> list[SrvTarget]:
    found: list[SrvTarget] = []
    for rr in list(answer)[:MAX_RECORDS]:
        target = str(getattr(rr, "target", "")).rstrip(".")
        port = int(getattr(rr, "port", 0))
        if not target:  # "." = the service is decidedly not available here
            continue
        if not _HOST.fullmatch(target) or not 0 < port < 65536:
            log.warning(
                "ignoring an unusable SRV record of %s: %s:%s",
                name,
                clean_remote_text(target, 100),
                port,
            )
            continue
        found.append(SrvTarget(int(rr.priority), int(rr.weight), port, target))
    return found


async def resolve_broker_urls(
    domain: str,
    *,
    scheme: str = "nats",
    nameservers: Sequence[str] | None = None,
    timeout: float = 5.0,
    rng: random.Random | None = None,
) -> list[str]:
    """The broker URLs of ``domain`` from its SRV records (see the module doc).

    ``nameservers`` (``host`` or ``host:port``) replaces the system resolver's. Raises
    :class:`SrvError` naming the records tried when none gives a usable target.
    """
    domain = domain.strip().rstrip(".")
    if not domain:
        raise SrvError("no SRV domain given")
    res = _resolver(nameservers, timeout)
    problems: list[str] = []
    for record in SRV_RECORDS:
        name = f"{record}.{domain}"
        try:
            answer = await res.resolve(name, dns.rdatatype.SRV)
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            problems.append(f"{name}: no records")
            continue
        except (dns.exception.DNSException, OSError) as exc:
            problems.append(f"{name}: {type(exc).__name__}")
            continue
        targets = _targets(answer, name)
        if not targets:
            problems.append(f"{name}: no usable records")
            continue
        urls = [t.url(scheme) for t in order_targets(targets, rng)]
        log.debug("found %d brokers in SRV records of %s", len(urls), name)
        return urls
    raise SrvError(
        "no broker found in DNS SRV records: " + "; ".join(problems) + " (check "
        "broker_srv_domain / plugin.choria.srv_domain, or set broker_urls)"
    )

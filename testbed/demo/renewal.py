"""The demo's renewal part: short-lived certificates, renewal on, and an independent watch.

``provisioner demo --certificate-validity 90s --run-for 240s`` issues certificates of that
lifetime, turns the provisioner's renewal on (:mod:`provisioner.renewal`, through the fleet
operations engine: the overlays get the provisioner's client certificate as their ``client:``)
and keeps the fleet running. :class:`CertificateWatch` reads every node's certificate *from
disk* at least every second, independently of the provisioner: a changed serial is a completed
renewal, a ``not_after`` in the past is a node holding an expired certificate.

:func:`renewal_settings` picks the window and the rate for a lifetime: the window ends at least
:data:`MARGIN_S` before expiry (a renewal takes up to ~20 s: the node restarts 2 to 11 s after
the request, then is provisioned again), and the fleet-wide rate is 1.5 times what renewing the
whole fleet within the window takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioner.renewal import RenewalConfig
from testbed.demo.options import MIN_VALIDITY_S
from testbed.demo.verify import node_tls_files

__all__ = [
    "MARGIN_S",
    "MIN_VALIDITY_S",
    "CertificateWatch",
    "bucket_stats",
    "renewal_settings",
]

#: The renewal window ends at least this long before a certificate expires.
MARGIN_S = 22.0
#: Between two reads of the nodes' certificates (the watch's resolution).
SAMPLE_INTERVAL = 0.5


def renewal_settings(validity_s: float, nodes: int) -> RenewalConfig:
    """The provisioner's ``renewal`` section for certificates of ``validity_s``."""
    end = min(0.8, 1.0 - MARGIN_S / validity_s)
    start = max(0.25, end - 0.3)
    end = max(end, start + 0.05)
    per_minute = nodes * 60.0 / ((end - start) * validity_s)
    return RenewalConfig(
        enabled=True,
        window_start=round(start, 4),
        window_end=round(end, 4),
        rate=min(60000.0, max(60.0, 1.5 * per_minute)),
        check_interval=1.0,
        timeout=60.0,
    )


def bucket_stats(times: list[float], width: float = 10.0) -> tuple[int, float]:
    """``(max, mean)`` renewals per ``width`` seconds, over the buckets from the first to the
    last renewal (``(0, 0.0)`` without renewals)."""
    if not times:
        return 0, 0.0
    first, last = min(times), max(times)
    count = max(1, math.ceil((last - first) / width))
    buckets = [0] * count
    for t in times:
        buckets[min(count - 1, int((t - first) / width))] += 1
    return max(buckets), len(times) / count


@dataclass(slots=True)
class _Seen:
    stamp: tuple[int, int]
    serial: int
    not_after: float


@dataclass
class CertificateWatch:
    """Every node's certificate on disk, read every :data:`SAMPLE_INTERVAL` (see the module
    docstring). ``identities`` is called at each look (the fleet may still be starting)."""

    nodes_dir: Path
    identities: Callable[[], list[str]]
    seen: dict[str, _Seen] = field(default_factory=dict)
    #: When each renewal (serial change on disk) was seen, and per node how many.
    renewal_times: list[float] = field(default_factory=list)
    renewed: dict[str, int] = field(default_factory=dict)
    #: Nodes whose certificate on disk was past its not_after at some look.
    expired: set[str] = field(default_factory=set)
    looks: int = 0
    max_gap_s: float = 0.0
    _task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop(), name="demo-cert-watch")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._task
            self._task = None

    async def _loop(self) -> None:
        last: float | None = None
        while True:
            await asyncio.to_thread(self.look)
            now = time.monotonic()
            if last is not None:
                self.max_gap_s = max(self.max_gap_s, now - last)
            last = now
            await asyncio.sleep(SAMPLE_INTERVAL)

    def look(self) -> None:
        """Read every node's certificate once (only files that changed are parsed)."""
        now = time.time()
        for identity in self.identities():
            self._look_at(identity, now)
        self.looks += 1

    def _look_at(self, identity: str, now: float) -> None:
        cert_path = node_tls_files(self.nodes_dir / identity)[0]
        try:
            st = cert_path.stat()
            prev = self.seen.get(identity)
            stamp = (st.st_mtime_ns, st.st_size)
            if prev is None or prev.stamp != stamp:
                cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
                seen = _Seen(stamp, cert.serial_number, cert.not_valid_after_utc.timestamp())
                self.seen[identity] = seen
                if prev is not None and prev.serial != seen.serial:
                    self.renewal_times.append(now)
                    self.renewed[identity] = self.renewed.get(identity, 0) + 1
        except (OSError, ValueError):
            return  # not provisioned yet, or being written
        if now >= self.seen[identity].not_after:
            self.expired.add(identity)

    def summary(self) -> dict[str, Any]:
        """The demo's JSON keys for renewal."""
        peak, mean = bucket_stats(self.renewal_times)
        return {
            "renewals": len(self.renewal_times),
            "renewed_nodes": len(self.renewed),
            "expired_certificates": len(self.expired),
            "max_renewals_per_10s": peak,
            "mean_renewals_per_10s": round(mean, 2),
        }

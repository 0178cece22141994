"""The demo's run: its stack, the simulated fleet, the wait, the verification, the stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from cryptography import x509

from provisioner.service import Provisioner, ProvisionerError
from testbed.demo.options import DemoError, DemoOptions, DemoResult
from testbed.demo.renewal import CertificateWatch, renewal_settings
from testbed.demo.verify import check_nodes, overlay_connections, percentile
from testbed.fleet import Fleet
from testbed.isolated_broker import IsolatedBroker
from testbed.overlay_brokers import OverlayBroker
from testbed.process import ServerNotAvailable, ServerStartError, reap_children
from testbed.stack import (
    BrokerSpec,
    CASpec,
    HelperSpec,
    OverlaySpec,
    ProvisionerSpec,
    Stack,
    StackSpec,
)

__all__ = ["Demo", "demo_stack_spec"]

log = logging.getLogger(__name__)

PROVISIONER_IDENTITY = "demo-provisioner.fleet.example.net"
# Every attempt of a node ends in one of these states (until its next event or sweep).
_SETTLED = ("provisioned", "failed", "deferred", "shut_down")
# Longer than a node's restart delay (2 s after ``restart`` with splay 1).
SETTLE_S = 5.0
#: How the summary names the CA.
_CA_LABELS = {"local": "local (EC P-256, in-process)"}


def demo_stack_spec(opts: DemoOptions) -> StackSpec:
    """The demo's stack: the isolated broker (TLS as go-choria nodes expect), the CA, one
    nats-server per overlay of the sample registry demanding client certificates of that CA, the
    reference helper and the provisioner with its admin API."""
    # A remote CA (cfssl) on a busy 2-core box, or a process per node, can take seconds.
    slow_helper = opts.helper_mode == "exec" or opts.ca == "cfssl"
    validity = opts.certificate_validity
    return StackSpec(
        broker=BrokerSpec(kind="isolated", tls=opts.tls),
        ca=CASpec(
            kind=opts.ca,
            common_name="Fleet Demo CA",
            validity_s=30 * 86400.0,
            cfssl_ca_source="local",
        ),
        overlays=OverlaySpec(
            registry="sample",
            per_overlay=True,
            accounts=False,
            mutual_tls=opts.tls,
            max_connections=opts.nodes + 1000,
            client_identity=validity is not None,  # renewal reaches the nodes through them
        ),
        helper=HelperSpec(
            kind="reference",
            mode=opts.helper_mode,
            timeout=30 if slow_helper else 10,
            pool_size=2,
            certificate_ttl=f"{round(validity)}s" if validity is not None else "30d",
        ),
        provisioner=ProvisionerSpec(
            identity=PROVISIONER_IDENTITY, site="demo", admin=True, rpc_timeout=10
        ),
    )


class Demo:
    """Everything the demo runs. ``await start()``, ``await run()``, ``await verify()``,
    and always ``await close()`` (idempotent; stops what was started, in reverse order)."""

    def __init__(self, options: DemoOptions) -> None:
        options.validate()
        self.options = options
        self._own_workdir = options.workdir is None
        self.workdir = (
            Path(tempfile.mkdtemp(prefix="provisioner-demo-"))
            if options.workdir is None
            else Path(options.workdir).absolute()
        )
        self.stack = Stack(demo_stack_spec(options), self.workdir)
        self._closed = False
        self.provisioner: Provisioner | None = None
        self.fleets: list[Fleet] = []
        self.ca_cert: x509.Certificate | None = None
        self.ca_label: str = options.ca
        self.started_at = time.time()
        self.fleet_started_at: float | None = None
        self.provisioned_at: dict[str, float] = {}
        self.normal_at: dict[str, float] = {}
        self.setup_s = 0.0
        self._timed_out = False
        self._fleet_task: asyncio.Task[None] | None = None
        #: With --certificate-validity: every node's certificate on disk, watched.
        self.watch: CertificateWatch | None = None
        self._first_started: dict[str, float] = {}

    # ------------------------------------------------------------------ addresses

    @property
    def broker(self) -> IsolatedBroker | None:
        """The provisioning broker (nats-server + auth callout), once started."""
        return self.stack.broker

    @property
    def admin_token(self) -> str:
        return self.stack.admin_token

    @property
    def token_path(self) -> Path:
        return self.stack.token_path

    @property
    def overlay_brokers(self) -> dict[str, OverlayBroker]:
        return self.stack.overlay_brokers

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

    # ------------------------------------------------------------------ start

    async def start(self, step: Callable[[str], None] | None = None) -> None:
        """Start every part (not the fleet); ``step`` is told what is being started.

        Raises :class:`DemoError` when a part cannot start (e.g. nats-server not installed);
        what was started until then is stopped by :meth:`close`.
        """
        try:
            await self._start(step or (lambda _msg: None))
        except (ServerNotAvailable, ServerStartError) as exc:
            raise DemoError(str(exc)) from None

    async def _start(self, say: Callable[[str], None]) -> None:
        t0 = time.monotonic()
        opts, stack = self.options, self.stack
        self.workdir.mkdir(parents=True, exist_ok=True)
        stack.push_cleanup("work directory", self._remove_workdir)
        say("token signing key and provisioning token")
        await asyncio.to_thread(stack.make_keys)
        say("provisioning broker (nats-server + auth callout)")
        await stack.start_broker()
        say(f"certificate authority ({opts.ca})")
        try:
            await stack.start_ca()
        except ServerNotAvailable as exc:
            raise DemoError(f"--ca {opts.ca}: {exc}") from None
        assert stack.ca_cert_path is not None
        self.ca_cert = x509.load_pem_x509_certificate(stack.ca_cert_path.read_bytes())
        self.ca_label = _CA_LABELS.get(
            opts.ca, f"cfssl serve at {stack.ca_url} (pid {stack.ca_pid})"
        )
        say("overlay brokers (one nats-server per overlay)")
        await stack.start_overlays()
        say(f"reference helper ({opts.helper_mode} mode)")
        await stack.prepare_helper()
        say("provisioner and admin API")
        config = None
        if opts.certificate_validity is not None:
            renewal = renewal_settings(opts.certificate_validity, opts.nodes)
            config = stack.provisioner_config(renewal=renewal)
        prov = await stack.managed_provisioner(config, discovery_timeout=1.0, drain_timeout=3.0)
        prov.on_provisioned.append(self._on_provisioned)
        self.provisioner = prov
        try:
            await prov.start()
        except ProvisionerError as exc:
            raise DemoError(f"the provisioner did not start: {exc}") from None
        self.setup_s = time.monotonic() - t0

    def _on_provisioned(self, rec: Any) -> None:
        self.provisioned_at.setdefault(rec.identity, time.time())

    # ------------------------------------------------------------------ fleet

    async def _start_fleet(self) -> None:
        opts = self.options
        base = self.workdir / "fleet"
        self.fleet_started_at = time.time()
        if not opts.start_rate:
            fleet = self._fleet(opts.nodes, base, processes=opts.processes)
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
                fleet = self._fleet(batch, base, start_index=started)
                self.fleets.append(fleet)
                started += batch
                await fleet.start()
            await asyncio.sleep(tick)

    def _fleet(self, nodes: int, base: Path, **kwargs: Any) -> Fleet:
        opts = self.options
        return Fleet(
            nodes,
            self.token_path,
            None,
            base,
            seed=opts.seed,
            key_type="ec",
            restart_delay_scale=opts.restart_delay_scale,
            **kwargs,
        )

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
            # A node's started_at moves at each restart (normal mode, renewals): keep the first.
            self._first_started.setdefault(node.identity, node.started_at)
            if node.mode == "normal" and node.identity not in self.normal_at:
                self.normal_at[node.identity] = now

    def progress(self) -> dict[str, Any]:
        """A snapshot for the live display (and tests)."""
        prov = self.provisioner
        status = prov.status() if prov is not None else {"counts": {}, "queue": {}}
        counts = {str(k): int(v) for k, v in status.get("counts", {}).items()}
        fill = prov.overlay_fill() if prov is not None else {}
        brokers = self.overlay_brokers
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
                    "url": brokers[name].url if name in brokers else "",
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
        task = asyncio.create_task(self._start_fleet(), name="demo-fleet-start")
        self._fleet_task = task
        if opts.certificate_validity is not None and self.watch is None:
            self.watch = CertificateWatch(self.nodes_dir, self.identities)
            self.watch.start()
        deadline = time.monotonic() + opts.effective_timeout()
        last_key: tuple[Any, ...] | None = None
        unchanged_since = time.monotonic()
        while True:
            await asyncio.sleep(interval)
            if task.done() and task.exception() is not None:
                raise DemoError(f"the fleet did not start: {task.exception()}")
            self._note_normal()
            snap = self.progress()
            if on_progress is not None:
                on_progress(snap)
            states, fleet = snap["states"], snap["fleet"]
            provisioned = states.get("provisioned", 0)
            normal = fleet.get("normal", 0)
            if task.done() and provisioned >= opts.nodes and normal >= opts.nodes:
                break
            key = (tuple(sorted(states.items())), tuple(sorted(fleet.items())), snap["in_flight"])
            if key != last_key:
                last_key, unchanged_since = key, time.monotonic()
            settled = sum(states.get(s, 0) for s in _SETTLED)
            if (
                task.done()
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
            await asyncio.wait_for(asyncio.shield(task), 0.1)

    async def keep_running(
        self, on_progress: Callable[[dict[str, Any]], None] | None = None, interval: float = 0.25
    ) -> None:
        """``--run-for``: keep the fleet running (renewing) until that long after its start;
        then stop handing out renewals and wait (bounded) for the nodes renewing to be back."""
        opts, prov = self.options, self.provisioner
        end = (self.fleet_started_at or self.started_at) + (opts.run_for or 0.0)
        while time.time() < end:
            await asyncio.sleep(interval)
            if on_progress is not None:
                on_progress(self.progress())
        if prov is None or opts.certificate_validity is None:
            return
        prov.renewal.paused = True
        deadline = time.monotonic() + 60.0
        while time.monotonic() < deadline:
            snap = self.progress()
            if on_progress is not None:
                on_progress(snap)
            if (
                not prov.renewal.in_flight
                and snap["states"].get("provisioned", 0) >= opts.nodes
                and snap["fleet"].get("normal", 0) >= opts.nodes
            ):
                break
            await asyncio.sleep(interval)

    # ------------------------------------------------------------------ verify

    def identities(self) -> list[str]:
        return [i for fleet in self.fleets for i in fleet.identities()]

    async def verify(self) -> DemoResult:
        """Check every node independently (files on disk, overlay servers' connections)."""
        opts = self.options
        prov = self.provisioner
        assert prov is not None and self.ca_cert is not None
        records = {r["identity"]: r for r in prov.nodes()}
        ports = {name: ob.monitor_port for name, ob in self.overlay_brokers.items()}
        connected, problems = await asyncio.to_thread(overlay_connections, ports)
        modes = {n.identity: n.mode for n in self._local_nodes()}
        checks = await asyncio.to_thread(
            check_nodes, self.identities(), records, modes, connected, self.nodes_dir, self.ca_cert
        )
        counts: dict[str, int] = {}
        for rec in records.values():
            counts[str(rec.get("state"))] = counts.get(str(rec.get("state")), 0) + 1
        overlays: dict[str, int] = {}
        for chk in checks:
            if chk.overlay and records.get(chk.identity, {}).get("state") == "provisioned":
                overlays[chk.overlay] = overlays.get(chk.overlay, 0) + 1
        ttp, ttn = self._times_after_start(records)
        renewal = None
        if self.watch is not None:
            await self.watch.stop()
            await asyncio.to_thread(self.watch.look)
            renewal = self.watch.summary()
        t_first = self.fleet_started_at or self.started_at
        t_last = max(self.provisioned_at.values()) if self.provisioned_at else time.time()
        span = max(1e-6, t_last - t_first)
        provisioned = counts.get("provisioned", 0)
        problems += [f"{chk.identity}: {p}" for chk in checks for p in chk.problems]
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
            renewal=renewal,
        )

    def _times_after_start(self, records: dict[str, Any]) -> tuple[list[float], list[float]]:
        """Seconds from node start to provisioned, and to normal mode."""
        start_times = {n.identity: n.started_at for n in self._local_nodes()}
        start_times.update(self._first_started)
        ttp: list[float] = []
        ttn: list[float] = []
        for identity, t in self.provisioned_at.items():
            started = start_times.get(identity)
            if started is None:  # nodes in worker processes: from the provisioner's first sighting
                started = float(records.get(identity, {}).get("first_seen") or t)
            ttp.append(max(0.0, t - started))
            if identity in self.normal_at:
                ttn.append(max(0.0, self.normal_at[identity] - started))
        return ttp, ttn

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
        if self.watch is not None:
            await self.watch.stop()
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
        await self.stack.close()
        await asyncio.to_thread(reap_children, str(self.workdir))

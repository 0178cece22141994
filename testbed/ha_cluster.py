"""An HA test bed: one real nats-server, N ``provisioner run`` processes, a simulated fleet.

Used by ``tests/ha`` and by ``bench/failover.py``. Everything is real: the broker (with
JetStream for the election and the claims), the provisioner replicas (separate OS processes
started as ``.venv/bin/provisioner run --config FILE``, each with its own identity, audit log
and log file), the nodes (:class:`~testbed.fleet.Fleet`, EC keys, per-node connections) and
the CA (a LocalCA used by the python-mode helper :mod:`testbed.ha_helper`, which also records
every certificate it issues). The token, CA and overlay broker come from a
:class:`~testbed.stack.Stack` over the given broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import nats
from cryptography import x509

from ca_adapters import LocalCA
from provisioner.claims import ClaimStore
from provisioner.config import AdminConfig, ElectionConfig
from provisioner.election import LeaderInfo, read_leader
from testbed.fleet import Fleet
from testbed.natsserver import NatsServer, free_port
from testbed.stack import BrokerSpec, CASpec, HelperSpec, ProvisionerSpec, Stack, StackSpec

__all__ = ["HACluster", "Replica", "certificate_report", "read_records"]

HELPER = "testbed.ha_helper:handler"
REPO = Path(__file__).resolve().parents[1]
TOKEN = "ha-provisioning-token-secret"
ADMIN_TOKEN = "ha-admin-token-0123456789"


def provisioner_command() -> list[str]:
    """``.venv/bin/provisioner`` next to the running interpreter (else ``python -m``)."""
    exe = Path(sys.executable).parent / "provisioner"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "provisioner"]


def read_records(path: Path) -> list[dict[str, Any]]:
    """Audit records of one file; a line cut short by SIGKILL is skipped."""
    if not path.exists():
        return []
    out = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError):
            out.append(json.loads(line))
    return out


@dataclass
class Replica:
    """One ``provisioner run`` process."""

    name: str
    identity: str
    config_path: Path
    audit_path: Path
    log_path: Path
    admin_port: int
    proc: subprocess.Popen[bytes] | None = None
    killed_at: float | None = None
    stopped_at: float | None = None  # SIGKILL or SIGTERM by the test

    def start(self, env: dict[str, str]) -> None:
        out = self.log_path.with_suffix(".stderr").open("ab")
        try:
            self.proc = subprocess.Popen(
                [*provisioner_command(), "run", "--config", str(self.config_path)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=str(REPO),
            )
        finally:
            out.close()

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> float:
        """SIGKILL (a crash: no key deletion, no audit flush); returns the wall time."""
        assert self.proc is not None
        self.killed_at = self.stopped_at = time.time()
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)
        return self.killed_at

    def terminate(self, timeout: float = 30) -> None:
        """SIGTERM: graceful stop (deletes the election key, flushes the audit log)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.stopped_at = time.time()
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def records(self) -> list[dict[str, Any]]:
        return read_records(self.audit_path)

    def stderr_tail(self, lines: int = 20) -> str:
        path = self.log_path.with_suffix(".stderr")
        text = path.read_text(errors="replace") if path.exists() else ""
        log = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return "\n".join((text + log).splitlines()[-lines:])

    async def status(self) -> dict[str, Any]:
        async with httpx.AsyncClient(timeout=5) as client:
            r = await client.get(
                f"http://127.0.0.1:{self.admin_port}/api/v1/status",
                headers={"Authorization": f"Bearer {ADMIN_TOKEN}"},
            )
            r.raise_for_status()
            result: dict[str, Any] = r.json()
            return result


@dataclass
class HACluster:
    """Broker + overlay broker + CA + token + replicas + fleet, in ``workdir``."""

    workdir: Path
    server: NatsServer
    replicas_n: int = 3
    nodes: int = 1000
    concurrency: int = 64
    election: dict[str, Any] = field(default_factory=dict)
    replicas: list[Replica] = field(default_factory=list)
    fleet: Fleet | None = None
    overlay: NatsServer | None = None
    ca: LocalCA | None = None
    nc: Any = None
    stack: Stack | None = None

    # ------------------------------------------------------------------ setup
    def stack_spec(self) -> StackSpec:
        """The given broker (dev layout), a local CA, one overlay broker, the HA helper."""
        return StackSpec(
            broker=BrokerSpec(kind="dev"),
            ca=CASpec(common_name="HA Test CA"),
            helper=HelperSpec(
                kind="command", mode="python", command=HELPER, timeout=10, pool_size=2
            ),
            provisioner=ProvisionerSpec(
                site="ha", concurrency=self.concurrency, rpc_timeout=5, loglevel="info"
            ),
            token=TOKEN,
        )

    async def prepare(self) -> None:
        """Overlay broker, CA, token signer and replica configs (nothing runs yet)."""
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.stack = stack = Stack(self.stack_spec(), self.workdir, dev_server=self.server)
        try:
            await stack.start()
        except BaseException:
            await stack.close()
            raise
        self.overlay, self.ca = stack.overlay, stack.ca
        (self.workdir / "issued").mkdir(exist_ok=True)
        for i in range(self.replicas_n):
            self.replicas.append(self._replica(chr(ord("a") + i)))

    def _replica(self, name: str) -> Replica:
        w = self.workdir / f"replica-{name}"
        w.mkdir(parents=True, exist_ok=True)
        rep = Replica(
            name=name,
            identity=f"prov-{name}-{uuid.uuid4().hex[:6]}.ha.example.net",
            config_path=w / "provisioner.yaml",
            audit_path=w / "audit.jsonl",
            log_path=w / "provisioner.log",
            admin_port=free_port(),
        )
        assert self.stack is not None
        election = {"election": ElectionConfig(**self.election)} if self.election else {}
        cfg = self.stack.provisioner_config(
            identity=rep.identity,
            audit_log=str(rep.audit_path),
            logfile=str(rep.log_path),
            leader_election=True,
            admin=AdminConfig(enabled=True, port=rep.admin_port, token=ADMIN_TOKEN),
            **election,
        )
        self.stack.write_provisioner_config(cfg, rep.config_path)
        return rep

    def env(self) -> dict[str, str]:
        """The replicas' environment: where the HA helper finds its CA and overlay broker."""
        assert self.stack is not None and self.stack.ca_cert_path is not None
        overlay = self.stack.overlay
        return {
            **os.environ,
            "PYTHONUNBUFFERED": "1",
            "HA_CA_DIR": str(self.stack.ca_cert_path.parent),
            "HA_ISSUED_DIR": str(self.workdir / "issued"),
            "HA_OVERLAY_URL": overlay.url,
            "HA_OVERLAY_USER": overlay.users["choria"][0],
            "HA_OVERLAY_PASSWORD_FILE": str(self.stack.overlay_password_file),
        }

    async def start(self) -> None:
        """Connect the observer, start every replica and the fleet."""
        user, pw = self.server.users["provisioner"]
        self.nc = await nats.connect(
            self.server.url,
            user=user,
            password=pw,
            max_reconnect_attempts=-1,
            reconnect_time_wait=0.5,
        )
        env = self.env()
        for rep in self.replicas:
            rep.start(env)
        await self.wait_leader(60)
        assert self.stack is not None
        self.fleet = Fleet(
            self.nodes,
            self.stack.token_path,
            [self.server.url],
            self.workdir / "fleet",
            key_type="ec",
            restart_delay_scale=0.01,
        )
        await self.fleet.start()

    async def close(self) -> None:
        for rep in self.replicas:
            await asyncio.to_thread(rep.terminate, 20)
        if self.fleet is not None:
            await self.fleet.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()
        if self.stack is not None:
            await self.stack.close()

    # ------------------------------------------------------------------ observing
    async def leader(self) -> LeaderInfo | None:
        return await read_leader(self.nc.jetstream(timeout=2), "CHORIA_LEADER_ELECTION")

    def replica(self, identity: str) -> Replica:
        return next(r for r in self.replicas if r.identity == identity)

    async def wait_leader(self, timeout: float, *, not_: str | None = None) -> Replica:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            with contextlib.suppress(Exception):
                info = await self.leader()
                if info is not None and info.identity != not_:
                    return self.replica(info.identity)
            for rep in self.replicas:
                if rep.proc is not None and rep.proc.poll() is not None and rep.stopped_at is None:
                    raise AssertionError(
                        f"replica {rep.name} exited with {rep.proc.returncode}:\n"
                        + rep.stderr_tail()
                    )
            await asyncio.sleep(0.05)
        raise AssertionError(f"no leader within {timeout}s")

    def normal(self) -> int:
        assert self.fleet is not None
        return self.fleet.counts()["normal"]

    async def wait_normal(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.normal() < count:
            if time.monotonic() > deadline:
                assert self.fleet is not None
                stuck = [
                    f"{n!r} restarting={n._restarting} boots={n.boots} link={n._link!r}"
                    for n in self.fleet.local_nodes
                    if n.mode != "normal"
                ][:10]
                raise AssertionError(
                    f"only {self.normal()} of {count} nodes in normal mode after {timeout}s: "
                    f"{self.fleet.counts()}\n"
                    + "\n".join(stuck)
                    + "\n"
                    + "\n".join(f"--- {r.name}\n{r.stderr_tail(8)}" for r in self.replicas)
                )
            await asyncio.sleep(0.05)

    def records(self) -> list[dict[str, Any]]:
        """Every audit record of every replica, oldest first."""
        out = [rec for rep in self.replicas for rec in rep.records()]
        return sorted(out, key=lambda r: float(r.get("time", 0)))

    def issued_by_ca(self) -> dict[str, list[str]]:
        """identity -> serials the CA (helper) issued, from its own issuance logs."""
        issued: dict[str, list[str]] = defaultdict(list)
        for path in (self.workdir / "issued").glob("issued-*.log"):
            for line in path.read_text().splitlines():
                parts = line.split()
                if len(parts) == 2:
                    issued[parts[0]].append(parts[1])
        return issued

    def disk_serials(self) -> dict[str, str]:
        """identity -> serial of the certificate on the node's disk (checked against the CA)."""
        assert self.fleet is not None and self.ca is not None
        out = {}
        for node in self.fleet.local_nodes:
            cert = x509.load_pem_x509_certificate((node.ssldir / "certificate.pem").read_bytes())
            cn = cert.subject.get_attributes_for_oid(x509.oid.NameOID.COMMON_NAME)[0].value
            assert cn == node.identity
            cert.verify_directly_issued_by(self.ca.cert)
            out[node.identity] = format(cert.serial_number, "x")
        return out

    async def claims(self, identities: Iterable[str]) -> dict[str, Any]:
        store = await ClaimStore.open(self.nc.jetstream(timeout=5))
        out = {}
        for ident in identities:
            out[ident] = await store.load(ident)
        return out

    async def first_provisioned_after(
        self, rep: Replica, after: float, timeout: float
    ) -> dict[str, Any]:
        """The first record of ``rep`` provisioning a node after ``after`` (wall time)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            for rec in rep.records():
                if rec.get("decision") == "provisioned" and float(rec["time"]) > after:
                    return rec
            await asyncio.sleep(0.1)
        raise AssertionError(f"{rep.name} provisioned nothing within {timeout}s")


def certificate_report(
    records: list[dict[str, Any]], disk: dict[str, str], issued: dict[str, list[str]]
) -> dict[str, Any]:
    """Compare every certificate seen per node: audit logs, node disks, the CA's own log.

    ``conflicts``: nodes whose attempt records (those with a ``decision``) name a serial other
    than the one on disk (a node handed two certificates) — must be empty. An ``issued`` record
    is written before delivery, so a leader killed right after it leaves a serial that was
    recorded but never delivered: that is not a conflict. ``orphans``: serials the CA issued
    but no node holds and no audit record names (issued in the instant before a SIGKILL).
    """
    audit: dict[str, set[str]] = defaultdict(set)
    delivered: dict[str, set[str]] = defaultdict(set)
    for rec in records:
        if rec.get("identity") and rec.get("cert_serial"):
            audit[rec["identity"]].add(rec["cert_serial"])
            if "decision" in rec:
                delivered[rec["identity"]].add(rec["cert_serial"])
    conflicts = {
        ident: sorted(serials | {disk.get(ident, "-")})
        for ident, serials in delivered.items()
        if serials - {disk.get(ident)}
    }
    orphans = {
        ident: sorted(set(serials) - {disk.get(ident)} - audit.get(ident, set()))
        for ident, serials in issued.items()
        if set(serials) - {disk.get(ident)} - audit.get(ident, set())
    }
    issued_twice_same = sum(1 for s in issued.values() if len(s) != len(set(s)))
    return {
        "conflicts": conflicts,
        "orphans": orphans,
        "nodes_with_audit_serial": len(audit),
        "missing_from_ca_log": sorted(i for i, s in disk.items() if s not in issued.get(i, [])),
        "duplicate_serials": issued_twice_same,
    }

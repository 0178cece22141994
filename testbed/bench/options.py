"""What one ``provisioner bench`` run is asked for; the constants of the pipeline it measures."""

from __future__ import annotations

import math
import os
import re
import resource
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from choria_core.errors import FleetError

__all__ = [
    "PROVISIONER_IDENTITY",
    "RPCS_PER_NODE",
    "RPC_PAYLOADS",
    "SIGNATURES_PER_NODE",
    "SITE",
    "BenchError",
    "BenchOptions",
    "is_tmpfs_path",
    "simulator_dir",
]

HelperMode = Literal["exec", "persistent", "python"]
CAKind = Literal["local", "cfssl", "openbao"]
KeyType = Literal["rsa", "ec"]
Connections = Literal["per-node", "shared"]
BrokerKind = Literal["auto", "callout", "static"]
Profiler = Literal["none", "pyinstrument", "cprofile"]

#: The round trips one node costs in our pipeline: the discovery (the node's ``startup`` event,
#: or a broadcast sweep reply) and the five directed RPCs of the happy path. The ``validate``,
#: ``csr_check``, ``check_output`` stages are local computation, not round trips.
RPCS_PER_NODE: tuple[str, ...] = ("discovery", "jwt", "inventory", "gencsr", "configure", "restart")
SIGNATURES_PER_NODE = 1

#: (request bytes, reply bytes) on the wire per round trip, sniffed from a 40-node run of this
#: pipeline (transport JSON, base64 bodies; replies 821-1749 bytes, mean 1386); the floor sends
#: payloads of the same sizes. Discovery is the node's ``startup`` event (461 bytes) and its
#: ``provisioned`` event (450), counted as one round trip.
RPC_PAYLOADS: dict[str, tuple[int, int]] = {
    "discovery": (461, 450),
    "jwt": (1087, 1700),
    "inventory": (987, 1750),
    "gencsr": (1155, 1700),
    "configure": (4769, 850),
    "restart": (1115, 820),
}

PROVISIONER_IDENTITY = "bench-provisioner.fleet.example.net"
SITE = "bench"

#: How the result file describes the exec example helpers.
HELPER_LABELS = {
    "lean": "lean stdlib exec helper (helpers/examples/cfssl_authsign.py)",
    "go": "compiled Go exec helper (helpers/examples/go/cfssl-authsign)",
}

#: How the result file describes the CA.
CA_LABELS = {
    "local": "local (EC P-256, in the helper's process)",
    "cfssl": "cfssl serve (authsign, plain HTTP)",
    "openbao": "OpenBao dev server (pki/sign, AppRole, plain HTTP)",
}


class BenchError(FleetError, RuntimeError, reason="bench"):
    """The benchmark could not set something up (the message says what)."""


class BenchUsageError(BenchError):
    """The options asked for something the benchmark cannot do (bad usage)."""


@dataclass(slots=True)
class BenchOptions:
    """What one ``provisioner bench`` run is asked for."""

    nodes: int = 1000
    helper_mode: HelperMode = "python"
    #: "reference": the reference helper (placement, CA adapter, templating) in ``helper_mode``;
    #: "lean": helpers/examples/cfssl_authsign.py, a stdlib-only exec helper (needs --ca cfssl);
    #: "go": the same helper compiled from helpers/examples/go/cfssl-authsign (needs Go)
    helper: Literal["reference", "lean", "go"] = "reference"
    ca: CAKind = "local"
    key_type: KeyType = "ec"
    connections: Connections = "per-node"
    sim_processes: int = 2
    name: str | None = None
    results_dir: Path | None = None
    workdir: Path | None = None
    #: nodes in flight in the provisioner (its ``concurrency``)
    concurrency: int = 256
    helper_pool_size: int = 2
    #: exec mode: the reference helper answers through its fork server (a light client per
    #: node; the work is done by a child forked from a warm server)
    helper_fork_server: bool = False
    #: "auto": the auth-callout broker for per-node connections, the static go-choria layout for
    #: shared connections (a shared connection carries many identities, which the callout's
    #: per-identity permissions rightly refuse).
    broker: BrokerKind = "auto"
    callout_mode: Literal["task", "process"] = "process"
    tls: bool = False
    loglevel: str = "warn"
    profile: Profiler = "none"
    floor: bool = True
    floor_seconds: float = 2.0
    #: give up (and report) after this long; None: 120 s + a generous per-node allowance
    timeout: float | None = None
    #: give up (and report) when nothing got provisioned for this long
    stall_timeout: float = 90.0
    seed: int = 0
    restart_delay_scale: float = 1.0
    keep_workdir: bool = False
    #: where the simulated nodes keep their files: "auto" (tmpfs /dev/shm when there is one,
    #: else the work directory), "disk" (the work directory) or a directory path
    sim_dir: str = "auto"

    def effective_timeout(self) -> float:
        if self.timeout is not None:
            return self.timeout
        per_node = 0.3 if self.helper_mode == "exec" else 0.05
        return 120.0 + self.nodes * per_node

    def broker_kind(self) -> Literal["callout", "static"]:
        if self.broker != "auto":
            return self.broker
        return "static" if self.connections == "shared" else "callout"

    def default_name(self) -> str:
        conns = "shared" if self.connections == "shared" else "pernode"
        mode = f"{self.helper}-exec" if self.helper != "reference" else self.helper_mode
        mode += "-fork" if self.helper_fork_server else ""
        return f"{self.nodes}-{mode}-{self.ca}-{self.key_type}-{conns}"

    def validate(self) -> None:
        """Raise :class:`BenchUsageError` naming the option that cannot work."""
        problem = self._choice_problem() or self._combination_problem()
        if problem:
            raise BenchUsageError(problem)

    def _choice_problem(self) -> str | None:
        if self.nodes < 1:
            return "--nodes must be at least 1"
        if self.sim_processes < 1:
            return "--sim-processes must be at least 1"
        choices: tuple[tuple[str, str, tuple[str, ...], str], ...] = (
            ("--helper-mode", self.helper_mode, ("exec", "persistent", "python"),
             "exec, persistent or python"),
            ("--ca", self.ca, ("local", "cfssl", "openbao"), "local, cfssl or openbao"),
            ("--helper", self.helper, ("reference", "lean", "go"), "reference, lean or go"),
        )  # fmt: skip
        for flag, value, allowed, words in choices:
            if value not in allowed:
                return f"{flag} must be {words}"
        if self.helper != "reference" and (self.helper_mode != "exec" or self.ca != "cfssl"):
            return (f"--helper {self.helper} is an exec helper signing through cfssl: "
                    "use it with --helper-mode exec --ca cfssl")  # fmt: skip
        choices = (
            ("--key-type", self.key_type, ("rsa", "ec"), "rsa or ec"),
            ("--connections", self.connections, ("per-node", "shared"), "per-node or shared"),
            ("--broker", self.broker, ("auto", "callout", "static"), "auto, callout or static"),
            ("--callout-mode", self.callout_mode, ("process", "task"), "process or task"),
            ("--profile", self.profile, ("none", "pyinstrument", "cprofile"),
             "none, pyinstrument or cprofile"),
        )  # fmt: skip
        for flag, value, allowed, words in choices:
            if value not in allowed:
                return f"{flag} must be {words}"
        if self.name is not None and not re.fullmatch(r"[A-Za-z0-9._-]{1,80}", self.name):
            return "--name may hold letters, digits, '.', '_' and '-' only"
        return None

    def _combination_problem(self) -> str | None:
        if self.helper_fork_server and (self.helper != "reference" or self.helper_mode != "exec"):
            return "--helper-fork-server needs --helper reference --helper-mode exec"
        if self.connections == "shared" and self.broker == "callout":
            return (
                "--connections shared needs --broker static: a shared connection carries many "
                "node identities and the auth callout grants each connection one identity"
            )
        if self.tls and self.broker_kind() != "callout":
            return "--tls needs the callout broker (per-node connections)"
        per_process = math.ceil(self.nodes / self.sim_processes)
        soft, _hard = nofile_limits()
        if self.connections == "per-node" and soft and per_process + 500 > soft:
            return (
                f"{per_process} per-node connections per simulator process exceed the open-file "
                f"limit ({soft}): use more --sim-processes or --connections shared"
            )
        if self.connections == "per-node" and soft and self.nodes + 1000 > soft:
            return (
                f"{self.nodes} per-node connections exceed the open-file limit ({soft}) that "
                "nats-server and the overlay broker inherit (each holds one socket per node): "
                "raise it (ulimit -n) or use --connections shared"
            )
        return None


def nofile_limits() -> tuple[int, int]:
    """The open-file limits (soft, hard) of this process; (0, 0) when unknown."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        return int(soft), int(hard)
    except (OSError, ValueError):
        return 0, 0


#: Where "auto" looks for a tmpfs, and where the mount table is read.
SHM = Path("/dev/shm")  # noqa: S108 - mkdtemp makes a private 0700 directory inside
MOUNTS = Path("/proc/self/mounts")


def simulator_dir(
    choice: str, workdir: Path, *, shm: Path = SHM, mounts: Path = MOUNTS
) -> tuple[Path, bool]:
    """The simulated nodes' directory, and whether the bench made it outside its workdir.

    Every simulated node writes its certificate, key, CA and configuration; 10,000 nodes on one
    machine turn that into ~2 ms of kernel CPU per node on an ext4 disk (measured here), which
    real nodes, each with its own disk, never put on the provisioner's machine. On tmpfs the
    same writes cost ~0.2 ms. "auto" therefore makes a private directory in ``shm`` when that is
    a writable tmpfs (per the mount table ``mounts``), else uses the work directory.
    """
    if choice == "disk":
        return workdir / "fleet", False
    if choice != "auto":
        return Path(choice).absolute(), False
    if shm.is_dir() and is_tmpfs_path(shm, mounts) and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="provisioner-bench-fleet-", dir=shm)), True
    return workdir / "fleet", False


def is_tmpfs_path(path: Path, mounts: Path = MOUNTS) -> bool:
    """Whether ``path`` lies on a tmpfs mount (the longest mount point that holds it)."""
    try:
        lines = mounts.read_text().splitlines()
    except OSError:
        return False
    best, kind = "", ""
    target = str(path.resolve())
    for line in lines:
        fields = line.split()
        if len(fields) < 3:
            continue
        point = fields[1]
        inside = target == point or target.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best, kind = point, fields[2]
    return kind == "tmpfs"

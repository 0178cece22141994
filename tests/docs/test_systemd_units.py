"""The systemd units in packaging/systemd/: hardened, consistent with the CLI and the sample
configuration, and clean under ``systemd-analyze verify`` and ``systemd-analyze security``."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import typer.main

from provisioner.cli import app
from provisioner.sample_config import render_sample
from tests.support import require_binary

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "packaging" / "systemd"
PROVISIONER = UNITS / "fleet-provisioner.service"
CALLOUT = UNITS / "fleet-provisioner-callout.service"
INSTALLED = "/opt/fleet-provisioner/bin/provisioner"
HINT = "apt-get install systemd (scripts/install does it)"

#: Hardening every unit must carry, as ``key: value``.
HARDENING = {
    "NoNewPrivileges": "yes",
    "ProtectSystem": "strict",
    "ProtectHome": "yes",
    "PrivateTmp": "yes",
    "PrivateDevices": "yes",
    "ProtectKernelTunables": "yes",
    "ProtectKernelModules": "yes",
    "ProtectControlGroups": "yes",
    "RestrictSUIDSGID": "yes",
    "RestrictNamespaces": "yes",
    "CapabilityBoundingSet": "",
    "Restart": "on-failure",
    "UMask": "0077",
}
#: The exposure score ``systemd-analyze security`` may give at most (0 best, 10 worst).
MAX_EXPOSURE = 2.0


def parse_unit(path: Path) -> dict[str, list[str]]:
    """``Section.Key`` → every value it is given (systemd allows repeated keys)."""
    out: dict[str, list[str]] = {}
    section = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = line[1:-1]
            continue
        key, _, value = line.partition("=")
        out.setdefault(f"{section}.{key.strip()}", []).append(value.strip())
    return out


@pytest.mark.parametrize("unit", [PROVISIONER, CALLOUT], ids=lambda p: p.name)
def test_units_are_hardened(unit: Path) -> None:
    d = parse_unit(unit)
    for key, value in HARDENING.items():
        assert d.get(f"Service.{key}") == [value], f"{unit.name}: {key}={value} expected"
    assert d["Service.User"] != ["root"] and d["Service.User"]
    assert d["Service.AmbientCapabilities"] == [""]
    assert "@system-service" in d["Service.SystemCallFilter"]
    assert d["Install.WantedBy"] == ["multi-user.target"]


def test_the_provisioner_may_write_its_audit_log_and_state_only() -> None:
    d = parse_unit(PROVISIONER)
    writable = d["Service.ReadWritePaths"][0].split()
    assert writable == ["/var/lib/fleet-provisioner", "/var/log/fleet-provisioner"]
    assert d["Service.StateDirectory"] == ["fleet-provisioner"]
    assert d["Service.LogsDirectory"] == ["fleet-provisioner"]
    # the sample configuration's audit log lies in a writable path
    audit = re.search(r"^audit_log: (\S+)$", render_sample(admin_token="x" * 43), re.MULTILINE)
    assert audit is not None
    assert any(Path(audit.group(1)).is_relative_to(w) for w in writable)
    # SIGHUP reopens the audit log: the reload sends it
    assert d["Service.ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert "Service.ReadWritePaths" not in parse_unit(CALLOUT)


@pytest.mark.parametrize("unit", [PROVISIONER, CALLOUT], ids=lambda p: p.name)
def test_exec_start_is_a_real_command(unit: Path) -> None:
    words = shlex.split(parse_unit(unit)["Service.ExecStart"][0])
    assert words[0] == INSTALLED
    cmd = typer.main.get_command(app)
    rest = words[1:]
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        cmd = cmd.commands[rest.pop(0)]  # type: ignore[attr-defined]
    ctx = cmd.make_context("provisioner", list(rest), resilient_parsing=True)
    assert Path(ctx.params["config"]).is_absolute()


def _verifiable_copies(tmp_path: Path) -> list[Path]:
    """The units with ExecStart pointing at this checkout's command (verify needs it to exist)."""
    here = Path(sys.executable).parent / "provisioner"
    assert here.exists(), here
    copies = []
    for unit in (PROVISIONER, CALLOUT):
        copy = tmp_path / unit.name
        copy.write_text(unit.read_text().replace(INSTALLED, str(here)))
        copies.append(copy)
    return copies


def _verify(binary: str, units: list[Path]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary, "verify", *map(str, units)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


def test_systemd_analyze_verify_is_clean(tmp_path: Path) -> None:
    binary = require_binary("systemd-analyze", HINT)
    copies = _verifiable_copies(tmp_path)
    r = _verify(binary, copies)
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == "", r.stderr  # verify only warns about bad keys: none allowed
    # the check bites: a misspelt key and a bad value are reported
    bad = tmp_path / "bad.service"
    bad.write_text(
        copies[0]
        .read_text()
        .replace("ProtectSystem=", "ProtectSystm=")
        .replace("Restart=on-failure", "Restart=sometimes")
    )
    r = _verify(binary, [bad])
    assert "ProtectSystm" in r.stderr and "sometimes" in r.stderr


def test_systemd_analyze_security_exposure(tmp_path: Path) -> None:
    binary = require_binary("systemd-analyze", HINT)
    for copy in _verifiable_copies(tmp_path):
        r = subprocess.run(
            [binary, "security", "--offline=yes", "--no-pager", str(copy)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        m = re.search(r"Overall exposure level for \S+: ([0-9.]+)", r.stdout)
        assert m is not None, r.stdout + r.stderr
        assert float(m.group(1)) <= MAX_EXPOSURE, f"{copy.name}: exposure {m.group(1)}"

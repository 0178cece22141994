"""The one error root: every project exception is a FleetError with a reason code."""

from __future__ import annotations

import ast
import builtins
from pathlib import Path

import pytest

from ca_adapters import CAConfigError, CAError, CAVerificationError
from choria_core.errors import FleetError
from choria_core.protocol.errors import ProtocolError
from jwt_tools.tokens import TokenError
from overlays.placer import PlacementError
from provisioner.broker.callout import CalloutConfigError, Refused
from provisioner.config import ConfigError
from provisioner.helper_runner import HelperError

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = (
    "choria_core",
    "jwt_tools",
    "ca_adapters",
    "overlays",
    "helpers",
    "provisioner",
    "node_agent",
    "testbed",
)


def test_class_default_and_instance_override() -> None:
    class Thing(FleetError, ValueError, reason="thing"):
        pass

    assert Thing("x").reason == "thing"
    assert Thing("x", reason="other").reason == "other"
    assert isinstance(Thing("x"), ValueError) and str(Thing("x")) == "x"
    assert FleetError("y").reason == "error"


@pytest.mark.parametrize(
    ("exc", "base", "reason"),
    [
        (ConfigError("m", key="k", file="f"), ValueError, "config"),
        (CalloutConfigError("m"), ValueError, "config"),
        (CAConfigError("m"), ValueError, "config"),
        (ProtocolError("m"), ValueError, "protocol"),
        (PlacementError("m"), ValueError, "placement"),
        (CAError("m"), Exception, "ca"),
        (CAVerificationError("m"), CAError, "ca_verification"),
        (TokenError("m", reason="expired"), Exception, "expired"),
        (HelperError("timeout", "m"), Exception, "timeout"),
        (Refused("no_token", "m"), Exception, "no_token"),
    ],
)
def test_project_errors_keep_their_base_and_have_a_reason(
    exc: FleetError, base: type[BaseException], reason: str
) -> None:
    assert isinstance(exc, FleetError) and isinstance(exc, base)
    assert exc.reason == reason


def _exception_classes() -> list[tuple[str, str, list[str]]]:
    found = []
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            tree = ast.parse(path.read_text(encoding="utf-8"))
            for node in ast.walk(tree):
                if isinstance(node, ast.ClassDef):
                    bases = [ast.unparse(b) for b in node.bases]
                    found.append((str(path.relative_to(ROOT)), node.name, bases))
    return found


def test_every_project_exception_derives_from_fleet_error() -> None:
    """No class derives straight from a builtin exception without FleetError beside it."""
    builtin = {n for n in dir(builtins) if n.endswith(("Error", "Exception"))}
    offenders = [
        f"{path}: {name}({', '.join(bases)})"
        for path, name, bases in _exception_classes()
        if any(b in builtin for b in bases) and "FleetError" not in bases and name != "FleetError"
    ]
    assert offenders == []

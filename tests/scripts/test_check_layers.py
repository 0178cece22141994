"""scripts/check_layers.py: the layer and size rules of docs/architecture.md are enforced."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_layers.py"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_layers", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["check_layers"] = module
    spec.loader.exec_module(module)
    return module


check_layers = _load()


def _tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    for pkg in {rel.split("/")[0] for rel in files}:
        (root / pkg / "__init__.py").touch()
    return root


def _run(root: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), "--root", str(root)],
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_project_tree_keeps_the_rules() -> None:
    result = _run(ROOT)
    assert result.returncode == 0, result.stdout + result.stderr


def test_upward_import_from_jwt_tools_fails_naming_the_module(tmp_path: Path) -> None:
    # The issue's own example: a lint-clean jwt_tools module that imports provisioner.config.
    root = _tree(
        tmp_path,
        {
            "provisioner/config.py": "X = 1\n",
            "jwt_tools/sneaky.py": "from provisioner.config import X\n\nY = X\n",
        },
    )
    result = _run(root)
    assert result.returncode == 1
    assert "jwt_tools/sneaky.py:1: jwt_tools.sneaky imports provisioner.config" in result.stdout


@pytest.mark.parametrize(
    ("source", "offending"),
    [
        ("def f() -> None:\n    import provisioner.service\n", "provisioner.service"),
        (
            "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from testbed import demo\n",
            "testbed",
        ),
        ("from node_agent.node import NodeAgent\n", "node_agent.node"),
    ],
)
def test_function_local_and_type_checking_imports_count(
    tmp_path: Path, source: str, offending: str
) -> None:
    root = _tree(tmp_path, {"overlays/mod.py": source})
    offences = check_layers.check_tree(root)
    assert [o.message.split(": ")[0] for o in offences] == [f"overlays.mod imports {offending}"]


def test_siblings_do_not_import_each_other(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"provisioner/a.py": "import node_agent.keys\n"})
    (offence,) = check_layers.check_tree(root)
    assert "sibling packages" in offence.message


def test_relative_import_resolved_to_its_package(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {"ca_adapters/a.py": "from .b import X\n", "ca_adapters/b.py": "X = 1\n"},
    )
    assert check_layers.check_tree(root) == []


def test_downward_imports_and_the_cli_exception_pass(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "helpers/h.py": "import choria_core.ecdh\nimport jwt_tools.keys\n",
            "provisioner/cli/demo.py": "import testbed.demo\nimport node_agent.node\n",
            "testbed/t.py": "import provisioner.service\n",
        },
    )
    assert check_layers.check_tree(root) == []


def test_cli_exception_does_not_extend_to_the_rest_of_provisioner(tmp_path: Path) -> None:
    root = _tree(tmp_path, {"provisioner/service.py": "import testbed.fleet\n"})
    (offence,) = check_layers.check_tree(root)
    assert "layer 3 (provisioner) may not import layer 4 (testbed)" in offence.message


def test_size_rule(tmp_path: Path) -> None:
    long_function = "def f() -> None:\n" + "    x = 1\n" * 100
    long_class = "class C:\n" + "    x = 1\n" * 400
    root = _tree(
        tmp_path,
        {
            "overlays/f.py": long_function,
            "overlays/c.py": long_class,
            "overlays/m.py": "x = 1\n" * 601,
        },
    )
    messages = sorted(str(o) for o in check_layers.check_tree(root))
    assert messages == [
        "overlays/c.py:1: class C has 401 lines (max 400)",
        "overlays/f.py:1: function f() has 101 lines (max 100)",
        "overlays/m.py:1: module has 601 lines (max 600)",
    ]


def test_exactly_at_the_limits_passes(tmp_path: Path) -> None:
    root = _tree(
        tmp_path,
        {
            "overlays/f.py": "def f() -> None:\n" + "    x = 1\n" * 99,
            "overlays/m.py": "x = 1\n" * 600,
        },
    )
    assert check_layers.check_tree(root) == []


def test_bad_root_is_usage_error(tmp_path: Path) -> None:
    result = _run(tmp_path / "missing")
    assert result.returncode == 2

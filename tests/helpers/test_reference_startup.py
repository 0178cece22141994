"""Start-up cost of the reference helper in exec mode: a request imports only what it needs.

Exec mode starts one process per node, so every module imported at start-up is paid per node.
These tests run the real helper's entry point (`helpers.reference.__main__`) in a subprocess
and assert which modules were loaded: a local-CA request must not load the
remote CA stack (httpx, cfssl, Vault), nats (KV ledger), drain planning or any server framework.
They fail if someone re-adds a top-level import of one of those, without measuring time.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

import ca_adapters
import overlays
from ca_adapters import LocalCA
from helpers.models import HelperInput
from helpers.reference import example_config_path, make_handler
from node_agent.facts import synthetic_facts, synthetic_identity
from provisioner.cli.helper import synthetic_csr
from provisioner.helper_runner import PythonHelper

REPO = Path(__file__).resolve().parents[2]

#: Never needed by a local-CA, in-memory-ledger request.
FORBIDDEN_FOR_LOCAL = (
    "httpx",
    "httpcore",
    "nats",
    "fastapi",
    "uvicorn",
    "starlette",
    "ca_adapters._http",
    "ca_adapters.cfssl",
    "ca_adapters.vault",
    "overlays.kvledger",
    "overlays.drain",
)


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    LocalCA.generate("ec", common_name="Startup Test CA").write(d)
    return d


def write_config(tmp_path: Path, ca: dict[str, Any], **rules: Any) -> Path:
    cfg = yaml.safe_load(example_config_path().read_text())
    cfg["ca"] = ca
    cfg["rules"].update(rules)
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def local_ca(ca_dir: Path) -> dict[str, Any]:
    return {"type": "local", "cert": str(ca_dir / "ca.pem"), "key": str(ca_dir / "ca-key.pem")}


def node_input(i: int = 0) -> HelperInput:
    ident = synthetic_identity(i)
    return HelperInput.synthetic(ident, synthetic_facts(i), csr=synthetic_csr(ident))


#: Runs the helper's real entry point, then reports every module loaded (sys.modules, which also
#: sees modules loaded through importlib, unlike `-X importtime`).
_RUNNER = (
    "import atexit, runpy, sys\n"
    "def report():\n"
    "    sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n"
    "atexit.register(report)\n"
    "sys.argv = ['helpers.reference', '--config', sys.argv[1]]\n"
    "runpy.run_module('helpers.reference', run_name='__main__', alter_sys=True)\n"
)


def run_exec(config: Path, stdin: bytes) -> tuple[int, bytes, set[str]]:
    """Run the helper once in exec mode; returns (exit code, stdout, modules loaded)."""
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(config)],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        timeout=60,
        check=False,
    )
    found = re.findall(rb"^MODULES (.*)$", proc.stderr, re.MULTILINE)
    assert found, proc.stderr[-2000:]
    modules = set(found[-1].decode().split())
    # Top-level package names too: "nats" is loaded if any "nats.*" is.
    modules |= {m.split(".", 1)[0] for m in modules}
    return proc.returncode, proc.stdout, modules


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def test_local_ca_request_imports_no_remote_stack(tmp_path: Path, ca_dir: Path) -> None:
    rc, out, modules = run_exec(
        write_config(tmp_path, local_ca(ca_dir)), node_input().model_dump_json().encode()
    )
    assert rc == 0
    result = json.loads(out)
    assert result["defer"] is False and result["shutdown"] is False
    assert result["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    # The request really went through placement and the local CA (the test is not vacuous).
    assert {"ca_adapters.local", "ca_adapters.factory", "overlays.placer"} <= modules
    assert not modules & set(FORBIDDEN_FOR_LOCAL), sorted(modules & set(FORBIDDEN_FOR_LOCAL))


def test_hostile_input_is_refused_without_loading_remote_stack(
    tmp_path: Path, ca_dir: Path
) -> None:
    """A node sending a CSR for another identity is still refused; lazy imports change nothing."""
    inp = json.loads(node_input(1).model_dump_json())
    inp["identity"] = "victim.example.net"
    rc, out, modules = run_exec(write_config(tmp_path, local_ca(ca_dir)), json.dumps(inp).encode())
    result = json.loads(out) if rc == 0 and out.strip() else {}
    assert not result.get("certificate"), "a certificate was issued for a CSR naming another node"
    assert not modules & set(FORBIDDEN_FOR_LOCAL)


@pytest.mark.parametrize("kind", ["cfssl", "vault"])
def test_remote_ca_loads_its_stack_on_demand(tmp_path: Path, kind: str) -> None:
    """The lazy path still works: a remote CA gets httpx, and an outage is a retryable defer."""
    ca: dict[str, Any] = {"type": kind, "url": f"http://127.0.0.1:{closed_port()}"}
    if kind == "vault":
        ca["token"] = "s.test-token"
    cfg = write_config(tmp_path, ca)
    rc, out, modules = run_exec(cfg, node_input().model_dump_json().encode())
    assert rc == 0
    result = json.loads(out)
    assert result["defer"] is True and not result["certificate"]
    assert "s.test-token" not in result["msg"]
    assert {"httpx", f"ca_adapters.{kind}"} <= modules
    assert "nats" not in modules and "fastapi" not in modules


async def test_exec_output_is_the_same_bytes_as_in_process(tmp_path: Path, ca_dir: Path) -> None:
    """Deterministic decisions (no certificate) are byte-identical between exec and python mode."""
    cfg = write_config(tmp_path, local_ca(ca_dir), shutdown_facts={"role": "backend"})
    inp = node_input(0)
    assert inp.facts()["role"] == "backend"
    rc, out, _ = run_exec(cfg, inp.model_dump_json().encode())
    assert rc == 0
    expected = await PythonHelper(make_handler(cfg)).run(inp)
    assert expected.shutdown is True
    assert out == expected.to_json().encode() + b"\n"


@pytest.mark.parametrize("package", [ca_adapters, overlays])
def test_lazy_exports_resolve_to_the_real_objects(package: Any) -> None:
    import importlib

    for name in package.__all__:
        value = getattr(package, name)
        home = importlib.import_module(package._EXPORTS[name], package.__name__)
        assert value is getattr(home, name)
    assert set(package.__all__) <= set(dir(package))
    with pytest.raises(AttributeError):
        _ = package.no_such_export

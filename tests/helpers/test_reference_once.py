"""The reference helper's per-node shortcuts: one inventory parse, no reloading in the python
entry point, versions compared through a bounded memory. Real configuration, CA and CSRs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from ca_adapters import LocalCA
from helpers import reference
from helpers.models import HelperInput, decision
from helpers.reference import CONFIG_ENV, example_config_path, handler, make_handler
from helpers.reference import rules as rules_module
from helpers.reference.rules import _version_tuple, version_tuple
from node_agent.facts import synthetic_facts, synthetic_identity
from provisioner.cli.helper import synthetic_csr


def _config(tmp_path: Path) -> Path:
    ca = LocalCA.generate("ec", common_name="Once CA")
    ca.write(tmp_path / "ca")
    cfg = yaml.safe_load(example_config_path().read_text())
    cfg["ca"] = {
        "type": "local",
        "cert": str(tmp_path / "ca/ca.pem"),
        "key": str(tmp_path / "ca/ca-key.pem"),
    }
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def _input(i: int) -> HelperInput:
    ident = synthetic_identity(i)
    return HelperInput.synthetic(ident, synthetic_facts(i), csr=synthetic_csr(ident))


async def test_the_inventory_is_parsed_once_per_node(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    handle = make_handler(_config(tmp_path))
    parses = []
    real_loads = json.loads

    def counting_loads(text, *a, **kw):  # type: ignore[no-untyped-def]
        parses.append(text)
        return real_loads(text, *a, **kw)

    inp = _input(3)
    monkeypatch.setattr("helpers.models.json.loads", counting_loads)
    out = await handle(inp)
    assert decision(out) == "configure", out.msg
    assert parses.count(inp.inventory) == 1
    assert out.overlay is not None


async def test_the_python_entry_point_loads_its_configuration_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = _config(tmp_path)
    monkeypatch.setenv(CONFIG_ENV, str(path))
    monkeypatch.setattr(reference, "_shared", {})
    import helpers.reference.config as config_module

    loads = []
    real = config_module.load_reference_config

    def counting(p):  # type: ignore[no-untyped-def]
        loads.append(p)
        return real(p)

    monkeypatch.setattr(config_module, "load_reference_config", counting)
    for i in range(3):
        out = await handler(_input(i))
        assert decision(out) == "configure", out.msg
    assert loads == [str(path)]
    monkeypatch.delenv(CONFIG_ENV)
    with pytest.raises(Exception, match=CONFIG_ENV):
        await handler(_input(4))


def test_versions_are_compared_through_a_bounded_memory() -> None:
    rules_module._cached_version_tuple.cache_clear()
    for text in ("0.29.4", "v1.2.3-rc1", "0.99.0.20221129", "1.2+build.7", "", "x"):
        assert version_tuple(text) == _version_tuple(text)
        assert version_tuple(text) == _version_tuple(text)
    assert version_tuple("0.29.4") == (0, 29, 4)
    info = rules_module._cached_version_tuple.cache_info()
    assert info.hits == 7 and info.maxsize == 256
    long_text = "1." * 100
    assert version_tuple(long_text) == (1,) * 100
    assert rules_module._cached_version_tuple.cache_info().currsize == 6  # not remembered

"""The reference helper's exec fast path gives the full path's output and errors (issue 18).

The fast path (`helpers/reference/fast.py`) answers exec-mode requests from a pre-parsed
configuration, without pydantic. These tests compare it with the full path (the pydantic
models, `ReferenceHelper`, the real `overlays.Placer`):

- in process, over many nodes and configurations (rules, rankers, pins, regions, templates,
  policies, ed25519 nodes): the same output bytes, the certificate aside (its serial and
  dates are random), which must carry the same names and chain to the same CA;
- through the real entry point in subprocesses: the same bytes for a deterministic decision,
  the same exit code and error line for bad input, a request answered without pydantic;
- the cache's safety: tight permissions, ignored when corrupt, foreign or stale, never
  written for configurations holding secrets.
"""

from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from ca_adapters import LocalCA
from helpers.models import CSRInput, Ed25519Input, HelperInput
from helpers.reference import example_config_path, load_reference_config
from helpers.reference import fast as fastmod
from helpers.reference.helper import ReferenceHelper
from node_agent.facts import synthetic_facts, synthetic_identity
from provisioner.cli.helper import synthetic_csr

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca")
    LocalCA.generate("ec", common_name="Fast Path Test CA").write(d)
    return d


@pytest.fixture(autouse=True)
def cache_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    d = tmp_path / "cache"
    monkeypatch.setenv(fastmod.CACHE_ENV, str(d))
    return d


CUSTOM_OVERLAYS = {
    "overlays": [
        {"name": "a1", "region": "r-a", "brokers": ["nats://a1.example.net:4222"], "weight": 2},
        {"name": "a2", "region": "r-a", "brokers": ["nats://a2.example.net:4222"]},
        {"name": "b1", "region": "r-b", "brokers": ["nats://b1.example.net:4222"]},
        {
            "name": "c1",
            "region": "r-c",
            "brokers": ["nats://c1.example.net:4222"],
            "state": "cordoned",
        },
        {"name": "z0", "region": "r-z", "brokers": ["nats://z0.example.net:4222"], "capacity": 0},
    ],
}


def custom_registry(tmp_path: Path, **placement: Any) -> str:
    path = tmp_path / f"overlays-{len(list(tmp_path.glob('overlays-*')))}.yaml"
    path.write_text(yaml.safe_dump({**CUSTOM_OVERLAYS, "placement": placement}))
    return path.name


def write_config(tmp_path: Path, ca_dir: Path, **changes: Any) -> Path:
    cfg = yaml.safe_load(example_config_path().read_text())
    cfg["ca"] = {"type": "local", "cert": str(ca_dir / "ca.pem"), "key": str(ca_dir / "ca-key.pem")}
    for key, value in changes.items():
        if isinstance(value, dict) and isinstance(cfg.get(key), dict):
            cfg[key].update(value)
        else:
            cfg[key] = value
    path = tmp_path / "reference.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def node(i: int, *, version: str = "0.29.4", kind: str = "csr", **facts: Any) -> HelperInput:
    ident = synthetic_identity(i)
    all_facts = {**synthetic_facts(i), **facts}
    if kind == "csr":
        return HelperInput.synthetic(ident, all_facts, csr=synthetic_csr(ident), version=version)
    inp = HelperInput.synthetic(ident, all_facts, version=version)
    if kind == "ed25519":
        inp.ed25519_pubkey = Ed25519Input(public_key="ab" * 32, directory=f"/opt/n{i % 2 or ''}")
    return inp


def normalised(text: str, ca_pem: str) -> dict[str, Any]:
    """The output object with the certificate replaced by what must not vary."""
    obj = json.loads(text)
    if obj.get("certificate"):
        cert = x509.load_pem_x509_certificate(obj["certificate"].encode())
        issuer = x509.load_pem_x509_certificate(ca_pem.encode())
        cert.verify_directly_issued_by(issuer)
        sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        obj["certificate"] = {
            "cn": cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value,
            "sans": sans.get_values_for_type(x509.DNSName),
            "issuer": cert.issuer.rfc4514_string(),
            "days": round((cert.not_valid_after_utc - cert.not_valid_before_utc).days / 10),
        }
    return obj


async def compare(cfg_path: Path, inputs: list[HelperInput]) -> list[dict[str, Any]]:
    """Run every input through both paths (a fresh helper each, as exec mode does)."""
    cfg = load_reference_config(cfg_path)
    entry = fastmod.build_cache(cfg_path, cfg, ReferenceHelper(cfg))
    assert entry is not None, "this configuration should be served by the fast path"
    entry = json.loads(json.dumps(entry))  # exactly what the cache file holds
    ca_pem = Path(entry["ca"]["cert"]).read_text()
    outs = []
    for inp in inputs:
        helper = ReferenceHelper(cfg)
        full = (await helper.decide(inp)).to_json()
        data = json.loads(inp.model_dump_json())
        assert fastmod.plainly_valid(data)
        quick = fastmod.decide(entry, data)
        if not json.loads(full).get("certificate"):
            assert quick == full, inp.identity
        got, want = normalised(quick, ca_pem), normalised(full, ca_pem)
        assert got == want, inp.identity
        outs.append(want)
    return outs


async def test_sample_fleet_same_output(tmp_path: Path, ca_dir: Path) -> None:
    cfg = write_config(
        tmp_path,
        ca_dir,
        certificate={"extra_dns_sans": ["{overlay}.{facts[customer]}.example.net"], "ttl": "30d"},
        ssldir="/var/lib/choria/ssl",
    )
    inputs = [node(i) for i in range(60)]
    inputs += [node(60, customer="cust-007"), node(61, region="nowhere")]
    inp = node(62)
    assert inp.csr is not None
    inp.csr = CSRInput(csr=inp.csr.csr, public_key=inp.csr.public_key, ssldir="")
    inputs.append(inp)
    outs = await compare(cfg, inputs)
    assert len({o["overlay"] for o in outs}) >= 3, "the cases must cover several overlays"
    assert any("pin " in o["msg"] for o in outs) and all(o["certificate"] for o in outs)


@pytest.mark.parametrize(
    "placement",
    [
        {"policies": ["stable", "region", "least_filled"], "region_fact": "region"},
        {"policies": ["region", "weighted"], "region_fact": "region", "region_mode": "require"},
        {
            "policies": ["pinned", "hash"],
            "pins": [
                {"match": {"role": ["web*", "db"]}, "overlays": ["c1", "b1"], "strict": False}
            ],
        },
        {
            "policies": ["stable", "pinned", "affinity", "weighted"],
            "affinity": "customer",
            "pins": [{"name": "p", "match": {"os.family": "*"}, "overlay": "a2"}],
        },
        {"policies": ["affinity", "hash"], "affinity": "service"},
    ],
)
async def test_custom_registries_same_output(
    tmp_path: Path, ca_dir: Path, placement: dict[str, Any]
) -> None:
    cfg = write_config(tmp_path, ca_dir, overlays=custom_registry(tmp_path, **placement))
    regions = ["r-a", "r-b", "r-c", "r-z"]
    inputs = [node(i, region=regions[i % 4]) for i in range(24)]
    await compare(cfg, inputs)


async def test_rules_templates_policies_and_ed25519_same_output(
    tmp_path: Path, ca_dir: Path
) -> None:
    (tmp_path / "default.policy").write_text("policy default deny\n")
    (tmp_path / "main.rego").write_text("package choria\n")
    cfgs: list[dict[str, Any]] = [
        {
            "rules": {
                "shutdown_facts": {"role": "backend"},
                "require_facts": {"environment": "production"},
            }
        },
        {"rules": {"min_version": "0.29.5", "too_old_action": "upgrade", "upgrade_to": "0.30.0"}},
        {"rules": {"min_version": "1.0", "too_old_action": "shutdown"}},
        {"rules": {"min_version": "0.29.4", "retry_after": 17}},
        {
            "policies": {
                "action_policies": {"default.policy": "default.policy"},
                "opa_policies": {"main.rego": "main.rego"},
            },
            "configuration": {
                "x.site": "{facts[datacenter]}-{facts[missing]}-{facts[os]}",
                "x.n": 5,
                "x.b": True,
            },
            "overlay_configuration": {"eu-west-1": {"x.eu": "{region}/{brokers}"}},
            "collectives": ["c1", "c2"],
            "main_collective": "",
        },
    ]
    for n, changes in enumerate(cfgs):
        d = tmp_path / f"c{n}"
        d.mkdir()
        for f in ("default.policy", "main.rego"):
            (d / f).write_text((tmp_path / f).read_text())
        cfg = write_config(d, ca_dir, **changes)
        inputs = [node(i, version=v) for i, v in enumerate(["0.29.4", "0.28.0", "v1.2.3-rc1", ""])]
        inputs += [node(10 + i, kind=k) for i, k in enumerate(["ed25519", "none", "ed25519"])]
        inputs[1] = HelperInput.synthetic(
            inputs[1].identity, synthetic_facts(1), csr=inputs[1].csr, version="0.1"
        ).model_copy(
            update={
                "inventory": inputs[1].inventory.replace('"upgradable":true', '"upgradable":false')
            }
        )
        inputs.append(inputs[0].model_copy(update={"inventory": "not json"}))
        inputs.append(inputs[0].model_copy(update={"inventory": ""}))
        await compare(cfg, inputs)


# -- the real entry point ---------------------------------------------------------------------

_RUNNER = (
    "import atexit, runpy, sys\n"
    "def report():\n"
    "    sys.stderr.write('\\nMODULES ' + ' '.join(sorted(sys.modules)) + '\\n')\n"
    "atexit.register(report)\n"
    "sys.argv = ['helpers.reference', '--config', sys.argv[1]]\n"
    "runpy.run_module('helpers.reference', run_name='__main__', alter_sys=True)\n"
)


def run_exec(config: Path, stdin: bytes, cache: str) -> tuple[int, bytes, str, set[str]]:
    env = {**os.environ, fastmod.CACHE_ENV: cache}
    env.pop("PROVISIONER_HELPER_MODE", None)
    proc = subprocess.run(
        [sys.executable, "-c", _RUNNER, str(config)],
        input=stdin,
        capture_output=True,
        cwd=REPO,
        env=env,
        timeout=120,
        check=False,
    )
    err = proc.stderr.decode(errors="replace")
    found = re.findall(r"^MODULES (.*)$", err, re.MULTILINE)
    assert found, err[-2000:]
    errors = [ln for ln in err.splitlines() if ln.startswith(("helper error", "reference helper"))]
    return proc.returncode, proc.stdout, "\n".join(errors), set(found[-1].split())


def test_exec_fast_path_answers_without_pydantic(
    tmp_path: Path, ca_dir: Path, cache_dir: Path
) -> None:
    cfg = write_config(tmp_path, ca_dir, rules={"shutdown_facts": {"role": "backend"}})
    inp = node(0)
    assert inp.facts()["role"] == "backend"
    data = inp.model_dump_json().encode()
    rc_full, out_full, _, mods_full = run_exec(cfg, data, "off")
    rc1, out1, _, mods1 = run_exec(cfg, data, str(cache_dir))  # full path, writes the cache
    rc2, out2, _, mods2 = run_exec(cfg, data, str(cache_dir))  # fast path
    assert rc_full == rc1 == rc2 == 0
    assert out_full == out1 == out2 and json.loads(out2)["shutdown"] is True
    assert "pydantic" in mods_full and "pydantic" in mods1
    assert "pydantic" not in mods2 and "yaml" not in mods2, "the fast path was not used"
    # A signed node goes through the local CA on the fast path too.
    signed = node(3)
    rc, out, _, mods = run_exec(cfg, signed.model_dump_json().encode(), str(cache_dir))
    assert rc == 0 and "pydantic" not in mods and "ca_adapters.local" in mods
    assert json.loads(out)["certificate"].startswith("-----BEGIN CERTIFICATE-----")
    files = list(cache_dir.iterdir())
    assert len(files) == 1
    assert stat.S_IMODE(cache_dir.stat().st_mode) == 0o700
    assert stat.S_IMODE(files[0].stat().st_mode) == 0o600


def _other_key_csr(identity: str) -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    from cryptography.hazmat.primitives import hashes, serialization

    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, identity)]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def test_bad_input_gives_the_same_errors(tmp_path: Path, ca_dir: Path, cache_dir: Path) -> None:
    cfg = write_config(tmp_path, ca_dir)
    good = json.loads(node(1).model_dump_json())
    assert run_exec(cfg, json.dumps(good).encode(), str(cache_dir))[0] == 0  # cache written
    assert list(cache_dir.iterdir())
    cases: list[bytes] = [
        b"not json",
        b"[1, 2]",
        json.dumps({**good, "identity": 5}).encode(),
        json.dumps({k: v for k, v in good.items() if k != "identity"}).encode(),
        json.dumps({**good, "csr": {"csr": 7}}).encode(),
        json.dumps({**good, "csr": "text"}).encode(),
        json.dumps({**good, "inventory": {"facts": {}}}).encode(),
        json.dumps({**good, "jwt": "x"}).encode(),
        json.dumps({**good, "ed25519_pubkey": {"directory": "/x"}, "csr": None}).encode(),
        json.dumps({**good, "identity": "victim.example.net"}).encode(),
        json.dumps({**good, "csr": {**good["csr"], "csr": "-----BEGIN NOTHING-----"}}).encode(),
        json.dumps({**good, "identity": ""}).encode(),
        json.dumps(
            {**good, "csr": {**good["csr"], "csr": _other_key_csr("other.example.net")}}
        ).encode(),
    ]
    for data in cases:
        rc_full, out_full, err_full, _ = run_exec(cfg, data, "off")
        rc_fast, out_fast, err_fast, _ = run_exec(cfg, data, str(cache_dir))
        assert rc_full != 0 or not json.loads(out_full).get("certificate"), data[:80]
        assert (rc_fast, out_fast, err_fast) == (rc_full, out_full, err_full), data[:80]
        assert err_full or rc_full == 0


# -- the cache --------------------------------------------------------------------------------


async def test_cache_refuses_corrupt_foreign_and_stale_entries(
    tmp_path: Path, ca_dir: Path, cache_dir: Path
) -> None:
    cfg_path = write_config(tmp_path, ca_dir)
    cfg = load_reference_config(cfg_path)
    assert fastmod.write_cache(cfg_path, cfg, ReferenceHelper(cfg)) is not None
    target = fastmod.cache_file(cfg_path)
    assert target is not None and fastmod.load_cache(cfg_path) is not None
    good = target.read_bytes()

    for bad in (b"", b"{", b"[]", b'{"format": 1}', good.replace(b'"format": 1', b'"format": 0')):
        target.write_bytes(bad)
        assert fastmod.load_cache(cfg_path) is None
    target.write_bytes(good)
    os.chmod(target, 0o666)
    assert fastmod.load_cache(cfg_path) is None, "a world-writable cache must be ignored"
    os.chmod(target, 0o600)
    assert fastmod.load_cache(cfg_path) is not None
    os.chmod(target.parent, 0o777)
    assert fastmod.load_cache(cfg_path) is None, "a world-writable cache directory is ignored"
    os.chmod(target.parent, 0o700)
    assert fastmod.load_cache(cfg_path) is not None
    # Same size, same second: the content key still sees the edit.
    text = cfg_path.read_text()
    cfg_path.write_text(text.replace("loglevel: info", "loglevel: warn"))
    assert fastmod.load_cache(cfg_path) is None
    # Another configuration file never uses this one's entry.
    other = tmp_path / "other.yaml"
    other.write_text(cfg_path.read_text())
    assert fastmod.load_cache(other) is None


def test_corrupt_cache_falls_back_and_is_rewritten(
    tmp_path: Path, ca_dir: Path, cache_dir: Path
) -> None:
    cfg = write_config(tmp_path, ca_dir)
    data = node(4).model_dump_json().encode()
    assert run_exec(cfg, data, str(cache_dir))[0] == 0
    target = fastmod.cache_file(cfg)
    assert target is not None
    target.write_bytes(b'{"format": 1, "deps": [[')
    rc, out, _, mods = run_exec(cfg, data, str(cache_dir))
    assert rc == 0 and json.loads(out)["certificate"] and "pydantic" in mods
    assert fastmod.load_cache(cfg) is not None, "the full path rewrites a broken cache"


@pytest.mark.parametrize(
    "ca",
    [
        {"key_password": "s3cret-pass"},
        {"key_password_env": "CA_PASS"},
        {"type": "cfssl", "url": "http://127.0.0.1:1"},
        {"guard": {"rate_per_s": 5}},
    ],
)
def test_secrets_and_remote_cas_are_never_cached(
    tmp_path: Path, ca_dir: Path, ca: dict[str, Any]
) -> None:
    base = {"type": "local", "cert": str(ca_dir / "ca.pem"), "key": str(ca_dir / "ca-key.pem")}
    cfg_path = write_config(tmp_path, ca_dir, ca={**base, **ca})
    cfg = load_reference_config(cfg_path)
    assert fastmod.build_cache(cfg_path, cfg, ReferenceHelper(cfg)) is None
    assert fastmod.write_cache(cfg_path, cfg, ReferenceHelper(cfg)) is None
    assert fastmod.load_cache(cfg_path) is None

"""Provisioner configuration: anchor keys, defaults, checks, errors naming key and file."""

from __future__ import annotations

import os
import textwrap
from pathlib import Path
from typing import Any

import pytest

from provisioner.config import (
    DEFAULT_CERT_DENY_LIST,
    ConfigError,
    ProvisionerConfig,
    load_config,
)

HEXKEY = "e72cba5268b34627b75c5ceae9449ad16d62f15f862c30d4e0e7d2588e2e6259"


def _write(tmp_path: Path, text: str, name: str = "provisioner.yaml") -> Path:
    p = tmp_path / name
    p.write_text(textwrap.dedent(text))
    return p


def _error(tmp_path: Path, text: str, **kw: Any) -> ConfigError:
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path, **kw)
    assert str(path) in str(info.value)  # every error names the file
    return info.value


# --- anchor keys ----------------------------------------------------------------------------

ANCHOR_YAML = f"""\
workers: 4
interval: 10m
logfile: /dev/stdout
loglevel: warn
helper: /etc/choria-provisioner/helper.rb
token: s3cret
lifecycle_component: my_component
choria_insecure: true
site: testing
monitor_port: 8080
broker_port: 4222
broker_provisioning_password: brokers3cret
cert_deny_list:
  - "\\\\.bad$"
jwt_verify_cert: {HEXKEY}
jwt_signing_key: /etc/choria-provisioner/signer.seed
jwt_signing_token: /etc/choria-provisioner/signer.jwt
server_jwt_validity: 30d
rego_policy: /etc/choria-provisioner/policy.rego
leader_election: true
upgrades_repository: https://repo.example.net/choria
upgrades_optional: true
features:
  pki: false
  jwt: true
  ed25519: true
  upgrades: true
"""


def test_every_anchor_key_accepted(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ANCHOR_YAML))
    assert cfg.workers == 4
    assert cfg.interval == 600
    assert cfg.logfile == "/dev/stdout"
    assert cfg.loglevel == "warn"
    assert cfg.helper == "/etc/choria-provisioner/helper.rb"
    assert cfg.token == "s3cret"
    assert cfg.lifecycle_component == "my_component"
    assert cfg.choria_insecure is True
    assert cfg.site == "testing"
    assert cfg.monitor_port == 8080
    assert cfg.broker_port == 4222
    assert cfg.broker_provisioning_password == "brokers3cret"
    assert cfg.cert_deny_list == [r"\.bad$"]
    assert cfg.jwt_verify_cert == HEXKEY  # inline hex key is not treated as a path
    assert cfg.jwt_signing_key == "/etc/choria-provisioner/signer.seed"
    assert cfg.jwt_signing_token == "/etc/choria-provisioner/signer.jwt"
    assert cfg.server_jwt_validity == 30 * 86400
    assert cfg.rego_policy == "/etc/choria-provisioner/policy.rego"
    assert cfg.leader_election is True
    assert cfg.upgrades_repository == "https://repo.example.net/choria"
    assert cfg.upgrades_optional is True
    assert cfg.features.model_dump() == {
        "pki": False,
        "jwt": True,
        "ed25519": True,
        "upgrades": True,
    }
    assert cfg.source_file == (tmp_path / "provisioner.yaml").resolve()


def test_secrets_not_in_repr(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ANCHOR_YAML))
    assert "s3cret" not in repr(cfg) and "brokers3cret" not in repr(cfg)


def test_anchor_documentation_example_loads(tmp_path: Path) -> None:
    # the "Common Settings" example from the choria-io/provisioner docs
    cfg = load_config(
        _write(
            tmp_path,
            f"""\
            workers: 4
            interval: 1m
            logfile: /dev/stdout
            loglevel: warn
            helper: /etc/choria-provisioner/provisioner/helper.rb
            token: s3cret
            site: testing
            broker_provisioning_password: s3cret
            jwt_verify_cert: {HEXKEY}
            jwt_signing_key: /etc/choria-provisioner/credentials/signer.seed
            jwt_signing_token: /etc/choria-provisioner/credentials/signer.jwt

            features:
              jwt: true
              ed25519: true
            """,
        )
    )
    assert cfg.features.ed25519 and cfg.features.jwt and not cfg.features.pki


def test_anchor_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "{}\n"))
    assert cfg.workers == (os.cpu_count() or 1)
    assert cfg.interval == 60
    assert cfg.logfile is None
    assert cfg.loglevel == "info"
    assert cfg.helper == ""
    assert cfg.token == ""
    assert cfg.lifecycle_component == "provision_mode_server"
    assert cfg.choria_insecure is False
    assert cfg.site == ""
    assert cfg.monitor_port == 0
    assert cfg.broker_port == 0
    assert cfg.broker_provisioning_password == ""
    assert cfg.cert_deny_list == [
        r"\.privileged.mcollective$",
        r"\.privileged.choria$",
        r"\.mcollective$",
        r"\.choria$",
    ]
    assert cfg.jwt_verify_cert == cfg.jwt_signing_key == cfg.jwt_signing_token == ""
    assert cfg.server_jwt_validity == 365 * 86400
    assert cfg.rego_policy == ""
    assert cfg.leader_election is False
    assert cfg.upgrades_repository == ""
    assert cfg.upgrades_optional is False
    assert cfg.features.model_dump() == {
        "pki": False,
        "jwt": True,  # ours: on unless set (the anchor's is false); explicit false is honoured
        "ed25519": False,
        "upgrades": False,
    }


def test_our_defaults(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, ""))  # an empty file is an empty mapping
    assert cfg.identity
    assert cfg.broker_urls == ["nats://127.0.0.1:4222"]
    assert cfg.broker_user == "provisioner"
    assert cfg.tls.model_dump() == {"ca": None, "cert": None, "key": None, "verify": True}
    assert cfg.helper_mode == "exec" and cfg.helper_args == []
    assert cfg.helper_timeout == 10 and cfg.helper_max_output == 1024 * 1024
    assert cfg.helper_pool_size == 4
    assert cfg.concurrency == 256 and cfg.queue_size == 200_000 and cfg.rpc_timeout == 22
    assert cfg.audit_log is None and cfg.overlays is None
    assert cfg.admin.model_dump() == {
        "enabled": True,
        "host": "127.0.0.1",
        "port": 0,
        "token": None,
    }
    assert cfg.election.bucket == "CHORIA_LEADER_ELECTION" and cfg.election.ttl == 3


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("workers: 0\n", os.cpu_count() or 1),  # anchor: 0 means one per CPU
        ("lifecycle_component: ''\n", "provision_mode_server"),
        ("cert_deny_list: []\n", list(DEFAULT_CERT_DENY_LIST)),
        ("server_jwt_validity: ''\n", 365 * 86400),
        ("loglevel: DEBUG\n", "debug"),
    ],
)
def test_anchor_empty_values_mean_defaults(tmp_path: Path, text: str, expected: Any) -> None:
    cfg = load_config(_write(tmp_path, text))
    key = text.split(":")[0]
    assert getattr(cfg, key) == expected


def test_ed25519_implies_jwt(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "features: {ed25519: true}\n"))
    assert cfg.features.jwt is True
    assert ProvisionerConfig(features={"ed25519": True}).features.jwt is True  # type: ignore[arg-type]


def test_pki_and_ed25519_refused(tmp_path: Path) -> None:
    err = _error(tmp_path, "features: {pki: true, ed25519: true}\n")
    assert err.key == "features"
    assert "pki" in str(err) and "ed25519" in str(err)
    with pytest.raises(ValueError, match="pki or ed25519"):
        ProvisionerConfig(features={"pki": True, "ed25519": True})  # type: ignore[arg-type]


@pytest.mark.parametrize("interval", ["30s", "59s", "1s", 30])
def test_interval_below_one_minute_refused(tmp_path: Path, interval: Any) -> None:
    err = _error(tmp_path, f"interval: {interval}\n")
    assert err.key == "interval"
    assert "interval" in str(err) and "1 minute" in str(err)


@pytest.mark.parametrize("bad", ["a.b", "a*", "a>", "provision.mode"])
def test_bad_lifecycle_component_refused(tmp_path: Path, bad: str) -> None:
    err = _error(tmp_path, f"lifecycle_component: '{bad}'\n")
    assert err.key == "lifecycle_component"
    assert bad in str(err)


def test_unknown_key_refused_with_suggestion(tmp_path: Path) -> None:
    err = _error(tmp_path, "intervall: 5m\n")
    assert err.key == "intervall"
    assert "unknown key" in str(err) and "did you mean 'interval'" in str(err)


def test_unknown_nested_key_refused(tmp_path: Path) -> None:
    err = _error(tmp_path, "features:\n  ed2519: true\n")
    assert err.key == "features.ed2519"
    assert "did you mean 'features.ed25519'" in str(err)


def test_unknown_key_without_close_match(tmp_path: Path) -> None:
    err = _error(tmp_path, "zzz_totally_new: 1\n")
    assert err.key == "zzz_totally_new" and "did you mean" not in str(err)


def test_all_problems_listed(tmp_path: Path) -> None:
    err = _error(tmp_path, "interval: 1s\nworkers: -1\nconcurrency: 0\n")
    keys = {k for k, _ in err.problems}
    assert keys == {"interval", "workers", "concurrency"}
    assert "3 problems" in str(err)


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("interval: soon\n", "interval"),
        ("workers: many\n", "workers"),
        ("workers: -2\n", "workers"),
        ("monitor_port: 70000\n", "monitor_port"),
        ("broker_port: -1\n", "broker_port"),
        ("choria_insecure: maybe\n", "choria_insecure"),
        ("cert_deny_list: ['(unclosed']\n", "cert_deny_list"),
        ("cert_deny_list: 5\n", "cert_deny_list"),
        ("server_jwt_validity: 1x\n", "server_jwt_validity"),
        ("server_jwt_validity: '0'\n", "server_jwt_validity"),
        ("loglevel: chatty\n", "loglevel"),
        ("leader_election: [1]\n", "leader_election"),
        ("upgrades_optional: {a: 1}\n", "upgrades_optional"),
        ("features: {jwt: sure}\n", "features.jwt"),
        ("features: 5\n", "features"),
        ("broker_urls: []\n", "broker_urls"),
        ("broker_urls: ['http://x:1']\n", "broker_urls"),
        ("helper_mode: fork\n", "helper_mode"),
        ("helper_timeout: 0\n", "helper_timeout"),
        ("helper_max_output: 0\n", "helper_max_output"),
        ("helper_pool_size: 0\n", "helper_pool_size"),
        ("concurrency: 0\n", "concurrency"),
        ("queue_size: 0\n", "queue_size"),
        ("rpc_timeout: -1s\n", "rpc_timeout"),
        ("identity: 'has space'\n", "identity"),
        ("tls: {cert: a.pem}\n", "tls"),
        ("admin: {port: 99999}\n", "admin.port"),
        ("election: {ttl: 5s, campaign_interval: 10s}\n", "election"),
        ("election: {bucket: 'a b'}\n", "election"),
    ],
)
def test_each_validation_error_names_key_and_file(tmp_path: Path, text: str, key: str) -> None:
    err = _error(tmp_path, text)
    assert err.key == key
    assert f": {key}" in str(err) or f"{key}:" in str(err)


def test_secret_values_never_echoed(tmp_path: Path) -> None:
    err = _error(
        tmp_path,
        "token: {nested: verysecretvalue}\nbroker_provisioning_password: [othersecretvalue]\n",
    )
    assert "verysecretvalue" not in str(err) and "othersecretvalue" not in str(err)
    assert {k for k, _ in err.problems} == {"token", "broker_provisioning_password"}


def test_file_level_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    err = _error(tmp_path, "interval: [unclosed\n")
    assert "YAML" in str(err)
    err = _error(tmp_path, "- a\n- b\n")
    assert "mapping" in str(err)


# --- paths and overrides --------------------------------------------------------------------


def test_relative_paths_resolve_against_config_dir(tmp_path: Path, monkeypatch: Any) -> None:
    conf_dir = tmp_path / "etc"
    conf_dir.mkdir()
    monkeypatch.chdir(tmp_path)  # cwd differs from the config dir on purpose
    cfg = load_config(
        _write(
            conf_dir,
            """\
            jwt_signing_key: keys/signer.seed
            jwt_signing_token: signer.jwt
            jwt_verify_cert: certs/signer.pem
            rego_policy: policy.rego
            audit_log: audit.jsonl
            overlays: overlays.yaml
            logfile: /dev/stdout
            helper: ./helpers/helper.py --mode test
            tls: {ca: ca.pem, cert: c.pem, key: k.pem}
            """,
        )
    )
    base = conf_dir.resolve()
    assert cfg.jwt_signing_key == str(base / "keys/signer.seed")
    assert cfg.jwt_signing_token == str(base / "signer.jwt")
    assert cfg.jwt_verify_cert == str(base / "certs/signer.pem")
    assert cfg.rego_policy == str(base / "policy.rego")
    assert cfg.audit_log == str(base / "audit.jsonl")
    assert cfg.overlays == str(base / "overlays.yaml")
    assert cfg.logfile == "/dev/stdout"
    assert cfg.helper == f"{base / 'helpers/helper.py'} --mode test"
    assert cfg.tls.ca == str(base / "ca.pem") and cfg.tls.key == str(base / "k.pem")


def test_bare_helper_command_left_for_path_lookup(tmp_path: Path) -> None:
    cfg = load_config(_write(tmp_path, "helper: my-helper --x\n"))
    assert cfg.helper == "my-helper --x"
    cfg = load_config(_write(tmp_path, "helper: mypkg.helper:handle\nhelper_mode: python\n"))
    assert cfg.helper == "mypkg.helper:handle"


def test_overrides_from_cli(tmp_path: Path) -> None:
    path = _write(tmp_path, "broker_urls: nats://a:4222,nats://b:4222\nadmin: {port: 1}\n")
    assert load_config(path).broker_urls == ["nats://a:4222", "nats://b:4222"]
    cfg = load_config(
        path,
        overrides={
            "broker_urls": ["nats://127.0.0.1:5222"],
            "admin.port": 9100,
            "site": None,  # an unset flag changes nothing
            "features.pki": True,
        },
    )
    assert cfg.broker_urls == ["nats://127.0.0.1:5222"]
    assert cfg.admin.port == 9100 and cfg.site == "" and cfg.features.pki


def test_bad_override_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "{}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"brokers": ["x"]})
    assert info.value.key == "brokers"
    with pytest.raises(ConfigError) as info:
        load_config(path, overrides={"interval": "5s"})
    assert info.value.key == "interval"

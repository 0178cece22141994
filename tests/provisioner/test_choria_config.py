"""provisioner.choria_config: reading a Choria config file and mapping it onto our keys."""

from __future__ import annotations

from pathlib import Path

import pytest

from provisioner.choria_config import (
    ChoriaConfigError,
    choria_settings,
    parse_choria_config,
    read_choria_config,
)
from provisioner.cli.run import choria_overrides
from provisioner.config import load_config
from tests.provisioner.test_client_identity import write_jwt_identity


def test_parses_like_go_choria() -> None:
    text = (
        "# a comment\n"
        "\n"
        "   identity = node1.example.net   \n"
        "plugin.choria.middleware_hosts=b1:4222, b2:4223\n"
        "no equals sign here\n"
        "url = nats://x:1?a=b\n"  # the value is everything after the first '='
        "identity = node2.example.net\n"  # later lines win
    )
    assert parse_choria_config(text) == {
        "identity": "node2.example.net",
        "plugin.choria.middleware_hosts": "b1:4222, b2:4223",
        "url": "nats://x:1?a=b",
    }


def test_file_provider_and_middleware_hosts(tmp_path: Path) -> None:
    cfg = tmp_path / "etc" / "client.conf"
    cfg.parent.mkdir()
    cfg.write_text(
        "plugin.choria.middleware_hosts = broker1.example.net:4222,tls://broker2.example.net:4223\n"
        "plugin.security.provider = file\n"
        "plugin.security.file.ca = ssl/ca.pem\n"
        "plugin.security.file.certificate = /abs/cert.pem\n"
        "plugin.security.file.key = ~/key.pem\n"
        "plugin.choria.srv_domain = example.net\n"
        "plugin.choria.use_srv = false\n"
        "some.other.plugin = ignored\n"
    )
    out = choria_settings(cfg)
    assert out == {
        "broker_urls": ["nats://broker1.example.net:4222", "tls://broker2.example.net:4223"],
        "tls.ca": str(cfg.parent / "ssl" / "ca.pem"),
        "tls.cert": "/abs/cert.pem",
        "tls.key": str(Path("~/key.pem").expanduser()),
    }


def test_choria_provider_gives_the_client_identity_and_srv(tmp_path: Path) -> None:
    cfg = tmp_path / "choria.cfg"
    cfg.write_text(
        "plugin.security.provider = choria\n"
        "plugin.security.choria.token_file = creds/client.jwt\n"
        "plugin.security.choria.seed_file = creds/client.seed\n"
        "plugin.security.choria.ca = creds/ca.pem\n"
        "plugin.choria.srv_domain = example.net\n"
        "identity = prov1.example.net\n"
    )
    out = choria_settings(cfg)
    assert out["client_identity.jwt"] == str(tmp_path / "creds" / "client.jwt")
    assert out["client_identity.seed"] == str(tmp_path / "creds" / "client.seed")
    assert out["tls.ca"] == str(tmp_path / "creds" / "ca.pem")
    assert out["broker_srv_domain"] == "example.net"  # use_srv defaults to true
    assert out["identity"] == "prov1.example.net"
    assert "broker_urls" not in out


def test_puppet_provider_maps_no_files(tmp_path: Path) -> None:
    cfg = tmp_path / "c.cfg"
    cfg.write_text("plugin.security.file.ca = ca.pem\nplugin.security.choria.seed_file = s\n")
    assert choria_settings(cfg) == {}  # the default provider is puppet


def test_bad_files_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ChoriaConfigError, match="file not found") as err:
        read_choria_config(tmp_path / "missing.cfg")
    assert "missing.cfg" in str(err.value)
    bad = tmp_path / "bad.cfg"
    bad.write_text("plugin.choria.middleware_hosts = broker one:4222\n")
    with pytest.raises(ChoriaConfigError, match="middleware_hosts"):
        choria_settings(bad)
    big = tmp_path / "big.cfg"
    big.write_bytes(b"# " + b"x" * (1024 * 1024 + 10))
    with pytest.raises(ChoriaConfigError, match="larger"):
        read_choria_config(big)


def test_our_yaml_wins_over_the_choria_file(tmp_path: Path) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write_jwt_identity(creds)
    choria = tmp_path / "choria.cfg"
    choria.write_text(
        "plugin.choria.middleware_hosts = choria-broker:4222\n"
        "plugin.security.provider = choria\n"
        "plugin.security.choria.token_file = creds/client.jwt\n"
        "plugin.security.choria.seed_file = creds/client.seed\n"
        "identity = from-choria.example.net\n"
    )
    yaml_file = tmp_path / "provisioner.yaml"
    yaml_file.write_text(
        "identity: from-yaml.example.net\nfeatures: {jwt: false}\ntls:\n  verify: true\n"
    )
    overrides = choria_overrides(yaml_file, choria)
    assert "identity" not in overrides  # the YAML sets it
    cfg = load_config(yaml_file, overrides=overrides)
    assert cfg.identity == "from-yaml.example.net"
    assert cfg.broker_urls == ["nats://choria-broker:4222"]
    assert cfg.client_identity.jwt == str(creds / "client.jwt")
    # a YAML that sets broker_urls keeps them
    yaml_file.write_text("broker_urls: [nats://mine:4222]\nfeatures: {jwt: false}\n")
    cfg = load_config(yaml_file, overrides=choria_overrides(yaml_file, choria))
    assert cfg.broker_urls == ["nats://mine:4222"]
    assert cfg.identity == "from-choria.example.net"

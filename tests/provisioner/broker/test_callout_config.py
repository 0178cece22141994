"""broker-auth.yaml: same keys and defaults as ever, strict like every config file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
import yaml

from provisioner.broker.callout import CalloutConfigError, load_callout_config

BASE: dict[str, Any] = {
    "servers": ["nats://127.0.0.1:4222"],
    "auth_user_seed": "SU-auth",
    "issuer_seed": "SA-issuer",
    "xkey_seed": "SX-xkey",
    "verify_keys": ["/etc/provisioner/token.pub"],
}


def _write(tmp_path: Path, extra: dict[str, Any] | None = None, *, drop: str = "") -> Path:
    data = {k: v for k, v in BASE.items() if k != drop} | (extra or {})
    p = tmp_path / "broker-auth.yaml"
    p.write_text(yaml.safe_dump(data))
    p.chmod(0o600)
    return p


def test_defaults(tmp_path: Path) -> None:
    cfg = load_callout_config(_write(tmp_path))
    assert cfg.servers == BASE["servers"] and cfg.verify_keys == BASE["verify_keys"]
    assert (cfg.target_account, cfg.queue_group, cfg.tls_ca) == (
        "PROVISIONING",
        "broker-auth",
        None,
    )
    assert (cfg.user_jwt_ttl, cfg.response_ttl, cfg.token_leeway) == (3600.0, 60.0, 30.0)
    p = cfg.pinning
    assert (p.enabled, p.bucket, p.ttl) == (False, "BROKER_IDENTITY_PINS", 3600.0)
    assert (p.require_nkey, p.release_on_provisioned) == (False, True)
    assert "SU-auth" not in repr(cfg) and "SA-issuer" not in repr(cfg)


def test_values_and_durations(tmp_path: Path) -> None:
    cfg = load_callout_config(
        _write(
            tmp_path,
            {
                "user_jwt_ttl": "2h",
                "response_ttl": 30,
                "token_leeway": "5s",
                "tls_ca": "",
                "pinning": {"enabled": True, "ttl": "30m", "require_nkey": True},
            },
        )
    )
    assert (cfg.user_jwt_ttl, cfg.response_ttl, cfg.token_leeway) == (7200.0, 30.0, 5.0)
    assert cfg.tls_ca is None
    assert cfg.pinning.enabled and cfg.pinning.ttl == 1800.0 and cfg.pinning.require_nkey
    assert load_callout_config(_write(tmp_path, {"pinning": None})).pinning.enabled is False


@pytest.mark.parametrize(
    ("extra", "key", "hint"),
    [
        ({"quue_group": "x"}, "quue_group", "queue_group"),
        ({"pinnig": {"enabled": True}}, "pinnig", "pinning"),
        ({"pinning": {"enabled": True, "tll": 60}}, "pinning.tll", "pinning.ttl"),
    ],
)
def test_unknown_key_refused_with_hint_naming_file_and_key(
    tmp_path: Path, extra: dict[str, Any], key: str, hint: str
) -> None:
    path = _write(tmp_path, extra)
    with pytest.raises(CalloutConfigError) as info:
        load_callout_config(path)
    assert str(info.value) == f"{path}: {key}: unknown key (did you mean '{hint}'?)"
    assert info.value.key == key and info.value.reason == "config"


def test_unknown_key_without_a_close_match(tmp_path: Path) -> None:
    with pytest.raises(CalloutConfigError, match=r"zzz: unknown key$"):
        load_callout_config(_write(tmp_path, {"zzz": 1}))


@pytest.mark.parametrize("key", sorted(BASE))
def test_required_keys(tmp_path: Path, key: str) -> None:
    with pytest.raises(CalloutConfigError, match=f"'{key}' is required"):
        load_callout_config(_write(tmp_path, drop=key))


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ({"servers": "nats://a:4222"}, "servers"),
        ({"user_jwt_ttl": "soon"}, "user_jwt_ttl"),
        ({"pinning": {"ttl": -1}}, "pinning.ttl"),
        ({"pinning": "on"}, "pinning"),
        ({"queue_group": 5}, "queue_group"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, extra: dict[str, Any], key: str) -> None:
    path = _write(tmp_path, extra)
    with pytest.raises(CalloutConfigError) as info:
        load_callout_config(path)
    assert str(info.value).startswith(f"{path}: {key}: ")
    assert "SU-auth" not in str(info.value)


def test_unreadable_and_not_a_mapping(tmp_path: Path) -> None:
    with pytest.raises(CalloutConfigError, match="cannot read the callout config"):
        load_callout_config(tmp_path / "missing.yaml")
    p = tmp_path / "list.yaml"
    p.write_text("- a\n")
    with pytest.raises(CalloutConfigError, match="must be a mapping"):
        load_callout_config(p)


def test_group_readable_file_warns(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    path = _write(tmp_path)
    path.chmod(0o644)
    with caplog.at_level(logging.WARNING):
        load_callout_config(path)
    assert "use 0600" in caplog.text

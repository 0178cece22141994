"""The one config style: strict models, unknown keys refused with a hint, file and dotted key."""

from __future__ import annotations

import pytest
from pydantic import Field

from choria_core.strictmodel import (
    Duration,
    StrictConfigError,
    StrictModel,
    dotted_key,
    unknown_key_message,
    validate_strict,
)


class Tls(StrictModel):
    ca_file: str | None = None
    verify: bool = True


class Profile(StrictModel):
    expiry: Duration = 60.0


class Settings(StrictModel):
    helper_command: str = ""
    timeout: Duration = Field(default=10.0, gt=0)
    tls: Tls = Field(default_factory=Tls)
    backup_tls: Tls | None = None
    profiles: dict[str, Profile] = Field(default_factory=dict)
    urls: list[str] = Field(default_factory=list)


class MyError(StrictConfigError):
    pass


def test_valid_data_and_durations() -> None:
    s = validate_strict(Settings, {"timeout": "1m", "profiles": {"a": {"expiry": "2h"}}})
    assert s.timeout == 60.0 and s.profiles["a"].expiry == 7200.0


@pytest.mark.parametrize(
    ("raw", "key", "message"),
    [
        ({"helper_comand": "x"}, "helper_comand", "unknown key (did you mean 'helper_command'?)"),
        ({"tls": {"ca_fle": "x"}}, "tls.ca_fle", "unknown key (did you mean 'tls.ca_file'?)"),
        (
            {"backup_tls": {"verfy": False}},
            "backup_tls.verfy",
            "unknown key (did you mean 'backup_tls.verify'?)",
        ),
        (
            {"profiles": {"node": {"expirey": "1h"}}},
            "profiles.node.expirey",
            "unknown key (did you mean 'profiles.node.expiry'?)",
        ),
        ({"zzz": 1}, "zzz", "unknown key"),
    ],
)
def test_unknown_key_refused_with_hint_naming_file_and_key(
    raw: dict[str, object], key: str, message: str
) -> None:
    with pytest.raises(MyError) as info:
        validate_strict(Settings, raw, file="/etc/x.yaml", error=MyError)
    assert str(info.value) == f"/etc/x.yaml: {key}: {message}"
    assert info.value.key == key and info.value.file == "/etc/x.yaml"
    assert info.value.reason == "config" and isinstance(info.value, ValueError)


def test_prefix_and_where() -> None:
    with pytest.raises(StrictConfigError) as info:
        validate_strict(Settings, {"tls": {"verify": "sometimes"}}, prefix="ca.", where="helper")
    assert str(info.value).startswith("helper: ca.tls.verify: ")


def test_every_value_problem_listed_without_echoing_values() -> None:
    with pytest.raises(StrictConfigError) as info:
        validate_strict(Settings, {"timeout": "soon", "urls": ["a", 5], "helper_command": 3})
    keys = [k for k, _ in info.value.problems]
    assert sorted(keys) == ["helper_command", "timeout", "urls[1]"]
    text = str(info.value)
    assert text.startswith("3 problems: ") and "invalid duration 'soon'" in text
    assert "Value error" not in text


def test_not_a_mapping() -> None:
    with pytest.raises(StrictConfigError, match="the top level must be a mapping"):
        validate_strict(Settings, ["a"], file="f.yaml")


def test_helpers() -> None:
    assert dotted_key(("a", "b", 0, "c")) == "a.b[0].c"
    assert dotted_key(("x",), "ca.") == "ca.x"
    assert unknown_key_message("intervall", ["interval", "workers"]) == (
        "unknown key (did you mean 'interval'?)"
    )
    assert unknown_key_message("qqq", ["interval"]) == "unknown key"

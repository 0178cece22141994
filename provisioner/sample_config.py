"""The commented sample configuration written by ``provisioner config init``.

The text is ``sample_config.yaml`` beside this module: every key, commented, with safe
defaults. Secrets the operator must match with something outside (the provisioning token of
the nodes' JWTs, the broker password) are placeholders starting with :data:`PLACEHOLDER`,
which the configuration model accepts and ``provisioner config check`` names as left to
fill in; the admin API token, which nothing outside has to match, is generated at random.

A key the model gained after the sample was written is still listed: :func:`render_sample`
appends it, commented, with its default, so the sample always covers the whole model.
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Iterator
from importlib import resources
from typing import Any

import yaml
from pydantic import BaseModel

from provisioner.config import ProvisionerConfig

__all__ = ["PLACEHOLDER", "SECRET_KEYS", "placeholders", "render_sample"]

#: What every placeholder value starts with.
PLACEHOLDER = "CHANGE-ME"
#: The secret keys of the configuration, dotted.
SECRET_KEYS: tuple[str, ...] = ("token", "broker_provisioning_password", "admin.token")

_ADMIN_TOKEN_MARK = "@@ADMIN_TOKEN@@"


def _template() -> str:
    return resources.files("provisioner").joinpath("sample_config.yaml").read_text("utf-8")


def _mentioned(text: str) -> set[str]:
    """Top-level keys the text sets or shows commented (``key:`` or ``# key:`` at column 0)."""
    return set(re.findall(r"^(?:# )?([a-z_][a-z0-9_]*):", text, flags=re.MULTILINE))


def _commented_default(name: str, value: Any, doc: str) -> str:
    body = yaml.safe_dump({name: value}, default_flow_style=False, sort_keys=False)
    lines = [f"# {doc}"] if doc else []
    lines += [f"# {line}" if line else "#" for line in body.rstrip("\n").split("\n")]
    return "\n".join(lines)


def _field_doc(name: str) -> str:
    field = ProvisionerConfig.model_fields[name]
    if field.description:
        return field.description
    annotation = field.annotation
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) and annotation.__doc__:
        return annotation.__doc__.strip().splitlines()[0].replace("``", "`")
    return ""


def _missing_keys(text: str) -> Iterator[str]:
    mentioned = _mentioned(text)
    for name in ProvisionerConfig.model_fields:
        if name not in mentioned:
            yield name


def render_sample(admin_token: str | None = None) -> str:
    """The sample configuration text, with a fresh random admin token unless one is given."""
    token = admin_token if admin_token is not None else secrets.token_urlsafe(32)
    text = _template().replace(_ADMIN_TOKEN_MARK, token)
    missing = list(_missing_keys(text))
    if missing:
        defaults = ProvisionerConfig(identity="sample").model_dump(mode="json")
        extra = [
            "# Further keys, shown with their defaults (see docs/configuration.md).",
            *(_commented_default(name, defaults[name], _field_doc(name)) for name in missing),
        ]
        text = text.rstrip("\n") + "\n\n" + "\n\n".join(extra) + "\n"
    return text


def placeholders(config: ProvisionerConfig) -> list[str]:
    """The dotted secret keys of ``config`` still holding a placeholder value."""
    values = {
        "token": config.token,
        "broker_provisioning_password": config.broker_provisioning_password,
        "admin.token": config.admin.token or "",
    }
    return [key for key in SECRET_KEYS if values[key].startswith(PLACEHOLDER)]

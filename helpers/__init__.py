"""Helpers: the typed helper contract, the Python SDK and the reference helper.

A helper decides, per node, which overlay it joins and what configuration and credentials it
gets. See `docs/helpers.md`.
"""

from helpers.models import (
    CSRInput,
    Ed25519Input,
    HelperInput,
    HelperOutput,
    HelperOutputError,
    decision,
    parse_helper_output,
    provisioning_left_enabled,
)
from helpers.sdk import defer, run

__all__ = [
    "CSRInput",
    "Ed25519Input",
    "HelperInput",
    "HelperOutput",
    "HelperOutputError",
    "decision",
    "defer",
    "parse_helper_output",
    "provisioning_left_enabled",
    "run",
]

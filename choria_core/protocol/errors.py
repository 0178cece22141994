"""The one error type of the wire layer.

Every decode/parse function in :mod:`choria_core.protocol` turns whatever went wrong with the
input (bad JSON, bad base64, wrong types, failed schema rules, failed node-side checks) into a
:class:`ProtocolError` whose message says which layer and which rule failed. Callers catch this
single type; nothing else escapes, whatever bytes arrive from the network.
"""

from __future__ import annotations

from typing import NoReturn

from choria_core.errors import FleetError


class ProtocolError(FleetError, ValueError, reason="protocol"):
    """A Choria message was malformed, or failed a rule of the wire protocol (message layers,
    subjects, RPC bodies, lifecycle events) or a node-side acceptance check."""


def fail(msg: str) -> NoReturn:
    """Raise :class:`ProtocolError` with ``msg`` (a check then reads as one line)."""
    raise ProtocolError(msg)

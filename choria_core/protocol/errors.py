"""The one error type of the wire layer.

Every decode/parse function in :mod:`choria_core.protocol` turns whatever went wrong with the
input (bad JSON, bad base64, wrong types, failed schema rules, failed node-side checks) into a
:class:`ProtocolError` whose message says which layer and which rule failed. Callers catch this
single type; nothing else escapes, whatever bytes arrive from the network.
"""

from __future__ import annotations


class ProtocolError(ValueError):
    """A Choria message was malformed, or failed a protocol rule (spec §2-§5, §9)."""

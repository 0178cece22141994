"""base64url as JWT segments use it: the URL-safe alphabet, padding left off.

One decoder for every JWT this project reads (provisioning and server tokens, NATS JWTs): it
accepts a segment with or without padding and refuses anything outside the base64url alphabet
(the standard library's decoder would silently skip such characters).
"""

from __future__ import annotations

import base64
import re

__all__ = ["b64url_decode", "b64url_encode"]

_ALPHABET = re.compile(r"[A-Za-z0-9_=-]*")


def b64url_encode(data: bytes) -> str:
    """``data`` as unpadded base64url text."""
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def b64url_decode(text: str) -> bytes:
    """Decode a base64url segment (padded or not); ``ValueError`` when it is not one."""
    if _ALPHABET.fullmatch(text) is None:
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))

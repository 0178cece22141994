"""The one redaction: what may reach a log, an error message or an operator's screen.

Text from outside (a helper's stderr, a CA server's error body) may echo a secret back: a PEM
private key, a token, a password. :func:`redact` removes PEM private key blocks (also a block cut
off before its END line) and every given secret value, however short, and can cap the length.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

__all__ = ["KEY_MARK", "SECRET_MARK", "redact"]

#: What replaces a PEM private key block.
KEY_MARK = "[private key redacted]"
#: What replaces a secret value.
SECRET_MARK = "[redacted]"

_PEM_KEY_RE = re.compile(
    r"-----BEGIN [A-Z0-9 ]*PRIVATE KEY-----.*?(-----END [A-Z0-9 ]*PRIVATE KEY-----|\Z)", re.S
)


def redact(text: str, secrets: Iterable[str] = (), *, limit: int | None = None) -> str:
    """``text`` without PEM private keys and without any of ``secrets``.

    Secrets are replaced in one pass, longest first, so a short secret inside a longer one
    (or inside the replacement mark) cannot leave part of the longer one behind. Empty secrets
    are ignored. With ``limit``, the result is cut to ``limit`` characters plus ``"..."``.
    """
    text = _PEM_KEY_RE.sub(KEY_MARK, text)
    values = sorted({s for s in secrets if s}, key=len, reverse=True)
    if values:
        text = re.sub("|".join(re.escape(v) for v in values), SECRET_MARK, text)
    if limit is not None and len(text) > limit:
        text = text[:limit] + "..."
    return text

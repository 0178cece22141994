"""The one cleaning of remote text before it reaches a record.

Text written by someone else (a node's ``statusmsg``, a helper's ``msg``, a CA's error body,
an error message quoting any of them, a hostile identity) may be megabytes long and hold raw
newlines, terminal escape sequences or bidirectional overrides: written as it is, it would
forge log lines, repaint an operator's terminal or fill the disk. :func:`clean_remote_text`
makes it safe for a log line, the audit log, the admin API and a metric label:

* it is cut to ``limit`` characters (:data:`DEFAULT_LIMIT`, 1 KiB), the marker included, so the
  cost of cleaning a 4 MB message is that of cleaning ``limit`` characters;
* secrets (PEM private keys, given values) are removed first
  (:func:`~choria_core.redaction.redact`);
* control characters are escaped so that every line stays one line: ``\\n`` ``\\r`` ``\\t`` as
  such, other C0/C1 characters and DEL as ``\\xNN``, Unicode format characters (bidi overrides,
  zero-width), line/paragraph separators and lone surrogates as ``\\uNNNN``.

Cleaning is idempotent (a backslash is left as it is, so cleaned text cleaned again is
unchanged): layers may each clean what they record without escaping twice. The price is that a
node writing a literal ``\\n`` looks like one that wrote a newline; it never *is* a newline.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from choria_core.redaction import redact

__all__ = ["DEFAULT_LIMIT", "TRUNCATED_MARK", "clean_optional", "clean_remote_text"]

#: Default length of cleaned remote text, in characters (the marker included).
DEFAULT_LIMIT = 1024
#: What ends a text that was cut.
TRUNCATED_MARK = "...[truncated]"
#: The shortest limit accepted (room for the marker and some text).
MIN_LIMIT = 32

_SAFE_RE = re.compile(r"[\x20-\x7e]*")
_SIMPLE = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_ESCAPED_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"})


def _escape(ch: str) -> str:
    simple = _SIMPLE.get(ch)
    if simple is not None:
        return simple
    code = ord(ch)
    if code < 0x20 or 0x7F <= code < 0xA0:
        return f"\\x{code:02x}"
    if code < 0x80 or unicodedata.category(ch) not in _ESCAPED_CATEGORIES:
        return ch
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


def clean_remote_text(
    text: object, limit: int = DEFAULT_LIMIT, *, secrets: Iterable[str] = ()
) -> str:
    """``text`` redacted, escaped and cut to at most ``limit`` characters (see the module).

    Anything that is not a ``str`` is rendered with ``repr`` (``bytes`` included) first.
    """
    if limit < MIN_LIMIT:
        raise ValueError(f"limit must be at least {MIN_LIMIT} characters")
    if not isinstance(text, str):
        text = repr(text)
    cut = len(text) > limit
    # Redaction sees a bounded text: a PEM block cut short is still removed (redact's rule).
    text = redact(text[: limit + 1], secrets)
    if not cut and len(text) <= limit and _SAFE_RE.fullmatch(text):
        return text
    pieces = [_escape(ch) for ch in text]
    if not cut and sum(len(p) for p in pieces) <= limit:
        return "".join(pieces)
    out: list[str] = []
    size = 0
    budget = limit - len(TRUNCATED_MARK)
    for piece in pieces:
        if size + len(piece) > budget:
            break  # never half an escape sequence
        out.append(piece)
        size += len(piece)
    return "".join(out) + TRUNCATED_MARK


def clean_optional(text: str | None, limit: int = DEFAULT_LIMIT) -> str | None:
    """:func:`clean_remote_text` that keeps ``None`` (and the empty string) as it is."""
    if not text:
        return text
    return clean_remote_text(text, limit)

"""The one duration parser: config files, CA answers, CLI flags and helpers all use it.

A duration is a number of seconds (``90``, ``1.5``, ``"3600"``) or Go/choria duration text:
one or more ``<number><unit>`` parts (``"10s"``, ``"1h30m"``, ``"8760h0m0s"``) with the units of
Go's ``time.ParseDuration`` (ns, us, µs, ms, s, m, h) plus go-choria's ``util.ParseDuration``
extensions: d days, w weeks, M months (30 days), y years (365 days), and the capital variants
go-choria also accepts (S, H, D, W, Y). ``m`` is minutes, ``M`` months.
"""

from __future__ import annotations

import math
import re

__all__ = ["DURATION_HELP", "parse_duration"]

#: What the parser accepts, for error messages and docs.
DURATION_HELP = (
    "a number of seconds (e.g. 90 or 3600) or <number><unit> parts with unit one of "
    "ns, us, ms, s, m, h, d, w, M (30 days), y (365 days) (e.g. 30s, 1h30m, 720h, 1y)"
)

_UNITS: dict[str, float] = {
    "ns": 1e-9,
    "us": 1e-6,
    "µs": 1e-6,  # U+00B5 micro sign
    "μs": 1e-6,  # U+03BC greek mu
    "ms": 1e-3,
    "s": 1.0,
    "S": 1.0,
    "m": 60.0,
    "h": 3600.0,
    "H": 3600.0,
    "d": 86400.0,
    "D": 86400.0,
    "w": 7 * 86400.0,
    "W": 7 * 86400.0,
    "M": 30 * 86400.0,
    "y": 365 * 86400.0,
    "Y": 365 * 86400.0,
}
_NUMBER = r"(?:\d+(?:\.\d*)?|\.\d+)"
_PLAIN_NUMBER = re.compile(_NUMBER)
_PART = re.compile(rf"({_NUMBER})(ns|us|µs|μs|ms|s|S|m|h|H|d|D|w|W|M|y|Y)")


def _invalid(value: object, why: str) -> ValueError:
    return ValueError(f"invalid duration {value!r}: {why}; use {DURATION_HELP}")


def parse_duration(value: str | int | float) -> float:
    """Seconds from a number or a Go/choria duration text.

    Refuses (with :class:`ValueError` saying what is accepted) booleans, empty text, negative
    or non-finite values, unknown units and anything that is not a whole duration
    (``"1h 30m"``, ``"abc"``).
    """
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise _invalid(value, f"a {type(value).__name__} is not a duration")
    if isinstance(value, int | float):
        seconds = float(value)
        if not math.isfinite(seconds):
            raise _invalid(value, "must be finite")
        if seconds < 0:
            raise _invalid(value, "must not be negative")
        return seconds
    text = value.strip()
    if text.startswith("-"):
        raise _invalid(value, "must not be negative")
    text = text.removeprefix("+")
    if not text:
        raise _invalid(value, "empty")
    if _PLAIN_NUMBER.fullmatch(text):
        return float(text)
    pos = 0
    total = 0.0
    while pos < len(text):
        m = _PART.match(text, pos)
        if m is None:
            raise _invalid(value, "not a number of seconds or <number><unit> parts")
        total += float(m.group(1)) * _UNITS[m.group(2)]
        pos = m.end()
    if not math.isfinite(total):
        raise _invalid(value, "too large")
    return total

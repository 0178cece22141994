"""The one duration parser: numbers and numeric text as seconds, Go/choria units, clear refusals."""

from __future__ import annotations

from typing import Any

import pytest

from choria_core.durations import parse_duration


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("10s", 10),
        ("1m", 60),
        ("1h", 3600),
        ("1h30m", 5400),
        ("8760h", 365 * 86400),
        ("8760h0m0s", 365 * 86400),  # Go's time.Duration.String(), as cfssl answers
        ("720h", 30 * 86400),
        ("365d", 365 * 86400),
        ("1y", 365 * 86400),
        ("1Y", 365 * 86400),
        ("2w", 14 * 86400),
        ("2W", 14 * 86400),
        ("3D", 3 * 86400),
        ("2H", 7200),
        ("5S", 5),
        ("1M", 30 * 86400),
        ("1.5h", 5400),
        (".5s", 0.5),
        ("500ms", 0.5),
        ("250us", 250e-6),
        ("250µs", 250e-6),
        ("250μs", 250e-6),
        ("10ns", 10e-9),
        (" 2m ", 120),
        ("+30s", 30),
        ("0", 0),
        ("3600", 3600),  # numeric text is seconds
        ("1.5", 1.5),
        (90, 90),
        (1.5, 1.5),
        (0, 0),
    ],
)
def test_accepts_numbers_and_go_choria_units(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "   ",
        "+",
        "1x",
        "-1m",
        "-5",
        -1,
        -0.5,
        "m",
        "1h 30m",
        "abc",
        "1e3",
        "nan",
        "inf",
        True,
        False,
        None,
        [1],
        float("inf"),
        float("nan"),
    ],
)
def test_refuses_what_is_not_a_duration(bad: Any) -> None:
    with pytest.raises(ValueError, match="invalid duration"):
        parse_duration(bad)


def test_error_says_what_is_accepted() -> None:
    with pytest.raises(ValueError) as info:
        parse_duration("soon")
    text = str(info.value)
    assert "'soon'" in text
    assert "number of seconds" in text and "30s, 1h30m" in text and "y (365 days)" in text


def test_negative_and_non_finite_say_why() -> None:
    with pytest.raises(ValueError, match="must not be negative"):
        parse_duration("-1h")
    with pytest.raises(ValueError, match="must be finite"):
        parse_duration(float("inf"))
    with pytest.raises(ValueError, match="bool is not a duration"):
        parse_duration(True)

"""Cleaning remote text: bounded, escaped, redacted."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from choria_core.redaction import KEY_MARK
from choria_core.remote_text import DEFAULT_LIMIT, TRUNCATED_MARK, clean_optional, clean_remote_text


def test_plain_text_is_unchanged() -> None:
    assert clean_remote_text("configure failed: lock held") == "configure failed: lock held"


@pytest.mark.parametrize(
    ("raw", "clean"),
    [
        ("a\nb", "a\\nb"),
        ("a\r\nb\tc", "a\\r\\nb\\tc"),
        ("\x1b[31mred\x1b[0m", "\\x1b[31mred\\x1b[0m"),
        ("nul\x00del\x7fc1\x85", "nul\\x00del\\x7fc1\\x85"),
        ("bidi\u202eevil\u2028line", "bidi\\u202eevil\\u2028line"),
        ("back\\slash", "back\\slash"),
        ("surrogate\udcff", "surrogate\\udcff"),
        ("ünïcödé ok", "ünïcödé ok"),
    ],
)
def test_control_characters_are_escaped(raw: str, clean: str) -> None:
    assert clean_remote_text(raw) == clean


def test_four_megabytes_with_newlines_and_ansi_become_one_bounded_line() -> None:
    raw = ("line\n\x1b[2J\x1b[H" * 300_000)[: 4 * 1024 * 1024]
    out = clean_remote_text(raw)
    assert len(out) <= DEFAULT_LIMIT
    assert out.endswith(TRUNCATED_MARK)
    assert "\n" not in out and "\x1b" not in out
    assert out.startswith("line\\n\\x1b[2J")


def test_escaping_that_grows_past_the_limit_is_cut_on_an_escape_boundary() -> None:
    out = clean_remote_text("\x01" * 1000, 100)
    assert len(out) <= 100 and out.endswith(TRUNCATED_MARK)
    body = out[: -len(TRUNCATED_MARK)]
    assert body == "\\x01" * (len(body) // 4)


def test_secrets_and_private_keys_are_removed_even_when_cut() -> None:
    pem = "-----BEGIN PRIVATE KEY-----\n" + "A" * 5000
    out = clean_remote_text("helper said " + pem, 200, secrets=["s3cret"])
    assert KEY_MARK in out and "AAAA" not in out
    assert "s3cret" not in clean_remote_text("token s3cret here", secrets=["s3cret"])


def test_non_strings_and_optional() -> None:
    assert clean_remote_text(b"\x00bytes") == "b'\\x00bytes'"
    assert clean_optional(None) is None and clean_optional("") == ""
    assert clean_optional("a\nb") == "a\\nb"
    with pytest.raises(ValueError):
        clean_remote_text("x", 5)


@pytest.mark.parametrize(
    "raw", ["plain", "a\nb\x1b[0m\u202e" * 500, "ünï\tcödé\\n", "x" * 5000, "\x00" * 300]
)
def test_cleaning_is_idempotent(raw: str) -> None:
    once = clean_remote_text(raw)
    assert clean_remote_text(once) == once


@settings(max_examples=300, deadline=None)
@given(st.text(alphabet=st.characters(codec=None), max_size=3000), st.integers(32, 2048))
def test_any_text_comes_out_bounded_single_line_and_stable(raw: str, limit: int) -> None:
    out = clean_remote_text(raw, limit)
    assert len(out) <= limit
    assert not any(
        ord(c) < 0x20 or 0x7F <= ord(c) < 0xA0 or c in "\u2028\u2029\u202e\u200b" for c in out
    )
    assert clean_remote_text(out, limit) == out
    if len(raw) <= limit and raw.isprintable() and raw.isascii():
        assert out == raw

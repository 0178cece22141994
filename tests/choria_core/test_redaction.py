"""The one redaction: PEM private keys, every given secret (short ones too), optional cap."""

from __future__ import annotations

from choria_core.redaction import KEY_MARK, SECRET_MARK, redact

PEM = (
    "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEEIBkg4Yv0qT\nAwEHoUQDQgAE\n-----END EC PRIVATE KEY-----"
)


def test_pem_private_keys_removed() -> None:
    text = f"helper said: {PEM} and then\n-----BEGIN PRIVATE KEY-----\nMIIEvQ..."
    out = redact(text)
    assert "MHcCAQEE" not in out and "MIIEvQ" not in out
    assert out.startswith("helper said: ") and out.count(KEY_MARK) == 2


def test_certificates_are_kept() -> None:
    cert = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----"
    assert redact(cert) == cert


def test_secret_values_removed_including_short_ones() -> None:
    out = redact("token=s3cr3t-token pin=42 pw=abc", ["s3cr3t-token", "42", "abc"])
    assert out == f"token={SECRET_MARK} pin={SECRET_MARK} pw={SECRET_MARK}"


def test_longest_secret_first_and_mark_not_mangled() -> None:
    # "ed" is inside both the longer secret and the mark "[redacted]": neither is broken
    out = redact("value=reddish", ["reddish", "ed"])
    assert out == f"value={SECRET_MARK}"
    assert redact("x ed y", ["ed", "e"]) == f"x {SECRET_MARK} y"


def test_empty_secrets_ignored() -> None:
    assert redact("nothing here", ["", ""]) == "nothing here"


def test_length_cap() -> None:
    assert redact("a" * 600, limit=500) == "a" * 500 + "..."
    assert redact("short", limit=500) == "short"
    # the cap applies after redaction, so a secret cut in half is never shown
    assert redact("x" * 498 + "secret", ["secret"], limit=500) == "x" * 498 + "[r..."

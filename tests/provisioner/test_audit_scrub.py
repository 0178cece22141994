"""AuditLog.scrub: the inline path for plain dicts keeps every rule of the generic one.

The reference below is the scrubber as it was before the dict fast path (one recursive call per
value); records of every shape must come out identical, and the rules still hold: secrets and
private keys and JWTs in any string are redacted, forbidden keys are dropped unless their
value is a number, keys are cut to 256 characters, long strings are cut.
"""

from __future__ import annotations

import enum
import random
from collections.abc import Mapping
from typing import Any

from provisioner.audit import FORBIDDEN_KEYS, MAX_FIELD, REDACTED, AuditLog

SECRET = "s3cr3t-token-value"
JWT = "eyJhbGciOiJFZERTQSJ9.eyJjaHQiOiJ4In0.c2lnbmF0dXJl"
PEM = "-----BEGIN EC PRIVATE KEY-----\nMHcCAQEE\n-----END EC PRIVATE KEY-----"


class Level(enum.IntEnum):
    LOW = 1


class Word(enum.StrEnum):
    OK = "ok"


def reference(log: AuditLog, value: Any) -> Any:
    """The generic scrubber (the rules, one call per value)."""
    if isinstance(value, str):
        return log.scrub(value)  # the string rules are unchanged
    if isinstance(value, Mapping):
        return {
            str(k)[:256]: reference(log, v)
            for k, v in value.items()
            if str(k).lower() not in FORBIDDEN_KEYS
            or (isinstance(v, int | float) and not isinstance(v, bool))
        }
    if isinstance(value, list | tuple):
        return [reference(log, v) for v in value]
    if value is None or isinstance(value, bool | int | float):
        return value
    return reference(log, str(value))


def _value(rng: random.Random, depth: int) -> Any:
    choices: list[Any] = [
        None,
        True,
        False,
        0,
        1.5,
        Level.LOW,
        Word.OK,
        "plain",
        f"error quoting {SECRET} here",
        f"a token {JWT} in text",
        PEM,
        "x" * (MAX_FIELD + 10),
        b"bytes",
    ]
    if depth < 3:
        choices += [_record(rng, depth + 1), [_value(rng, depth + 1) for _ in range(3)]]
    return rng.choice(choices)


def _record(rng: random.Random, depth: int = 0) -> dict[Any, Any]:
    keys: list[Any] = [
        "identity",
        "error",
        "jwt",
        "Token",
        "KEY",
        "seed",
        "timings",
        7,
        "k" * 300,
        "server_jwt",
    ]
    return {rng.choice(keys): _value(rng, depth) for _ in range(rng.randint(1, 8))}


def test_dict_fast_path_equals_the_generic_rules() -> None:
    log = AuditLog(None, secrets=[SECRET])
    rng = random.Random(5)
    for _ in range(500):
        rec = _record(rng)
        assert log.scrub(rec) == reference(log, rec)


def test_scrubbed_record_rules() -> None:
    log = AuditLog(None, secrets=[SECRET])
    out = log.scrub(
        {
            "identity": "n1",
            "error": f"failed with {SECRET} and {JWT}",
            "msg": PEM,
            "token": "x",
            "jwt": 0.012,  # a stage timing named like a forbidden key: a number is kept
            "key": True,  # a bool is not a number here
            "timings": {"jwt": 0.5, "cht": "leak"},
            "k" * 300: 1,
        }
    )
    assert SECRET not in str(out) and JWT not in str(out) and "MHcCAQEE" not in str(out)
    assert REDACTED in out["error"] and REDACTED in out["msg"]
    assert "token" not in out and "key" not in out
    assert out["jwt"] == 0.012 and out["timings"] == {"jwt": 0.5}
    assert "k" * 256 in out and "k" * 300 not in out

"""Subjects and request ids."""

from __future__ import annotations

import hashlib

import pytest

from choria_core.protocol import (
    ProtocolError,
    broadcast_subject,
    directed_subject,
    identity_problem,
    is_valid_identity,
    lifecycle_subject,
    new_request_id,
    reply_prefix,
    reply_subject,
)

REQID = "3f1d2c9e8b7a4c6d9e0f1a2b3c4d5e6f"


def test_reply_subject_matches_spec_worked_example() -> None:
    assert (
        reply_subject("provisioning", "choria=prov1.example.net", REQID)
        == "provisioning.reply.f233e84b1879ff8f207108d2dda253a5.3f1d2c9e8b7a4c6d9e0f1a2b3c4d5e6f"
    )


def test_reply_prefix_is_md5_of_callerid() -> None:
    caller = "choria=other.example.net"
    assert reply_prefix("provisioning", caller) == (
        "provisioning.reply." + hashlib.md5(caller.encode()).hexdigest()
    )


def test_directed_broadcast_and_lifecycle_subjects() -> None:
    assert directed_subject("provisioning", "node1.example.net") == (
        "provisioning.node.node1.example.net"
    )
    assert broadcast_subject("provisioning", "discovery") == (
        "provisioning.broadcast.agent.discovery"
    )
    assert lifecycle_subject("startup", "provision_mode_server") == (
        "choria.lifecycle.event.startup.provision_mode_server"
    )


@pytest.mark.parametrize(
    "identity",
    ["node1.example.net", "a", "n-1.b-2.c", "NODE01", "x1.example.net"],
)
def test_valid_identities(identity: str) -> None:
    assert is_valid_identity(identity)


@pytest.mark.parametrize(
    "identity",
    [
        "",
        "*",
        ">",
        "node 1",
        "node1.*",
        "node1.>",
        "-node",
        "node-",
        "a..b",
        ".a",
        "a.",
        "node1\n",
        "nöde",
        "under_score",
    ],
)
def test_invalid_identities_rejected_and_never_build_a_subject(identity: str) -> None:
    assert not is_valid_identity(identity)
    with pytest.raises(ProtocolError, match="identity"):
        directed_subject("provisioning", identity)


@pytest.mark.parametrize("bad", ["", "a.b", "*", ">", "a b"])
def test_subject_tokens_validated(bad: str) -> None:
    with pytest.raises(ProtocolError):
        broadcast_subject(bad, "discovery")
    with pytest.raises(ProtocolError):
        broadcast_subject("provisioning", bad)
    with pytest.raises(ProtocolError):
        lifecycle_subject(bad, "server")


def test_reply_subject_rejects_bad_request_id() -> None:
    with pytest.raises(ProtocolError, match="32"):
        reply_subject("provisioning", "choria=x", REQID[:31])
    with pytest.raises(ProtocolError):
        reply_subject("provisioning", "choria=x", "*" * 32)


def test_new_request_id_is_32_lower_hex_and_unique() -> None:
    ids = {new_request_id() for _ in range(100)}
    assert len(ids) == 100
    for rid in ids:
        assert len(rid) == 32
        int(rid, 16)
        assert rid == rid.lower()


def _labels(n: int, size: int = 63) -> str:
    return ".".join("a" * size for _ in range(n))


@pytest.mark.parametrize(
    ("identity", "problem"),
    [
        (_labels(72), "too_long"),  # 4.6 KB of valid 63-character labels
        (_labels(4), "too_long"),  # 255 characters
        ("a" * 64 + ".example.net", "label_too_long"),
        ("", "empty"),
        ("a b", "syntax"),
        (b"node1", "not_string"),
    ],
)
def test_identity_length_limits_are_dns_limits(identity: object, problem: str) -> None:
    assert identity_problem(identity) == problem
    assert not is_valid_identity(identity)
    if isinstance(identity, str):
        with pytest.raises(ProtocolError) as err:
            directed_subject("provisioning", identity)
        assert problem in str(err.value) and len(str(err.value)) < 200


def test_longest_dns_names_are_valid() -> None:
    longest = ".".join(["a" * 63, "b" * 63, "c" * 63, "d" * 61])
    assert len(longest) == 253
    assert identity_problem(longest) is None
    assert is_valid_identity("a" * 63 + ".example.net")
    assert len(directed_subject("provisioning", longest)) < 4096


def test_new_request_id_is_a_version_4_uuid_like_go() -> None:
    """Built from random bytes without the UUID object: still a UUIDv4 (version, variant)."""
    import uuid

    for _ in range(500):
        parsed = uuid.UUID(new_request_id())
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122


def test_reply_prefix_is_cached_but_still_refuses_bad_input() -> None:
    from choria_core.protocol import reply_prefix

    assert reply_prefix("provisioning", "choria=a") is reply_prefix("provisioning", "choria=a")
    for collective, callerid in (("provisioning", ""), ("a b", "choria=a")):
        for _ in range(2):  # a refusal is not cached
            with pytest.raises(ProtocolError):
                reply_prefix(collective, callerid)

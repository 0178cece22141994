"""The hand-built envelope layers are byte for byte what the JSON encoder writes.

``encode_request``/``encode_reply`` build the secure and transport layers around the inner text
instead of re-encoding it (the inner text is escaped with two ``str.replace`` passes, the base64
data is not scanned at all). These tests compute every layer the plain way, with
``json.JSONEncoder(separators=(",", ":"), ensure_ascii=True)``, over payloads with quotes,
backslashes, control characters, non-ASCII text and astral characters, and compare bytes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import random
from collections.abc import Mapping
from typing import Any

import pytest

from choria_core.protocol import messages as m
from choria_core.protocol import transport
from choria_core.protocol.mcorpc import encode_rpc_request
from choria_core.protocol.signing import RequestSigner

_DUMPS = json.JSONEncoder(separators=(",", ":"), ensure_ascii=True).encode

NASTY = [
    "",
    "plain",
    'quote " and backslash \\ and both \\"',
    "control \x00\x01\n\r\t\x1f and DEL \x7f",
    "non-ASCII é ü ß 漢字 and astral 😀",
    "\\u0022 literally",
    "/slashes/ and </script>",
]


def _plain_transport(inner: bytes, headers: Mapping[str, Any]) -> bytes:
    data = base64.b64encode(inner).decode("ascii")
    return _DUMPS({"protocol": m.TRANSPORT_PROTOCOL, "data": data, "headers": headers}).encode(
        "ascii"
    )


def _random_text(rng: random.Random) -> str:
    alphabet = 'ab"\\\n\x00\x7fé漢😀 {}:,'
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("signed", [False, True])
def test_encode_request_bytes_equal_plain_encoding(signed: bool) -> None:
    rng = random.Random(7)
    signer = (
        RequestSigner(sign=lambda data: b"sig\x00", pubcert='cert "é"\n', caller="choria=c")
        if signed
        else None
    )
    payloads = NASTY + [_random_text(rng) for _ in range(50)]
    for text in payloads:
        req = m.new_request(
            agent="choria_provision",
            collective="provisioning",
            callerid="choria=prov",
            senderid="prov",
            payload=encode_rpc_request("choria_provision", "configure", {"config": text}),
            filter=m.Filter(agent=("choria_provision",)),
        )
        got = m.encode_request(
            req, reply_to="provisioning.reply.x." + req.requestid, mc_sender="p", signer=signer
        )
        inner_text = m._request_text(req)
        sig, pubcert = signer.sign_message(inner_text) if signer else ("insecure", "insecure")
        secure = _DUMPS(
            {
                "protocol": m.SECURE_REQUEST_PROTOCOL,
                "message": inner_text,
                "signature": sig,
                "pubcert": pubcert,
            }
        )
        headers = {"reply-to": "provisioning.reply.x." + req.requestid, "mc_sender": "p"}
        assert got == _plain_transport(secure.encode("ascii"), headers), repr(text)
        decoded, _ = m.decode_request(got)
        assert decoded.message == req.message


def test_encode_reply_bytes_equal_plain_encoding() -> None:
    rng = random.Random(11)
    req = m.new_request(
        agent="choria_provision",
        collective="provisioning",
        callerid="choria=prov",
        senderid="prov",
        payload='{"x":1}',
    )
    for text in NASTY + [_random_text(rng) for _ in range(50)]:
        reply = m.new_reply(req, senderid="node-1", message=text)
        seen_by = [("a", "b", 'c"é')]
        got = m.encode_reply(reply, mc_sender="node-1", seen_by=seen_by)
        reply_text = _DUMPS(
            {
                "protocol": m.REPLY_PROTOCOL,
                "message": text,
                "envelope": {
                    "requestid": reply.requestid,
                    "senderid": "node-1",
                    "agent": "choria_provision",
                    "time": reply.time,
                },
            }
        )
        digest = base64.b64encode(hashlib.sha256(reply_text.encode("utf-8")).digest()).decode()
        secure = _DUMPS(
            {"protocol": m.SECURE_REPLY_PROTOCOL, "message": reply_text, "hash": digest}
        )
        headers = {"mc_sender": "node-1", "seen-by": [list(t) for t in seen_by]}
        assert got == _plain_transport(secure.encode("ascii"), headers), repr(text)
        decoded, _ = m.decode_reply(got)
        assert decoded.message == text


def test_nested_is_the_encoders_string_literal_of_encoder_output() -> None:
    rng = random.Random(3)
    for _ in range(200):
        obj = {"k": _random_text(rng), "n": [1, None, True], _random_text(rng): "v"}
        text = _DUMPS(obj)
        assert m._nested(text) == _DUMPS(text)


def _plain_request_text(req: m.Request) -> str:
    return _DUMPS(
        {
            "protocol": m.REQUEST_PROTOCOL,
            "message": req.message,
            "envelope": {
                "requestid": req.requestid,
                "senderid": req.senderid,
                "callerid": req.callerid,
                "collective": req.collective,
                "agent": req.agent,
                "ttl": req.ttl,
                "time": req.time,
                "filter": req.filter.to_json_obj(),
            },
        }
    )


class _Str(str):
    """A str subclass: the assembled path leaves it to the encoder."""


def test_request_text_equals_plain_encoding() -> None:
    """Every envelope field and filter, nasty text included, is written as the encoder would
    (the assembled text and its cached parts), including the fallbacks."""
    rng = random.Random(5)
    filters = [
        m.Filter(),
        m.Filter(agent=("choria_provision",)),
        m.Filter(agent=('a"é',), identity=("n\x00", "😀"), cf_class=("c\\",)),
        m.Filter(fact=({"fact": "f", "operator": "==", "value": "é"},)),
        m.Filter(compound=({"expr": "x"}, [1, True])),
        m.Filter(compound=(1,)),
        m.Filter(compound=(True,)),  # 1 == True: must not share the cached text of (1,)
    ]
    texts = NASTY + [_random_text(rng) for _ in range(30)]
    for i, text in enumerate(texts):
        for flt in filters:
            req = m.Request(
                requestid=m.new_request_id() if i % 2 else text,
                senderid=text,
                callerid=texts[-i],
                collective=text[::-1],
                agent=_Str(text) if i % 5 == 0 else text,
                ttl=60 + i,
                time=True if i == 3 else 1_700_000_000 + i,
                filter=flt,
                message=text,
            )
            assert m._request_text(req) == _plain_request_text(req), (repr(text), flt)


def test_reply_text_equals_plain_encoding_in_every_field() -> None:
    rng = random.Random(9)
    for text in NASTY + [_random_text(rng) for _ in range(30)]:
        reply = m.Reply(requestid=text, senderid=text[::-1], agent=text, time=7, message=text)
        plain = _DUMPS(
            {
                "protocol": m.REPLY_PROTOCOL,
                "message": text,
                "envelope": {"requestid": text, "senderid": text[::-1], "agent": text, "time": 7},
            }
        )
        assert m._reply_text(reply) == plain
        odd = m.Reply(requestid=text, senderid="s", agent="a", time=False, message=_Str(text))
        assert m._reply_text(odd) == _DUMPS(
            {
                "protocol": m.REPLY_PROTOCOL,
                "message": text,
                "envelope": {"requestid": text, "senderid": "s", "agent": "a", "time": False},
            }
        )


def test_loads_accepts_and_refuses_what_json_loads_does() -> None:
    texts = [
        '{"a":1}',
        ' \n\t{"a":[1,2,{"b":null}]}\r\n ',
        '"x"',
        "[]",
        '{"é":"\\u00e9\\ud83d\\ude00"}',
        '{"a":1,"a":2}',
    ]
    good: list[str | bytes] = [*texts]
    good += [t.encode(enc) for t in texts for enc in ("utf-8", "utf-16", "utf-32-le")]
    for doc in good:
        assert transport._loads(doc) == json.loads(doc), doc
    bad: list[str | bytes] = [
        "",
        "   ",
        '{"a":1} x',
        '{"a":1}{}',
        "\ufeff{}",
        "{",
        b"\xff\xfe\x00",
        b'{"a":"\xff"}',
        "NaNx",
    ]
    for doc in bad:
        with pytest.raises(ValueError):
            json.loads(doc)
        with pytest.raises(ValueError):
            transport._loads(doc)

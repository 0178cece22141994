"""What one decision costs the callout: an admission, a refusal, a fast refusal (measurement).

Requests are built exactly as nats-server builds them (server-signed, xkey-sealed) and decided
in process, so the figures are the callout's own CPU cost per request, without the network.
Printed with ``-s`` and recorded in docs/broker.md; a slow machine never fails this test, only
a wrong decision does.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric import ed25519

from tests.provisioner.broker.test_callout_unit import _from, _response, _service

N = 200


def _per_op_us(fn: Callable[[], object], n: int = N) -> float:
    started = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - started) / n * 1e6


async def test_cost_per_admission_and_per_refusal(
    signing_key: ed25519.Ed25519PrivateKey, make_token: Callable[..., str]
) -> None:
    svc = _service(signing_key, source_rate=0)
    token, wrong = make_token(), make_token(key=ed25519.Ed25519PrivateKey.generate())
    good = _from(svc, "192.0.2.1", {"auth_token": token, "name": "n.example.net"})
    bad = _from(svc, "192.0.2.1", {"auth_token": wrong, "name": "n.example.net"})

    async def timed(req: tuple[bytes, dict[str, str]]) -> float:
        started = time.perf_counter()
        for _ in range(N):
            await svc.handle(*req)
        return (time.perf_counter() - started) / N * 1e6

    admit_us = await timed(good)
    refuse_us = await timed(bad)
    overloaded_us = _per_op_us(lambda: svc.refuse(*good, "overloaded"))
    limited = _service(signing_key, source_rate=0.001, source_burst=1)
    req = _from(limited, "192.0.2.9", {"auth_token": token, "name": "x.example.net"})
    await limited.handle(*req)  # spends the burst
    started = time.perf_counter()
    for _ in range(N):
        await limited.handle(*req)
    limited_us = (time.perf_counter() - started) / N * 1e6
    print(
        f"\ncallout cost per request (µs): admission {admit_us:.0f}, refusal (bad token) "
        f"{refuse_us:.0f}, rate_limited {limited_us:.0f}, overloaded {overloaded_us:.0f}"
    )
    assert svc.stats.admitted == N and svc.stats.refused["overloaded"] == N
    assert limited.stats.refused["rate_limited"] == N
    assert "jwt" in _response(svc, await svc.handle(*good))

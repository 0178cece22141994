"""The checks a node applies to a request before running it (go-choria's acceptance rules).

Split from :mod:`choria_core.protocol.messages` (which re-exports :func:`check_request`).
"""

from __future__ import annotations

import re
import time as _time
from collections.abc import Sequence
from functools import lru_cache
from typing import TYPE_CHECKING

from choria_core.protocol.errors import fail

if TYPE_CHECKING:
    from choria_core.protocol.messages import Request

# --------------------------------------------------------------------------- node-side checks


@lru_cache(maxsize=512)
def _compile(pattern: str) -> re.Pattern[str] | None:
    try:
        return re.compile(pattern)
    except (re.error, RecursionError, OverflowError):
        return None  # Go: an invalid regexp never matches


def _matches(entry: str, value: str) -> bool:
    if len(entry) >= 2 and entry[0] == "/" and entry[-1] == "/":
        rx = _compile(entry[1:-1])
        return rx is not None and rx.search(value) is not None
    return entry == value


def check_request(
    req: Request,
    *,
    identity: str,
    collectives: Sequence[str],
    agents: Sequence[str],
    now: float | None = None,
) -> None:
    """The node's acceptance checks; raises ProtocolError naming the check.

    Collective membership, TTL window ``now - ttl < time < now + ttl`` (strict), then the
    filter: identity (OR, exact or ``/regex/`` search), agent (AND over entries, each matching
    one loaded agent), and any non-empty fact / cf_class / compound section is *no match*
    (this node emulation has no facts engine; a provisioner never filters on facts).
    """
    if req.collective not in collectives:
        fail(f"collective check: {req.collective!r} is not on the list of known collectives")
    t = _time.time() if now is None else now
    if not (t - req.ttl < req.time < t + req.ttl):
        fail(
            f"ttl check: request time {req.time} is outside the ttl window of {req.ttl}s "
            f"around {int(t)}"
        )
    flt = req.filter
    if flt.fact or flt.cf_class or flt.compound:
        fail("filter check: fact, class and compound filters are not supported in provisioning")
    if flt.identity and not any(_matches(e, identity) for e in flt.identity):
        fail(f"filter check: identity {identity!r} does not match the identity filter")
    for entry in flt.agent:
        if not any(_matches(entry, a) for a in agents):
            fail(f"filter check: agent filter {entry!r} matches no loaded agent")

"""Test helper for the ed25519 feature: places the node on the overlay broker and sends server
claims chosen by the node's name (no certificate: ed25519 nodes get a server JWT instead).

Arguments: the ``localca_helper.py`` ones (``--overlay-url``, ``--overlay-user``,
``--overlay-password-file``; the others are accepted and ignored).

* ``greedy*`` nodes: ``server_claims.exp`` 100 years ahead, past any chain issuer's expiry;
* ``rogue*`` nodes: a permission no server token may carry (the signer refuses it);
* any other node: no server claims.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

from helpers.models import HelperInput
from helpers.sdk import run


def _args() -> argparse.Namespace:
    p = argparse.ArgumentParser()
    p.add_argument("--overlay-url", required=True)
    p.add_argument("--overlay-user", default="")
    p.add_argument("--overlay-password-file", default="")
    args, _ = p.parse_known_args()
    return args


ARGS = _args()


def handler(inp: HelperInput) -> dict[str, Any]:
    config = {
        "identity": inp.identity,
        "plugin.choria.server.provision": "false",
        "plugin.choria.middleware_hosts": ARGS.overlay_url,
        "collectives": "choria",
    }
    if ARGS.overlay_user:
        config["plugin.nats.user"] = ARGS.overlay_user
        config["plugin.nats.pass"] = Path(ARGS.overlay_password_file).read_text().strip()
    out: dict[str, Any] = {"configuration": config, "msg": "placed"}
    if inp.identity.startswith("greedy"):
        out["server_claims"] = {"exp": int(time.time()) + 100 * 365 * 86400}
    elif inp.identity.startswith("rogue"):
        out["server_claims"] = {"permissions": {"system_user": True}}
    return out


if __name__ == "__main__":
    run(handler)

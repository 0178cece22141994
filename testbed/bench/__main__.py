"""``python -m testbed.bench responder URL``: the floor's responder process (internal)."""

from __future__ import annotations

import argparse
import asyncio
from collections.abc import Sequence

from testbed.bench.floor import responder_main


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m testbed.bench")
    sub = parser.add_subparsers(dest="cmd", required=True)
    resp = sub.add_parser("responder", help="floor responder (internal)")
    resp.add_argument("url")
    args = parser.parse_args(argv)
    if args.cmd == "responder":
        asyncio.run(responder_main(args.url))


if __name__ == "__main__":
    main()

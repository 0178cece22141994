"""`python -m helpers.reference --config FILE [--persistent]`: the reference helper as a program."""

from __future__ import annotations

import argparse
import os
import sys

from helpers.reference import CONFIG_ENV, make_handler
from helpers.reference.config import ReferenceConfigError
from helpers.sdk import run


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the configuration, serve exec or persistent mode."""
    parser = argparse.ArgumentParser(
        prog="python -m helpers.reference",
        description="Reference provisioning helper: overlay placement, CA signing, config.",
    )
    parser.add_argument(
        "--config", default=os.environ.get(CONFIG_ENV, ""), help="reference helper YAML file"
    )
    parser.add_argument(
        "--persistent", action="store_true", help="serve one JSON object per line until EOF"
    )
    args = parser.parse_args(argv)
    if not args.config:
        parser.error(f"--config FILE (or env {CONFIG_ENV}) is required")
    try:
        handle = make_handler(args.config)
    except (ReferenceConfigError, ValueError, OSError) as exc:
        print(f"reference helper: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    run(handle, argv=["--persistent"] if args.persistent else [])


if __name__ == "__main__":
    main()

"""`python -m helpers.reference --config FILE [--persistent | --fork-server]`: the helper.

In exec mode (`--config FILE` and nothing else) a request first tries the fast path
(`helpers.reference.fast`: a pre-parsed configuration, no pydantic); when it cannot answer,
the full path below runs on the same input bytes and refreshes the pre-parsed configuration.

With `--fork-server` the same request is answered by a child of a warm fork server
(`forkserver.py`; this process is only its light client, `forkserver_client.py`), or here
when no server can take it.
"""

from __future__ import annotations

import sys


def _fast(argv: list[str]) -> tuple[str, bytes, bool] | None:
    """Try the exec fast path; returns (config, input, cache_current) for the full path."""
    from helpers.reference.fast import config_from_argv, try_exec

    config = config_from_argv(argv)
    if config is None:
        return None
    data = sys.stdin.buffer.read()
    answered = try_exec(config, data, sys.stdout.buffer)
    if answered:
        raise SystemExit(0)
    return config, data, answered is False


def _fork_server(args: list[str]) -> None:
    """`--fork-server`: the fork server's client; `--fork-server-daemon`: the server itself."""
    if "--fork-server-daemon" in args:
        from helpers.reference.forkserver import serve

        serve([a for a in args if a != "--fork-server-daemon"])
        return
    from helpers.reference.forkserver_client import run

    run([a for a in args if a != "--fork-server"], main)


def main(argv: list[str] | None = None) -> None:
    """Parse arguments, load the configuration, serve exec or persistent mode."""
    args_list = sys.argv[1:] if argv is None else list(argv)
    if "--fork-server" in args_list or "--fork-server-daemon" in args_list:
        _fork_server(args_list)
        return
    fast = _fast(args_list)

    import argparse
    import io
    import os

    from helpers.reference import CONFIG_ENV, make_handler
    from helpers.reference.config import ReferenceConfigError
    from helpers.sdk import run, serve_exec

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
    parser.add_argument(  # handled before parsing (see _fork_server); listed for --help
        "--fork-server",
        action="store_true",
        help="exec mode, answered by a child of a warm fork server (docs/helpers.md)",
    )
    args = parser.parse_args(args_list)
    if not args.config:
        parser.error(f"--config FILE (or env {CONFIG_ENV}) is required")
    try:
        handle = make_handler(args.config)
    except (ReferenceConfigError, ValueError, OSError) as exc:
        print(f"reference helper: {exc}", file=sys.stderr)
        raise SystemExit(2) from None
    if fast is None:
        run(handle, argv=["--persistent"] if args.persistent else [])
        return
    config, data, cache_current = fast
    if not cache_current:
        from helpers.reference.fast import write_cache

        helper = handle.helper  # type: ignore[attr-defined]
        write_cache(config, helper.cfg, helper)
    code = serve_exec(handle, io.BytesIO(data), sys.stdout.buffer)
    sys.stderr.flush()
    raise SystemExit(code)


if __name__ == "__main__":
    main()

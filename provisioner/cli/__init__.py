"""The ``provisioner`` console command: one typer app with a sub-app per area."""

from __future__ import annotations

import typer

from provisioner.cli import (
    audit,
    bench,
    broker,
    config,
    demo,
    election,
    fleet,
    helper,
    jwt,
    node,
    ops,
    overlays,
    revoke,
    run,
    status,
)

app = typer.Typer(
    name="provisioner",
    help="Fleet provisioning server for Choria-compatible nodes.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
)

app.add_typer(jwt.app, name="jwt", help="Create, view and verify provisioning tokens.")
app.add_typer(config.app, name="config", help="Check provisioner configuration files.")
app.add_typer(node.app, name="node", help="Run a Choria-compatible node agent.")
app.add_typer(fleet.app, name="fleet", help="Simulate a fleet of unprovisioned nodes.")
app.add_typer(broker.app, name="broker", help="Broker isolation: config and auth callout.")
app.add_typer(overlays.app, name="overlays", help="Overlay registry, placement and drain planning.")
app.add_typer(helper.app, name="helper", help="Helper tools (dry runs).")
app.add_typer(election.app, name="election", help="Leader election status.")
app.add_typer(audit.app, name="audit", help="Audit log tools: verify the hash chain.")
app.add_typer(ops.app, name="ops", help="Fleet operations jobs: re-provision nodes, paced.")
run.register(app)
status.register(app)
revoke.register(app)
demo.register(app)
bench.register(app)


def main() -> None:
    """Console entry point."""
    app()


if __name__ == "__main__":
    main()

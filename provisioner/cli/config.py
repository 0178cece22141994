"""`provisioner config` commands: write a sample configuration, check one before deploying it."""

from __future__ import annotations

import json
from pathlib import Path

import typer
from rich.console import Console

from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail
from provisioner.config import ConfigError, ProvisionerConfig, load_config
from provisioner.sample_config import PLACEHOLDER, placeholders, render_sample

app = typer.Typer(
    help="Write a sample provisioner configuration, check one, show the effective one.",
    no_args_is_help=True,
)

_SECRET_KEYS = ("token", "broker_provisioning_password")


@app.callback()
def _group() -> None:
    """Write, check and show provisioner configuration files."""


def _load_or_exit(file: Path) -> ProvisionerConfig:
    try:
        return load_config(file)
    except ConfigError as exc:
        typer.echo(f"invalid: {exc}", err=True)
        raise typer.Exit(EXIT_USAGE) from None


def _human(seconds: float) -> str:
    for unit, size in (("y", 365 * 86400), ("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)}{unit}"
    return f"{seconds:g}s"


@app.command("check")
def check_cmd(file: Path = typer.Argument(..., help="The provisioner YAML file.")) -> None:
    """Validate FILE. Exit 0 with a short summary, or 2 naming the bad key and the file."""
    cfg = _load_or_exit(file)
    features = [name for name, on in cfg.features.model_dump().items() if on] or ["none"]
    out = Console(width=160, soft_wrap=True)
    out.print(f"{file}: OK", highlight=False)
    lines = [
        ("identity", cfg.identity),
        ("brokers", ", ".join(cfg.broker_urls)),
        ("helper", f"{cfg.helper or '(none)'} [{cfg.helper_mode}]"),
        ("features", ", ".join(features)),
        ("interval", _human(cfg.interval)),
        ("workers", str(cfg.workers)),
        ("concurrency", str(cfg.concurrency)),
        ("leader election", "on" if cfg.leader_election else "off"),
        ("token", "set" if cfg.token else "NOT SET (nodes will refuse provisioning requests)"),
    ]
    for name, value in lines:
        out.print(f"  {name:<16} {value}", highlight=False, markup=False)
    for key in placeholders(cfg):
        typer.echo(
            f"warning: {key} is still a placeholder ({PLACEHOLDER}...): replace it before "
            "deploying",
            err=True,
        )


@app.command("init")
def init_cmd(
    out: Path = typer.Option(..., "--out", help="Where to write the sample ('-': stdout)."),
    force: bool = typer.Option(False, "--force", help="Overwrite FILE if it exists."),
) -> None:
    """Write a commented sample configuration that `config check` accepts as written.

    Every key is listed with a safe default or a commented example. Secrets to be matched with
    the nodes' tokens and the broker are CHANGE-ME placeholders (`config check` warns about
    each one left); the admin API token is generated at random. The file is written with
    mode 0600.
    """
    from choria_core.securefile import write_atomic

    text = render_sample()
    if str(out) == "-":
        typer.echo(text, nl=False)
        return
    if (out.exists() or out.is_symlink()) and not force:
        raise fail(f"{out} exists; pass --force to overwrite it", EXIT_USAGE)
    try:
        write_atomic(out, text.encode("utf-8"), 0o600)
    except OSError as exc:
        raise fail(f"cannot write {out}: {exc.strerror or exc}", EXIT_FAILED) from None
    typer.echo(
        f"wrote {out}; fill in the {PLACEHOLDER} values, then: provisioner config check {out}"
    )


@app.command("show")
def show_cmd(file: Path = typer.Argument(..., help="The provisioner YAML file.")) -> None:
    """Print the effective configuration (defaults filled in, paths resolved) as JSON.

    Secrets (token, broker_provisioning_password, admin.token) are masked.
    """
    cfg = _load_or_exit(file)
    data = cfg.model_dump(mode="json")
    for key in _SECRET_KEYS:
        if data.get(key):
            data[key] = "********"
    if data["admin"].get("token"):
        data["admin"]["token"] = "********"
    typer.echo(json.dumps(data, indent=2))

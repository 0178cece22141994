"""`provisioner overlays` commands: registry status, what-if placement, drain planning.

- ``status``: each overlay's state and fill (from the KV ledger when ``--nats-url`` is given).
- ``simulate``: place a synthetic fleet with the registry's policies in memory and report.
- ``plan-drain``: which nodes would leave an overlay, and where they would go.
- ``drain``: the same plan, or with ``--execute`` a ``drain`` job that moves them
  (:mod:`provisioner.cli.overlays_drain`).
- ``publish``: store the registry in a KV bucket so several provisioners share it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any

import typer
import yaml
from rich.console import Console
from rich.table import Table

from overlays.drain import normalize_assignments, plan_drain
from overlays.kvledger import DEFAULT_BUCKET, KVLedger
from overlays.ledger import Assignment, LedgerError, MemoryLedger
from overlays.model import OverlayConfigError
from overlays.placer import Placer
from overlays.registry import REGISTRY_BUCKET, OverlayRegistry
from provisioner.cli._exit import EXIT_FAILED, EXIT_USAGE, fail

app = typer.Typer(
    help="Overlay registry, placement what-ifs and drain planning.", no_args_is_help=True
)

_OVERLAYS_OPT = typer.Option(..., "--overlays", help="Overlay registry YAML file.")
_URL_OPT = typer.Option(None, "--nats-url", help="NATS URL of the shared ledger.")
_USER_OPT = typer.Option(None, "--user", help="NATS user.", envvar="PROVISIONER_NATS_USER")
_PASSWORD_OPT = typer.Option(
    None,
    "--password",
    help="NATS password (prefer the environment variable).",
    envvar="PROVISIONER_NATS_PASSWORD",
)
_BUCKET_OPT = typer.Option(DEFAULT_BUCKET, "--bucket", help="Ledger KV bucket.")
_ASSIGNMENTS_OPT = typer.Option(
    None, "--assignments", help="JSON/YAML file: identity -> overlay (or {overlay, group})."
)
_LIMIT_OPT = typer.Option(20, "--limit", help="Moves to list in the table (0 = all).")
_CONNECT_TIMEOUT_S = 5.0


def _console() -> Console:
    return Console(width=160)


def _load(path: Path) -> OverlayRegistry:
    try:
        return OverlayRegistry.from_yaml(path)
    except OverlayConfigError as err:
        raise fail(str(err), EXIT_USAGE) from None


async def _connect(url: str, user: str | None, password: str | None) -> Any:
    """Connect once; fail on the first error instead of nats-py's endless first-connect retry."""
    import nats

    first_error: asyncio.Future[Exception] = asyncio.get_running_loop().create_future()

    async def on_error(exc: Exception) -> None:
        if not first_error.done():
            first_error.set_result(exc)

    connect = asyncio.ensure_future(
        nats.connect(
            url,
            user=user,
            password=password,
            connect_timeout=_CONNECT_TIMEOUT_S,
            allow_reconnect=False,
            max_reconnect_attempts=0,
            error_cb=on_error,
        )
    )
    waiters: set[asyncio.Future[Any]] = {connect, first_error}
    await asyncio.wait(waiters, timeout=2 * _CONNECT_TIMEOUT_S, return_when=asyncio.FIRST_COMPLETED)
    if connect.done():
        return connect.result()
    connect.cancel()
    await asyncio.gather(connect, return_exceptions=True)
    if first_error.done():
        raise first_error.result()
    raise TimeoutError(f"no answer within {2 * _CONNECT_TIMEOUT_S:g}s")


async def _with_ledger(url: str, user: str | None, password: str | None, bucket: str) -> Any:
    try:
        nc = await _connect(url, user, password)
    except Exception as err:
        # The exception text never carries the password; the type and text say what failed.
        raise fail(
            f"cannot connect to NATS at {url}: {type(err).__name__}: {err}", EXIT_FAILED
        ) from None
    return nc, KVLedger(nc.jetstream(), bucket)


async def _ledger_counts(
    url: str, user: str | None, password: str | None, bucket: str
) -> dict[str, int]:
    nc, ledger = await _with_ledger(url, user, password, bucket)
    try:
        counts: dict[str, int] = await ledger.counts()
        return counts
    except LedgerError as err:
        raise fail(str(err), EXIT_FAILED) from None
    finally:
        await nc.close()


async def _ledger_assignments(
    url: str, user: str | None, password: str | None, bucket: str
) -> dict[str, Assignment]:
    nc, ledger = await _with_ledger(url, user, password, bucket)
    try:
        found: dict[str, Assignment] = await ledger.assignments()
        return found
    except LedgerError as err:
        raise fail(str(err), EXIT_FAILED) from None
    finally:
        await nc.close()


@app.command()
def status(
    overlays: Path = _OVERLAYS_OPT,
    nats_url: str | None = _URL_OPT,
    user: str | None = _USER_OPT,
    password: str | None = _PASSWORD_OPT,
    bucket: str = _BUCKET_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print JSON instead of a table."),
) -> None:
    """Show each overlay's state and fill (live from the ledger with --nats-url)."""
    registry = _load(overlays)
    counts: dict[str, int] | None = None
    if nats_url:
        counts = asyncio.run(_ledger_counts(nats_url, user, password, bucket))
    rows = []
    for ov in registry:
        used = counts.get(ov.name, 0) if counts is not None else None
        rows.append(
            {
                "name": ov.name,
                "region": ov.region,
                "state": ov.state,
                "weight": ov.weight,
                "capacity": ov.capacity,
                "used": used,
                "free": None if used is None else max(0, ov.capacity - used),
                "fill": None if used is None or not ov.capacity else used / ov.capacity,
                "brokers": ov.brokers,
            }
        )
    if as_json:
        typer.echo(
            json.dumps({"source": "ledger" if counts is not None else "registry", "overlays": rows})
        )
        return
    title = f"Overlays ({'ledger ' + bucket if counts is not None else 'registry only'})"
    table = Table(title=title)
    for col in (
        "Overlay",
        "Region",
        "State",
        "Weight",
        "Capacity",
        "Used",
        "Free",
        "Fill",
        "Brokers",
    ):
        table.add_column(
            col,
            justify="right" if col in {"Weight", "Capacity", "Used", "Free", "Fill"} else "left",
        )
    for r in rows:
        style = {"cordoned": "yellow", "draining": "red"}.get(str(r["state"]), "")
        table.add_row(
            str(r["name"]),
            str(r["region"]),
            f"[{style}]{r['state']}[/{style}]" if style else str(r["state"]),
            f"{r['weight']:g}",
            str(r["capacity"]),
            "-" if r["used"] is None else str(r["used"]),
            "-" if r["free"] is None else str(r["free"]),
            "-" if r["fill"] is None else f"{r['fill']:.1%}",
            ", ".join(r["brokers"]),  # type: ignore[arg-type]
        )
    _console().print(table)


async def _simulate(
    registry: OverlayRegistry, nodes: int, seed: int
) -> tuple[Counter[str], Counter[str], dict[str, set[str]]]:
    from node_agent.facts import synthetic_facts, synthetic_identity

    placer = Placer(registry, MemoryLedger(), counts_max_age=0)
    placed: Counter[str] = Counter()
    deferred: Counter[str] = Counter()
    groups: dict[str, set[str]] = {}
    affinity = registry.placement.affinity
    for i in range(nodes):
        facts = synthetic_facts(i, seed)
        p = await placer.place(synthetic_identity(i), facts, commit=True)
        if p.overlay is None:
            deferred[p.reason] += 1
            continue
        placed[p.overlay] += 1
        if affinity and p.group is not None:
            groups.setdefault(p.group, set()).add(p.overlay)
    return placed, deferred, groups


@app.command()
def simulate(
    overlays: Path = _OVERLAYS_OPT,
    nodes: int = typer.Option(..., "--nodes", min=0, help="Synthetic fleet size."),
    facts_seed: int = typer.Option(0, "--facts-seed", help="Seed of the synthetic facts."),
    cordon: list[str] = typer.Option(
        [], "--cordon", help="What-if: treat this overlay as cordoned (repeatable)."
    ),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """What-if: place a synthetic fleet with the registry's policies (in memory only)."""
    registry = _load(overlays)
    for name in cordon:
        try:
            registry = registry.with_state(name, "cordoned")
        except KeyError as err:
            raise fail(str(err.args[0]), EXIT_USAGE) from None
    t0 = time.perf_counter()
    placed, deferred, groups = asyncio.run(_simulate(registry, nodes, facts_seed))
    elapsed = time.perf_counter() - t0
    result: dict[str, Any] = {
        "nodes": nodes,
        "facts_seed": facts_seed,
        "placed": {ov.name: placed.get(ov.name, 0) for ov in registry},
        "unplaced": sum(deferred.values()),
        "over_capacity": [ov.name for ov in registry if placed.get(ov.name, 0) > ov.capacity],
        "fill": {
            ov.name: round(placed.get(ov.name, 0) / ov.capacity, 4) if ov.capacity else None
            for ov in registry
        },
        "affinity_fact": registry.placement.affinity,
        "affinity_groups": len(groups),
        "affinity_groups_split": sum(1 for g in groups.values() if len(g) > 1),
        "defer_reasons": dict(deferred.most_common(10)),
        "seconds": round(elapsed, 3),
    }
    if as_json:
        typer.echo(json.dumps(result))
        return
    table = Table(title=f"Simulated placement of {nodes} nodes (seed {facts_seed})")
    for col in ("Overlay", "State", "Placed", "Capacity", "Fill"):
        table.add_column(col, justify="left" if col in {"Overlay", "State"} else "right")
    for ov in registry:
        n = placed.get(ov.name, 0)
        table.add_row(
            ov.name,
            ov.state,
            str(n),
            str(ov.capacity),
            f"{n / ov.capacity:.1%}" if ov.capacity else "-",
        )
    con = _console()
    con.print(table)
    con.print(
        f"unplaced: {result['unplaced']}  over capacity: {result['over_capacity'] or 'none'}  "
        f"affinity groups: {result['affinity_groups']} "
        f"(split across overlays: {result['affinity_groups_split']})  "
        f"{nodes / elapsed if elapsed else 0:.0f} placements/s",
        highlight=False,
    )
    for reason, n in deferred.most_common(5):
        con.print(f"  deferred {n}: {reason}", highlight=False)


def _drain_inputs(
    overlays: Path,
    name: str,
    assignments: Path | None,
    ledger: tuple[str | None, str | None, str | None, str],
    *,
    required: bool,
) -> tuple[OverlayRegistry, dict[str, Assignment] | None]:
    """The registry (NAME in it) and the nodes' assignments from ``--assignments`` or the
    ledger (``(nats_url, user, password, bucket)``): exactly one of them when ``required``,
    at most one otherwise (``None`` when neither is given)."""
    registry = _load(overlays)
    if name not in registry:
        raise fail(f"unknown overlay {name!r}; known: {', '.join(registry.names)}", EXIT_USAGE)
    nats_url, user, password, bucket = ledger
    if required and (assignments is None) == (nats_url is None):
        raise fail("give exactly one of --assignments FILE or --nats-url URL", EXIT_USAGE)
    if assignments is not None and nats_url is not None:
        raise fail("give at most one of --assignments FILE or --nats-url URL", EXIT_USAGE)
    if assignments is not None:
        try:
            return registry, normalize_assignments(
                yaml.safe_load(assignments.read_text(encoding="utf-8"))
            )
        except OSError as err:
            raise fail(f"{assignments}: cannot read: {err.strerror or err}", EXIT_USAGE) from None
        except (yaml.YAMLError, ValueError) as err:
            raise fail(f"{assignments}: {err}", EXIT_USAGE) from None
    if nats_url is not None:
        return registry, asyncio.run(_ledger_assignments(nats_url, user, password, bucket))
    return registry, None


@app.command("plan-drain")
def plan_drain_cmd(
    name: str = typer.Argument(..., help="Overlay to drain."),
    overlays: Path = _OVERLAYS_OPT,
    assignments: Path | None = _ASSIGNMENTS_OPT,
    nats_url: str | None = _URL_OPT,
    user: str | None = _USER_OPT,
    password: str | None = _PASSWORD_OPT,
    bucket: str = _BUCKET_OPT,
    limit: int = _LIMIT_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the full plan as JSON."),
) -> None:
    """Plan draining overlay NAME: which nodes move where (nothing is changed)."""
    registry, current = _drain_inputs(
        overlays, name, assignments, (nats_url, user, password, bucket), required=True
    )
    assert current is not None
    plan = plan_drain(registry, name, current)
    if as_json:
        typer.echo(json.dumps(plan.to_dict()))
        return
    con = _console()
    summary = Table(title=f"Drain {name}: {len(plan.moves)} node(s) to move")
    summary.add_column("Target")
    summary.add_column("Nodes", justify="right")
    summary.add_column("Fill after", justify="right")
    for target, n in plan.by_target.items():
        ov = registry.get(target) if target in registry else None
        fill = f"{plan.fill_after[target] / ov.capacity:.1%}" if ov and ov.capacity else "-"
        summary.add_row(target, str(n), fill)
    con.print(summary)
    con.print(
        f"groups split: {plan.groups_split}  unplaceable: {plan.unplaceable}", highlight=False
    )
    if plan.moves:
        moves = Table(title="Moves" + (f" (first {limit})" if limit else ""))
        for col in ("Node", "Group", "To", "Why"):
            moves.add_column(col)
        for m in plan.moves[: limit or None]:
            moves.add_row(m.identity, m.group or "-", m.target or "(no room)", m.reason)
        con.print(moves)


@app.command("drain")
def drain_cmd(
    name: str = typer.Argument(..., help="Overlay to drain."),
    overlays: Path = _OVERLAYS_OPT,
    assignments: Path | None = _ASSIGNMENTS_OPT,
    nats_url: str | None = _URL_OPT,
    user: str | None = _USER_OPT,
    password: str | None = _PASSWORD_OPT,
    bucket: str = _BUCKET_OPT,
    limit: int = _LIMIT_OPT,
    as_json: bool = typer.Option(False, "--json", help="Print the plan (or the job) as JSON."),
    execute: bool = typer.Option(
        False, "--execute", help="Move the nodes: a drain job through the admin API."
    ),
    rate: str | None = typer.Option(None, "--rate", help="With --execute: N/min, N/s or N/h."),
    config: Path | None = typer.Option(
        None, "--config", "-c", help="With --execute: provisioner YAML (admin URL and token)."
    ),
    url: str | None = typer.Option(None, "--url", help="With --execute: admin API base URL."),
    token: str | None = typer.Option(
        None,
        "--token",
        envvar="PROVISIONER_ADMIN_TOKEN",
        help="Admin token (prefer the environment variable or --token-file: argv is visible).",
    ),
    token_file: Path | None = typer.Option(None, "--token-file", help="File holding the token."),
) -> None:
    """Drain overlay NAME: the plan (as plan-drain) by default; --execute moves its nodes."""
    if not execute:
        plan_drain_cmd(
            name, overlays, assignments, nats_url, user, password, bucket, limit, as_json
        )
        return
    from provisioner.cli.overlays_drain import execute_drain

    registry, current = _drain_inputs(
        overlays, name, assignments, (nats_url, user, password, bucket), required=False
    )
    execute_drain(
        registry,
        name,
        current,
        rate=rate,
        admin=(config, url, token, token_file),
        as_json=as_json,
    )


@app.command()
def publish(
    overlays: Path = _OVERLAYS_OPT,
    nats_url: str = typer.Option(..., "--nats-url", help="NATS URL."),
    user: str | None = _USER_OPT,
    password: str | None = _PASSWORD_OPT,
    bucket: str = typer.Option(REGISTRY_BUCKET, "--bucket", help="Registry KV bucket."),
) -> None:
    """Validate the registry file and store it in KV for provisioners to share."""
    registry = _load(overlays)

    async def run() -> int:
        nc, _ = await _with_ledger(nats_url, user, password, DEFAULT_BUCKET)
        try:
            rev: int = await registry.publish(nc.jetstream(), bucket)
            return rev
        finally:
            await nc.close()

    rev = asyncio.run(run())
    typer.echo(f"published {len(registry)} overlays to kv://{bucket}/registry (revision {rev})")

"""The upgrade step: move a node to the helper's ``upgrade`` version before configuring it.

As the anchor (``host/host.go`` ``handleHostUpgrade``), with ``features.upgrades`` on and a
helper answer naming a version in ``upgrade``:

1. the node's version and ``upgradable`` come from its ``rpcutil#inventory`` reply;
2. the version is compared with the target the way the anchor does (RPM version equality:
   ``1.0`` = ``1.00``, epoch ``0:`` = none); equal means nothing to do;
3. otherwise ``choria_provision#release_update`` is called with ``repository``
   (``upgrades_repository``), ``token`` (the provisioner's ``token``, as the anchor sends it)
   and ``version``, *before* anything is configured. The node installs the release and
   restarts itself into provisioning mode at the new version, so the attempt ends here with
   the decision ``upgraded``: nothing is configured now, the node is provisioned afresh
   (helper asked again) when it comes back.

A failure (no repository configured, no version in the inventory, a node that is not
upgradable, ``release_update`` refused) fails the attempt with reason ``upgrade_failed`` or
``upgrades_not_configured`` and the node stays provisionable; with ``upgrades_optional: true``
it is logged as a warning and provisioning continues at the node's current version, as the
anchor does. Every outcome is counted in ``choria_provisioner_upgrades_total{status}``
(``upgraded``, ``current``, ``failed``, ``skipped`` for a failure ``upgrades_optional``
let pass). ``features.upgrades: false`` (the default) never upgrades.
"""

from __future__ import annotations

import json
import logging
import re

from choria_core.remote_text import clean_remote_text
from provisioner.attempt import (
    PROVISION_AGENT,
    Attempt,
    Outcome,
    PipelineContext,
    PipelineError,
    fail,
    run_step,
)
from provisioner.fencing import safe_point
from provisioner.reasons import Decision, Reason
from provisioner.rpc import RPCStatusError

__all__ = ["node_version", "same_version", "upgrade"]

log = logging.getLogger(__name__)

STAGE = "upgrade"
_SEGMENT_RE = re.compile(r"[A-Za-z]+|[0-9]+|~")


def _segments(text: str) -> list[str]:
    # Numbers compare without their leading zeros, as rpmvercmp does.
    return [s.lstrip("0") or "0" if s.isdigit() else s for s in _SEGMENT_RE.findall(text)]


def _parts(version: str) -> tuple[int, list[str], list[str]]:
    epoch = 0
    head, sep, rest = version.partition(":")
    if sep:
        try:
            epoch = int(head.strip())
        except ValueError:
            epoch = 0
        version = rest
    ver, _, release = version.partition("-")
    return epoch, _segments(ver), _segments(release)


def same_version(current: str, target: str) -> bool:
    """Whether two versions are equal by the anchor's RPM rules (``host/version.go``)."""
    return current == target or _parts(current) == _parts(target)


def node_version(att: Attempt) -> tuple[str, bool]:
    """The node's ``version`` and ``upgradable`` from its inventory reply (``("", False)``)."""
    try:
        inventory = json.loads(att.inventory) if att.inventory else {}
    except ValueError:
        inventory = {}
    if not isinstance(inventory, dict):
        return "", False
    version = inventory.get("version")
    return (version if isinstance(version, str) else ""), inventory.get("upgradable") is True


async def upgrade(ctx: PipelineContext, att: Attempt) -> Outcome | None:
    """Run the upgrade step when it applies; an ``upgraded`` outcome ends the attempt.

    Returns None to carry on (no upgrade asked, already at the version, or an optional
    upgrade that failed); raises :class:`PipelineError` when a required upgrade failed.
    """
    out = att.output
    if out is None or not out.upgrade or not ctx.config.features.upgrades:
        return None
    metrics = ctx.metrics
    done: list[bool] = []

    async def step(ctx: PipelineContext, att: Attempt) -> None:
        done.append(await release_update(ctx, att))

    try:
        await run_step(ctx, att, STAGE, step)
    except PipelineError as exc:
        if exc.reason in (Reason.NOT_LEADER, Reason.FENCED) or not ctx.config.upgrades_optional:
            metrics.upgrades.labels(metrics.site, "failed").inc()
            raise
        metrics.upgrades.labels(metrics.site, "skipped").inc()
        log.warning(
            "could not upgrade %s to %s, continuing (upgrades_optional): %s",
            att.identity,
            clean_remote_text(out.upgrade, 64),
            clean_remote_text(str(exc), 500),
        )
        return None
    if not done or not done[0]:
        metrics.upgrades.labels(metrics.site, "current").inc()
        return None
    metrics.upgrades.labels(metrics.site, "upgraded").inc()
    return Outcome(
        Decision.UPGRADED,
        STAGE,
        msg=f"upgrading to {out.upgrade}; it is provisioned again when it comes back",
        overlay=out.overlay,
    )


async def release_update(ctx: PipelineContext, att: Attempt) -> bool:
    """``choria_provision#release_update`` when the node's version differs; True if called."""
    out = att.output
    assert out is not None
    target, repository = out.upgrade, ctx.config.upgrades_repository
    if not repository:
        raise fail(
            att,
            Reason.UPGRADES_NOT_CONFIGURED,
            "features.upgrades is on but upgrades_repository is not set: cannot upgrade "
            f"{att.identity} to {target}",
        )
    current, upgradable = node_version(att)
    if not current:
        raise fail(
            att, Reason.UPGRADE_FAILED, f"{att.identity} did not report a version in inventory"
        )
    if same_version(current, target):
        return False
    if not upgradable:
        raise fail(
            att,
            Reason.UPGRADE_FAILED,
            f"{att.identity} does not support upgrades (upgradable: false), cannot upgrade "
            f"from {current} to {target}",
        )
    safe_point(ctx, att, STAGE)
    log.warning(
        "upgrading %s from %s to %s",
        att.identity,
        clean_remote_text(current, 64),
        clean_remote_text(target, 64),
    )
    try:
        await ctx.rpc.call(
            att.identity,
            PROVISION_AGENT,
            "release_update",
            {"token": ctx.config.token, "repository": repository, "version": target},
        )
    except RPCStatusError as exc:
        raise fail(
            att,
            Reason.UPGRADE_FAILED,
            f"upgrade of {att.identity} from {current} to {target} failed: {exc.statusmsg}",
        ) from None
    return True

"""Drain planning keeps groups whole where it can and reports what cannot move."""

from __future__ import annotations

import pytest

from overlays import Assignment, OverlayRegistry, plan_drain
from overlays.drain import normalize_assignments


def _reg(caps: dict[str, tuple[int, str]]) -> OverlayRegistry:
    return OverlayRegistry.from_dict(
        {
            "overlays": [
                {"name": n, "region": r, "brokers": [f"nats://{n}:4222"], "capacity": c}
                for n, (c, r) in caps.items()
            ],
            "placement": {"affinity": "customer"},
        }
    )


def _a(ident: str, overlay: str, group: str | None) -> Assignment:
    return Assignment(ident, overlay, "committed", None, group)


def test_groups_move_whole_preferring_where_they_live() -> None:
    reg = _reg({"old": (10, "eu"), "eu2": (6, "eu"), "us": (10, "us")})
    current = {
        **{f"acme{i}": _a(f"acme{i}", "old", "acme") for i in range(4)},
        "acme-us": _a("acme-us", "us", "acme"),  # acme already lives in us
        **{f"glob{i}": _a(f"glob{i}", "old", "globex") for i in range(3)},
        "solo": _a("solo", "old", None),
    }
    plan = plan_drain(reg, "old", current)
    targets = {m.identity: m.target for m in plan.moves}
    assert {targets[f"acme{i}"] for i in range(4)} == {"us"}
    assert all("joins its group in us" in m.reason for m in plan.moves if m.group == "acme")
    # globex lives nowhere else: same region as the drained overlay first.
    assert {targets[f"glob{i}"] for i in range(3)} == {"eu2"}
    assert targets["solo"] in {"eu2", "us"}
    assert plan.groups_split == 0 and plan.unplaceable == 0
    assert sum(plan.by_target.values()) == 8
    assert plan.fill_after["us"] == 5 + (1 if targets["solo"] == "us" else 0)


def test_split_and_no_room_are_reported() -> None:
    reg = _reg({"old": (20, "eu"), "x": (3, "eu"), "y": (2, "eu"), "z": (5, "eu")})
    reg = reg.with_state("z", "cordoned")  # cordoned overlays take no drained nodes
    current = {f"n{i}": _a(f"n{i}", "old", "big") for i in range(7)}
    plan = plan_drain(reg, "old", current)
    assert plan.by_target == {"(no room)": 2, "x": 3, "y": 2}
    assert plan.groups_split == 1 and plan.unplaceable == 2
    data = plan.to_dict()
    assert data["nodes"] == 7 and data["moves"][0]["from"] == "old"


def test_unknown_overlay() -> None:
    with pytest.raises(KeyError, match="unknown overlay"):
        plan_drain(_reg({"a": (1, "eu")}), "nope", {})


@pytest.mark.parametrize(
    "raw",
    [
        {"n1": "a", "n2": {"overlay": "b", "group": "acme"}},
        {
            "assignments": [
                {"identity": "n1", "overlay": "a"},
                {"identity": "n2", "overlay": "b", "group": "acme"},
            ]
        },
        [{"identity": "n1", "overlay": "a"}, {"identity": "n2", "overlay": "b", "group": "acme"}],
    ],
)
def test_assignment_file_shapes(raw: object) -> None:
    got = normalize_assignments(raw)
    assert got["n1"].overlay == "a" and got["n1"].group is None
    assert got["n2"].overlay == "b" and got["n2"].group == "acme"


@pytest.mark.parametrize("raw", [42, {"n1": 3}, [{"overlay": "a"}]])
def test_bad_assignment_files(raw: object) -> None:
    with pytest.raises(ValueError, match="assignments"):
        normalize_assignments(raw)

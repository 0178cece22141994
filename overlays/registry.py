"""The overlay registry: the validated list of overlays plus the placement configuration.

Loaded from a YAML file (``OverlayRegistry.from_yaml``), a mapping (``from_dict``), or a
JetStream KV bucket (``from_kv``/``publish``) so that several provisioners share one registry.
Every validation error names the source, the overlay and the field.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping, Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from overlays.model import Overlay, OverlayConfigError, OverlayStateName, PlacementConfig

REGISTRY_BUCKET = "OVERLAY_REGISTRY"
REGISTRY_KEY = "registry"

_TOP_KEYS = {"overlays", "placement"}


def _describe(err: ValidationError) -> str:
    parts = []
    for item in err.errors():
        loc = ".".join(str(p) for p in item["loc"]) or "(root)"
        parts.append(f"field {loc!r}: {item['msg']}")
    return "; ".join(parts)


class OverlayRegistry:
    """An immutable set of overlays (by name, in file order) and the placement config."""

    def __init__(
        self,
        overlays: Iterable[Overlay],
        placement: PlacementConfig | None = None,
        *,
        source: str = "<registry>",
    ) -> None:
        self._overlays: dict[str, Overlay] = {}
        for ov in overlays:
            if ov.name in self._overlays:
                raise OverlayConfigError(f"{source}: overlay {ov.name!r} is defined twice")
            self._overlays[ov.name] = ov
        self.placement = placement or PlacementConfig()
        self.source = source
        self._check_references()

    def _check_references(self) -> None:
        for index, pin in enumerate(self.placement.pins):
            for name in pin.overlays:
                if name not in self._overlays:
                    raise OverlayConfigError(
                        f"{self.source}: placement.pins[{index}] field 'overlays': "
                        f"unknown overlay {name!r}"
                    )

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def from_dict(
        cls, obj: Any, *, source: str = "<dict>", base_dir: Path | None = None
    ) -> OverlayRegistry:
        """Validate a mapping shaped like the YAML file; ``base_dir`` resolves the relative
        paths of each overlay's ``client`` (the registry file's directory)."""
        if not isinstance(obj, Mapping):
            raise OverlayConfigError(f"{source}: the top level must be a mapping with 'overlays:'")
        unknown = set(obj) - _TOP_KEYS
        if unknown:
            raise OverlayConfigError(
                f"{source}: unknown top-level key(s) {sorted(map(str, unknown))}; "
                f"expected {sorted(_TOP_KEYS)}"
            )
        raw_overlays = obj.get("overlays")
        if not isinstance(raw_overlays, list) or not raw_overlays:
            raise OverlayConfigError(f"{source}: 'overlays' must be a non-empty list of mappings")
        overlays: list[Overlay] = []
        for index, item in enumerate(raw_overlays):
            label = f"overlays[{index}]"
            if isinstance(item, Mapping) and isinstance(item.get("name"), str):
                label = f"overlay {item['name']!r} ({label})"
            if not isinstance(item, Mapping):
                raise OverlayConfigError(f"{source}: {label} must be a mapping")
            try:
                ov = Overlay.model_validate(dict(item))
            except ValidationError as err:
                raise OverlayConfigError(f"{source}: {label} {_describe(err)}") from None
            if ov.client is not None and base_dir is not None:
                ov = ov.model_copy(update={"client": ov.client.resolved(base_dir)})
            overlays.append(ov)
        raw_placement = obj.get("placement") or {}
        if not isinstance(raw_placement, Mapping):
            raise OverlayConfigError(f"{source}: 'placement' must be a mapping")
        try:
            placement = PlacementConfig.model_validate(dict(raw_placement))
        except ValidationError as err:
            raise OverlayConfigError(f"{source}: placement {_describe(err)}") from None
        return cls(overlays, placement, source=source)

    @classmethod
    def from_yaml(cls, path: str | Path) -> OverlayRegistry:
        """Load and validate a registry YAML file."""
        p = Path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except OSError as err:
            raise OverlayConfigError(f"{p}: cannot read: {err.strerror or err}") from None
        return cls.from_text(text, source=str(p), base_dir=p.absolute().parent)

    @classmethod
    def from_text(
        cls, text: str, *, source: str = "<text>", base_dir: Path | None = None
    ) -> OverlayRegistry:
        """Parse YAML (or JSON, a subset) text."""
        try:
            obj = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise OverlayConfigError(f"{source}: not valid YAML: {err}") from None
        return cls.from_dict(obj, source=source, base_dir=base_dir)

    @classmethod
    async def from_kv(
        cls, js: Any, bucket: str = REGISTRY_BUCKET, key: str = REGISTRY_KEY
    ) -> OverlayRegistry:
        """Load the registry another provisioner published with :meth:`publish`."""
        import nats.js.errors  # local: nats is only needed for the KV path (helper start-up cost)

        try:
            kv = await js.key_value(bucket)
            entry = await kv.get(key)
        except (nats.js.errors.BucketNotFoundError, nats.js.errors.KeyNotFoundError):
            raise OverlayConfigError(
                f"kv://{bucket}/{key}: no registry published (run 'provisioner overlays publish')"
            ) from None
        return cls.from_text((entry.value or b"").decode("utf-8"), source=f"kv://{bucket}/{key}")

    async def publish(self, js: Any, bucket: str = REGISTRY_BUCKET, key: str = REGISTRY_KEY) -> int:
        """Store this registry in a KV bucket (created if missing); returns the revision."""
        import nats.js.errors  # local: nats is only needed for the KV path (helper start-up cost)

        try:
            kv = await js.key_value(bucket)
        except nats.js.errors.BucketNotFoundError:
            kv = await js.create_key_value(bucket=bucket, history=5)
        rev: int = await kv.put(key, json.dumps(self.to_dict()).encode())
        return rev

    # -- queries -----------------------------------------------------------------------------

    @property
    def overlays(self) -> list[Overlay]:
        """All overlays in file order."""
        return list(self._overlays.values())

    @property
    def names(self) -> list[str]:
        """Overlay names in file order."""
        return list(self._overlays)

    def get(self, name: str) -> Overlay:
        """The overlay called ``name``; ``KeyError`` naming the known overlays otherwise."""
        try:
            return self._overlays[name]
        except KeyError:
            raise KeyError(
                f"unknown overlay {name!r}; known: {', '.join(self._overlays)}"
            ) from None

    def __contains__(self, name: object) -> bool:
        return name in self._overlays

    def __iter__(self) -> Iterator[Overlay]:
        return iter(self._overlays.values())

    def __len__(self) -> int:
        return len(self._overlays)

    @property
    def total_capacity(self) -> int:
        """Sum of the capacities of all overlays."""
        return sum(o.capacity for o in self._overlays.values())

    # -- derived registries ------------------------------------------------------------------

    def with_state(self, name: str, state: OverlayStateName) -> OverlayRegistry:
        """A copy with overlay ``name`` in ``state`` (what-if planning, tests)."""
        return self.with_overlays(
            [o.model_copy(update={"state": state}) if o.name == name else o for o in self],
            check=name,
        )

    def with_overlays(
        self, overlays: Sequence[Overlay], *, check: str | None = None
    ) -> OverlayRegistry:
        """A copy with a different overlay list and the same placement config."""
        if check is not None:
            self.get(check)
        return OverlayRegistry(overlays, self.placement, source=self.source)

    def to_dict(self) -> dict[str, Any]:
        """The YAML-shaped mapping (round-trips through :meth:`from_dict`)."""
        return {
            "overlays": [o.model_dump(exclude_defaults=False) for o in self],
            "placement": self.placement.model_dump(),
        }


def load_sample_registry() -> OverlayRegistry:
    """The packaged ``overlays/sample.yaml`` (four overlays, affinity by customer, a pin)."""
    text = resources.files("overlays").joinpath("sample.yaml").read_text(encoding="utf-8")
    return OverlayRegistry.from_text(text, source="overlays/sample.yaml")

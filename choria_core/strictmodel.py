"""The one configuration style: strict pydantic models and messages that name file and key.

Every configuration the project reads (the provisioner's YAML, the auth callout's
``broker-auth.yaml``, the ``ca:`` section) is a :class:`StrictModel`: unknown keys are refused,
never ignored, because a typo in a security setting must not silently fall back to a default.
:func:`validate_strict` validates raw data against such a model and turns whatever is wrong
into one :class:`StrictConfigError` (or a subclass) whose message names the file and the dotted
key, with the closest known key as a hint for a typo::

    provisioner.yaml: helper_comand: unknown key (did you mean 'helper_command'?)

Messages are built from pydantic's error text only, never from input values, which could be a
token, a password or a seed.
"""

from __future__ import annotations

import difflib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from typing import Annotated, Any, TypeVar

from pydantic import BaseModel, BeforeValidator, ConfigDict, ValidationError

from choria_core.durations import parse_duration
from choria_core.errors import FleetError

__all__ = [
    "Duration",
    "StrictConfigError",
    "StrictModel",
    "dotted_key",
    "problems_from_validation_error",
    "unknown_key_message",
    "unknown_keys",
    "validate_strict",
]

M = TypeVar("M", bound=BaseModel)

#: A problem: (dotted key or ``"<root>"``, message).
Problem = tuple[str, str]


def _seconds(value: Any) -> Any:
    if isinstance(value, str | int | float) and not isinstance(value, bool):
        return parse_duration(value)
    return value


#: A duration field: seconds, from a number or text like 30s, 1h30m, 720h, 1y.
Duration = Annotated[float, BeforeValidator(_seconds)]


class StrictConfigError(FleetError, ValueError, reason="config"):
    """A configuration problem; the message names the file and the dotted key.

    ``key`` is the dotted key (``features.ed25519``) or ``None`` for file-level problems,
    ``file`` the config file (``None`` for a config not read from a file: then ``where``, if
    given, names it instead), ``problems`` every ``(key, message)`` found.
    """

    #: What the message starts with when neither file nor ``where`` is known.
    default_where: str | None = None

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        file: str | None = None,
        problems: list[Problem] | None = None,
        where: str | None = None,
    ) -> None:
        self.key = key
        self.file = file
        self.detail = message
        self.problems: list[Problem] = problems or ([(key, message)] if key else [])
        place = file if file is not None else (where or self.default_where)
        if problems and len(problems) > 1:
            listed = "; ".join(f"{k}: {m}" for k, m in problems)
            text = f"{len(problems)} problems: {listed}"
        elif key:
            text = f"{key}: {message}"
        else:
            text = message
        super().__init__(f"{place}: {text}" if place else text)


class StrictModel(BaseModel):
    """A configuration model: unknown keys are refused; assignments are validated too."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


def dotted_key(loc: Sequence[Any], prefix: str = "") -> str:
    """``("tls", "ca")`` → ``"tls.ca"``; list positions become ``[i]``: ``"broker_urls[0]"``."""
    parts: list[str] = []
    for item in loc:
        if isinstance(item, int) and parts:
            parts[-1] = f"{parts[-1]}[{item}]"
        elif isinstance(item, int):
            parts.append(f"[{item}]")
        else:
            parts.append(str(item))
    return prefix + ".".join(parts)


def unknown_key_message(key: str, known: Iterable[str], prefix: str = "") -> str:
    """``unknown key``, with ``(did you mean '<prefix><closest>'?)`` when one is close."""
    close = difflib.get_close_matches(key, list(known), n=1, cutoff=0.6)
    return f"unknown key (did you mean '{prefix}{close[0]}'?)" if close else "unknown key"


def _field_names(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


def _step(annotation: Any, part: Any) -> Any:
    """The type found one step (``part``: a key or a list position) inside ``annotation``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        for name, f in annotation.model_fields.items():
            if part in (name, f.alias):
                return f.annotation
        return None
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        for arg in args:
            found = _step(arg, part)
            if found is not None:
                return found
        return None
    if origin is typing.Annotated:
        return _step(args[0], part)
    if isinstance(part, int) and origin in (list, tuple, set, frozenset, Sequence) and args:
        return args[0]
    if isinstance(part, str) and origin in (dict, Mapping) and len(args) == 2:
        return args[1]
    return None


def _model_at(model: type[BaseModel], path: Sequence[Any]) -> type[BaseModel] | None:
    current: Any = model
    for part in path:
        current = _step(current, part)
        if current is None:
            return None
    origin = typing.get_origin(current)
    if origin in (typing.Union, types.UnionType):
        models = [a for a in typing.get_args(current) if isinstance(a, type)]
        current = next((a for a in models if issubclass(a, BaseModel)), None)
    if isinstance(current, type) and issubclass(current, BaseModel):
        return current
    return None


def unknown_keys(raw: Mapping[Any, Any], model: type[BaseModel], prefix: str = "") -> list[Problem]:
    """Every key in ``raw`` (and in nested mappings of sub-models) that ``model`` lacks.

    Run before validation so a typo is reported alone, with its hint, rather than among the
    errors its absence causes elsewhere.
    """
    problems: list[Problem] = []
    known = _field_names(model)
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if not isinstance(key, str) or key not in known:
            problems.append((dotted, unknown_key_message(str(key), known, prefix)))
            continue
        if not isinstance(value, Mapping):
            continue
        sub = _model_at(model, (key,))
        if sub is not None:
            problems.extend(unknown_keys(value, sub, f"{dotted}."))
            continue
        item = _model_at(model, (key, "*"))
        if item is not None:  # dict[str, SubModel]
            for name, entry in value.items():
                if isinstance(entry, Mapping):
                    problems.extend(unknown_keys(entry, item, f"{dotted}.{name}."))
    return problems


def problems_from_validation_error(
    exc: ValidationError, model: type[BaseModel], prefix: str = ""
) -> list[Problem]:
    """One ``(dotted key, message)`` per pydantic error, unknown keys with their hint."""
    problems: list[Problem] = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = tuple(err.get("loc", ()))
        key = dotted_key(loc, prefix) if loc else "<root>"
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "extra_forbidden":
            parent = _model_at(model, loc[:-1])
            parent_prefix = dotted_key(loc[:-1], prefix) + "." if loc[:-1] else prefix
            known = _field_names(parent) if parent is not None else []
            msg = unknown_key_message(str(loc[-1]), known, parent_prefix)
        problems.append((key, msg))
    return problems or [("<root>", "invalid configuration")]


def validate_strict(
    model: type[M],
    raw: Any,
    *,
    file: str | None = None,
    where: str | None = None,
    prefix: str = "",
    error: type[StrictConfigError] = StrictConfigError,
    context: Mapping[str, Any] | None = None,
) -> M:
    """``model`` validated from ``raw``, or ``error`` naming ``file`` (or ``where``) and keys.

    ``prefix`` is put before every key (``"ca."`` for the ``ca:`` section of a larger file).
    Unknown keys are reported first and alone; then every other problem at once.
    """
    if not isinstance(raw, Mapping):
        what = prefix.rstrip(".") or "the top level"
        raise error(
            f"{what} must be a mapping of key: value, not {type(raw).__name__}",
            file=file,
            where=where,
        )
    unknown = unknown_keys(raw, model, prefix)
    if unknown:
        raise error(unknown[0][1], key=unknown[0][0], file=file, where=where, problems=unknown)
    try:
        return model.model_validate(raw, context=dict(context) if context else None)
    except ValidationError as exc:
        problems = problems_from_validation_error(exc, model, prefix)
        raise error(
            problems[0][1], key=problems[0][0], file=file, where=where, problems=problems
        ) from None

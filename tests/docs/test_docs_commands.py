"""Every ``provisioner ...`` command shown in docs/ parses against the real CLI.

The command path must exist and every option used must be an option of that command, so a
renamed flag or a removed subcommand breaks this test instead of silently rotting the docs.
(The behaviour of each command is exercised by the tests of its own area.)
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import typer.main

from provisioner.cli import app

DOCS = Path(__file__).resolve().parents[2] / "docs"
README = Path(__file__).resolve().parents[2] / "README.md"
FENCE = re.compile(r"```[a-z]*\n(.*?)```", re.S)
PROMPT = re.compile(r"^\s*(?:\$\s+)?(?:\.venv/bin/)?(provisioner\s.*)$")


def _command_lines() -> list[tuple[str, str]]:
    found: list[tuple[str, str]] = []
    for path in [*sorted(DOCS.glob("*.md")), README]:
        for block in FENCE.findall(path.read_text()):
            joined = re.sub(r"\\\n\s*", " ", block)
            for line in joined.splitlines():
                m = PROMPT.match(line)
                if m:
                    cmd = m.group(1).split(" #")[0].split(" | ")[0].split(" > ")[0]
                    cmd = cmd.split(" && ")[0].split(" ; ")[0].strip().removesuffix("&").strip()
                    found.append((path.name, cmd))
    return found


COMMANDS = _command_lines()


def _resolve(words: list[str]) -> tuple[Any, list[str], str]:
    cmd: Any = typer.main.get_command(app)
    path = ["provisioner"]
    rest = list(words)
    while hasattr(cmd, "commands") and rest and not rest[0].startswith("-"):
        name = rest.pop(0)
        assert name in cmd.commands, f"unknown command {' '.join([*path, name])!r}"
        cmd = cmd.commands[name]
        path.append(name)
    return cmd, rest, " ".join(path)


def test_docs_show_commands() -> None:
    assert len(COMMANDS) >= 10, "docs should show how to use the CLI"


@pytest.mark.parametrize(("doc", "line"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc: str, line: str) -> None:
    synopsis = any(ch in line for ch in "[]()|")  # a usage synopsis, not a runnable line
    words = shlex.split(re.sub(r"[\[\]()|]", " ", line))[1:]
    cmd, rest, path = _resolve(words)
    params = {opt for p in cmd.params for opt in (*p.opts, *p.secondary_opts)}
    for word in rest:
        if word.startswith("--") and word != "--help":
            opt = word.split("=", 1)[0]
            assert opt in params, f"{doc}: {path} has no option {opt} (has {sorted(params)})"
    if synopsis or "--help" in rest:
        return
    try:
        cmd.make_context(path, rest)
    except Exception as exc:  # typer's vendored click exceptions
        kind = type(exc).__name__
        # docs may elide required arguments or use placeholders; unknown options are errors
        assert kind not in {"NoSuchOption", "BadOptionUsage", "UsageError"} or (
            "Missing" in str(exc)
        ), f"{doc}: {line!r}: {kind}: {exc}"

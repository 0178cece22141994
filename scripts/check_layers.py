"""The project's shape, checked: the layer rule and the size rule of docs/architecture.md.

Layer rule (lower layers never import higher ones, siblings never import each other)::

    4  testbed
    3  provisioner   node_agent
    2  helpers
    1  jwt_tools     ca_adapters   overlays
    0  choria_core

One exception: ``provisioner.cli`` may import ``testbed`` and ``node_agent``, to run their commands
(``provisioner demo|bench|fleet|node``). Every import counts, at module level, inside a function or
under ``if TYPE_CHECKING``. ``tests/``, ``bench/`` and ``scripts/`` are not checked.

Size rule: no module over 600 lines, no function over 100, no class over 400.

Usage: ``python scripts/check_layers.py [--root DIR]``. Exit 0 when the tree keeps both rules,
1 with one line per offence (``path:line: message``) when it does not, 2 on bad usage.
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

LAYERS: dict[str, int] = {
    "choria_core": 0,
    "jwt_tools": 1,
    "ca_adapters": 1,
    "overlays": 1,
    "helpers": 2,
    "provisioner": 3,
    "node_agent": 3,
    "testbed": 4,
}

#: (importing module prefix, imported package) pairs allowed against the layer order.
EXCEPTIONS: tuple[tuple[str, str], ...] = (
    ("provisioner.cli", "testbed"),
    ("provisioner.cli", "node_agent"),
)

MAX_MODULE_LINES = 600
MAX_FUNCTION_LINES = 100
MAX_CLASS_LINES = 400


@dataclass(frozen=True, slots=True)
class Offence:
    path: Path
    line: int
    message: str

    def __str__(self) -> str:
        return f"{self.path}:{self.line}: {self.message}"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imported(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) for every import in ``tree``."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                target = node.module or ""
            else:
                base = module.split(".")
                drop = node.level - 1 if is_package else node.level
                base = base[: len(base) - drop] if drop else base
                target = ".".join([*base, node.module] if node.module else base)
            yield node.lineno, target


def _allowed(importer: str, imported_pkg: str) -> bool:
    src_pkg = importer.split(".")[0]
    if imported_pkg == src_pkg:
        return True
    if any(
        (importer == prefix or importer.startswith(prefix + ".")) and imported_pkg == pkg
        for prefix, pkg in EXCEPTIONS
    ):
        return True
    return LAYERS[imported_pkg] < LAYERS[src_pkg]


def check_imports(root: Path, path: Path, tree: ast.AST) -> list[Offence]:
    module = module_name(root, path)
    src_pkg = module.split(".")[0]
    out = []
    for line, target in _imported(tree, module, path.name == "__init__.py"):
        pkg = target.split(".")[0]
        if pkg not in LAYERS or _allowed(module, pkg):
            continue
        if LAYERS[pkg] == LAYERS[src_pkg]:
            why = f"sibling packages of layer {LAYERS[pkg]} do not import each other"
        else:
            why = f"layer {LAYERS[src_pkg]} ({src_pkg}) may not import layer {LAYERS[pkg]} ({pkg})"
        out.append(Offence(path.relative_to(root), line, f"{module} imports {target}: {why}"))
    return out


def check_sizes(path: Path, text: str, tree: ast.AST) -> list[Offence]:
    out = []
    lines = len(text.splitlines())
    if lines > MAX_MODULE_LINES:
        out.append(Offence(path, 1, f"module has {lines} lines (max {MAX_MODULE_LINES})"))
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            continue
        size = (node.end_lineno or node.lineno) - node.lineno + 1
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and size > MAX_FUNCTION_LINES:
            out.append(
                Offence(
                    path,
                    node.lineno,
                    f"function {node.name}() has {size} lines (max {MAX_FUNCTION_LINES})",
                )
            )
        elif isinstance(node, ast.ClassDef) and size > MAX_CLASS_LINES:
            out.append(
                Offence(
                    path, node.lineno, f"class {node.name} has {size} lines (max {MAX_CLASS_LINES})"
                )
            )
    return out


def check_tree(root: Path) -> list[Offence]:
    offences: list[Offence] = []
    for pkg in LAYERS:
        base = root / pkg
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            rel = path.relative_to(root)
            if any(part.startswith(".") or part == "__pycache__" for part in rel.parts):
                continue
            text = path.read_text(encoding="utf-8")
            try:
                tree = ast.parse(text, filename=str(rel))
            except SyntaxError as exc:
                offences.append(Offence(rel, exc.lineno or 1, f"syntax error: {exc.msg}"))
                continue
            offences += check_imports(root, path, tree)
            offences += check_sizes(rel, text, tree)
    return offences


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent.parent)
    args = parser.parse_args(argv)
    root = args.root.resolve()
    if not root.is_dir():
        print(f"error: --root {root} is not a directory", file=sys.stderr)
        return 2
    offences = check_tree(root)
    for offence in offences:
        print(offence)
    if offences:
        print(
            f"{len(offences)} offence(s) against the layer or size rule (docs/architecture.md)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())

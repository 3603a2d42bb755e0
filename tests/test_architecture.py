"""The package's shape, read from the code: imports only go down the floors of docs/architecture.md, no module
imports itself round a circle, library code never imports a command-line module, and no function is long."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import networkx as nx

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "circuitkit"
MAX_FUNCTION_LINES = 80


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES: dict[str, Path] = {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def room(module: str) -> str:
    """The sub-package (``patching``) or top-level module (``sites``) a module lives in."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "circuitkit"


def is_cli(module: str) -> bool:
    """A command-line module: every ``cli.py`` and ``python -m circuitkit``'s ``__main__``."""
    return module.split(".")[-1] in ("cli", "__main__")


def floors() -> dict[str, int]:
    """room -> floor, from the table in docs/architecture.md (``| 4 | patching, inversion | ... |``)."""
    out: dict[str, int] = {}
    for line in (REPO / "docs" / "architecture.md").read_text().splitlines():
        m = re.match(r"\|\s*(\d+)\s*\|([^|]+)\|", line)
        if m:
            for name in re.findall(r"`([\w.]+)`", m.group(2)):
                out[name] = int(m.group(1))
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skip |= {id(x) for x in ast.walk(node)}
    return skip


def imports() -> list[tuple[str, str, bool]]:
    """(importer, imported, lazy) for every import of a circuitkit module, TYPE_CHECKING blocks left out;
    lazy = inside a function."""
    out = []
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text())
        package = module if path.name == "__init__.py" else module.rsplit(".", 1)[0]
        skip = _type_checking_nodes(tree)
        top = {id(n) for n in tree.body} | {id(s) for n in tree.body if isinstance(n, ast.Try) for s in n.body}
        for node in ast.walk(tree):
            if id(node) in skip or not isinstance(node, ast.Import | ast.ImportFrom):
                continue
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                base = node.module or ""
                if node.level:
                    prefix = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(prefix + ([base] if base else []))
                targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
            for target in targets:
                if target in MODULES and target != module:
                    out.append((module, target, id(node) not in top))
    return out


def test_every_room_has_a_floor_in_the_architecture_page():
    rooms = {room(m) for m in MODULES} - {"circuitkit", "cli", "__main__"}
    missing = sorted(rooms - set(floors()))
    assert not missing, f"docs/architecture.md's floor table does not place {missing}"


def test_imports_only_go_down_the_floors():
    """A room imports only rooms on lower floors; the command line (every cli.py) and the package root (whose
    attributes load ``api`` lazily, circuitkit/__init__.py) sit above all of them."""
    level = floors()
    top = max(level.values()) + 1
    up = []
    for a, b, lazy in imports():
        if room(a) == room(b):
            continue
        la, lb = (top if is_cli(m) or m == "circuitkit" else level[room(m)] for m in (a, b))
        if lb >= la and not (la == lb == top):
            up.append(f"{a} -> {b}{' (lazy)' if lazy else ''}")
    assert not up, "imports that do not go down a floor:\n  " + "\n  ".join(up)


def test_library_code_never_imports_a_command_line_module():
    bad = [f"{a} -> {b}" for a, b, _ in imports() if is_cli(b) and not is_cli(a) and a != "circuitkit"]
    assert not bad, bad


def test_no_import_circles_between_modules():
    graph = nx.DiGraph((a, b) for a, b, lazy in imports() if not (MODULES[a].name == "__init__.py" and lazy))
    circles = [sorted(c) for c in nx.strongly_connected_components(graph) if len(c) > 1]
    assert not circles, circles


def test_no_function_is_longer_than_80_lines():
    long = [f"{path.relative_to(REPO)}:{node.lineno} {node.name}: {node.end_lineno - node.lineno + 1} lines"
            for path in MODULES.values() for node in ast.walk(ast.parse(path.read_text()))
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef)
            and node.end_lineno - node.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, "\n".join(long)

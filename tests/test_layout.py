"""The package layout keeps its promises: no import circle, and imports flow one way.

    caller side (mpwriter._caller)  --imports-->  wire protocol (mpwriter._wire)
    writer side (mpwriter._writer)  --imports-->  wire protocol
    owner (mpwriter._owner)         --imports-->  both sides

The wire protocol imports neither side, and the caller side never imports the
writer side (a calling process must not load SQLite's plumbing or an engine's
driver). Read from the source with `ast`, so a lazy import inside a function
counts as well.
"""

from __future__ import annotations

import ast
import pathlib

import mpwriter

PACKAGE = pathlib.Path(mpwriter.__file__).parent


def module_name(path: pathlib.Path) -> str:
    parts = ["mpwriter", *path.relative_to(PACKAGE).with_suffix("").parts]
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def imports_of(path: pathlib.Path) -> set[str]:
    """Every mpwriter module ``path`` imports, resolved to absolute names."""
    here = module_name(path)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.startswith("mpwriter"))
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            if not target.startswith("mpwriter"):
                continue
            found.add(target)
            # "from . import aio" imports a module, not a name
            for alias in node.names:
                candidate = f"{target}.{alias.name}"
                if (PACKAGE.parent / (candidate.replace(".", "/") + ".py")).exists():
                    found.add(candidate)
    found.discard(here)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {}
    for name, path in modules.items():
        graph[name] = {
            target for target in imports_of(path) if target in modules and target != "mpwriter"
        }
    return graph


def side(module: str) -> str:
    for part in ("_caller", "_wire", "_writer", "_owner"):
        if module.startswith(f"mpwriter.{part}"):
            return part
    return "top"


def test_the_caller_side_never_imports_the_writer_side() -> None:
    offenders = [
        (module, target)
        for module, targets in import_graph().items()
        if side(module) == "_caller"
        for target in targets
        if side(target) in ("_writer", "_owner")
    ]
    assert offenders == []


def test_the_wire_protocol_imports_neither_side() -> None:
    offenders = [
        (module, target)
        for module, targets in import_graph().items()
        if side(module) == "_wire"
        for target in targets
        if side(target) in ("_caller", "_writer", "_owner")
    ]
    assert offenders == []


def test_the_writer_side_never_imports_the_caller_side() -> None:
    offenders = [
        (module, target)
        for module, targets in import_graph().items()
        if side(module) == "_writer"
        for target in targets
        if side(target) in ("_caller", "_owner")
    ]
    assert offenders == []


def test_the_imports_form_no_circle() -> None:
    graph = import_graph()
    # Package __init__ modules re-export their children; an edge from a child to
    # its own package is the child loading its parent first, not a circle.
    visiting: list[str] = []
    done: set[str] = set()
    circles: list[list[str]] = []

    def visit(module: str) -> None:
        if module in done:
            return
        if module in visiting:
            circles.append([*visiting[visiting.index(module) :], module])
            return
        visiting.append(module)
        for target in sorted(graph.get(module, ())):
            if not module.startswith(target + "."):
                visit(target)
        visiting.pop()
        done.add(module)

    for module in sorted(graph):
        visit(module)
    assert circles == []


def test_the_graph_is_read_at_all() -> None:
    """Guards the tests above against passing on an empty graph."""
    graph = import_graph()
    assert "mpwriter._wire.frames" in graph["mpwriter._caller.handle"]
    assert "mpwriter._writer.engine" in graph["mpwriter._writer.loop"]

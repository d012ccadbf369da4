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
import json
import pathlib
import re
import subprocess
import sys

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


def test_the_writer_side_flows_one_way() -> None:
    """inbox --> loop --> outbox: nothing imports (so calls) back up that stream."""
    graph = import_graph()
    inbox, loop, outbox = (
        "mpwriter._writer.inbox",
        "mpwriter._writer.loop",
        "mpwriter._writer.outbox",
    )
    session = "mpwriter._writer.session"
    assert {inbox, outbox, session} <= graph[loop]  # the test sees the modules at all
    assert graph[outbox] & {inbox, loop, session} == set()
    assert graph[inbox] & {loop, session} == set()
    assert loop not in graph[session]


def test_the_writer_side_imports_from_the_top_only_modules_that_import_no_mpwriter() -> None:
    """A writer-side import of a top-level module may not run back up to a side."""
    graph = import_graph()
    offenders = [
        (module, target, sorted(graph[target]))
        for module, targets in graph.items()
        if side(module) in ("_wire", "_writer")
        for target in targets
        if side(target) == "top" and graph[target]
    ]
    assert offenders == []


IMPORT_ONLY = """
import json, sys
import mpwriter
loaded = sorted(sys.modules)
from mpwriter import *  # every public name resolves
print(json.dumps([loaded, sorted(sys.modules), mpwriter.__all__]))
"""


def test_importing_mpwriter_loads_the_caller_side_only() -> None:
    result = subprocess.run(
        [sys.executable, "-c", IMPORT_ONLY], capture_output=True, text=True, timeout=60, check=True
    )
    loaded, after_star, public = json.loads(result.stdout)
    heavy = [
        name
        for name in loaded
        if name.startswith(("mpwriter._writer", "mpwriter._owner", "filelock", "psycopg"))
        or name in ("sqlite3", "_sqlite3")
    ]
    assert heavy == []
    assert "mpwriter._caller.handle" in loaded  # the test sees the imports at all
    # The owner side loads where the public API needs it: `start`.
    assert {"mpwriter._owner.owner", "mpwriter._writer.sqlite", "filelock"} <= set(after_star)
    assert "start" in public


def test_public_names_defined_outside_the_sides_live_in_public_modules() -> None:
    assert mpwriter.prometheus_text.__module__ == "mpwriter.prometheus"
    assert mpwriter.native.__module__ == "mpwriter.sql"
    assert set(dir(mpwriter)) >= set(mpwriter.__all__)


def test_no_test_imports_from_tools() -> None:
    """Benchmarks and tools may change freely: no test depends on them."""
    tests = pathlib.Path(__file__).resolve().parent
    tools = {path.stem for path in (tests.parent / "tools").glob("*.py")}
    offenders = []
    for path in sorted(tests.glob("*.py")):
        text = path.read_text()
        if re.search(r"sys\.path\.(insert|append)\(.*tools", text):
            offenders.append((path.name, "puts tools/ on the import path"))
        for node in ast.walk(ast.parse(text)):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and not node.level:
                names = [node.module or ""]
            else:
                continue
            offenders += [(path.name, n) for n in names if n.split(".")[0] in tools]
    assert tools  # the test sees the tools at all
    assert offenders == []


MAX_CLASS_LINES = 400
MAX_FUNCTION_LINES = 60  # the body, docstring left out
LONG_MARK = "# long:"  # on the line of the def: why this function is read best whole


def _body_lines(node: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    body = node.body
    first = body[0]
    has_docstring = (
        isinstance(first, ast.Expr)
        and isinstance(first.value, ast.Constant)
        and isinstance(first.value.value, str)
    )
    start = body[1].lineno if has_docstring and len(body) > 1 else first.lineno
    assert node.end_lineno is not None
    return node.end_lineno - start + 1


def test_no_class_or_function_is_too_long_to_read() -> None:
    """No class over 400 lines; no function body over 60 unless its def line says why."""
    too_long = []
    for path in sorted(PACKAGE.rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            where = f"{path.relative_to(PACKAGE)}:{getattr(node, 'lineno', 0)}"
            if isinstance(node, ast.ClassDef):
                assert node.end_lineno is not None
                size = node.end_lineno - node.lineno + 1
                if size > MAX_CLASS_LINES:
                    too_long.append(f"{where} class {node.name}: {size} lines")
            elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                size = _body_lines(node)
                if size > MAX_FUNCTION_LINES and LONG_MARK not in lines[node.lineno - 1]:
                    too_long.append(f"{where} def {node.name}: {size} lines")
    assert too_long == []

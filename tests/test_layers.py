"""The architecture as a contract: the import layers of .importlinter hold, no module of compress/ is in an
import cycle, and a project module is imported inside a function only to defer an optional dependency."""

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_import_layers_contract_holds():
    p = subprocess.run([str(Path(sys.executable).with_name("lint-imports"))], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-2000:]
    assert "0 broken" in p.stdout


def test_no_import_cycle_between_modules():
    """Strongly connected components of the module import graph: every one is a single module."""
    import grimp

    graph = grimp.build_graph("compress")
    index, low, stack, on, sccs = {}, {}, [], set(), []

    def visit(v):  # Tarjan, iteratively deep enough for ~70 modules
        index[v] = low[v] = len(index)
        stack.append(v)
        on.add(v)
        for w in graph.find_modules_directly_imported_by(v):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            sccs.append(comp)

    for m in sorted(graph.modules):
        if m not in index:
            visit(m)
    assert len(index) > 50
    assert [c for c in sccs if len(c) > 1] == []


def test_function_local_project_imports_are_few_and_commented():
    """At most 10 imports of compress modules inside functions, each with a comment saying which optional
    dependency it defers."""
    local = []
    for path in (ROOT / "compress").rglob("*.py"):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for sub in ast.walk(node):
                    mod = (sub.module or "") if isinstance(sub, ast.ImportFrom) else \
                        (sub.names[0].name if isinstance(sub, ast.Import) else None)
                    if mod is not None and (mod == "compress" or mod.startswith("compress.")):
                        local.append((path.relative_to(ROOT).as_posix(), sub.lineno, "#" in lines[sub.lineno - 1]))
    assert len(local) <= 10, local
    assert all(commented for _, _, commented in local), local

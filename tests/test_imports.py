"""The package's import graph (every import, lazy ones inside functions included): no import cycle, no
method importing rl or another method's private helpers, and no file of algorithms/ over 500 lines."""

from __future__ import annotations

import ast
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "posttrain"

def _modules() -> dict[str, Path]:
    mods = {}
    for path in SRC.rglob("*.py"):
        name = ".".join(["posttrain", *path.relative_to(SRC).with_suffix("").parts]).removesuffix(".__init__")
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]):
    """``(module, imported name or None)`` for every import of module ``name`` (lazy ones included)."""
    pkg = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = pkg[:len(pkg) - node.level + 1] if node.level else []
            mod = ".".join([*base, node.module] if node.module else base)
            for a in node.names:   # `from . import zero` names a module
                yield (f"{mod}.{a.name}", None) if f"{mod}.{a.name}" in mods else (mod, a.name)
        elif isinstance(node, ast.Import):
            for a in node.names:
                yield a.name, None


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: {m for m, _ in _imports(name, path, mods) if m in mods and m != name} for name, path in mods.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative)."""
    index, low, on, stack, out, counter = {}, {}, set(), [], [], [0]
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = counter[0]
        counter[0] += 1
        stack.append(root)
        on.add(root)
        while work:
            v, children = work[-1]
            for w in children:
                if w not in index:
                    index[w] = low[w] = counter[0]
                    counter[0] += 1
                    stack.append(w)
                    on.add(w)
                    work.append((w, iter(sorted(graph[w]))))
                    break
                if w in on:
                    low[v] = min(low[v], index[w])
            else:
                work.pop()
                if work:
                    low[work[-1][0]] = min(low[work[-1][0]], low[v])
                if low[v] == index[v]:
                    comp = set()
                    while True:
                        w = stack.pop()
                        on.discard(w)
                        comp.add(w)
                        if w == v:
                            break
                    if len(comp) > 1:
                        out.append(comp)
    return out


def test_the_cycle_finder_finds_a_cycle_and_nothing_else():
    g = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert _cycles(g) == [{"a", "b", "c"}]


def test_no_import_cycle():
    assert _cycles(_graph()) == []


# what the methods share lives here (or outside algorithms/); anything else in algorithms/ is a method
SHARED = ("posttrain.algorithms.online", "posttrain.algorithms.sequences")
ENTRY_POINT_METHODS = ("sft", "dpo", "rm")   # public training entry points others may build on


def _method(module: str) -> str | None:
    parts = module.split(".")
    if len(parts) < 3 or parts[:2] != ["posttrain", "algorithms"] or module.startswith(SHARED):
        return None
    return parts[2]


def test_no_method_imports_rl_or_another_methods_private_helpers():
    mods = _modules()
    bad = []
    for name, path in mods.items():
        me = _method(name)
        if me is None:
            continue
        for mod, what in _imports(name, path, mods):
            other = _method(mod)
            if other is None or other == me:
                continue
            if other not in ENTRY_POINT_METHODS:
                bad.append(f"{name} imports {mod}" + (f".{what}" if what else ""))
            elif what is not None and what.startswith("_"):
                bad.append(f"{name} imports the private {mod}.{what}")
    assert bad == [], bad


def test_no_file_of_algorithms_over_500_lines():
    long = {str(p.relative_to(SRC)): n for p in (SRC / "algorithms").rglob("*.py")
            if (n := len(p.read_text().splitlines())) > 500}
    assert long == {}, long

"""The project's module import graph: cycles within crl/, envs/ and agents/, and imports of
the command-line layer from below it. Module-level and function-level imports both count
(a lazy import inside a function still ties the two modules together); imports under
``if TYPE_CHECKING:`` do not (they never run).

    python scripts/import_graph.py            # prints the layers, the cycles and the verdict
    python scripts/import_graph.py --edges    # also every edge

Exit code 1 when a cycle or a forbidden import exists (tests/test_import_graph.py runs it).
"""

from __future__ import annotations

import argparse
import ast
import sys
from collections.abc import Iterable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("crl", "envs", "agents")
#: the command-line layer: nothing below it may import these
CLI = ("crl.cli", "crl.sweep", "crl.report", "crl.report_sources", "crl.report_plots")
#: modules that must not import the CLI layer (prefixes)
BELOW_CLI = ("crl.strategies", "crl.metrics", "envs", "agents", "crl.supervised",
             "crl.tracking", "crl.runs", "crl.checkpoint", "crl.config", "crl.plots")


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _is_type_checking(node: ast.If) -> bool:
    t = node.test
    return (isinstance(t, ast.Name) and t.id == "TYPE_CHECKING") or (
        isinstance(t, ast.Attribute) and t.attr == "TYPE_CHECKING")


def imports_of(path: Path, modules: set[str]) -> set[str]:
    """Project modules imported by the file (resolved to the longest known module)."""
    tree = ast.parse(path.read_text(), str(path))
    me = module_name(path)
    package = me if path.name == "__init__.py" else me.rpartition(".")[0]
    found: set[str] = set()

    def resolve(name: str) -> None:
        while name and name not in modules:
            name = name.rpartition(".")[0]
        if name and name != me:
            found.add(name)

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    visit(sub)
                continue
            if isinstance(child, ast.Import):
                for alias in child.names:
                    resolve(alias.name)
            elif isinstance(child, ast.ImportFrom):
                if child.level:
                    base = package.split(".")
                    base = base[: len(base) - child.level + 1]
                    prefix = ".".join(base)
                    mod = f"{prefix}.{child.module}" if child.module else prefix
                else:
                    mod = child.module or ""
                for alias in child.names:
                    full = f"{mod}.{alias.name}"
                    resolve(full if full in modules else mod)
            visit(child)

    visit(tree)
    return found


def graph() -> dict[str, set[str]]:
    files = [p for pkg in PACKAGES for p in sorted((ROOT / pkg).rglob("*.py"))]
    modules = {module_name(p) for p in files}
    return {module_name(p): imports_of(p, modules) for p in files}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def strong(v: str) -> None:
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(edges.get(v, ())):
            if w not in index:
                strong(w)
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
            if len(comp) > 1:
                out.append(sorted(comp))

    sys.setrecursionlimit(10_000)
    for v in sorted(edges):
        if v not in index:
            strong(v)
    return out


def forbidden(edges: dict[str, set[str]]) -> list[tuple[str, str]]:
    def below(m: str) -> bool:
        return any(m == p or m.startswith(p + ".") for p in BELOW_CLI)

    return sorted((a, b) for a, targets in edges.items() if below(a)
                  for b in targets if b in CLI)


def _lines(items: Iterable[str]) -> str:
    return "\n".join(f"  {x}" for x in items) or "  none"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--edges", action="store_true")
    a = p.parse_args()
    edges = graph()
    if a.edges:
        for m in sorted(edges):
            print(f"{m} -> {', '.join(sorted(edges[m])) or '-'}")
    found = cycles(edges)
    bad = forbidden(edges)
    print(f"{len(edges)} modules, {sum(len(v) for v in edges.values())} import edges")
    print("cycles:\n" + _lines(" -> ".join(c) for c in found))
    print("imports of the CLI layer from below it:\n" + _lines(f"{a} -> {b}" for a, b in bad))
    return 1 if found or bad else 0


if __name__ == "__main__":
    raise SystemExit(main())

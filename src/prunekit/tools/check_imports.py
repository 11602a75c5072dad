"""The import graph's layering, read from the source: ``python -m prunekit.tools.check_imports``.

prunekit's packages are layered, lowest first: ``core`` (shared machinery), ``io`` (files and
formats), ``models`` (adapters and loading), then the pruning dimensions (``weights``,
``structure``, ``training``, ``tokens``, ``data``, ``kv``) and what sits on them (``evaluate``,
``cli``, ``tools``, the public API). A layer may import only the layers below it (and
``prunekit.errors``, which everything raises), so no cycle can form between them.

Every import counts, also those inside functions and under ``TYPE_CHECKING``: a deferred import is
still a dependency, it only hides the cycle until the call. Importing the root package
(``import prunekit``, ``from prunekit import load``) counts as importing the public API, which
imports everything.

Exit code 0 when the layering holds; 1 with one line per offending import otherwise.
"""

from __future__ import annotations

import ast
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

PACKAGE = "prunekit"
# What each checked layer may import besides itself. Layers not named here are not checked.
ALLOWED: dict[str, frozenset[str]] = {
    "core": frozenset({"core"}),
    "io": frozenset({"core", "io"}),
    "models": frozenset({"core", "io", "models"}),
}
ALWAYS_ALLOWED = frozenset({"errors"})
ROOT = "<public API>"  # the package itself: importing it imports every layer


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    importer: str  # module name
    imported: str  # module name

    def __str__(self) -> str:
        layer, target = layer_of(self.importer), layer_of(self.imported)
        allowed = ", ".join(sorted(ALLOWED[layer] | ALWAYS_ALLOWED))
        return f"{self.path}:{self.line}: {self.importer} imports {self.imported} ({layer} may import only {allowed}; " \
               f"not {target})"


def layer_of(module: str) -> str:
    parts = module.split(".")
    if parts[0] != PACKAGE or len(parts) == 1:
        return ROOT
    return parts[1]


def modules(package_dir: Path) -> Iterator[tuple[str, Path]]:
    """(module name, file) of every module of the package at ``package_dir``."""
    root = package_dir.parent
    for path in sorted(package_dir.rglob("*.py")):
        parts = list(path.relative_to(root).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        yield ".".join(parts), path


def _is_package(module: str, package_dir: Path) -> bool:
    return (package_dir.parent.joinpath(*module.split(".")) / "__init__.py").exists()


def imports(module: str, path: Path, package_dir: Path) -> Iterator[tuple[int, str]]:
    """(line, imported module) for every import of a module inside the package, relative ones resolved."""
    tree = ast.parse(path.read_text(), filename=str(path))
    here = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == PACKAGE:
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base_parts = here.split(".")
                base = ".".join(base_parts[:len(base_parts) - node.level + 1])
                source = f"{base}.{node.module}" if node.module else base
            else:
                source = node.module or ""
            if source.split(".")[0] != PACKAGE:
                continue
            for alias in node.names:
                # ``from prunekit.io import formats`` imports the module prunekit.io.formats.
                candidate = f"{source}.{alias.name}"
                is_module = _is_package(candidate, package_dir) or \
                    package_dir.parent.joinpath(*candidate.split(".")).with_suffix(".py").exists()
                yield node.lineno, candidate if is_module else source


def violations(package_dir: Path, allowed: dict[str, frozenset[str]] = ALLOWED) -> list[Violation]:
    found = []
    for module, path in modules(package_dir):
        layer = layer_of(module)
        if layer not in allowed:
            continue
        for line, imported in dict.fromkeys(imports(module, path, package_dir)):
            target = layer_of(imported)
            if target != layer and target not in allowed[layer] and target not in ALWAYS_ALLOWED:
                found.append(Violation(path, line, module, imported))
    return found


def package_graph(package_dir: Path) -> dict[str, set[str]]:
    """Which top-level packages import which (for the cycle report)."""
    graph: dict[str, set[str]] = {}
    for module, path in modules(package_dir):
        layer = layer_of(module)
        for _, imported in imports(module, path, package_dir):
            target = layer_of(imported)
            if target != layer:
                graph.setdefault(layer, set()).add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Every pair of packages that import each other, directly or through others (one path each)."""
    def reachable(start: str) -> dict[str, list[str]]:
        paths, stack = {start: [start]}, [start]
        while stack:
            node = stack.pop()
            for nxt in sorted(graph.get(node, ())):
                if nxt not in paths:
                    paths[nxt] = paths[node] + [nxt]
                    stack.append(nxt)
        return paths

    found, seen = [], set()
    for a in sorted(graph):
        from_a = reachable(a)
        for b in sorted(from_a):
            back = reachable(b).get(a) if b != a else None
            if back is None:
                continue
            cycle = from_a[b] + back[1:]
            if frozenset(cycle) not in seen:
                seen.add(frozenset(cycle))
                found.append(cycle)
    return found


def main(argv: list[str] | None = None) -> int:
    package_dir = Path(__file__).resolve().parents[1]
    problems = violations(package_dir)
    for problem in problems:
        print(problem)
    graph = package_graph(package_dir)
    for cycle in cycles(graph):  # among the layers above models: reported, not (yet) refused
        print(f"note: packages import each other: {' -> '.join(cycle)}")
    if problems:
        print(f"{len(problems)} imports break the layering core < io < models < the dimensions")
        return 1
    layers = " < ".join(ALLOWED)
    print(f"layering holds: {layers} < the dimensions ({sum(1 for _ in modules(package_dir))} modules checked)")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

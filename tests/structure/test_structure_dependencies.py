"""Every third-party package structural pruning imports is declared in pyproject.toml: module-level imports
as dependencies, imports inside functions (optional features) at least as an extra."""

from __future__ import annotations

import ast
import re
import sys
import tomllib
from importlib.metadata import packages_distributions
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SOURCES = sorted((ROOT / "src" / "prunekit" / "structure").rglob("*.py")) + [ROOT / "src" / "prunekit" / "cli" / "structure.py"]


def _name(requirement: str) -> str:
    return re.split(r"[<>=!~\[; ]", requirement, maxsplit=1)[0].strip().lower().replace("_", "-")


def _imports(path: Path) -> tuple[set[str], set[str]]:
    """Top-level names imported at module level, and inside functions."""
    tree = ast.parse(path.read_text())
    module_level, nested = set(), set()
    functions = [n for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    inside = {id(n) for f in functions for n in ast.walk(f)}
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = {node.module.split(".")[0]}
        else:
            continue
        (nested if id(node) in inside else module_level).update(names)
    return module_level, nested


def test_third_party_imports_are_declared():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    core = {_name(r) for r in project["dependencies"]}
    extras = {_name(r) for group in project.get("optional-dependencies", {}).values() for r in group}
    distributions = packages_distributions()
    missing = []
    for path in SOURCES:
        module_level, nested = _imports(path)
        for names, allowed in ((module_level, core), (nested - module_level, core | extras)):
            for name in sorted(names - set(sys.stdlib_module_names) - {"prunekit", "__future__"}):
                declared = {d.lower().replace("_", "-") for d in distributions.get(name, [name])}
                if not declared & allowed:
                    missing.append(f"{path.relative_to(ROOT)}: {name}")
    assert not missing, f"undeclared dependencies: {missing}"
    assert "scipy" in core  # graph.py's connected components

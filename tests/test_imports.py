"""No import cycles: no module of evcharge imports one that imports it back (lazy imports and TYPE_CHECKING too).

Read from the source with ``ast``, so imports inside functions (the CLI's lazy ones)
count as much as those at the top.
"""

from __future__ import annotations

import ast
from pathlib import Path

import evcharge

ROOT = Path(evcharge.__file__).resolve().parent.parent


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in (ROOT / "evcharge").rglob("*.py")}


def _imports(name: str, path: Path) -> set[str]:
    """The package's modules that ``name`` imports, anywhere in its source."""
    found: set[str] = set()
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name in MODULES)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:
                if f"{module}.{alias.name}" in MODULES:  # `from evcharge.apps import render`
                    found.add(f"{module}.{alias.name}")
                elif module in MODULES:
                    found.add(module)
    found.discard(name)
    return found


GRAPH = {name: _imports(name, path) for name, path in MODULES.items()}


def _reachable(start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for module in GRAPH[todo.pop()] - seen:
            seen.add(module)
            todo.append(module)
    return seen


def test_the_import_graph_sees_lazy_imports() -> None:
    assert "evcharge.apps.vehicle" in GRAPH["evcharge.apps.repl"]
    assert "evcharge.apps.repl" in GRAPH["evcharge.apps.cli"]  # inside run_vehicle
    assert "evcharge.apps.web.dashboard" in GRAPH["evcharge.apps.web.command"]  # inside _run_web


def test_no_module_imports_one_that_imports_it_back() -> None:
    apps = sorted(GRAPH)
    assert "evcharge.apps.cli" in apps and "evcharge.operator.server" in apps
    cycles = {
        name: sorted(m for m in GRAPH[name] if name in _reachable(m)) for name in apps if name in _reachable(name)
    }
    assert cycles == {}

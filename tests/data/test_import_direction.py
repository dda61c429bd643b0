"""The data layer depends on nothing above it: no module of ``anneal.data`` imports ``anneal.config`` (the
config imports ``anneal.data``, one way down), and the modules of ``anneal.data`` import each other without
a cycle. Read from the source with ``ast``, so imports inside functions count too."""

from __future__ import annotations

import ast
from pathlib import Path

import anneal.data

PACKAGE = Path(anneal.data.__file__).parent
MODULES = {f"anneal.data.{path.stem}": path for path in sorted(PACKAGE.glob("*.py")) if path.stem != "__init__"}


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports, anywhere in it (``from anneal.data import spec`` -> anneal.data.spec)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}  # a module or a name in one
    return found


def test_no_data_module_imports_the_config() -> None:
    assert len(MODULES) > 8  # the walk found the package
    offenders = {name: sorted(i for i in _imports(path) if i == "anneal.config" or i.startswith("anneal.config."))
                 for name, path in MODULES.items()}
    assert {name: found for name, found in offenders.items() if found} == {}


def test_data_modules_import_each_other_without_a_cycle() -> None:
    graph = {name: _imports(path) & MODULES.keys() for name, path in MODULES.items()}
    assert "anneal.data.sources" in graph["anneal.data.datasets"]  # the entry point sits on top
    assert "anneal.data.datasets" not in graph["anneal.data.sources"]
    done: set[str] = set()

    def visit(name: str, path: tuple[str, ...]) -> None:
        assert name not in path, f"import cycle: {' -> '.join((*path, name))}"
        if name not in done:
            for child in sorted(graph[name]):
                visit(child, (*path, name))
            done.add(name)

    for name in graph:
        visit(name, ())

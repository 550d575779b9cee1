"""The layout holds: dependencies point one way and no module imports another in a cycle.

    core  <-  receiver  <-  subscriptions  <-  serving  <-  researchflow_cli, researchflow_demo

Read from the source with `ast` (imports inside functions count; those under `if
TYPE_CHECKING:` do not, they never run), so a violation fails here before anyone reads it.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# Each part may import its own modules and those of parts before it, never after.
ORDER = {
    "core": 0,
    "receiver": 1,
    "subscriptions": 2,
    "serving": 3,
    "researchflow_cli": 4,
    "researchflow_demo": 4,
}


def _modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for part in ORDER:
        package = ROOT / part
        paths = sorted(package.rglob("*.py")) if package.is_dir() else [ROOT / f"{part}.py"]
        for path in paths:
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            found[name.removesuffix(".__init__")] = path
    return found


MODULES = _modules()


def _runtime_nodes(tree: ast.AST) -> Iterator[ast.AST]:
    """Every node but those under `if TYPE_CHECKING:`."""
    stack = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            stack.extend(node.orelse)
            continue
        yield node
        stack.extend(ast.iter_child_nodes(node))


def _imported(path: Path) -> set[str]:
    """Every module name an import of `path` names (a `from m import x` names m and m.x)."""
    names: set[str] = set()
    for node in _runtime_nodes(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


IMPORTS = {name: _imported(path) for name, path in MODULES.items()}
# Module -> the project modules it imports.
EDGES = {name: {t for t in IMPORTS[name] if t in MODULES and t != name} for name in MODULES}


def _part(module: str) -> str:
    return module.split(".", 1)[0]


def test_every_part_is_read() -> None:
    assert {_part(m) for m in MODULES} == set(ORDER)
    assert "subscriptions.standin.hapi" in MODULES and "serving.engines.postgres" in MODULES


def test_parts_import_only_the_parts_before_them() -> None:
    upward = sorted(
        f"{module} imports {target}"
        for module, targets in EDGES.items()
        for target in targets
        if ORDER[_part(target)] > ORDER[_part(module)]
    )
    assert upward == []


def test_no_module_imports_another_in_a_cycle() -> None:
    # Tarjan's strongly connected components: any with two modules or more is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(module: str) -> None:
        index[module] = low[module] = len(index)
        stack.append(module)
        on_stack.add(module)
        for target in sorted(EDGES[module]):
            if target not in index:
                visit(target)
                low[module] = min(low[module], low[target])
            elif target in on_stack:
                low[module] = min(low[module], index[target])
        if low[module] == index[module]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == module:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for module in sorted(EDGES):
        if module not in index:
            visit(module)
    assert cycles == []


def test_no_part_imports_the_tests() -> None:
    assert (
        sorted(m for m, names in IMPORTS.items() if any(_part(n) == "tests" for n in names)) == []
    )


def test_hapi_tables_are_read_through_the_one_change_reader() -> None:
    readers = sorted(m for m, targets in EDGES.items() if "subscriptions.hapi_db" in targets)
    assert readers == ["subscriptions.changes"]

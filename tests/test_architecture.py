"""The shape of the code: no import circle, no import from a lower layer to a higher one, no module over about
400 lines, and a docstring on every module, so the layout keeps showing the architecture as it grows."""
from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"

# Lowest first. A package may import its own modules and anything on a lower floor, never a higher or equal one.
FLOORS = {
    "errors": 0, "version": 0,
    "tensor": 1,  # torch helpers: calling a model, batched gradients, spatial axes
    "accel": 2,  # CPU speed-ups of forward passes
    "core": 3,  # explain(), the shared context, the method registry, results, targets, and ModelDescription (the one
    # description of a model, with its accessor `describe`: core, families and io read it, so it sits here, below models)
    "families": 4,  # the methods, registered by family
    "io": 5,  # files: scans, model files, outputs
    "models": 6, "data": 6,  # bundled models and how to load any model; datasets
    "evaluation": 7,  # metrics and the dataset runner
    "pipeline": 8, "training": 8,
    "medlens": 9,  # the package root: the public API
    "batch": 10,  # many inputs, resumable, on executors
    "node": 11,  # the DICOM node: receives studies, explains them through batch, sends results back
    "evaluation_run": 11,  # methods x metrics over a dataset
    "app": 12,
    "cli": 13, "__main__": 14,
}
MAX_LINES = 420


def _modules() -> dict[str, Path]:
    found = {}
    for path in (SRC / "medlens").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        found[name] = path
    return found


def _runtime_nodes(tree: ast.AST):
    """Every node, except those under `if TYPE_CHECKING:` (imports for type hints only, never run)."""
    stack = [tree]
    while stack:
        node = stack.pop()
        yield node
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and getattr(child.test, "id", getattr(child.test, "attr", None)) == "TYPE_CHECKING":
                stack.extend(child.orelse)
                continue
            stack.append(child)


def _imports(modules: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the medlens modules it imports, at the top or inside a function."""
    graph: dict[str, set[str]] = defaultdict(set)
    for name, path in modules.items():
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for node in _runtime_nodes(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - node.level + 1]
                    base = ".".join(up + ([base] if base else []))
                targets = [f"{base}.{alias.name}" for alias in node.names]
                targets = [t if t in modules else base for t in targets]
            else:
                continue
            graph[name].update(t for t in targets if t in modules and t != name)
    return graph


def _area(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else parts[0]


def test_every_package_has_a_floor():
    assert {_area(m) for m in _modules()} <= set(FLOORS), "a new package: give it a floor in FLOORS"


def test_no_import_goes_up_or_sideways():
    wrong = []
    for module, targets in _imports(_modules()).items():
        for target in targets:
            a, b = _area(module), _area(target)
            if a != b and FLOORS[b] >= FLOORS[a]:
                wrong.append(f"{module} -> {target}")
    assert not wrong, "imports against the floors:\n" + "\n".join(sorted(wrong))


def test_no_import_circle():
    graph = _imports(_modules())
    state: dict[str, int] = {}

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                raise AssertionError("import circle: " + " -> ".join(path[path.index(nxt):] + [node, nxt]) if nxt in path
                                     else f"import circle through {node} -> {nxt}")
            if nxt not in state:
                visit(nxt, path + [node])
        state[node] = 2

    for module in sorted(_modules()):
        if module not in state:
            visit(module, [])


@pytest.mark.parametrize("module", sorted(_modules()))
def test_module_is_small_and_says_what_it_owns(module):
    path = _modules()[module]
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_LINES, f"{path.relative_to(SRC)}: split it by job"
    if text.strip():
        assert ast.get_docstring(ast.parse(text)), f"{path.relative_to(SRC)} has no docstring"


def test_the_checker_sees_a_known_upward_import():
    """The floors test can fail: the package root imports models, which sits below it, and not the reverse."""
    graph = _imports(_modules())
    assert "medlens.models.loading" in graph["medlens"]
    assert "medlens.core.explain" in graph["medlens"]

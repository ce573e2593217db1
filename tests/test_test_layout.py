"""The tests as a library: shared builders live in helpers.py (and the other non-test modules here), so no module
under tests/ imports a test module (test_*.py) or a private (underscore) name of conftest.py."""
from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _is_test_module(name: str) -> bool:
    return name.split(".")[0].startswith("test_")


def _problem(node: ast.AST) -> list[str]:
    """What one node imports that it should not."""
    if isinstance(node, ast.Import):
        return [f"imports the test module {a.name}" for a in node.names if _is_test_module(a.name)]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        if _is_test_module(node.module):
            return [f"imports from the test module {node.module}"]
        if node.module == "conftest":
            return [f"imports the private name conftest.{a.name}" for a in node.names if a.name.startswith("_")]
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "conftest":
        if node.attr.startswith("_") and not node.attr.startswith("__"):
            return [f"uses the private name conftest.{node.attr}"]
    if isinstance(node, ast.Call) and getattr(node.func, "attr", getattr(node.func, "id", "")) == "import_module":
        names = [a.value for a in node.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]
        return [f"imports the test module {n}" for n in names if _is_test_module(n)]
    return []


def layout_problems(source: str, filename: str) -> list[str]:
    """What `source` imports that it should not (test modules, underscore names of conftest), in line order."""
    found = [(node.lineno, text) for node in ast.walk(ast.parse(source, filename)) for text in _problem(node)]
    return [f"{filename}:{line} {text}" for line, text in sorted(found)]


def test_no_test_module_imports_another_or_a_private_conftest_name():
    problems = [p for path in sorted(TESTS.rglob("*.py"))
                for p in layout_problems(path.read_text(), str(path.relative_to(TESTS)))]
    assert not problems, ("shared builders belong in tests/helpers.py (public names) or a conftest fixture:\n  "
                          + "\n  ".join(problems))


def test_the_checker_sees_each_kind_of_forbidden_import():
    source = ("import test_cli\nfrom test_io_images import make_dicom\nfrom conftest import TinyCNN2d, _randomise_bn\n"
              "import conftest\nconftest._private(1)\nimportlib.import_module('test_cli')\n"
              "from helpers import run\nimport conftest as c\n")
    problems = layout_problems(source, "t.py")
    assert problems == [
        "t.py:1 imports the test module test_cli",
        "t.py:2 imports from the test module test_io_images",
        "t.py:3 imports the private name conftest._randomise_bn",
        "t.py:5 uses the private name conftest._private",
        "t.py:6 imports the test module test_cli",
    ]

"""The reference stays inside the repository and in step with the code.

docs/api.md has an entry (a heading) for every name in `medlens.__all__` and every command of the `medlens`
click group, and its generated tables (options of each command, each method's options with defaults) are
current; no docstring or comment in src/ or tools/, and no page of docs/, README.md or a model card, names a
module or file that does not exist; nothing a user reads (src/, README.md, docs/, the model cards) points at
`../shared` or `API.md`, which users never have.
"""
from __future__ import annotations

import ast
import importlib.util
import io
import re
import tokenize
from functools import lru_cache
from pathlib import Path

import click
import pytest

import medlens

ROOT = Path(__file__).resolve().parents[1]
SRC = ROOT / "src"
API_MD = ROOT / "docs" / "api.md"


def _api_reference():
    """tools/api_reference.py, the generator of docs/api.md's tables, loaded as a module."""
    spec = importlib.util.spec_from_file_location("api_reference", ROOT / "tools" / "api_reference.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _heading_keys() -> set[str]:
    """The first `code` span of every heading in docs/api.md, without a `medlens.` prefix or a call's arguments."""
    keys = set()
    for line in API_MD.read_text().splitlines():
        if not line.startswith("#"):
            continue
        span = re.search(r"`([^`]+)`", line)
        if span:
            key = span.group(1).strip()
            key = key[len("medlens."):] if key.startswith("medlens.") else key
            keys.add(key.split("(")[0].strip())
    return keys


def _commands(group: click.Group, prefix: str = ""):
    for name, command in group.commands.items():
        yield prefix + name, command
        if isinstance(command, click.Group):
            yield from _commands(command, f"{prefix}{name} ")


def test_every_public_name_has_an_entry():
    keys = _heading_keys()
    missing = [name for name in medlens.__all__ if name not in keys]
    assert not missing, f"docs/api.md has no heading for {missing}: add a '### `NAME`' section with arguments, " \
                        f"defaults, return value, errors and an example"


def test_every_command_has_an_entry():
    from medlens.cli.group import cli

    keys = _heading_keys()
    missing = [path for path, _ in _commands(cli) if f"medlens {path}" not in keys]
    assert not missing, f"docs/api.md has no heading for the command(s) {missing}: add a '### `medlens NAME`' " \
                        f"section (what it does, exit statuses, a generated options block, an example)"


def test_generated_tables_are_current():
    tool = _api_reference()
    text = API_MD.read_text()
    missing = sorted(set(tool.blocks()) - tool.keys_in(text))
    assert not missing, f"docs/api.md has no generated block for {missing} (markers '<!-- generated: KEY -->')"
    assert tool.update(text) == text, "docs/api.md's tables are behind the code: run python tools/api_reference.py"


def test_generated_tables_hold_defaults_from_the_code():
    # The generator is checked too: a default read from click and one from the registry appear as the code has them.
    tool = _api_reference()
    from medlens.cli.group import cli

    formats = next(p for p in cli.commands["explain"].params if p.name == "formats")
    assert f"| `--formats` | TEXT | `{formats.default}` |" in tool.command_table(cli.commands["explain"])
    n_steps = medlens.method_info("integratedgradients")["options"]["n_steps"]
    row = next(r for r in tool.method_options_table().splitlines() if r.startswith("| `integratedgradients` |"))
    assert f"`n_steps={n_steps}`" in row


def test_readme_links_the_reference():
    assert "(docs/api.md)" in (ROOT / "README.md").read_text()


# ------------------------------------------------------------------------------ names in docstrings and comments
PY_NAME = re.compile(r"(?<![\w/.-])([A-Za-z_][\w/.-]*\.py)\b")
DOC_NAME = re.compile(r"(?<![\w/.-])(docs/[\w/.-]*\.md)\b")
DOTTED = re.compile(r"(?<![\w.])medlens(?:\.[A-Za-z_]\w*)+")


def _prose(path: Path) -> list[tuple[int, str]]:
    """(line, text) of every docstring and comment of a Python file."""
    source = path.read_text()
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
                    and isinstance(body[0].value.value, str):
                found.append((body[0].lineno, body[0].value.value))
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            found.append((token.start[0], token.string))
    return found


@lru_cache(maxsize=None)
def _repo_files() -> tuple[str, ...]:
    files = []
    for top in ("src", "tests", "tools", "benchmarks", "docs"):
        files += [p.relative_to(ROOT).as_posix() for p in (ROOT / top).rglob("*") if p.is_file()]
    return tuple(files)


@lru_cache(maxsize=None)
def _module_names() -> dict[str, Path]:
    names = {}
    for path in (SRC / "medlens").rglob("*.py"):
        parts = path.relative_to(SRC).with_suffix("").parts
        names[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return names


@lru_cache(maxsize=None)
def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
            if any(isinstance(t, ast.Name) and t.id == "__all__" for t in targets) and node.value is not None:
                names.update(ast.literal_eval(node.value))  # a package's names, some imported on first use (PEP 562)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
    return names


def _dotted_exists(name: str, modules: dict[str, Path]) -> bool:
    """`medlens.a.b.c`: the longest prefix that is a module, then (if anything is left) a name defined in it."""
    parts = name.split(".")
    for cut in range(len(parts), 0, -1):
        module = ".".join(parts[:cut])
        if module in modules:
            rest = parts[cut:]
            return not rest or rest[0] in _top_level_names(modules[module])
    return False


def _file_exists(name: str, files: tuple[str, ...]) -> bool:
    name = name.lstrip("./")
    return any(f == name or f.endswith("/" + name) for f in files)


def _stale_names(path: Path, pieces: list[tuple[int, str]]) -> list[str]:
    files, modules = _repo_files(), _module_names()
    stale = []
    for line, text in pieces:
        names = [n for n in PY_NAME.findall(text) + DOC_NAME.findall(text) if not _file_exists(n, files)]
        names += [n for n in DOTTED.findall(text) if not _dotted_exists(n, modules)]
        stale += [f"{path.relative_to(ROOT)}:{line}: {name}" for name in names]
    return stale


def test_docstrings_and_comments_name_only_existing_modules():
    stale = []
    for path in sorted([*(SRC / "medlens").rglob("*.py"), *(ROOT / "tools").glob("*.py")]):
        stale += _stale_names(path, _prose(path))
    assert not stale, "docstrings or comments name modules or files that do not exist:\n" + "\n".join(stale)


def test_docs_and_model_cards_name_only_existing_modules():
    stale = []
    for path in sorted([ROOT / "README.md", *(ROOT / "docs").rglob("*.md"), *(SRC / "medlens").rglob("*.md")]):
        stale += _stale_names(path, list(enumerate(path.read_text().splitlines(), 1)))
    assert not stale, "the docs name modules or files that do not exist:\n" + "\n".join(stale)


def test_the_name_checks_catch_stale_names():
    files, modules = _repo_files(), _module_names()
    assert not _file_exists("perturbation_surrogate.py", files) and _file_exists("families/surrogate.py", files)
    assert not _file_exists("docs/architecture-tree.md", files) and _file_exists("docs/architecture.md", files)
    assert _dotted_exists("medlens.evaluation_run.evaluate", modules)  # a name its package imports
    assert _dotted_exists("medlens.accel.fast_forward.ENABLED", modules)
    assert not _dotted_exists("medlens.inference", modules)
    assert not _dotted_exists("medlens.core.registry.no_such_name", modules)


# ------------------------------------------------------------------------------ pointers users never have
POINTER = re.compile(r"\.\./shared|shared/design|\bAPI\.md\b")
TEXT_SUFFIXES = {".py", ".md", ".json", ".csv", ".txt", ".html", ".log", ".toml", ".yaml", ".yml", ".jsonl"}


@pytest.mark.parametrize("top", ["src", "docs", "README.md"])
def test_nothing_points_at_shared_or_the_design_file(top: str):
    base = ROOT / top
    paths = [base] if base.is_file() else [p for p in base.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES]
    hits = []
    for path in paths:
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if POINTER.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()[:120]}")
    assert not hits, "users never have ../shared or API.md; say where the data comes from, or link docs/api.md:\n" \
                     + "\n".join(hits)

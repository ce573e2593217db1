"""Regenerate the generated tables of docs/api.md from the code: every CLI command's options (from the click
group) and every method's options with their defaults (from the method registry).

`python tools/api_reference.py` rewrites the blocks between the `<!-- generated: KEY -->` and
`<!-- end generated -->` markers in docs/api.md; `--check` only says whether they are current (exit status 1 when
not). The prose around the blocks is written by hand; `tests/test_docs_reference.py` runs the same check.
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any, Iterator

import click

API_MD = Path(__file__).resolve().parents[1] / "docs" / "api.md"
BLOCK = re.compile(r"(<!-- generated: (?P<key>[^>]+?) -->\n)(?P<body>.*?)(<!-- end generated -->)", re.S)


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _python_value(value: Any) -> str:
    return json.dumps(value) if isinstance(value, str) else repr(value)


def method_options_table() -> str:
    """One row per registered method: its options as `name=default`, in the registry's order."""
    import medlens

    rows = ["| method | options (`name=default`) |", "| --- | --- |"]
    for name in medlens.methods():
        options = medlens.method_info(name)["options"]
        text = ", ".join(f"`{key}={_python_value(value)}`" for key, value in options.items()) or "-"
        rows.append(f"| `{name}` | {text} |")
    return "\n".join(rows) + "\n"


def _is_unset(value: Any) -> bool:
    return value is None or type(value).__name__ in ("Sentinel", "_Missing") or repr(value).endswith("UNSET")


def _type_text(param: click.Parameter) -> str:
    kind = param.type
    if isinstance(kind, click.Choice):
        return "|".join(map(str, kind.choices))
    if isinstance(kind, click.IntRange):
        return kind._describe_range() if hasattr(kind, "_describe_range") else "INTEGER"
    return kind.name.upper()


def _default_text(param: click.Option) -> str:
    if param.required:
        return "required"
    if param.is_flag and not param.secondary_opts:
        return "off"
    if param.multiple:
        return "none (repeatable)"
    if _is_unset(param.default):
        return "-"
    return f"`{param.default}`"


def command_table(command: click.Command) -> str:
    """The usage line and a table of every option: names, value, default, help."""
    arguments = [p for p in command.params if isinstance(p, click.Argument)]
    usage = " ".join(a.name.upper() + ("..." if a.nargs == -1 else "") for a in arguments)
    lines = [f"Usage: `medlens {command.name} [OPTIONS]{' ' + usage if usage else ''}`", ""]
    for a in arguments:
        if isinstance(a.type, click.Choice):
            lines += [f"{a.name.upper()}: one of {', '.join(f'`{c}`' for c in a.type.choices)}.", ""]
    lines += ["| option | value | default | what it does |", "| --- | --- | --- | --- |"]
    for p in command.params:
        if not isinstance(p, click.Option) or p.hidden:
            continue
        names = ", ".join(f"`{o}`" for o in [*p.opts, *p.secondary_opts])
        value = "flag" if p.is_flag else _type_text(p)
        lines.append(f"| {names} | {_cell(value)} | {_cell(_default_text(p))} | {_cell(p.help or '')} |")
    lines.append("| `-h`, `--help` | flag | off | Show the help and exit. |")
    return "\n".join(lines) + "\n"


def commands(group: click.Group | None = None, prefix: str = "") -> Iterator[tuple[str, click.Command]]:
    """Every command of the `medlens` group as ("explain", command); a subgroup's commands as ("group sub", ...)."""
    if group is None:
        from medlens.cli.group import cli as group
    for name in sorted(group.commands):
        command = group.commands[name]
        path = f"{prefix}{name}"
        yield path, command
        if isinstance(command, click.Group):
            yield from commands(command, path + " ")


def blocks() -> dict[str, str]:
    """Every generated block of docs/api.md by key: "methods" and "cli <command path>"."""
    found = {"methods": method_options_table()}
    for path, command in commands():
        found[f"cli {path}"] = command_table(command)
    return found


def update(text: str) -> str:
    """`text` with every generated block replaced by its current content (unknown keys are an error)."""
    current = blocks()

    def _replace(match: re.Match) -> str:
        key = match.group("key").strip()
        if key not in current:
            raise KeyError(f"docs/api.md has a generated block {key!r} that nothing generates (a removed command?)")
        return match.group(1) + current[key] + match.group(4)

    return BLOCK.sub(_replace, text)


def keys_in(text: str) -> set[str]:
    return {m.group("key").strip() for m in BLOCK.finditer(text)}


def main(argv: list[str]) -> int:
    text = API_MD.read_text()
    fresh = update(text)
    missing = sorted(set(blocks()) - keys_in(text))
    if missing:
        print(f"docs/api.md has no generated block for: {', '.join(missing)}; add a section with "
              f"'<!-- generated: KEY -->' / '<!-- end generated -->' markers.", file=sys.stderr)
    if "--check" in argv:
        stale = fresh != text
        if stale:
            print("docs/api.md is behind the code: run python tools/api_reference.py", file=sys.stderr)
        return 1 if stale or missing else 0
    if fresh != text:
        API_MD.write_text(fresh)
        print("docs/api.md: generated blocks updated")
    return 1 if missing else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

"""The `medlens` command line: methods, models, explain, demo, evaluate.

Each subcommand lives beside what it drives; this module only assembles the group and turns every
`MedlensError` into a one-paragraph message and exit status 2.
"""
from __future__ import annotations

import sys
from typing import Optional, Sequence

import click

from .errors import MedlensError


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medlens")
def cli() -> None:
    """Explain medical image classifiers: which regions drove each finding, and how far to trust it."""


def _register_commands() -> None:
    # Each family of commands is optional while the project grows; a missing one is simply absent.
    import importlib

    for module_name, attr in (
        ("medlens.commands", "COMMANDS"),
        ("medlens.demo", "COMMANDS"),
        ("medlens.evaluation.command", "COMMANDS"),
        ("medlens.train", "COMMANDS"),
    ):
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:
            if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
                continue  # the module (or its package) does not exist yet
            raise
        for command in getattr(module, attr, ()):
            cli.add_command(command)


_register_commands()


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: run the CLI; user mistakes end with a short message and exit status 2."""
    try:
        cli.main(args=list(argv) if argv is not None else None, prog_name="medlens", standalone_mode=False)
    except MedlensError as exc:
        click.echo(f"medlens: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("medlens: stopped.", err=True)
        return 130
    except click.ClickException as exc:
        exc.show()
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The `medlens` command line: methods, models, explain, batch, demo, evaluate, train, app, serve, report.

Each subcommand lives beside what it drives; this module only assembles the group and turns every
`MedlensError` into a one-paragraph message and exit status 2. Every command's module is imported when the command is
named (or listed), and nothing here imports torch: `medlens batch --executor processes` starts its workers' forkserver
before anything imports torch (docs/batch.md, "Start-up").
"""
from __future__ import annotations

import contextlib
import importlib
import signal
import sys
import threading
from typing import Iterator, Optional, Sequence

import click

from medlens.core.allocator import keep_freed_memory
from medlens.errors import MedlensError


# Commands imported only when named (or listed, as by --help): their modules pull in torch, training, evaluation, the
# app or report code, a noticeable part of `medlens batch`'s start-up (issue 28) for commands that run is not using.
LAZY_COMMANDS = {"methods": "medlens.cli.commands", "models": "medlens.cli.commands", "explain": "medlens.cli.commands",
                 "batch": "medlens.cli.batch", "demo": "medlens.cli.demo", "evaluate": "medlens.cli.evaluate",
                 "train": "medlens.cli.train", "app": "medlens.cli.app", "serve": "medlens.cli.serve",
                 "report": "medlens.cli.report"}


class LazyGroup(click.Group):
    """A click group whose commands in `LAZY_COMMANDS` are imported on first use; `commands` lists them all."""

    @property
    def commands(self) -> dict[str, click.Command]:  # type: ignore[override]
        while self._lazy:
            self._load(next(iter(self._lazy)))
        return self._commands

    @commands.setter
    def commands(self, value: dict[str, click.Command]) -> None:
        self._commands = dict(value)
        self._lazy = dict(LAZY_COMMANDS)

    def _load(self, name: str) -> None:
        module = self._lazy[name]
        for command in importlib.import_module(module).COMMANDS:
            self._commands[command.name] = command
        self._lazy = {n: m for n, m in self._lazy.items() if m != module}  # its other commands came with it

    def add_command(self, cmd: click.Command, name: Optional[str] = None) -> None:
        self._commands[name or cmd.name] = cmd

    def get_command(self, ctx: click.Context, cmd_name: str) -> Optional[click.Command]:
        if cmd_name in self._lazy:
            self._load(cmd_name)
        return self._commands.get(cmd_name)

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self._commands, *self._lazy})


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="medlens")
def cli() -> None:
    """Explain medical image classifiers: which regions drove each finding, and how far to trust it."""


class Terminated(BaseException):
    """SIGTERM, raised where the program is, so that every write in progress is undone as for Ctrl-C."""


@contextlib.contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While running a command, SIGTERM (a scheduler, `kill`, a container stop) raises `Terminated` instead of
    ending the process on the spot: staged files are removed and replaced files put back before exiting."""
    if threading.current_thread() is not threading.main_thread():  # signal handlers belong to the main thread
        yield
        return

    def _raise(signum: int, frame: object) -> None:
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, _raise)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point: run the CLI; user mistakes end with a short message and exit status 2."""
    args = list(argv) if argv is not None else sys.argv[1:]
    if any("\0" in str(a) for a in args):  # the OS refuses such paths with a ValueError deep inside click
        click.echo("medlens: error: an argument contains a NUL character, which no file name or option can hold.", err=True)
        return 2
    keep_freed_memory()  # medlens's own process: freed memory reused, not faulted in again (medlens.core.allocator)
    try:
        with sigterm_unwinds():
            cli.main(args=args, prog_name="medlens", standalone_mode=False)
    except Terminated:
        click.echo("medlens: stopped by SIGTERM; every result already written is complete, the one in progress was not kept.", err=True)
        return 143
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

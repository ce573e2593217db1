"""User-facing errors of medlens.

Every mistake a user can make (a bad file, a wrong target, an unknown option) raises a subclass of
`MedlensError`; the CLI prints its message and exits with status 2, never a traceback.
"""
from __future__ import annotations


class MedlensError(Exception):
    """A mistake in what the user asked for: the message says what was wrong and what to do."""

    exit_code = 2


class InputError(MedlensError):
    """An input image or volume could not be read or prepared."""


class ModelError(MedlensError):
    """A model could not be loaded, or does not fit what the method needs."""


class TargetError(MedlensError):
    """The requested targets do not fit the model's outputs or the batch."""


class MethodError(MedlensError):
    """An unknown method, an unknown option, or a method that cannot run on this model."""


class OutputError(MedlensError):
    """Results could not be written where the user asked."""


def short_message(error: BaseException, limit: int = 300) -> str:
    """One line of a library error for a person: the first line of the message, or for TorchScript (whose message
    is its own traceback, with the cause last) the last line; cut at a word boundary near `limit` characters."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    text = lines[-1] if "Traceback of TorchScript" in str(error) else lines[0]
    if len(text) > limit:
        text = text[:limit].rsplit(" ", 1)[0] + " ..."
    return text

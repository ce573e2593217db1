"""What every executor shares: the task-factory protocol, `ExecutorError`, running a mini-batch through a task (one
call, or one item at a time so that only the item at fault is lost), and importing Ray only when asked for.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Protocol

from medlens.errors import MedlensError, short_message

RAY_HINT = 'the ray executor needs Ray: pip install "medlens[ray]"'


class TaskFactory(Protocol):
    def __call__(self) -> Callable[[Any], dict]: ...

    def lost(self, item: Any, message: str) -> dict: ...


class ExecutorError(MedlensError):
    """An executor could not start its workers (Ray missing, a cluster that cannot be reached, a worker that fails)."""


def _call_many(task: Any, factory: TaskFactory, items: list) -> list[dict]:
    """The records of a mini-batch: in one `task.run_many` call where the task has one, else item by item."""
    if len(items) > 1 and hasattr(task, "run_many"):
        try:
            return list(task.run_many(items))
        except Exception:  # noqa: BLE001 - one at a time, so that only the item at fault is lost
            pass
    return [_call(task, factory, item) for item in items]


def _call(task: Callable[[Any], dict], factory: TaskFactory, item: Any) -> dict:
    try:
        return task(item)
    except Exception as exc:  # noqa: BLE001 - a task that raises loses its item, not the run
        return factory.lost(item, f"the task raised {type(exc).__name__}: {short_message(exc)}")


def load_ray() -> Any:
    """Import Ray, or say in one line how to install it. Imported only here: a heavy, optional dependency (only
    its core: the executor uses actors, not Ray Data, whose import alone costs seconds in the driver and each actor)."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
    except ImportError:
        raise ExecutorError(RAY_HINT) from None
    return ray

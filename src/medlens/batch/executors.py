"""Executors: one interface to run a per-worker task over many items, in this process (`serial`), in standard-library
worker processes (`processes`), or on Ray (`ray`). The batch runner uses them; `medlens evaluate` can too.

The interface (all an executor needs to know of the work):
- a *task factory*: a picklable object built from plain config. `factory()` builds the task, once per worker (load the
  model there, set torch threads there); `factory.lost(item, message)` returns the record of an item whose worker
  died (or whose task raised) so that the run can go on. `medlens.batch.task.BatchTaskFactory` is the batch's.
- *items*: picklable values (the batch sends `WorkItem`s); `task(item)` returns a JSON-able record (a dict).
- `executor.run(factory, items, batch_size)` yields one record per item, in the order they finish (not the items'
  order). The caller (only the driver) persists each record as it arrives, so a record yielded is a result kept.
  Items go to a task `batch_size` at a time (a mini-batch): a task with `run_many(items)` gets them in one call
  (the batch's explains inputs of one prepared shape in one pass), any other task one by one.
Fault tolerance: `processes` keeps `ITEMS_PER_WORKER` mini-batches sent to each worker (one in work, the next
waiting in its pipe, so a worker never waits for the driver), and a worker answers them in order, so when it dies
the mini-batch it was working on is known: one of several inputs is split into single inputs (no attempt counted);
a single input goes to a fresh worker, up to `max_attempts` times in all, then `lost` is its record; the
mini-batches still waiting are handed out again without counting an attempt. `ray` leaves restarts to Ray (actors are
restarted and their tasks retried).
"""
from __future__ import annotations

import json
import logging
import multiprocessing
import os
import pickle
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence

import numpy as np

from medlens.errors import MedlensError, short_message

EXECUTORS = ("serial", "processes", "ray")
RAY_HINT = 'the ray executor needs Ray: pip install "medlens[ray]"'
ITEMS_PER_WORKER = 2  # mini-batches sent and not yet answered, per worker process


class TaskFactory(Protocol):
    def __call__(self) -> Callable[[Any], dict]: ...

    def lost(self, item: Any, message: str) -> dict: ...


class ExecutorError(MedlensError):
    """An executor could not start its workers (Ray missing, a cluster that cannot be reached, a worker that fails)."""


class SerialExecutor:
    """Every item in this process, in order: no extra dependency, the default."""

    name = "serial"
    workers = 1

    def run(self, factory: TaskFactory, items: Sequence[Any], batch_size: int = 1) -> Iterator[dict]:
        task = factory()
        for start in range(0, len(items), max(1, batch_size)):
            yield from _call_many(task, factory, list(items[start:start + max(1, batch_size)]))


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


def _worker_main(factory: TaskFactory, conn: Connection) -> None:
    """A worker process: build the task once, then answer (index, item) messages until told to stop (None)."""
    try:
        task = factory()
    except BaseException as exc:  # noqa: BLE001 - said to the driver, which stops the run with the message
        conn.send(("error", str(exc) if isinstance(exc, MedlensError) else f"{type(exc).__name__}: {short_message(exc)}",
                   None))
        return
    conn.send(("ready", None, None))
    while True:
        try:
            message = conn.recv()
        except EOFError:
            return
        if message is None:
            return
        index, chunk = message
        conn.send(("records", index, _call_many(task, factory, chunk)))


class ProcessExecutor:
    """`workers` standard-library processes, each working on one mini-batch with the next one waiting in its pipe."""

    name = "processes"

    def __init__(self, workers: int = 2, max_attempts: int = 3) -> None:
        if workers < 1:
            raise ExecutorError(f"--workers must be 1 or more, not {workers}.")
        self.workers = workers
        self.max_attempts = max_attempts
        # forkserver: a clean server process imports torch and medlens once, and each worker is forked from it (no
        # torch thread state is forked from the driver, and a worker starts in the time it takes to load the model)
        self.context = multiprocessing.get_context("forkserver")
        self.context.set_forkserver_preload(["medlens.batch.task"])

    def _start(self, factory: TaskFactory) -> "_Worker":
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(factory, child), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def run(self, factory: TaskFactory, items: Sequence[Any], batch_size: int = 1) -> Iterator[dict]:
        step = max(1, batch_size)
        chunks = [list(range(start, min(start + step, len(items)))) for start in range(0, len(items), step)]
        queue = deque(range(len(chunks)))
        attempts = [0] * len(items)
        workers = [self._start(factory) for _ in range(min(self.workers, len(chunks)))]
        finished = 0
        try:
            while finished < len(items):
                wait([w.conn for w in workers] + [w.process.sentinel for w in workers])
                for worker in list(workers):
                    for kind, index, payload in worker.messages():
                        if kind == "error":
                            raise ExecutorError(f"a worker process could not start: {index}")
                        if kind == "ready":
                            worker.ready = True
                        elif kind == "records":
                            worker.holding.remove(index)
                            finished += len(payload)
                            yield from payload
                    if worker.dead:
                        workers.remove(worker)
                        worker.close()
                        if not worker.ready:
                            raise ExecutorError(f"a worker process died while starting (exit code "
                                                f"{worker.process.exitcode}).")
                        held = worker.holding.popleft() if worker.holding else None
                        queue.extendleft(reversed(worker.holding))  # not started: handed out again as they were
                        if held is not None:
                            lost = self._requeue(chunks, held, queue, attempts)
                            if lost is not None:
                                finished += 1
                                yield factory.lost(items[lost], f"the worker process died while working on it "
                                                                f"{attempts[lost]} times (last exit code {worker.process.exitcode})")
                        if queue:
                            workers.append(self._start(factory))
                for worker in workers:
                    while worker.ready and len(worker.holding) < ITEMS_PER_WORKER and queue:
                        index = queue.popleft()
                        worker.holding.append(index)
                        worker.send((index, [items[i] for i in chunks[index]]))
        finally:
            for worker in workers:
                worker.send(None)
            for worker in workers:
                worker.close()

    def _requeue(self, chunks: list[list[int]], held: int, queue: deque, attempts: list[int]) -> Optional[int]:
        """A dead worker's mini-batch goes back to the front of the queue: split into single items (the one at fault
        is not known), or a single item with one attempt more; returns the item given up after `max_attempts`."""
        members = chunks[held]
        if len(members) > 1:
            chunks.extend([i] for i in members)
            queue.extendleft(reversed(range(len(chunks) - len(members), len(chunks))))
            return None
        attempts[members[0]] += 1
        if attempts[members[0]] >= self.max_attempts:
            return members[0]
        queue.appendleft(held)
        return None


class _Worker:
    """A worker process, its pipe, and the indices of the items sent to it and not yet answered (in order)."""

    def __init__(self, process: Any, conn: Connection) -> None:
        self.process, self.conn = process, conn
        self.ready = False
        self.dead = False
        self.holding: deque = deque()

    def messages(self) -> Iterator[tuple]:
        try:
            while self.conn.poll():
                yield self.conn.recv()
        except (EOFError, OSError):  # the other end is gone: the process died (or is dying)
            self.dead = True
        if not self.dead and not self.process.is_alive():
            self.dead = True

    def send(self, message: Any) -> None:
        try:
            self.conn.send(message)
        except OSError:  # died in between: found by the next wait
            pass

    def close(self) -> None:
        self.process.join(timeout=10)
        if self.process.is_alive():
            self.process.terminate()
            self.process.join(timeout=5)
        self.conn.close()


class RayTask:
    """Ray Data callable class: the task is built once per actor; each batch of pickled items gives JSON records."""

    def __init__(self, factory: TaskFactory) -> None:
        self.factory = factory
        self.task = factory()

    def __call__(self, batch: dict) -> dict:
        items = [pickle.loads(blob) for blob in batch["item"]]
        records = [json.dumps(record) for record in _call_many(self.task, self.factory, items)]
        return {"record": np.array(records, dtype=object)}


class RayExecutor:
    """Ray Data `map_batches` with a callable class over an actor pool of `workers` actors, one CPU each: the model
    is loaded once per actor (the factory holds no model), items stream through a mini-batch per Ray task (which
    amortises Ray's per-task cost; records arrive in groups), and Ray restarts actors that die."""

    name = "ray"

    def __init__(self, workers: int = 2, address: Optional[str] = None) -> None:
        if workers < 1:
            raise ExecutorError(f"--workers must be 1 or more, not {workers}.")
        self.workers = workers
        self.address = address
        self.ray = load_ray()

    def run(self, factory: TaskFactory, items: Sequence[Any], batch_size: int = 1) -> Iterator[dict]:
        ray = self.ray
        started = False
        if not ray.is_initialized():
            try:
                if self.address:
                    ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
                else:  # a local Ray started for this run, as large as the workers asked for
                    ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                             logging_level=logging.WARNING)
            except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
                where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
                raise ExecutorError(f"cannot start {where} ({type(exc).__name__}: {short_message(exc)}); check "
                                    f"--ray-address (e.g. ray://head:10001 or head:6379) and that `ray status` works there.") from None
            started = True
        try:
            if not items:
                return
            context = ray.data.DataContext.get_current()
            context.enable_progress_bars = False  # the runner's own bar counts inputs
            logging.getLogger("ray.data").setLevel(logging.WARNING)
            data = ray.data.from_items([{"item": pickle.dumps(item)} for item in items])
            data = data.map_batches(RayTask, fn_constructor_args=(factory,), batch_size=max(1, batch_size), batch_format="numpy",
                                    compute=ray.data.ActorPoolStrategy(size=self.workers), num_cpus=1)
            for row in data.iter_rows():
                yield json.loads(row["record"])
        finally:
            if started:
                ray.shutdown()


def load_ray() -> Any:
    """Import Ray, or say in one line how to install it. Imported only here: a heavy, optional dependency."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError:
        raise ExecutorError(RAY_HINT) from None
    return ray


def make_executor(name: str, workers: int = 2, ray_address: Optional[str] = None) -> Any:
    """The executor named `name` (serial, processes, ray), checked before any work."""
    if name == "serial":
        return SerialExecutor()
    if name == "processes":
        return ProcessExecutor(workers)
    if name == "ray":
        return RayExecutor(workers, ray_address)
    raise ExecutorError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}.")

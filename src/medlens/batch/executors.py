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
  (the batch's explains inputs of one prepared shape in one pass), any other task one by one. The serial executor
  gives a task with `stream(chunks)` all the mini-batches at once (the batch's reads the next one and writes the last
  one on threads while it explains; `medlens.batch.overlap`).
Fault tolerance: `processes` keeps `ITEMS_PER_WORKER` mini-batches sent to each worker (one in work, the next
waiting in its pipe, so a worker never waits for the driver; at the end of a run one, so that no worker waits while
another still has two; the mini-batches are the serial run's, so the maps are too), and a worker answers them in
order, so when it dies the mini-batch it was working on is known: one of several inputs is split into single inputs
(no attempt counted); a single input goes to a fresh worker, up to `max_attempts` times in all, then `lost` is its
record; the mini-batches still waiting are handed out again without counting an attempt. `ray`
(`medlens.batch.ray_pool`) leaves restarts to Ray (actors are restarted and their tasks retried).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import threading
from collections import deque
from multiprocessing.connection import Connection, wait
from typing import Any, Iterator, Optional, Sequence

from medlens.batch.work import (RAY_HINT, ExecutorError, TaskFactory, _call, _call_many,  # noqa: F401 - re-exported
                                 load_ray)
from medlens.core.allocator import keep_freed_memory
from medlens.errors import MedlensError, short_message

EXECUTORS = ("serial", "processes", "ray")
BATCH_SIZE = 8  # inputs per mini-batch by default: measured in docs/batch.md (1, 4, 8, 16); here, not in the runner,
# so that the command line reads it without importing torch
PRELOAD_ENV = "MEDLENS_FORKSERVER_MODEL"  # medlens.batch.preload.ENV (not imported here: it loads a model there)
PRELOAD_MODULES = ["medlens.batch.task", "medlens.batch.preload"]  # what the forkserver imports before forking
ITEMS_PER_WORKER = 2  # mini-batches sent and not yet answered, per worker process


class SerialExecutor:
    """Every item in this process, in order: no extra dependency, the default."""

    name = "serial"
    workers = 1

    def run(self, factory: TaskFactory, items: Sequence[Any], batch_size: int = 1) -> Iterator[dict]:
        task = factory()
        step = max(1, batch_size)
        chunks = (list(items[start:start + step]) for start in range(0, len(items), step))
        if hasattr(task, "stream"):  # reading and writing overlapped with explaining (threads), records in order
            for records in task.stream(chunks):
                yield from records
            return
        for chunk in chunks:
            yield from _call_many(task, factory, chunk)


def _worker_main(factory: TaskFactory, conn: Connection) -> None:
    """A worker process: build the task once, then answer (index, item) messages until told to stop (None). Ctrl-C
    reaches every process of the terminal's group: a worker then just ends (the files it was writing are removed on
    the way out), and the driver says that the run stopped. A driver that is gone (killed) takes the worker with it at
    once (`_end_with_driver`), not left to finish its mini-batch beside a run resumed at once."""
    _end_with_driver()
    try:
        _serve(factory, conn)
    except (KeyboardInterrupt, BrokenPipeError, ConnectionResetError):
        return


def _end_with_driver() -> None:
    """End this worker process as soon as the driver that started it ends (killed, or gone for any reason): a daemon
    thread waits on the driver's sentinel, which the system closes with the driver. (The forkserver that forked the
    worker lives on while any worker does, so its end cannot be what stops them.) Files the worker was staging stay
    behind in a staging folder named after it, which the next write to that results folder removes."""
    driver = multiprocessing.parent_process()
    if driver is None or driver.sentinel is None:
        return

    def watch() -> None:
        wait([driver.sentinel])
        os._exit(1)  # no clean-up: the driver that would record this worker's results is gone

    threading.Thread(target=watch, name="medlens-driver-watch", daemon=True).start()


def _serve(factory: TaskFactory, conn: Connection) -> None:
    keep_freed_memory()  # a long run: freed memory reused, not faulted in again (medlens.core.allocator)
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
        self.context.set_forkserver_preload(PRELOAD_MODULES)

    def _start(self, factory: TaskFactory) -> "_Worker":
        parent, child = self.context.Pipe()
        process = self.context.Process(target=_worker_main, args=(factory, child), daemon=True)
        process.start()
        child.close()
        return _Worker(process, parent)

    def _first_workers(self, factory: TaskFactory, n: int) -> list["_Worker"]:
        """The first workers; a forkserver started for them loads the factory's model first (`preload_key`, see
        `medlens.batch.preload`), so that each worker is forked with it. A forkserver already running (started early
        by `start_forkserver`, or by an earlier run in this process) keeps what it has: a worker whose model it does
        not hold loads its own."""
        with _naming_model(getattr(factory, "preload_key", lambda: None)()):
            return [self._start(factory) for _ in range(n)]

    def run(self, factory: TaskFactory, items: Sequence[Any], batch_size: int = 1) -> Iterator[dict]:
        step = max(1, batch_size)
        chunks = [list(range(start, min(start + step, len(items)))) for start in range(0, len(items), step)]
        queue = deque(range(len(chunks)))
        attempts = [0] * len(items)
        workers = self._first_workers(factory, min(self.workers, len(chunks)))
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
                    while worker.ready and queue and len(worker.holding) < _held_at_most(len(queue), len(workers)):
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


def _held_at_most(queued: int, workers: int) -> int:
    """Mini-batches a worker may hold: `ITEMS_PER_WORKER` (the next one waiting in its pipe) while there is more work
    than workers, then one: at the end of a run a mini-batch waiting behind another worker's would leave this one
    idle while that one still has two to do."""
    return ITEMS_PER_WORKER if queued > workers else 1


@contextlib.contextmanager
def _naming_model(key: Optional[str]) -> Iterator[None]:
    """`MEDLENS_FORKSERVER_MODEL` set to `key` while a forkserver may be started (it inherits the environment)."""
    before = os.environ.get(PRELOAD_ENV)
    if key is not None:
        os.environ[PRELOAD_ENV] = key
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(PRELOAD_ENV, None)
        else:
            os.environ[PRELOAD_ENV] = before


def start_forkserver(key: Optional[str]) -> bool:
    """Start the processes executor's forkserver now, so that it imports torch and medlens and loads the model named
    by `key` (`medlens.batch.preload.preload_key`) while the driver does the same, instead of after.

    `medlens batch --executor processes` calls it first, before the driver imports torch (nothing on the way from the
    `medlens` command to here imports torch), so that the two imports run at once on two cores; without it the first
    worker starts the forkserver. Returns True when a forkserver was started now, False when one was running already
    (it keeps what it has preloaded)."""
    from multiprocessing import forkserver

    server = forkserver._forkserver  # the module's one ForkServer, as multiprocessing's own functions use it
    running = server._forkserver_pid
    multiprocessing.get_context("forkserver").set_forkserver_preload(PRELOAD_MODULES)
    with _naming_model(key):
        forkserver.ensure_running()
    return server._forkserver_pid != running


def stop_forkserver() -> None:
    """Stop the forkserver (started by `start_forkserver` for a run that then stopped on a usage error), at once:
    while it is still importing torch it would not notice that it is no longer wanted until it is done."""
    import signal
    from multiprocessing import forkserver

    server = forkserver._forkserver
    pid = server._forkserver_pid
    if pid is None:
        return
    with contextlib.suppress(OSError):
        os.kill(pid, signal.SIGKILL)
    with contextlib.suppress(OSError):
        server._stop()  # closes its pipe, reaps it and removes its socket


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


def make_executor(name: str, workers: int = 2, ray_address: Optional[str] = None) -> Any:
    """The executor named `name` (serial, processes, ray), checked before any work."""
    if name == "serial":
        return SerialExecutor()
    if name == "processes":
        return ProcessExecutor(workers)
    if name == "ray":
        from medlens.batch.ray_pool import RayExecutor

        return RayExecutor(workers, ray_address)
    raise ExecutorError(f"unknown executor {name!r}; choose from {', '.join(EXECUTORS)}.")

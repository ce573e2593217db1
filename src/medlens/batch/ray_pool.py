"""The `ray` executor: a warm pool of Ray actors, each building the task once (the model loaded in the actor, never
shipped per task) and explaining a mini-batch per call, with the next mini-batch already queued on it.

Why plain actors and not Ray Data: `import ray.data` (pandas, pyarrow) costs seconds in the driver and again in every
actor, and its streaming executor adds its own start-up, while a batch run needs nothing of it but a pool: records
come back per mini-batch in the order they finish, restarts and retries are Ray's (`max_restarts`,
`max_task_retries`). A mini-batch whose actor died through all its retries is split into single inputs (no
input is blamed for another's crash); a single input that still kills its actor is `failed`.
Start-up: a local Ray is started with no dashboard, no log forwarding and a small object store (records are small; the
inputs are read by the actors from shared storage), which is what it needs and no more.
"""
from __future__ import annotations

import logging
from collections import deque
from typing import Any, Iterator, Optional, Sequence

from medlens.batch.work import ExecutorError, TaskFactory, _call_many, load_ray
from medlens.errors import MedlensError, short_message

IN_FLIGHT = 2  # mini-batches queued on each actor and not yet answered: one in work, the next waiting
RETRIES = 2  # Ray retries a mini-batch this many times on a restarted actor before the executor splits or fails it
OBJECT_STORE_BYTES = 100 * 2 ** 20  # a local Ray's object store: items and records only (Ray's minimum is 75 MiB)


class RayWorker:
    """An actor's state: the task built once from the factory (the model loaded here), then mini-batches of items."""

    def __init__(self, factory: TaskFactory) -> None:
        from medlens.core.allocator import keep_freed_memory

        keep_freed_memory()  # a long run: freed memory reused, not faulted in again
        self.factory = factory
        self.task = factory()

    def ready(self) -> bool:
        return True

    def run(self, items: Sequence[Any]) -> list[dict]:
        return _call_many(self.task, self.factory, list(items))


class RayExecutor:
    """`workers` Ray actors, one CPU each, fed mini-batches of `batch_size` items (see the module docstring)."""

    name = "ray"

    def __init__(self, workers: int = 2, address: Optional[str] = None) -> None:
        if workers < 1:
            raise ExecutorError(f"--workers must be 1 or more, not {workers}.")
        self.workers = workers
        self.address = address
        self.ray = load_ray()

    def _connect(self) -> bool:
        """Join the cluster at `address`, or start a local Ray; False when this process already had Ray running."""
        ray = self.ray
        if ray.is_initialized():
            return False
        try:
            if self.address:
                ray.init(address=self.address, log_to_driver=False, logging_level=logging.WARNING)
            else:  # a local Ray for this run, as large as the workers asked for, and nothing more
                ray.init(num_cpus=self.workers, include_dashboard=False, log_to_driver=False,
                         logging_level=logging.WARNING, object_store_memory=OBJECT_STORE_BYTES)
        except Exception as exc:  # noqa: BLE001 - Ray raises ConnectionError, RuntimeError, ValueError ...
            where = f"the Ray cluster at {self.address}" if self.address else "a local Ray"
            raise ExecutorError(f"cannot start {where} ({type(exc).__name__}: {short_message(exc)}); check "
                                f"--ray-address (e.g. ray://head:10001 or head:6379) and that `ray status` works there.") from None
        return True

    def _pool(self, factory: TaskFactory, size: int) -> list[Any]:
        """`size` actors with the task built (the model loaded); an actor that cannot build it stops the run."""
        ray = self.ray
        actor_class = ray.remote(num_cpus=1, max_restarts=-1, max_task_retries=RETRIES)(RayWorker)
        actors = [actor_class.remote(factory) for _ in range(size)]
        try:
            ray.get([actor.ready.remote() for actor in actors])
        except ray.exceptions.RayError as exc:
            cause = getattr(exc, "cause", None) or exc
            text = str(cause) if isinstance(cause, MedlensError) else f"{type(cause).__name__}: {short_message(cause)}"
            raise ExecutorError(f"a Ray actor could not start: {text}") from None
        return actors

    def run(self, factory: TaskFactory, items: Sequence[Any], batch_size: int = 1) -> Iterator[dict]:
        ray = self.ray
        started = self._connect()
        try:
            step = max(1, batch_size)
            chunks = deque(list(items[start:start + step]) for start in range(0, len(items), step))
            if not chunks:
                return
            actors = self._pool(factory, min(self.workers, len(chunks)))
            queued = {i: 0 for i in range(len(actors))}
            pending: dict[Any, tuple[int, list]] = {}
            while chunks or pending:
                for i, actor in enumerate(actors):
                    while queued[i] < IN_FLIGHT and chunks:
                        chunk = chunks.popleft()
                        pending[actor.run.remote(chunk)] = (i, chunk)
                        queued[i] += 1
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    i, chunk = pending.pop(ref)
                    queued[i] -= 1
                    yield from self._records(ref, chunk, chunks, factory)
        finally:
            if started:
                ray.shutdown()

    def _records(self, ref: Any, chunk: list, chunks: deque, factory: TaskFactory) -> list[dict]:
        """The records of a finished mini-batch; one whose actor died through every retry is split into single
        inputs (queued first), and a single input is `failed`."""
        try:
            return self.ray.get(ref)
        except self.ray.exceptions.RayError as exc:
            if len(chunk) > 1:
                chunks.extendleft(reversed([[item] for item in chunk]))
                return []
            return [factory.lost(chunk[0], f"the Ray actor died while working on it {RETRIES + 1} times "
                                           f"({type(exc).__name__})")]

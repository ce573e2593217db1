"""Reading and writing overlapped with explaining: `overlapped` runs read -> explain -> write over a run's
mini-batches with one reader thread ahead of the explaining thread and one writer thread behind it, bounded to one each.

Why threads suffice: explaining spends its time in torch kernels, image decoding in Pillow and zlib, and the npz and
PNG writes in numpy, zlib and the OS, all of which release the GIL; so a reader and a writer beside the explaining
thread keep its core busy with the model while the other stages use what is left of the machine.
Order and safety are unchanged: mini-batches finish in order, and a mini-batch's records are yielded only once its
files are written (the driver then appends them to the manifest), so a kill or Ctrl-C loses at most the mini-batches
under way, which simply run again on resume. An exception in the reader (Ctrl-C while reading, a bug) is raised here
after the records already written are yielded.
The reader and the writer use one torch thread each: a fresh thread's BLAS and OpenMP calls would otherwise start a
thread team as large as the machine for it (one more busy thread per side thread, measured in issue 28).
"""
from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Callable, Iterable, Iterator, Optional, Sequence, TypeVar

import torch

Read = TypeVar("Read")
Explained = TypeVar("Explained")


def overlapped(chunks: Iterable[Sequence[Any]], read: Callable[[Sequence[Any]], Read],
               explain: Callable[[Read], Explained],
               write: Callable[[Read, Explained], list[dict]]) -> Iterator[list[dict]]:
    """`write(r, explain(r))` with `r = read(chunk)` for each chunk, in order, yielded as each write finishes.

    `read` runs on a reader thread one chunk ahead, `explain` on the calling thread, `write` on a writer thread one
    chunk behind. Whatever `read` or `write` raises is raised here (after the records of earlier chunks are yielded).
    """
    source = iter(chunks)
    with ThreadPoolExecutor(1, thread_name_prefix="medlens-read", initializer=one_torch_thread) as reader, \
            ThreadPoolExecutor(1, thread_name_prefix="medlens-write", initializer=one_torch_thread) as writer:
        ahead: Optional[Future] = _submit_next(reader, source, read)
        behind: Optional[Future] = None
        try:
            while ahead is not None:
                try:
                    chunk = ahead.result()
                except BaseException:
                    if behind is not None:  # the records already written are kept before the error goes up
                        yield behind.result()
                        behind = None
                    raise
                ahead = _submit_next(reader, source, read)
                explained = explain(chunk)
                if behind is not None:
                    yield behind.result()
                behind = writer.submit(write, chunk, explained)
            if behind is not None:
                records, behind = behind.result(), None
                yield records
        finally:
            for future in (ahead, behind):
                if future is not None:
                    future.cancel()


def one_torch_thread() -> None:
    """Give the calling (side) thread one torch thread, its OpenMP and BLAS calls included. The threads that have
    already run torch keep their own counts (OpenMP's are per thread); the process-wide count that threads started
    later inherit becomes 1, which `run_batch` puts back when the run ends."""
    torch.set_num_threads(1)


def _submit_next(reader: ThreadPoolExecutor, source: Iterator[Sequence[Any]],
                 read: Callable[[Sequence[Any]], Any]) -> Optional[Future]:
    chunk = next(source, None)
    return None if chunk is None else reader.submit(read, chunk)

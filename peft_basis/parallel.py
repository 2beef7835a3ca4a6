"""Independent factorisations side by side, one thread each (see :func:`map_decompositions`)."""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator

import torch

from .memory import trim_memory

__all__ = ["decomposition_workers", "map_decompositions"]


def decomposition_workers() -> int:
    """How many factorisations :func:`map_decompositions` runs at once: ``PEFT_BASIS_DECOMPOSITION_WORKERS``,
    default ``torch.get_num_threads()`` (the threads the forward passes use)."""
    n = os.environ.get("PEFT_BASIS_DECOMPOSITION_WORKERS")
    return max(int(n) if n else torch.get_num_threads(), 1)


def map_decompositions(fn, items: Iterable) -> Iterator:
    """``fn(item)`` for each item, results in order, ``decomposition_workers()`` of them at once in threads,
    each single-threaded (the thread count restored after).

    Why: the decompositions run on one thread each (:func:`decomposition_threads`), so one at a time leaves
    every other core idle; independent single-threaded ones side by side use them all, without the
    collapse of multi-threaded BLAS and ``eigh`` on busy cores (no thread waits on another). ``items`` is
    read in the calling thread, at most ``2 * workers`` ahead of the results consumed, so anything it
    computes (and warns about) happens there and only a few results wait in memory. One thread per call
    also makes every result independent of the worker count (BLAS may round differently on more threads).
    The workers' freed temporaries (float64 copies, kept by glibc in per-thread arenas) are returned to the
    system every few results and at the end, so they do not add to the peak memory."""
    workers = decomposition_workers()
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # read by each worker thread when it starts (torch's thread count is global)
    if workers <= 1:
        try:
            for item in items:
                yield fn(item)
        finally:
            torch.set_num_threads(before)
            trim_memory()
        return
    from collections import deque
    from concurrent.futures import ThreadPoolExecutor

    pool = ThreadPoolExecutor(workers, thread_name_prefix="peft-basis-decomposition")
    try:
        pending, source = deque(), iter(items)
        for item in source:
            pending.append(pool.submit(fn, item))
            if len(pending) >= 2 * workers:
                break
        done = 0
        while pending:
            result = pending.popleft().result()
            for item in source:
                pending.append(pool.submit(fn, item))
                break
            done += 1
            if done % 8 == 0:
                trim_memory()
            yield result
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        torch.set_num_threads(before)
        trim_memory()

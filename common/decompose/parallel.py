"""Per-layer linear algebra on several threads, one intra-op thread each.

LAPACK's symmetric eigensolver (the floor of every new rank plan, see :mod:`common.decompose.ht`) gains little
from a second intra-op thread: on the 2-core reference machine one 768×768 ``eigh`` takes ~34 ms on
one thread and ~22 ms on two, whereas two layers on two threads at once take ~34 ms together. So
independent layers go to worker threads (torch releases the GIL in its kernels) with one intra-op
thread each, which also makes each layer's result independent of how many layers run with it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

import torch

T = TypeVar("T")
R = TypeVar("R")


def map_layers(fn: Callable[[T], R], items: Iterable[T]) -> list[R]:
    """``[fn(x) for x in items]`` on as many threads as torch's intra-op thread count.

    Each worker runs with one intra-op thread; results keep the order of ``items``; the first
    exception raised by ``fn`` (in that order) propagates. Put the most expensive items first: they
    are started first, which balances the workers.
    """
    items = list(items)
    if not items:
        return []
    caller_threads = torch.get_num_threads()
    workers = min(len(items), caller_threads)
    try:
        with ThreadPoolExecutor(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
            return list(pool.map(fn, items))
    finally:
        # A worker's set_num_threads(1) also lowers torch's process-wide default; put the caller's
        # count back (the same value: lowering the caller's own count and raising it again made its
        # later LAPACK calls ~5x slower in our measurements, so this never does that).
        torch.set_num_threads(caller_threads)

"""Several processes, one result: the collective helpers behind ``torchrun -m common.run.experiment``.

Under ``torchrun`` every rank runs the same experiment code. Work whose result is a deterministic
function of its input (a candidate's proxy score, a sensitivity point, one final model's BN
recalibration, finetuning and evaluation) is *sharded*: :func:`shard_map` gives item ``i`` of each
chunk of ``world_size`` items to rank ``i``, gathers the results to every rank and hands them back in
index order, so rank 0 writes the log in the order a single process would and every rank keeps the
same records in memory. Work that must happen once (timing, the baseline, anything read from the
clock) runs on rank 0 and is broadcast (:func:`from_main`). Without ``torchrun`` (no ``WORLD_SIZE``
in the environment) nothing is initialized and every helper is the plain single-process call.

Ranks join with the ``gloo`` backend on the CPU and ``nccl`` on CUDA (each rank on
``cuda:<LOCAL_RANK>``); results travel as pickled objects (:func:`torch.distributed.all_gather_object`),
which is fine for scores and records, not for tensors of weights. A launch of more ranks per machine
than it has GPUs (``torchrun --nproc-per-node 8`` on one GPU) shares the GPUs round-robin
(``cuda:<LOCAL_RANK mod GPUs>``) and joins with ``gloo``, since NCCL refuses two ranks on one GPU: the
CIFAR-sized models here leave one large GPU mostly idle in one process (kernel launches, not
arithmetic, bound a 32x32 ResNet-18), so several processes on it finish sooner.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import gc
import os
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "backend_for",
    "from_main",
    "gpu_index",
    "init_from_env",
    "initialized",
    "is_main",
    "launched",
    "leave",
    "leaving",
    "rank_device",
    "shard_map",
    "world",
]

T = TypeVar("T")
R = TypeVar("R")

TIMEOUT = _dt.timedelta(hours=6)
"""How long a rank waits in a collective: rank 0 alone may time a model or evaluate a baseline
while the others wait, which on a CPU and ImageNet-sized data takes far longer than torch's default."""


def launched() -> bool:
    """Whether this process was started by ``torchrun`` (or another launcher setting ``WORLD_SIZE``) with
    more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def initialized() -> bool:
    """Whether a process group is up (this torch build has ``torch.distributed`` and it is initialized)."""
    return dist.is_available() and dist.is_initialized()


def _local_ranks() -> tuple[int, int]:
    """``(LOCAL_RANK, LOCAL_WORLD_SIZE)`` from the launcher's environment (``(0, 1)`` without one)."""
    return int(os.environ.get("LOCAL_RANK", "0")), int(os.environ.get("LOCAL_WORLD_SIZE", "1"))


def gpu_index(local_rank: int, gpus: int) -> int:
    """The GPU of a rank: its own while there are enough (``local_rank``), else shared round-robin.

    Raises:
        ValueError: ``gpus < 1`` (no CUDA device to put the rank on) or a negative ``local_rank``.
    """
    if gpus < 1:
        raise ValueError(f"a CUDA rank needs a GPU, but this machine has {gpus}")
    if local_rank < 0:
        raise ValueError(f"LOCAL_RANK must be >= 0, got {local_rank}")
    return local_rank % gpus


def backend_for(device_type: str, local_world_size: int, gpus: int) -> str:
    """The process-group backend: ``nccl`` when every CUDA rank of a machine has a GPU of its own,
    ``gloo`` on the CPU and when ranks share GPUs (NCCL refuses two ranks on one device)."""
    return "nccl" if device_type == "cuda" and local_world_size <= gpus else "gloo"


def rank_device(device: torch.device) -> torch.device:
    """The device of this rank of a multi-process launch: ``cuda:<LOCAL_RANK>`` for a CUDA ``device``
    (each rank on its own GPU; with more ranks than GPUs, ``cuda:<LOCAL_RANK mod GPUs>``), else
    ``device`` as it is."""
    if device.type == "cuda":
        return torch.device("cuda", gpu_index(_local_ranks()[0], torch.cuda.device_count()))
    return device


def init_from_env(device_type: str) -> bool:
    """Join the process group ``torchrun`` describes in the environment, once; return whether one is up.

    ``gloo`` for ``device_type == "cpu"``, ``nccl`` for ``"cuda"`` (after selecting this rank's GPU,
    :func:`rank_device`), ``gloo`` again where the ranks outnumber the machine's GPUs
    (:func:`backend_for`). A no-op (``False``) without a launcher; an already initialized group is kept.
    """
    if initialized():
        return True
    if not launched():
        return False
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this torch build has no torch.distributed")
    gpus = 0
    if device_type == "cuda":
        torch.cuda.set_device(rank_device(torch.device("cuda")))
        gpus = torch.cuda.device_count()
    dist.init_process_group(backend_for(device_type, _local_ranks()[1], gpus), timeout=TIMEOUT)
    return True


def leave(*, wait: bool = True) -> None:
    """Destroy the default process group, after a barrier when ``wait``.

    Without the barrier a rank that finishes first can tear down its gloo pairs while a peer's last
    message is still in flight; the peer's gloo thread then aborts the process ("terminate called without
    an active exception", SIGABRT) after all its work is done. ``wait=False`` on an error path: a peer
    that died would leave the barrier waiting for :data:`TIMEOUT`. A no-op without a process group.
    """
    if not initialized():
        return
    if wait:
        dist.barrier()
    dist.destroy_process_group()
    # A DDP wrapper sits in reference cycles (it outlives its last name until a collection) and holds the
    # group through its reducer; left to the collection at interpreter exit, the group's gloo threads
    # would be torn down with the interpreter half gone, another way to the same abort. Collect now.
    gc.collect()


@contextlib.contextmanager
def leaving(owned: bool = True) -> Iterator[None]:
    """Run the block, then :func:`leave` the process group when ``owned``: after a barrier when the block
    ends normally, without one when it raises (a peer that died would keep the barrier waiting for
    :data:`TIMEOUT`; the exception propagates). ``owned=False`` (a group the caller did not start) is kept.
    """
    try:
        yield
    except BaseException:
        if owned:
            leave(wait=False)
        raise
    if owned:
        leave()


def world() -> tuple[int, int]:
    """``(rank, world_size)`` of this process; ``(0, 1)`` without an initialized process group."""
    if initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """Whether this process writes logs, artifacts and checkpoints (rank 0, or the only process)."""
    return world()[0] == 0


def from_main(fn: Callable[[], T]) -> T:
    """``fn()`` evaluated on rank 0 only, its (picklable) result returned on every rank.

    An exception on rank 0 is re-raised on every rank (as ``RuntimeError`` naming it on the others),
    so no rank is left waiting in a collective.
    """
    rank, size = world()
    if size == 1:
        return fn()
    box: list[Any] = [None]
    if rank == 0:
        try:
            box[0] = ("ok", fn())
        except BaseException as exc:  # tell the others before raising here
            box[0] = ("error", f"{type(exc).__name__}: {exc}")
            dist.broadcast_object_list(box, src=0)
            raise
    dist.broadcast_object_list(box, src=0)
    status, value = box[0]
    if status == "error":
        raise RuntimeError(f"rank 0 failed: {value}")
    return value


def shard_map(
    fn: Callable[[T], R],
    items: Sequence[T],
    on_result: Callable[[int, R], None] | None = None,
) -> list[R]:
    """``[fn(x) for x in items]`` with the items spread over the ranks, results on every rank.

    Items go out in chunks of ``world_size``: item ``c * world_size + r`` is computed on rank ``r``,
    then the chunk's results are gathered and ``on_result(i, result)`` is called for each item of it
    in index order on every rank before the next chunk starts. A caller that records results in
    ``on_result`` therefore loses at most one chunk when a run is killed. With one process this is
    exactly ``fn`` then ``on_result`` per item, in order.

    An exception in ``fn`` on any rank is raised on every rank after the chunk (naming the item on the
    rank that failed), so no rank is left waiting.
    """
    rank, size = world()
    out: list[R] = []
    for start in range(0, len(items), size):
        chunk = items[start : start + size]
        if size == 1:
            results = [("ok", fn(chunk[0]))]
        else:
            mine: tuple[str, Any] | None = None
            if rank < len(chunk):
                try:
                    mine = ("ok", fn(chunk[rank]))
                except Exception as exc:
                    mine = ("error", f"item {start + rank} on rank {rank}: {type(exc).__name__}: {exc}", exc)
            gathered: list[Any] = [None] * size
            dist.all_gather_object(gathered, mine[:2] if mine is not None else None)
            failed = [g for g in gathered[: len(chunk)] if g[0] == "error"]
            if failed:
                if mine is not None and mine[0] == "error":
                    raise mine[2]
                raise RuntimeError("; ".join(g[1] for g in failed))
            results = gathered[: len(chunk)]
        for j, (_, value) in enumerate(results):
            out.append(value)
            if on_result is not None:
                on_result(start + j, value)
    return out

"""Forward-pass latency of a model on CPU or CUDA, timed as it is.

CPU timings use ``time.perf_counter`` around each forward with a fixed thread count (restored
afterwards). CUDA timings use CUDA events, optionally replaying a captured CUDA graph with a static
input so that kernel-launch overhead is excluded. Warm-up iterations are never timed.

:func:`time_calls` (the CPU clock loop) and :func:`interleaved_rounds` (several timers in alternating
rounds) also time ONNX Runtime sessions (:mod:`common.deploy.export`), so both runtimes are measured the
same way.

Timing a factorized model in its fastest exact deployment, the project's one way to time a model, is
:func:`common.deploy.merge.fastest_latency` (deployment first, then these timings).
"""

from __future__ import annotations

import contextlib
import platform
import time
from collections.abc import Callable, Collection, Iterator, Mapping

import numpy as np
import torch
import torch.nn as nn

from common.device import resolve_device


def summarize_times(times_ms: list[float]) -> dict:
    """Median and 10th/90th percentiles of forward times in ms: the one summary of every timer
    (PyTorch here, ONNX Runtime in :mod:`common.deploy.export`)."""
    t = np.asarray(times_ms, dtype=np.float64)
    return {
        "median_ms": float(np.median(t)),
        "p10_ms": float(np.percentile(t, 10)),
        "p90_ms": float(np.percentile(t, 90)),
    }


def check_counts(warmup: int, iters: int) -> None:
    """Every timer's argument check: at least one timed iteration, no negative warm-up."""
    if iters <= 0 or warmup < 0:
        raise ValueError(f"need iters > 0 and warmup >= 0, got iters={iters} warmup={warmup}")


@contextlib.contextmanager
def cpu_threads(threads: int | None, device: torch.device) -> Iterator[None]:
    """``torch.set_num_threads(threads)`` inside the block on the CPU (None, or a CUDA device: unchanged);
    the previous count is restored after, whatever happens."""
    old = torch.get_num_threads()
    try:
        if threads is not None and device.type == "cpu":
            torch.set_num_threads(threads)
        yield
    finally:
        torch.set_num_threads(old)


@torch.inference_mode()
def measure_latency(
    model: nn.Module,
    input_shape: tuple[int, ...] = (1, 3, 32, 32),
    device: str | torch.device = "cpu",
    threads: int | None = None,
    channels_last: bool = False,
    dtype: torch.dtype = torch.float32,
    cuda_graph: bool = False,
    warmup: int = 10,
    iters: int = 50,
    seed: int = 0,
) -> dict:
    """Time ``iters`` forward passes of ``model`` on a random input of ``input_shape`` (``B x C x H x W``).

    The model is put in eval mode and converted to ``device``/``dtype`` (and channels_last) in
    place. ``threads`` (CPU only) sets ``torch.set_num_threads`` for the measurement.

    Returns:
        ``median_ms``, ``p10_ms``, ``p90_ms`` per forward, plus ``iters``, ``batch``, ``device``,
        ``threads``, ``channels_last``, ``dtype``, ``cuda_graph``.
    """
    check_counts(warmup, iters)
    dev = resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device=dev, dtype=dtype, memory_format=fmt)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g).to(device=dev, dtype=dtype, memory_format=fmt)
    with cpu_threads(threads, dev):
        if dev.type == "cpu":
            times = time_calls(model, x, warmup=warmup, iters=iters)
        else:
            times = _time_cuda(model, x, warmup, iters, cuda_graph)
    return {
        **summarize_times(times),
        "iters": iters,
        "batch": int(input_shape[0]),
        "device": str(dev),
        "threads": torch.get_num_threads() if threads is None else threads,
        "channels_last": channels_last,
        "dtype": str(dtype).replace("torch.", ""),
        "cuda_graph": cuda_graph,
    }


def time_calls(fn: Callable[..., object], *args: object, warmup: int, iters: int) -> list[float]:
    """Milliseconds of each of ``iters`` calls ``fn(*args)`` (``time.perf_counter`` around each), after
    ``warmup`` untimed ones: a model's CPU forwards here, an ONNX Runtime session's runs in
    :func:`common.deploy.export.ort_latency`."""
    for _ in range(warmup):
        fn(*args)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _time_cuda(model: nn.Module, x: torch.Tensor, warmup: int, iters: int, cuda_graph: bool) -> list[float]:
    if cuda_graph:
        static_x = x.clone()
        # warm up on a side stream before capture, as the CUDA-graph docs require
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            for _ in range(max(3, warmup)):
                model(static_x)
        torch.cuda.current_stream().wait_stream(s)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model(static_x)
        step = graph.replay
    else:

        def step():
            model(x)

        for _ in range(warmup):
            step()
    if cuda_graph:
        for _ in range(warmup):
            step()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
    for i in range(iters):
        starts[i].record()
        step()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def compile_for_inference(
    model: nn.Module,
    input_shape: tuple[int, ...],
    mode: str = "default",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    threads: int | None = None,
) -> nn.Module:
    """``torch.compile`` (inductor) of ``model`` for inference on ``input_shape``, compiled before returning.

    The model is put in eval mode and placed like :func:`measure_latency` places it, then compiled with
    static shapes and no graph breaks allowed (``fullgraph``: a factorized model is plain convs), on a
    first forward under ``inference_mode``, the mode :func:`measure_latency` runs in, so timing it
    measures the compiled code and not a recompilation. Inductor's configuration is left as it is
    (it is part of what a compiled graph is guarded on: a setting patched here would make the next call
    recompile). ``mode``: torch.compile's, e.g. ``"max-autotune"`` (on CUDA also replays CUDA graphs).
    ``threads`` (CPU): compile with this many threads, the number inductor's CPU kernels are built for;
    time it with the same ``threads``.
    """
    dev = resolve_device(device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device=dev, dtype=dtype, memory_format=fmt)
    compiled = torch.compile(model, mode=mode, fullgraph=True, dynamic=False)
    with cpu_threads(threads, dev):
        with torch.inference_mode():  # an inference tensor, like measure_latency's input: the guards see the same
            x = torch.randn(input_shape, generator=torch.Generator().manual_seed(0))
            x = x.to(dev, dtype, memory_format=fmt)
            compiled(x)
            compiled(x)  # a second call: CUDA-graph trees record on the first warm calls
    return compiled


def cpu_name() -> str:
    """The CPU model name from /proc/cpuinfo (or the platform's best guess), for benchmark headers."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def check_rounds(rounds: int, names: Collection[str], reference: str | None) -> None:
    """Every interleaved timer's argument check: at least one round, and ``reference`` (if any) one of
    ``names``."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    if reference is not None and reference not in names:
        raise ValueError(f"reference {reference!r} is not one of {sorted(names)}")


def interleaved_rounds(
    timers: Mapping[str, Callable[[], float]], rounds: int = 5, reference: str | None = None
) -> dict:
    """Call several timers in alternation, ``rounds`` times each, for ratios robust to machine drift.

    On a shared or virtualised machine the speed of the same model can drift by tens of percent
    over seconds; timing models one after the other then turns drift into fake speed-ups. Here each
    round calls every timer once, in the order given, and a ratio is taken within a round, so drift
    slower than a round cancels. The one interleaving of PyTorch models (:func:`interleaved_latency`) and
    ONNX Runtime sessions (:func:`common.deploy.export.ort_interleaved_latency`).

    Args:
        timers: ``{name: fn}``, ``fn()`` timing its model once and returning the round's time in ms.
        rounds: how many rounds.
        reference: the name the speed-ups are relative to.

    Returns:
        ``{name: {"median_ms": median over rounds of the per-round times, "rounds_ms": [...]}}`` and,
        when ``reference`` names one of the timers, ``speedup`` per other one: the median over rounds
        of ``reference_ms / its_ms``.

    Raises:
        ValueError: ``rounds < 1`` or an unknown ``reference`` (before any timing).
    """
    check_rounds(rounds, timers, reference)
    per: dict[str, list[float]] = {k: [] for k in timers}
    for _ in range(rounds):
        for name, time_once in timers.items():
            per[name].append(time_once())
    out: dict = {k: {"median_ms": float(np.median(v)), "rounds_ms": v} for k, v in per.items()}
    if reference is not None:
        ref = np.asarray(per[reference])
        out["speedup"] = {k: float(np.median(ref / np.asarray(v))) for k, v in per.items() if k != reference}
    return out


def interleaved_latency(
    models: dict[str, nn.Module],
    input_shape: tuple[int, ...],
    *,
    rounds: int = 5,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: dict[str, bool] | None = None,
    threads: int | None = None,
    cuda_graph: bool = False,
    warmup: int = 3,
    iters: int = 10,
    reference: str | None = None,
) -> dict:
    """Time several models in alternation, ``rounds`` times each (:func:`interleaved_rounds`): each round
    times every model once with :func:`measure_latency` (``iters`` forwards after ``warmup``).

    Returns:
        ``{name: {"median_ms": median over rounds of the per-round medians, "rounds_ms": [...]}}`` and,
        when ``reference`` names one of the models, ``speedup`` per other model: the median over rounds
        of ``reference_ms / model_ms``.
    """
    channels_last = channels_last or {}

    def timer(m: nn.Module, fmt: bool) -> Callable[[], float]:
        def once() -> float:
            return measure_latency(m, input_shape, device, threads, fmt, dtype, cuda_graph, warmup, iters)["median_ms"]

        return once

    timers = {name: timer(m, channels_last.get(name, False)) for name, m in models.items()}
    return interleaved_rounds(timers, rounds, reference)

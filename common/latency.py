"""Forward-pass latency of a model on CPU or CUDA.

CPU timings use ``time.perf_counter`` around each forward with a fixed thread count (restored
afterwards). CUDA timings use CUDA events, optionally replaying a captured CUDA graph with a static
input so that kernel-launch overhead is excluded. Warm-up iterations are never timed.
"""
from __future__ import annotations

import time

import numpy as np
import torch
import torch.nn as nn

from common.train import resolve_device


def _summary(times_ms: list[float]) -> dict:
    t = np.asarray(times_ms, dtype=np.float64)
    return {"median_ms": float(np.median(t)), "p10_ms": float(np.percentile(t, 10)),
            "p90_ms": float(np.percentile(t, 90))}


@torch.inference_mode()
def measure_latency(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32),
                    device: str | torch.device = "cpu", threads: int | None = None,
                    channels_last: bool = False, dtype: torch.dtype = torch.float32,
                    cuda_graph: bool = False, warmup: int = 10, iters: int = 50,
                    seed: int = 0) -> dict:
    """Time ``iters`` forward passes of ``model`` on a random input of ``input_shape`` (``B x C x H x W``).

    The model is put in eval mode and converted to ``device``/``dtype`` (and channels_last) in
    place. ``threads`` (CPU only) sets ``torch.set_num_threads`` for the measurement.

    Returns:
        ``median_ms``, ``p10_ms``, ``p90_ms`` per forward, plus ``iters``, ``batch``, ``device``,
        ``threads``, ``channels_last``, ``dtype``, ``cuda_graph``.
    """
    if iters <= 0 or warmup < 0:
        raise ValueError(f"need iters > 0 and warmup >= 0, got iters={iters} warmup={warmup}")
    dev = resolve_device(device)
    if cuda_graph and dev.type != "cuda":
        raise ValueError("cuda_graph=True needs a CUDA device")
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.eval().to(device=dev, dtype=dtype, memory_format=fmt)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g).to(device=dev, dtype=dtype, memory_format=fmt)
    old_threads = torch.get_num_threads()
    try:
        if dev.type == "cpu":
            if threads is not None:
                torch.set_num_threads(threads)
            times = _time_cpu(model, x, warmup, iters)
        else:
            times = _time_cuda(model, x, warmup, iters, cuda_graph)
    finally:
        torch.set_num_threads(old_threads)
    return {**_summary(times), "iters": iters, "batch": int(input_shape[0]), "device": str(dev),
            "threads": torch.get_num_threads() if threads is None else threads,
            "channels_last": channels_last, "dtype": str(dtype).replace("torch.", ""),
            "cuda_graph": cuda_graph}


def _time_cpu(model: nn.Module, x: torch.Tensor, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        model(x)
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        model(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _time_cuda(model: nn.Module, x: torch.Tensor, warmup: int, iters: int,
               cuda_graph: bool) -> list[float]:
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


def best_cpu_format(model: nn.Module, input_shape: tuple[int, ...] = (1, 3, 32, 32),
                    threads: int | None = None, warmup: int = 10, iters: int = 50) -> dict:
    """Time contiguous and channels_last on CPU and report the faster.

    Returns:
        ``{"channels_last": bool (the faster), "median_ms": its median, "contiguous": <dict>,
        "channels_last_result": <dict>}`` with the full :func:`measure_latency` dicts. The model
        is left in contiguous format.
    """
    contiguous = measure_latency(model, input_shape, "cpu", threads, False, warmup=warmup, iters=iters)
    cl = measure_latency(model, input_shape, "cpu", threads, True, warmup=warmup, iters=iters)
    model.to(memory_format=torch.contiguous_format)
    best = cl if cl["median_ms"] < contiguous["median_ms"] else contiguous
    return {"channels_last": best["channels_last"], "median_ms": best["median_ms"],
            "contiguous": contiguous, "channels_last_result": cl}

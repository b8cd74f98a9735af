"""What one finetuning step of a model costs, and where it goes.

:func:`time_train_step` times the distilled training step of :func:`common.train.finetune.train_one_epoch`
(teacher forward without gradients, student forward and :func:`common.train.recipe.kd_loss`, backward,
optimizer step from :func:`common.train.recipe.build_optimizer`) on random seeded data, phase by phase.
:func:`stage_times` times every stage conv of every factorized layer on its own, forward and backward
(input and weight gradients), at the input that stage sees inside the model, next to the dense conv
it replaces (:meth:`common.decompose.layers.FactorizedConv.to_dense`). MACs come from
:func:`common.decompose.layers.conv_cost`, the one cost formula, so a stage's throughput (GMAC/s) shows which
factor shapes the convolution backend handles slowly. CPU timings (``time.perf_counter``, a fixed
thread count); on CUDA every phase is synchronized before its clock is read.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn as nn

from common.decompose.layers import ConvGeometry, FactorizedConv, conv_cost
from common.deploy.latency import check_counts, cpu_threads, summarize_times
from common.device import resolve_device
from common.train.finetune import FinetuneConfig
from common.train.recipe import build_optimizer, kd_loss

PHASES = ("teacher_fwd", "student_fwd", "backward", "optimizer", "step")


def _clock(dev: torch.device) -> Callable[[], float]:
    if dev.type == "cuda":

        def now() -> float:
            torch.cuda.synchronize(dev)
            return time.perf_counter()

        return now
    return time.perf_counter


def time_train_step(
    student: nn.Module,
    teacher: nn.Module | None,
    input_shape: tuple[int, int, int, int],
    num_classes: int,
    config: FinetuneConfig | None = None,
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 1,
    iters: int = 5,
    seed: int = 0,
) -> dict:
    """Median time of each phase of ``iters`` distilled training steps of a copy of ``student``.

    The step is :func:`common.train.finetune.train_one_epoch`'s, with ``config``'s optimizer, distillation
    weight and temperature (default :class:`FinetuneConfig`), fp32 and contiguous; ``student`` itself
    is left untouched (a deep copy trains). Inputs are a seeded normal batch of ``input_shape``
    (``B x C x H x W``) and seeded labels.

    Returns:
        ``<phase>_ms`` (median over ``iters``) for each of :data:`PHASES` (``step`` = their sum per
        step), ``step_p10_ms``/``step_p90_ms``, ``batch``, ``iters``, ``threads``, ``device``.
    """
    check_counts(warmup, iters)
    cfg = config if config is not None else FinetuneConfig(epochs=1)
    dev = resolve_device(device)
    model = copy.deepcopy(student).to(dev).train()
    if teacher is not None:
        teacher = teacher.to(dev).eval()
    opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g).to(dev)
    y = torch.randint(num_classes, (input_shape[0],), generator=g).to(dev)
    now = _clock(dev)
    times: dict[str, list[float]] = {p: [] for p in PHASES}
    with cpu_threads(threads, dev):
        for i in range(warmup + iters):
            t0 = now()
            with torch.no_grad():
                t_logits = teacher(x) if teacher is not None else None
            t1 = now()
            logits = model(x)
            if t_logits is not None:
                loss = kd_loss(logits, t_logits, y, cfg.kd_alpha, cfg.kd_temperature, cfg.label_smoothing)
            else:
                loss = nn.functional.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            t2 = now()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            t3 = now()
            opt.step()
            t4 = now()
            if i >= warmup:
                for p, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t4 - t0)):
                    times[p].append(dt * 1e3)
    step = summarize_times(times["step"])
    return {
        **{f"{p}_ms": float(np.median(times[p])) for p in PHASES},
        "step_p10_ms": step["p10_ms"],
        "step_p90_ms": step["p90_ms"],
        "batch": int(input_shape[0]),
        "iters": iters,
        "threads": threads if threads is not None else torch.get_num_threads(),
        "device": str(dev),
    }


def _layer_inputs(model: nn.Module, x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The input each factorized layer of ``model`` receives on a forward of ``x`` (train mode)."""
    seen: dict[str, torch.Tensor] = {}
    hooks = [
        m.register_forward_pre_hook(lambda _m, args, name=name: seen.__setitem__(name, args[0].detach()))
        for name, m in model.named_modules()
        if isinstance(m, FactorizedConv)
    ]
    try:
        with torch.no_grad():
            model.train()(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def _fwd_bwd(conv: nn.Conv2d, x: torch.Tensor, warmup: int, iters: int, now) -> tuple[list[float], list[float]]:
    """Forward and backward times (ms) of ``conv`` at input ``x``; the backward computes the input's
    gradient and the weight's (and bias's), as inside a network."""
    x = x.detach().requires_grad_(True)
    fwd, bwd = [], []
    for i in range(warmup + iters):
        conv.zero_grad(set_to_none=True)
        x.grad = None
        t0 = now()
        out = conv(x)
        t1 = now()
        out.backward(torch.ones_like(out))
        t2 = now()
        if i >= warmup:
            fwd.append((t1 - t0) * 1e3)
            bwd.append((t2 - t1) * 1e3)
    return fwd, bwd


def _stages(layer: FactorizedConv, x: torch.Tensor) -> Iterator[tuple[str, nn.Conv2d, torch.Tensor]]:
    """``(stage name, conv, its input)`` along ``layer``'s chain, then ``("dense", to_dense(), x)``."""
    names = {id(m): n for n, m in layer.named_children()}
    h = x
    for conv in layer.stages():
        yield names[id(conv)], conv, h
        with torch.no_grad():
            h = conv(h)
    yield "dense", layer.to_dense(), x


def stage_times(
    model: nn.Module,
    input_shape: tuple[int, int, int, int],
    *,
    device: str | torch.device = "cpu",
    threads: int | None = None,
    warmup: int = 1,
    iters: int = 5,
    seed: int = 0,
) -> list[dict]:
    """Forward and backward time of each stage conv of each factorized layer of ``model``, alone.

    Each stage is timed at the input it receives inside ``model`` on a seeded normal batch of
    ``input_shape`` (train-mode forward), on a deep copy (``model`` is untouched); the layer's dense
    equivalent is timed at the layer's input as stage ``"dense"``.

    Returns:
        One row per (layer, stage): ``layer``, ``stage``, ``cin``, ``cout``, ``kernel`` ("khxkw"),
        ``stride``, ``in_hw``, ``macs`` (per image, :func:`common.decompose.layers.conv_cost`), ``fwd_ms``,
        ``bwd_ms`` (medians), ``fwd_gmacs``/``bwd_gmacs`` (GMAC/s; the backward does twice the
        forward's MACs: input and weight gradients).
    """
    check_counts(warmup, iters)
    dev = resolve_device(device)
    model = copy.deepcopy(model).to(dev)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(input_shape, generator=g).to(dev)
    now = _clock(dev)
    rows = []
    with cpu_threads(threads, dev):
        inputs = _layer_inputs(model, x)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, FactorizedConv)}
        for name, layer_in in inputs.items():
            for stage, conv, h in _stages(layers[name], layer_in):
                geom = ConvGeometry.of(conv)
                macs = conv_cost("dense", geom, (), h.shape[-2:])[1]
                fwd, bwd = _fwd_bwd(conv, h, warmup, iters, now)
                f, b = float(np.median(fwd)), float(np.median(bwd))
                images = h.shape[0]
                rows.append(
                    {
                        "layer": name,
                        "stage": stage,
                        "cin": conv.in_channels,
                        "cout": conv.out_channels,
                        "kernel": "x".join(str(k) for k in geom.kernel_size),
                        "stride": "x".join(str(s) for s in geom.stride),
                        "in_hw": "x".join(str(int(s)) for s in h.shape[-2:]),
                        "macs": int(macs),
                        "fwd_ms": f,
                        "bwd_ms": b,
                        "fwd_gmacs": macs * images / f / 1e6,
                        "bwd_gmacs": 2 * macs * images / b / 1e6,
                    }
                )
    return rows

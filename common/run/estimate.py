"""How long a whole run will take, said before it starts: on a CPU a CIFAR-sized job takes hours.

:func:`say_run_estimate` times one forward batch of the dense model and multiplies it by the image
forwards every stage of the run needs (:func:`image_passes`): the baseline's evaluation, the sensitivity
profiles, every search's candidates, re-scores and val re-rankings, each final model's BN recalibration,
evaluations and finetuning (a training image costs about three forwards, four with distillation). It
is rough: compressed models run faster than the dense one they are timed as, and decomposing a plan is
not counted. It speaks only where it matters, on a CPU with at least :data:`LARGE_TRAIN_IMAGES` train
images, and names the options that shrink the run. The stages then measure themselves
(:class:`common.progress.Estimate`: sensitivity points, search candidates, finetuning steps).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import torch
from torch import nn

from common.data.splits import DatasetSplits
from common.progress import duration_text
from common.run.config import ExperimentConfig
from common.search.options import POLICIES, SEARCHING

__all__ = ["LARGE_TRAIN_IMAGES", "image_passes", "say_run_estimate", "seconds_per_image"]

LARGE_TRAIN_IMAGES = 10_000
"""Train images from which a CPU run says up front how long it will take (CIFAR-10 has 45,000)."""

_SHRINK = (
    "--search-budget, --calib-images, --val-images, --finetune-epochs, --finetune-max-images, or --device cuda "
    "(in the notebooks: SEARCH_BUDGET, CALIB_IMAGES, VAL_IMAGES, FINETUNE, DEVICE)"
)


def image_passes(cfg: ExperimentConfig, data: DatasetSplits, n_layers: int) -> dict[str, float]:
    """Image forwards of each part of the run ``cfg`` on ``data`` (a model of ``n_layers`` conv layers):
    ``baseline``, ``sensitivity``, ``searches``, ``finals`` (BN recalibration and evaluations) and
    ``finetuning`` (a training image counted as 3 forwards, 4 with distillation)."""
    val_n, test_n, train_n = len(data.val), len(data.test), len(data.train)
    rerank_n = min(cfg.val_images or val_n, val_n)
    candidate = cfg.calib_images + (rerank_n if cfg.proxy == "top1" else 0)
    rerank = 0 if cfg.proxy == "top1" or cfg.rerank == 1 else cfg.rerank
    search = cfg.search_budget * candidate + cfg.rescore * cfg.rescore_images + rerank * (cfg.calib_images + rerank_n)
    decomps = 2 if cfg.policy_tucker2 and "policy" in cfg.methods else 1
    seeds = cfg.n_seeds * decomps
    profile = 1 + n_layers * len(cfg.shapes) * len(cfg.sensitivity_levels)
    stages = len(cfg.targets) * cfg.n_seeds * (len(cfg.methods) + decomps - 1)
    searches = sum(m in SEARCHING for m in cfg.methods) + decomps - 1
    rules = len(cfg.methods) - sum(m in SEARCHING for m in cfg.methods)
    out = {
        "baseline": float(val_n + test_n),
        "sensitivity": float(seeds * profile * candidate if any(m in POLICIES for m in cfg.methods) else 0),
        "searches": float(len(cfg.targets) * cfg.n_seeds * (searches * search + rules * candidate)),
        "finals": float(stages * (cfg.final_calib_images + val_n + test_n)),
        "finetuning": 0.0,
    }
    if cfg.finetune_epochs > 0:
        tuned = sum(float(t) in cfg.finetune_targets_or_all() for t in cfg.targets) * cfg.n_seeds
        tuned *= len(cfg.methods) + decomps - 1
        images = min(cfg.finetune_max_images or train_n, train_n)
        per_image = 4 if cfg.distill else 3
        evals = math.ceil(cfg.finetune_epochs) * val_n + val_n + test_n  # each epoch's val, then the kept one's
        out["finetuning"] = float(tuned * (cfg.finetune_epochs * images * per_image + evals))
    return out


def seconds_per_image(model: nn.Module, image_size: int, device: torch.device, batch: int = 64) -> float:
    """Seconds per image of the dense model's eval forward (channels_last, as the proxy runs it), timed
    on one batch of seeded random images after one untimed batch."""
    x = torch.rand(batch, 3, image_size, image_size, generator=torch.Generator().manual_seed(0)).to(device)
    m = model.to(device).eval()
    x = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        m(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t = time.perf_counter()
        m(x)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return (time.perf_counter() - t) / batch


def run_estimate_text(cfg: ExperimentConfig, data: DatasetSplits, n_layers: int, per_image: float) -> str:
    """The line :func:`say_run_estimate` says: the whole run's time in all and by part, and what shrinks it."""
    passes = image_passes(cfg, data, n_layers)
    parts = ", ".join(f"{k} {duration_text(v * per_image)}" for k, v in passes.items() if v > 0)
    total = sum(passes.values()) * per_image
    return (
        f"estimate: this run takes roughly {duration_text(total)} on this CPU ({len(data.train):,} train "
        f"images, {1000 * per_image:.1f} ms per image forward of the dense {cfg.model}): {parts}. "
        f"To shrink it: {_SHRINK}"
    )


def say_run_estimate(
    cfg: ExperimentConfig,
    data: DatasetSplits,
    model: nn.Module,
    n_layers: int,
    device: torch.device,
    say: Callable[[str], None],
) -> str | None:
    """On a CPU with at least :data:`LARGE_TRAIN_IMAGES` train images: time the dense model, ``say`` how
    long the run will take (:func:`run_estimate_text`) and return the line; else do nothing (None)."""
    if device.type != "cpu" or len(data.train) < LARGE_TRAIN_IMAGES:
        return None
    line = run_estimate_text(cfg, data, n_layers, seconds_per_image(model, data.image_size, device))
    say(line)
    return line

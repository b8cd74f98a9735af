"""Evaluation: top-1/top-5 accuracy and mean cross-entropy of a model over a loader (distributed-aware).

All loaders are :class:`common.data.loader.BatchLoader` objects (or streamed
:class:`common.data.streamloader.StreamLoader` s) yielding normalized ``B x 3 x H x W`` batches already
on the device. When a loader is one rank's shard of an initialized ``torch.distributed`` group, the
counts are all-reduced (:func:`sum_over_shards`, which :func:`common.train.finetune.train_one_epoch`
uses for its sums too).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.device import resolve_device
from common.dist import world
from common.progress import progress_bar


def sum_over_shards(values: list[float], loader: Iterable, device: torch.device) -> list[float]:
    """Sum ``values`` over the ranks when ``loader`` is one rank's shard (``world_size > 1``); else as
    they are, even under an initialized process group (this process alone ran over the whole loader)."""
    if getattr(loader, "world_size", 1) == 1 or world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def autocast(device: torch.device, amp_dtype: torch.dtype | None):
    """``torch.autocast`` on ``device`` to ``amp_dtype``; a no-op context when it is ``None`` (full precision)."""
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _loader_device(loader: Iterable) -> torch.device | None:
    return getattr(loader, "device", None)


@torch.inference_mode()
def evaluate(
    model: nn.Module,
    loader: Iterable,
    device: str | torch.device | None = None,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress: str | None = None,
    per_image: bool = False,
) -> dict:
    """Top-1/top-5 accuracy and mean cross-entropy of ``model`` over ``loader``.

    The model is put in eval mode and moved to ``device`` (default: the loader's device). When the
    loader is a rank's shard (``world_size > 1``), counts are all-reduced over ranks.

    Args:
        loader: yields ``(x, y)``, ``x``: ``B x 3 x H x W`` float, ``y``: ``B`` int64.
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``); ``None`` = full precision.
        channels_last: convert model and inputs to channels_last.
        progress: label of a progress bar over the batches (``None``: no bar).
        per_image: also return ``"correct"``, whether each image's top-1 class is its label (bool, shape
            ``n``, in the loader's order; ``top1`` is its mean). Paired analyses over test images need it
            (:func:`common.analysis.seed_image_interval`). One process's loader only.

    Returns:
        ``{"top1", "top5", "loss", "n"}`` with accuracies as fractions in [0, 1] (and ``"correct"``).

    Raises:
        ValueError: ``per_image`` with a loader that is one rank's shard (its images are not all here).
    """
    if per_image and getattr(loader, "world_size", 1) > 1 and world()[1] > 1:
        raise ValueError("evaluate: per_image needs the whole split in this process, not one rank's shard")
    dev = resolve_device(device) if device is not None else (_loader_device(loader) or torch.device("cpu"))
    model.eval().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss_sum, c1, c5, n = 0.0, 0.0, 0.0, 0.0
    correct: list[torch.Tensor] = []
    with progress_bar(len(loader) if hasattr(loader, "__len__") else None, progress, "batch") as bar:
        for x, y in loader:
            x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            with autocast(dev, amp_dtype):
                logits = model(x)
            logits = logits.float()
            loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
            k = min(5, logits.shape[1])
            topk = logits.topk(k, dim=1).indices
            hit = topk.eq(y[:, None])
            c1 += hit[:, 0].sum().item()
            if per_image:
                correct.append(hit[:, 0].cpu())
            c5 += hit.any(dim=1).sum().item()
            n += len(y)
            bar.update()
    loss_sum, c1, c5, n = sum_over_shards([loss_sum, c1, c5, n], loader, dev)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no images")
    out = {"top1": c1 / n, "top5": c5 / n, "loss": loss_sum / n, "n": int(n)}
    if per_image:
        out["correct"] = torch.cat(correct).numpy()
    return out

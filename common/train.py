"""Evaluation, batch-norm recalibration and (distributed-aware) fine-tuning.

Written in the style of torchvision's reference scripts: small functions with explicit arguments.
All loaders are :class:`common.data.BatchLoader` objects yielding normalized ``B x 3 x H x W``
batches already on the device.

On CUDA, :func:`finetune` uses bf16 autocast and channels_last by default; on CPU it runs fp32 and
is deterministic for a given seed. When ``torch.distributed`` is initialized, :func:`finetune`
wraps the model in ``DistributedDataParallel`` and every rank trains on a disjoint slice of each
global batch (``batch_size`` is the global batch); metrics are all-reduced.
"""
from __future__ import annotations

import contextlib
import time
from typing import Callable, Iterable

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from common.bn import bn_recalibrate  # noqa: F401  (re-exported: the one recalibration)
from common.data import BatchLoader, DatasetSplits, make_loader


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _dist_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    """Sum ``values`` over ranks (identity without torch.distributed)."""
    if _dist_world()[1] == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _autocast(device: torch.device, amp_dtype: torch.dtype | None):
    if amp_dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=amp_dtype)


def _loader_device(loader: Iterable) -> torch.device | None:
    return getattr(loader, "device", None)


@torch.inference_mode()
def evaluate(model: nn.Module, loader: Iterable, device: str | torch.device | None = None,
             amp_dtype: torch.dtype | None = None, channels_last: bool = False) -> dict:
    """Top-1/top-5 accuracy and mean cross-entropy of ``model`` over ``loader``.

    The model is put in eval mode and moved to ``device`` (default: the loader's device). When the
    loader is a rank's shard (``world_size > 1``), counts are all-reduced over ranks.

    Args:
        loader: yields ``(x, y)``, ``x``: ``B x 3 x H x W`` float, ``y``: ``B`` int64.
        amp_dtype: autocast dtype (e.g. ``torch.bfloat16``); ``None`` = full precision.
        channels_last: convert model and inputs to channels_last.

    Returns:
        ``{"top1", "top5", "loss", "n"}`` with accuracies as fractions in [0, 1].
    """
    dev = resolve_device(device) if device is not None else (_loader_device(loader) or
                                                              torch.device("cpu"))
    model.eval().to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    loss_sum, c1, c5, n = 0.0, 0.0, 0.0, 0.0
    for x, y in loader:
        x, y = x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(dev, amp_dtype):
            logits = model(x)
        logits = logits.float()
        loss_sum += F.cross_entropy(logits, y, reduction="sum").item()
        k = min(5, logits.shape[1])
        topk = logits.topk(k, dim=1).indices
        hit = topk.eq(y[:, None])
        c1 += hit[:, 0].sum().item()
        c5 += hit.any(dim=1).sum().item()
        n += len(y)
    if getattr(loader, "world_size", 1) > 1:
        loss_sum, c1, c5, n = _all_reduce_sum([loss_sum, c1, c5, n], dev)
    if n == 0:
        raise ValueError("evaluate: the loader yielded no images")
    return {"top1": c1 / n, "top5": c5 / n, "loss": loss_sum / n, "n": int(n)}


def kd_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, target: torch.Tensor,
            alpha: float, temperature: float, label_smoothing: float = 0.0) -> torch.Tensor:
    """Hinton distillation: ``(1-alpha)*CE(student, y) + alpha*T^2*KL(teacher_T || student_T)``."""
    ce = F.cross_entropy(student_logits, target, label_smoothing=label_smoothing)
    t = temperature
    kl = F.kl_div(F.log_softmax(student_logits / t, dim=1), F.log_softmax(teacher_logits / t, dim=1),
                  reduction="batchmean", log_target=True)
    return (1.0 - alpha) * ce + alpha * (t * t) * kl


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, nesterov) or AdamW over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adamw")


def build_scheduler(optimizer: torch.optim.Optimizer, name: str, lr: float, total_steps: int,
                    pct_start: float = 0.15) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: ``onecycle`` (warm-up ``pct_start`` then cosine) or ``cosine`` (to 0)."""
    total_steps = max(1, total_steps)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps,
                                                   pct_start=pct_start)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise ValueError(f"unknown schedule {name!r}; valid: onecycle, cosine")


def train_one_epoch(model: nn.Module, loader: BatchLoader, optimizer: torch.optim.Optimizer,
                    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None, *,
                    max_steps: int | None = None, label_smoothing: float = 0.0,
                    teacher: nn.Module | None = None, kd_alpha: float = 0.5,
                    kd_temperature: float = 4.0, amp_dtype: torch.dtype | None = None,
                    channels_last: bool = False, progress=None) -> dict:
    """One pass (or its first ``max_steps`` batches) of training over ``loader``.

    ``model`` may be a DDP wrapper; ``teacher`` (if given) is run in eval mode without gradients.

    Returns:
        ``{"loss", "top1", "images", "steps"}`` summed over ranks (loss/top1 are means).
    """
    dev = loader.device
    model.train()
    loss_sum, correct, n, steps = 0.0, 0.0, 0.0, 0
    for x, y in loader:
        if max_steps is not None and steps >= max_steps:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with _autocast(dev, amp_dtype):
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = kd_loss(logits.float(), t_logits.float(), y, kd_alpha, kd_temperature,
                               label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {steps}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if scheduler is not None:
            scheduler.step()
        # .item() syncs; one per step is cheap next to a CNN forward/backward
        loss_sum += loss.item() * len(y)
        correct += (logits.argmax(1) == y).sum().item()
        n += len(y)
        steps += 1
        if progress is not None:
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", refresh=False)
    loss_sum, correct, n = _all_reduce_sum([loss_sum, correct, n], dev)
    return {"loss": loss_sum / max(n, 1), "top1": correct / max(n, 1), "images": int(n),
            "steps": steps}


def _sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (BN running stats) so every rank holds the same model."""
    if _dist_world()[1] == 1:
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


def finetune(model: nn.Module, data: DatasetSplits, epochs: float, *, batch_size: int = 128,
             lr: float = 0.01, optimizer: str = "sgd", weight_decay: float = 5e-4,
             schedule: str = "onecycle", label_smoothing: float = 0.0,
             teacher: nn.Module | None = None, kd_alpha: float = 0.5, kd_temperature: float = 4.0,
             max_images: int | None = None, device: str | torch.device | None = "auto",
             seed: int = 0, channels_last: bool | None = None, amp: bool | torch.dtype | None = None,
             eval_every_epoch: bool = True, val_subset: int | None = None, progress: bool = True,
             on_epoch_end: Callable[[dict, nn.Module], None] | None = None,
             pct_start: float = 0.15, augment: bool = True, hflip: bool = True,
             eval_batch_size: int = 512) -> list[dict]:
    """Train ``model`` in place on ``data.train``; return the per-epoch history.

    Args:
        epochs: may be fractional: 2.5 = two full epochs then half of the third's batches.
        batch_size: global batch (split over ranks when distributed; must divide by world size).
        lr: peak (onecycle) or initial (cosine) learning rate.
        optimizer: ``"sgd"`` (nesterov momentum 0.9) or ``"adamw"``.
        schedule: ``"onecycle"`` (warm-up ``pct_start``) or ``"cosine"``, stepped per batch.
        teacher: if given, train with knowledge distillation (``kd_alpha``, ``kd_temperature``).
        max_images: train on a seeded class-stratified subset of this many training images.
        device: ``"auto"`` = cuda if available. Under DDP on CUDA, use ``cuda:<local_rank>``.
        channels_last, amp: default True / bf16 on CUDA, False / fp32 on CPU. ``amp`` may be a dtype.
        eval_every_epoch: evaluate val top-1 after each epoch (else only after the last one).
        val_subset: evaluate on a seeded stratified subset of val of this size.
        on_epoch_end: called as ``on_epoch_end(record, model)`` after each epoch's record.
        augment, hflip: random crop from 4-px reflect padding, and horizontal flips (turn off for
            data where mirroring changes the class, e.g. digits).

    Returns:
        One dict per (possibly fractional) epoch: ``epoch`` (cumulative, fractional), ``images_seen``,
        ``train_loss``, ``train_top1``, ``val_top1`` (None when not evaluated), ``val_loss``,
        ``lr`` (at the end of the epoch), ``seconds`` (wall time of that epoch's training + eval).
    """
    if epochs <= 0:
        raise ValueError(f"epochs must be positive, got {epochs}")
    dev = resolve_device(device)
    rank, world = _dist_world()
    if batch_size % world:
        raise ValueError(f"batch_size {batch_size} must be divisible by world size {world}")
    is_cuda = dev.type == "cuda"
    channels_last = is_cuda if channels_last is None else channels_last
    if amp is None:
        amp = is_cuda
    amp_dtype = amp if isinstance(amp, torch.dtype) else (torch.bfloat16 if amp else None)

    torch.manual_seed(seed)  # dropout and any other global-RNG use inside the model
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(dev).eval()
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)

    train_loader = make_loader(data, "train", batch_size, device=dev, train=True, seed=seed,
                               subset=max_images, augment=augment, flip=hflip, drop_last=True,
                               rank=rank, world_size=world)
    val_loader = make_loader(data, "val", eval_batch_size, device=dev, train=False, seed=seed,
                             subset=val_subset, rank=rank, world_size=world)
    steps_per_epoch = len(train_loader)
    total_steps = max(1, round(epochs * steps_per_epoch))

    net: nn.Module = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if is_cuda else None)
    opt = build_optimizer(model, optimizer, lr, weight_decay)
    sched = build_scheduler(opt, schedule, lr, total_steps, pct_start)

    bar = None
    if progress and rank == 0:
        from tqdm.auto import tqdm
        bar = tqdm(total=total_steps, desc="finetune", leave=False)

    history: list[dict] = []
    done, images_seen, ep = 0, 0, 0
    try:
        while done < total_steps:
            t0 = time.perf_counter()
            train_loader.set_epoch(ep)
            steps = min(steps_per_epoch, total_steps - done)
            stats = train_one_epoch(net, train_loader, opt, sched, max_steps=steps,
                                    label_smoothing=label_smoothing, teacher=teacher,
                                    kd_alpha=kd_alpha, kd_temperature=kd_temperature,
                                    amp_dtype=amp_dtype, channels_last=channels_last, progress=bar)
            done += stats["steps"]
            images_seen += stats["images"]
            ep += 1
            last = done >= total_steps
            _sync_buffers(model)
            val = None
            if eval_every_epoch or last:
                val = evaluate(model, val_loader, dev, amp_dtype=amp_dtype, channels_last=channels_last)
            record = {"epoch": done / steps_per_epoch, "images_seen": images_seen,
                      "train_loss": stats["loss"], "train_top1": stats["top1"],
                      "val_top1": None if val is None else val["top1"],
                      "val_loss": None if val is None else val["loss"],
                      "lr": opt.param_groups[0]["lr"], "seconds": time.perf_counter() - t0}
            history.append(record)
            if on_epoch_end is not None:
                on_epoch_end(record, model)
    finally:
        if bar is not None:
            bar.close()
    model.eval()
    return history

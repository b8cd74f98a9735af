"""(Distributed-aware) fine-tuning: the recipe, optimizer and schedule, distillation loss, epochs and the loop.

Written in the style of torchvision's reference scripts: small functions with explicit arguments.
All loaders are :class:`common.data.loader.BatchLoader` objects yielding normalized ``B x 3 x H x W``
batches already on the device. Evaluation is :mod:`common.train.evaluate`, batch-norm recalibration
:mod:`common.train.bn`, and the checkpoint a run resumes from :mod:`common.train.checkpoint`.

On CUDA, :func:`finetune` uses bf16 autocast and channels_last by default; on CPU it runs fp32 and
is deterministic for a given seed. When ``torch.distributed`` is initialized, :func:`finetune`
wraps the model in ``DistributedDataParallel`` and every rank trains on a disjoint slice of each
global batch (``batch_size`` is the global batch); metrics are all-reduced. ``distributed=False``
trains in this process alone even then (:mod:`common.run.experiment` finishes one final model per rank).
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from tqdm.auto import tqdm

from common.data.loader import BatchLoader, make_loader
from common.data.splits import DatasetSplits
from common.device import resolve_device
from common.dist import world
from common.progress import Estimate, duration_text, progress_bar
from common.train.checkpoint import Checkpointer, Position
from common.train.evaluate import autocast, evaluate, sum_over_shards
from common.train.recipe import build_optimizer, build_scheduler, kd_loss


def train_one_epoch(
    model: nn.Module,
    loader: BatchLoader,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler | None = None,
    *,
    max_steps: int | None = None,
    label_smoothing: float = 0.0,
    teacher: nn.Module | None = None,
    kd_alpha: float = 0.5,
    kd_temperature: float = 4.0,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
    progress=None,
    start: int = 0,
    sums: Sequence[float] | None = None,
    on_step: Callable[[int, list[float]], None] | None = None,
    clip_grad_norm: float | None = None,
) -> dict:
    """One pass (or its first ``max_steps`` batches) of training over ``loader``.

    ``model`` may be a DDP wrapper; ``teacher`` (if given) is run in eval mode without gradients.

    Args:
        progress: a bar to advance by one per step (:func:`common.progress.progress_bar`), or None.
        start: batches of this epoch trained already (a resumed run): they are skipped with their random
            draws replayed (:meth:`common.data.loader.BatchLoader.iter_from`); ``max_steps`` counts them.
        sums: ``[loss sum, correct, images]`` of those batches, so the epoch's means cover all of it.
        on_step: called after every step as ``on_step(steps, sums)``, ``steps`` counted from the epoch's
            start (used for checkpoints within an epoch).
        clip_grad_norm: clip the gradients' global L2 norm to this before each step (None: no clipping).

    Returns:
        ``{"loss", "top1", "images", "steps"}`` summed over ranks (loss/top1 are means; ``steps`` include
        the ``start`` skipped ones).
    """
    dev = loader.device
    model.train()
    loss_sum, correct, n = (float(v) for v in sums) if sums is not None else (0.0, 0.0, 0.0)
    steps = start
    for x, y in loader.iter_from(start) if start else loader:
        if max_steps is not None and steps >= max_steps:
            break
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(dev, amp_dtype):
            logits = model(x)
            if teacher is not None:
                with torch.no_grad():
                    t_logits = teacher(x)
                loss = kd_loss(logits.float(), t_logits.float(), y, kd_alpha, kd_temperature, label_smoothing)
            else:
                loss = F.cross_entropy(logits.float(), y, label_smoothing=label_smoothing)
        if not torch.isfinite(loss):
            raise FloatingPointError(f"non-finite training loss {loss.item()} at step {steps}")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad_norm)
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
        if on_step is not None:
            on_step(steps, [loss_sum, correct, n])
    loss_sum, correct, n = sum_over_shards([loss_sum, correct, n], loader, dev)
    return {"loss": loss_sum / max(n, 1), "top1": correct / max(n, 1), "images": int(n), "steps": steps}


def _sync_buffers(model: nn.Module) -> None:
    """Broadcast rank 0's buffers (BN running stats) so every rank holds the same model."""
    if world()[1] == 1:
        return
    for b in model.buffers():
        dist.broadcast(b, src=0)


@dataclass(frozen=True)
class FinetuneConfig:
    """The recipe of one :func:`finetune` call: how to train, not where (device) nor whom (teacher).

    Attributes:
        epochs: may be fractional: 2.5 = two full epochs then half of the third's batches.
        batch_size: global batch (split over ranks when distributed; must divide by world size).
        lr: peak (onecycle) or initial (cosine) learning rate.
        optimizer: ``"sgd"`` (nesterov momentum 0.9) or ``"adamw"``, with ``weight_decay``.
        schedule: ``"onecycle"`` (warm-up ``pct_start``) or ``"cosine"``, stepped per batch.
        label_smoothing: of the cross-entropy term.
        kd_alpha, kd_temperature: distillation weight and temperature (when a teacher is given).
        max_images: train on a seeded class-stratified subset of this many training images.
        augment, hflip: random crop from 4-px reflect padding, and horizontal flips (turn off for
            data where mirroring changes the class, e.g. digits).
        seed: the global RNG (dropout), batch order, augmentation and subsets.
        channels_last, amp: default True / bf16 on CUDA, False / fp32 on CPU. ``amp`` may be a dtype.
        eval_every_epoch: evaluate val top-1 after each epoch (else only after the last one).
        val_subset: evaluate on a seeded stratified subset of val of this size.
        eval_batch_size: batch size of those evaluations.
        clip_grad_norm: clip the gradients' global L2 norm to this before each step (None: off).
    """

    epochs: float
    batch_size: int = 128
    lr: float = 0.01
    optimizer: str = "sgd"
    weight_decay: float = 5e-4
    schedule: str = "onecycle"
    pct_start: float = 0.15
    label_smoothing: float = 0.0
    kd_alpha: float = 0.5
    kd_temperature: float = 4.0
    max_images: int | None = None
    augment: bool = True
    hflip: bool = True
    seed: int = 0
    channels_last: bool | None = None
    amp: bool | torch.dtype | None = None
    eval_every_epoch: bool = True
    val_subset: int | None = None
    eval_batch_size: int = 512
    clip_grad_norm: float | None = None

    def __post_init__(self) -> None:
        if self.epochs <= 0:
            raise ValueError(f"epochs must be positive, got {self.epochs}")

    def precision(self, device: torch.device) -> tuple[bool, torch.dtype | None]:
        """``(channels_last, autocast dtype)`` on ``device``: the CUDA / CPU defaults unless set."""
        is_cuda = device.type == "cuda"
        channels_last = is_cuda if self.channels_last is None else self.channels_last
        amp = is_cuda if self.amp is None else self.amp
        return channels_last, amp if isinstance(amp, torch.dtype) else (torch.bfloat16 if amp else None)


def finetune(
    model: nn.Module,
    data: DatasetSplits,
    epochs: float | FinetuneConfig,
    *,
    teacher: nn.Module | None = None,
    device: str | torch.device | None = "auto",
    progress: bool | str = True,
    on_epoch_end: Callable[[dict, nn.Module], None] | None = None,
    checkpoint: str | Path | None = None,
    checkpoint_every: float = 60.0,
    checkpoint_owner: dict | None = None,
    say: Callable[[str], None] | None = None,
    distributed: bool | None = None,
    **recipe: Any,
) -> list[dict]:
    """Train ``model`` in place on ``data.train``; return the per-epoch history.

    Args:
        epochs: the number of epochs, the other :class:`FinetuneConfig` fields then coming by name in
            ``recipe`` (``finetune(m, data, 3, lr=0.1)``); or a whole :class:`FinetuneConfig`, of which
            ``recipe`` overrides single fields.
        teacher: if given, train with knowledge distillation (``kd_alpha``, ``kd_temperature``); it is
            frozen and kept in eval mode.
        device: ``"auto"`` = cuda if available. Under DDP on CUDA, use ``cuda:<local_rank>``.
        progress: a progress bar over the steps (rank 0 only), labelled "finetune" or by the string given;
            with it, a line estimating the training time from the first steps.
        on_epoch_end: called as ``on_epoch_end(record, model)`` after each epoch's record. If it has
            ``state_dict()`` / ``load_state_dict()`` (e.g. it keeps the best epoch's weights), that state
            is saved in and restored from the checkpoint.
        checkpoint: a file to save the whole training state to (model, optimizer, schedule, RNG, position
            within the epoch, history) every ``checkpoint_every`` seconds and after each epoch. If it
            exists, training resumes from it, with the batches and random draws an uninterrupted run
            would have used (on the CPU the result is bit-identical); a finished run's checkpoint returns
            its history at once. The file is kept: delete it once its results are stored. A checkpoint
            of another recipe or model is refused, naming the file and what differs.
        checkpoint_owner: JSON-like identity of what is finetuned (e.g. the run, the dense weights, the
            plan, the data), saved in the checkpoint: a checkpoint of another owner, or of none, is
            discarded with a message and training starts over (:class:`common.train.checkpoint.Checkpointer`).
        say: where the time-estimate line goes (default: ``tqdm.write``), and a discarded checkpoint's message.
        distributed: train with DDP over the initialized process group (every rank calls ``finetune``
            with the same arguments); ``None`` = when one is initialized; ``False`` = this process alone
            even under ``torchrun`` (how :mod:`common.run.experiment` finetunes one final model per rank).

    Returns:
        One dict per (possibly fractional) epoch: ``epoch`` (cumulative, fractional), ``images_seen``,
        ``train_loss``, ``train_top1``, ``val_top1`` (None when not evaluated), ``val_loss``,
        ``lr`` (at the end of the epoch), ``seconds`` (wall time of that epoch's training + eval, in the
        process that finished it).

    Raises:
        TypeError: a name in ``recipe`` that is no :class:`FinetuneConfig` field.
        ValueError: non-positive epochs, a batch not divisible by the world size, an unknown
            optimizer or schedule, a checkpoint that does not belong to this run.
    """
    cfg = (
        dataclasses.replace(epochs, **recipe)
        if isinstance(epochs, FinetuneConfig)
        else FinetuneConfig(epochs, **recipe)
    )
    label = progress if isinstance(progress, str) else ("finetune" if progress else None)
    if distributed and world()[1] == 1:
        raise ValueError("finetune(distributed=True) needs an initialized torch.distributed process group")
    group = world() if distributed is not False else (0, 1)
    run = _FinetuneRun.start(model, data, cfg, teacher, resolve_device(device), label, group)
    if checkpoint is not None:
        run.saver = Checkpointer(Path(checkpoint), checkpoint_every, on_epoch_end, checkpoint_owner, say or tqdm.write)
        run.saver.restore(run)
    if label is not None:
        run.say = say or tqdm.write
    try:
        history = run.train(on_epoch_end)
    finally:
        run.bar.close()
    model.eval()
    return history


@dataclass
class _FinetuneRun:
    """What one :func:`finetune` call holds between its steps."""

    cfg: FinetuneConfig
    model: nn.Module
    net: nn.Module  # ``model``, or its DDP wrapper
    teacher: nn.Module | None
    device: torch.device
    channels_last: bool
    amp_dtype: torch.dtype | None
    train_loader: BatchLoader
    val_loader: BatchLoader
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    total_steps: int
    bar: Any
    eval_label: str | None = None
    pos: Position = dataclasses.field(default_factory=Position)
    saver: Checkpointer | None = None
    say: Callable[[str], None] | None = None
    rank: int = 0
    world: int = 1

    @classmethod
    def start(
        cls,
        model: nn.Module,
        data: DatasetSplits,
        cfg: FinetuneConfig,
        teacher: nn.Module | None,
        dev: torch.device,
        label: str | None,
        group: tuple[int, int] = (0, 1),
    ) -> _FinetuneRun:
        """Seed, place the models, build loaders, optimizer, schedule and progress bar (in this order);
        ``group`` is ``(rank, world_size)`` of the DDP group to train in (``(0, 1)``: alone)."""
        rank, world = group
        if cfg.batch_size % world:
            raise ValueError(f"batch_size {cfg.batch_size} must be divisible by world size {world}")
        channels_last, amp_dtype = cfg.precision(dev)
        torch.manual_seed(cfg.seed)  # dropout and any other global-RNG use inside the model
        _place(model, teacher, dev, channels_last)
        train_loader, val_loader = _loaders(data, cfg, dev, rank, world)
        total_steps = max(1, round(cfg.epochs * len(train_loader)))
        net = _data_parallel(model, dev) if world > 1 else model
        opt = build_optimizer(model, cfg.optimizer, cfg.lr, cfg.weight_decay)
        sched = build_scheduler(opt, cfg.schedule, cfg.lr, total_steps, cfg.pct_start)
        label = label if rank == 0 else None
        bar = progress_bar(total_steps, label, "step")
        return cls(
            cfg,
            model,
            net,
            teacher,
            dev,
            channels_last,
            amp_dtype,
            train_loader,
            val_loader,
            opt,
            sched,
            total_steps,
            bar,
            None if label is None else f"{label}: val",
            rank=rank,
            world=world,
        )

    def train(self, on_epoch_end: Callable[[dict, nn.Module], None] | None) -> list[dict]:
        """Whole epochs until ``total_steps`` (the last one possibly cut short); one record each."""
        steps_per_epoch = len(self.train_loader)
        pos = self.pos
        self.bar.update(pos.done)
        timer = _StepTimer(self, pos.done)
        while pos.done < self.total_steps:
            t0 = time.perf_counter()
            self.train_loader.set_epoch(pos.epoch)
            epoch_start = pos.done - pos.in_epoch

            def on_step(steps: int, sums: list[float], epoch_start: int = epoch_start) -> None:
                pos.in_epoch, pos.done, pos.sums = steps, epoch_start + steps, sums
                timer.step()
                if self.saver is not None:
                    self.saver.maybe_save(self)

            stats = self._epoch(min(steps_per_epoch, self.total_steps - epoch_start), on_step)
            pos.done = epoch_start + stats["steps"]
            if self.world > 1:
                _sync_buffers(self.model)
            val = None
            if self.cfg.eval_every_epoch or pos.done >= self.total_steps:
                val = evaluate(
                    self.model,
                    self.val_loader,
                    self.device,
                    amp_dtype=self.amp_dtype,
                    channels_last=self.channels_last,
                    progress=self.eval_label,
                )
            record = {
                "epoch": pos.done / steps_per_epoch,
                "images_seen": pos.images_seen + stats["images"],
                "train_loss": stats["loss"],
                "train_top1": stats["top1"],
                "val_top1": None if val is None else val["top1"],
                "val_loss": None if val is None else val["loss"],
                "lr": self.opt.param_groups[0]["lr"],
                "seconds": time.perf_counter() - t0,
            }
            pos.history.append(record)
            pos.epoch, pos.in_epoch, pos.sums, pos.images_seen = (
                pos.epoch + 1,
                0,
                [0.0, 0.0, 0.0],
                record["images_seen"],
            )
            if on_epoch_end is not None:
                on_epoch_end(record, self.model)
            if self.saver is not None:
                self.saver.save(self)
        return list(pos.history)

    def _epoch(self, steps: int, on_step: Callable[[int, list[float]], None]) -> dict:
        c = self.cfg
        return train_one_epoch(
            self.net,
            self.train_loader,
            self.opt,
            self.sched,
            max_steps=steps,
            label_smoothing=c.label_smoothing,
            teacher=self.teacher,
            kd_alpha=c.kd_alpha,
            kd_temperature=c.kd_temperature,
            amp_dtype=self.amp_dtype,
            channels_last=self.channels_last,
            progress=self.bar,
            start=self.pos.in_epoch,
            sums=self.pos.sums,
            on_step=on_step,
            clip_grad_norm=c.clip_grad_norm,
        )


class _StepTimer:
    """Says, after the first few steps of this process, how long the rest of the training will take
    (a :class:`common.progress.Estimate` of steps, with the val evaluations to come)."""

    WARMUP, MEASURED = 1, 4  # the first step (allocation, kernel selection) is not timed

    def __init__(self, run: _FinetuneRun, done: int):
        self.run = run
        self.estimate = Estimate(
            "finetune",
            run.total_steps - done,
            "step",
            run.say,
            warmup=self.WARMUP,
            measured=self.MEASURED,
            message=self._line,
        )

    def step(self) -> None:
        self.estimate.step()

    def _line(self, per: float, left: int) -> str:
        run, last = self.run, self.WARMUP + self.MEASURED
        evals = math.ceil(left / len(run.train_loader)) if run.cfg.eval_every_epoch else 1
        return (
            f"finetune: {left} of {run.total_steps} steps left, {per:.2f} s/step over steps "
            f"{self.WARMUP + 1}-{last} of this process: about {duration_text(per * left)} of training "
            f"plus {evals} val evaluation{'s' if evals != 1 else ''} of {run.val_loader.num_images} images"
        )


def _loaders(
    data: DatasetSplits, cfg: FinetuneConfig, dev: torch.device, rank: int, world: int
) -> tuple[BatchLoader, BatchLoader]:
    """This rank's finetuning loaders: augmented train batches (full global batches only), and val."""
    shared = {"device": dev, "seed": cfg.seed, "rank": rank, "world_size": world}
    train = make_loader(
        data,
        "train",
        cfg.batch_size,
        train=True,
        subset=cfg.max_images,
        augment=cfg.augment,
        flip=cfg.hflip,
        drop_last=True,
        **shared,
    )
    return train, make_loader(data, "val", cfg.eval_batch_size, train=False, subset=cfg.val_subset, **shared)


def _data_parallel(model: nn.Module, dev: torch.device) -> nn.Module:
    """``model`` wrapped in ``DistributedDataParallel`` (on this rank's GPU when on CUDA)."""
    return nn.parallel.DistributedDataParallel(model, device_ids=[dev.index] if dev.type == "cuda" else None)


def _place(model: nn.Module, teacher: nn.Module | None, dev: torch.device, channels_last: bool) -> None:
    """Move ``model`` (and the frozen, eval-mode ``teacher``) to ``dev`` in the training memory format."""
    model.to(dev)
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if teacher is not None:
        teacher.to(dev).eval()
        if channels_last:
            teacher.to(memory_format=torch.channels_last)
        for p in teacher.parameters():
            p.requires_grad_(False)

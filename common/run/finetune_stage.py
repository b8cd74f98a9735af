"""A final model's finetuning, as every run does it: :func:`finetune_best` finetunes a BN-recalibrated
compressed model with the run's recipe (:meth:`common.run.config.ExperimentConfig.finetune_config`, distilled
from the dense model when asked) and keeps its best val epoch, epoch 0 (before finetuning) included:
selection on val only, then val and test top-1 and the test images' hits of the kept weights.

Within a run (:mod:`common.run.finals`) each epoch is logged as a ``finetune_epoch`` record and the
finetuning checkpoints to :func:`finetune_checkpoint`, a file beside the run's log, so an interrupted run
resumes it where it stopped; a study that replays a run's finetuning calls :func:`finetune_best` alone.
The checkpoint holds what it finetunes (:func:`finetune_owner`: the log, the settings, the dense
weights, the data and the plan), so a file left by a deleted log or by other inputs is discarded, never
resumed.
"""

from __future__ import annotations

import copy
import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from common.data.splits import DatasetSplits
from common.decompose.layers import balance_factors
from common.run.config import RESUME_FIELDS, ExperimentConfig
from common.run.logs import RunLog, pack_hits
from common.run.measure import evaluate_splits
from common.train.finetune import finetune


def finetune_checkpoint(log: RunLog, key: dict) -> Path:
    """The file a final model's finetuning checkpoints to, beside the run's log (deleted once ``final`` is logged)."""
    name = f"{log.path.stem}.finetune-{key['method']}-x{key['target']:g}-{key['decomposition']}-s{key['seed']}.pt"
    return log.path.with_name(name)


def finetune_owner(log: RunLog, cfg: ExperimentConfig, plan: dict) -> dict:
    """What a final model's finetuning checkpoint belongs to: the run's log (its run id and when its
    ``config`` record was written: a log deleted and begun again is another), the settings a resume must
    share (:data:`common.run.config.RESUME_FIELDS`), the dense checkpoint's SHA-256, the dataset's identity
    (as logged) and the plan; a checkpoint of another owner is discarded (:class:`common.train.checkpoint.Checkpointer`)."""
    config = log.find("config") or {}
    settings = {k: v for k, v in cfg.result_settings().items() if k in RESUME_FIELDS}
    return {
        "log": f"{log.run_id} begun at {config.get('t')!r}",
        "settings": _digest(settings),
        "dense_checkpoint": config.get("checkpoint_sha256"),
        "dataset": _digest(config.get("dataset_identity")),
        "plan": _digest(plan),
    }


def _digest(value: object) -> str:
    """16 hex digits of the SHA-256 of ``value`` as canonical JSON."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()[:16]


class _BestValEpoch:
    """``on_epoch_end`` of a final model's finetuning: logs each ``finetune_epoch`` record (when given a log)
    and keeps the weights of the best val epoch (epoch 0 = before finetuning): selection on val only."""

    def __init__(self, log: RunLog | None, key: dict, val_top1: float, model: nn.Module):
        self.log, self.key = log, key
        self.val, self.epoch, self.state = val_top1, 0.0, copy.deepcopy(model.state_dict())

    def log_epoch(self, r: dict) -> None:
        """Log epoch record ``r`` unless it is logged already (a run resumed from a checkpoint saved just
        before or after it was logged sees it again, or never)."""
        if self.log is not None and self.log.find("finetune_epoch", **self.key, epoch=r["epoch"]) is None:
            self.log.write("finetune_epoch", **self.key, **{k: v for k, v in r.items() if k not in self.key})

    def __call__(self, r: dict, m: nn.Module) -> None:
        self.log_epoch(r)
        if r.get("val_top1") is not None and r["val_top1"] > self.val:
            self.val, self.epoch, self.state = r["val_top1"], r["epoch"], copy.deepcopy(m.state_dict())

    def state_dict(self) -> dict:
        """What a finetuning checkpoint keeps of it: the best epoch so far and its weights."""
        return {"val": self.val, "epoch": self.epoch, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.val, self.epoch, self.state = d["val"], d["epoch"], d["state"]


def finetune_best(
    comp: nn.Module,
    dense: nn.Module,
    data: DatasetSplits,
    cfg: ExperimentConfig,
    key: dict,
    val_top1_bn: float,
    device: torch.device,
    *,
    log: RunLog | None = None,
    checkpoint: Path | None = None,
    owner: dict | None = None,
    say: Callable[[str], None] = print,
    progress: str | None = None,
) -> dict:
    """A final model's finetuning, as every run does it: finetune ``comp`` in place with ``cfg``'s recipe (its
    factors balanced first with ``cfg.finetune_balance``) and
    ``key["seed"]`` (distilled from ``dense`` when ``cfg.distill``), keep its best val epoch (epoch 0, the BN
    model at ``val_top1_bn``, included), evaluate it on val and test.

    Args:
        log: where each epoch's ``finetune_epoch`` record goes (None: nowhere, e.g. a replay).
        checkpoint: the file the finetuning checkpoints to every minute and resumes from.
        owner: what ``checkpoint`` must belong to (:func:`finetune_owner`); one of another owner is
            discarded, with a message to ``say``.

    Returns:
        The ``final`` record's finetune fields (``test_hits_ft`` among them).
    """
    t = time.perf_counter()
    teacher = copy.deepcopy(dense) if cfg.distill else None
    if cfg.finetune_balance:  # the same function, better-conditioned steps (FactorizedConv.balance)
        balance_factors(comp)
    best = _BestValEpoch(log, key, val_top1_bn, comp)
    history = finetune(
        comp,
        data,
        cfg.finetune_config(key["seed"], data.hflip),
        teacher=teacher,
        device=device,
        progress=progress or False,
        on_epoch_end=best,
        checkpoint=checkpoint,
        checkpoint_owner=owner,
        say=say,
        distributed=False,  # one final model per rank (common.dist): the single-process numbers
    )
    for r in history:  # epochs restored from the checkpoint whose records did not reach the log
        best.log_epoch(r)
    comp.load_state_dict(best.state)
    comp.to(memory_format=torch.contiguous_format).eval()
    ev = evaluate_splits(comp, data, device, progress, per_image=True)
    return {
        "finetune_selected_epoch": best.epoch,
        "val_top1_ft": ev["val"]["top1"],
        "test_top1_ft": ev["test"]["top1"],
        "test_hits_ft": pack_hits(ev["test"]["correct"]),
        "finetune_epochs": cfg.finetune_epochs,
        "finetune_seconds": time.perf_counter() - t,
    }

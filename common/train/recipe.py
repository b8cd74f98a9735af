"""The pieces of a training recipe: the distillation loss, the optimizer and the per-step schedule."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["build_optimizer", "build_scheduler", "kd_loss"]


def kd_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    temperature: float,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Hinton distillation: ``(1-alpha)*CE(student, y) + alpha*T^2*KL(teacher_T || student_T)``."""
    ce = F.cross_entropy(student_logits, target, label_smoothing=label_smoothing)
    t = temperature
    kl = F.kl_div(
        F.log_softmax(student_logits / t, dim=1),
        F.log_softmax(teacher_logits / t, dim=1),
        reduction="batchmean",
        log_target=True,
    )
    return (1.0 - alpha) * ce + alpha * (t * t) * kl


def build_optimizer(model: nn.Module, name: str, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """SGD (momentum 0.9, nesterov) or AdamW over all trainable parameters."""
    params = [p for p in model.parameters() if p.requires_grad]
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: sgd, adamw")


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, lr: float, total_steps: int, pct_start: float = 0.15
) -> torch.optim.lr_scheduler.LRScheduler:
    """Per-step schedule: ``onecycle`` (warm-up ``pct_start`` then cosine) or ``cosine`` (to 0)."""
    total_steps = max(1, total_steps)
    if name == "onecycle":
        return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=total_steps, pct_start=pct_start)
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total_steps)
    raise ValueError(f"unknown schedule {name!r}; valid: onecycle, cosine")

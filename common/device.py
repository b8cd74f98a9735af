"""Which torch device a run uses: the one place that turns ``"auto"`` into a device.

Kept apart from training and timing so that :mod:`common.deploy.latency`, :mod:`common.deploy.merge` and
:mod:`common.train.evaluate` / :mod:`common.train.finetune` can all resolve devices without importing each other.
"""

from __future__ import annotations

import torch

__all__ = ["resolve_device"]


def resolve_device(device: str | torch.device | None = "auto") -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; otherwise ``torch.device(device)``."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)

"""Plain helpers shared by test modules (fixtures live in ``conftest.py``)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from common.models import build_model


def fast_model(name: str, seed: int = 0) -> nn.Module:
    """``build_model(name)`` materialized cheaply: meta build, then per-module reset on the CPU."""
    with torch.device("meta"):
        m = build_model(name)
    m = m.to_empty(device="cpu")
    torch.manual_seed(seed)
    for mod in m.modules():
        if hasattr(mod, "reset_parameters"):
            mod.reset_parameters()
        if hasattr(mod, "reset_running_stats"):
            mod.reset_running_stats()
    return m.eval()


def rewrite_csv(path: Path, fields: Sequence[str], rows: Sequence[dict]) -> None:
    """Write ``rows`` over the CSV at ``path`` (header ``fields``): a stored file tampered with by a test."""
    with open(path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fields)
        w.writeheader()
        w.writerows(rows)

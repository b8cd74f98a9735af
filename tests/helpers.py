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


def two_seed_plan_log(root: Path):
    """A multi-seed AlexNet run log under ``root/logs`` (its config lists seeds 0 and 1) with one TPE plan
    at 3x per seed: ``features.3`` at ranks 16 (seed 0) and 8 (seed 1). Returns the open ``RunLog``."""
    from common.decompose.surgery import LayerPlan, list_conv_layers, plan_to_dict
    from common.run.logs import RunLog

    torch.manual_seed(0)
    layers = list_conv_layers(build_model("alexnet"), (1, 3, 32, 32))
    log = RunLog(root / "logs", "alexnet", "bench")
    log.write("config", model="alexnet", dataset="cifar10-jpeg", metric="macs", methods=["tpe"], seed=0, seeds=[0, 1])
    for seed, rank in ((0, 16), (1, 8)):
        plan = plan_to_dict({layers[1].name: LayerPlan("ht2", (rank, rank, rank))})
        log.write("plan", method="tpe", target=3.0, metric="macs", decomposition="ht2", seed=seed, plan=plan)
    return log

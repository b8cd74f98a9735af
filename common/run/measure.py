"""How a run measures a model: top-1 on whole splits (:func:`evaluate_splits`) and forward latency in
its fastest exact deployment (:func:`latency`).

The baseline (:mod:`common.run.experiment`), each final model (:mod:`common.run.finals`) and its
finetuning (:mod:`common.run.finetune_stage`) are measured with these, and so are the models a study
rebuilds to compare with a logged run.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence

import torch
from torch import nn

from common.data.loader import make_loader
from common.data.splits import DatasetSplits
from common.deploy.merge import fastest_latency
from common.run.config import ExperimentConfig
from common.train.evaluate import evaluate


def evaluate_splits(
    model: nn.Module,
    data: DatasetSplits,
    device: torch.device,
    label: str | None = None,
    splits: Sequence[str] = ("val", "test"),
    per_image: bool = False,
) -> dict:
    """``evaluate`` on the whole of each split (with progress bars labelled ``label`` if given): how every
    reported accuracy of a run is measured. ``per_image`` adds each image's top-1 hit (``"correct"``, in the
    split's fixed order)."""
    return {
        s: evaluate(
            model,
            make_loader(data, s, 500, device=device),
            device,
            progress=label and f"{label}: {s}",
            per_image=per_image,
        )
        for s in splits
    }


def latency(model: nn.Module, cfg: ExperimentConfig, image_size: int, device: torch.device) -> dict:
    """Median forward latency (ms) per setting, each in its fastest exact deployment and memory format."""
    out = {}
    cpu_model = copy.deepcopy(model).cpu().eval()
    for b in cfg.latency_batches if "cpu" in cfg.latency_devices else ():
        r = fastest_latency(cpu_model, (b, 3, image_size, image_size), threads=cfg.latency_threads)
        out[f"cpu_b{b}"] = r["median_ms"]
        out[f"cpu_b{b}_channels_last"] = bool(r["channels_last"])
    if device.type == "cuda" and "cuda" in cfg.latency_devices:
        r = fastest_latency(
            model,
            (256, 3, image_size, image_size),
            device=device,
            dtype=torch.bfloat16,
            formats=(True,),
            cuda_graph=True,
        )
        out["cuda_b256_bf16_graph"] = r["median_ms"]
    return out

"""Parameter and MAC accounting of whole models.

MACs count multiply-accumulates of Conv2d and Linear layers per image (what
``torch.utils.flop_counter.FlopCounterMode`` counts as FLOPs / 2); batch norm, activations and pooling
are not counted, matching the shared checkpoints' manifest.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from common.decompose.layers import ConvGeometry, conv_cost


@dataclass(frozen=True)
class ModelCost:
    """Totals per image; ``per_layer`` maps each leaf Conv2d/Linear name to (params, macs)."""

    params: int
    macs: int
    conv_params: int
    conv_macs: int
    per_layer: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {"params": self.params, "macs": self.macs, "conv_params": self.conv_params, "conv_macs": self.conv_macs}


def _example(model: nn.Module, input_size: Sequence[int]) -> torch.Tensor:
    p = next(model.parameters(), None)
    return torch.zeros(
        *input_size, device=p.device if p is not None else "cpu", dtype=p.dtype if p is not None else torch.float32
    )


def count_model(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> ModelCost:
    """Count params (all parameters) and per-image MACs (Conv2d + Linear) with one forward pass."""
    per_layer: dict[str, tuple[int, int]] = {}
    hooks = []

    def conv_hook(name):
        def hook(mod, inp, out):
            p, m = conv_cost("dense", ConvGeometry.of(mod), (), inp[0].shape[-2:])
            per_layer[name] = (p, m)

        return hook

    def linear_hook(name):
        def hook(mod, inp, out):
            rows = inp[0].numel() // inp[0].shape[-1] // max(inp[0].shape[0], 1) if inp[0].dim() > 2 else 1
            p = sum(t.numel() for t in mod.parameters(recurse=False))
            per_layer[name] = (p, rows * mod.in_features * mod.out_features)

        return hook

    for name, mod in model.named_modules():
        if isinstance(mod, nn.Conv2d):
            hooks.append(mod.register_forward_hook(conv_hook(name)))
        elif isinstance(mod, nn.Linear):
            hooks.append(mod.register_forward_hook(linear_hook(name)))
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(_example(model, input_size))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    conv_names = {n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)}
    conv_params = sum(p for n, (p, _) in per_layer.items() if n in conv_names)
    conv_macs = sum(m for n, (_, m) in per_layer.items() if n in conv_names)
    params = sum(p.numel() for p in model.parameters())
    macs = sum(m for _, m in per_layer.values())
    return ModelCost(params, macs, conv_params, conv_macs, per_layer)


def flop_counter_macs(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> int:
    """Per-image MACs as counted by PyTorch's ``FlopCounterMode`` (FLOPs / 2 / batch): the test oracle."""
    from torch.utils.flop_counter import FlopCounterMode

    was_training = model.training
    try:
        model.eval()
        with torch.no_grad(), FlopCounterMode(display=False) as fc:
            model(_example(model, input_size))
    finally:
        model.train(was_training)
    return fc.get_total_flops() // 2 // int(input_size[0])

"""Exact batch-norm recalibration: statistics that do not depend on how images fall into batches.

After a conv is factorized, the activations reaching every later BatchNorm shift, so its running
statistics must be re-estimated on some calibration images. PyTorch's recipe (train mode,
``momentum=None``) averages *per-batch* statistics with equal weight, so a 6-image last batch counts as
much as a 250-image one, and every BN normalizes with the statistics of its own batch while the
statistics of the BNs after it are gathered: the result depends on the batch size.

Here every BN gets the *population* mean and (unbiased) variance of its input over all calibration
images, where its input is computed with every earlier BN already normalizing by its own population
statistics, exactly as the model will run in eval mode. Batch boundaries only decide how much is
computed at once. The model is traced with :mod:`torch.fx` and run node by node over all batches, so a
BN's statistics are final before anything after it is computed: one forward pass in all. Models fx
cannot trace fall back to one truncated forward per BN (same result, slower).

The pass also yields the recalibrated model's eval-mode outputs on the calibration images, which the
label-free search proxy (:mod:`common.search.proxy`) scores at no extra cost.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.fx as fx
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from common.progress import progress_bar


def bn_modules(model: nn.Module) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` that keep running statistics."""
    return [m for m in model.modules() if isinstance(m, _BatchNorm) and m.track_running_stats]


class _Moments:
    """Per-channel count, mean and sum of squared deviations, merged batch by batch (Chan et al.)."""

    def __init__(self) -> None:
        self.n = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def add(self, x: Tensor) -> None:
        dims = [d for d in range(x.dim()) if d != 1]
        n = x.numel() // x.shape[1]
        if n == 0:
            return
        var, mean = torch.var_mean(x.float(), dim=dims, correction=0)
        mean, m2 = mean.double(), var.double() * n
        if self.mean is None:
            self.n, self.mean, self.m2 = n, mean, m2
            return
        total = self.n + n
        delta = mean - self.mean
        self.mean = self.mean + delta * (n / total)
        self.m2 = self.m2 + m2 + delta.square() * (self.n * n / total)
        self.n = total

    def store(self, bn: _BatchNorm, name: str) -> None:
        if self.n < 2:
            raise ValueError(
                f"bn_recalibrate: BatchNorm {name!r} saw {self.n} value(s) per channel; give it more calibration images"
            )
        with torch.no_grad():
            bn.running_mean.copy_(self.mean.to(bn.running_mean.dtype))
            bn.running_var.copy_((self.m2 / (self.n - 1)).to(bn.running_var.dtype))
            if bn.num_batches_tracked is not None:
                bn.num_batches_tracked.fill_(1)


class _Tracer(fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, _BatchNorm) or super().is_leaf_module(m, qualname)


def _trace(model: nn.Module) -> fx.GraphModule | None:
    try:
        graph = _Tracer().trace(model)
    except Exception:  # control flow on values, unsupported ops: use the per-BN fallback
        return None
    # The GraphModule holds the model's own submodules (not copies), so stats set on it land in model.
    return fx.GraphModule(model, graph)


def _run_graph(gm: fx.GraphModule, batches: Sequence[Tensor], progress: str | None = None) -> list[Tensor]:
    """Evaluate ``gm`` node by node over all batches, calibrating each BN before its output is used
    (a bar labelled ``progress`` counts the graph's nodes)."""
    modules = dict(gm.named_modules())
    last_use: dict[fx.Node, fx.Node] = {}
    for node in gm.graph.nodes:
        for inp in node.all_input_nodes:
            last_use[inp] = node
    env: dict[fx.Node, list] = {}
    calibrated: set[str] = set()
    out: list[Tensor] = []
    nb = len(batches)
    bar = progress_bar(len(gm.graph.nodes), progress, "op")
    for node in gm.graph.nodes:
        bar.update()
        if node.op == "placeholder":
            env[node] = list(batches)
        elif node.op == "get_attr":
            value = gm
            for part in node.target.split("."):
                value = getattr(value, part)
            env[node] = [value] * nb
        elif node.op == "output":
            out = [fx.node.map_arg(node.args[0], lambda n, i=i: env[n][i]) for i in range(nb)]
        else:
            args = [fx.node.map_arg((node.args, node.kwargs), lambda n, i=i: env[n][i]) for i in range(nb)]
            if node.op == "call_module":
                mod = modules[node.target]
                if isinstance(mod, _BatchNorm) and mod.track_running_stats:
                    if node.target in calibrated:
                        raise ValueError(
                            f"bn_recalibrate: BatchNorm {node.target!r} is called more than once "
                            "per forward; its statistics are not defined"
                        )
                    moments = _Moments()
                    for a, _ in args:
                        moments.add(a[0])
                    moments.store(mod, node.target)
                    calibrated.add(node.target)
                    mod.eval()
                env[node] = [mod(*a, **kw) for a, kw in args]
            elif node.op == "call_function":
                env[node] = [node.target(*a, **kw) for a, kw in args]
            elif node.op == "call_method":
                env[node] = [getattr(a[0], node.target)(*a[1:], **kw) for a, kw in args]
            else:  # pragma: no cover - fx has no other node kinds
                raise RuntimeError(f"unexpected fx node {node.op}")
        for inp in node.all_input_nodes:  # free activations as soon as nothing else reads them
            if last_use.get(inp) is node:
                env.pop(inp, None)
    bar.close()
    return out


class _Stop(Exception):
    pass


def _run_sequential(model: nn.Module, batches: Sequence[Tensor], progress: str | None = None) -> list[Tensor]:
    """Fallback: one truncated eval-mode forward per BN, in execution order (a bar labelled
    ``progress`` counts the BNs)."""
    names = {m: n for n, m in model.named_modules()}
    order: list[_BatchNorm] = []

    def record(mod, _inp):
        if mod not in order:
            order.append(mod)

    bns = bn_modules(model)
    hooks = [m.register_forward_pre_hook(record) for m in bns]
    try:
        model(batches[0])
    finally:
        for h in hooks:
            h.remove()
    bar = progress_bar(len(order), progress, "BN")
    for bn in order:
        bar.update()
        moments = _Moments()

        def grab(_mod, inp, moments=moments):
            moments.add(inp[0])
            raise _Stop

        h = bn.register_forward_pre_hook(grab)
        try:
            for x in batches:
                try:
                    model(x)
                except _Stop:
                    pass
        finally:
            h.remove()
        moments.store(bn, names[bn])
    bar.close()
    return [model(x) for x in batches]


@torch.no_grad()
def bn_recalibrate(
    model: nn.Module,
    batches: Iterable,
    device: str | torch.device | None = None,
    num_batches: int | None = None,
    return_outputs: bool = False,
    progress: str | None = None,
):
    """Set every BatchNorm's running mean/var to its exact statistics over the calibration images.

    Args:
        model: modified in place and left in eval mode.
        batches: yields ``x`` or ``(x, y)`` with ``x`` of shape ``B x C x H x W`` (labels are ignored);
            all batches are held at once, so pass a calibration subset, not a whole split.
        device: where to run (default: the model's parameters' device).
        num_batches: use only the first this many batches.
        return_outputs: also return the recalibrated model's eval-mode outputs, one per batch.
        progress: label of a progress bar over the model's operations (``None``: no bar).

    Returns:
        ``model``, or ``(model, outputs)`` with ``return_outputs``. A model without BatchNorm is
        returned unchanged (its outputs are still computed when asked for).

    Raises:
        ValueError: no batches, or a BN that would see fewer than two values per channel.
    """
    if not return_outputs and not bn_modules(model):  # nothing to calibrate: do not even read the data
        return model.eval()
    param = next(model.parameters(), None)
    dev = torch.device(device) if device is not None else (param.device if param is not None else torch.device("cpu"))
    xs: list[Tensor] = []
    for i, b in enumerate(batches):
        if num_batches is not None and i >= num_batches:
            break
        x = b[0] if isinstance(b, (tuple, list)) else b
        xs.append(x.to(dev, non_blocking=True))
    if not xs:
        raise ValueError("bn_recalibrate: the loader yielded no batches")
    model.to(dev).eval()
    if not bn_modules(model):
        return (model, [model(x) for x in xs]) if return_outputs else model
    gm = _trace(model)
    outputs = _run_graph(gm, xs, progress) if gm is not None else _run_sequential(model, xs, progress)
    model.eval()
    return (model, outputs) if return_outputs else model

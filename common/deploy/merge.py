"""Fastest exact deployment of a factorized model: merge adjacent factor convs where that pays.

A factorized layer (:mod:`common.decompose.layers`) is a chain of convs with nothing between them, so any run
of adjacent stages multiplies out into one conv, and the whole chain gives back the dense conv. The
partition with the fewest MACs is not always the fastest: a 1×1 conv into few channels is memory
bound, a GPU runs a dense 3×3 at a far higher fraction of peak than a 1×3, and four small kernels
cost four passes over the activations. So :func:`deploy_model` times every partition of every
factorized layer on the input shape, device, dtype and memory format it will run with and keeps the
fastest (``choose="latency"``), or keeps the fewest-MAC partition without timing (``choose="macs"``).
Every partition computes the same function up to float rounding; the tests check each one.

:func:`fastest_latency` (deployment, then timing of the whole model with :mod:`common.deploy.latency`) is
the project's one way to time a model.
"""

from __future__ import annotations

import copy
import itertools
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from common.decompose.cost import count_model
from common.decompose.layers import ConvGeometry, FactorizedConv, conv_cost
from common.deploy.latency import measure_latency
from common.device import resolve_device

Tensor = torch.Tensor

__all__ = [
    "merge_convs",
    "chain_forms",
    "build_form",
    "form_macs",
    "deploy_model",
    "fastest_latency",
    "DeployedChain",
    "LayerDeployment",
]


def _pad_of(conv: nn.Conv2d, axis: int) -> int | str:
    if isinstance(conv.padding, str):
        return conv.padding
    return int(conv.padding[axis])


def _trivial_on(conv: nn.Conv2d, axis: int) -> bool:
    """True when ``conv`` does nothing spatial along ``axis`` (a 1-tap kernel, stride 1, no padding)."""
    pad = _pad_of(conv, axis)
    return conv.kernel_size[axis] == 1 and conv.stride[axis] == 1 and pad in (0, "valid", "same")


def merge_convs(convs: Sequence[nn.Conv2d]) -> nn.Conv2d:
    """One ``nn.Conv2d`` computing ``convs[-1](...convs[0](x))``.

    Exact when, along each spatial axis, at most one conv of the run does anything spatial (kernel,
    stride or padding) and only the last conv has a bias: then zero padding, reflect/replicate/
    circular padding, strides and dilations commute with the per-pixel channel mixing of the others.
    The product is formed in float64 and cast back to the convs' dtype.

    Raises:
        ValueError: when the run does not satisfy those conditions (nothing is modified).
    """
    convs = list(convs)
    if not convs:
        raise ValueError("merge_convs needs at least one conv")
    if len(convs) == 1:
        return copy.deepcopy(convs[0])
    g = convs[0].groups
    if any(c.groups != g for c in convs):
        raise ValueError(f"cannot merge convs with different groups {[c.groups for c in convs]}")
    if any(c.bias is not None for c in convs[:-1]):
        raise ValueError("cannot merge: only the last conv of a run may have a bias")
    for a, b in zip(convs, convs[1:]):
        if a.out_channels != b.in_channels:
            raise ValueError(f"cannot merge: {a.out_channels} output channels feed {b.in_channels} inputs")
    geometry = _merged_geometry(convs)
    last = convs[-1]
    merged = nn.Conv2d(
        convs[0].in_channels,
        last.out_channels,
        groups=g,
        bias=last.bias is not None,
        device=last.weight.device,
        dtype=last.weight.dtype,
        **geometry,
    )
    with torch.no_grad():
        merged.weight.copy_(_weight_product(convs, g).reshape(merged.weight.shape).to(merged.weight.dtype))
        if last.bias is not None:
            merged.bias.copy_(last.bias)
    return merged


def _merged_geometry(convs: Sequence[nn.Conv2d]) -> dict:
    """``kernel_size``, ``stride``, ``padding``, ``dilation``, ``padding_mode`` of the merged conv: per axis,
    those of the one conv acting along it (raises ``ValueError`` when two do)."""
    spatial = []
    for axis in range(2):
        active = [i for i, c in enumerate(convs) if not _trivial_on(c, axis)]
        if len(active) > 1:
            raise ValueError(f"cannot merge: convs {active} all act along axis {'HW'[axis]}")
        spatial.append(active[0] if active else None)
    modes = {
        convs[i].padding_mode
        for axis, i in enumerate(spatial)
        if i is not None and _pad_of(convs[i], axis) not in (0, "valid")
    }
    if len(modes) > 1:
        raise ValueError(f"cannot merge convs with different padding modes {sorted(modes)}")
    kernel, stride, dilation, padding = [], [], [], []
    for axis, i in enumerate(spatial):
        src = convs[i] if i is not None else None
        kernel.append(src.kernel_size[axis] if src else 1)
        stride.append(src.stride[axis] if src else 1)
        dilation.append(src.dilation[axis] if src else 1)
        padding.append(_pad_of(src, axis) if src else 0)
    strings = {p for p in padding if isinstance(p, str)}
    if strings:
        # A 1-tap axis pads nothing under 'same' or 'valid', so one string covers both axes.
        ints = [p for p in padding if not isinstance(p, str)]
        if len(strings) > 1 or any(p != 0 for p in ints):
            raise ValueError(f"cannot merge string and numeric paddings {padding}")
        pad_arg: tuple[int, int] | str = strings.pop()
    else:
        pad_arg = (int(padding[0]), int(padding[1]))
    return {
        "kernel_size": tuple(kernel),
        "stride": tuple(stride),
        "padding": pad_arg,
        "dilation": tuple(dilation),
        "padding_mode": modes.pop() if modes else "zeros",
    }


def _weight_product(convs: Sequence[nn.Conv2d], g: int) -> Tensor:
    """The float64 kernel of the run, ``(G, out, in, kh, kw)``."""
    weight = None
    for c in convs:
        w = c.weight.detach().to(torch.float64)
        w = w.reshape(g, w.shape[0] // g, *w.shape[1:])  # (G, out, in, kh, kw)
        if weight is None:
            weight = w
            continue
        # one of (i, k) and one of (j, l) is 1, so their product is the other
        m = torch.einsum("gpoij,gockl->gpcikjl", w, weight)
        weight = m.reshape(*m.shape[:3], m.shape[3] * m.shape[4], m.shape[5] * m.shape[6])
    return weight


def chain_forms(n: int) -> list[tuple[int, ...]]:
    """Every way to cut a chain of ``n`` stages into runs of adjacent stages, as run lengths.

    ``(1,) * n`` is the chain as factorized, ``(n,)`` the dense conv.
    """
    forms = []
    for cuts in itertools.product((False, True), repeat=n - 1):
        lengths, run = [], 1
        for cut in cuts:
            if cut:
                lengths.append(run)
                run = 1
            else:
                run += 1
        forms.append(tuple(lengths + [run]))
    return sorted(forms, key=lambda f: (-len(f), f))


class DeployedChain(nn.Sequential):
    """A factorized layer as deployed: its stages merged into runs (``form``), applied in order."""

    def __init__(self, convs: Sequence[nn.Conv2d], form: tuple[int, ...], source: str):
        super().__init__(*convs)
        self.form = tuple(form)
        self.source = source

    def extra_repr(self) -> str:
        return f"form={self.form}, source={self.source}"


def build_form(layer: FactorizedConv, form: Sequence[int]) -> DeployedChain:
    """The stages of ``layer`` merged according to ``form`` (run lengths summing to the stage count)."""
    stages = layer.stages()
    if sum(form) != len(stages) or any(f < 1 for f in form):
        raise ValueError(f"form {tuple(form)} does not partition {len(stages)} stages of {layer.method} layer")
    convs, i = [], 0
    for length in form:
        convs.append(merge_convs(stages[i : i + length]))
        i += length
    return DeployedChain(convs, tuple(form), f"{layer.method}{layer.ranks}")


def form_macs(layer: FactorizedConv, form: Sequence[int], in_hw: Sequence[int]) -> int:
    """Per-image MACs of ``layer`` deployed as ``form`` on an ``in_hw`` input (via ``conv_cost``)."""
    total, hw = 0, tuple(int(v) for v in in_hw)
    for conv in build_form(layer, form):
        geom = ConvGeometry.of(conv)
        total += conv_cost("dense", geom, (), hw)[1]
        hw = geom.out_hw(hw)
    return total


@dataclass
class LayerDeployment:
    """What :func:`deploy_model` chose for one factorized layer, and why."""

    name: str
    method: str
    ranks: tuple[int, ...]
    input_shape: tuple[int, ...]
    form: tuple[int, ...]
    macs: int
    factorized_macs: int
    times_ms: dict = field(default_factory=dict)  # form (as str) -> median ms, when timed

    def to_dict(self) -> dict:
        return {
            "name": self.name,
            "method": self.method,
            "ranks": list(self.ranks),
            "input_shape": list(self.input_shape),
            "form": list(self.form),
            "macs": self.macs,
            "factorized_macs": self.factorized_macs,
            "times_ms": dict(self.times_ms),
        }


def _layer_inputs(
    model: nn.Module, input_shape: Sequence[int], device: torch.device, dtype: torch.dtype
) -> dict[str, tuple[int, ...]]:
    shapes: dict[str, tuple[int, ...]] = {}
    hooks = []
    for name, mod in model.named_modules():
        if isinstance(mod, FactorizedConv):
            hooks.append(
                mod.register_forward_hook(lambda m, inp, out, name=name: shapes.__setitem__(name, tuple(inp[0].shape)))
            )
    try:
        with torch.inference_mode():
            model(torch.zeros(*input_shape, device=device, dtype=dtype))
    finally:
        for h in hooks:
            h.remove()
    return shapes


def _time_forms(
    layer: FactorizedConv,
    forms: Sequence[tuple[int, ...]],
    shape: tuple[int, ...],
    timing: dict,
    timing_cache: dict | None,
) -> dict[str, float]:
    """Median ms of each partition of ``layer`` on an input of ``shape`` (``timing``: the setting, as
    :func:`common.deploy.latency.measure_latency` keywords); ``timing_cache`` serves and keeps the timings."""
    setting = tuple(str(v) if isinstance(v, (torch.device, torch.dtype)) else v for v in timing.values())
    key_base = (
        tuple(tuple(c.weight.shape) for c in layer.stages()),
        repr(layer.geometry),
        layer.padding_mode,
        shape,
        setting,
    )
    times: dict[str, float] = {}
    for f in forms:
        key = key_base + (f,)
        if timing_cache is not None and key in timing_cache:
            times[str(f)] = timing_cache[key]
            continue
        times[str(f)] = measure_latency(build_form(layer, f), shape, **timing)["median_ms"]
        if timing_cache is not None:
            timing_cache[key] = times[str(f)]
    return times


def deploy_model(
    model: nn.Module,
    input_shape: Sequence[int] = (1, 3, 32, 32),
    *,
    choose: str = "latency",
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    channels_last: bool = False,
    threads: int | None = None,
    cuda_graph: bool = False,
    warmup: int = 2,
    iters: int = 5,
    timing_cache: dict | None = None,
) -> tuple[nn.Module, list[LayerDeployment]]:
    """A copy of ``model`` with every factorized layer replaced by its fastest exact partition.

    Args:
        model: a model holding factorized layers (``HT2Conv2d`` etc.); it is not modified.
        input_shape: ``B x C x H x W`` the model will run on (each layer is timed on its own input).
        choose: ``"latency"`` (time every partition with :func:`common.deploy.latency.measure_latency` in the
            given setting) or ``"macs"`` (fewest MACs, ties to fewer convs; no timing).
        device, dtype, channels_last, threads, cuda_graph, warmup, iters: the timing setting, the same
            one the deployed model will be measured in.
        timing_cache: optional dict reused across calls: a layer with the same shapes, input and
            setting is timed once.

    Returns:
        ``(deployed_model, report)``: the copy on ``device``/``dtype`` in eval mode, and one
        :class:`LayerDeployment` per factorized layer.
    """
    if choose not in ("latency", "macs"):
        raise ValueError(f"choose must be 'latency' or 'macs', got {choose!r}")
    dev = resolve_device(device)
    out = copy.deepcopy(model).eval().to(device=dev, dtype=dtype)
    shapes = _layer_inputs(out, input_shape, dev, dtype)
    report = []
    timing = {"device": dev, "dtype": dtype, "channels_last": channels_last, "threads": threads}
    timing |= {"cuda_graph": cuda_graph, "warmup": warmup, "iters": iters}
    for name, layer in list(out.named_modules()):
        if not isinstance(layer, FactorizedConv) or name not in shapes:
            continue
        shape = shapes[name]
        n = len(layer.stages())
        forms = chain_forms(n)
        macs = {f: form_macs(layer, f, shape[-2:]) for f in forms}
        times: dict[str, float] = {}
        if choose == "macs":
            best = min(forms, key=lambda f: (macs[f], len(f)))
        else:
            times = _time_forms(layer, forms, shape, timing, timing_cache)
            best = min(forms, key=lambda f: (times[str(f)], macs[f]))
        chain = build_form(layer, best).to(device=dev, dtype=dtype)
        parent_name, _, child = name.rpartition(".")
        setattr(out.get_submodule(parent_name) if parent_name else out, child, chain)
        report.append(LayerDeployment(name, layer.method, layer.ranks, shape, best, macs[best], macs[(1,) * n], times))
    return out, report


def fastest_latency(
    model: nn.Module,
    input_shape: tuple[int, ...],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    threads: int | None = None,
    cuda_graph: bool = False,
    formats: tuple[bool, ...] = (False, True),
    deploy: str | None = "latency",
    warmup: int = 10,
    iters: int = 50,
    deploy_warmup: int = 2,
    deploy_iters: int = 5,
    timing_cache: dict | None = None,
    return_model: bool = False,
) -> dict:
    """Latency of ``model`` in its fastest exact form: the project's one way to time a model.

    For each memory format in ``formats`` (``False`` = contiguous, ``True`` = channels_last), the
    factorized layers are first deployed in the partition that runs fastest in that very setting
    (:func:`deploy_model`, ``deploy="latency"``; ``"macs"`` picks fewest MACs; ``None`` keeps the
    chains as factorized), then the whole model is timed with :func:`common.deploy.latency.measure_latency`,
    and so is the model as factorized; the fastest of all is kept. ``model`` itself is not modified.

    Returns:
        ``median_ms`` and ``channels_last`` of the fastest candidate, ``deployed`` (whether it is the
        merged deployment), ``conv_macs`` of what ran (per image), ``forms`` of the deployment
        (``{"(1, 1, 1, 1)": n_layers, ...}``; empty when the model ran as factorized) and
        ``per_format`` (best median ms per format); with ``return_model``, ``model``: the fastest
        candidate itself (on ``device``/``dtype``, in its memory format), e.g. for
        :func:`common.deploy.latency.interleaved_latency`. ``factorized``: the same keys (but ``per_format``)
        for the fastest candidate that ran as factorized, from the same timings.
    """
    factorized = any(isinstance(m, FactorizedConv) for m in model.modules())
    setting = {"device": device, "dtype": dtype, "threads": threads, "cuda_graph": cuda_graph}
    best: dict[bool, dict] = {}  # deployed? -> fastest candidate of that kind
    per_format = {}
    for cl in formats:
        # the chains as factorized are one more candidate: per-layer timings do not add up exactly
        candidates = [(copy.deepcopy(model), {})]
        if deploy and factorized:
            # deployed in the very setting it is then timed in (its own, shorter timing runs)
            deployment = {"choose": deploy, "warmup": deploy_warmup, "iters": deploy_iters}
            m, report = deploy_model(
                model, input_shape, channels_last=cl, timing_cache=timing_cache, **deployment, **setting
            )
            candidates.append((m, dict(Counter(str(r.form) for r in report))))
        for m, forms in candidates:
            r = measure_latency(m, input_shape, channels_last=cl, warmup=warmup, iters=iters, **setting)
            fmt = "channels_last" if cl else "contiguous"
            per_format[fmt] = min(per_format.get(fmt, float("inf")), r["median_ms"])
            kind = bool(forms)
            if kind not in best or r["median_ms"] < best[kind]["median_ms"]:
                macs = count_model(copy.deepcopy(m).float().cpu(), (1, *input_shape[1:])).conv_macs
                best[kind] = {
                    "median_ms": r["median_ms"],
                    "channels_last": cl,
                    "deployed": kind,
                    "forms": forms,
                    "conv_macs": macs,
                }
                if return_model:
                    best[kind]["model"] = m
        del candidates
    fastest = min(best.values(), key=lambda b: b["median_ms"])
    return {**fastest, "per_format": per_format, "factorized": best[False]}

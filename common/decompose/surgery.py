"""Model surgery: list a model's conv layers, and apply a rank plan to a copy of it.

A *plan* maps qualified layer names to :class:`LayerPlan` ``(method, ranks)``; layers not named stay
as they are. Plans round-trip through JSON (:func:`plan_to_dict` / :func:`plan_from_dict`, as the run
logs store them) so that a compressed model is rebuilt from its plan plus its ``state_dict``
(:func:`apply_plan` with ``init="empty"``, then ``load_state_dict``).
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

from common.decompose.ht import KernelSpectra
from common.decompose.layers import LAYER_CLASSES, ConvGeometry, FactorizedConv, conv_cost, group_kernel_shape
from common.decompose.parallel import map_layers
from common.decompose.ranks import METHODS, validate_ranks


@dataclass(frozen=True)
class LayerPlan:
    """How one conv layer is replaced: ``method`` in ``METHODS`` with per-group ``ranks``."""

    method: str
    ranks: tuple[int, ...] = ()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown decomposition method {self.method!r}; expected one of {METHODS}")
        object.__setattr__(self, "ranks", tuple(int(r) for r in self.ranks))


@dataclass(frozen=True)
class LayerInfo:
    """A Conv2d of a model as seen in one forward pass. ``params``/``macs`` are the dense costs."""

    name: str
    weight_shape: tuple[int, int, int, int]
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    padding_mode: str
    bias: bool
    in_hw: tuple[int, int]
    out_hw: tuple[int, int]
    params: int
    macs: int
    eligible: tuple[str, ...]
    reason: str

    @property
    def geometry(self) -> ConvGeometry:
        t, c = self.weight_shape[0], self.weight_shape[1]
        return ConvGeometry(
            c * self.groups, t, self.kernel_size, self.stride, self.padding, self.dilation, self.groups, self.bias
        )

    @property
    def group_shape(self) -> tuple[int, int, int, int]:
        """Per-group kernel shape ``(T/G, C/G, kh, kw)`` that ranks refer to."""
        t, c, kh, kw = self.weight_shape
        return (t // self.groups, c, kh, kw)

    def cost(self, method: str, ranks: Sequence[int] = ()) -> tuple[int, int]:
        """(params, MACs per image) of this layer replaced by ``method`` at ``ranks``."""
        return conv_cost(method, self.geometry, tuple(ranks), self.in_hw)

    def to_dict(self) -> dict:
        return asdict(self)


def _eligibility(conv: nn.Conv2d) -> tuple[tuple[str, ...], str]:
    t, c, kh, kw = conv.weight.shape
    if conv.groups > 1 and c == 1:
        return (), f"depthwise conv (groups={conv.groups}, 1 input channel per group): no rank below full reduces it"
    if kh * kw == 1:
        return ("svd", "ht2", "tucker2"), "1x1 conv: svd"
    return ("ht2", "tucker2"), "kxk conv"


def list_conv_layers(model: nn.Module, input_size: Sequence[int] = (1, 3, 32, 32)) -> list[LayerInfo]:
    """Every ``nn.Conv2d`` of ``model`` (excluding those inside factorized layers), in forward order.

    One forward pass on zeros of ``input_size`` (on the model's device, eval mode, no grad) records each
    layer's input/output spatial size; the model's train/eval mode is restored afterwards.
    """
    inner = {id(m) for f in model.modules() if isinstance(f, FactorizedConv) for m in f.modules()}
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in inner]
    seen: dict[str, tuple] = {}

    def record(name):
        def hook(mod, inp, out):  # returns None: a hook's return value would replace the output
            seen.setdefault(name, (inp[0].shape, out.shape))

        return hook

    hooks = [m.register_forward_hook(record(n)) for n, m in convs]
    was_training = model.training
    try:
        p = next(model.parameters(), None)
        x = torch.zeros(
            *input_size,
            device=p.device if p is not None else "cpu",
            dtype=p.dtype if p is not None and p.is_floating_point() else torch.float32,
        )
        model.eval()
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    out = []
    for name, conv in convs:
        if name not in seen:
            continue  # not on the forward path for this input: nothing to compress
        in_shape, out_shape = seen[name]
        geom = ConvGeometry.of(conv)
        in_hw = (int(in_shape[-2]), int(in_shape[-1]))
        params, macs = conv_cost("dense", geom, (), in_hw)
        eligible, reason = _eligibility(conv)
        out.append(
            LayerInfo(
                name,
                tuple(conv.weight.shape),
                geom.kernel_size,
                geom.stride,
                geom.padding,
                geom.dilation,
                conv.groups,
                conv.padding_mode,
                conv.bias is not None,
                in_hw,
                (int(out_shape[-2]), int(out_shape[-1])),
                params,
                macs,
                eligible,
                reason,
            )
        )
    return out


class SpectraCache:
    """Lazily computed :class:`KernelSpectra` of a model's conv layers, keyed by qualified name.

    Built from the *original* model: compute once, then apply any number of plans.
    """

    def __init__(self, model: nn.Module):
        self._modules = dict(model.named_modules())
        self._cache: dict[str, KernelSpectra] = {}

    def get(self, name: str) -> KernelSpectra:
        hit = self._cache.get(name)
        if hit is None:
            conv = self._modules.get(name)
            if not isinstance(conv, nn.Conv2d):
                raise KeyError(f"no Conv2d named {name!r} in the model")
            hit = self._cache[name] = KernelSpectra(conv.weight, conv.groups, name)
        return hit

    def warm(self, names: Iterable[str]) -> SpectraCache:
        """Compute the spectra of ``names`` (on parallel threads, biggest kernels first)."""
        todo = [n for n in dict.fromkeys(names) if n not in self._cache]
        todo.sort(key=lambda n: -self._kernel_numel(n))
        map_layers(self.get, todo)
        return self

    def decompose(self, plan: Mapping[str, LayerPlan]) -> dict:
        """Factors of every non-dense layer of ``plan``, ``{name: HT2Factors | Tucker2Factors |
        SVDFactors}``, computed on parallel threads (biggest kernels first; see :mod:`common.decompose.parallel`).

        Raises:
            KeyError / ValueError: as :meth:`get` and :meth:`KernelSpectra.decompose` (naming the layer).
        """
        todo = [(n, lp) for n, lp in plan.items() if lp.method != "dense"]
        todo.sort(key=lambda item: -self._kernel_numel(item[0]))
        factors = map_layers(lambda item: self.get(item[0]).decompose(item[1].method, item[1].ranks), todo)
        done = dict(zip((n for n, _ in todo), factors))
        return {n: done[n] for n in plan if n in done}

    def _kernel_numel(self, name: str) -> int:
        conv = self._modules.get(name)
        return conv.weight.numel() if isinstance(conv, nn.Conv2d) else 0

    def __contains__(self, name: str) -> bool:
        return name in self._cache


def _conv_modules(model: nn.Module) -> dict[str, nn.Conv2d]:
    inner = {id(m) for f in model.modules() if isinstance(f, FactorizedConv) for m in f.modules()}
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and id(m) not in inner}


def validate_plan(model: nn.Module, plan: Mapping[str, LayerPlan]) -> dict[str, LayerPlan]:
    """Check every name and rank of ``plan`` against ``model``; return a normalized copy.

    Raises:
        KeyError: a name that is not a Conv2d of the model (the message lists the valid names).
        ValueError: ranks out of range or a method the layer cannot take (naming the layer).
    """
    convs = _conv_modules(model)
    norm = {}
    for name, lp in plan.items():
        if name not in convs:
            raise KeyError(f"plan names unknown layer {name!r}; valid conv layers: {sorted(convs)}")
        if not isinstance(lp, LayerPlan):
            lp = LayerPlan(*lp) if isinstance(lp, (tuple, list)) else LayerPlan(**lp)
        conv = convs[name]
        if lp.method == "svd" and tuple(conv.kernel_size) != (1, 1):
            raise ValueError(f"layer {name!r}: svd needs a 1x1 kernel, got {tuple(conv.kernel_size)}")
        if lp.method != "dense":
            validate_ranks(lp.method, group_kernel_shape(conv), lp.ranks, name)
        norm[name] = lp
    return norm


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, module)


def apply_plan(
    model: nn.Module,
    plan: Mapping[str, LayerPlan],
    spectra: SpectraCache | None = None,
    init: str = "decompose",
    inplace: bool = False,
) -> nn.Module:
    """Return a copy of ``model`` with the layers in ``plan`` replaced by factorized layers.

    The whole plan is validated before anything is built, so on error the model is untouched.

    Args:
        model: the dense model (left unchanged unless ``inplace``).
        plan: ``{layer name: LayerPlan(method, ranks)}``; ``"dense"`` entries leave the layer as is.
        spectra: cache of the *original* model's kernel spectra (reused across plans).
        init: ``"decompose"`` fills factors from the kernels; ``"empty"`` builds shapes only, for
            loading a compressed model's ``state_dict``.
    """
    if init not in ("decompose", "empty"):
        raise ValueError(f"init must be 'decompose' or 'empty', got {init!r}")
    plan = validate_plan(model, plan)
    convs = _conv_modules(model)
    if spectra is None and init == "decompose":
        spectra = SpectraCache(model)
    # Build every layer before touching the model: a kernel can still fail here (NaN/inf weights),
    # and with inplace=True a half-replaced model must not be left behind.
    factors = spectra.decompose(plan) if init == "decompose" else {}
    layers = {}
    for name, lp in plan.items():
        if lp.method == "dense":
            continue
        layer = LAYER_CLASSES[lp.method].from_conv(convs[name], lp.ranks, name=name, init="empty")
        if name in factors:
            layer.load_factors(factors[name], convs[name].bias)
        layers[name] = layer
    if inplace:
        target = model
    else:
        # Replaced convs are not copied (their weights would be thrown away at once).
        memo = {id(convs[n]): nn.Identity() for n in layers}
        target = copy.deepcopy(model, memo)
    for name, layer in layers.items():
        _set_submodule(target, name, layer)
    return target


def plan_to_dict(plan: Mapping[str, LayerPlan]) -> dict:
    """JSON-ready form: ``{name: {"method": m, "ranks": [...]}}`` (sorted by name)."""
    return {n: {"method": lp.method, "ranks": list(lp.ranks)} for n, lp in sorted(plan.items())}


def plan_from_dict(d: Mapping) -> dict[str, LayerPlan]:
    """Inverse of :func:`plan_to_dict`; raises ``ValueError`` naming the offending entry."""
    if not isinstance(d, Mapping):
        raise ValueError(f"a plan must be a JSON object mapping layer names to entries, got {type(d).__name__}")
    out = {}
    for name, e in d.items():
        if not isinstance(e, Mapping) or "method" not in e:
            raise ValueError(f"plan entry {name!r}: expected {{'method': ..., 'ranks': [...]}}, got {e!r}")
        ranks = e.get("ranks", [])
        if not isinstance(ranks, (list, tuple)) or not all(
            isinstance(r, int) and not isinstance(r, bool) for r in ranks
        ):
            raise ValueError(f"plan entry {name!r}: ranks must be a list of integers, got {ranks!r}")
        try:
            out[name] = LayerPlan(e["method"], tuple(ranks))
        except ValueError as err:
            raise ValueError(f"plan entry {name!r}: {err}") from None
    return out

"""Factorized replacements for ``nn.Conv2d``: HT-2, Tucker-2 and (for 1×1 kernels) SVD.

Each layer is a chain of plain ``nn.Conv2d`` modules built by ``from_conv(conv, ranks)``; ``forward``
runs them in order; ``factors()`` reads the *current* stage weights back as factors (so they stay
valid after finetuning), and ``to_dense()`` rebuilds an equivalent ``nn.Conv2d`` with the factors' own
``reconstruct`` (:mod:`common.decompose.ht`), the one dense-kernel formula per decomposition. Geometry (stride,
padding incl. 'same'/'valid' and asymmetric 'same' for even kernels, dilation, padding_mode, groups,
bias) is carried so that at full rank the output equals the original conv's up to float rounding:

HT-2, for input C and output T channels and a kh×kw kernel::

    1×1   C  -> R1           (no padding: channel mixing commutes with any padding mode)
    kh×1  R1 -> R13          stride (s_h, 1), padding (p_h, 0), dilation (d_h, 1)
    1×kw  R13 -> R3          stride (1, s_w), padding (0, p_w), dilation (1, d_w)
    1×1   R3 -> T  (+bias)

For G groups every stage is a grouped conv with G groups (each group decomposed on its own).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.decompose.ht import HT2Factors, KernelSpectra, SVDFactors, Tucker2Factors
from common.decompose.ranks import RANK_NAMES, RankSpec, resolve_ranks

Tensor = torch.Tensor


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _stage(
    source: nn.Conv2d,
    cin: int,
    cout: int,
    kernel=1,
    *,
    stride=1,
    padding=0,
    dilation=1,
    padding_mode="zeros",
    bias=False,
) -> nn.Conv2d:
    """One stage conv of ``source``'s factorization: ``source``'s groups, device and dtype; weights not
    initialized (``skip_init``: they are overwritten with factors, and random init costs as much as the copy)."""
    return torch.nn.utils.skip_init(
        nn.Conv2d,
        cin,
        cout,
        kernel,
        stride=stride,
        padding=padding,
        dilation=dilation,
        groups=source.groups,
        bias=bias,
        padding_mode=padding_mode,
        device=source.weight.device,
        dtype=source.weight.dtype,
    )


def _split_padding(padding, axis: int):
    """Padding for a stage that convolves along one axis only (0 = H, 1 = W)."""
    if isinstance(padding, str):
        return padding  # 'same'/'valid' act per axis, and a size-1 axis gets no padding
    p = _pair(padding)
    return (p[0], 0) if axis == 0 else (0, p[1])


def _on_axis(v, axis: int) -> tuple[int, int]:
    """A kernel size, stride or dilation kept on ``axis`` (0 = H, 1 = W) and 1 on the other."""
    p = _pair(v)
    return (p[0], 1) if axis == 0 else (1, p[1])


def _mixing_stage(source: nn.Conv2d, cin: int, cout: int, bias: bool = False) -> nn.Conv2d:
    """A plain 1×1 stage of ``source``'s factorization (no padding: channel mixing commutes with any)."""
    return _stage(source, cin, cout, bias=bias)


def _output_stage(source: nn.Conv2d, cin: int) -> nn.Conv2d:
    """The last stage: 1×1 to ``source``'s output channels, with a bias where ``source`` has one."""
    return _mixing_stage(source, cin, source.out_channels, bias=source.bias is not None)


def _geometry_stage(source: nn.Conv2d, cin: int, cout: int, axis: int | None = None) -> nn.Conv2d:
    """The stage that carries ``source``'s kernel, stride, padding and dilation: on both axes
    (``axis=None``), or on height (0) or width (1) only, as a kh×1 or 1×kw conv."""
    if axis is None:
        kernel, stride, padding, dilation = source.kernel_size, source.stride, source.padding, source.dilation
    else:
        kernel, stride = _on_axis(source.kernel_size, axis), _on_axis(source.stride, axis)
        padding, dilation = _split_padding(source.padding, axis), _on_axis(source.dilation, axis)
    return _stage(
        source, cin, cout, kernel, stride=stride, padding=padding, dilation=dilation, padding_mode=source.padding_mode
    )


def _check_conv(conv: nn.Module, name: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"layer {name!r}: expected nn.Conv2d, got {type(conv).__name__}")
    return conv


@dataclass(frozen=True)
class ConvGeometry:
    """What the cost of a conv and of its factorizations depends on."""

    in_channels: int
    out_channels: int
    kernel_size: tuple[int, int]
    stride: tuple[int, int]
    padding: tuple[int, int] | str
    dilation: tuple[int, int]
    groups: int
    bias: bool

    @classmethod
    def of(cls, conv: nn.Conv2d) -> ConvGeometry:
        pad = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(
            conv.in_channels,
            conv.out_channels,
            tuple(conv.kernel_size),
            tuple(conv.stride),
            pad,
            tuple(conv.dilation),
            conv.groups,
            conv.bias is not None,
        )

    def out_hw(self, in_hw: Sequence[int]) -> tuple[int, int]:
        """Output spatial size for input ``in_hw`` (PyTorch's formula, string paddings included)."""
        out = []
        for ax in range(2):
            k, s, d = self.kernel_size[ax], self.stride[ax], self.dilation[ax]
            if isinstance(self.padding, str):
                total = 0 if self.padding == "valid" else d * (k - 1)
            else:
                total = 2 * self.padding[ax]
            out.append((int(in_hw[ax]) + total - d * (k - 1) - 1) // s + 1)
        return out[0], out[1]


def conv_cost(method: str, geom: ConvGeometry, ranks: Sequence[int], in_hw: Sequence[int]) -> tuple[int, int]:
    """(params, MACs per image) of a conv kept dense or replaced by ``method`` at per-group ``ranks``.

    The single implementation of layer cost: layers, surgery and the rank search all call it, and
    tests check it against ``torch.utils.flop_counter``.
    """
    cin, cout, g = geom.in_channels, geom.out_channels, geom.groups
    kh, kw = geom.kernel_size
    h, w = int(in_hw[0]), int(in_hw[1])
    ho, wo = geom.out_hw((h, w))
    b = cout if geom.bias else 0
    if method == "dense":
        k = (cin // g) * kh * kw
        return cout * k + b, cout * k * ho * wo
    if method == "ht2":
        r1, r3, r13 = ranks
        p = (r1 * cin, g * r13 * r1 * kh, g * r3 * r13 * kw, cout * r3)
        m = (p[0] * h * w, p[1] * ho * w, p[2] * ho * wo, p[3] * ho * wo)
        return sum(p) + b, sum(m)
    if method == "tucker2":
        r1, r3 = ranks
        p = (r1 * cin, g * r3 * r1 * kh * kw, cout * r3)
        return sum(p) + b, p[0] * h * w + (p[1] + p[2]) * ho * wo
    if method == "svd":
        (r,) = ranks
        p = r * cin + cout * r
        return p + b, p * ho * wo
    raise ValueError(f"unknown decomposition method {method!r}")


class FactorizedConv(nn.Module):
    """Shared machinery: an ordered chain of convs plus geometry of the conv it replaces.

    A subclass names its ``method``, builds its stages (:meth:`_build`) and maps factors to stage
    kernels and back (:meth:`_stage_weights`, :meth:`factors`); decomposing (:meth:`from_conv`),
    loading and rebuilding the dense conv (:meth:`to_dense`) are done here, once for all methods.
    """

    method: str = ""

    def __init__(self, source: nn.Conv2d, ranks: Sequence[int]):
        super().__init__()
        self.ranks = tuple(int(r) for r in ranks)
        self.in_channels, self.out_channels = source.in_channels, source.out_channels
        self.kernel_size = tuple(source.kernel_size)
        self.stride, self.dilation = tuple(source.stride), tuple(source.dilation)
        self.padding = source.padding if isinstance(source.padding, str) else tuple(source.padding)
        self.padding_mode, self.groups = source.padding_mode, source.groups
        self.geometry = ConvGeometry.of(source)
        self._build(source, source.groups, *self.ranks)

    def _build(self, source: nn.Conv2d, g: int, *ranks: int) -> None:  # pragma: no cover - abstract
        """Create the stage convs (for ``g`` groups at :attr:`ranks`) as attributes, in forward order."""
        raise NotImplementedError

    @classmethod
    def from_conv(
        cls,
        conv: nn.Conv2d,
        ranks: RankSpec,
        spectra: KernelSpectra | None = None,
        name: str = "<layer>",
        init: str = "decompose",
    ) -> FactorizedConv:
        """Decompose ``conv`` at ``ranks`` (a tuple in :data:`common.decompose.ranks.RANK_NAMES` order, an int
        or a level) into a layer of this class.

        Args:
            spectra: precomputed :class:`KernelSpectra` of ``conv.weight`` (reused across plans).
            name: the layer's name in error messages.
            init: ``"decompose"`` or ``"empty"`` (right shapes only; for loading a state_dict).
        """
        if init not in ("decompose", "empty"):
            raise ValueError(f"init must be 'decompose' or 'empty', got {init!r}")
        conv = _check_conv(conv, name)
        layer = cls(conv, resolve_ranks(cls.method, group_kernel_shape(conv), ranks, name))
        if init == "decompose":
            spectra = spectra if spectra is not None else KernelSpectra(conv.weight, conv.groups, name)
            layer.load_factors(spectra.decompose(cls.method, layer.ranks), conv.bias)
        return layer

    def stages(self) -> list[nn.Conv2d]:
        return [m for m in self.children() if isinstance(m, nn.Conv2d)]

    def forward(self, x: Tensor) -> Tensor:  # pragma: no cover - abstract
        """The stages in order; each subclass spells its chain out so that ``torch.jit.script`` compiles it."""
        raise NotImplementedError

    def _stage_weights(self, f) -> list[Tensor]:  # pragma: no cover - abstract
        """The factors ``f`` as the kernels of :meth:`stages`, in order (any shape of the same size)."""
        raise NotImplementedError

    def factors(self):  # pragma: no cover - abstract
        """The current stage kernels as factors (``relative_error`` NaN: unknown after finetuning)."""
        raise NotImplementedError

    def load_factors(self, f, bias: Tensor | None) -> None:
        """Set the stage kernels from factors ``f`` (of this layer's ``method`` and ranks) and the bias."""
        last = self.stages()[-1]
        with torch.no_grad():
            for conv, w in zip(self.stages(), self._stage_weights(f)):
                conv.weight.copy_(w.to(conv.weight.dtype).reshape(conv.weight.shape))
            if bias is not None:
                last.bias.copy_(bias)

    def balance(self) -> None:
        """Rescale the stage kernels to the geometric mean of their Frobenius norms; the layer's function
        is unchanged (the chain is linear, the scales multiply to 1, and the bias is the last stage's).

        The decomposition puts a layer's whole scale into one factor (HT-2: ``U1`` and ``U3`` have
        orthonormal columns and the core's ``G2`` carries the singular values), so plain SGD steps move
        the factors at very unequal relative rates; balancing the norms of a factor chain is the usual
        remedy (e.g. Arora et al., *On the optimization of deep networks: implicit acceleration by
        overparameterization*, ICML 2018, on balanced linear chains).
        """
        stages = self.stages()
        with torch.no_grad():
            norms = [float(c.weight.double().norm()) for c in stages]
            if min(norms) <= 0.0 or not all(math.isfinite(n) for n in norms):
                return  # a zero or broken stage has no scale to share
            mean = math.exp(sum(math.log(n) for n in norms) / len(norms))
            for conv, n in zip(stages, norms):
                conv.weight.mul_(mean / n)

    def _split(self, conv: nn.Conv2d, *shape: int) -> Tensor:
        """A stage kernel with a leading group axis: ``(G, *shape)``."""
        return conv.weight.reshape(self.groups, *shape)

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function, from the current factor weights."""
        last = self.stages()[-1]
        dense = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            stride=self.stride,
            padding=self.padding,
            dilation=self.dilation,
            groups=self.groups,
            bias=last.bias is not None,
            padding_mode=self.padding_mode,
            device=last.weight.device,
            dtype=last.weight.dtype,
        )
        with torch.no_grad():
            dense.weight.copy_(self.factors().reconstruct().to(dense.weight.dtype))
            if last.bias is not None:
                dense.bias.copy_(last.bias)
        return dense

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def macs(self, in_hw: Sequence[int]) -> int:
        """Multiply-accumulates per image for an input of spatial size ``in_hw``."""
        return conv_cost(self.method, self.geometry, self.ranks, in_hw)[1]

    def extra_repr(self) -> str:
        names = ",".join(RANK_NAMES[self.method])
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"ranks=({names})={self.ranks}, stride={self.stride}, groups={self.groups}"
        )


class HT2Conv2d(FactorizedConv):
    """HT-2 factorized Conv2d: 1×1 → kh×1 → 1×kw → 1×1 (see module docstring)."""

    method = "ht2"

    def _build(self, source: nn.Conv2d, g: int, r1: int, r3: int, r13: int) -> None:
        self.first = _mixing_stage(source, source.in_channels, g * r1)
        self.vertical = _geometry_stage(source, g * r1, g * r13, axis=0)
        self.horizontal = _geometry_stage(source, g * r13, g * r3, axis=1)
        self.last = _output_stage(source, g * r3)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.horizontal(self.vertical(self.first(x))))

    def _stage_weights(self, f: HT2Factors) -> list[Tensor]:
        return [
            f.u1.transpose(1, 2),  # (G, R1, C)
            f.g1.permute(0, 3, 1, 2),  # (G, R13, R1, kh)
            f.g2.permute(0, 2, 1, 3),  # (G, R3, R13, kw)
            f.u3,
        ]  # (G, T, R3)

    def factors(self) -> HT2Factors:
        r1, r3, r13 = self.ranks
        kh, kw = self.kernel_size
        return HT2Factors(
            self._split(self.first, r1, -1).transpose(1, 2),
            self._split(self.vertical, r13, r1, kh).permute(0, 2, 3, 1),
            self._split(self.horizontal, r3, r13, kw).permute(0, 2, 1, 3),
            self._split(self.last, -1, r3),
            self.ranks,
            math.nan,
        )


class Tucker2Conv2d(FactorizedConv):
    """Tucker-2 factorized Conv2d (Kim et al. 2016): 1×1 C→R1, kh×kw R1→R3, 1×1 R3→T."""

    method = "tucker2"

    def _build(self, source: nn.Conv2d, g: int, r1: int, r3: int) -> None:
        self.first = _mixing_stage(source, source.in_channels, g * r1)
        self.core = _geometry_stage(source, g * r1, g * r3)
        self.last = _output_stage(source, g * r3)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.core(self.first(x)))

    def _stage_weights(self, f: Tucker2Factors) -> list[Tensor]:
        return [f.u1.transpose(1, 2), f.core, f.u3]

    def factors(self) -> Tucker2Factors:
        r1, r3 = self.ranks
        return Tucker2Factors(
            self._split(self.first, r1, -1).transpose(1, 2),
            self._split(self.core, r3, r1, *self.kernel_size),
            self._split(self.last, -1, r3),
            self.ranks,
            math.nan,
        )


class SVDConv2d(FactorizedConv):
    """Rank-R factorized 1×1 Conv2d: 1×1 C→R (carrying stride/padding), then 1×1 R→T (+bias)."""

    method = "svd"

    def _build(self, source: nn.Conv2d, g: int, r: int) -> None:
        self.first = _geometry_stage(source, source.in_channels, g * r)  # the 1×1 kernel's stride and padding
        self.last = _output_stage(source, g * r)

    def forward(self, x: Tensor) -> Tensor:
        return self.last(self.first(x))

    def _stage_weights(self, f: SVDFactors) -> list[Tensor]:
        return [f.first, f.second]

    def factors(self) -> SVDFactors:
        (r,) = self.ranks
        return SVDFactors(self._split(self.first, r, -1), self._split(self.last, -1, r), self.ranks, math.nan)


LAYER_CLASSES: dict[str, type[FactorizedConv]] = {"ht2": HT2Conv2d, "tucker2": Tucker2Conv2d, "svd": SVDConv2d}


def group_kernel_shape(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Per-group kernel shape ``(T/G, C/G, kh, kw)`` that ranks refer to."""
    t, c, kh, kw = conv.weight.shape
    return (t // conv.groups, c, kh, kw)


def balance_factors(model: nn.Module) -> int:
    """:meth:`FactorizedConv.balance` every factorized layer of ``model`` in place; returns how many."""
    layers = [m for m in model.modules() if isinstance(m, FactorizedConv)]
    for layer in layers:
        layer.balance()
    return len(layers)

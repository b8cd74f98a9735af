"""Factorized replacements for ``nn.Conv2d``: HT-2, Tucker-2 and (for 1×1 kernels) SVD.

Each layer is a chain of plain ``nn.Conv2d`` modules built by ``from_conv(conv, ranks)``; ``forward``
runs them in order; ``to_dense()`` rebuilds an equivalent ``nn.Conv2d`` from the *current* factor
weights (so it stays valid after finetuning). Geometry (stride, padding incl. 'same'/'valid' and
asymmetric 'same' for even kernels, dilation, padding_mode, groups, bias) is carried so that at full
rank the output equals the original conv's up to float rounding:

HT-2, for input C and output T channels and a kh×kw kernel::

    1×1   C  -> R1           (no padding: channel mixing commutes with any padding mode)
    kh×1  R1 -> R13          stride (s_h, 1), padding (p_h, 0), dilation (d_h, 1)
    1×kw  R13 -> R3          stride (1, s_w), padding (0, p_w), dilation (1, d_w)
    1×1   R3 -> T  (+bias)

For G groups every stage is a grouped conv with G groups (each group decomposed on its own).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch
from torch import nn

from .ht import HT2Factors, KernelSpectra, SVDFactors, Tucker2Factors
from .ranks import RankSpec, resolve_ranks

Tensor = torch.Tensor


def _pair(v) -> tuple[int, int]:
    return (int(v[0]), int(v[1])) if isinstance(v, (tuple, list)) else (int(v), int(v))


def _conv(cin: int, cout: int, kernel, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups: int = 1,
          bias: bool = False, padding_mode: str = "zeros", like: nn.Conv2d | None = None) -> nn.Conv2d:
    dev = like.weight.device if like is not None else None
    dt = like.weight.dtype if like is not None else None
    # skip_init: the weights are overwritten with factors, and random init costs as much as the copy.
    return torch.nn.utils.skip_init(nn.Conv2d, cin, cout, kernel, stride=stride, padding=padding,
                                    dilation=dilation, groups=groups, bias=bias, padding_mode=padding_mode,
                                    device=dev, dtype=dt)


def _split_padding(padding, axis: int):
    """Padding for a stage that convolves along one axis only (0 = H, 1 = W)."""
    if isinstance(padding, str):
        return padding  # 'same'/'valid' act per axis, and a size-1 axis gets no padding
    p = _pair(padding)
    return (p[0], 0) if axis == 0 else (0, p[1])


def _check_conv(conv: nn.Module, name: str) -> nn.Conv2d:
    if not isinstance(conv, nn.Conv2d):
        raise TypeError(f"layer {name!r}: expected nn.Conv2d, got {type(conv).__name__}")
    return conv


def _set(conv: nn.Conv2d, weight: Tensor) -> None:
    with torch.no_grad():
        conv.weight.copy_(weight.to(conv.weight.dtype).reshape(conv.weight.shape))


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
    def of(cls, conv: nn.Conv2d) -> "ConvGeometry":
        pad = conv.padding if isinstance(conv.padding, str) else tuple(conv.padding)
        return cls(conv.in_channels, conv.out_channels, tuple(conv.kernel_size), tuple(conv.stride), pad,
                   tuple(conv.dilation), conv.groups, conv.bias is not None)

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


class _Factorized(nn.Module):
    """Shared machinery: an ordered chain of convs plus geometry of the conv it replaces."""

    method: str = ""

    def __init__(self, ranks: tuple[int, ...], source: nn.Conv2d):
        super().__init__()
        self.ranks = tuple(int(r) for r in ranks)
        self.in_channels, self.out_channels = source.in_channels, source.out_channels
        self.kernel_size = tuple(source.kernel_size)
        self.stride, self.dilation = tuple(source.stride), tuple(source.dilation)
        self.padding = source.padding if isinstance(source.padding, str) else tuple(source.padding)
        self.padding_mode, self.groups = source.padding_mode, source.groups
        self.geometry = ConvGeometry.of(source)

    def stages(self) -> list[nn.Conv2d]:
        return [m for m in self.children() if isinstance(m, nn.Conv2d)]

    def forward(self, x: Tensor) -> Tensor:
        for conv in self.stages():
            x = conv(x)
        return x

    def reconstruct_weight(self) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def to_dense(self) -> nn.Conv2d:
        """An ``nn.Conv2d`` computing the same function, from the current factor weights."""
        last = self.stages()[-1]
        dense = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, stride=self.stride,
                          padding=self.padding, dilation=self.dilation, groups=self.groups,
                          bias=last.bias is not None, padding_mode=self.padding_mode,
                          device=last.weight.device, dtype=last.weight.dtype)
        with torch.no_grad():
            dense.weight.copy_(self.reconstruct_weight().to(dense.weight.dtype))
            if last.bias is not None:
                dense.bias.copy_(last.bias)
        return dense

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def macs(self, in_hw: Sequence[int]) -> int:
        """Multiply-accumulates per image for an input of spatial size ``in_hw``."""
        return conv_cost(self.method, self.geometry, self.ranks, in_hw)[1]

    def extra_repr(self) -> str:
        names = {"ht2": "R1,R3,R13", "tucker2": "R1,R3", "svd": "R"}[self.method]
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"ranks=({names})={self.ranks}, stride={self.stride}, groups={self.groups}")


class HT2Conv2d(_Factorized):
    """HT-2 factorized Conv2d: 1×1 → kh×1 → 1×kw → 1×1 (see module docstring)."""

    method = "ht2"

    def __init__(self, source: nn.Conv2d, ranks: Sequence[int]):
        super().__init__(tuple(ranks), source)
        r1, r3, r13 = self.ranks
        g = source.groups
        kh, kw = source.kernel_size
        self.first = _conv(source.in_channels, g * r1, 1, groups=g, like=source)
        self.vertical = _conv(g * r1, g * r13, (kh, 1), stride=(source.stride[0], 1),
                              padding=_split_padding(source.padding, 0), dilation=(source.dilation[0], 1),
                              groups=g, padding_mode=source.padding_mode, like=source)
        self.horizontal = _conv(g * r13, g * r3, (1, kw), stride=(1, source.stride[1]),
                                padding=_split_padding(source.padding, 1), dilation=(1, source.dilation[1]),
                                groups=g, padding_mode=source.padding_mode, like=source)
        self.last = _conv(g * r3, source.out_channels, 1, groups=g, bias=source.bias is not None, like=source)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: RankSpec, spectra: KernelSpectra | None = None,
                  name: str = "<layer>", init: str = "decompose") -> "HT2Conv2d":
        """Decompose ``conv`` at ``ranks`` ((R1, R3, R13), int or level) into an HT-2 layer.

        Args:
            spectra: precomputed :class:`KernelSpectra` of ``conv.weight`` (reused across plans).
            init: ``"decompose"`` or ``"empty"`` (right shapes only; for loading a state_dict).
        """
        conv = _check_conv(conv, name)
        shape = _group_kernel_shape(conv)
        layer = cls(conv, resolve_ranks("ht2", shape, ranks, name))
        if init == "decompose":
            spectra = spectra if spectra is not None else KernelSpectra(conv.weight, conv.groups, name)
            layer.load_factors(spectra.ht2(layer.ranks), conv.bias)
        return layer

    def load_factors(self, f: HT2Factors, bias: Tensor | None) -> None:
        _set(self.first, f.u1.transpose(1, 2))                              # (G, R1, C)
        _set(self.vertical, f.g1.permute(0, 3, 1, 2))                        # (G, R13, R1, kh)
        _set(self.horizontal, f.g2.permute(0, 2, 1, 3))                      # (G, R3, R13, kw)
        _set(self.last, f.u3)                                                # (G, T, R3)
        if bias is not None:
            with torch.no_grad():
                self.last.bias.copy_(bias)

    def reconstruct_weight(self) -> Tensor:
        g = self.groups
        r1, r3, r13 = self.ranks
        kh, kw = self.kernel_size
        u1 = self.first.weight.reshape(g, r1, -1)                 # (G, R1, C)
        g1 = self.vertical.weight.reshape(g, r13, r1, kh)         # (G, R13, R1, kh)
        g2 = self.horizontal.weight.reshape(g, r3, r13, kw)       # (G, R3, R13, kw)
        u3 = self.last.weight.reshape(g, -1, r3)                  # (G, T, R3)
        w = torch.einsum("gac,grai,gbrj,gtb->gtcij", u1, g1, g2, u3)
        return w.reshape(-1, *w.shape[2:])


class Tucker2Conv2d(_Factorized):
    """Tucker-2 factorized Conv2d (Kim et al. 2016): 1×1 C→R1, kh×kw R1→R3, 1×1 R3→T."""

    method = "tucker2"

    def __init__(self, source: nn.Conv2d, ranks: Sequence[int]):
        super().__init__(tuple(ranks), source)
        r1, r3 = self.ranks
        g = source.groups
        self.first = _conv(source.in_channels, g * r1, 1, groups=g, like=source)
        self.core = _conv(g * r1, g * r3, source.kernel_size, stride=source.stride, padding=source.padding,
                          dilation=source.dilation, groups=g, padding_mode=source.padding_mode, like=source)
        self.last = _conv(g * r3, source.out_channels, 1, groups=g, bias=source.bias is not None, like=source)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: RankSpec, spectra: KernelSpectra | None = None,
                  name: str = "<layer>", init: str = "decompose") -> "Tucker2Conv2d":
        """Decompose ``conv`` at ``ranks`` ((R1, R3), int or level) into a Tucker-2 layer."""
        conv = _check_conv(conv, name)
        layer = cls(conv, resolve_ranks("tucker2", _group_kernel_shape(conv), ranks, name))
        if init == "decompose":
            spectra = spectra if spectra is not None else KernelSpectra(conv.weight, conv.groups, name)
            layer.load_factors(spectra.tucker2(layer.ranks), conv.bias)
        return layer

    def load_factors(self, f: Tucker2Factors, bias: Tensor | None) -> None:
        _set(self.first, f.u1.transpose(1, 2))
        _set(self.core, f.core)
        _set(self.last, f.u3)
        if bias is not None:
            with torch.no_grad():
                self.last.bias.copy_(bias)

    def reconstruct_weight(self) -> Tensor:
        g = self.groups
        r1, r3 = self.ranks
        kh, kw = self.kernel_size
        u1 = self.first.weight.reshape(g, r1, -1)
        core = self.core.weight.reshape(g, r3, r1, kh, kw)
        u3 = self.last.weight.reshape(g, -1, r3)
        w = torch.einsum("gac,gbaij,gtb->gtcij", u1, core, u3)
        return w.reshape(-1, *w.shape[2:])


class SVDConv2d(_Factorized):
    """Rank-R factorized 1×1 Conv2d: 1×1 C→R (carrying stride/padding), then 1×1 R→T (+bias)."""

    method = "svd"

    def __init__(self, source: nn.Conv2d, ranks: Sequence[int]):
        super().__init__(tuple(ranks), source)
        (r,) = self.ranks
        g = source.groups
        self.first = _conv(source.in_channels, g * r, 1, stride=source.stride, padding=source.padding,
                           dilation=source.dilation, groups=g, padding_mode=source.padding_mode, like=source)
        self.last = _conv(g * r, source.out_channels, 1, groups=g, bias=source.bias is not None, like=source)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, ranks: RankSpec, spectra: KernelSpectra | None = None,
                  name: str = "<layer>", init: str = "decompose") -> "SVDConv2d":
        """Factorize a 1×1 ``conv`` at rank ``ranks`` ((R,), int or level)."""
        conv = _check_conv(conv, name)
        layer = cls(conv, resolve_ranks("svd", _group_kernel_shape(conv), ranks, name))
        if init == "decompose":
            spectra = spectra if spectra is not None else KernelSpectra(conv.weight, conv.groups, name)
            layer.load_factors(spectra.svd(layer.ranks), conv.bias)
        return layer

    def load_factors(self, f: SVDFactors, bias: Tensor | None) -> None:
        _set(self.first, f.first)
        _set(self.last, f.second)
        if bias is not None:
            with torch.no_grad():
                self.last.bias.copy_(bias)

    def reconstruct_weight(self) -> Tensor:
        g = self.groups
        (r,) = self.ranks
        first = self.first.weight.reshape(g, r, -1)
        second = self.last.weight.reshape(g, -1, r)
        return (second @ first).reshape(-1, first.shape[-1], 1, 1)


LAYER_CLASSES: dict[str, type[_Factorized]] = {"ht2": HT2Conv2d, "tucker2": Tucker2Conv2d, "svd": SVDConv2d}
FactorizedConv = _Factorized


def _group_kernel_shape(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    t, c, kh, kw = conv.weight.shape
    return (t // conv.groups, c, kh, kw)


def group_kernel_shape(conv: nn.Conv2d) -> tuple[int, int, int, int]:
    """Per-group kernel shape ``(T/G, C/G, kh, kw)`` that ranks refer to."""
    return _group_kernel_shape(conv)

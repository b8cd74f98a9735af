"""Tests for common.decompose.layers: factorized Conv2d replacements (HT-2, Tucker-2, SVD).

The oracle for every layer is a dense ``nn.Conv2d`` with the original geometry whose weight is the
reconstructed kernel; at full rank that is the original conv itself.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from common.decompose.ht import KernelSpectra
from common.decompose.layers import (
    LAYER_CLASSES,
    ConvGeometry,
    HT2Conv2d,
    SVDConv2d,
    Tucker2Conv2d,
    balance_factors,
    group_kernel_shape,
)
from common.decompose.ranks import full_ranks

PROFILE = settings.get_profile("ht2-tests")
PADDING_MODES = ("zeros", "reflect", "replicate", "circular")
# PyTorch's note that 'same' with an even kernel copies the input: expected, not a problem here
pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"), pytest.mark.one_thread]


@st.composite
def conv_cases(draw, max_per_group: int = 5):
    """(conv, input) with random geometry that PyTorch accepts; seeded weights and input."""
    kind = draw(st.sampled_from(["plain", "plain", "grouped", "depthwise"]))
    if kind == "plain":
        groups, c, t = 1, draw(st.integers(1, 8)), draw(st.integers(1, 8))
    elif kind == "grouped":
        groups = draw(st.integers(2, 4))
        c = groups * draw(st.integers(1, max_per_group))
        t = groups * draw(st.integers(1, max_per_group))
    else:
        groups = c = draw(st.integers(2, 6))
        t = c * draw(st.integers(1, 2))  # depth multiplier 1 or 2
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    pad_kind = draw(st.sampled_from(["int", "tuple", "same", "valid"]))
    if pad_kind == "same":  # PyTorch allows 'same' only with stride 1
        stride, padding = (1, 1), "same"
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = {
            "int": lambda: draw(st.integers(0, 3)),
            "tuple": lambda: (draw(st.integers(0, 3)), draw(st.integers(0, 3))),
            "valid": lambda: "valid",
        }[pad_kind]()
    mode = draw(st.sampled_from(PADDING_MODES))
    bias = draw(st.booleans())
    # per-side padding each axis gets, so that reflect/circular pad less than the input size
    if padding == "same":
        side = [(d * (k - 1) + 1) // 2 for d, k in zip(dilation, (kh, kw))]
    elif padding == "valid":
        side = [0, 0]
    else:
        side = list(padding) if isinstance(padding, tuple) else [padding, padding]
    hw = []
    for ax, k in enumerate((kh, kw)):
        span = dilation[ax] * (k - 1) + 1
        lo = max(1, span - 2 * side[ax], side[ax] + 1)
        hw.append(draw(st.integers(lo, lo + 5)))
    seed = draw(st.integers(0, 2**31 - 1))
    torch.manual_seed(seed)
    conv = nn.Conv2d(
        c, t, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias, padding_mode=mode
    )
    with torch.no_grad():  # biases as large as the weights, so a lost bias is visible
        if bias:
            conv.bias.normal_()
    x = torch.randn(2, c, *hw)
    return conv, x


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).detach().norm() / b.detach().norm().clamp_min(1e-12))


def _methods(conv: nn.Conv2d) -> list[str]:
    return ["ht2", "tucker2"] + (["svd"] if tuple(conv.kernel_size) == (1, 1) else [])


def _oracle(conv: nn.Conv2d, weight: torch.Tensor) -> nn.Conv2d:
    """The original conv with its kernel replaced: dense reference for a factorized layer."""
    dense = copy.deepcopy(conv)
    with torch.no_grad():
        dense.weight.copy_(weight.to(dense.weight.dtype))
    return dense


def _random_ranks(method: str, shape, data) -> tuple[int, ...]:
    t, c, kh, kw = shape
    if method == "svd":
        return (data.draw(st.integers(1, min(c, t))),)
    r1, r3 = data.draw(st.integers(1, c)), data.draw(st.integers(1, t))
    if method == "tucker2":
        return (r1, r3)
    return (r1, r3, data.draw(st.integers(1, min(r1 * kh, r3 * kw))))


@settings(PROFILE, max_examples=150)
@given(conv_cases())
def test_full_rank_matches_original_conv(case):
    conv, x = case
    with torch.no_grad():
        y = conv(x)
        for method in _methods(conv):
            layer = LAYER_CLASSES[method].from_conv(conv, full_ranks(method, group_kernel_shape(conv)))
            out = layer(x)
            assert out.shape == y.shape, method
            assert _rel(out, y) <= 1e-4, (method, conv)
            assert _rel(layer.to_dense()(x), y) <= 1e-4, (method, conv)


@settings(PROFILE, max_examples=100)
@given(conv_cases(), st.data())
def test_truncated_layer_matches_dense_oracle(case, data):
    conv, x = case
    shape = group_kernel_shape(conv)
    sp = KernelSpectra(conv.weight, conv.groups, "c")
    with torch.no_grad():
        for method in _methods(conv):
            ranks = _random_ranks(method, shape, data)
            f = sp.decompose(method, ranks)
            layer = LAYER_CLASSES[method].from_conv(conv, ranks, spectra=sp)
            assert layer.ranks == ranks and layer.method == method
            # the layer holds exactly the factors, and reads them back (the inverse of load_factors)
            back = layer.factors()
            assert type(back) is type(f) and back.ranks == f.ranks
            for fld in dataclasses.fields(f):
                if fld.name not in ("ranks", "relative_error"):
                    torch.testing.assert_close(
                        getattr(back, fld.name), getattr(f, fld.name).float(), atol=1e-6, rtol=1e-5
                    )
            torch.testing.assert_close(back.reconstruct(), f.reconstruct().float(), atol=1e-5, rtol=1e-4)
            y_ref = _oracle(conv, f.reconstruct())(x)
            out = layer(x)
            scale = float(y_ref.norm()) + float(conv(x).norm())
            assert float((out - y_ref).norm()) <= 1e-4 * scale, (method, ranks, conv)
            assert float((layer.to_dense()(x) - out).norm()) <= 1e-4 * scale, (method, ranks, conv)
            # the relative error the factors report is the kernel's, measured directly
            w = conv.weight.double()
            direct = float((w - layer.to_dense().weight.double()).norm() / w.norm())
            assert abs(f.relative_error - direct) <= 1e-5


@settings(PROFILE, max_examples=40)
@given(conv_cases(), st.data())
def test_to_dense_tracks_finetuned_factors(case, data):
    """After the factors move (finetuning), to_dense still computes the factorized forward."""
    conv, x = case
    for method in _methods(conv):
        layer = LAYER_CLASSES[method].from_conv(conv, _random_ranks(method, group_kernel_shape(conv), data))
        with torch.no_grad():
            for p in layer.parameters():
                p.add_(0.3 * torch.randn_like(p))
            out = layer(x)
            dense = layer.to_dense()
            assert isinstance(dense, nn.Conv2d)
            assert (dense.bias is None) == (conv.bias is None)
            assert float((dense(x) - out).norm()) <= 1e-4 * max(float(out.norm()), 1e-6), (method, conv)


@settings(PROFILE, max_examples=60)
@given(conv_cases(), st.data())
def test_balance_keeps_the_function_and_equalizes_the_factor_norms(case, data):
    """Balanced factors (a finetuning option) compute the same layer: outputs equal to float tolerance,
    the stage norms all equal to their old geometric mean, the bias untouched."""
    conv, x = case
    for method in _methods(conv):
        layer = LAYER_CLASSES[method].from_conv(conv, _random_ranks(method, group_kernel_shape(conv), data))
        with torch.no_grad():
            before = layer(x)
            norms = torch.tensor([float(c.weight.double().norm()) for c in layer.stages()], dtype=torch.float64)
            bias = None if conv.bias is None else layer.stages()[-1].bias.clone()
            assert balance_factors(nn.Sequential(layer)) == 1
            after = layer(x)
            scale = max(float(before.norm()), 1e-6)
            assert float((after - before).norm()) <= 1e-5 * scale, (method, conv)
            balanced = torch.tensor([float(c.weight.double().norm()) for c in layer.stages()], dtype=torch.float64)
            mean = norms.log().mean().exp()
            torch.testing.assert_close(balanced, mean.expand_as(balanced), rtol=1e-5, atol=0)
            if bias is not None:
                assert torch.equal(layer.stages()[-1].bias, bias)


def test_from_conv_is_one_classmethod_for_every_layer_class():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 1, bias=True)
    for method, cls in LAYER_CLASSES.items():
        layer = cls.from_conv(conv, 0.5, name="blocks.1")
        assert type(layer) is cls and layer.method == method
        assert layer.ranks == {"ht2": (3, 4, 2), "tucker2": (3, 4), "svd": (3,)}[method]
        empty = cls.from_conv(conv, layer.ranks, init="empty")
        assert [p.shape for p in empty.parameters()] == [p.shape for p in layer.parameters()]
        with pytest.raises(ValueError, match="init"):
            cls.from_conv(conv, 2, init="random")
        with pytest.raises(TypeError, match="blocks.1.*Linear"):
            cls.from_conv(nn.Linear(4, 4), 2, name="blocks.1")
        with pytest.raises(ValueError, match="blocks.1"):
            cls.from_conv(conv, 9, name="blocks.1")
    with pytest.raises(ValueError, match="1x1"):
        SVDConv2d.from_conv(nn.Conv2d(6, 8, 3), 2)


def test_compressed_model_scripts_traces_and_exports_with_equal_outputs():
    """The layers compile as they are: torch.jit.script/trace and torch.export give the eager output."""
    import warnings

    from common.decompose.surgery import LayerPlan, apply_plan
    from tests.helpers import fast_model

    model = fast_model("resnet18")
    plan = {
        "layer1.0.conv1": LayerPlan("ht2", (8, 8, 8)),
        "layer2.0.conv2": LayerPlan("tucker2", (16, 16)),
        "layer2.0.downsample.0": LayerPlan("svd", (16,)),
    }
    compressed = apply_plan(model, plan).eval()
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # torch.jit is deprecated in favour of torch.export
        ref = compressed(x)
        for compiled in (torch.jit.script(compressed), torch.jit.trace(compressed, x)):
            assert torch.equal(compiled(x), ref)
        exported = torch.export.export(compressed, (x,)).module()
        torch.testing.assert_close(exported(x), ref, rtol=0, atol=1e-5)


def test_stage_geometry_ht2():
    conv = nn.Conv2d(
        8, 12, (5, 3), stride=(2, 3), padding=(2, 1), dilation=(1, 2), groups=2, bias=True, padding_mode="reflect"
    )
    layer = HT2Conv2d.from_conv(conv, (3, 4, 5))
    first, vert, hor, last = layer.stages()
    assert (first.in_channels, first.out_channels, first.kernel_size, first.groups) == (8, 6, (1, 1), 2)
    assert (vert.kernel_size, vert.stride, vert.padding, vert.dilation) == ((5, 1), (2, 1), (2, 0), (1, 1))
    assert (vert.in_channels, vert.out_channels, vert.padding_mode) == (6, 10, "reflect")
    assert (hor.kernel_size, hor.stride, hor.padding, hor.dilation) == ((1, 3), (1, 3), (0, 1), (1, 2))
    assert (hor.in_channels, hor.out_channels) == (10, 8)
    assert (last.in_channels, last.out_channels, last.bias is not None) == (8, 12, True)
    assert first.bias is None and vert.bias is None and hor.bias is None
    assert layer.num_params() == 8 * 3 + 2 * 5 * 3 * 5 + 2 * 4 * 5 * 3 + 12 * 4 + 12
    assert "ranks=(R1,R3,R13)=(3, 4, 5)" in repr(layer)


def test_same_padding_even_kernel_is_asymmetric_like_pytorch():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, (4, 2), padding="same", dilation=(1, 3), bias=False)
    x = torch.randn(1, 4, 9, 7)
    for method in ("ht2", "tucker2"):
        layer = LAYER_CLASSES[method].from_conv(conv, full_ranks(method, group_kernel_shape(conv)))
        assert _rel(layer(x), conv(x)) <= 1e-5


def test_float64_layers_keep_dtype_and_are_exact():
    torch.manual_seed(1)
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=True).double()
    x = torch.randn(2, 6, 8, 8, dtype=torch.float64)
    for method in ("ht2", "tucker2"):
        layer = LAYER_CLASSES[method].from_conv(conv, full_ranks(method, group_kernel_shape(conv)))
        assert all(p.dtype == torch.float64 for p in layer.parameters())
        # the factors' precision is set by the float32 products of the spectra, not the layer dtype
        assert _rel(layer(x), conv(x)) <= 1e-6
        assert layer.to_dense().weight.dtype == torch.float64


def test_init_empty_builds_shapes_only_and_loads_state_dict():
    torch.manual_seed(2)
    conv = nn.Conv2d(6, 10, 3, padding=1, bias=True)
    full = HT2Conv2d.from_conv(conv, (4, 5, 6))
    empty = HT2Conv2d.from_conv(conv, (4, 5, 6), init="empty")
    assert [p.shape for p in empty.parameters()] == [p.shape for p in full.parameters()]
    empty.load_state_dict(full.state_dict())
    x = torch.randn(1, 6, 8, 8)
    assert torch.equal(empty(x), full(x))


def test_level_and_int_rank_specs():
    conv = nn.Conv2d(16, 32, 3, padding=1)
    assert HT2Conv2d.from_conv(conv, 0.5).ranks == (8, 16, 12)
    assert HT2Conv2d.from_conv(conv, 4).ranks == (4, 4, 4)
    assert Tucker2Conv2d.from_conv(conv, 1.0).ranks == (16, 32)
    assert SVDConv2d.from_conv(nn.Conv2d(16, 32, 1), 0.25).ranks == (4,)


@pytest.mark.parametrize(
    "cls,ranks,rank_name,rng",
    [
        (HT2Conv2d, (9, 4, 4), "R1", "[1, 8]"),
        (HT2Conv2d, (4, 4, 13), "R13", "[1, 12]"),
        (Tucker2Conv2d, (4, 0), "R3", "[1, 16]"),
    ],
)
def test_bad_ranks_name_layer_rank_and_range(cls, ranks, rank_name, rng):
    conv = nn.Conv2d(8, 16, 3)
    with pytest.raises(ValueError) as e:
        cls.from_conv(conv, ranks, name="layer2.0.conv1")
    assert "layer2.0.conv1" in str(e.value) and f"{rank_name}=" in str(e.value) and rng in str(e.value)


def test_bad_inputs_name_layer():
    with pytest.raises(ValueError, match=r"layer4\.1\.conv2.*1x1"):
        SVDConv2d.from_conv(nn.Conv2d(8, 16, 3), (2,), name="layer4.1.conv2")
    with pytest.raises(TypeError, match="fc.*Linear"):
        HT2Conv2d.from_conv(nn.Linear(4, 4), (1, 1, 1), name="fc")
    conv = nn.Conv2d(4, 4, 3)
    with torch.no_grad():
        conv.weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"features\.0.*non-finite"):
        HT2Conv2d.from_conv(conv, (2, 2, 2), name="features.0")


def test_geometry_out_hw_matches_pytorch():
    cases = [
        dict(kernel_size=(3, 5), stride=(2, 1), padding=(1, 2), dilation=(2, 1)),
        dict(kernel_size=(4, 4), padding="same", dilation=(2, 3)),
        dict(kernel_size=(7, 1), stride=(3, 2), padding="valid"),
    ]
    for kw in cases:
        conv = nn.Conv2d(2, 3, **kw)
        x = torch.zeros(1, 2, 23, 17)
        assert ConvGeometry.of(conv).out_hw((23, 17)) == tuple(conv(x).shape[-2:]), kw


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_full_rank_ht2_on_cuda_matches():
    torch.manual_seed(0)
    conv = nn.Conv2d(32, 48, (3, 5), stride=(1, 2), padding=(1, 2), groups=2, bias=True, padding_mode="reflect").cuda()
    x = torch.randn(4, 32, 20, 20, device="cuda")
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # exact fp32
    try:
        with torch.no_grad():
            y = conv(x)
            for method in ("ht2", "tucker2"):
                layer = LAYER_CLASSES[method].from_conv(conv, full_ranks(method, group_kernel_shape(conv)))
                assert all(p.device.type == "cuda" for p in layer.parameters())
                assert _rel(layer(x), y) <= 1e-4, method
                assert _rel(layer.to_dense()(x), y) <= 1e-4, method
                assert layer.to_dense().weight.device.type == "cuda"
            conv1 = nn.Conv2d(32, 16, 1).cuda()
            svd = SVDConv2d.from_conv(conv1, (16,))
            assert _rel(svd(x), conv1(x)) <= 1e-4
            # bf16 autocast runs the factorized chain and stays close to the fp32 result
            layer = HT2Conv2d.from_conv(conv, full_ranks("ht2", group_kernel_shape(conv)))
            with torch.autocast("cuda", dtype=torch.bfloat16):
                out = layer(x)
            assert out.dtype == torch.bfloat16 and _rel(out.float(), y) <= 3e-2
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old

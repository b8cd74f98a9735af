"""Tests for common.decompose.cost and the layer cost formula (common.decompose.layers.conv_cost).

The oracle for MACs is PyTorch's ``torch.utils.flop_counter.FlopCounterMode`` (FLOPs / 2), for
parameters ``sum(p.numel())``, and for the shared baselines their manifest.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from common.decompose.cost import count_model, flop_counter_macs
from common.decompose.layers import LAYER_CLASSES, ConvGeometry, FactorizedConv, conv_cost, group_kernel_shape
from common.decompose.ranks import ranks_from_level
from common.decompose.surgery import LayerPlan, apply_plan, list_conv_layers
from common.paths import CHECKPOINT_DIR
from common.search.space import SearchSpace
from tests.helpers import fast_model

PROFILE = settings.get_profile("ht2-tests")
CIFAR = ("resnet18", "vgg16", "alexnet")
MANIFEST = CHECKPOINT_DIR / "manifest.json"
pytestmark = [pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning"), pytest.mark.one_thread]


def ht2_plan(m: nn.Module, level: float) -> dict[str, LayerPlan]:
    """HT-2 at ``level`` (multiple 8) on every eligible k×k conv, SVD on every 1×1 conv."""
    plan = {}
    for info in list_conv_layers(m):
        if info.eligible:
            method = "svd" if info.kernel_size == (1, 1) else "ht2"
            plan[info.name] = LayerPlan(method, ranks_from_level(method, info.group_shape, level, multiple=8))
    return plan


def layer_flops_macs(module: nn.Module, x: torch.Tensor) -> int:
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        module(x)
    return fc.get_total_flops() // 2 // x.shape[0]


@pytest.fixture(scope="module", params=CIFAR)
def dense_and_compressed(request):
    m = fast_model(request.param)
    plan = ht2_plan(m, 0.5)
    # Costs do not depend on the weights: the big models skip the decomposition (init="empty", then
    # zeros so the forward is deterministic); alexnet goes through the full decomposition path.
    if request.param == "alexnet":
        return request.param, m, plan, apply_plan(m, plan)
    c = apply_plan(m, plan, init="empty")
    with torch.no_grad():
        for mod in c.modules():
            if isinstance(mod, FactorizedConv):
                for p in mod.parameters():
                    p.zero_()
    return request.param, m, plan, c


def test_count_model_matches_flop_counter(dense_and_compressed):
    name, m, plan, c = dense_and_compressed
    for model in (m, c):
        cost = count_model(model)
        assert cost.macs == flop_counter_macs(model)
        assert cost.params == sum(p.numel() for p in model.parameters())
        assert cost.conv_macs < cost.macs and cost.conv_params < cost.params
        # batch size does not change per-image counts
        assert count_model(model, (3, 3, 32, 32)).macs == cost.macs == flop_counter_macs(model, (3, 3, 32, 32))
    dense, comp = count_model(m), count_model(c)
    assert any(lp.method == "ht2" for lp in plan.values())
    assert comp.macs < dense.macs and comp.params < dense.params
    # the search space's budget arithmetic on the dense model's listing predicts the compressed model's
    # conv costs (min_channels=1: the stem is compressed too)
    space = SearchSpace(list_conv_layers(m), min_channels=1)
    assert space.cost(plan) == (comp.conv_params, comp.conv_macs)
    assert space.cost({}) == (dense.conv_params, dense.conv_macs)
    assert set(dense.to_dict()) == {"params", "macs", "conv_params", "conv_macs"}


def test_per_layer_macs_match_hooks_and_flop_counter(dense_and_compressed):
    name, m, plan, c = dense_and_compressed
    infos = {i.name: i for i in list_conv_layers(m)}
    per_layer = count_model(c).per_layer
    n_checked = 0
    for lname, layer in c.named_modules():
        if not isinstance(layer, FactorizedConv):
            continue
        info = infos[lname]
        hooked = sum(mac for n, (_, mac) in per_layer.items() if n.startswith(lname + "."))
        x = torch.zeros(1, info.weight_shape[1] * info.groups, *info.in_hw)
        assert layer.macs(info.in_hw) == hooked == layer_flops_macs(layer, x), lname
        assert layer.num_params() == info.cost(layer.method, layer.ranks)[0], lname
        assert layer.macs(info.in_hw) == info.cost(layer.method, layer.ranks)[1], lname
        n_checked += 1
    assert n_checked == len(plan)


@pytest.mark.skipif(not MANIFEST.is_file(), reason="../shared/checkpoints manifest absent")
@pytest.mark.parametrize("name", CIFAR)
def test_dense_counts_equal_manifest(name):
    from common.models import manifest

    info = manifest()["models"][name]
    cost = count_model(fast_model(name))
    assert cost.params == info["params"]
    assert cost.macs == info["macs_per_image"]
    assert cost.conv_macs == info["conv_macs_per_image"]
    assert cost.conv_params == info["conv_params"]


def test_linear_on_token_inputs():
    """Linear layers applied to (B, N, F) inputs count N rows per image, as the flop counter does."""

    class Tokens(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
            self.proj = nn.Linear(8, 16)
            self.head = nn.Linear(16, 5)

        def forward(self, x):
            t = self.conv(x).flatten(2).transpose(1, 2)  # (B, N, 8)
            return self.head(self.proj(t).mean(1))

    m = Tokens()
    for batch in (1, 4):
        cost = count_model(m, (batch, 3, 16, 16))
        assert cost.macs == flop_counter_macs(m, (batch, 3, 16, 16))
        assert cost.per_layer["proj"] == (8 * 16 + 16, 64 * 8 * 16)
        assert cost.per_layer["conv"][1] == 64 * 8 * 27


@st.composite
def geometries(draw):
    groups = draw(st.sampled_from([1, 1, 2, 3]))
    c, t = groups * draw(st.integers(1, 6)), groups * draw(st.integers(1, 6))
    kh, kw = draw(st.integers(1, 7)), draw(st.integers(1, 7))
    dilation = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    if draw(st.booleans()):
        stride, padding = (1, 1), draw(st.sampled_from(["same", "valid"]))
    else:
        stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        padding = (draw(st.integers(0, 3)), draw(st.integers(0, 3)))
    bias = draw(st.booleans())
    span = [d * (k - 1) + 1 for d, k in zip(dilation, (kh, kw))]
    hw = [draw(st.integers(max(1, s), s + 8)) for s in span]
    conv = nn.Conv2d(c, t, (kh, kw), stride=stride, padding=padding, dilation=dilation, groups=groups, bias=bias)
    return conv, tuple(hw)


@settings(PROFILE, max_examples=60)
@given(geometries(), st.data())
def test_conv_cost_matches_flop_counter_for_every_method(case, data):
    conv, hw = case
    x = torch.zeros(1, conv.in_channels, *hw)
    geom = ConvGeometry.of(conv)
    with torch.no_grad():
        out_hw = tuple(conv(x).shape[-2:])
    assert geom.out_hw(hw) == out_hw
    params, macs = conv_cost("dense", geom, (), hw)
    assert params == sum(p.numel() for p in conv.parameters())
    assert macs == layer_flops_macs(conv, x)
    t, c, kh, kw = group_kernel_shape(conv)
    methods = ["ht2", "tucker2"] + (["svd"] if kh * kw == 1 else [])
    for method in methods:
        r1, r3 = data.draw(st.integers(1, c)), data.draw(st.integers(1, t))
        ranks = {
            "ht2": (r1, r3, data.draw(st.integers(1, min(r1 * kh, r3 * kw)))),
            "tucker2": (r1, r3),
            "svd": (min(r1, r3),),
        }[method]
        layer = LAYER_CLASSES[method].from_conv(conv, ranks, init="empty")
        p, mac = conv_cost(method, geom, ranks, hw)
        assert p == layer.num_params() == sum(q.numel() for q in layer.parameters()), (method, ranks)
        assert mac == layer.macs(hw) == layer_flops_macs(layer, x), (method, ranks, conv)

"""Tests for common.decompose.surgery: listing conv layers, applying rank plans, plan JSON round trips.

Models are built on the ``meta`` device and then materialized on the CPU with each module's own
``reset_parameters`` (same architecture and init scheme as ``build_model``, but without paying for
the 120M-parameter VGG classifier that the CIFAR variant replaces).
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from common.decompose.layers import HT2Conv2d, SVDConv2d, Tucker2Conv2d, group_kernel_shape
from common.decompose.ranks import full_ranks, ranks_from_level
from common.decompose.surgery import (
    LayerPlan,
    SpectraCache,
    apply_plan,
    list_conv_layers,
    plan_from_dict,
    plan_to_dict,
    validate_plan,
)
from common.models import build_model
from tests.helpers import fast_model

CIFAR_CONVS = {"resnet18": 20, "vgg16": 13, "alexnet": 5}
IMAGENET_CONVS = {"resnet18_imagenet": 20, "vgg16_imagenet": 13, "alexnet_imagenet": 5, "mobilenet_v2_imagenet": 52}
pytestmark = pytest.mark.one_thread


_MODELS: dict[str, nn.Module] = {}


def model(name: str) -> nn.Module:
    """A shared read-only model per name (tests that mutate must copy or build their own)."""
    if name not in _MODELS:
        _MODELS[name] = fast_model(name)
    return _MODELS[name]


def snapshot(m: nn.Module) -> tuple[dict, list]:
    """State (cloned tensors) and module structure, to prove a model was left untouched."""
    return (
        {k: v.detach().clone() for k, v in m.state_dict().items()},
        [(n, type(x).__name__, id(x)) for n, x in m.named_modules()],
    )


def assert_unchanged(m: nn.Module, snap: tuple[dict, list]) -> None:
    sd, mods = snap
    now = m.state_dict()
    assert list(now) == list(sd)
    for k, v in sd.items():
        assert torch.equal(now[k].nan_to_num(), v.nan_to_num()) and now[k].isnan().eq(v.isnan()).all(), k
    assert [(n, type(x).__name__, id(x)) for n, x in m.named_modules()] == mods


def hooked_convs(m: nn.Module, size: int) -> list[tuple[str, nn.Conv2d, tuple, tuple]]:
    """Independent oracle: (name, conv, input shape, output shape) in call order."""
    seen = []
    hooks = [
        c.register_forward_hook(lambda mod, i, o, n=n: seen.append((n, mod, tuple(i[0].shape), tuple(o.shape))))
        for n, c in m.named_modules()
        if isinstance(c, nn.Conv2d)
    ]
    p = next(m.parameters())
    with torch.no_grad():
        m(torch.zeros(1, 3, size, size, device=p.device))
    for h in hooks:
        h.remove()
    return seen


def level_plan(m: nn.Module, level: float, size: int = 32, method: str = "ht2") -> dict[str, LayerPlan]:
    """``method`` at ``level`` on every eligible k×k conv and SVD on every 1×1 conv."""
    plan = {}
    for info in list_conv_layers(m, (1, 3, size, size)):
        if not info.eligible:
            continue
        meth = "svd" if info.kernel_size == (1, 1) else method
        plan[info.name] = LayerPlan(meth, ranks_from_level(meth, info.group_shape, level, multiple=8))
    return plan


def _check_listing(m: nn.Module, size: int, expected: int):
    infos = list_conv_layers(m, (1, 3, size, size))
    seen = hooked_convs(m, size)
    assert len(infos) == expected == len(seen)
    assert [i.name for i in infos] == [s[0] for s in seen]  # forward order
    for info, (_name, conv, ishape, oshape) in zip(infos, seen):
        assert info.weight_shape == tuple(conv.weight.shape)
        assert info.in_hw == ishape[-2:] and info.out_hw == oshape[-2:]
        assert info.geometry.out_hw(info.in_hw) == info.out_hw
        assert info.params == conv.weight.numel() + (conv.bias.numel() if conv.bias is not None else 0)
        t, cg, kh, kw = conv.weight.shape
        assert info.macs == oshape[1] * oshape[2] * oshape[3] * cg * kh * kw
        assert info.group_shape == group_kernel_shape(conv)
        if info.eligible:
            assert "ht2" in info.eligible and (("svd" in info.eligible) == (kh * kw == 1))
    return {i.name: i for i in infos}


@pytest.mark.parametrize("name", sorted(CIFAR_CONVS))
def test_list_conv_layers_cifar(name):
    m = model(name).train()  # mode is restored afterwards
    try:
        infos = _check_listing(m, 32, CIFAR_CONVS[name])
        assert m.training and all(x.training for x in m.modules())
    finally:
        m.eval()
    assert all(not x._forward_hooks for x in m.modules())
    assert all(i.eligible for i in infos.values())
    first = next(iter(infos.values()))
    assert first.in_hw == (32, 32) and first.weight_shape[1] == 3
    if name == "resnet18":
        assert infos["layer2.0.conv1"].in_hw == (32, 32) and infos["layer2.0.conv1"].out_hw == (16, 16)
        assert infos["layer2.0.downsample.0"].kernel_size == (1, 1)
        assert infos["layer2.0.downsample.0"].eligible[0] == "svd"
        assert infos["layer4.1.conv2"].in_hw == (4, 4)
    if name == "vgg16":
        assert infos["features.40"].in_hw == (2, 2) and infos["features.40"].params == 512 * 512 * 9 + 512
    if name == "alexnet":
        assert infos["features.0"].kernel_size == (5, 5) and infos["features.0"].out_hw == (32, 32)


@pytest.mark.parametrize("name", sorted(IMAGENET_CONVS))
def test_list_conv_layers_imagenet(name):
    # shapes and costs do not depend on weights: the big ones are listed on the meta device
    if name in ("resnet18_imagenet", "mobilenet_v2_imagenet"):
        m = fast_model(name)
    else:
        with torch.device("meta"):
            m = build_model(name).eval()
    infos = _check_listing(m, 224, IMAGENET_CONVS[name])
    first = next(iter(infos.values()))
    assert first.in_hw == (224, 224)
    depthwise = [i for i in infos.values() if i.groups > 1 and i.weight_shape[1] == 1]
    if name == "mobilenet_v2_imagenet":
        assert len(depthwise) == 17
        for i in depthwise:
            assert i.eligible == () and "depthwise" in i.reason
        assert all(i.eligible for i in infos.values() if i not in depthwise)
    else:
        assert not depthwise and all(i.eligible for i in infos.values())
    if name == "resnet18_imagenet":
        assert first.out_hw == (112, 112) and infos["layer4.1.conv2"].in_hw == (7, 7)
    if name == "alexnet_imagenet":
        assert first.kernel_size == (11, 11) and first.out_hw == (55, 55)


def test_apply_plan_returns_copy_and_leaves_original():
    m = fast_model("resnet18")
    snap = snapshot(m)
    plan = level_plan(m, 0.5)
    plan["layer1.0.conv1"] = LayerPlan("tucker2", (16, 16))
    plan["conv1"] = LayerPlan("dense")
    out = apply_plan(m, plan)
    assert out is not m
    assert_unchanged(m, snap)
    assert isinstance(out.layer1[0].conv1, Tucker2Conv2d)
    assert isinstance(out.layer2[0].conv2, HT2Conv2d) and isinstance(out.layer2[0].downsample[0], SVDConv2d)
    assert isinstance(out.conv1, nn.Conv2d) and out.conv1 is not m.conv1
    assert out.layer2[0].conv2.ranks == plan["layer2.0.conv2"].ranks
    # the copy shares no storage with the original
    ptrs = {p.data_ptr() for p in m.parameters()}
    assert not ptrs & {p.data_ptr() for p in out.parameters()}
    with torch.no_grad():
        out.conv1.weight.add_(1.0)
    assert_unchanged(m, snap)
    # only the convs left dense are listed in the compressed model
    assert [i.name for i in list_conv_layers(out)] == ["conv1"]


def test_full_rank_plan_reproduces_model():
    m = fast_model("alexnet", seed=3)
    infos = list_conv_layers(m)
    plan = {i.name: LayerPlan("ht2", full_ranks("ht2", i.group_shape)) for i in infos}
    out = apply_plan(m, plan)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y, y_hat = m(x), out(x)
    assert float((y_hat - y).norm() / y.norm()) <= 1e-4


def test_spectra_cache_reuse_gives_identical_models():
    m = model("alexnet")
    names = [i.name for i in list_conv_layers(m) if i.weight_shape[1] > 3]
    cache = SpectraCache(m).warm(names)
    assert all(n in cache for n in names) and "features.0" not in cache
    x = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    plan = level_plan(m, 0.5)
    with torch.no_grad():
        assert torch.equal(apply_plan(m, plan, spectra=cache)(x), apply_plan(m, plan)(x))
        for level in (0.45, 0.3):  # later plans reuse the cache and match fresh decompositions
            plan = level_plan(m, level)
            assert torch.allclose(apply_plan(m, plan, spectra=cache)(x), apply_plan(m, plan)(x), atol=1e-6)
    assert "features.0" in cache  # filled lazily by the plan
    with pytest.raises(KeyError, match="bn1"):
        cache.get("bn1")


def test_inplace_apply_plan():
    m = fast_model("alexnet")
    plan = level_plan(m, 0.5)
    out = apply_plan(m, plan, inplace=True)
    assert out is m and isinstance(m.features[3], HT2Conv2d)


@pytest.mark.parametrize("name", ["resnet18", "alexnet"])
def test_plan_json_round_trip_rebuilds_identical_model(name, tmp_path):
    torch.manual_seed(4)
    m = build_model(name).eval()
    plan = level_plan(m, 0.5)
    infos = {i.name: i for i in list_conv_layers(m)}
    kxk = [n for n, i in infos.items() if i.kernel_size != (1, 1)]
    plan[kxk[1]] = LayerPlan("tucker2", ranks_from_level("tucker2", infos[kxk[1]].group_shape, 0.4))
    plan[kxk[0]] = LayerPlan("dense")
    compressed = apply_plan(m, plan)
    (tmp_path / "plan.json").write_text(json.dumps({"plan": plan_to_dict(plan)}))
    loaded = plan_from_dict(json.loads((tmp_path / "plan.json").read_text())["plan"])
    assert loaded == plan and list(plan_to_dict(plan)) == sorted(plan)
    rebuilt = apply_plan(build_model(name), loaded, init="empty")
    rebuilt.load_state_dict(compressed.state_dict())
    rebuilt.eval()
    assert [type(x).__name__ for x in rebuilt.modules()] == [type(x).__name__ for x in compressed.modules()]
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(rebuilt(x), compressed(x))


# ----------------------------------------------------------------------------------------------
# Bad input: clear errors, original model unchanged
# ----------------------------------------------------------------------------------------------


def test_unknown_layer_raises_keyerror_listing_valid_names():
    m = fast_model("alexnet")
    snap = snapshot(m)
    plan = {"features.0": LayerPlan("ht2", (2, 8, 8)), "features.99": LayerPlan("ht2", (2, 2, 2))}
    with pytest.raises(KeyError) as e:
        apply_plan(m, plan)
    msg = str(e.value)
    assert "features.99" in msg and "features.0" in msg and "features.10" in msg
    with pytest.raises(KeyError, match="classifier.1"):  # a Linear is not a conv layer
        apply_plan(m, {"classifier.1": LayerPlan("svd", (4,))})
    assert_unchanged(m, snap)


@pytest.mark.parametrize(
    "entry,rank_name,rng",
    [
        (LayerPlan("ht2", (65, 8, 8)), "R1", "[1, 64]"),
        (LayerPlan("ht2", (8, 8, 41)), "R13", "[1, 40]"),
        (LayerPlan("tucker2", (0, 8)), "R1", "[1, 64]"),
    ],
)
def test_out_of_range_ranks_in_plan(entry, rank_name, rng):
    m = fast_model("alexnet")
    snap = snapshot(m)
    plan = {"features.0": LayerPlan("ht2", (2, 8, 8)), "features.3": entry}  # features.3: 64 -> 192, 5x5
    with pytest.raises(ValueError) as e:
        apply_plan(m, plan, inplace=True)
    msg = str(e.value)
    assert "features.3" in msg and f"{rank_name}=" in msg and rng in msg, msg
    assert_unchanged(m, snap)


def test_svd_on_kxk_and_bad_init_in_plan():
    m = fast_model("alexnet")
    snap = snapshot(m)
    with pytest.raises(ValueError, match=r"features\.3.*1x1"):
        apply_plan(m, {"features.3": LayerPlan("svd", (4,))})
    with pytest.raises(ValueError, match="init"):
        apply_plan(m, {"features.3": LayerPlan("ht2", (4, 4, 4))}, init="random")
    assert_unchanged(m, snap)


@pytest.mark.parametrize("inplace", [False, True])
def test_non_finite_weights_raise_naming_layer_and_leave_model(inplace):
    m = fast_model("alexnet")
    with torch.no_grad():
        m.features[6].weight[3, 4, 1, 1] = float("nan")
    snap = snapshot(m)
    plan = level_plan(m, 0.5)  # features.0 and .3 are fine and come first
    with pytest.raises(ValueError, match=r"features\.6.*non-finite"):
        apply_plan(m, plan, inplace=inplace)
    assert_unchanged(m, snap)


def test_plan_entries_as_tuples_and_dicts_are_normalized():
    m = model("alexnet")
    norm = validate_plan(m, {"features.3": ("ht2", (4, 4, 4)), "features.6": {"method": "tucker2", "ranks": [3, 5]}})
    assert norm == {"features.3": LayerPlan("ht2", (4, 4, 4)), "features.6": LayerPlan("tucker2", (3, 5))}
    with pytest.raises(ValueError, match="cp"):
        LayerPlan("cp", (1,))


@pytest.mark.parametrize(
    "text,what",
    [
        ('[["conv1", "ht2"]]', "JSON object"),
        ('{"conv1": "ht2"}', "conv1"),
        ('{"conv1": {"ranks": [1, 2, 3]}}', "conv1"),
        ('{"conv1": {"method": "ht2", "ranks": [1.5, 2, 3]}}', "conv1.*integers"),
        ('{"conv1": {"method": "ht2", "ranks": ["1", 2, 3]}}', "conv1.*integers"),
        ('{"conv1": {"method": "ht2", "ranks": [true, 2, 3]}}', "conv1.*integers"),
        ('{"conv1": {"method": "ht2", "ranks": 3}}', "conv1.*integers"),
        ('{"conv1": {"method": "cp", "ranks": [3]}}', "conv1.*cp"),
    ],
)
def test_malformed_plan_dict_raises_valueerror(text, what):
    with pytest.raises(ValueError, match=what):
        plan_from_dict(json.loads(text))

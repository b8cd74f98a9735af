"""Tests for common.deploy.merge: every partition of a factorized layer computes the layer's function, and
``fastest_latency`` times a model in its fastest deployment.

Oracle: the factorized layer itself (its chain of convs), in float64 so that a wrong merge (lost
bias, wrong padding mode, stride on the wrong axis) stands out from rounding.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from common.decompose.cost import count_model
from common.decompose.layers import LAYER_CLASSES, HT2Conv2d
from common.decompose.surgery import LayerPlan, apply_plan, list_conv_layers
from common.deploy.merge import (
    DeployedChain,
    build_form,
    chain_forms,
    deploy_model,
    fastest_latency,
    form_macs,
    merge_convs,
)
from tests.test_layers import PROFILE, _methods, _random_ranks, _rel, conv_cases

pytestmark = pytest.mark.filterwarnings("ignore:Using padding='same':UserWarning")


def test_chain_forms_enumerates_compositions():
    assert chain_forms(1) == [(1,)]
    assert chain_forms(2) == [(1, 1), (2,)]
    forms = chain_forms(4)
    assert len(forms) == 8 and len(set(forms)) == 8
    assert all(sum(f) == 4 for f in forms)
    assert forms[0] == (1, 1, 1, 1) and forms[-1] == (4,)


@PROFILE
@given(case=conv_cases(), data=st.data())
def test_every_form_matches_the_factorized_layer(case, data):
    conv, x = case
    conv, x = conv.double(), x.double()
    method = data.draw(st.sampled_from(_methods(conv)))
    ranks = _random_ranks(
        method, (conv.out_channels // conv.groups, conv.in_channels // conv.groups, *conv.kernel_size), data
    )
    layer = LAYER_CLASSES[method].from_conv(conv, ranks)
    ref = layer(x)
    hw = x.shape[-2:]
    for form in chain_forms(len(layer.stages())):
        chain = build_form(layer, form)
        assert isinstance(chain, DeployedChain) and len(chain) == len(form)
        assert _rel(chain(x), ref) < 1e-9, (method, ranks, form)
        assert form_macs(layer, form, hw) == count_model(chain, (1, *x.shape[1:])).conv_macs
    # the one-run form is the dense conv rebuilt from the factors
    assert _rel(build_form(layer, (len(layer.stages()),))(x), layer.to_dense()(x)) < 1e-9


def test_merge_refuses_two_spatial_convs_on_one_axis():
    a = nn.Conv2d(4, 4, (3, 1), padding=(1, 0), bias=False)
    b = nn.Conv2d(4, 4, (3, 1), padding=(1, 0), bias=False)
    with pytest.raises(ValueError, match="axis H"):
        merge_convs([a, b])


def test_merge_refuses_inner_bias():
    a = nn.Conv2d(4, 4, 1, bias=True)
    b = nn.Conv2d(4, 4, 3, padding=1, bias=False)
    with pytest.raises(ValueError, match="bias"):
        merge_convs([a, b])


def test_build_form_rejects_a_bad_partition():
    layer = HT2Conv2d.from_conv(nn.Conv2d(8, 8, 3, padding=1), (4, 4, 4))
    with pytest.raises(ValueError, match="does not partition 4 stages"):
        build_form(layer, (2, 1))


def _small_factorized(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(32, 32, (3, 5), padding=(1, 2), padding_mode="reflect"),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(32, 10),
    )
    names = [i.name for i in list_conv_layers(model, (1, 3, 16, 16))]
    plan = {names[1]: LayerPlan("ht2", (8, 16, 8)), names[2]: LayerPlan("tucker2", (16, 8))}
    return apply_plan(model, plan)


@pytest.mark.parametrize("choose", ["macs", "latency"])
def test_deploy_model_is_exact_and_leaves_the_model_alone(choose):
    model = _small_factorized()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    ref = model.eval()(x)
    cache: dict = {}
    deployed, report = deploy_model(
        model, (2, 3, 16, 16), choose=choose, threads=1, warmup=0, iters=1, timing_cache=cache
    )
    assert _rel(deployed(x), ref) < 1e-5
    assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert [r.name for r in report] == ["2", "4"]
    for r in report:
        assert r.form in chain_forms(4 if r.method == "ht2" else 3)
        if choose == "macs":
            assert r.macs <= r.factorized_macs and not r.times_ms
        else:
            assert len(r.times_ms) == len(chain_forms(4 if r.method == "ht2" else 3))
    assert count_model(deployed, (1, 3, 16, 16)).conv_macs == (
        sum(r.macs for r in report) + count_model(model, (1, 3, 16, 16)).per_layer["0"][1]
    )
    if choose == "latency":  # a second call on the same shapes is served from the cache
        n = len(cache)
        deploy_model(model, (2, 3, 16, 16), choose=choose, threads=1, warmup=0, iters=1, timing_cache=cache)
        assert len(cache) == n


def test_deploy_model_rejects_unknown_choice():
    with pytest.raises(ValueError, match="choose"):
        deploy_model(_small_factorized(), choose="fastest")


def _plain_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


def test_fastest_latency_picks_the_faster_format_and_leaves_model_alone():
    m = _plain_model()
    r = fastest_latency(m, (1, 3, 16, 16), threads=1, warmup=1, iters=5)
    assert set(r["per_format"]) == {"contiguous", "channels_last"}
    assert r["median_ms"] == min(r["per_format"].values())
    assert r["channels_last"] == (r["per_format"]["channels_last"] < r["per_format"]["contiguous"])
    assert r["forms"] == {} and not r["deployed"] and r["conv_macs"] == 8 * 3 * 9 * 16 * 16
    assert m[0].weight.is_contiguous()


def test_fastest_latency_deploys_factorized_layers():
    torch.manual_seed(0)
    m = nn.Sequential(HT2Conv2d.from_conv(nn.Conv2d(16, 16, 3, padding=1), (8, 8, 8)))
    r = fastest_latency(m, (1, 16, 8, 8), threads=1, formats=(False,), warmup=1, iters=3, deploy="macs")
    if r["deployed"]:  # else the model as factorized was timed faster, which is allowed
        assert sum(r["forms"].values()) == 1
        form = eval(next(iter(r["forms"])))  # noqa: S307 - a tuple repr written by deploy
        assert sum(form) == 4
    else:
        assert r["forms"] == {} and r["conv_macs"] == m[0].macs((8, 8))
    fact = r["factorized"]  # the best as-factorized candidate, from the same timings
    assert fact["forms"] == {} and not fact["deployed"] and fact["conv_macs"] == m[0].macs((8, 8))
    assert r["median_ms"] <= fact["median_ms"]
    keep = fastest_latency(m, (1, 16, 8, 8), threads=1, formats=(False,), warmup=1, iters=3, deploy=None)
    assert keep["forms"] == {} and keep["conv_macs"] == m[0].macs((8, 8))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_deploy_model_cuda_bf16_graph():
    model = _small_factorized()
    x = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    ref = model.eval()(x)
    deployed, report = deploy_model(
        model,
        (8, 3, 16, 16),
        device="cuda",
        dtype=torch.bfloat16,
        channels_last=True,
        cuda_graph=True,
        warmup=1,
        iters=2,
    )
    assert len(report) == 2 and all(r.times_ms for r in report)
    out = deployed(x.to("cuda", torch.bfloat16).contiguous(memory_format=torch.channels_last)).float().cpu()
    assert _rel(out, ref) < 3e-2

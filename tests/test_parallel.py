"""Tests for common.decompose.parallel and the parallel paths of SpectraCache (warm, decompose)."""

from __future__ import annotations

import threading

import pytest
import torch
from torch import nn

from common.decompose.ht import KernelSpectra
from common.decompose.parallel import map_layers
from common.decompose.ranks import ranks_from_level
from common.decompose.surgery import LayerPlan, SpectraCache, apply_plan, list_conv_layers


@pytest.fixture
def two_threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def test_map_layers_keeps_order_uses_one_thread_per_worker_and_restores_caller(two_threads):
    seen = []

    def fn(i):
        seen.append(threading.get_ident())
        return i * i, torch.get_num_threads()

    out = map_layers(fn, range(7))
    assert [r[0] for r in out] == [i * i for i in range(7)]
    assert all(r[1] == 1 for r in out)
    assert threading.get_ident() not in seen
    assert torch.get_num_threads() == 2
    assert map_layers(fn, []) == []


def test_map_layers_raises_first_error_in_order_and_restores_caller(two_threads):
    def fn(i):
        if i in (2, 4):
            raise ValueError(f"item {i}")
        return i

    with pytest.raises(ValueError, match="item 2"):
        map_layers(fn, range(6))
    assert torch.get_num_threads() == 2


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 40, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(40, 48, (3, 5), padding=(1, 2)),
        nn.ReLU(),
        nn.Conv2d(48, 160, 3),
        nn.ReLU(),
        # big enough for the float32 core route (R1*kh > 256 at level 0.6)
        nn.Conv2d(160, 160, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(160, 24, 1),
    )


def _plan(model: nn.Module, level: float) -> dict[str, LayerPlan]:
    plan = {}
    for info in list_conv_layers(model):
        method = "svd" if info.kernel_size == (1, 1) else "ht2"
        plan[info.name] = LayerPlan(method, ranks_from_level(method, info.group_shape, level))
    return plan


def test_decompose_matches_fresh_serial_decomposition(two_threads):
    m = _model()
    plan = _plan(m, 0.5)
    got = SpectraCache(m).decompose(plan)
    assert set(got) == set(plan)
    convs = dict(m.named_modules())
    for name, lp in plan.items():
        ref = KernelSpectra(convs[name].weight, 1, name).decompose(lp.method, lp.ranks)
        assert got[name].ranks == ref.ranks
        assert torch.allclose(got[name].reconstruct(), ref.reconstruct(), rtol=1e-5, atol=1e-6)
        assert got[name].relative_error == pytest.approx(ref.relative_error, abs=1e-6)


def test_layer_factors_do_not_depend_on_the_rest_of_the_plan(two_threads):
    # Every layer is decomposed on one intra-op thread, alone or with others: bit-identical factors.
    m = _model(1)
    plan = _plan(m, 0.6)
    assert plan["8"].ranks[0] * 3 > 256
    together = SpectraCache(m).decompose(plan)
    for name, lp in plan.items():
        alone = SpectraCache(m).decompose({name: lp})[name]
        for a, b in zip(vars(alone).values(), vars(together[name]).values()):
            assert torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_decompose_keeps_plan_order_fills_the_core_cache_and_validates_ranks(two_threads):
    m = _model(2)
    cache = SpectraCache(m)
    plan = {
        "2": LayerPlan("ht2", (8, 16, 10)),
        "10": LayerPlan("svd", (4,)),
        "0": LayerPlan("dense"),
        "8": LayerPlan("tucker2", (16, 16)),
    }
    assert list(cache.decompose(plan)) == ["2", "10", "8"]
    assert (8, 16) in cache.get("2")._gram_cache and "0" not in cache
    with pytest.raises(ValueError, match=r"'4'.*R1"):
        cache.decompose({"2": LayerPlan("ht2", (8, 16, 10)), "4": LayerPlan("ht2", (41, 8, 8))})
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="'4'"):
        apply_plan(m, {"4": LayerPlan("ht2", (41, 8, 8))}, cache, inplace=True)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    assert isinstance(m[4], nn.Conv2d)


def test_warm_reports_a_bad_kernel_by_name(two_threads):
    m = _model(3)
    with torch.no_grad():
        m[2].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="'2'.*non-finite"):
        SpectraCache(m).warm(["0", "2", "4"])


def test_bench_decompose_runs_on_a_small_model(capsys):
    from benchmarks.bench_decompose import bench_model, print_table

    m = _model(4)
    result = bench_model("tiny", m, levels=(0.5, 0.3), repeats=2)
    assert result["layers"] == 5 and result["kxk"] == 4  # the 3-channel stem is left out
    assert [p["level"] for p in result["plans"]] == [0.5, 0.3]
    assert all(len(p["decompose"]) == 2 and min(p["decompose"]) > 0 for p in result["plans"])
    print_table([result])
    out = capsys.readouterr().out
    assert "decomp min" in out and out.count("tiny") == 2

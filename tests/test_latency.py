"""Tests for common.latency."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common.latency import fastest_latency, interleaved_latency, measure_latency


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
                         nn.Flatten(), nn.Linear(8, 10))


def test_measure_latency_cpu_dict_and_threads_restored():
    before = torch.get_num_threads()
    r = measure_latency(_model(), (2, 3, 16, 16), device="cpu", threads=1, warmup=2, iters=7)
    assert torch.get_num_threads() == before
    assert r["iters"] == 7 and r["batch"] == 2 and r["threads"] == 1
    assert r["device"] == "cpu" and r["dtype"] == "float32" and r["cuda_graph"] is False
    assert 0 < r["p10_ms"] <= r["median_ms"] <= r["p90_ms"] < 1000


def test_measure_latency_rejects_bad_args():
    with pytest.raises(ValueError, match="iters"):
        measure_latency(_model(), iters=0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA"):
            measure_latency(_model(), cuda_graph=True)


def test_measure_latency_larger_model_is_slower():
    small = measure_latency(_model(), (1, 3, 16, 16), threads=1, warmup=2, iters=9)
    torch.manual_seed(0)
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1),
                        nn.Conv2d(64, 64, 3, padding=1))
    large = measure_latency(big, (1, 3, 64, 64), threads=1, warmup=2, iters=9)
    assert large["median_ms"] > 5 * small["median_ms"]


def test_fastest_latency_picks_the_faster_format_and_leaves_model_alone():
    m = _model()
    r = fastest_latency(m, (1, 3, 16, 16), threads=1, warmup=1, iters=5)
    assert set(r["per_format"]) == {"contiguous", "channels_last"}
    assert r["median_ms"] == min(r["per_format"].values())
    assert r["channels_last"] == (r["per_format"]["channels_last"] < r["per_format"]["contiguous"])
    assert r["forms"] == {} and not r["deployed"] and r["conv_macs"] == 8 * 3 * 9 * 16 * 16
    assert m[0].weight.is_contiguous()


def test_fastest_latency_deploys_factorized_layers():
    from common.layers import HT2Conv2d

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
@pytest.mark.parametrize("graph", [False, True])
def test_measure_latency_cuda(graph):
    r = measure_latency(_model(), (4, 3, 32, 32), device="cuda", cuda_graph=graph, warmup=3, iters=10)
    assert r["device"].startswith("cuda") and r["cuda_graph"] is graph and r["median_ms"] > 0


def test_interleaved_latency_ratios_and_reference():
    torch.manual_seed(0)
    small = _model()
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    r = interleaved_latency({"big": big, "small": small}, (1, 3, 32, 32), rounds=3, threads=1, warmup=1, iters=3,
                            reference="big")
    assert len(r["big"]["rounds_ms"]) == 3 and len(r["small"]["rounds_ms"]) == 3
    assert r["speedup"]["small"] > 2  # ~40x fewer MACs
    assert "big" not in r["speedup"]
    with pytest.raises(ValueError, match="reference"):
        interleaved_latency({"a": small}, (1, 3, 8, 8), rounds=1, reference="b", warmup=0, iters=1)
    with pytest.raises(ValueError, match="rounds"):
        interleaved_latency({"a": small}, (1, 3, 8, 8), rounds=0)

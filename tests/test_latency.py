"""Tests for common.latency."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from common.latency import best_cpu_format, measure_latency


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


def test_best_cpu_format():
    m = _model()
    r = best_cpu_format(m, (1, 3, 16, 16), threads=1, warmup=1, iters=5)
    assert r["channels_last"] in (True, False)
    faster = min(r["contiguous"]["median_ms"], r["channels_last_result"]["median_ms"])
    assert r["median_ms"] == faster
    assert r["channels_last_result"]["channels_last"] and not r["contiguous"]["channels_last"]
    assert m[0].weight.is_contiguous()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graph", [False, True])
def test_measure_latency_cuda(graph):
    r = measure_latency(_model(), (4, 3, 32, 32), device="cuda", cuda_graph=graph, warmup=3, iters=10)
    assert r["device"].startswith("cuda") and r["cuda_graph"] is graph and r["median_ms"] > 0

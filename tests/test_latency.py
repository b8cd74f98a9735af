"""Tests for common.deploy.latency (plain timing) and the benchmarks/latency.py table built on it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
import torch.nn as nn

from common.deploy.latency import interleaved_latency, measure_latency
from tests.helpers import two_seed_plan_log

REPO = Path(__file__).resolve().parents[1]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10)
    )


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
    big = nn.Sequential(
        nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1)
    )
    large = measure_latency(big, (1, 3, 64, 64), threads=1, warmup=2, iters=9)
    assert large["median_ms"] > 5 * small["median_ms"]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("graph", [False, True])
def test_measure_latency_cuda(graph):
    r = measure_latency(_model(), (4, 3, 32, 32), device="cuda", cuda_graph=graph, warmup=3, iters=10)
    assert r["device"].startswith("cuda") and r["cuda_graph"] is graph and r["median_ms"] > 0


def test_interleaved_latency_ratios_and_reference():
    torch.manual_seed(0)
    small = _model()
    big = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.Conv2d(64, 64, 3, padding=1))
    r = interleaved_latency(
        {"big": big, "small": small}, (1, 3, 32, 32), rounds=3, threads=1, warmup=1, iters=3, reference="big"
    )
    assert len(r["big"]["rounds_ms"]) == 3 and len(r["small"]["rounds_ms"]) == 3
    assert r["speedup"]["small"] > 2  # ~40x fewer MACs
    assert "big" not in r["speedup"]
    with pytest.raises(ValueError, match="reference"):
        interleaved_latency({"a": small}, (1, 3, 8, 8), rounds=1, reference="b", warmup=0, iters=1)
    with pytest.raises(ValueError, match="rounds"):
        interleaved_latency({"a": small}, (1, 3, 8, 8), rounds=0)


def test_latency_imports_neither_training_nor_deployment():
    """Plain timing stands alone: deployment imports it, never the other way round (no import cycle)."""
    code = (
        "import sys, common.deploy.latency; "
        "print(sorted(m for m in ('common.train.finetune', 'common.deploy.merge', 'common.run.experiment') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_latency_benchmark_table_and_resume(tmp_path, monkeypatch):
    """benchmarks/latency.py on a one-plan run document: one CSV row per setting, the Markdown table, and a
    re-run that measures nothing new."""
    from benchmarks import latency as bench
    from common.decompose.surgery import LayerPlan, list_conv_layers, plan_to_dict
    from common.models import build_model
    from common.run.documents import jsonify
    from common.run.logs import RunLog

    torch.manual_seed(0)
    layers = list_conv_layers(build_model("alexnet"), (1, 3, 32, 32))
    plan = {layers[1].name: LayerPlan("ht2", (16, 16, 16))}
    log = RunLog(tmp_path / "logs", "alexnet", "bench")
    log.write("plan", method="uniform", target=3.0, metric="macs", decomposition="ht2", seed=0, plan=plan_to_dict(plan))
    jsonify(log.path, tmp_path / "json")
    argv = [
        "--json",
        str(tmp_path / "json"),
        "--out",
        str(tmp_path / "out"),
        "--device",
        "cpu",
        "--threads",
        "1",
        "--batches",
        "1,2",
        "--weights",
        "random",
        "--iters",
        "2",
        "--warmup",
        "0",
        "--deploy-iters",
        "1",
        "--rounds",
        "1",
    ]
    df = bench.main(argv)
    assert list(df["setting"]) == ["cpu_b1", "cpu_b2"] and set(df["model"]) == {"alexnet"}
    assert set(df["weights"]) == {"random"} and (df["rounds"] == 1).all()
    for _, row in df.iterrows():
        assert row["macs_factor"] > 1.0 and row["deployed_macs_factor"] >= 1.0
        assert row["dense_ms"] > 0 and row["factorized_ms"] > 0 and row["deployed_ms"] > 0
        assert row["speedup"] == pytest.approx(row["dense_ms"] / row["deployed_ms"], rel=1e-9)  # one round
    md = (tmp_path / "out" / "latency_cpu.md").read_text()
    assert md.startswith("# CPU latency vs dense") and "| alexnet |" in md and "cpu_b2" in md

    monkeypatch.setattr(bench, "interleaved_latency", lambda *a, **k: pytest.fail("re-measured a done row"))
    again = bench.main(argv)
    assert len(again) == 2 and len(pd.read_csv(tmp_path / "out" / "latency_cpu.csv")) == 2


def test_compile_for_inference_matches_eager_and_is_not_recompiled_when_timed():
    import torch._dynamo.utils as dynamo_utils

    from common.deploy.latency import compile_for_inference

    model = _model()
    with torch.inference_mode():  # inputs as measure_latency makes them (an inference tensor)
        x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
        ref = model(x)
    old = torch.get_num_threads()
    compiled = compile_for_inference(model, (2, 3, 16, 16), threads=1)
    assert torch.get_num_threads() == old
    graphs = dynamo_utils.counters["stats"]["unique_graphs"]
    r = measure_latency(compiled, (2, 3, 16, 16), threads=1, warmup=1, iters=3)
    assert r["median_ms"] > 0
    # timed what was compiled, nothing new (the thread count is part of dynamo's guards: same threads)
    assert dynamo_utils.counters["stats"]["unique_graphs"] == graphs
    with torch.inference_mode():
        assert torch.allclose(compiled(x), ref, atol=1e-5, rtol=1e-5)


def test_latency_benchmark_compile_columns_and_their_resume(tmp_path, monkeypatch):
    """--compile adds the torch.compile columns (the compiler itself is stubbed here: the test above runs it),
    and a row timed without them is measured again while --compile is on."""
    from benchmarks import latency as bench
    from common.decompose.surgery import LayerPlan, list_conv_layers, plan_to_dict
    from common.models import build_model
    from common.run.documents import jsonify
    from common.run.logs import RunLog

    torch.manual_seed(0)
    layers = list_conv_layers(build_model("alexnet"), (1, 3, 32, 32))
    log = RunLog(tmp_path / "logs", "alexnet", "bench")
    plan = plan_to_dict({layers[1].name: LayerPlan("ht2", (16, 16, 16))})
    log.write("plan", method="uniform", target=3.0, metric="macs", decomposition="ht2", seed=0, plan=plan)
    jsonify(log.path, tmp_path / "json")
    argv = ["--json", str(tmp_path / "json"), "--out", str(tmp_path / "out"), "--device", "cpu", "--threads", "1"]
    argv += ["--batches", "1", "--weights", "random", "--iters", "2", "--warmup", "0", "--deploy-iters", "1"]
    argv += ["--rounds", "1", "--no-ort"]
    plain = bench.main(argv)
    assert plain["compile_speedup"].isna().all() and "compile_" not in (tmp_path / "out" / "latency_cpu.md").read_text()
    compiled = []

    def fake_compile(model, shape, mode, device, dtype, channels_last, threads):
        compiled.append((mode, tuple(shape), channels_last, threads))
        return model

    monkeypatch.setattr(bench, "compile_for_inference", fake_compile)
    df = bench.main([*argv, "--compile", "default"])
    assert len(df) == 1 and len(compiled) == 2  # dense and deployed, each once
    assert {c[0] for c in compiled} == {"default"} and {c[1] for c in compiled} == {(1, 3, 32, 32)}
    row = df.iloc[0]
    assert row["compile_mode"] == "default" and row["compile_dense_ms"] > 0 and row["compile_deployed_ms"] > 0
    assert row["compile_speedup"] == pytest.approx(row["compile_dense_ms"] / row["compile_deployed_ms"], rel=1e-9)
    md = (tmp_path / "out" / "latency_cpu.md").read_text()
    assert "compile_speedup" in md and "mode default" in md


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_compile_for_inference_cuda_bf16():
    from common.deploy.latency import compile_for_inference

    compiled = compile_for_inference(_model(), (4, 3, 16, 16), "default", "cuda", torch.bfloat16, True)
    r = measure_latency(compiled, (4, 3, 16, 16), "cuda", None, True, torch.bfloat16, warmup=1, iters=3)
    assert r["median_ms"] > 0


def test_latency_benchmark_times_the_plans_of_the_chosen_seeds(tmp_path, monkeypatch):
    """A multi-seed run has one plan per seed: --seeds picks them (default seed 0), the seed is part of each
    row's key and of the table, and a row of a file written before rows had seeds is measured again."""
    from benchmarks import latency as bench
    from common.run.documents import jsonify

    # a multi-seed run (its config lists the seeds): each plan record carries its own seed
    log = two_seed_plan_log(tmp_path)
    jsonify(log.path, tmp_path / "json")
    argv = ["--json", str(tmp_path / "json"), "--out", str(tmp_path / "out"), "--device", "cpu", "--threads", "1"]
    argv += ["--batches", "1", "--weights", "random", "--iters", "1", "--warmup", "0", "--deploy-iters", "1"]
    argv += ["--rounds", "1", "--no-ort"]
    first = bench.main(argv)
    assert first["seed"].tolist() == [0]
    both = bench.main([*argv, "--seeds", "all"])
    assert sorted(both["seed"]) == [0, 1]
    by_seed = both.set_index("seed")["macs_factor"]
    assert by_seed[1] > by_seed[0] > 1.0  # seed 1's plan has the smaller ranks: its own plan was timed
    md = (tmp_path / "out" / "latency_cpu.md").read_text()
    assert "| seed |" in md.replace("| target | seed |", "| seed |")

    monkeypatch.setattr(bench, "interleaved_latency", lambda *a, **k: pytest.fail("re-measured a done row"))
    assert len(bench.main([*argv, "--seeds", "0,1"])) == 2
    monkeypatch.undo()

    # an older file (no seed column): widened, and its row is not taken for seed 0's
    csv = tmp_path / "out" / "latency_cpu.csv"
    old = pd.read_csv(csv)
    old[old["seed"] == 1].drop(columns="seed").to_csv(csv, index=False)
    again = bench.main(argv)
    assert list(pd.read_csv(csv, nrows=0).columns) == bench.ROW_COLUMNS
    assert again["seed"].isna().sum() == 1 and again["seed"].dropna().tolist() == [0]

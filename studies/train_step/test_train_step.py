"""Tests for studies.train_step.stepcost (training-step and per-stage timing) and studies/train_step/train_step.py."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
import torch.nn as nn

from common.decompose.layers import HT2Conv2d
from common.models import build_model
from studies.train_step.stepcost import PHASES, stage_times, time_train_step
from tests.helpers import two_seed_plan_log


def _net(factorized: bool) -> nn.Module:
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 12, 3, stride=(2, 1), padding=1)
    body = HT2Conv2d.from_conv(conv, (4, 5, 3), name="body") if factorized else conv
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        body,
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(12, 10),
    )


def test_time_train_step_phases_and_student_untouched():
    student, teacher = _net(True), _net(False)
    before = [p.detach().clone() for p in student.parameters()]
    threads = torch.get_num_threads()
    t = time_train_step(student, teacher, (4, 3, 8, 8), 10, threads=1, warmup=0, iters=3)
    assert torch.get_num_threads() == threads
    assert all(t[f"{p}_ms"] > 0 for p in PHASES) and t["batch"] == 4 and t["iters"] == 3 and t["threads"] == 1
    assert t["step_ms"] >= max(t[f"{p}_ms"] for p in PHASES[:-1])
    assert t["step_p10_ms"] <= t["step_ms"] <= t["step_p90_ms"]
    # a copy trained: the caller's weights are as they were
    assert all(torch.equal(a, b) for a, b in zip(before, student.parameters()))
    # without a teacher the step is plain cross-entropy and the teacher phase is empty but timed
    assert time_train_step(student, None, (4, 3, 8, 8), 10, warmup=0, iters=1)["teacher_fwd_ms"] >= 0
    with pytest.raises(ValueError, match="iters"):
        time_train_step(student, teacher, (4, 3, 8, 8), 10, iters=0)


def test_stage_times_follow_the_chain_and_its_cost():
    """One row per HT-2 stage at the input that stage sees (stride on its own axis), then the dense conv;
    the stages' MACs add up to the layer's own cost formula."""
    model = _net(True)
    rows = stage_times(model, (2, 3, 8, 8), threads=1, warmup=0, iters=2)
    assert [r["stage"] for r in rows] == ["first", "vertical", "horizontal", "last", "dense"]
    assert {r["layer"] for r in rows} == {"3"}
    by = {r["stage"]: r for r in rows}
    assert [by[s]["in_hw"] for s in ("first", "vertical", "horizontal", "last", "dense")] == [
        "8x8",
        "8x8",
        "4x8",
        "4x8",
        "8x8",
    ]
    assert (by["vertical"]["kernel"], by["vertical"]["stride"]) == ("3x1", "2x1")
    assert (by["vertical"]["cin"], by["vertical"]["cout"]) == (4, 3)
    layer = model[3]
    assert sum(by[s]["macs"] for s in ("first", "vertical", "horizontal", "last")) == layer.macs((8, 8))
    assert by["dense"]["macs"] == 12 * 8 * 9 * 4 * 8
    for r in rows:
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert r["fwd_gmacs"] == pytest.approx(r["macs"] * 2 / r["fwd_ms"] / 1e6)
    # nothing factorized: nothing to time
    assert stage_times(_net(False), (2, 3, 8, 8), warmup=0, iters=1) == []


def test_train_step_benchmark_rows_table_and_resume(tmp_path, monkeypatch):
    from common.decompose.surgery import list_conv_layers
    from common.run.documents import jsonify
    from studies.train_step import train_step as bench

    log = two_seed_plan_log(tmp_path)
    layers = list_conv_layers(build_model("alexnet"), (1, 3, 32, 32))
    fin = {"test_top1_bn": 0.5, "macs_factor": 2.0, "params_factor": 2.0}
    log.write("final", method="tpe", target=3.0, decomposition="ht2", seed=0, finetune_seconds=12.5, **fin)
    jsonify(log.path, tmp_path / "json")
    argv = ["--json", str(tmp_path / "json"), "--out", str(tmp_path / "out"), "--targets", "3", "--batch", "2"]
    argv += ["--threads", "1", "--warmup", "0", "--iters", "1", "--weights", "random", "--layers"]
    df = bench.main(argv)
    assert df["seed"].tolist() == [0] and df["method"].tolist() == ["tpe"]
    row = df.iloc[0]
    assert row["macs_factor"] > 1.0 and row["finetune_seconds"] == 12.5 and row["weights"] == "random"
    assert row["step_vs_dense"] > 0
    lay = pd.read_csv(tmp_path / "out" / "train_step_layers_cpu.csv")
    assert lay["stage"].tolist() == ["first", "vertical", "horizontal", "last", "dense"]
    assert set(lay["layer"]) == {layers[1].name}
    md = (tmp_path / "out" / "train_step_cpu.md").read_text()
    assert md.startswith("# Finetuning step cost") and "| alexnet | tpe |" in md and "slowest" in md

    monkeypatch.setattr(bench, "time_train_step", lambda *a, **k: pytest.fail("re-timed a done row"))
    monkeypatch.setattr(bench, "stage_times", lambda *a, **k: pytest.fail("re-timed done stages"))
    assert len(bench.main(argv)) == 1
    monkeypatch.undo()
    both = bench.main([*argv, "--seeds", "all"])
    assert sorted(both["seed"]) == [0, 1]
    assert pd.isna(both.set_index("seed").loc[1, "finetune_seconds"])  # seed 1 logged no finetune

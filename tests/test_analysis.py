"""Tests for common.analysis and analyze_results.py on synthetic runs written with RunLog."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analyze_results
from common.analysis import (
    SUMMARY_COLUMNS,
    load_runs,
    make_plots,
    markdown_table,
    pareto_front,
    plot_ranks,
    plot_search_trace,
    plot_sensitivity,
    split_speedup,
    summary_table,
    write_summary,
)
from common.logs import RunLog, jsonify

MODELS = {"resnet18": (0.9142, 0.9125), "vgg16": (0.9010, 0.8964)}  # val, test baseline
METHODS = ("uniform", "random", "policy")
TARGETS = (2.0, 3.0)
LAYERS = [("conv1", 100, False), ("layer1.conv", 400, True), ("layer2.conv", 800, True)]


def expected_test_bn(model_idx: int, method_idx: int, target: float) -> float:
    """Synthetic accuracy: falls with the target, better for later methods."""
    return 0.85 - 0.05 * target + 0.01 * method_idx - 0.02 * model_idx


def build_logs(root: Path, seed: int = 0) -> None:
    """2 models x 3 methods x 2 targets, plus an older duplicate run that must lose."""
    rng = np.random.default_rng(seed)
    for m, (model, (val, test)) in enumerate(MODELS.items()):
        # An older run whose policy @ 3.0 result is superseded by the main run below.
        old = RunLog(root, model, f"{model}-old")
        old.write(
            "final",
            method="policy",
            target=3.0,
            decomposition="ht2",
            val_top1_bn=0.1,
            test_top1_bn=0.1,
            macs_factor=3.0,
            params_factor=2.0,
            speedup={"cpu_t1": 9.0},
        )
        old.write("end", status="interrupted", wall_seconds=1.0)

        log = RunLog(root, model, f"{model}-main")
        log.write(
            "config",
            model=model,
            dataset="cifar10-jpeg",
            metric="macs",
            methods=list(METHODS),
            seed=seed,
            target=list(TARGETS),
            run_id=f"{model}-main",
        )
        log.write(
            "baseline",
            val_top1=val,
            test_top1=test,
            params=1000,
            macs=1300,
            latency={"cpu_t1": 10.0},
        )
        log.write(
            "layers",
            layers=[
                dict(
                    name=n,
                    weight_shape=[8, 8, 3, 3],
                    in_hw=[32, 32],
                    out_hw=[32, 32],
                    params=p,
                    macs=mac,
                    eligible=e,
                    reason="" if e else "first layer",
                )
                for n, p, mac, e in [(n, mac // 10, mac, e) for n, mac, e in LAYERS]
            ],
        )
        for name, _, eligible in LAYERS:
            if eligible:
                for level in (0.25, 0.5, 1.0):
                    log.write(
                        "sensitivity",
                        layer=name,
                        level=level,
                        ranks=[int(8 * level)] * 3,
                        val_top1=val - (1 - level) * 0.3,
                        macs=100,
                        params=10,
                    )
        for k, method in enumerate(METHODS):
            for target in TARGETS:
                if method in ("random", "policy"):
                    for i in range(12):
                        log.write(
                            "candidate",
                            method=method,
                            target=target,
                            index=i,
                            plan={},
                            val_top1=float(rng.uniform(0.3, 0.8)),
                            macs_factor=target,
                            params_factor=target,
                            seed=i,
                            round=i // 4,
                        )
                plan = {
                    "layer1.conv": {
                        "method": "ht2",
                        "ranks": [2, 3, 4],
                        "macs": 400 / (target + k),
                    },
                    "layer2.conv": {
                        "method": "ht2",
                        "ranks": [1, 2, 3],
                        "macs": 800 / (target + 1),
                    },
                }
                log.write(
                    "plan",
                    method=method,
                    target=target,
                    metric="macs",
                    plan=plan,
                    achieved_factor=target,
                    macs_factor=target,
                    params_factor=target * 0.9,
                    evaluations=12,
                    search_seconds=1.0,
                    decomposition="ht2",
                )
                bn = expected_test_bn(m, k, target)
                ft = None if method == "uniform" else bn + 0.03
                log.write(
                    "final",
                    method=method,
                    target=target,
                    decomposition="ht2",
                    val_top1_bn=bn + 0.01,
                    test_top1_bn=bn,
                    val_top1_ft=ft,
                    test_top1_ft=ft,
                    params=100,
                    macs=100,
                    params_factor=target * 0.9,
                    macs_factor=target + 0.01 * k,
                    latency_ms={"cpu_t1": 5.0, "cpu_t4": 2.0, "cuda_bs256": 1.0},
                    speedup={"cpu_t1": 1.5 + k, "cpu_t4": 1.2, "cuda_bs256": 1.1 * target},
                    evaluations=12,
                    wall_seconds=60.0 * target,
                    finetune_epochs=0 if ft is None else 1,
                )
        log.write("end", status="ok", wall_seconds=500.0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> list[dict]:
    root = tmp_path_factory.mktemp("analysis")
    build_logs(root / "logs")
    jsonify(root / "logs", root / "json")
    return load_runs(root / "json")


def test_summary_table_rows(runs):
    assert len(runs) == 4
    df = summary_table(runs)
    assert list(df.columns) == list(SUMMARY_COLUMNS)
    assert len(df) == len(MODELS) * len(METHODS) * len(TARGETS)
    assert not df.duplicated(["model", "method", "decomposition", "target"]).any()
    for m, (model, (_, test)) in enumerate(MODELS.items()):
        for k, method in enumerate(METHODS):
            for target in TARGETS:
                row = df[(df.model == model) & (df.method == method) & (df.target == target)]
                assert len(row) == 1
                row = row.iloc[0]
                bn = expected_test_bn(m, k, target)
                assert row.test_top1_bn == pytest.approx(bn)  # latest run won over "-old"
                assert row.run_id == f"{model}-main"
                assert row.metric == "macs" and row.decomposition == "ht2"
                assert row.baseline_test_top1 == pytest.approx(test)
                final = bn if method == "uniform" else bn + 0.03
                assert row.delta_pp == pytest.approx(100 * (final - test))
                assert math.isnan(row.test_top1_ft) == (method == "uniform")
                assert row.speedup_cpu == pytest.approx(1.5 + k)
                assert row.speedup_cpu_setting == "cpu_t1"
                assert row.speedup_cuda == pytest.approx(1.1 * target)
                assert row.macs_factor == pytest.approx(target + 0.01 * k)
                assert row.wall_seconds == pytest.approx(60 * target)
    assert list(df.model) == sorted(df.model)


def test_summary_files_and_plots(runs, tmp_path):
    df = summary_table(runs)
    plots = make_plots(runs, tmp_path)
    names = sorted(p.name for p in plots)
    assert names == sorted(
        f"{kind}_{model}.png"
        for model in MODELS
        for kind in ("acc_vs_macs", "ranks", "sensitivity", "search_trace")
    )
    for plot in plots:
        data = plot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, plot

    csv_path, md_path = write_summary(
        df, tmp_path, plots=plots, command="python x.py --y", n_runs=len(runs)
    )
    back = pd.read_csv(csv_path)
    assert list(back.columns) == list(SUMMARY_COLUMNS) and len(back) == len(df)
    assert np.allclose(back.test_top1_bn, df.test_top1_bn)
    md = md_path.read_text()
    assert "Generated by `python x.py --y` on " in md and "from 4 run(s)" in md
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(df)
    first = df.iloc[0]
    assert f"| {100 * first.test_top1_bn:.2f} |" in table[1]
    for plot in plots:
        assert f"]({plot.name})" in md


def test_markdown_table_formats_and_missing_values():
    df = pd.DataFrame({"name": ["a|b", "c"], "acc": [0.91234, float("nan")], "n": [3, 4]})
    text = markdown_table(
        df,
        {"name": "Name", "acc": "Acc (%)", "n": "N"},
        {"acc": lambda v: f"{100 * v:.2f}", "n": "03d"},
    )
    assert text.splitlines() == [
        "| Name | Acc (%) | N |",
        "|:---|---:|---:|",
        "| a\\|b | 91.23 | 003 |",
        "| c | – | 004 |",
    ]
    assert markdown_table(df, ["n"]).splitlines()[2] == "| 3 |"
    with pytest.raises(KeyError, match="nope"):
        markdown_table(df, ["nope"])


def test_pareto_front_hand_made():
    #        0    1    2    3    4    5    6
    xs = [1.0, 2.0, 2.0, 3.0, 1.5, 4.0, float("nan")]
    ys = [9.0, 8.0, 7.0, 8.0, 9.0, 1.0, 10.0]
    # 0 dominated by 4 (same y, larger x); 1 by 3; 2 by 1; 6 is NaN.
    assert pareto_front(xs, ys) == [4, 3, 5]
    assert pareto_front([1.0, 1.0], [2.0, 2.0]) == [0, 1]  # ties are both kept
    assert pareto_front([], []) == []
    with pytest.raises(ValueError):
        pareto_front([1.0], [1.0, 2.0])


def test_split_speedup():
    assert split_speedup({"cpu_t1": 1.5, "cpu_t8": 2.5, "CUDA": 3.0, "gpu_bs1": 4.0}) == (
        2.5,
        "cpu_t8",
        4.0,
    )
    cpu, setting, cuda = split_speedup({"cpu": "n/a"})
    assert math.isnan(cpu) and setting is None and math.isnan(cuda)


def test_plots_skip_missing_kinds(tmp_path, caplog):
    log = RunLog(tmp_path / "logs", "alexnet", "only-final")
    log.write(
        "final",
        method="uniform",
        target=2.0,
        decomposition="svd",
        test_top1_bn=0.7,
        macs_factor=2.0,
        params_factor=2.0,
    )
    jsonify(tmp_path / "logs", tmp_path / "json")
    runs = load_runs(tmp_path / "json")
    caplog.set_level("INFO")
    assert plot_sensitivity(runs, "alexnet", tmp_path) is None
    assert plot_search_trace(runs, "alexnet", tmp_path) is None
    assert plot_ranks(runs, "alexnet", tmp_path) is None
    assert "skipping sensitivity plot for alexnet: no sensitivity records" in caplog.text
    assert [p.name for p in make_plots(runs, tmp_path)] == ["acc_vs_macs_alexnet.png"]
    df = summary_table(runs)
    assert len(df) == 1 and math.isnan(df.baseline_test_top1[0]) and math.isnan(df.delta_pp[0])


def test_ranks_plot_without_layer_costs_is_skipped(tmp_path, caplog):
    log = RunLog(tmp_path / "logs", "alexnet", "r")
    log.write(
        "plan",
        method="uniform",
        target=2.0,
        metric="macs",
        plan={"c1": {"method": "ht2", "ranks": [1, 2, 3]}},
    )
    jsonify(tmp_path / "logs", tmp_path / "json")
    runs = load_runs(tmp_path / "json")
    caplog.set_level("INFO")
    assert plot_ranks(runs, "alexnet", tmp_path) is None
    assert "no per-layer 'macs'" in caplog.text
    path = plot_ranks(runs, "alexnet", tmp_path, kept_fraction=lambda layer, entry: 0.5)
    assert path == tmp_path / "ranks_alexnet.png" and path.stat().st_size > 0


def test_accuracy_must_be_a_fraction(tmp_path):
    log = RunLog(tmp_path / "logs", "vgg16", "pct")
    log.write(
        "final",
        method="uniform",
        target=2.0,
        decomposition="ht2",
        test_top1_bn=91.2,
        macs_factor=2.0,
        params_factor=2.0,
    )
    jsonify(tmp_path / "logs", tmp_path / "json")
    with pytest.raises(ValueError, match=r"'pct'.*test_top1_bn=91.2"):
        summary_table(load_runs(tmp_path / "json"))


def test_cli_end_to_end(tmp_path, capsys):
    build_logs(tmp_path / "logs", seed=1)
    jsonify(tmp_path / "logs", tmp_path / "json")
    out = tmp_path / "results"
    assert analyze_results.main(["--json", str(tmp_path / "json"), "--out", str(out)]) == 0
    assert (out / "summary.csv").stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert f"python analyze_results.py --json {tmp_path / 'json'} --out {out}" in md
    assert len(list(out.glob("*.png"))) == 8
    assert str(out / "summary.md") in capsys.readouterr().out
    assert analyze_results.main(["--json", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err

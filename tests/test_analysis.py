"""Tests for common.analysis and analyze_results.py on synthetic runs written with RunLog."""

from __future__ import annotations

import json
import math
import re
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import analyze_results
from common.analysis import (
    ACC_PLOT_COLUMNS,
    AGGREGATE_COLUMNS,
    PLOTS,
    RANKS_PLOT_COLUMNS,
    README_BEGIN,
    README_END,
    README_GRID,
    README_TABLE,
    RECOVERY_COLUMNS,
    RIVAL_MARGIN_COLUMNS,
    SEARCH_PLOT_COLUMNS,
    SENSITIVITY_PLOT_COLUMNS,
    SUMMARY_COLUMNS,
    aggregate_seeds,
    bonferroni_level,
    budget_front,
    checkpoint_fingerprint,
    every_rival_verdict,
    finetune_recovery,
    latest_of,
    load_runs,
    macs_pct,
    make_plots,
    margin_verdict,
    markdown_table,
    paired_interval,
    pareto_front,
    plot_acc_vs_macs,
    plot_ranks,
    plot_search_trace,
    plot_sensitivity,
    policy_margins,
    replace_marked_block,
    rival_margins,
    run_context,
    runs_table,
    split_speedup,
    summary_table,
    update_readme,
    verdict_grid,
    write_summary,
)
from common.analysis import figures as analysis_figures
from common.analysis import plots as analysis_plots
from common.analysis import summary as analysis_summary
from common.analysis.markdown import seed_sentence
from common.analysis.readme import current_table
from common.run.documents import jsonify, records_of
from common.run.logs import KIND_KEYS, RunLog

MODELS = {"resnet18": (0.9142, 0.9125), "vgg16": (0.9010, 0.8964)}  # val, test baseline
METHODS = ("uniform", "random", "policy")
TARGETS = (2.0, 3.0)
LAYERS = [("conv1", 100, False), ("layer1.conv", 400, True), ("layer2.conv", 800, True)]


def expected_test_bn(model_idx: int, method_idx: int, target: float) -> float:
    """Synthetic accuracy: falls with the target, better for later methods."""
    return 0.85 - 0.05 * target + 0.01 * method_idx - 0.02 * model_idx


@contextmanager
def legacy_records() -> Iterator[None]:
    """Let RunLog write records as older logs hold them (``val_top1``, no ``score``).

    The writer's required keys follow the current format; the analysis must still read the
    committed older logs, so the tests write that format too.
    """
    saved = dict(KIND_KEYS)
    KIND_KEYS["sensitivity"] = ("layer", "level")
    KIND_KEYS["candidate"] = ("method", "target", "index", "macs_factor", "params_factor")
    try:
        yield
    finally:
        KIND_KEYS.clear()
        KIND_KEYS.update(saved)


def build_logs(root: Path, seed: int = 0) -> None:
    """2 models x 3 methods x 2 targets, plus an older run of policy @ 3 that stays a row of its own.

    Older single-seed format: no ``final.seed``, ``val_top1`` (no ``score``) in sensitivity and
    candidate records, whose ``seed`` is a per-candidate sampling seed.
    """
    with legacy_records():
        _build_logs(root, seed)


def _build_logs(root: Path, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for m, (model, (val, test)) in enumerate(MODELS.items()):
        # An older run of policy @ 3.0 (no config, no baseline): its own row, never merged.
        old = RunLog(root, model, f"{model}-old")
        # No config record in this run: the record must carry its metric.
        write_final(old, "policy", 3.0, 0.1, 3.0, val_top1_bn=0.1, speedup={"cpu_t1": 9.0}, metric="macs")
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
            checkpoint="auto",
        )
        log.write(
            "baseline",
            val_top1=val,
            test_top1=test,
            params=1000,
            macs=1300,
            latency={"cpu_t1": 10.0},
            checkpoint=f"/ckpt/cifar10-jpeg/{model}.pt",
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


def write_final(
    log: RunLog,
    method: str = "uniform",
    target: float = 2.0,
    test_top1_bn: float = 0.7,
    factor: float = 2.0,
    **fields,
) -> None:
    """One ``final`` record (HT-2 unless ``decomposition`` says otherwise) with both factors ``factor``."""
    fields.setdefault("decomposition", "ht2")
    log.write(
        "final",
        method=method,
        target=target,
        test_top1_bn=test_top1_bn,
        macs_factor=factor,
        params_factor=factor,
        **fields,
    )


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
    # The "-old" runs' policy @ 3 is a row of its own, not merged with (or replaced by) the main run's.
    assert len(df) == len(MODELS) * len(METHODS) * len(TARGETS) + len(MODELS)
    assert not df.duplicated(["run_id", "method", "decomposition", "target"]).any()
    assert (df.seed == 0).all()  # no final.seed: the config's seed
    main = df[df.run_id.str.endswith("-main")]
    for m, (model, (_, test)) in enumerate(MODELS.items()):
        for k, method in enumerate(METHODS):
            for target in TARGETS:
                row = main[(main.model == model) & (main.method == method) & (main.target == target)]
                assert len(row) == 1
                row = row.iloc[0]
                bn = expected_test_bn(m, k, target)
                assert row.test_top1_bn == pytest.approx(bn)
                assert (row.run_id, row.dataset, row.checkpoint) == (f"{model}-main", "cifar10-jpeg", f"{model}.pt")
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
        old = df[df.run_id == f"{model}-old"]
        assert len(old) == 1 and old.test_top1_bn.tolist() == [0.1]
        # No config and no baseline of its own: unknown context, and never another run's baseline.
        assert old.dataset.isna().all() and old.checkpoint.isna().all()
        assert old.baseline_test_top1.isna().all() and old.delta_pp.isna().all()
    assert list(df.model) == sorted(df.model)


def test_summary_files_and_plots(runs, tmp_path):
    df = summary_table(runs)
    plots = make_plots(runs, tmp_path)
    names = sorted(p.name for p in plots)
    assert names == sorted(
        f"{kind}_{model}.png" for model in MODELS for kind in ("acc_vs_macs", "ranks", "sensitivity", "search_trace")
    )
    for plot in plots:
        data = plot.read_bytes()
        assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000, plot
        assert not pd.read_csv(plot.with_suffix(".csv")).empty, plot  # the data drawn, next to it

    csv_path, md_path, seeds_path, rivals_path, recovery_path = write_summary(
        df, tmp_path, plots=plots, command="python x.py --y", n_runs=len(runs), runs=runs
    )
    back = pd.read_csv(csv_path)
    assert list(pd.read_csv(rivals_path).columns) == list(RIVAL_MARGIN_COLUMNS)
    assert list(back.columns) == list(AGGREGATE_COLUMNS) and len(back) == len(df)
    assert np.allclose(back.test_top1_bn_mean, df.test_top1_bn)
    assert back.test_top1_bn_std.isna().all() and (back.n_seeds == 1).all()
    assert back.run_id.tolist() == df.run_id.tolist() and back.checkpoint.tolist()[:6] == ["resnet18.pt"] * 6
    seeds = pd.read_csv(seeds_path)
    assert list(seeds.columns) == list(SUMMARY_COLUMNS) and len(seeds) == len(df)
    assert np.allclose(seeds.test_top1_bn, df.test_top1_bn)
    md = md_path.read_text()
    assert "Generated by `python x.py --y` on " in md and "from 4 run(s)" in md
    runs_table = md.split("## Runs")[1].split("## Results")[0]
    assert "| resnet18-main | resnet18 | cifar10-jpeg | resnet18.pt | /ckpt/cifar10-jpeg/resnet18.pt |" in runs_table
    main_table = md.split("## Results")[1].split("## Does the policy win?")[0]
    table = [line for line in main_table.splitlines() if line.startswith("| ")]
    assert len(table) == 1 + len(df)
    assert table[0].startswith("| Model | Dataset | Checkpoint | Run | Method |")
    first = df.iloc[0]
    assert table[1].startswith("| resnet18 | cifar10-jpeg | resnet18.pt | resnet18-main | uniform |")
    assert f"| {100 * first.test_top1_bn:.2f} |" in table[1]  # one seed: no "±"
    assert not any("±" in line for line in table) and "| Seeds |" in table[0]
    assert "(1 seed per configuration)" in md
    for plot in plots:
        assert f"]({plot.name}) ([data]({plot.stem}.csv))" in md


def test_latest_of_keeps_the_last_written_record_per_configuration():
    def final(method, target, seed, t, **extra):
        extra = {"decomposition": "ht2", "test_top1_bn": 0.5, "macs_factor": 2.0, "params_factor": 2.0, **extra}
        return {"kind": "final", "method": method, "target": target, "seed": seed, "t": t, **extra}

    run = {
        "records": [
            {"kind": "config", "seeds": [0, 1]},
            # written later, logged earlier in the file: write time decides, not file order
            final("policy", 2.0, 0, 30.0, finetune_seconds=20.0),
            final("policy", 2.0, 0, 10.0, finetune_seconds=10.0),
            final("policy", 2, 1, 20.0),
            final("energy", 5, 0, 5.0, decomposition="tucker2"),
            {"kind": "plan", "method": "policy", "target": 2.0, "seed": 1, "t": 1.0},
        ]
    }
    got = latest_of(run, "final")
    assert set(got) == {("policy", "ht2", 2.0, 0), ("policy", "ht2", 2.0, 1), ("energy", "tucker2", 5.0, 0)}
    assert got[("policy", "ht2", 2.0, 0)]["finetune_seconds"] == 20.0
    assert set(latest_of(run, "final", targets={5.0})) == {("energy", "tucker2", 5.0, 0)}
    assert set(latest_of(run, "final", seeds={1})) == {("policy", "ht2", 2.0, 1)}
    assert set(latest_of(run, "plan")) == {("policy", "ht2", 2.0, 1)}


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
    write_final(log, decomposition="svd", metric="params")
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
    assert df.metric[0] == "params"


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
    assert "no per-layer MACs ('layer_costs'" in caplog.text
    assert not (tmp_path / "ranks_alexnet.png").exists() and not (tmp_path / "ranks_alexnet.csv").exists()
    path = plot_ranks(runs, "alexnet", tmp_path, kept_fraction=lambda layer, entry: 0.5)
    assert path == tmp_path / "ranks_alexnet.png" and path.stat().st_size > 0
    data = pd.read_csv(tmp_path / "ranks_alexnet.csv")
    assert data[["layer", "compressed", "kept_fraction"]].values.tolist() == [["c1", True, 0.5]]


def _capture_figures(monkeypatch) -> dict:
    """Keep every figure a plot saves, by file name, with the data it writes (nothing written)."""
    saved: dict = {}

    def keep(fig, path, data):
        saved[Path(path).name] = (fig, data)
        return Path(path)

    monkeypatch.setattr(analysis_figures, "save_plot", keep)
    return saved


def _drawn(monkeypatch, plot, runs: list[dict], model: str, out: Path):
    """Draw one plot without writing it: ``(figure, data it would write)``."""
    saved = _capture_figures(monkeypatch)
    plot(runs, model, out)
    return saved[f"{analysis_plots.plot_name(plot)}_{model}.png"]


def _bar_heights(ax) -> dict[str, list[float]]:
    """Bar heights per legend label (one bar container per plan)."""
    return {c.get_label(): [b.get_height() for b in c] for c in ax.containers}


def test_ranks_from_layer_costs_one_panel_per_target(tmp_path, monkeypatch):
    """The plan records' ``layer_costs`` give each layer's kept MACs; a layer in no plan is dense."""
    log = RunLog(tmp_path / "logs", "vgg16", "lc")
    log.write("config", model="vgg16", dataset="cifar10-jpeg", metric="macs", methods=["uniform"], seed=0)
    layers = [("first", 100), ("mid", 400), ("last", 800)]
    log.write("layers", layers=[{"name": n, "macs": m, "params": 1, "eligible": ["ht2"]} for n, m in layers])
    costs = {  # per (method, target): compressed MACs of mid and last ("dense": kept as it is)
        ("uniform", 2.0): (200, 400),
        ("policy", 2.0): (400, 300),
        ("uniform", 4.0): (100, 200),
    }
    for (method, target), (mid, last) in costs.items():
        log.write(
            "plan",
            method=method,
            target=target,
            metric="macs",
            decomposition="ht2",
            plan={"mid": {"method": "ht2", "ranks": [1, 1, 1]}, "last": {"method": "ht2", "ranks": [1, 1, 1]}},
            layer_costs=[
                {"name": "mid", "method": "dense" if mid == 400 else "ht2", "macs": mid, "dense_macs": 400},
                {"name": "last", "method": "ht2", "macs": last, "dense_macs": 800},
            ],
        )
    jsonify(tmp_path / "logs", tmp_path / "json")
    runs = load_runs(tmp_path / "json")
    fig, data = _drawn(monkeypatch, plot_ranks, runs, "vgg16", tmp_path)
    assert list(data.columns) == list(RANKS_PLOT_COLUMNS)
    assert len(data) == len(costs) * len(layers)  # one row per plan and layer
    assert set(data.dataset) == {"cifar10-jpeg"} and set(data.run_id) == {"lc"}
    kept = {(r.method, r.target, r.layer): (r.compressed, r.kept_fraction) for r in data.itertuples()}
    assert kept[("uniform", 2.0, "first")] == (False, 1.0)  # in no plan: kept dense
    assert kept[("uniform", 2.0, "mid")] == (True, 0.5) and kept[("uniform", 2.0, "last")] == (True, 0.5)
    assert kept[("policy", 2.0, "mid")] == (False, 1.0) and kept[("policy", 2.0, "last")] == (True, 0.375)
    assert kept[("uniform", 4.0, "mid")] == (True, 0.25) and kept[("uniform", 4.0, "last")] == (True, 0.25)
    # One panel per target; the bars drawn are the data written, in network order.
    axes = fig.axes
    assert len(axes) == 2 and "at 2×" in axes[0].get_title() and "at 4×" in axes[1].get_title()
    assert all("vgg16 on cifar10-jpeg" in ax.get_title() for ax in axes)
    assert _bar_heights(axes[0]) == {"uniform": [1.0, 0.5, 0.5], "policy": [1.0, 1.0, 0.375]}
    assert _bar_heights(axes[1]) == {"uniform": [1.0, 0.25, 0.25]}
    assert [t.get_text() for t in axes[0].get_xticklabels()] == ["first (dense)", "mid", "last"]


COMMITTED_CPU_LOG = Path(__file__).resolve().parents[1] / "results/cpu/logs/alexnet/results-alexnet-cpu.log"


@pytest.mark.skipif(not COMMITTED_CPU_LOG.exists(), reason="committed CPU run log absent")
def test_ranks_on_a_committed_run_log(tmp_path):
    """A real run: every compressed layer has a kept fraction strictly between 0 and 1, and the
    layers' MACs add up to each plan's own conv MACs factor."""
    jsonify(COMMITTED_CPU_LOG, tmp_path / "json")
    runs = load_runs(tmp_path / "json")
    png = plot_ranks(runs, "alexnet", tmp_path / "out")
    assert png is not None and png.stat().st_size > 10_000
    data = pd.read_csv(png.with_suffix(".csv"))
    methods = ["uniform", "energy", "vbmf", "random", "policy", "tpe", "policy_seeded"]
    assert data.groupby("method").size().to_dict() == dict.fromkeys(methods, 5)  # 5 conv layers each
    assert set(data.seed) == {0} and set(data.target) == {3.0} and set(data.dataset) == {"cifar10-jpeg"}
    compressed = data[data.compressed]
    assert len(compressed) >= 4 * len(methods)
    assert ((compressed.kept_fraction > 0) & (compressed.kept_fraction < 1)).all()
    assert data[~data.compressed].kept_fraction.eq(1.0).all()
    assert set(data[~data.compressed].layer) == {"features.0"}  # the first conv is not searched
    plans = {r["method"]: r["macs_factor"] for r in records_of(runs[0], "plan") if r.get("seed") == 0}
    totals = data.groupby("method")[["dense_macs", "macs"]].sum()
    for method, factor in plans.items():
        assert totals.dense_macs[method] / totals.macs[method] == pytest.approx(factor, rel=1e-9)


def test_accuracy_must_be_a_fraction(tmp_path):
    log = RunLog(tmp_path / "logs", "vgg16", "pct")
    write_final(log, test_top1_bn=91.2, metric="macs")
    jsonify(tmp_path / "logs", tmp_path / "json")
    with pytest.raises(ValueError, match=r"'pct'.*test_top1_bn=91.2"):
        summary_table(load_runs(tmp_path / "json"))


def test_cli_end_to_end(tmp_path, capsys, monkeypatch):
    build_logs(tmp_path / "logs", seed=1)
    jsonify(tmp_path / "logs", tmp_path / "json")
    out = tmp_path / "results"
    assert analyze_results.main(["--json", str(tmp_path / "json"), "--out", str(out)]) == 0
    assert (out / "summary.csv").stat().st_size > 0
    md = (out / "summary.md").read_text()
    assert f"python analyze_results.py --json {tmp_path / 'json'} --out {out}" in md
    pngs = sorted(p.stem for p in out.glob("*.png"))
    tables = ("summary", "policy_vs_rivals", "finetune_recovery")
    assert len(pngs) == 8 and sorted(p.stem for p in out.glob("*_*.csv") if not p.stem.startswith(tables)) == pngs
    assert len(pd.read_csv(out / "policy_vs_rivals.csv")) > 0
    printed = capsys.readouterr().out
    assert str(out / "summary.md") in printed and str(out / "ranks_vgg16.csv") in printed
    assert analyze_results.main(["--json", str(tmp_path / "nothing")]) == 2
    assert "not found" in capsys.readouterr().err
    # Without --out: the git-ignored out/analysis/ of the working folder.
    monkeypatch.chdir(tmp_path)
    assert analyze_results.DEFAULT_OUT == "out/analysis"
    assert analyze_results.main(["--json", "json"]) == 0
    assert (tmp_path / "out" / "analysis" / "summary.md").exists()


def _git(repo: Path, *args: str) -> None:
    subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True)


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_cli_refuses_to_replace_committed_results(tmp_path, capsys):
    """A folder of tracked files and a tracked README are replaced only with --overwrite-committed."""
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    committed = "committed summary\n"
    (repo / "results" / "summary.md").write_text(committed)
    (repo / "README.md").write_text(README)
    _git(repo, "init", "-q")
    _git(repo, "add", "results/summary.md", "README.md")
    build_logs(tmp_path / "logs")
    jsonify(tmp_path / "logs", tmp_path / "json")
    json_dir = str(tmp_path / "json")

    assert analyze_results.main(["--json", json_dir, "--out", str(repo / "results")]) == 2
    err = capsys.readouterr().err
    assert "tracked by git (results/summary.md)" in err and "--overwrite-committed" in err
    assert (repo / "results" / "summary.md").read_text() == committed
    assert sorted(p.name for p in (repo / "results").iterdir()) == ["summary.md"]  # nothing written

    readme_args = ["--json", json_dir, "--out", str(repo / "new"), "--readme", str(repo / "README.md")]
    assert analyze_results.main(readme_args) == 2
    assert "README.md is tracked by git" in capsys.readouterr().err
    assert (repo / "README.md").read_text() == README and not (repo / "new").exists()

    # A folder without tracked files (new, or ignored) needs no flag; the explicit flag allows both.
    assert analyze_results.main(["--json", json_dir, "--out", str(repo / "new")]) == 0
    assert analyze_results.main([*readme_args, "--overwrite-committed"]) == 0
    assert "old table" not in (repo / "README.md").read_text()
    args = ["--json", json_dir, "--out", str(repo / "results"), "--overwrite-committed"]
    assert analyze_results.main(args) == 0
    assert (repo / "results" / "summary.md").read_text().startswith("# Compression results")
    assert analyze_results.tracked_files(repo / "results") == ["results/summary.md"]
    assert analyze_results.tracked_files(tmp_path / "json") == []  # outside any repository


# --------------------------------------------------------------------------- speed-ups and metric


def test_cli_speedups_come_from_run_records_only(tmp_path, capsys):
    """One source of speed-ups: the final records; a latency table in <out> is not joined."""
    build_logs(tmp_path / "logs")
    jsonify(tmp_path / "logs", tmp_path / "json")
    out = tmp_path / "results"
    out.mkdir()
    (out / "latency_cpu.csv").write_text(
        "model,method,decomposition,target,setting,speedup\nresnet18,policy,ht2,3.0,cpu_b64,40.0\n"
    )
    args = ["--json", str(tmp_path / "json"), "--out", str(out)]
    assert analyze_results.main(args) == 0
    agg = pd.read_csv(out / "summary.csv")
    assert list(agg.columns) == list(AGGREGATE_COLUMNS)
    assert list(pd.read_csv(out / "summary_seeds.csv").columns) == list(SUMMARY_COLUMNS)
    policy3 = agg[(agg.run_id == "resnet18-main") & (agg.method == "policy") & (agg.target == 3.0)]
    # build_logs: policy is method 2, so cpu_t1 = 3.5 beats cpu_t4 = 1.2; CUDA 1.1 * 3.
    assert policy3.speedup_cpu.tolist() == [3.5] and policy3.speedup_cpu_setting.tolist() == ["cpu_t1"]
    assert policy3.speedup_cuda.tolist() == pytest.approx([3.3])
    md = (out / "summary.md").read_text()
    assert "speed-ups from the runs' `final` records." in md and "40.00×" not in md
    with pytest.raises(SystemExit):  # the option that joined latency tables is gone
        analyze_results.main([*args, "--latency", "none"])
    assert "--latency" in capsys.readouterr().err


def _metric_logs(root: Path, config_metric: str | None, final_metric: str | None) -> Path:
    """One run, one final record; the config (when given) and the record carry the metrics."""
    log = RunLog(root / "logs", "vgg16", "m")
    if config_metric is not None:
        log.write("config", model="vgg16", dataset="d", metric=config_metric, methods=["uniform"], seed=0)
    extra = {} if final_metric is None else {"metric": final_metric}
    write_final(log, **extra)
    jsonify(root / "logs", root / "json")
    return log.path


@pytest.mark.parametrize(
    ("config_metric", "final_metric", "expected"),
    [("macs", "params", "params"), ("params", None, "params"), (None, "macs", "macs")],
)
def test_metric_from_final_record_else_config(tmp_path, config_metric, final_metric, expected):
    _metric_logs(tmp_path, config_metric, final_metric)
    assert summary_table(load_runs(tmp_path / "json")).metric.tolist() == [expected]


def test_metric_missing_everywhere_names_the_run_file(tmp_path, capsys):
    log_path = _metric_logs(tmp_path, None, None)
    with pytest.raises(ValueError, match=rf"{log_path.name}.*'uniform'.*no 'metric'"):
        summary_table(load_runs(tmp_path / "json"))
    args = ["--json", str(tmp_path / "json"), "--out", str(tmp_path / "r")]
    assert analyze_results.main(args) == 2
    assert f"{log_path.as_posix()}: final record" in capsys.readouterr().err


# --------------------------------------------------------------------------- README block

README = f"""# Project

## Results

Intro sentence.

{README_BEGIN}
old table
{README_END}

## References
"""


def test_replace_marked_block_keeps_markers_and_surroundings():
    out = replace_marked_block(README, "new\n")
    assert out == README.replace("old table\n", "new\n")
    assert replace_marked_block(out, "new\n") == out
    with pytest.raises(ValueError, match="must not contain"):
        replace_marked_block(README, f"x\n{README_END}\n")


def _results_folders(root: Path, runs: list[dict]) -> Path:
    """A results tree with every folder the README block names: the table's folder holds ``runs``'
    summary (``write_summary``), the others nothing (an empty folder reads as no rows)."""
    for name in dict.fromkeys([README_TABLE, *(f for f, _ in README_GRID)]):
        (root / name).mkdir(parents=True, exist_ok=True)
    write_summary(summary_table(runs), root / README_TABLE)
    return root


def test_readme_update_idempotent_via_cli(tmp_path, monkeypatch, runs):
    results = _results_folders(tmp_path / "results", runs)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    args = ["--readme", str(readme), "--results", str(results)]
    assert analyze_results.main(args) == 0
    once = readme.read_text()
    assert analyze_results.main(args) == 0
    assert readme.read_text() == once
    assert once.startswith("# Project\n\n## Results\n\nIntro sentence.\n\n" + README_BEGIN + "\n")
    assert once.endswith(README_END + "\n\n## References\n") and "old table" not in once
    assert "2030" not in once and "UTC" not in once  # undated: it changes only when the results do
    table = [line for line in once.splitlines() if line.startswith("| ") and "|" in line[2:]]
    rows = [line for line in table if re.match(r"\| (ResNet18|VGG16) \| 3× \| (uniform|random|policy) \|", line)]
    # the table's HT-2 rows at 3x: each main run's methods and each "-old" run's policy
    assert len(rows) == len(MODELS) * (len(METHODS) + 1)
    # build_logs's best method per model is always the policy (1 pp ahead of random)
    assert "`policy` on ResNet18 3×" in once and "`policy` on VGG16 2×" in once
    # the grid: one row per model x budget x stage with margins; build_logs has one seed (no interval)
    grid = [line for line in table if " | BN | GPU, 3 ep. |" in line]
    assert len(grid) == len(MODELS) * len(TARGETS)
    assert all("· +1.00" in line and line.endswith("| no interval: random, uniform |") for line in grid)
    # alongside an analysis (--json), the block is written from the results folders too
    out = tmp_path / "out"
    args = ["--json", str(tmp_path / "json"), "--out", str(out), "--readme", str(readme), "--results", str(results)]
    build_logs(tmp_path / "logs")
    jsonify(tmp_path / "logs", tmp_path / "json")
    monkeypatch.setattr(analysis_summary, "utc_now", lambda: datetime(2030, 1, 2, 3, 4, tzinfo=UTC))
    assert analyze_results.main(args) == 0
    assert readme.read_text() == once and "on 2030-01-02 03:04 UTC" in (out / "summary.md").read_text()


def test_verdict_grid_reads_the_first_folder_with_each_cell():
    def margins(rows):
        base = {"model": "m", "target": 3.0, "policy": "policy"}
        return pd.DataFrame([{**base, **r} for r in rows])

    first = margins(
        [
            {
                "rival": "uniform",
                "margin_ft": 0.5,
                "verdict_ft": "policy ahead",
                "margin_bn": 0.2,
                "verdict_bn": "within noise",
                "verdict_both_bn": "policy behind",
            },
            {"rival": "energy", "margin_ft": -0.3, "verdict_ft": "policy behind"},
        ]
    )
    second = margins(
        [
            {"rival": r, "margin_bn": 1.0, "verdict_bn": "policy ahead", "margin_ft": 9.0, "verdict_ft": "policy ahead"}
            for r in ("uniform", "energy", "vbmf", "random", "tpe")
        ]
    )
    grid = verdict_grid({"a": {"margins": first}, "b": {"margins": second}, "c": {"margins": pd.DataFrame()}})
    assert grid[["stage", "source"]].values.tolist() == [["BN", "a"], ["FT", "a"]]
    bn, ft = grid.to_dict("records")
    # the interval over seeds and test images decides where known (ⁱ), else the seed interval
    assert bn["uniform"] == "↓ +0.20ⁱ" and bn["energy"] == "–" and bn["claim"] == "**behind** uniform"
    assert ft["uniform"] == "↑ +0.50" and ft["energy"] == "↓ -0.30" and ft["claim"] == "**behind** energy"
    grid = verdict_grid({"b": {"margins": second}})
    assert grid.claim.tolist() == ["ahead of all 5", "ahead of all 5"]


def test_readme_missing_markers_leaves_file_untouched(tmp_path, capsys):
    build_logs(tmp_path / "logs")
    jsonify(tmp_path / "logs", tmp_path / "json")
    readme = tmp_path / "README.md"
    text = README.replace(README_END + "\n", "")
    readme.write_text(text)
    before = readme.stat().st_mtime_ns
    with pytest.raises(ValueError, match=rf"{readme.name}.*{README_BEGIN}.*{README_END}"):
        update_readme(readme, "block\n")
    args = ["--json", str(tmp_path / "json"), "--out", str(tmp_path / "r"), "--readme", str(readme)]
    assert analyze_results.main(args) == 2
    assert README_END in capsys.readouterr().err
    assert readme.read_text() == text and readme.stat().st_mtime_ns == before
    assert not (tmp_path / "r").exists()  # failed before writing anything


def _one_config_run(folder: Path, **device: str) -> list[dict]:
    """The run documents of one log holding a single ``config`` record with these device fields."""
    log = RunLog(folder / "logs", "alexnet", "r")
    log.write("config", model="alexnet", dataset="d", metric="macs", methods=["uniform"], seed=0, **device)
    del log
    jsonify(folder / "logs", folder / "json")
    return load_runs(folder / "json")


def test_runs_table_names_the_cpu_model(tmp_path):
    # a CPU run names its CPU model (logged as `cpu` since 2026-12-07)
    cpu_runs = _one_config_run(tmp_path / "cpu", device_name="cpu", cpu="AMD EPYC", machine="x86_64", torch="2.14.1")
    assert runs_table(cpu_runs)[0]["device"] == "AMD EPYC"


def _doc(*records: dict) -> dict:
    return {"run_id": "r", "model": "m", "records": [dict(r, t=float(i), seq=i) for i, r in enumerate(records)]}


def test_run_context_dataset_and_checkpoint_fingerprint():
    path = "/data/ckpt/cifar10-jpeg/alexnet.pt"
    config = {"kind": "config", "dataset": "cifar10-jpeg", "checkpoint": "auto"}
    base = {"kind": "baseline", "checkpoint": path}
    assert run_context(_doc(config, base)) == {
        "model": "m",
        "dataset": "cifar10-jpeg",
        "checkpoint": "alexnet.pt",  # no hash logged: the file name ("auto" names no file)
        "run_id": "r",
    }
    digest = "0123456789abcdef" * 4
    assert checkpoint_fingerprint(_doc(config, dict(base, checkpoint_sha256=digest))) == digest[:12]
    assert checkpoint_fingerprint(_doc(dict(config, checkpoint=path))) == "alexnet.pt"
    assert checkpoint_fingerprint(_doc(dict(config, checkpoint=None), dict(base, checkpoint=None))) == "random init"
    assert checkpoint_fingerprint(_doc()) is None and run_context(_doc())["dataset"] is None


def test_policy_margins_names_the_winning_rival():
    from common.analysis import policy_margins

    rows = [
        ("policy", "ht2", 0.80, 0.85),
        ("uniform", "ht2", 0.81, 0.84),
        ("energy", "ht2", 0.79, float("nan")),
        ("vbmf", "ht2", 0.70, 0.83),
        ("policy", "tucker2", 0.99, 0.99),
    ]
    df = pd.DataFrame(
        [
            {"model": "m", "target": 3.0, "method": m, "decomposition": d, "test_top1_bn": bn, "test_top1_ft": ft}
            for m, d, bn, ft in rows
        ]
    )
    out = policy_margins(df)
    assert len(out) == 1
    r = out.iloc[0]
    assert r["best_rival_bn"] == "uniform" and r["margin_bn"] == pytest.approx(-1.0)
    assert r["best_rival_ft"] == "uniform" and r["margin_ft"] == pytest.approx(1.0)
    assert policy_margins(df[df["method"] != "policy"]).empty


def test_policy_margins_one_row_per_policy_run():
    from common.analysis import policy_margins

    accs = {"policy": 0.80, "policy_seeded": 0.83, "uniform": 0.81, "energy": 0.82}
    df = pd.DataFrame(
        [
            {"model": "m", "target": 3.0, "method": m, "decomposition": "ht2", "seed": 0, "test_top1_bn": a}
            for m, a in accs.items()
        ]
    )
    out = policy_margins(df)
    assert list(out["policy"]) == ["policy", "policy_seeded"]
    assert list(out["best_rival_bn"]) == ["energy", "energy"]  # neither policy is the other's rival
    assert list(out["margin_bn"]) == pytest.approx([-2.0, 1.0])
    only_seeded = policy_margins(df[df["method"] != "policy"])
    assert list(only_seeded["policy"]) == ["policy_seeded"]


# --------------------------------------------------------------------------- several seeds

# Per method, per seed 0, 1, 2: (test_top1_bn, test_top1_ft, macs_factor); dense test is 0.91.
SEED_RESULTS = {
    "uniform": [(0.79, 0.84, 3.0), (0.80, 0.85, 3.0), (0.80, 0.88, 3.0)],
    "policy": [(0.80, 0.85, 3.0), (0.82, 0.86, 3.1), (0.84, 0.90, 3.2)],
}


def build_seed_logs(root: Path) -> None:
    """One multi-seed run (resnet18, target 3, three seeds) with score-carrying search records."""
    log = RunLog(root, "resnet18", "seeds")
    log.write(
        "config",
        model="resnet18",
        dataset="d",
        metric="macs",
        methods=list(SEED_RESULTS),
        seed=0,
        seeds=[0, 1, 2],
    )
    log.write("baseline", val_top1=0.92, test_top1=0.91, params=1000, macs=1300)
    for seed in (0, 1):
        for level in (0.5, 1.0):
            log.write(
                "sensitivity",
                layer="layer1.conv",
                level=level,
                ranks=[1],
                val_top1=0.5,
                score=-(1.0 - level) - 10 * seed,
                macs=1,
                params=1,
                seed=seed,
            )
        for index in range(3):
            log.write(
                "candidate",
                method="policy",
                target=3.0,
                decomposition="ht2",
                index=index,
                val_top1=0.5,
                score=float(index) - 10 * seed,
                macs_factor=3.0,
                params_factor=3.0,
                seed=seed,
            )
    # A seed-1 policy result that a later record of the same seed supersedes.
    write_final(log, "policy", 3.0, 0.1, 3.0, seed=1)
    for method, per_seed in SEED_RESULTS.items():
        for seed, (bn, ft, macs) in enumerate(per_seed):
            log.write(
                "final",
                method=method,
                target=3.0,
                decomposition="ht2",
                seed=seed,
                val_top1_bn=bn,
                test_top1_bn=bn,
                val_top1_ft=ft,
                test_top1_ft=ft,
                macs_factor=macs,
                params_factor=2.0,
                speedup={"cpu_b64": 1.0 + seed},
            )
    log.write("end", status="ok", wall_seconds=1.0)


@pytest.fixture()
def seed_runs(tmp_path) -> list[dict]:
    build_seed_logs(tmp_path / "logs")
    jsonify(tmp_path / "logs", tmp_path / "json")
    return load_runs(tmp_path / "json")


def test_equal_seeds_aggregate_to_their_value_and_a_zero_std(seed_runs):
    per_seed = summary_table(seed_runs)
    # AlexNet energy on the GPU: no BN, three equal seeds; the dense model's accuracy is the same on every row
    equal = per_seed.assign(test_top1_bn=0.8408, baseline_test_top1=0.8408)
    assert pd.Series([0.8408] * 3).std() > 0 and pd.Series([0.8408] * 3).mean() != 0.8408  # float rounding alone
    row = aggregate_seeds(equal).iloc[0]
    assert row.test_top1_bn_mean == 0.8408 and row.test_top1_bn_std == 0.0 and row.baseline_test_top1 == 0.8408
    one = aggregate_seeds(equal[equal.seed == 0]).iloc[0]
    assert one.test_top1_bn_mean == 0.8408 and math.isnan(one.test_top1_bn_std)  # one seed: no std


def test_aggregate_three_seeds_by_hand(seed_runs, tmp_path):
    per_seed = summary_table(seed_runs)
    assert len(per_seed) == 6 and sorted(set(per_seed.seed)) == [0, 1, 2]
    policy = per_seed[per_seed.method == "policy"]
    assert list(policy.test_top1_bn) == pytest.approx([0.80, 0.82, 0.84])  # superseded 0.1 lost

    agg = aggregate_seeds(per_seed)
    assert list(agg.columns) == list(AGGREGATE_COLUMNS) and len(agg) == 2
    assert list(agg.method) == ["uniform", "policy"]  # METHOD_ORDER, not alphabetical
    row = agg[agg.method == "policy"].iloc[0]
    assert row.n_seeds == 3 and row.seeds == "0;1;2"
    # BN 0.80, 0.82, 0.84: deviations -0.02, 0, +0.02, so var = 0.0008 / 2.
    assert row.test_top1_bn_mean == pytest.approx(0.82)
    assert row.test_top1_bn_std == pytest.approx(0.02)
    # FT 0.85, 0.86, 0.90: deviations -0.02, -0.01, +0.03, so var = 0.0014 / 2.
    assert row.test_top1_ft_mean == pytest.approx(0.87)
    assert row.test_top1_ft_std == pytest.approx(math.sqrt(0.0007))
    # Δ = 100 * (FT - 0.91) = -6, -5, -1 pp: mean -4, deviations -2, -1, +3, var = 14 / 2.
    assert row.delta_pp_mean == pytest.approx(-4.0)
    assert row.delta_pp_std == pytest.approx(math.sqrt(7.0))
    assert row.macs_factor == pytest.approx(3.1) and row.params_factor == pytest.approx(2.0)
    assert row.speedup_cpu == pytest.approx(2.0) and row.speedup_cpu_setting == "cpu_b64"
    assert row.run_id == "seeds"

    csv_path, md_path, seeds_path, rivals_path, recovery_path = write_summary(per_seed, tmp_path / "out")
    back = pd.read_csv(csv_path)
    assert list(back.columns) == list(AGGREGATE_COLUMNS) and list(back.n_seeds) == [3, 3]
    assert back.test_top1_bn_std.iloc[1] == pytest.approx(0.02)
    assert len(pd.read_csv(seeds_path)) == 6 and rivals_path.exists()
    md = md_path.read_text()
    policy_line = next(line for line in md.splitlines() if line.startswith("| resnet18 | d | – | seeds | policy |"))
    assert "| 3 |" in policy_line and "| 82.00 ± 2.00 |" in policy_line
    assert f"| 87.00 ± {100 * math.sqrt(0.0007):.2f} |" in policy_line
    assert f"| -4.00 ± {math.sqrt(7.0):.2f} |" in policy_line
    assert "(3 seeds per configuration)" in md
    # Six finetuned plans (2 methods x 3 seeds): one recovery row, and its section in the Markdown.
    recovery = pd.read_csv(recovery_path)
    assert list(recovery.columns) == list(RECOVERY_COLUMNS) and recovery.n_plans.tolist() == [6]
    assert "## What finetuning recovers" in md

    shown = current_table(back)
    assert "mean ± std over 3 seeds per configuration" in seed_sentence(shown)
    policy = shown[shown.method == "policy"].iloc[0]
    assert policy.test_top1_bn == "82.00 ± 2.00" and policy.delta_pp == f"-4.00 ± {math.sqrt(7.0):.2f}"


_ACCS = {"policy": {0: 0.800, 1: 0.812, 2: 0.825}, "tpe": {0: 0.790, 1: 0.800, 2: 0.815}, "energy": {0: 0.795}}
"""Test accuracy per method and seed of the margin tests (each adds its uniform)."""


def _margin_frame(accs: dict, finetuned=lambda method, acc: float("nan")) -> pd.DataFrame:
    """Per-seed rows of one run ("m", 3x, HT-2): ``accs[method][seed]`` test accuracy after BN,
    ``finetuned(method, acc)`` after finetuning."""
    return pd.DataFrame(
        [
            {
                "model": "m",
                "target": 3.0,
                "method": method,
                "decomposition": "ht2",
                "seed": seed,
                "test_top1_bn": acc,
                "test_top1_ft": finetuned(method, acc),
            }
            for method, per_seed in accs.items()
            for seed, acc in per_seed.items()
        ]
    )


def test_policy_margin_paired_interval_policy_ahead():
    # tpe has the best mean (80.17 %) though energy beats it on seed 0, energy's only seed.
    df = _margin_frame(_ACCS | {"uniform": {0: 0.700, 1: 0.710, 2: 0.720}})
    r = policy_margins(df).iloc[0]
    # Paired differences 1.0, 1.2, 1.0 pp; t(0.975, 2) = 4.302653 from the tables.
    mean = 3.2 / 3
    sd = math.sqrt(((1.0 - mean) ** 2 * 2 + (1.2 - mean) ** 2) / 2)
    half = 4.302652729749464 * sd / math.sqrt(3)
    assert r["best_rival_bn"] == "tpe" and r["n_bn"] == 3
    assert r["margin_bn"] == pytest.approx(mean)
    assert (r["ci_low_bn"], r["ci_high_bn"]) == pytest.approx((mean - half, mean + half))
    assert r["ci_low_bn"] > 0 and r["verdict_bn"] == "policy ahead"
    assert r["each_rival_bn"] == "uniform +10.23, energy +0.50, tpe +1.07"
    assert r["best_rival_ft"] is None and r["n_ft"] == 0 and r["verdict_ft"] is None
    assert math.isnan(r["margin_ft"])


def test_does_the_policy_win_is_one_narrow_table_per_stage():
    """The section once was one 26-column table (every column of BN and FT side by side): now a table per
    stage measured, each with the best rival's margin, interval and verdict in one cell."""
    df = _margin_frame(_ACCS | {"uniform": {0: 0.700, 1: 0.710, 2: 0.720}}, finetuned=lambda method, acc: acc + 0.01)
    section = "\n".join(analysis_summary.margins_section(policy_margins(df)))
    assert section.count("### ") == 2 and "### After BN recalibration (BN)" in section
    bn, ft = section.split("### After BN recalibration (BN)")[1].split("### After finetuning (FT)")
    for table in (bn, ft):
        header = next(line for line in table.splitlines() if line.startswith("| "))
        assert header.count("|") - 1 <= 12, header
        assert header.startswith("| Model | Run | Target | Policy | Best rival | Margin (pp) [95 % CI] | Seeds |")
    r = policy_margins(df).iloc[0]
    cell = f"{r['margin_bn']:+.2f} [{r['ci_low_bn']:+.2f}, {r['ci_high_bn']:+.2f}] ahead"
    assert f"| tpe | {cell} | 3 |" in bn
    # no finetuning anywhere: the BN table alone
    alone = "\n".join(analysis_summary.margins_section(policy_margins(_margin_frame(_ACCS))))
    assert "### After BN recalibration (BN)" in alone and "### After finetuning" not in alone


def test_finetune_recovery_of_equal_gains_warns_nothing_and_says_why(recwarn):
    """Finetuning that gained the same on every plan (the digits demo: no prediction changed) once made
    scipy's Theil-Sen interval take the square root of a negative variance and print a RuntimeWarning."""
    dense, bn = 0.99, [0.98, 0.98, 0.97]
    rows = [
        {"run_id": "r", "method": m, "seed": 0, "decomposition": "ht2", "target": 20.0}
        | {"test_top1_bn": b, "test_top1_ft": b, "baseline_test_top1": dense}
        for m, b in zip(("policy", "uniform", "energy"), bn)
    ]
    (row,) = finetune_recovery(pd.DataFrame(rows)).itertuples()
    assert [str(w.message) for w in recwarn] == []
    assert row.slope == 0.0 and math.isnan(row.slope_low) and math.isnan(row.kendall_tau)
    assert row.note == "every plan gained the same: no interval, no rank correlation"
    section = "\n".join(analysis_summary.recovery_section(finetune_recovery(pd.DataFrame(rows))))
    assert "| 0.00 | – | every plan gained the same" in section and "nan" not in section


def test_rival_margins_test_each_rival_not_only_the_best_and_show_in_the_summary():
    # tpe has the best mean, but the policy is compared with every rival, each paired over its own seeds.
    accs = _ACCS | {"uniform": {0: 0.805, 1: 0.818, 2: 0.8295}}
    df = _margin_frame(accs, finetuned=lambda method, acc: acc + 0.01 if method != "energy" else float("nan"))
    r = rival_margins(df).set_index("rival")
    assert list(r.index) == ["uniform", "energy", "tpe"]  # POLICY_RIVALS order, those run
    # uniform: -0.5, -0.6, -0.45 pp; t(0.975, 2) = 4.302653
    d = [-0.5, -0.6, -0.45]
    mean = sum(d) / 3
    half = 4.302652729749464 * math.sqrt(sum((x - mean) ** 2 for x in d) / 2) / math.sqrt(3)
    assert r.loc["uniform", "margin_bn"] == pytest.approx(mean)
    assert (r.loc["uniform", "ci_low_bn"], r.loc["uniform", "ci_high_bn"]) == pytest.approx((mean - half, mean + half))
    assert r.loc["uniform", "verdict_bn"] == "policy behind" and r.loc["tpe", "verdict_bn"] == "policy ahead"
    assert r.loc["energy", "n_bn"] == 1 and r.loc["energy", "verdict_bn"] == "1 seed: no interval"
    assert r.loc["energy", "n_ft"] == 0 and math.isnan(r.loc["energy", "margin_ft"])
    assert r.loc["uniform", "margin_ft"] == pytest.approx(mean)  # every method +1 pp after finetuning
    lines = analysis_summary.rivals_section(rival_margins(df))
    table = "\n".join(lines)
    assert lines[0] == "### Against each rival"
    assert (
        f"| m | – | 3.00× | policy | uniform | {mean:+.2f} [{mean - half:+.2f}, {mean + half:+.2f}] behind |" in table
    )
    assert "| energy | +0.50 | – |" in table  # one seed: a margin without interval or verdict
    assert analysis_summary.rivals_section(rival_margins(df[df.method != "policy"])) == []


def test_joint_intervals_widen_over_the_rivals_of_a_cell_and_every_rival_needs_each_interval():
    # uniform and tpe have three paired seeds, energy one: the family is k = 2 at both stages.
    accs = _ACCS | {"uniform": {0: 0.805, 1: 0.818, 2: 0.8295}}
    df = _margin_frame(accs, finetuned=lambda method, acc: acc + 0.01 if method != "energy" else float("nan"))
    r = rival_margins(df).set_index("rival")
    assert list(r["k_bn"]) == [2, 2, 2] and list(r["k_ft"]) == [2, 2, 2]
    # tpe: +1.0, +1.2, +1.0 pp; t(1 - 0.025 / 2, 2) = 6.205347 (scipy.stats.t.ppf(0.9875, 2)).
    d = [1.0, 1.2, 1.0]
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    joint = 6.205346816570706 * sd / math.sqrt(3)
    assert (r.loc["tpe", "ci_low_bonf_bn"], r.loc["tpe", "ci_high_bonf_bn"]) == pytest.approx(
        (mean - joint, mean + joint)
    )
    # Wider than the per-rival interval, and here still clear of 0; energy's single seed has none.
    assert r.loc["tpe", "ci_low_bonf_bn"] < r.loc["tpe", "ci_low_bn"]
    assert r.loc["tpe", "verdict_bonf_bn"] == "policy ahead"
    assert math.isnan(r.loc["energy", "ci_low_bonf_bn"]) and r.loc["energy", "verdict_bonf_bn"] == "1 seed: no interval"
    table = "\n".join(analysis_summary.rivals_section(rival_margins(df)))
    assert f"[{mean - joint:+.2f}, {mean + joint:+.2f}] k = 2 ahead" in table
    # The claim over all rivals: uniform stops it (behind), energy has one seed.
    m = policy_margins(df).iloc[0]
    assert m["every_rival_bn"] == "behind uniform; 1 seed: energy"
    assert m["every_rival_ft"] == "behind uniform"  # energy was not finetuned: not a rival at FT
    assert "| behind uniform; 1 seed: energy |" in "\n".join(analysis_summary.margins_section(policy_margins(df)))
    # A margin whose per-rival interval just clears 0 can lose it jointly: 0.3 +- 0.1 pp over 3 seeds.
    wide = _margin_frame(
        {
            "policy": {0: 0.803, 1: 0.802, 2: 0.804},
            "uniform": {0: 0.800, 1: 0.800, 2: 0.800},
            "tpe": {0: 0.790, 1: 0.791, 2: 0.792},
        }
    )
    w = rival_margins(wide).set_index("rival")
    assert w.loc["uniform", "verdict_bn"] == "policy ahead" and w.loc["uniform", "verdict_bonf_bn"] == "within noise"
    assert policy_margins(wide).iloc[0]["every_rival_bn"] == "ahead of all 2"


def test_bonferroni_level_and_every_rival_verdict():
    assert bonferroni_level(0.95, 1) == pytest.approx(0.95)
    assert bonferroni_level(0.95, 5) == pytest.approx(0.99)
    with pytest.raises(ValueError, match="k must be at least 1"):
        bonferroni_level(0.95, 0)
    with pytest.raises(ValueError, match=r"level must lie in \(0, 1\)"):
        bonferroni_level(1.0, 2)
    assert every_rival_verdict({"uniform": "policy ahead", "tpe": "policy ahead", "vbmf": None}) == "ahead of all 2"
    assert (
        every_rival_verdict({"uniform": "within noise", "energy": "policy behind", "tpe": "within noise"})
        == "behind energy; within noise of uniform, tpe"
    )
    assert every_rival_verdict({"uniform": None}) is None and every_rival_verdict({}) is None


def test_margins_show_how_many_more_macs_the_policy_keeps():
    # tpe is the best rival; the policy's plans are 2 % and 4 % more expensive on the paired seeds 0
    # and 1 (seed 2 has no tpe partner); energy's plans are the policy's cost on seed 0.
    df = _margin_frame({"policy": {0: 0.80, 1: 0.81, 2: 0.82}, "tpe": {0: 0.79, 1: 0.80}, "energy": {0: 0.70}})
    policy_factor = {0: 3.0 / 1.02, 1: 3.0 / 1.04, 2: 2.0}
    df["macs_factor"] = [policy_factor[s] if m == "policy" else 3.0 for m, s in zip(df["method"], df["seed"])]
    assert macs_pct(pd.Series({0: 2.0, 1: 3.0}), pd.Series({1: 3.3, 5: 1.0})) == pytest.approx(10.0)
    assert math.isnan(macs_pct(pd.Series({0: 2.0}), pd.Series({1: 2.0})))
    r = policy_margins(df).iloc[0]
    assert r["best_rival_bn"] == "tpe" and r["macs_pct_bn"] == pytest.approx(3.0)  # mean of +2, +4
    assert math.isnan(r["macs_pct_ft"])  # nothing finetuned: no rival, no cost comparison
    each = rival_margins(df).set_index("rival")["macs_pct"]
    assert each["tpe"] == pytest.approx(3.0) and each["energy"] == pytest.approx(2.0)
    assert "| +3.0 % |" in "\n".join(analysis_summary.margins_section(policy_margins(df)))
    table = "\n".join(analysis_summary.rivals_section(rival_margins(df)))
    assert "| Policy MACs vs rival |" in table and "| energy | +2.0 % | +10.00 |" in table
    # Rows without MACs factors (matched_macs.py's) keep the margins and leave the cost column out.
    no_macs = rival_margins(df.drop(columns="macs_factor"))
    assert no_macs["macs_pct"].isna().all() and no_macs["margin_bn"].notna().all()
    assert "Policy MACs" not in "\n".join(analysis_summary.rivals_section(no_macs))


def test_policy_margin_sign_changes_are_within_noise():
    # Differences +0.5, -0.3, +0.1 pp; uniform's seed 3 has no policy partner and is not paired.
    policy = {0: 0.805, 1: 0.797, 2: 0.801}
    uniform = {0: 0.800, 1: 0.800, 2: 0.800, 3: 0.900}
    df = pd.DataFrame(
        [
            {"model": "m", "target": 2.0, "method": "policy", "decomposition": "ht2", "seed": s, "test_top1_bn": a}
            for s, a in policy.items()
        ]
        + [
            {"model": "m", "target": 2.0, "method": "uniform", "decomposition": "ht2", "seed": s, "test_top1_bn": a}
            for s, a in uniform.items()
        ]
    )
    r = policy_margins(df).iloc[0]
    # mean 0.1; deviations 0.4, -0.4, 0: sd = sqrt(0.32 / 2) = 0.4.
    half = 4.302652729749464 * 0.4 / math.sqrt(3)
    assert r["n_bn"] == 3 and r["margin_bn"] == pytest.approx(0.1)
    assert (r["ci_low_bn"], r["ci_high_bn"]) == pytest.approx((0.1 - half, 0.1 + half))
    assert r["verdict_bn"] == "within noise"
    assert paired_interval([0.5, -0.3, 0.1]) == pytest.approx((0.1, 0.1 - half, 0.1 + half))
    mean, low, high = paired_interval([0.7])
    assert mean == 0.7 and math.isnan(low) and math.isnan(high)
    assert margin_verdict(low, high, 1) == "1 seed: no interval"
    assert margin_verdict(-2.0, -0.5, 3) == "policy behind"
    assert margin_verdict(math.nan, math.nan, 0) is None


def test_old_records_without_seed_make_a_one_seed_table(runs, tmp_path):
    per_seed = summary_table(runs)
    agg = aggregate_seeds(per_seed)
    assert len(agg) == len(per_seed) and (agg.n_seeds == 1).all() and (agg.seeds == "0").all()
    assert np.allclose(agg.test_top1_bn_mean, per_seed.test_top1_bn)
    assert agg.test_top1_bn_std.isna().all() and agg.delta_pp_std.isna().all()
    margins = policy_margins(per_seed)
    assert len(margins) == len(MODELS) * len(TARGETS)
    assert (margins.n_bn == 1).all() and (margins.verdict_bn == "1 seed: no interval").all()
    assert margins.ci_low_bn.isna().all()
    # The best rival of build_logs is always "random" (method index 1), 1 pp behind the policy.
    assert (margins.best_rival_bn == "random").all()
    assert np.allclose(margins.margin_bn, 1.0)
    shown = current_table(agg)
    assert not shown.test_top1_bn.str.contains("±").any() and seed_sentence(shown) == "One seed per configuration."

    # Without final.seed, a run's config seed is the seed.
    log = RunLog(tmp_path / "logs", "alexnet", "seed5")
    log.write("config", model="alexnet", dataset="d", metric="macs", methods=["uniform"], seed=5)
    write_final(log)
    jsonify(tmp_path / "logs", tmp_path / "json")
    df = summary_table(load_runs(tmp_path / "json"))
    assert list(df.seed) == [5] and aggregate_seeds(df).seeds.tolist() == ["5"]


def test_multi_seed_plots_use_scores_and_lowest_seed(seed_runs, tmp_path, monkeypatch):
    fig, data = _drawn(monkeypatch, plot_sensitivity, seed_runs, "resnet18", tmp_path)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "proxy score (higher is better)"
    assert [list(line.get_ydata()) for line in ax.lines] == [[-0.5, 0.0]]  # seed 0, no dense line
    assert list(data.columns) == list(SENSITIVITY_PLOT_COLUMNS)
    assert data[["seed", "layer", "level", "proxy", "value"]].values.tolist() == [
        [0, "layer1.conv", 0.5, "score", -0.5],
        [0, "layer1.conv", 1.0, "score", 0.0],
    ]

    fig, data = _drawn(monkeypatch, plot_search_trace, seed_runs, "resnet18", tmp_path)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "proxy score (higher is better)"
    assert [list(line.get_ydata()) for line in ax.lines] == [[0.0, 1.0, 2.0]]
    assert list(data.columns) == list(SEARCH_PLOT_COLUMNS)
    assert data.evaluation.tolist() == [1, 2, 3] and data.value.tolist() == data.best_so_far.tolist() == [0, 1, 2]
    assert set(data.seed) == {0} and set(data.method) == {"policy"}

    fig, data = _drawn(monkeypatch, plot_acc_vs_macs, seed_runs, "resnet18", tmp_path)
    ax = fig.axes[0]
    bars = [c for c in ax.containers if getattr(c, "has_yerr", False)]
    assert len(bars) == 4  # BN and FT of both methods, each with std error bars
    policy_bn = next(c for c in bars if c.get_label() == "policy, BN recal.")
    assert list(policy_bn.lines[0].get_ydata()) == pytest.approx([82.0])
    assert "resnet18 on d" in ax.get_title() and "run seeds" in ax.get_title()
    # The data drawn: per method and stage one point, mean ± std over the 3 seeds; one target only,
    # so no Pareto front at all (it would only reward overshooting the budget).
    assert list(data.columns) == list(ACC_PLOT_COLUMNS)
    points = {(r.method, r.stage): (r.test_top1_mean, r.test_top1_std, r.n_seeds) for r in data.itertuples()}
    assert points[("policy", "bn")] == pytest.approx((0.82, 0.02, 3))
    # uniform FT 0.84, 0.85, 0.88: deviations -1/60, -1/150, +7/300, var = 0.0013 / 3.
    assert points[("uniform", "ft")] == pytest.approx((2.57 / 3, math.sqrt(0.0013 / 3), 3))
    assert len(points) == 4 and not data.pareto_front.any() and (data.dense_test_top1 == 0.91).all()
    assert not [line for line in ax.lines if "Pareto" in line.get_label()]
    # factors of one budget differ in the 4th digit: the ticks show them whole, not as offsets from 2 or 3
    assert ax.xaxis.get_major_formatter().get_useOffset() is False


def test_legacy_search_records_keep_val_accuracy_and_every_candidate(runs, tmp_path, monkeypatch):
    fig, data = _drawn(monkeypatch, plot_search_trace, runs, "vgg16", tmp_path)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "validation top-1 (%)"
    # build_logs's candidate.seed is a per-candidate seed (0..11), not a run seed: all 12 count.
    assert [len(line.get_ydata()) for line in ax.lines] == [12] * 4
    assert data.groupby(["method", "target"]).size().tolist() == [12] * 4
    assert set(data.proxy) == {"val_top1"} and data.value.between(0.3, 0.8).all()  # fractions in the CSV
    drawn = np.concatenate([line.get_ydata() for line in ax.lines])
    assert np.allclose(np.sort(drawn), np.sort(100 * data.best_so_far))  # drawn in %
    fig, data = _drawn(monkeypatch, plot_sensitivity, runs, "vgg16", tmp_path)
    ax = fig.axes[0]
    assert ax.get_ylabel() == "validation top-1 (%)"
    assert ax.lines[-1].get_label().startswith("dense (")  # dense line only for accuracies
    assert data.groupby("layer").size().to_dict() == {"layer1.conv": 3, "layer2.conv": 3}


def _acc_run(log: RunLog, results: dict[tuple[str, float], tuple[float, float]], checkpoint: str) -> None:
    """One run of final records: ``{(method, target): (macs_factor, test_top1_bn)}``."""
    log.write("config", model="vgg16", dataset="cifar10-jpeg", metric="macs", methods=["uniform"], seed=0)
    log.write("baseline", val_top1=0.9, test_top1=0.9, params=1, macs=1, checkpoint=checkpoint)
    for (method, target), (factor, acc) in results.items():
        write_final(log, method, target, acc, factor, metric="macs")


def test_pareto_front_only_across_budgets(tmp_path, monkeypatch):
    """One budget: no front (the method that overshot 3× most would be "on" it); several: the
    front across budgets, each budget represented by its most accurate point; one panel per run."""
    single = {("policy", 3.0): (2.96, 0.85), ("vbmf", 3.0): (3.07, 0.80)}
    _acc_run(RunLog(tmp_path / "logs", "vgg16", "one-budget"), single, "/c/a.pt")
    several = {
        ("policy", 2.0): (1.98, 0.88),
        ("uniform", 2.0): (2.04, 0.87),
        ("policy", 3.0): (2.96, 0.85),
        ("vbmf", 3.0): (3.07, 0.80),
        ("uniform", 5.0): (5.0, 0.70),
    }
    _acc_run(RunLog(tmp_path / "logs", "vgg16", "three-budgets"), several, "/c/b.pt")
    jsonify(tmp_path / "logs", tmp_path / "json")
    fig, data = _drawn(monkeypatch, plot_acc_vs_macs, load_runs(tmp_path / "json"), "vgg16", tmp_path)
    assert len(fig.axes) == 2  # one panel per run
    one, three = (data[data.run_id == r] for r in ("one-budget", "three-budgets"))
    assert len(one) == 2 and not one.pareto_front.any()
    front = three[three.pareto_front].sort_values("macs_factor")
    assert list(zip(front.method, front.target)) == [("policy", 2.0), ("policy", 3.0), ("uniform", 5.0)]
    assert set(three.checkpoint) == {"b.pt"} and set(one.checkpoint) == {"a.pt"}
    fronts = {ax.get_title().split("\n")[1]: [ln for ln in ax.lines if "Pareto" in ln.get_label()] for ax in fig.axes}
    assert fronts["run one-budget, checkpoint a.pt"] == []
    (drawn,) = fronts["run three-budgets, checkpoint b.pt"]
    assert list(drawn.get_xdata()) == [1.98, 2.96, 5.0] and list(drawn.get_ydata()) == pytest.approx([88, 85, 70])


def test_series_hidden_under_another_is_drawn_hollow_and_named(tmp_path, monkeypatch):
    """policy_seeded picking the policy's plan at every budget draws the same points: it is drawn as a
    larger hollow marker around them and its legend says whose; so is a series run at fewer budgets
    whose points are all among an earlier series'; a series differing at one budget is not."""
    same = {("policy", 3.0): (2.96, 0.85), ("policy", 5.0): (4.9, 0.80)}
    same |= {("policy_seeded", t): v for (_, t), v in same.items()}
    same |= {("uniform", 3.0): (2.96, 0.85), ("uniform", 5.0): (5.0, 0.78)}
    same |= {("tpe", 3.0): (2.96, 0.85)}  # one budget only, on a point drawn before: hidden too
    _acc_run(RunLog(tmp_path / "logs", "vgg16", "r"), same, "/c/a.pt")
    jsonify(tmp_path / "logs", tmp_path / "json")
    fig, data = _drawn(monkeypatch, plot_acc_vs_macs, load_runs(tmp_path / "json"), "vgg16", tmp_path)
    series = {c.get_label(): c.lines[0] for c in fig.axes[0].containers}
    assert set(series) == {
        "policy, BN recal.",
        "policy_seeded, BN recal. (same points as policy)",
        "tpe, BN recal. (same points as uniform)",  # the first series drawn (METHOD_ORDER) holding them
        "uniform, BN recal.",
    }
    # The policy shares uniform's 3x point but not its 5x one: drawn as usual.
    assert series["policy, BN recal."].get_markerfacecolor() != "none"
    hollow = series["policy_seeded, BN recal. (same points as policy)"]
    assert (
        hollow.get_markerfacecolor() == "none"
        and hollow.get_markersize() > series["policy, BN recal."].get_markersize()
    )
    assert series["uniform, BN recal."].get_markerfacecolor() != "none"
    assert len(data[data.method == "policy_seeded"]) == 2  # the data drawn keeps every series


def test_finetune_recovery_hand_made():
    """gain = 0.5 * gap + 0.1 pp for five plans, plus one far plan (gain 5 pp at gap 6): Theil-Sen
    keeps the slope of the many (OLS would not); a run without finetuning has no row."""
    dense = 0.90
    bn = [0.89, 0.885, 0.88, 0.87, 0.86, 0.84]
    ft = [b + (0.5 * 100 * (dense - b) + 0.1) / 100 for b in bn[:5]] + [0.84 + 0.05]
    rows = [
        {"run_id": "ft", "method": m, "seed": s, "decomposition": "ht2", "target": 3.0}
        | {"test_top1_bn": b, "test_top1_ft": f, "baseline_test_top1": dense}
        for (m, s), b, f in zip(
            [("policy", 0), ("policy", 1), ("tpe", 0), ("tpe", 1), ("uniform", 0), ("vbmf", 0)], bn, ft
        )
    ]
    rows.append(
        {"run_id": "bn-only", "method": "policy", "seed": 0, "decomposition": "ht2", "target": 3.0}
        | {"test_top1_bn": 0.8, "test_top1_ft": float("nan"), "baseline_test_top1": dense}
    )
    (row,) = finetune_recovery(pd.DataFrame(rows)).itertuples()
    assert row.run_id == "ft" and row.n_plans == 6
    assert row.slope == pytest.approx(0.5) and row.intercept_pp == pytest.approx(0.1)
    assert row.slope_low <= 0.5 <= row.slope_high and row.kendall_tau == pytest.approx(1.0)
    gaps = [100 * (dense - b) for b in bn]
    assert row.mean_gap_pp == pytest.approx(sum(gaps) / 6)
    ols = np.polyfit(gaps, [100 * (f - b) for f, b in zip(ft, bn)], 1)[0]
    assert ols > 0.6  # the far plan pulls a least-squares slope up; the median of slopes stays
    # All gaps equal: no slope to fit, no row.
    same = pd.DataFrame(rows[:1] * 3).assign(seed=[0, 1, 2])
    assert finetune_recovery(same).empty


def test_budget_front_hand_made():
    # At 3×, vbmf's 3.07× does not put it on the front: 3× is represented by its most accurate point.
    assert budget_front([3.0, 3.0], [2.96, 3.07], [85.0, 80.0]) == []
    targets = [2.0, 2.0, 3.0, 3.0, 5.0, 5.0]
    xs = [1.98, 2.04, 2.96, 3.07, 5.0, 4.9]
    ys = [88.0, 87.0, 85.0, 80.0, 70.0, 70.0]
    assert budget_front(targets, xs, ys) == [0, 2, 4]  # a tie at 5×: the larger factor
    # A budget whose best is dominated by another budget's best is off the front.
    assert budget_front([2.0, 3.0], [2.0, 3.0], [80.0, 81.0]) == [1]
    assert budget_front([2.0, 3.0], [2.0, float("nan")], [80.0, 81.0]) == []


def test_two_runs_of_one_configuration_are_never_merged(tmp_path):
    """Two runs (other checkpoints) of the same model, target and methods: separate rows, and the
    policy's margin is computed within each run (across them it would read +4 pp, not -1)."""
    _acc_run(
        RunLog(tmp_path / "logs", "vgg16", "run-a"),
        {("policy", 3.0): (3.0, 0.84), ("uniform", 3.0): (3.0, 0.85)},
        "/c/a.pt",
    )
    _acc_run(
        RunLog(tmp_path / "logs", "vgg16", "run-b"),
        {("policy", 3.0): (3.0, 0.89), ("uniform", 3.0): (3.0, 0.90)},
        "/c/b.pt",
    )
    jsonify(tmp_path / "logs", tmp_path / "json")
    runs = load_runs(tmp_path / "json")
    df = summary_table(runs)
    assert df[["run_id", "checkpoint", "method"]].values.tolist() == [
        ["run-a", "a.pt", "uniform"],
        ["run-a", "a.pt", "policy"],
        ["run-b", "b.pt", "uniform"],
        ["run-b", "b.pt", "policy"],
    ]
    agg = aggregate_seeds(df)
    assert len(agg) == 4 and (agg.n_seeds == 1).all()
    margins = policy_margins(df)
    assert margins.run_id.tolist() == ["run-a", "run-b"] and margins.checkpoint.tolist() == ["a.pt", "b.pt"]
    assert margins.margin_bn.tolist() == pytest.approx([-1.0, -1.0])
    assert (margins.best_rival_bn == "uniform").all()


# --------------------------------------------------------------------------- the list of plots


def test_plots_one_list_drives_names_files_order_and_captions(runs, tmp_path):
    # The notebooks show plots by these names; make_plots draws them in this order.
    names = [analysis_plots.plot_name(plot) for plot in PLOTS]
    assert names == ["acc_vs_macs", "ranks", "sensitivity", "search_trace"]
    assert PLOTS[1] is plot_ranks and PLOTS[2] is plot_sensitivity
    plots = make_plots(runs, tmp_path)
    assert [p.name for p in plots[: len(PLOTS)]] == [f"{name}_resnet18.png" for name in names]
    for name in names:
        caption = analysis_plots.plot_caption(f"{name}_resnet18")
        assert caption != f"{name}_resnet18" and len(caption) > 20  # every plot has its caption
    assert analysis_plots.plot_caption("other_resnet18") == "other_resnet18"


def _scored_policy_log(root: Path, run_id: str, scored: list[tuple[float, str]]) -> RunLog:
    """A ResNet18 run log whose seed-0 policy search at 3x scored one candidate per ``(score, proxy)``."""
    log = RunLog(root, "resnet18", run_id)
    log.write("config", model="resnet18", dataset="d", metric="macs", methods=["policy"], seed=0)
    for i, (score, proxy) in enumerate(scored):
        log.write(
            "candidate",
            method="policy",
            target=3.0,
            decomposition="ht2",
            seed=0,
            index=i,
            round=0,
            score=score,
            proxy=proxy,
            macs_factor=3.0,
            params_factor=2.0,
        )
    return log


@pytest.mark.parametrize("proxy,label", [("kl", "KL divergence"), ("logit_mse", "logit MSE")])
def test_label_free_scores_are_drawn_as_divergences_on_a_log_axis(tmp_path, monkeypatch, proxy, label):
    """Minus-divergence scores span decades (ResNet18 KL: 1e-4 .. 3): drawn as the divergence on a log
    axis, the near-optimal plans stay apart; the CSV keeps the scores as logged, with their proxy."""
    log = _scored_policy_log(tmp_path / "logs", "kl", [(score, proxy) for score in (-2.5, -0.02, -0.004, -0.3)])
    for level, score in [(0.5, -0.001), (0.3, -0.05)]:
        log.write(
            "sensitivity", layer="layer1.conv", level=level, decomposition="ht2", seed=0, score=score, proxy=proxy
        )
    jsonify(tmp_path / "logs", tmp_path / "json")
    runs = load_runs(tmp_path / "json")

    fig, data = _drawn(monkeypatch, plot_search_trace, runs, "resnet18", tmp_path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel().startswith(f"{label} to the dense model")
    assert list(ax.lines[0].get_ydata()) == pytest.approx([2.5, 0.02, 0.004, 0.004])  # best so far: least divergence
    assert set(data.proxy) == {proxy} and data.value.tolist() == [-2.5, -0.02, -0.004, -0.3]

    fig, data = _drawn(monkeypatch, plot_sensitivity, runs, "resnet18", tmp_path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "log" and list(ax.lines[0].get_ydata()) == pytest.approx([0.05, 0.001])
    assert set(data.proxy) == {proxy}


def test_a_run_mixing_proxies_is_drawn_as_plain_scores(tmp_path, monkeypatch):
    _scored_policy_log(tmp_path / "logs", "mixed", [(-0.5, "kl"), (-0.2, "logit_mse")])
    jsonify(tmp_path / "logs", tmp_path / "json")
    fig, data = _drawn(monkeypatch, plot_search_trace, load_runs(tmp_path / "json"), "resnet18", tmp_path)
    ax = fig.axes[0]
    assert ax.get_yscale() == "linear" and ax.get_ylabel().startswith("proxy score")
    assert set(data.proxy) == {"score"} and list(ax.lines[0].get_ydata()) == pytest.approx([-0.5, -0.2])


def test_sensitivity_of_several_rank_shapes_keeps_each_shape(tmp_path, monkeypatch):
    """A run searching level- and energy-shaped ranks profiles each layer at the same levels once per
    shape: both curves are drawn (one colour per layer, one line style per shape) and written, where
    keying a point by (layer, level) alone let the last shape stand for both."""
    log = _scored_policy_log(tmp_path / "logs", "shapes", [(-0.2, "logit_mse")])
    log.write("sensitivity", layer="<dense>", level=1.0, decomposition="ht2", seed=0, score=-0.01, proxy="logit_mse")
    for shape, scores in [("level", (-0.02, -0.3)), ("energy", (-0.03, -0.1))]:
        for level, score in zip((0.5, 0.15), scores):
            log.write(
                "sensitivity",
                layer="layer1.conv",
                level=level,
                shape=shape,
                decomposition="ht2",
                seed=0,
                score=score,
                proxy="logit_mse",
            )
    jsonify(tmp_path / "logs", tmp_path / "json")
    fig, data = _drawn(monkeypatch, plot_sensitivity, load_runs(tmp_path / "json"), "resnet18", tmp_path)
    assert data[["layer", "level", "shape", "value"]].values.tolist() == [
        ["<dense>", 1.0, "level", -0.01],  # no layers record here: layers in name order
        ["layer1.conv", 0.15, "level", -0.3],
        ["layer1.conv", 0.5, "level", -0.02],
        ["layer1.conv", 0.15, "energy", -0.1],
        ["layer1.conv", 0.5, "energy", -0.03],
    ]
    curves = [line for line in fig.axes[0].lines if len(line.get_ydata())]
    drawn = [(line.get_label(), line.get_linestyle(), list(line.get_ydata())) for line in curves]
    assert [(label, style) for label, style, _ in drawn] == [("<dense>", "-"), ("layer1.conv", "-"), ("_child2", "--")]
    assert [y for *_, y in drawn] == [pytest.approx(y) for y in ([0.01], [0.3, 0.02], [0.1, 0.03])]
    assert curves[1].get_color() == curves[2].get_color()  # one colour per layer, unlabelled once
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["<dense>", "layer1.conv", "level shape", "energy shape"]


def test_a_method_keeps_its_colour_whatever_else_is_drawn():
    from common.analysis.figures import method_colors, palette

    tab = palette(10)
    alone = method_colors(["policy"])
    nan = float("nan")  # one object: NaN keys match by identity
    mixed = method_colors([("tpe", "ht2"), ("policy", "ht2"), ("policy", "tucker2"), ("greedy", nan)])
    assert alone["policy"] == mixed[("policy", "ht2")] == tab[4]  # its place in METHOD_ORDER
    assert mixed[("tpe", "ht2")] == tab[5]
    # another decomposition and an unknown method take the free colours after the 8 methods, in order
    assert mixed[("policy", "tucker2")] == tab[8] and mixed[("greedy", nan)] == tab[9]
    assert method_colors([("energy", nan)])[("energy", nan)] == tab[1]  # older logs: HT-2
    many = method_colors([f"m{i}" for i in range(4)])  # 8 + 4 > 10: an even palette over the series
    assert list(many.values()) == palette(4)


def test_search_traces_colour_a_search_by_method_and_decomposition():
    from common.analysis.figures import method_colors
    from common.analysis.plot_search import _series

    assert _series("policy", None) == _series("policy", float("nan")) == ("policy", "ht2")
    colors = method_colors([_series("policy", "ht2"), _series("policy", "tucker2")])
    # the Tucker-2 policy gets the colour it has in the accuracy and ranks plots, not the HT-2 policy's
    assert (
        colors[("policy", "tucker2")]
        == method_colors([("policy", "ht2"), ("policy", "tucker2")])[("policy", "tucker2")]
    )
    assert colors[("policy", "tucker2")] != colors[("policy", "ht2")]


@pytest.mark.parametrize(
    "key,value,problem",
    [
        ("test_top1_bn", "0.9", "has test_top1_bn='0.9', not a finite number"),
        ("test_top1_ft", "0.9", "has test_top1_ft='0.9', not a number"),
        ("macs_factor", float("nan"), "has macs_factor=nan, not a finite positive number"),
        ("macs_factor", [3.0], "has macs_factor=[3.0], not a finite positive number"),
        ("target", [3.0], "has target=[3.0], not a finite positive number"),
        ("target", "x", "has target='x', not a finite positive number"),
        ("target", None, "lacks target"),
        ("method", None, "lacks method"),
        ("method", ["uniform"], "has method=['uniform'], not a name"),
        ("decomposition", ["ht2"], "has decomposition=['ht2'], not a name"),
        ("speedup", "fast", "has speedup='fast', not a mapping"),
        ("seed", "a", "has seed='a', not a whole number"),
    ],
)
def test_a_malformed_final_is_skipped_with_a_warning_naming_file_and_seq(tmp_path, capsys, key, value, problem):
    """Found: finals with a key missing or of the wrong type stopped the analysis (three tracebacks and an
    error without the file named), where a warning and a skip are promised."""
    build_logs(tmp_path / "logs", seed=1)
    log = tmp_path / "logs" / "vgg16" / "vgg16-main.log"
    lines = log.read_text().splitlines(keepends=True)
    no, record = next(
        (i, json.loads(line.partition(" @@ ")[2])) for i, line in enumerate(lines) if '"kind":"final"' in line
    )
    if value is None:
        del record[key]
    else:
        record[key] = value
    lines[no] = lines[no].partition(" @@ ")[0] + " @@ " + json.dumps(record) + "\n"
    log.write_text("".join(lines))
    jsonify(tmp_path / "logs", tmp_path / "json")
    with pytest.warns(UserWarning) as caught:
        assert analyze_results.main(["--json", str(tmp_path / "json"), "--out", str(tmp_path / "out")]) == 0
    said = {str(w.message) for w in caught}
    assert f"{log}: final record (seq {record['seq']}) {problem}" in "\n".join(said), said
    table = pd.read_csv(tmp_path / "out" / "summary_seeds.csv")
    vgg = table[(table["model"] == "vgg16") & (table["run_id"] == "vgg16-main")]
    assert len(vgg) == len(METHODS) * len(TARGETS) - 1  # that record alone is left out


def test_the_analysis_names_the_searches_default_method():
    """The analysis keeps torch out, so it names the default method itself: the same one."""
    from common.analysis import readme
    from common.search.options import DEFAULT_METHOD

    assert readme.DEFAULT_METHOD == DEFAULT_METHOD

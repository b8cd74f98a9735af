"""Test accuracy vs MACs reduction, one panel per run (:func:`plot_acc_vs_macs`)."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import pandas as pd
from matplotlib.axes import Axes

from common.analysis import figures
from common.analysis.aggregate import aggregate_seeds
from common.analysis.context import RUN_COLUMNS, run_title
from common.analysis.figures import budget_front, dense_line, method_colors, panels, series_label, skip
from common.analysis.records import summary_table

__all__ = ["ACC_PLOT_COLUMNS", "plot_acc_vs_macs"]

STAGES = (("bn", "test_top1_bn", "-", "o", "BN recal."), ("ft", "test_top1_ft", "--", "^", "finetuned"))
"""``(stage, accuracy column, line style, marker, legend suffix)`` of the accuracy plot."""

ACC_PLOT_COLUMNS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "method",
    "decomposition",
    "target",
    "stage",
    "macs_factor",
    "test_top1_mean",
    "test_top1_std",
    "n_seeds",
    "pareto_front",
    "dense_test_top1",
)
"""Columns of ``acc_vs_macs_<model>.csv``: one row per point drawn (accuracies as fractions;
``pareto_front``: the point is on its run's front across budgets)."""


def _points(panel: pd.DataFrame) -> pd.DataFrame:
    """Every point of one run's panel: one row per configuration and stage that was measured."""
    frames = []
    for stage, col, *_ in STAGES:
        pts = panel.rename(columns={f"{col}_mean": "test_top1_mean", f"{col}_std": "test_top1_std"})
        pts = pts.dropna(subset=["macs_factor", "test_top1_mean"]).assign(stage=stage)
        frames.append(pts[[c for c in ACC_PLOT_COLUMNS if c in pts.columns]])
    points = pd.concat(frames, ignore_index=True)
    points["pareto_front"] = False
    return points


def _mark_fronts(points: pd.DataFrame) -> None:
    """Mark each stage's Pareto front across budgets (in place); only where some method of the
    run has two or more targets: at a single budget there is no trade-off to draw."""
    several = points.groupby(["method", "decomposition"], dropna=False)["target"].nunique()
    if points.empty or several.max() < 2:
        return
    for _, stage in points.groupby("stage", sort=False):
        front = budget_front(stage["target"].tolist(), stage["macs_factor"].tolist(), stage["test_top1_mean"].tolist())
        points.loc[stage.index[front], "pareto_front"] = True


def _draw_panel(ax: Axes, points: pd.DataFrame, colors: Mapping[tuple, object], several: bool) -> None:
    """One run's series (BN solid, FT dashed, std error bars) and its fronts. A series whose points
    all coincide with points of an earlier series of the same stage (e.g. ``policy_seeded`` picking
    the policy's or a rule's plan on every seed, at some or all of the policy's budgets) is drawn as
    a larger hollow marker and says so in the legend: otherwise it would hide the other one."""
    drawn: dict[str, list[tuple[str, tuple]]] = {}
    for (method, decomposition, stage), group in points.groupby(["method", "decomposition", "stage"], sort=False):
        _, _, style, marker, suffix = next(s for s in STAGES if s[0] == stage)
        group = group.sort_values("macs_factor")
        std = 100 * group["test_top1_std"]
        name = series_label(method, decomposition, several)
        key = tuple(zip(group["macs_factor"].round(4), group["test_top1_mean"].round(6)))
        same = next((other for other, k in drawn.get(stage, []) if set(key) <= set(k)), None)
        drawn.setdefault(stage, []).append((name, key))
        ax.errorbar(
            group["macs_factor"],
            100 * group["test_top1_mean"],
            # No bars at all for single-seed results, zero-length ones where a point lacks them.
            yerr=None if std.isna().all() else std.fillna(0.0),
            fmt=style,
            marker=marker,
            color=colors[(method, decomposition)],
            capsize=3,
            label=f"{name}, {suffix}" + (f" (same points as {same})" if same else ""),
            **({"markerfacecolor": "none", "markersize": 11, "markeredgewidth": 1.5} if same else {}),
        )
    for stage, *_rest, suffix in STAGES:
        front = points[points["pareto_front"] & (points["stage"] == stage)].sort_values("macs_factor")
        if not front.empty:
            ax.plot(
                front["macs_factor"],
                100 * front["test_top1_mean"],
                linestyle=":",
                color="black",
                marker="o",
                markersize=11,
                markerfacecolor="none",
                label=f"Pareto front across budgets ({suffix})",
                zorder=0,
            )


def plot_acc_vs_macs(runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike) -> Path | None:
    """Plot test accuracy vs MACs reduction factor per method: ``acc_vs_macs_<model>.png``.

    One panel per run (methods are compared within a run only). Solid lines: after BN
    recalibration; dashed: after finetuning (when present). Points are means over seeds, with
    error bars of one std where a configuration has several. The Pareto front across budgets
    (:func:`~common.analysis.figures.budget_front`, per stage) is outlined only when some method
    of the run has two or more targets; the run's dense baseline is a horizontal line. The points
    drawn are written to ``acc_vs_macs_<model>.csv`` (:data:`ACC_PLOT_COLUMNS`).

    Returns:
        The PNG path, or None (logged) when the model has no ``final`` records.
    """
    df = aggregate_seeds(summary_table([r for r in runs if r.get("model") == model]))
    if df.empty:
        skip("acc_vs_macs", model, "no final records")
        return None
    series = list(dict.fromkeys(zip(df["method"], df["decomposition"])))
    colors = method_colors(series)
    several = df["decomposition"].nunique(dropna=False) > 1
    groups = list(df.groupby(list(RUN_COLUMNS), dropna=False, sort=False))
    fig, axes = panels(len(groups), height=4.4)
    drawn = []
    for ax, (_, panel) in zip(axes, groups):
        points = _points(panel)
        _mark_fronts(points)
        _draw_panel(ax, points, colors, several)
        dense = dense_line(ax, {"test_top1": panel["baseline_test_top1"].dropna().mean()}, "test_top1")
        drawn.append(points.assign(dense_test_top1=dense))
        several_seeds = bool((panel["n_seeds"] > 1).any())
        ax.set_xlabel("MACs reduction factor (dense / compressed, ×)")
        ax.ticklabel_format(axis="x", useOffset=False)  # one budget's factors span 1e-3: "+2" offsets hide them
        ax.set_ylabel("test top-1 (%)" + (", mean ± std over seeds" if several_seeds else ""))
        ax.set_title(run_title(panel.iloc[0], "accuracy vs MACs reduction"), fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    data = pd.concat(drawn, ignore_index=True).reindex(columns=list(ACC_PLOT_COLUMNS))
    return figures.save_plot(fig, Path(out_dir) / f"acc_vs_macs_{model}.png", data)

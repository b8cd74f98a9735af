"""The per-model plots (:data:`PLOTS`): accuracy vs MACs, per-layer ranks, sensitivity, search trace.

Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas) without ``pyplot``, so
importing this module never changes the matplotlib backend of a notebook. Every plot takes
``(runs, model, out_dir)``, writes ``<name>_<model>.png`` and returns its path, or None (logged)
when the runs hold nothing to draw.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from .aggregate import aggregate_seeds
from .figures import new_figure, palette, pareto_front, series_label, skip
from .records import (
    kind_records,
    latest_baseline,
    latest_records,
    lowest_seed,
    summary_table,
    target_key,
    to_float,
)

__all__ = [
    "PLOTS",
    "make_plots",
    "plot_acc_vs_macs",
    "plot_caption",
    "plot_name",
    "plot_ranks",
    "plot_search_trace",
    "plot_sensitivity",
]

Plot = Callable[[Sequence[Mapping], str, str | os.PathLike], Path | None]
"""A per-model plot: ``plot(runs, model, out_dir) -> png path or None``."""


# --------------------------------------------------------------------------- helpers


def _save(fig: Figure, path: Path) -> Path:
    """Write ``fig`` as a PNG at ``path`` (folder created); every plot's one exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _layer_order(runs: Sequence[Mapping], model: str) -> list[dict]:
    """The model's layers in network order, from its last ``layers`` record ([] without one)."""
    pairs = kind_records(runs, "layers", model)
    return list(pairs[-1][1].get("layers", [])) if pairs else []


# --------------------------------------------------------------------------- accuracy vs MACs


def _draw_accuracy_series(ax: Axes, df: pd.DataFrame) -> tuple[list[float], list[float]]:
    """Mean test accuracy (BN solid, FT dashed, std error bars) per (method, decomposition).

    Returns:
        Every plotted point's ``(x, y)`` coordinates, for the Pareto front.
    """
    several = df["decomposition"].nunique(dropna=False) > 1
    colors = palette(len(df.groupby(["method", "decomposition"], dropna=False)))
    px: list[float] = []
    py: list[float] = []
    for color, ((method, decomposition), group) in zip(
        colors, df.groupby(["method", "decomposition"], dropna=False, sort=True)
    ):
        group = group.sort_values("macs_factor")
        label = series_label(method, decomposition, several)
        for col, style, marker, suffix in (
            ("test_top1_bn", "-", "o", "BN recal."),
            ("test_top1_ft", "--", "^", "finetuned"),
        ):
            pts = group[["macs_factor", f"{col}_mean", f"{col}_std"]].dropna(subset=["macs_factor", f"{col}_mean"])
            if pts.empty:
                continue
            std = 100 * pts[f"{col}_std"]
            ax.errorbar(
                pts["macs_factor"],
                100 * pts[f"{col}_mean"],
                # No bars at all for single-seed results, zero-length ones where a point lacks them.
                yerr=None if std.isna().all() else std.fillna(0.0),
                fmt=style,
                marker=marker,
                color=color,
                capsize=3,
                label=f"{label}, {suffix}",
            )
            px += pts["macs_factor"].tolist()
            py += (100 * pts[f"{col}_mean"]).tolist()
    return px, py


def _draw_pareto(ax: Axes, px: Sequence[float], py: Sequence[float]) -> None:
    front = pareto_front(px, py)
    if front:
        ax.plot(
            [px[i] for i in front],
            [py[i] for i in front],
            linestyle=":",
            color="black",
            marker="o",
            markersize=11,
            markerfacecolor="none",
            label="Pareto front",
            zorder=0,
        )


def plot_acc_vs_macs(runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike) -> Path | None:
    """Plot test accuracy vs MACs reduction factor per method: ``acc_vs_macs_<model>.png``.

    Solid lines: after BN recalibration; dashed: after finetuning (when present). Points are means
    over seeds, with error bars of one std where a configuration has several. The Pareto front
    over every plotted point is outlined; the dense baseline is a horizontal line.

    Returns:
        The PNG path, or None (logged) when the model has no ``final`` records.
    """
    df = aggregate_seeds(summary_table([r for r in runs if r.get("model") == model]))
    if df.empty:
        skip("acc_vs_macs", model, "no final records")
        return None
    fig = new_figure()
    ax = fig.add_subplot()
    several_seeds = bool((df["n_seeds"] > 1).any())
    _draw_pareto(ax, *_draw_accuracy_series(ax, df))
    baseline = latest_baseline(runs, model)
    if baseline is not None and not math.isnan(to_float(baseline.get("test_top1"))):
        ax.axhline(
            100 * baseline["test_top1"],
            color="gray",
            linestyle="-.",
            label=f"dense baseline ({100 * baseline['test_top1']:.2f} %)",
        )
    ax.set_xlabel("MACs reduction factor (dense / compressed, ×)")
    ax.set_ylabel("test top-1 accuracy (%)" + (", mean ± std over seeds" if several_seeds else ""))
    ax.set_title(f"{model}: accuracy vs MACs reduction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, Path(out_dir) / f"acc_vs_macs_{model}.png")


# --------------------------------------------------------------------------- ranks


def _default_kept_fraction(layer: Mapping[str, Any], entry: Mapping[str, Any]) -> float:
    """Kept-MACs fraction of a layer from its plan entry's ``macs`` and the layer's dense MACs."""
    dense = to_float(entry.get("dense_macs", layer.get("macs")))
    macs = to_float(entry.get("macs"))
    return macs / dense if dense > 0 else math.nan


def _pick_target(targets: Sequence[Any]) -> Any:
    """The target planned most often (ties: the largest)."""
    counts: dict[Any, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (counts[t], to_float(t)))


def _chosen_plans(runs: Sequence[Mapping], model: str, target: float | None) -> tuple[Any, dict[tuple, dict]] | None:
    """``(target, {(method, decomposition): plan record})`` of the latest plans at one target.

    None (logged) without plans, or without a plan at the requested target.
    """
    plans = latest_records(
        runs,
        "plan",
        model=model,
        key=lambda run, r: (r.get("method"), r.get("decomposition"), target_key(r.get("target"))),
    )
    if not plans:
        skip("ranks", model, "no plan records")
        return None
    target = _pick_target([k[2] for k in plans]) if target is None else target_key(target)
    chosen = {k[:2]: rec for k, (_, rec) in plans.items() if k[2] == target}
    if not chosen:
        skip("ranks", model, f"no plan at target {target}")
        return None
    return target, chosen


def _plan_layers(runs: Sequence[Mapping], model: str, chosen: Mapping[tuple, dict]) -> list[dict]:
    """The eligible layers in network order; without a ``layers`` record, the plans' layers."""
    if kind_records(runs, "layers", model):
        return [ly for ly in _layer_order(runs, model) if ly.get("eligible", True)]
    names = list(dict.fromkeys(n for rec in chosen.values() for n in (rec.get("plan") or {})))
    return [{"name": n} for n in names]


def _kept_table(
    chosen: Mapping[tuple, dict],
    layers: Sequence[Mapping[str, Any]],
    fraction: Callable[[Mapping[str, Any], Mapping[str, Any]], float],
) -> np.ndarray:
    """Plans x layers kept fractions; a layer absent from a plan is kept dense (1)."""
    table = np.full((len(chosen), len(layers)), np.nan)
    for i, rec in enumerate(chosen.values()):
        plan = rec.get("plan") or {}
        for j, layer in enumerate(layers):
            entry = plan.get(layer["name"])
            table[i, j] = 1.0 if entry is None else fraction(layer, entry)
    return table


def _draw_ranks(model: str, target: Any, chosen: Mapping[tuple, dict], layers: Sequence[Mapping], table) -> Figure:
    """Grouped bars: one group per layer, one bar per plan."""
    fig = new_figure(width=max(7.5, 0.45 * len(layers) * max(1, len(chosen) / 2) + 2))
    ax = fig.add_subplot()
    several = len({k[1] for k in chosen}) > 1
    width = 0.8 / len(chosen)
    pos = np.arange(len(layers))
    for i, ((method, decomposition), color) in enumerate(zip(chosen, palette(len(chosen)))):
        ax.bar(
            pos + (i - (len(chosen) - 1) / 2) * width,
            table[i],
            width,
            color=color,
            label=series_label(method, decomposition, several),
        )
    metric = next(iter(chosen.values())).get("metric")
    if metric == "macs" and isinstance(target, float) and target > 0:
        ax.axhline(1.0 / target, color="gray", linestyle=":", label=f"1 / target = {1 / target:.3f}")
    ax.set_xticks(pos)
    ax.set_xticklabels([ly["name"] for ly in layers], rotation=90, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept MACs (fraction of dense layer)")
    ax.set_title(f"{model}: per-layer allocation of each method's plan at target {target}× ({metric})")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return fig


def plot_ranks(
    runs: Sequence[Mapping],
    model: str,
    out_dir: str | os.PathLike,
    target: float | None = None,
    kept_fraction: Callable[[Mapping[str, Any], Mapping[str, Any]], float] | None = None,
) -> Path | None:
    """Grouped bars of each plan's per-layer kept-MACs fraction: ``ranks_<model>.png``.

    Layers (x, in network order from the ``layers`` record, eligible ones only) x methods (bars),
    at one target. A layer absent from a plan is kept dense (fraction 1).

    Args:
        runs: run documents.
        model: model name.
        out_dir: output folder.
        target: which target's plans; default the one planned most often (ties: largest).
        kept_fraction: ``f(layer_record, plan_entry) -> float``; default: the plan entry's
            ``macs`` divided by its ``dense_macs`` or the layer record's ``macs``.

    Returns:
        The PNG path, or None (logged) when there are no plans or no per-layer cost.
    """
    found = _chosen_plans(runs, model, target)
    if found is None:
        return None
    target, chosen = found
    layers = _plan_layers(runs, model, chosen)
    table = _kept_table(chosen, layers, kept_fraction or _default_kept_fraction)
    if np.isnan(table).all():
        skip(
            "ranks",
            model,
            "plan entries carry no per-layer 'macs' (store them in the plan record or pass kept_fraction)",
        )
        return None
    fig = _draw_ranks(model, target, chosen, layers, table)
    return _save(fig, Path(out_dir) / f"ranks_{model}.png")


# --------------------------------------------------------------------------- search records


def _has_score(records: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any record carries a numeric ``score`` (then plots use scores, not accuracies)."""
    return any(not math.isnan(to_float(r.get("score"))) for r in records)


def _proxy_value(record: Mapping[str, Any], use_score: bool) -> float:
    """The record's ``score``, or its ``val_top1`` in %; NaN when absent."""
    return to_float(record.get("score")) if use_score else 100 * to_float(record.get("val_top1"))


def _proxy_label(use_score: bool) -> str:
    return "proxy score (higher is better)" if use_score else "validation top-1 accuracy (%)"


def _sensitivity_curves(runs: Sequence[Mapping], model: str) -> tuple[dict[str, list[tuple[float, float]]], bool]:
    """``({layer: [(level, value)]}, use_score)`` from the lowest seed's sensitivity records."""
    pairs = lowest_seed(kind_records(runs, "sensitivity", model))
    records = {(r.get("layer"), to_float(r.get("level"))): r for _, r in pairs}  # last one wins
    use_score = _has_score(records.values())
    by_layer: dict[str, list[tuple[float, float]]] = {}
    for (layer, level), rec in records.items():
        by_layer.setdefault(str(layer), []).append((level, _proxy_value(rec, use_score)))
    return by_layer, use_score


def plot_sensitivity(runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike) -> Path | None:
    """Proxy score (or validation accuracy) vs rank level, one line per layer:
    ``sensitivity_<model>.png``.

    Records of the lowest seed only; their ``score`` when any has one (newer runs: a proxy score,
    higher is better), else their ``val_top1`` in %.

    Returns:
        The PNG path, or None (logged) when the model has no ``sensitivity`` records.
    """
    by_layer, use_score = _sensitivity_curves(runs, model)
    if not by_layer:
        skip("sensitivity", model, "no sensitivity records")
        return None
    order = [ly.get("name") for ly in _layer_order(runs, model)]
    names = sorted(by_layer, key=lambda n: (order.index(n) if n in order else len(order), n))
    fig = new_figure(width=9.0 if len(names) > 10 else 7.5)
    ax = fig.add_subplot()
    for name, color in zip(names, palette(len(names))):
        pts = sorted(by_layer[name])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=color, label=name)
    baseline = latest_baseline(runs, model)
    # The dense accuracy is no reference line for a proxy score, which has other units.
    if not use_score and baseline is not None and not math.isnan(to_float(baseline.get("val_top1"))):
        ax.axhline(
            100 * baseline["val_top1"],
            color="gray",
            linestyle="-.",
            label=f"dense ({100 * baseline['val_top1']:.2f} %)",
        )
    ax.set_xlabel("rank level (fraction of full rank)")
    ax.set_ylabel(_proxy_label(use_score))
    ax.set_title(f"{model}: per-layer sensitivity to rank truncation")
    ax.grid(alpha=0.3)
    ncol = 1 + len(names) // 16
    ax.legend(fontsize=6, ncol=ncol, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, Path(out_dir) / f"sensitivity_{model}.png")


def _search_key(rec: Mapping[str, Any]) -> tuple:
    return rec.get("method"), rec.get("decomposition"), target_key(rec.get("target"))


def _search_values(pairs: Sequence[tuple[dict, dict]], use_score: bool) -> dict[tuple, list[float]]:
    """Per search key, the candidate values of the run that wrote that search's last candidate."""
    searches: dict[tuple, dict[str, list[float]]] = {}
    for run, rec in pairs:
        by_run = searches.setdefault(_search_key(rec), {})
        # Re-inserting moves the run to the end, so the last run to write a candidate wins.
        vals = by_run.pop(run.get("run_id"), [])
        vals.append(_proxy_value(rec, use_score))
        by_run[run.get("run_id")] = vals
    return {key: list(by_run.values())[-1] for key, by_run in searches.items()}


def _draw_searches(ax: Axes, searches: Mapping[tuple, list[float]]) -> None:
    """Best-so-far steps per search (colour: method, line style: target), faint candidates."""
    several = len({k[1] for k in searches}) > 1
    methods = sorted({str(k[0]) for k in searches})
    colors = dict(zip(methods, palette(len(methods))))
    targets = sorted({k[2] for k in searches}, key=to_float)
    styles = dict(zip(targets, ["-", "--", ":", "-."] * (1 + len(targets) // 4)))
    for key in sorted(searches, key=lambda k: (str(k[0]), str(k[1]), to_float(k[2]))):
        method, decomposition, target = key
        vals = np.array(searches[key], dtype=float)
        n = np.arange(1, len(vals) + 1)
        color = colors[str(method)]
        ax.scatter(n, vals, s=6, color=color, alpha=0.25)
        ax.step(
            n,
            np.fmax.accumulate(vals),
            where="post",
            linestyle=styles[target],
            color=color,
            label=f"{series_label(method, decomposition, several)}, target {target}×",
        )


def plot_search_trace(runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike) -> Path | None:
    """Best-so-far proxy score (or validation accuracy) vs evaluations per search:
    ``search_trace_<model>.png``.

    One line per (method, decomposition, target) from ``candidate`` records in write order, of
    that search's lowest seed, using the run that wrote it last; faint dots are the individual
    candidates. Values are the records' ``score`` when any has one (newer runs: a proxy score,
    higher is better), else their ``val_top1`` in %.

    Returns:
        The PNG path, or None (logged) when the model has no ``candidate`` records.
    """
    pairs = lowest_seed(kind_records(runs, "candidate", model), key=_search_key)
    if not pairs:
        skip("search_trace", model, "no candidate records")
        return None
    use_score = _has_score(rec for _, rec in pairs)
    fig = new_figure()
    ax = fig.add_subplot()
    _draw_searches(ax, _search_values(pairs, use_score))
    ax.scatter([], [], s=6, color="gray", alpha=0.5, label="single candidates")
    ax.set_xlabel("evaluations (candidate plans scored)")
    ax.set_ylabel(_proxy_label(use_score))
    ax.set_title(f"{model}: rank-search progress (lines: best so far)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / f"search_trace_{model}.png")


# --------------------------------------------------------------------------- the list of plots

PLOTS: tuple[Plot, ...] = (
    plot_acc_vs_macs,
    plot_ranks,
    plot_sensitivity,
    plot_search_trace,
)
"""Every per-model plot, in the order they are drawn, listed in the Markdown summary and shown in
the notebooks. A plot's name is its function's without ``plot_`` (:func:`plot_name`), which is
also the prefix of its file, ``<name>_<model>.png``."""


def plot_name(plot: Plot) -> str:
    """``"acc_vs_macs"`` for :func:`plot_acc_vs_macs`: the name of the plot and of its files."""
    return plot.__name__.removeprefix("plot_")


_CAPTIONS: dict[str, str] = {
    "acc_vs_macs": "mean test accuracy (error bars: std over seeds) vs MACs reduction factor, "
    "per method, with Pareto front",
    "ranks": "per-layer kept-MACs fraction of each method's chosen plan",
    "sensitivity": "proxy score (validation accuracy in older runs) vs rank level, per layer, lowest seed",
    "search_trace": "best-so-far proxy score (validation accuracy in older runs) vs number of evaluations, lowest seed",
}


def plot_caption(stem: str) -> str:
    """The caption of a plot file ``<name>_<model>`` (its stem), else the stem itself."""
    for name, caption in _CAPTIONS.items():
        if stem.startswith(name + "_"):
            return caption
    return stem


def make_plots(runs: Sequence[Mapping], out_dir: str | os.PathLike) -> list[Path]:
    """Draw every plot in :data:`PLOTS` for every model; skipped plots are logged, not returned."""
    models = sorted({str(r.get("model")) for r in runs})
    return [p for model in models for plot in PLOTS if (p := plot(runs, model, out_dir)) is not None]

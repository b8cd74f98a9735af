"""Per-layer allocation of each method's plan: kept fraction of every layer's MACs
(:func:`plot_ranks`), one panel per run and target."""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from common.analysis import figures
from common.analysis.context import RUN_COLUMNS, model_runs, run_context, run_title
from common.analysis.figures import method_colors, panels, series_label, skip, target_text
from common.analysis.records import kind_records, lowest_seed, method_rank, seed_lookup, target_key, to_float

__all__ = ["RANKS_PLOT_COLUMNS", "plot_ranks"]

KeptFraction = Callable[[Mapping[str, Any], Mapping[str, Any]], float]
"""``f(layer_record, plan_entry) -> kept fraction`` of a layer's MACs."""

RANKS_PLOT_COLUMNS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "target",
    "metric",
    "method",
    "decomposition",
    "seed",
    "layer",
    "compressed",
    "macs",
    "dense_macs",
    "kept_fraction",
)
"""Columns of ``ranks_<model>.csv``: one row per bar (plan x layer). ``compressed``: the plan
factorizes the layer (else it is kept dense, fraction 1); ``kept_fraction`` = ``macs / dense_macs``."""


def _entry_fraction(layer: Mapping[str, Any], entry: Mapping[str, Any]) -> float:
    """Kept-MACs fraction from a plan entry's own ``macs`` and its ``dense_macs`` or the layer's."""
    dense = to_float(entry.get("dense_macs", layer.get("macs")))
    macs = to_float(entry.get("macs"))
    return macs / dense if dense > 0 else math.nan


def _run_layers(run: Mapping, plans: Sequence[Mapping]) -> list[dict]:
    """The run's eligible layers in network order (its ``layers`` record), else the plans' layers."""
    records = kind_records([run], "layers")
    if records:
        return [ly for ly in records[-1][1].get("layers", []) if ly.get("eligible", True)]
    names = [c.get("name") for p in plans for c in p.get("layer_costs") or []]
    names += [n for p in plans for n in p.get("plan") or {}]
    return [{"name": n} for n in dict.fromkeys(names)]


def _bar(layer: Mapping[str, Any], plan: Mapping[str, Any], fraction: KeptFraction) -> dict[str, Any]:
    """``compressed``, ``macs``, ``dense_macs``, ``kept_fraction`` of one layer under one plan.

    The plan's ``layer_costs`` (compressed and dense MACs of every searched layer, logged with the
    plan) first; else the plan entry through ``fraction``; a layer in neither is kept dense.
    """
    name = layer["name"]
    cost = next((c for c in plan.get("layer_costs") or [] if c.get("name") == name), None)
    entry = (plan.get("plan") or {}).get(name)
    if cost is not None:
        macs, dense = to_float(cost.get("macs")), to_float(cost.get("dense_macs"))
        compressed = cost.get("method", "ht2") != "dense"
        kept = macs / dense if dense > 0 else math.nan
    elif entry is not None:
        macs, dense = to_float(entry.get("macs")), to_float(entry.get("dense_macs", layer.get("macs")))
        compressed = entry.get("method", "ht2") != "dense"
        kept = fraction(layer, entry)
    else:
        macs = dense = to_float(layer.get("macs"))
        compressed, kept = False, 1.0
    return {"layer": name, "compressed": compressed, "macs": macs, "dense_macs": dense, "kept_fraction": kept}


def _plan_key(record: Mapping[str, Any]) -> tuple:
    return record.get("method"), record.get("decomposition"), target_key(record.get("target"))


def _run_rows(run: Mapping, target: Any, fraction: KeptFraction) -> list[dict]:
    """One row per (plan, layer) of one run: its latest plan per method, decomposition and
    target, of the lowest seed (one search per configuration, not a mix of seeds); by target,
    then method (:data:`~common.analysis.records.METHOD_ORDER`)."""
    pairs = lowest_seed(kind_records([run], "plan"), key=_plan_key)
    latest = {_plan_key(rec): rec for _, rec in pairs}  # write order: the last one wins
    chosen = [rec for key, rec in latest.items() if target is None or key[2] == target_key(target)]
    chosen.sort(
        key=lambda rec: (to_float(rec.get("target")), method_rank(rec.get("method")), str(rec.get("decomposition")))
    )
    layers = _run_layers(run, chosen)
    context, seed_of = run_context(run), seed_lookup()
    return [
        {
            **context,
            "target": target_key(rec.get("target")),
            "metric": rec.get("metric"),
            "method": rec.get("method"),
            "decomposition": rec.get("decomposition"),
            "seed": seed_of(run, rec),
            **_bar(layer, rec, fraction),
        }
        for rec in chosen
        for layer in layers
    ]


def _draw_panel(ax: Axes, panel: pd.DataFrame, colors: Mapping[tuple, Any], several: bool) -> None:
    """Grouped bars: one group per layer (network order), one bar per plan."""
    layers = list(dict.fromkeys(panel["layer"]))
    series = list(dict.fromkeys(zip(panel["method"], panel["decomposition"])))
    width = 0.8 / len(series)
    pos = np.arange(len(layers))
    for i, key in enumerate(series):
        bars = panel[(panel["method"] == key[0]) & (panel["decomposition"] == key[1])].set_index("layer")
        ax.bar(
            pos + (i - (len(series) - 1) / 2) * width,
            bars["kept_fraction"].reindex(layers).to_numpy(dtype=float),
            width,
            color=colors[key],
            label=series_label(*key, several),
        )
    target, metric = panel["target"].iloc[0], panel["metric"].iloc[0]
    if metric == "macs" and isinstance(target, float) and target > 0:
        ax.axhline(1.0 / target, color="gray", linestyle=":", label=f"1 / target = {1 / target:.3f}")
    dense = set(panel.groupby("layer")["compressed"].any().loc[lambda s: ~s].index)
    ax.set_xticks(pos)
    labels = [f"{n} (dense)" if n in dense else n for n in layers]
    rotation = 0 if len(layers) <= 6 else 45 if len(layers) <= 14 else 90
    ax.set_xticklabels(labels, rotation=rotation, ha="center" if rotation in (0, 90) else "right", fontsize=7)
    ax.set_xlim(-0.6, len(layers) - 0.4)
    ax.set_ylim(0.0, 1.05)
    ax.set_ylabel("kept MACs (compressed / dense)", fontsize=8)
    what = f"kept MACs per layer at {target_text(target)}× ({metric} budget)"
    ax.set_title(run_title(panel.iloc[0], what), fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_ranks(
    runs: Sequence[Mapping],
    model: str,
    out_dir: str | os.PathLike,
    target: float | None = None,
    kept_fraction: KeptFraction | None = None,
) -> Path | None:
    """Grouped bars of each plan's per-layer kept-MACs fraction: ``ranks_<model>.png``.

    One panel per run and target (plans are compared within a run only); in each, the layers
    (x, network order from the run's ``layers`` record, eligible ones only) x the methods (bars),
    plans of the lowest seed. A layer's fraction is its compressed over its dense MACs, from the
    plan record's ``layer_costs``; a layer that a plan keeps dense is 1 (tick label "(dense)"
    when every plan keeps it). The bars are written to ``ranks_<model>.csv``
    (:data:`RANKS_PLOT_COLUMNS`).

    Args:
        runs: run documents.
        model: model name.
        out_dir: output folder.
        target: only this target's plans; default every target.
        kept_fraction: ``f(layer_record, plan_entry) -> float`` for plans without ``layer_costs``;
            default: the plan entry's ``macs`` over its ``dense_macs`` or the layer's ``macs``.

    Returns:
        The PNG path, or None (logged) when there are no plans or no per-layer cost.
    """
    fraction = kept_fraction or _entry_fraction
    rows = [row for run in model_runs(runs, model) for row in _run_rows(run, target, fraction)]
    if not rows:
        skip("ranks", model, "no plan records" + ("" if target is None else f" at target {target}"))
        return None
    data = pd.DataFrame(rows, columns=list(RANKS_PLOT_COLUMNS))
    if data.loc[data["compressed"], "kept_fraction"].isna().all():
        skip("ranks", model, "no per-layer MACs ('layer_costs' or plan entries' 'macs'; or pass kept_fraction)")
        return None
    series = list(dict.fromkeys(zip(data["method"], data["decomposition"])))
    colors = method_colors(series)
    several = data["decomposition"].nunique(dropna=False) > 1
    groups = list(data.groupby([*RUN_COLUMNS, "target"], dropna=False, sort=False))
    fig, axes = panels(len(groups), height=3.4)
    for ax, (_, panel) in zip(axes, groups):
        _draw_panel(ax, panel, colors, several)
    return figures.save_plot(fig, Path(out_dir) / f"ranks_{model}.png", data)

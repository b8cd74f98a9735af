"""What the searches saw, one panel per run: each layer's sensitivity to rank truncation
(:func:`plot_sensitivity`) and the best-so-far trace of each search (:func:`plot_search_trace`).

Both draw the records of one seed per run (the lowest, normally 0, which every run computes: the
curves of several seeds would mix unrelated searches). Their values are the records' ``score``
when any record of the run has one (newer runs: a proxy score, higher is better; a label-free proxy's
score is minus a divergence to the dense model, drawn as the divergence on a log axis), else their
``val_top1`` (older runs; drawn in %, written as a fraction).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes

from common.analysis import figures
from common.analysis.context import RUN_COLUMNS, model_runs, run_context, run_title
from common.analysis.figures import dense_line, method_colors, palette, panels, series_label, skip, target_text
from common.analysis.records import kind_records, lowest_seed, run_baseline, seed_lookup, target_key, to_float

__all__ = [
    "DIVERGENCE_LABELS",
    "SEARCH_PLOT_COLUMNS",
    "SENSITIVITY_PLOT_COLUMNS",
    "plot_search_trace",
    "plot_sensitivity",
]

SENSITIVITY_PLOT_COLUMNS: tuple[str, ...] = (*RUN_COLUMNS, "seed", "layer", "level", "shape", "proxy", "value")
"""Columns of ``sensitivity_<model>.csv``: one row per point; ``shape`` is the rank shape the layer
took (:mod:`common.search.space`; ``"level"`` for records older than shapes, and for the dense point);
``proxy`` says what ``value`` is (a label-free proxy's name, ``kl`` or ``logit_mse``: its score, minus
the divergence; ``score``: another proxy's score; or ``val_top1`` as a fraction)."""

SHAPE_STYLES: dict[str, str] = {"level": "-", "energy": "--"}
"""Line style of each rank shape (:data:`common.search.space.SHAPES`, named here so that the analysis does not
import torch) in the sensitivity plot, where colours name the layers."""

DIVERGENCE_LABELS: dict[str, str] = {"logit_mse": "logit MSE", "kl": "KL divergence"}
"""The label-free proxies (:data:`common.search.proxy.DIVERGENCE_PROXIES`, kept here so that the analysis
does not import torch) and what their divergence is called on an axis."""

SEARCH_PLOT_COLUMNS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "method",
    "decomposition",
    "target",
    "seed",
    "evaluation",
    "proxy",
    "value",
    "best_so_far",
)
"""Columns of ``search_trace_<model>.csv``: one row per candidate, in evaluation order (``proxy`` as in
:data:`SENSITIVITY_PLOT_COLUMNS`)."""


def _proxy(records: Iterable[Mapping[str, Any]]) -> str:
    """What the records' values are: a label-free proxy's name (all scores minus its divergence),
    ``"score"`` (another proxy's score, or a mix) when any record carries a numeric score, else
    ``"val_top1"``."""
    scored = [r for r in records if not math.isnan(to_float(r.get("score")))]
    if not scored:
        return "val_top1"
    names = {r.get("proxy") for r in scored}
    return names.pop() if len(names) == 1 and names <= DIVERGENCE_LABELS.keys() else "score"


def _field(proxy: str) -> str:
    """The record field holding the values of ``proxy``."""
    return "val_top1" if proxy == "val_top1" else "score"


def _proxy_label(proxy: str) -> str:
    if proxy in DIVERGENCE_LABELS:
        return f"{DIVERGENCE_LABELS[proxy]} to the dense model\n(log scale, lower is better)"
    return "proxy score (higher is better)" if proxy == "score" else "validation top-1 (%)"


def _drawn(values: pd.Series, proxy: str) -> np.ndarray:
    """Values as drawn: divergences (minus a label-free score), other scores as they are, accuracies in %."""
    v = values.to_numpy(dtype=float)
    return -v if proxy in DIVERGENCE_LABELS else v * (1.0 if proxy == "score" else 100.0)


def _y_axis(ax: Axes, proxy: str) -> None:
    """Label the y axis; divergences on a log scale: candidates' divergences span decades, and the good
    plans' differences are in the smallest of them (a zero, the dense model itself, sits at the bottom)."""
    ax.set_ylabel(_proxy_label(proxy))
    if proxy in DIVERGENCE_LABELS:
        ax.set_yscale("log", nonpositive="clip")


def _panels(data: pd.DataFrame) -> list[tuple[Any, pd.DataFrame]]:
    return list(data.groupby(list(RUN_COLUMNS), dropna=False, sort=False))


# --------------------------------------------------------------------------- sensitivity


def _sensitivity_rows(run: Mapping) -> list[dict]:
    """One row per (layer, level, shape) of the run's lowest seed (a repeated point: the last record).

    A run searching several rank shapes profiles each layer once per shape at the same levels, so
    the shape is part of a point's identity (else one shape's value would stand for both).
    """
    pairs = lowest_seed(kind_records([run], "sensitivity"))
    records = {(r.get("layer"), to_float(r.get("level")), str(r.get("shape") or "level")): r for _, r in pairs}
    proxy, seed_of, context = _proxy(records.values()), seed_lookup(), run_context(run)
    layers = kind_records([run], "layers")
    order = [ly.get("name") for ly in layers[-1][1].get("layers", [])] if layers else []
    keys = sorted(
        records, key=lambda k: (order.index(k[0]) if k[0] in order else len(order), str(k[0]), _shape_rank(k[2]), k[1])
    )
    return [
        {
            **context,
            "seed": seed_of(run, records[key]),
            "layer": str(key[0]),
            "level": key[1],
            "shape": key[2],
            "proxy": proxy,
            "value": to_float(records[key].get(_field(proxy))),
        }
        for key in keys
    ]


def _shape_rank(shape: str) -> tuple[int, str]:
    return (list(SHAPE_STYLES).index(shape) if shape in SHAPE_STYLES else len(SHAPE_STYLES), shape)


def _draw_sensitivity(ax: Axes, panel: pd.DataFrame, baseline: Mapping | None) -> None:
    names = list(dict.fromkeys(panel["layer"]))
    proxy = panel["proxy"].iloc[0]
    shapes = sorted(set(panel.loc[panel["layer"] != "<dense>", "shape"]) or {"level"}, key=_shape_rank)
    for name, color in zip(names, palette(len(names))):
        labelled = False
        for shape in shapes:
            pts = panel[(panel["layer"] == name) & (panel["shape"] == shape)]
            if pts.empty:
                continue
            y = _drawn(pts["value"], proxy)
            zero = proxy in DIVERGENCE_LABELS and bool((y <= 0).all())  # e.g. the dense model of a net without BN
            label = None if labelled else f"{name} (0: off the log axis)" if zero else name
            ax.plot(pts["level"], y, marker=".", color=color, linestyle=SHAPE_STYLES.get(shape, ":"), label=label)
            labelled = True
    if len(shapes) > 1:  # the colours name the layers; these entries name the line styles
        for shape in shapes:
            ax.plot([], [], color="0.4", linestyle=SHAPE_STYLES.get(shape, ":"), label=f"{shape} shape")
    if proxy == "val_top1":  # the dense accuracy is no reference for a score, which has other units
        dense_line(ax, baseline, "val_top1")
    ax.set_xlabel("rank level (fraction of full rank)")
    _y_axis(ax, proxy)
    ax.set_title(run_title(panel.iloc[0], "per-layer sensitivity to rank truncation"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=6, ncol=1 + (len(names) + len(shapes)) // 17, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_sensitivity(runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike) -> Path | None:
    """Proxy score (or validation accuracy) vs rank level, one line per layer, one panel per run:
    ``sensitivity_<model>.png``, the points in ``sensitivity_<model>.csv``
    (:data:`SENSITIVITY_PLOT_COLUMNS`). The dense model's val accuracy is a line where the values
    are accuracies.

    Returns:
        The PNG path, or None (logged) when the model has no ``sensitivity`` records.
    """
    model_docs = {str(r.get("run_id")): r for r in model_runs(runs, model)}
    rows = [row for run in model_docs.values() for row in _sensitivity_rows(run)]
    if not rows:
        skip("sensitivity", model, "no sensitivity records")
        return None
    data = pd.DataFrame(rows, columns=list(SENSITIVITY_PLOT_COLUMNS))
    groups = _panels(data)
    fig, axes = panels(len(groups), height=4.4)
    for ax, (_, panel) in zip(axes, groups):
        _draw_sensitivity(ax, panel, run_baseline(model_docs[str(panel["run_id"].iloc[0])]))
    return figures.save_plot(fig, Path(out_dir) / f"sensitivity_{model}.png", data)


# --------------------------------------------------------------------------- search trace


def _search_key(rec: Mapping[str, Any]) -> tuple:
    return rec.get("method"), rec.get("decomposition"), target_key(rec.get("target"))


def _search_rows(run: Mapping) -> list[dict]:
    """One row per candidate of each search of the run, lowest seed, in write order."""
    pairs = lowest_seed(kind_records([run], "candidate"), key=_search_key)
    proxy, seed_of, context = _proxy(rec for _, rec in pairs), seed_lookup(), run_context(run)
    searches: dict[tuple, list[dict]] = {}
    for _, rec in pairs:
        searches.setdefault(_search_key(rec), []).append(rec)
    rows = []
    for (method, decomposition, target), recs in sorted(
        searches.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]), to_float(kv[0][2]))
    ):
        values = np.array([to_float(r.get(_field(proxy))) for r in recs])
        best = np.fmax.accumulate(values)
        rows += [
            {
                **context,
                "method": method,
                "decomposition": decomposition,
                "target": target,
                "seed": seed_of(run, rec),
                "evaluation": i + 1,
                "proxy": proxy,
                "value": value,
                "best_so_far": b,
            }
            for i, (rec, value, b) in enumerate(zip(recs, values, best))
        ]
    return rows


def _series(method: Any, decomposition: Any) -> tuple[str, str]:
    """The colour key of a search: its method and decomposition (none logged: HT-2)."""
    return str(method), decomposition if isinstance(decomposition, str) else "ht2"


def _draw_searches(ax: Axes, panel: pd.DataFrame, colors: Mapping[tuple, Any], several: bool) -> None:
    """Best-so-far steps per search (colour: method and decomposition, line style: target), faint candidates."""
    proxy = panel["proxy"].iloc[0]
    targets = sorted(set(panel["target"]), key=to_float)
    styles = dict(zip(targets, ["-", "--", ":", "-."] * (1 + len(targets) // 4)))
    for (method, decomposition, target), search in panel.groupby(
        ["method", "decomposition", "target"], dropna=False, sort=False
    ):
        color = colors[_series(method, decomposition)]
        ax.scatter(search["evaluation"], _drawn(search["value"], proxy), s=6, color=color, alpha=0.25)
        ax.step(
            search["evaluation"],
            _drawn(search["best_so_far"], proxy),
            where="post",
            marker="o" if len(search) == 1 else None,  # a one-candidate search is a point
            linestyle=styles[target],
            color=color,
            label=f"{series_label(method, decomposition, several)}, target {target_text(target)}×",
        )
    ax.scatter([], [], s=6, color="gray", alpha=0.5, label="single candidates")
    ax.set_xlabel("evaluations (candidate plans scored)")
    _y_axis(ax, proxy)
    ax.set_title(run_title(panel.iloc[0], "rank-search progress (lines: best so far)"), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))


def plot_search_trace(runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike) -> Path | None:
    """Best-so-far proxy score (or validation accuracy) vs evaluations per search, one panel per
    run: ``search_trace_<model>.png``, the candidates in ``search_trace_<model>.csv``
    (:data:`SEARCH_PLOT_COLUMNS`).

    One line per (method, decomposition, target) from the run's ``candidate`` records in write
    order; faint dots are the individual candidates.

    Returns:
        The PNG path, or None (logged) when the model has no ``candidate`` records.
    """
    rows = [row for run in model_runs(runs, model) for row in _search_rows(run)]
    if not rows:
        skip("search_trace", model, "no candidate records")
        return None
    data = pd.DataFrame(rows, columns=list(SEARCH_PLOT_COLUMNS))
    # the same colour per (method, decomposition) as the accuracy and ranks plots
    colors = method_colors(sorted({_series(m, d) for m, d in zip(data["method"], data["decomposition"])}))
    several = data["decomposition"].nunique(dropna=False) > 1
    groups = _panels(data)
    fig, axes = panels(len(groups), height=4.0)
    for ax, (_, panel) in zip(axes, groups):
        _draw_searches(ax, panel, colors, several)
    return figures.save_plot(fig, Path(out_dir) / f"search_trace_{model}.png", data)

"""Figure helpers shared by the plots: an Agg figure without ``pyplot``, panels, colours, labels,
the one way a plot is written (:func:`save_plot`: the PNG and the CSV of the data it draws), and
the Pareto fronts of the accuracy plot."""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.analysis.records import METHOD_ORDER, to_float
from common.files import atomic_write

__all__ = ["budget_front", "pareto_front", "save_plot"]

WIDTH = 8.0
"""Figure width in inches: a notebook's output width, so that text stays readable inline."""

_LOG = logging.getLogger(__name__)


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be maximized.

    A point is dominated when another has ``x' >= x`` and ``y' >= y`` with one inequality strict.
    NaN points are never on the front. Identical points are all kept.

    Args:
        xs, ys: coordinates, same length.

    Returns:
        Indices of front points sorted by increasing x (then decreasing y).
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"pareto_front: xs and ys must be 1-D of equal length, got {x.shape}, {y.shape}")
    ok = ~(np.isnan(x) | np.isnan(y))
    front = []
    for i in np.flatnonzero(ok):
        ge = ok & (x >= x[i]) & (y >= y[i])
        gt = (x > x[i]) | (y > y[i])
        if not np.any(ge & gt):
            front.append(int(i))
    return sorted(front, key=lambda i: (x[i], -y[i]))


def budget_front(targets: Sequence[Hashable], xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """The Pareto front across budgets: indices of the points on it, by increasing x.

    Within one budget (target) the achieved factors differ only by how closely each plan met the
    budget (2.96× or 3.07× at 3×), so a front there would reward overshooting, not a better
    trade-off. Each target is therefore represented by its most accurate point (ties: the larger
    x), and the front is :func:`pareto_front` of those. Empty with fewer than two targets.
    """
    best: dict[Hashable, int] = {}
    for i, (t, x, y) in enumerate(zip(targets, xs, ys)):
        if math.isnan(to_float(x)) or math.isnan(to_float(y)):
            continue
        if t not in best or (y, x) > (ys[best[t]], xs[best[t]]):
            best[t] = i
    if len(best) < 2:
        return []
    idx = list(best.values())
    front = pareto_front([xs[i] for i in idx], [ys[i] for i in idx])
    return sorted((idx[j] for j in front), key=lambda i: xs[i])


def new_figure(width: float = WIDTH, height: float = 4.8) -> Figure:
    """A figure on its own Agg canvas (no ``pyplot``: a notebook's backend stays as it is)."""
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def panels(n: int, height: float = 3.6, width: float = WIDTH) -> tuple[Figure, list[Axes]]:
    """A figure of ``n`` panels stacked vertically, each ``height`` inches tall."""
    fig = new_figure(width=width, height=max(1, n) * height)
    return fig, [fig.add_subplot(max(1, n), 1, i + 1) for i in range(max(1, n))]


def dense_line(ax: Axes, baseline: Mapping[str, Any] | None, field: str, name: str = "dense") -> float:
    """The dense model's ``baseline[field]`` (a fraction) as a horizontal line in %, labelled
    ``"<name> (<value> %)"``; returns the fraction (NaN, and no line, when not logged)."""
    value = to_float((baseline or {}).get(field))
    if not math.isnan(value):
        ax.axhline(100 * value, color="gray", linestyle="-.", label=f"{name} ({100 * value:.2f} %)")
    return value


def save_plot(fig: Figure, path: str | os.PathLike, data: pd.DataFrame) -> Path:
    """Write ``fig`` as the PNG ``path`` and ``data``, what it draws, as the CSV next to it (same
    stem); both atomically (folder created). Every plot's one exit; returns the PNG path."""
    path = Path(path)
    fig.tight_layout()
    atomic_write(path.with_suffix(".csv"), lambda fh: fh.write(data.to_csv(index=False).encode()))
    atomic_write(path, lambda fh: fig.savefig(fh, format="png"))
    return path


def skip(plot: str, model: str, why: str) -> None:
    """Log why a plot is not drawn for a model."""
    _LOG.info("skipping %s plot for %s: %s", plot, model, why)


def target_text(target: Any) -> str:
    """A target for titles and labels: ``3`` for 3.0, as it is otherwise."""
    return f"{target:g}" if isinstance(target, float) else str(target)


def series_label(method: Any, decomposition: Any, several_decompositions: bool) -> str:
    """A legend label: the method, with its decomposition when the plot has several."""
    return f"{method} ({decomposition})" if several_decompositions else str(method)


def method_colors(series: Sequence[Hashable]) -> dict:
    """One colour per series, a method's the same in every plot and every run: a series is a method
    name or ``(method, decomposition)``. HT-2 series of the methods of :data:`METHOD_ORDER` take tab10's
    colour at their place there; any other series (another decomposition, an unknown method) the next
    free tab10 colour, in the order given (all :func:`palette` colours, in order, past 10 in all)."""
    keys = list(dict.fromkeys(series))
    out, nxt = {}, len(METHOD_ORDER)
    for key in keys:
        method, decomposition = key if isinstance(key, tuple) else (key, "ht2")
        if method in METHOD_ORDER and (not isinstance(decomposition, str) or decomposition == "ht2"):
            out[key] = METHOD_ORDER.index(method)  # a missing decomposition (older logs) is HT-2
        else:
            out[key], nxt = nxt, nxt + 1
    if nxt > 10:
        return dict(zip(keys, palette(len(keys))))
    colors = palette(10)
    return {key: colors[i] for key, i in out.items()}


def palette(n: int) -> list:
    """``n`` distinct colours (tab10 up to 10, else evenly spaced viridis)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(max(n, 1))]

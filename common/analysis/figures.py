"""Figure helpers shared by the plots: an Agg figure without ``pyplot``, colours, labels, and the
Pareto front of the accuracy plot."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = ["pareto_front"]

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


def new_figure(width: float = 7.5, height: float = 4.8) -> Figure:
    """A figure on its own Agg canvas (no ``pyplot``: a notebook's backend stays as it is)."""
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def skip(plot: str, model: str, why: str) -> None:
    """Log why a plot is not drawn for a model."""
    _LOG.info("skipping %s plot for %s: %s", plot, model, why)


def series_label(method: Any, decomposition: Any, several_decompositions: bool) -> str:
    """A legend label: the method, with its decomposition when the plot has several."""
    return f"{method} ({decomposition})" if several_decompositions else str(method)


def palette(n: int) -> list:
    """``n`` distinct colours (tab10 up to 10, else evenly spaced viridis)."""
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(max(n, 1))]

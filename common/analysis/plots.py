"""The per-model plots (:data:`PLOTS`): accuracy vs MACs, per-layer ranks, sensitivity, search trace.

Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas) without ``pyplot``, so
importing this module never changes the matplotlib backend of a notebook. Every plot takes
``(runs, model, out_dir)``, draws one panel per run (and per target where it says so: results of
different runs are never drawn as one comparison), titles each panel with its model, dataset, run
and checkpoint, writes ``<name>_<model>.png`` together with the data it draws,
``<name>_<model>.csv`` (:func:`~common.analysis.figures.save_plot`), and returns the PNG path, or
None (logged) when the runs hold nothing to draw.

The plots live in :mod:`~common.analysis.plot_accuracy`, :mod:`~common.analysis.plot_ranks` and
:mod:`~common.analysis.plot_search`; this module lists them.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

from common.analysis.plot_accuracy import plot_acc_vs_macs
from common.analysis.plot_ranks import plot_ranks
from common.analysis.plot_search import plot_search_trace, plot_sensitivity

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

PLOTS: tuple[Plot, ...] = (
    plot_acc_vs_macs,
    plot_ranks,
    plot_sensitivity,
    plot_search_trace,
)
"""Every per-model plot, in the order they are drawn, listed in the Markdown summary and shown in
the notebooks. A plot's name is its function's without ``plot_`` (:func:`plot_name`), which is
also the prefix of its files, ``<name>_<model>.png`` and ``<name>_<model>.csv``."""


def plot_name(plot: Plot) -> str:
    """``"acc_vs_macs"`` for :func:`plot_acc_vs_macs`: the name of the plot and of its files."""
    return plot.__name__.removeprefix("plot_")


_CAPTIONS: dict[str, str] = {
    "acc_vs_macs": "mean test accuracy (error bars: std over seeds) vs MACs reduction factor, "
    "per method, one panel per run; Pareto front across budgets where a method has several",
    "ranks": "per-layer kept fraction of MACs (compressed / dense) of each method's plan, one panel per "
    "run and target, lowest seed",
    "sensitivity": "proxy score (validation accuracy in older runs) vs rank level, per layer (line style: "
    "rank shape, where a run searched several), one panel per run, lowest seed",
    "search_trace": "best-so-far proxy score (validation accuracy in older runs) vs number of evaluations, "
    "one panel per run, lowest seed",
}


def plot_caption(stem: str) -> str:
    """The caption of a plot file ``<name>_<model>`` (its stem), else the stem itself."""
    for name, caption in _CAPTIONS.items():
        if stem.startswith(name + "_"):
            return caption
    return stem


def make_plots(runs: Sequence[Mapping], out_dir: str | os.PathLike) -> list[Path]:
    """Draw every plot in :data:`PLOTS` for every model; skipped plots are logged, not returned.

    Returns:
        The PNG paths; each has its data next to it (``.csv``, same stem).
    """
    models = sorted({str(r.get("model")) for r in runs})
    return [p for model in models for plot in PLOTS if (p := plot(runs, model, out_dir)) is not None]

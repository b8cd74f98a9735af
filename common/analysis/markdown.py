"""Markdown rendering: :func:`markdown_table`, the cell formats, and mean ± std cells over seeds."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import pandas as pd

from common.analysis.aggregate import SEED_STAT_COLUMNS
from common.analysis.records import ACC_COLUMNS, is_missing

__all__ = ["MARKDOWN_COLUMNS", "markdown_table"]

Format = str | Callable[[Any], str]
"""A format spec (``".2f"``) or a callable value -> text."""


def markdown_table(
    df: pd.DataFrame,
    columns: Sequence[str] | Mapping[str, str],
    formats: Mapping[str, Format] | None = None,
    right: Iterable[str] = (),
) -> str:
    """Render DataFrame columns as a GitHub Markdown table.

    Args:
        df: the data.
        columns: column names, or ``{column: header}`` to rename them.
        formats: per column a format spec (``".2f"``, ``".2%"``, ...) or a callable value -> str;
            other columns use ``str``. Missing values (None / NaN) print as ``–``.
        right: text columns to right-align too (numbers preformatted as text, e.g. mean ± std).

    Returns:
        The table, one line per row, ending with a newline. Numeric columns are right-aligned.

    Raises:
        KeyError: a column that ``df`` lacks.
    """
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    missing = [c for c in headers if c not in df.columns]
    if missing:
        raise KeyError(f"markdown_table: DataFrame has no column(s) {missing}")
    formats = formats or {}
    right = set(right)

    def cell(col: str, value: Any) -> str:
        if is_missing(value):
            return "–"
        fmt = formats.get(col)
        text = fmt(value) if callable(fmt) else format(value, fmt) if fmt else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(headers.values()) + " |",
        "|" + "|".join("---:" if c in right or pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in headers) + "|",
    ]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(c, row[c]) for c in headers) + " |")
    return "\n".join(lines) + "\n"


def pct(value: float) -> str:
    """A fraction as a percentage with two decimals (no ``%`` sign)."""
    return f"{100.0 * value:.2f}"


def factor(value: float) -> str:
    """A reduction or speed-up factor, e.g. ``2.99×``."""
    return f"{value:.2f}×"


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def _plain(value: float) -> str:
    return f"{value:.2f}"


MARKDOWN_COLUMNS: dict[str, str] = {
    "model": "Model",
    "dataset": "Dataset",
    "checkpoint": "Checkpoint",
    "run_id": "Run",
    "method": "Method",
    "decomposition": "Decomp.",
    "target": "Target",
    "metric": "Metric",
    "n_seeds": "Seeds",
    "macs_factor": "MACs ×",
    "params_factor": "Params ×",
    "val_top1_bn": "Val BN (%)",
    "test_top1_bn": "Test BN (%)",
    "test_top1_ft": "Test FT (%)",
    "baseline_test_top1": "Dense test (%)",
    "delta_pp": "Δ vs dense (pp)",
    "speedup_cpu": "CPU speed-up",
    "speedup_cpu_setting": "CPU setting",
    "speedup_cuda": "CUDA speed-up",
    "evaluations": "Evals",
    "wall_seconds": "Wall (min)",
}
"""Columns (and headers) of the Markdown summary table (rows of
:func:`~common.analysis.aggregate_seeds`)."""

_MARKDOWN_FORMATS: dict[str, Format] = {
    "target": factor,
    "macs_factor": factor,
    "params_factor": factor,
    **{c: pct for c in ACC_COLUMNS},
    "delta_pp": "+.2f",
    "speedup_cpu": factor,
    "speedup_cpu_b64": factor,
    "speedup_cuda": factor,
    "evaluations": ".0f",
    "wall_seconds": lambda s: f"{s / 60.0:.1f}",
}

DISPLAY_FORMATS = {c: f for c, f in _MARKDOWN_FORMATS.items() if c not in SEED_STAT_COLUMNS}
"""Formats for :func:`seed_display` frames, whose seed-statistic cells are already text."""


def _mean_std_cell(
    mean: float,
    std: float,
    n_seeds: int,
    fmt: Callable[[float], str],
    std_fmt: Callable[[float], str],
) -> str | None:
    """``"mean ± std"`` over several seeds, the plain mean for one; None ("–") without a mean."""
    if is_missing(mean):
        return None
    if n_seeds > 1 and not is_missing(std):
        return f"{fmt(mean)} ± {std_fmt(std)}"
    return fmt(mean)


def seed_display(agg: pd.DataFrame) -> pd.DataFrame:
    """``agg`` (from :func:`~common.analysis.aggregate_seeds`) with each
    :data:`~common.analysis.SEED_STAT_COLUMNS` mean/std pair folded into one text column under
    the plain name, ready for :func:`markdown_table` with :data:`DISPLAY_FORMATS`."""
    out = agg.copy()
    for col in SEED_STAT_COLUMNS:
        if f"{col}_mean" not in out.columns:
            continue
        fmt, std_fmt = (_signed, _plain) if col == "delta_pp" else (pct, pct)
        out[col] = [
            _mean_std_cell(m, sd, int(n), fmt, std_fmt)
            for m, sd, n in zip(out[f"{col}_mean"], out[f"{col}_std"], out["n_seeds"])
        ]
    return out


def seed_sentence(agg: pd.DataFrame) -> str:
    """How many seeds the accuracies of ``agg`` (non-empty) summarize, as a sentence."""
    if int(agg["n_seeds"].max()) == 1:
        return "One seed per configuration."
    return f"Accuracies and Δ: mean ± std over {seed_count_text(agg)} per configuration."


def seed_count_text(agg: pd.DataFrame) -> str:
    """``"1 seed"``, ``"3 seeds"`` or ``"1–3 seeds"`` per configuration."""
    low, high = int(agg["n_seeds"].min()), int(agg["n_seeds"].max())
    count = str(low) if low == high else f"{low}–{high}"
    return f"{count} seed{'' if high == 1 else 's'}"

"""Seeds folded into one row per configuration: mean, sample std and count (:func:`aggregate_seeds`)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pandas as pd

from common.analysis.context import RUN_COLUMNS
from common.analysis.records import SUMMARY_COLUMNS, is_missing, sort_rows

__all__ = ["AGGREGATE_COLUMNS", "SEED_STAT_COLUMNS", "aggregate_seeds"]

SEED_STAT_COLUMNS: tuple[str, ...] = (
    "val_top1_bn",
    "test_top1_bn",
    "val_top1_ft",
    "test_top1_ft",
    "delta_pp",
)
"""Columns :func:`aggregate_seeds` reports as ``<col>_mean`` and ``<col>_std`` (ddof 1)."""

GROUP_COLUMNS = (*RUN_COLUMNS, "method", "decomposition", "target")
"""What one configuration of one run is: the rows :func:`aggregate_seeds` folds into one (those of
these columns a frame has). Seeds of different runs are never folded together."""


def _aggregate_columns(columns: Iterable[str]) -> list[str]:
    """Output columns of :func:`aggregate_seeds` for input ``columns``, in the same places."""
    out: list[str] = []
    for col in columns:
        if col == "seed":
            out += ["n_seeds", "seeds"]
        elif col in SEED_STAT_COLUMNS:
            out += [f"{col}_mean", f"{col}_std"]
        else:
            out.append(col)
    return out


AGGREGATE_COLUMNS: tuple[str, ...] = tuple(_aggregate_columns(SUMMARY_COLUMNS))
"""Columns of :func:`aggregate_seeds` on a :func:`~common.analysis.summary_table`
(``results/summary.csv``)."""


def _most_common(values: pd.Series) -> Any:
    """The most frequent non-missing value (first seen on ties), None when there is none."""
    present = [v for v in values if not is_missing(v)]
    return max(dict.fromkeys(present), key=present.count) if present else None


def _equal(values: pd.Series) -> bool:
    """Two or more measured values, all the same."""
    measured = values.dropna()
    return len(measured) >= 2 and measured.nunique() == 1


def _mean(values: pd.Series) -> float:
    """The mean of the measured values; of equal ones exactly their value (a plain mean can be 1 ulp off)."""
    return float(values.dropna().iloc[0]) if _equal(values) else values.mean()


def _aggregate_group(group: pd.DataFrame) -> dict[str, Any]:
    """One configuration's row of :func:`aggregate_seeds` from its per-seed rows."""
    row: dict[str, Any] = {}
    for col in group.columns:
        values = group[col]
        if col in GROUP_COLUMNS:
            row[col] = values.iloc[0]  # not the groupby key: that turns a None into NaN
        elif col == "seed":
            row["n_seeds"] = len(group)
            row["seeds"] = ";".join(str(s) for s in sorted(set(values)))
        elif col in SEED_STAT_COLUMNS:
            row[f"{col}_mean"] = _mean(values)
            # equal seeds (a rule plan without BN): 0, not float rounding's 1e-16; NaN under two measured seeds
            row[f"{col}_std"] = 0.0 if _equal(values) else values.std(ddof=1)
        elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            row[col] = _mean(values)
        else:
            row[col] = _most_common(values)
    return row


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per run (model, dataset, checkpoint, run id) x method x decomposition x target.

    :data:`SEED_STAT_COLUMNS` become ``<col>_mean`` and ``<col>_std`` (sample std, ddof 1; NaN
    with one seed), ``seed`` becomes ``n_seeds`` (rows folded) and ``seeds`` (e.g. ``"0;1;2"``).
    Other numeric columns (factors, speed-ups, costs) are means; text columns the most frequent
    value. Missing values are skipped.

    Args:
        df: output of :func:`~common.analysis.summary_table` (or any rows with the
            configuration columns); a frame without ``seed`` counts as seed 0 throughout.

    Returns:
        A new DataFrame, columns as :data:`AGGREGATE_COLUMNS` for a ``summary_table`` input,
        sorted like it.
    """
    if "seed" not in df.columns:
        df = df.assign(seed=0)
    columns = _aggregate_columns(df.columns)
    if df.empty:
        return pd.DataFrame(columns=columns)
    groups = df.groupby([c for c in GROUP_COLUMNS if c in df.columns], dropna=False, sort=False)
    out = pd.DataFrame([_aggregate_group(g) for _, g in groups], columns=columns)
    return sort_rows(out)

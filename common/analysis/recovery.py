"""How much of a plan's BN-recalibrated accuracy gap to the dense model does finetuning recover?

The policy's leads are leads after BN recalibration; finetuning then lifts every plan, and lifts the
plans further from the dense model more. :func:`finetune_recovery` measures that per run and
target: across every finetuned plan (method × seed), the gain from finetuning against the gap
before it, summarized by the Theil–Sen slope (robust to the few plans, e.g. VBMF's, that are far
from the rest) with its 95 % interval and Kendall's tau. A slope of 0.5 means that of two plans 1 pp
apart after BN recalibration, the worse one gains 0.5 pp more: a 1 pp lead before finetuning is
expected to be 0.5 pp after it.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from common.analysis.context import RUN_COLUMNS
from common.analysis.margins import comparison_groups

__all__ = ["RECOVERY_COLUMNS", "finetune_recovery"]

RECOVERY_COLUMNS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "target",
    "n_plans",
    "mean_gap_pp",
    "mean_gain_pp",
    "slope",
    "slope_low",
    "slope_high",
    "intercept_pp",
    "kendall_tau",
    "kendall_p",
    "note",
)
"""Columns of :func:`finetune_recovery`: the run and target; the number of (method, seed) rows with
both accuracies; their mean gap (dense minus BN test top-1) and mean gain (finetuned minus BN), in
percentage points; the Theil–Sen slope of gain on gap with its 95 % interval and intercept (pp);
Kendall's tau between gap and gain and its two-sided p-value; ``note``: why the interval or tau is
missing (NaN) where they are (e.g. every plan gained the same), else empty."""

_SAME_GAIN = "every plan gained the same: no interval, no rank correlation"
_TIES = "too many tied gains and gaps: no interval"

_MIN_PLANS = 3


def finetune_recovery(df: pd.DataFrame) -> pd.DataFrame:
    """Per run and target: the finetuning gain of each HT-2 plan regressed on its BN gap to dense.

    Every (method, seed) row of ``df`` with test accuracy after BN recalibration, after finetuning
    and the run's dense test accuracy is one point: ``gap = dense - bn`` and ``gain = ft - bn``, in
    percentage points. The fit is Theil–Sen (the median of pairwise slopes, Sen 1968), whose
    interval (``scipy.stats.theilslopes``) assumes independent points: the seeds of a rule method
    share one plan and differ only in calibration images, so the interval is optimistic.

    Args:
        df: per-seed rows (:func:`~common.analysis.summary_table`); rows of other decompositions
            than ``ht2`` are ignored, as in :func:`~common.analysis.policy_margins`.

    Returns:
        :data:`RECOVERY_COLUMNS`, one row per run and target with at least three finetuned plans
        whose gaps are not all equal (no slope otherwise).
    """
    needed = {"test_top1_bn", "test_top1_ft", "baseline_test_top1"}
    rows = []
    if needed <= set(df.columns):
        for g in comparison_groups(df):
            g = g.dropna(subset=sorted(needed))
            gap = 100.0 * (g["baseline_test_top1"] - g["test_top1_bn"]).to_numpy(dtype=float)
            gain = 100.0 * (g["test_top1_ft"] - g["test_top1_bn"]).to_numpy(dtype=float)
            if len(g) < _MIN_PLANS or np.ptp(gap) == 0:
                continue
            from scipy import stats  # deferred, as in stats.paired_interval

            same = np.ptp(gain) == 0  # e.g. finetuning that changed no prediction on the digits demo
            # equal gains over tied gaps give Theil-Sen's interval a negative variance (NaN, and numpy's
            # "invalid value in sqrt" warning): the interval is undefined there, said in the note instead
            with np.errstate(invalid="ignore"):
                fit = stats.theilslopes(gain, gap, alpha=0.95)
            tau = (np.nan, np.nan) if same else tuple(stats.kendalltau(gap, gain))
            interval = (np.nan, np.nan) if same else (float(fit.low_slope), float(fit.high_slope))
            note = _SAME_GAIN if same else ("" if np.isfinite(interval).all() else _TIES)
            row = {c: g[c].iloc[0] for c in (*RUN_COLUMNS, "target")}
            rows.append(
                row
                | {
                    "n_plans": len(g),
                    "mean_gap_pp": float(gap.mean()),
                    "mean_gain_pp": float(gain.mean()),
                    "slope": float(fit.slope),
                    "slope_low": interval[0],
                    "slope_high": interval[1],
                    "intercept_pp": float(fit.intercept),
                    "kendall_tau": float(tau[0]),
                    "kendall_p": float(tau[1]),
                    "note": note,
                }
            )
    out = pd.DataFrame(rows, columns=list(RECOVERY_COLUMNS))
    out["n_plans"] = out["n_plans"].astype(int)
    return out

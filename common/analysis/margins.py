"""Does the HT-2 policy beat its rivals? The tables of paired per-seed margins, from run rows.

:func:`policy_margins` compares, per run, target and policy (``policy``; ``policy_seeded``, the
search that also starts from the rule plans; ``guided``, the same refined around its best candidate), the policy's test accuracy with the best rival's, seed
by seed (Student-t intervals, :func:`~common.analysis.stats.paired_interval`, and their verdicts,
:func:`~common.analysis.verdicts.margin_verdict`); the Markdown section that shows it is
:func:`common.analysis.summary.margins_section`. :func:`rival_margins` does the same against each
rival, with the simultaneous (Bonferroni) intervals over the rivals of a cell
(:func:`~common.analysis.stats.bonferroni_level`). Both carry, where the finals' per-image test hits
are known (:mod:`~common.analysis.hits`), the interval over seeds *and* test images
(:func:`~common.analysis.verdicts.seed_image_margin`). :func:`macs_pct` says what each margin cost in
MACs; :func:`comparison_groups` are the groups of rows methods are compared within (one run, one
target).

The statistics on arrays are in :mod:`~common.analysis.stats`, the words read from them in
:mod:`~common.analysis.verdicts` (with why "ahead of every rival" needs no multiplicity correction
and one rival's row read as a finding of its own does).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from common.analysis.context import RUN_COLUMNS
from common.analysis.hits import REPLICA_TOLERANCE, HitsKey
from common.analysis.stats import LEVEL, bonferroni_level
from common.analysis.verdicts import every_rival_verdict, judged, margin_verdict, seed_image_margin

__all__ = [
    "POLICY_MARGIN_COLUMNS",
    "POLICY_METHODS",
    "POLICY_RIVALS",
    "RIVAL_MARGIN_COLUMNS",
    "comparison_groups",
    "macs_pct",
    "policy_margins",
    "rival_margins",
]

POLICY_RIVALS: tuple[str, ...] = ("uniform", "energy", "vbmf", "random", "tpe")
"""Methods :func:`policy_margins` compares the policy with (those present)."""

POLICY_METHODS: tuple[str, ...] = ("policy", "policy_seeded", "guided")
"""The methods under test (:data:`common.search.options.POLICIES`; not imported from there, which would
import torch into the analysis), each compared with :data:`POLICY_RIVALS` on its own row."""

_MARGIN_FIELDS = (
    "best_rival",
    "margin",
    "ci_low",
    "ci_high",
    "n",
    "verdict",
    "each_rival",
    "every_rival",
    "macs_pct",
    "ci_low_both",
    "ci_high_both",
    "verdict_both",
    "every_rival_both",
)
STAGES = (("bn", "test_top1_bn"), ("ft", "test_top1_ft"))
"""``(stage, accuracy column)``: after BN recalibration and after finetuning."""
STAGE_NAMES = {"bn": "BN", "ft": "FT"}

POLICY_MARGIN_COLUMNS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "target",
    "policy",
    *(f"{field}_{stage}" for stage, _ in STAGES for field in _MARGIN_FIELDS),
)
"""Columns of :func:`policy_margins`: the run (:data:`~common.analysis.context.RUN_COLUMNS`),
target and policy method, then per stage (``bn``, ``ft``) the best rival, the mean paired
margin and its 95 % interval in percentage points, the number of paired seeds, the verdict,
every rival's mean paired margin as text, the verdict against every rival at once
(:func:`~common.analysis.verdicts.every_rival_verdict`), the policy's MACs relative to the best rival's
(:func:`macs_pct`), and where per-image test hits are known the interval over seeds *and* test images
against the best rival (``ci_*_both``, ``verdict_both``, as :func:`rival_margins`) and the verdict against
every rival on those intervals (``every_rival_both``: only where every rival of the stage has one; None
elsewhere)."""

_BOTH_FIELDS = ("ci_low_both", "ci_high_both", "verdict_both", "floor")
_RIVAL_FIELDS = (
    "margin",
    "ci_low",
    "ci_high",
    "n",
    "verdict",
    "k",
    "ci_low_bonf",
    "ci_high_bonf",
    "verdict_bonf",
    *_BOTH_FIELDS,
)
RIVAL_MARGIN_COLUMNS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "target",
    "policy",
    "rival",
    "macs_pct",
    *(f"{field}_{stage}" for stage, _ in STAGES for field in _RIVAL_FIELDS),
)
"""Columns of :func:`rival_margins`: one row per run, target, policy and rival, the policy's MACs
relative to the rival's (:func:`macs_pct`), then per stage the mean paired margin, its 95 %
interval (pp), the number of paired seeds, the verdict, and the simultaneous version: ``k``, how
many rivals of the same run, target, policy and stage have an interval (two paired seeds or more),
the Bonferroni interval at level :func:`~common.analysis.stats.bonferroni_level` ``(0.95, k)`` and its
verdict; where the per-image test hits of every paired final are known, the interval over seeds *and* test
images (``ci_*_both``, centred on the logged margin, :func:`~common.analysis.verdicts.seed_image_margin`), its
verdict and the design's ``floor`` (the smallest margin found with 80 % power on these test images whatever
the number of seeds); NaN / None elsewhere."""


def _per_seed(group: pd.DataFrame, method: str, col: str) -> pd.Series:
    """One method's accuracy per seed (index: seed), unmeasured seeds dropped."""
    return group[group["method"] == method].groupby("seed")[col].mean().dropna()


def _paired_pp(policy: pd.Series, rival: pd.Series) -> np.ndarray:
    """Policy minus rival in percentage points, over the seeds both measured."""
    common = policy.index.intersection(rival.index)
    return 100.0 * (policy[common] - rival[common]).to_numpy(dtype=float)


def macs_pct(policy_factor: pd.Series, rival_factor: pd.Series) -> float:
    """How many more MACs the policy's plans keep than the rival's, in percent, paired by seed.

    A margin in accuracy is only a win at equal cost: the budget band lets a plan land a few percent
    either side of the target, and a plan that keeps 2 % more MACs than its rival buys accuracy
    with them. Factors are dense / compressed, so the policy's MACs over the rival's are
    ``rival_factor / policy_factor``. MACs whatever the run's budget metric: under a params budget
    the band is on params, and this still shows the compute each plan keeps.

    Args:
        policy_factor, rival_factor: MACs factors per seed (index: seed).

    Returns:
        The mean over the seeds both have of ``100 * (rival_factor / policy_factor - 1)``: positive
        when the policy keeps more MACs; NaN without a common seed.
    """
    common = policy_factor.index.intersection(rival_factor.index)
    if common.empty:
        return math.nan
    return float((100.0 * (rival_factor[common] / policy_factor[common] - 1.0)).mean())


def _macs_pct_of(group: pd.DataFrame, policy: str, rival: str, seeds: pd.Index | None = None) -> float:
    """:func:`macs_pct` of two methods in one comparison group, over ``seeds`` if given (the seeds a
    margin paired); NaN where the rows carry no MACs factor."""
    if "macs_factor" not in group.columns:
        return math.nan
    p, r = _per_seed(group, policy, "macs_factor"), _per_seed(group, rival, "macs_factor")
    if seeds is not None:
        p = p[p.index.isin(seeds)]
    return macs_pct(p, r)


def comparison_groups(df: pd.DataFrame) -> list[pd.DataFrame]:
    """The HT-2 rows of ``df`` (missing decomposition counts as ``ht2``) per run and target, the
    groups methods are compared within; a missing ``seed`` column counts as seed 0 and missing run
    columns as one shared value."""
    if "seed" not in df.columns:
        df = df.assign(seed=0)
    df = df.assign(**{c: None for c in RUN_COLUMNS if c not in df.columns})
    ht2 = df[df["decomposition"].fillna("ht2") == "ht2"]
    return [g for _, g in ht2.groupby([*RUN_COLUMNS, "target"], sort=True, dropna=False)]


def _stage_margins(
    group: pd.DataFrame,
    stage: str,
    col: str,
    rivals: Sequence[str],
    method: str = "policy",
    hits: Mapping[HitsKey, np.ndarray] | None = None,
) -> dict[str, Any]:
    """The :data:`_MARGIN_FIELDS` of policy ``method`` in one (model, target) group for ``stage``, whose
    accuracy column is ``col``."""
    out: dict[str, Any] = dict.fromkeys(_MARGIN_FIELDS, math.nan)
    out.update(
        best_rival=None, n=0, verdict=None, each_rival=None, every_rival=None, verdict_both=None, every_rival_both=None
    )
    if col not in group.columns:
        return out
    policy = _per_seed(group, method, col)
    scores = {r: s for r in rivals if not (s := _per_seed(group, r, col)).empty}
    if policy.empty or not scores:
        return out
    # The strongest rival over all its seeds, not only the ones paired with the policy.
    best = max(scores, key=lambda r: scores[r].mean())
    diffs = _paired_pp(policy, scores[best])
    paired_seeds = policy.index.intersection(scores[best].index)
    mean, low, high, verdict = judged(diffs)
    each = {r: _paired_pp(policy, s) for r, s in scores.items()}
    both = {r: _both_fields(group, method, r, stage, col, hits, d.mean()) for r, d in each.items() if d.size and hits}
    if both.get(best):
        out.update({k: both[best][k] for k in ("ci_low_both", "ci_high_both", "verdict_both")})
    measured = [r for r, d in each.items() if d.size]
    if measured and all(r in both and both[r]["verdict_both"] is not None for r in measured):
        out["every_rival_both"] = every_rival_verdict({r: both[r]["verdict_both"] for r in measured})
    out.update(
        best_rival=best,
        margin=mean,
        ci_low=low,
        ci_high=high,
        n=len(diffs),
        verdict=verdict,
        each_rival=", ".join(f"{r} {d.mean():+.2f}" for r, d in each.items() if d.size) or None,
        every_rival=every_rival_verdict({r: judged(d)[3] for r, d in each.items()}),
        macs_pct=_macs_pct_of(group, method, best, paired_seeds),
    )
    return out


def policy_margins(
    df: pd.DataFrame,
    rivals: Sequence[str] = POLICY_RIVALS,
    policies: Sequence[str] = POLICY_METHODS,
    hits: Mapping[HitsKey, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Per run, target and policy: the HT-2 policy's test accuracy minus the best rival's, BN and finetuned.

    The research claim is that the policy beats every other method at equal cost; this table says,
    for each budget, whether it does beyond seed noise and which method it loses to. Methods are
    compared within one run only (same model, dataset, checkpoint and run id): a rival from
    another run may differ in checkpoint, data or protocol. The best rival has the highest mean
    test accuracy over its seeds; the margin pairs seeds: the mean of ``policy_s - rival_s`` over
    the seeds both measured, with its 95 % Student-t interval (see :func:`~common.analysis.stats.paired_interval`,
    :func:`~common.analysis.verdicts.margin_verdict`). Percentage points; NaN where a side was not measured (e.g. no
    finetuning at that budget).

    Args:
        df: per-seed rows (:func:`~common.analysis.summary_table`); without a ``seed`` column all
            rows count as seed 0, without a run column (``dataset``, ``checkpoint``, ``run_id``)
            all rows share its value. Rows of other decompositions than ``ht2`` (missing counts
            as ``ht2``) are ignored.
        rivals: methods to compare with, in order of preference on ties.
        policies: the methods under test, each on its own row (in this order) where it was run.
        hits: per-image hits by :data:`~common.analysis.hits.HitsKey` (None: no seeds+images columns).

    Returns:
        :data:`POLICY_MARGIN_COLUMNS`, one row per run, target and policy run with a rival.

    Raises:
        ValueError: hits that are not their final's (:func:`_both_fields`).
    """
    rows = []
    for g in comparison_groups(df):
        for policy in policies:
            if not (g["method"] == policy).any() or not g["method"].isin(rivals).any():
                continue
            row = {c: g[c].iloc[0] for c in (*RUN_COLUMNS, "target")} | {"policy": policy}
            for stage, col in STAGES:
                row.update({f"{k}_{stage}": v for k, v in _stage_margins(g, stage, col, rivals, policy, hits).items()})
            rows.append(row)
    out = pd.DataFrame(rows, columns=list(POLICY_MARGIN_COLUMNS))
    for stage, _ in STAGES:
        out[f"n_{stage}"] = out[f"n_{stage}"].astype(int)
    return out


def _both_fields(
    group: pd.DataFrame,
    policy: str,
    rival: str,
    stage: str,
    col: str,
    hits: Mapping[HitsKey, np.ndarray],
    margin: float,
) -> dict[str, Any]:
    """The :data:`_BOTH_FIELDS` (unsuffixed) of one stage of ``policy`` against ``rival`` in a comparison group,
    centred on the logged paired ``margin`` (pp): NaN / None unless the hits of every final the margin pairs
    are known.

    Raises:
        ValueError: hits whose top-1 is not their final's (beyond :data:`REPLICA_TOLERANCE`), or hits of
            different test splits.
    """
    out: dict[str, Any] = {f: None if f == "verdict_both" else math.nan for f in _BOTH_FIELDS}
    if not hits or col not in group.columns:
        return out
    acc = {m: _per_seed(group, m, col) for m in (policy, rival)}
    seeds = acc[policy].index.intersection(acc[rival].index)
    if seeds.empty:
        return out
    model, run_id, target = str(group["model"].iloc[0]), str(group["run_id"].iloc[0]), float(group["target"].iloc[0])
    table = {}
    for method in (policy, rival):
        for seed in seeds:
            h = hits.get((model, run_id, method, target, int(seed), stage))
            if h is None:
                return out
            if abs(float(h.mean()) - float(acc[method][seed])) > REPLICA_TOLERANCE:
                raise ValueError(
                    f"run {run_id!r} ({model}): the test hits of {method} seed {seed} x{target:g} ({stage}) give "
                    f"top-1 {h.mean():.4f}, its final {acc[method][seed]:.4f}: not that final's model"
                )
            table[method, seed] = h
    if len({h.size for h in table.values()}) != 1:
        raise ValueError(f"run {run_id!r} ({model}) x{target:g} ({stage}): test hits of different test splits")
    d = np.stack([table[policy, s].astype(np.int8) - table[rival, s].astype(np.int8) for s in seeds])
    both = seed_image_margin(d)
    # Centred on the logged margin: a replica's hits (a GPU final re-measured on the CPU) may differ from
    # the logged model's on a few images; they measure the noise, the log holds the measurement.
    shift = margin - both["margin"]
    low, high = both["ci_low_both"] + shift, both["ci_high_both"] + shift
    return {
        "ci_low_both": low,
        "ci_high_both": high,
        "verdict_both": margin_verdict(low, high, max(len(seeds), 2)),
        "floor": both["floor"],
    }


def rival_margins(
    df: pd.DataFrame,
    rivals: Sequence[str] = POLICY_RIVALS,
    policies: Sequence[str] = POLICY_METHODS,
    hits: Mapping[HitsKey, np.ndarray] | None = None,
) -> pd.DataFrame:
    """Per run, target and policy: its paired margin over *each* rival, BN and finetuned.

    :func:`policy_margins` tests the policy against the best rival only; the claim is about every
    rival, and a policy can beat the best rival's mean while losing to another rival seed by seed.
    Same pairing, interval and verdict as there (:func:`~common.analysis.stats.paired_interval`,
    :func:`~common.analysis.verdicts.margin_verdict`); the same rows of ``df`` count (HT-2, compared within
    one run). Each row also carries the simultaneous interval over the ``k`` rivals of its run, target,
    policy and stage that have an interval (Bonferroni, each at
    :func:`~common.analysis.stats.bonferroni_level` ``(0.95, k)``): the one to quote when a single rival's
    row is read as a finding while the others were looked at too. Where ``hits`` holds the per-image test
    hits of every final a margin pairs (:func:`~common.analysis.collect_hits`), the row also carries the
    interval over seeds *and* test images (:func:`~common.analysis.verdicts.seed_image_margin`), centred on
    the logged margin, its verdict and the floor of the design.

    Args:
        df: per-seed rows (:func:`~common.analysis.summary_table`).
        rivals, policies: as :func:`policy_margins`.
        hits: per-image hits by :data:`~common.analysis.hits.HitsKey` (None: no seeds+images columns).

    Returns:
        :data:`RIVAL_MARGIN_COLUMNS`, one row per run, target, policy and rival that both ran
        (rivals in the order of ``rivals``); NaN / ``n = 0`` for a stage not measured on both
        (``k = 0`` where no rival has two paired seeds). ``macs_pct`` pairs every seed both ran
        (the plans, hence their MACs, do not change with finetuning).

    Raises:
        ValueError: hits that are not their final's (:func:`_both_fields`).
    """
    rows = []
    for g in comparison_groups(df):
        for policy in policies:
            if not (g["method"] == policy).any():
                continue
            rows += _rival_rows(g, policy, [r for r in rivals if (g["method"] == r).any()], hits or {})
    return pd.DataFrame(rows, columns=list(RIVAL_MARGIN_COLUMNS))


def _rival_rows(
    group: pd.DataFrame, policy: str, cell: Sequence[str], hits: Mapping[HitsKey, np.ndarray]
) -> list[dict[str, Any]]:
    """The :func:`rival_margins` rows of ``policy`` in one comparison group, one per rival of ``cell`` (the
    rivals run in the group, in display order); ``k`` counts those of ``cell`` with two paired seeds."""
    diffs = {
        (r, stage): (
            _paired_pp(_per_seed(group, policy, col), _per_seed(group, r, col))
            if col in group.columns
            else np.array([])
        )
        for r in cell
        for stage, col in STAGES
    }
    family = {stage: sum(len(diffs[r, stage]) >= 2 for r in cell) for stage, _ in STAGES}
    rows = []
    for rival in cell:
        row = {c: group[c].iloc[0] for c in (*RUN_COLUMNS, "target")} | {"policy": policy, "rival": rival}
        row["macs_pct"] = _macs_pct_of(group, policy, rival)
        for stage, col in STAGES:
            d, k = diffs[rival, stage], family[stage]
            mean, low, high, verdict = judged(d)
            # k == 0: no rival, this one included, has two paired seeds: no interval either way.
            _, low_k, high_k, verdict_k = judged(d, bonferroni_level(LEVEL, k)) if k else judged(d)
            row |= {
                f"margin_{stage}": mean,
                f"ci_low_{stage}": low,
                f"ci_high_{stage}": high,
                f"n_{stage}": len(d),
                f"verdict_{stage}": verdict,
                f"k_{stage}": k,
                f"ci_low_bonf_{stage}": low_k,
                f"ci_high_bonf_{stage}": high_k,
                f"verdict_bonf_{stage}": verdict_k,
            }
            both = _both_fields(group, policy, rival, stage, col, hits, mean)
            row |= {f"{k}_{stage}": v for k, v in both.items()}
        rows.append(row)
    return rows

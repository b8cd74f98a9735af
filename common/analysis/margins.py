"""Does the HT-2 policy beat its rivals? Paired per-seed margins with Student-t intervals.

:func:`policy_margins` compares, per run, target and policy (``policy`` and ``policy_seeded``, the
search that also starts from the rule plans), the policy's test accuracy with the best rival's, seed
by seed (:func:`paired_interval`, :func:`margin_verdict`); the Markdown section that shows it is
:func:`common.analysis.summary.margins_section`. :func:`rival_margins` does the same against each
rival.

Several rivals, one question each. The claim "the policy is ahead of *every* rival" is an
intersection-union test (Berger 1982, *Technometrics* 24(4)): it holds at level 5 % when every
per-rival 95 % interval excludes 0, with no correction (``every_rival_*`` of :func:`policy_margins`).
Reading one rival's row as a finding of its own ("ahead of uniform") while the other rivals were
looked at too is a different question, and its error rate over the ``k`` rivals of the cell needs
simultaneous intervals: :func:`rival_margins` also gives the Bonferroni ones (each at
``1 - 0.05 / k``, :func:`bonferroni_level`). Neither corrects for seeds added after a look at the
margins; that is the protocol's to declare.

Seeds are not the only sample. Every method is scored on the same fixed test images, so the per-seed
intervals answer "would other seeds give this margin *on these images*"; whether it holds on other
images of the same distribution is a second source of noise. :func:`seed_image_interval` takes both
(seeds and test images as crossed random factors) from per-image results, :func:`seed_image_margin` adds
what such a design can resolve, and :func:`rival_margins` carries both intervals where the finals' per-image
hits are known (:mod:`~common.analysis.hits`).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import pandas as pd

from common.analysis.context import RUN_COLUMNS
from common.analysis.hits import REPLICA_TOLERANCE, HitsKey

__all__ = [
    "POLICY_MARGIN_COLUMNS",
    "POLICY_METHODS",
    "POLICY_RIVALS",
    "RIVAL_MARGIN_COLUMNS",
    "bonferroni_level",
    "comparison_groups",
    "design_se",
    "detectable_margin",
    "every_rival_verdict",
    "images_needed",
    "judged",
    "macs_pct",
    "margin_verdict",
    "paired_interval",
    "policy_margins",
    "rival_margins",
    "SEED_IMAGE_COLUMNS",
    "seed_image_interval",
    "seed_image_margin",
    "variance_components",
]

POLICY_RIVALS: tuple[str, ...] = ("uniform", "energy", "vbmf", "random", "tpe")
"""Methods :func:`policy_margins` compares the policy with (those present)."""

POLICY_METHODS: tuple[str, ...] = ("policy", "policy_seeded")
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
(:func:`every_rival_verdict`), the policy's MACs relative to the best rival's (:func:`macs_pct`), and where
per-image test hits are known the interval over seeds *and* test images against the best rival
(``ci_*_both``, ``verdict_both``, as :func:`rival_margins`) and the verdict against every rival on those
intervals (``every_rival_both``: only where every rival of the stage has one; None elsewhere)."""

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
the Bonferroni interval at level :func:`bonferroni_level` ``(0.95, k)`` and its verdict; where the per-image
test hits of every paired final are known, the interval over seeds *and* test images (``ci_*_both``, centred
on the logged margin, :func:`seed_image_margin`), its verdict and the design's ``floor`` (the smallest
margin found with 80 % power on these test images whatever the number of seeds); NaN / None elsewhere."""

SEED_IMAGE_COLUMNS: tuple[str, ...] = (
    "n_seeds",
    "n_images",
    "margin",
    "ci_low_seed",
    "ci_high_seed",
    "verdict_seed",
    "ci_low_both",
    "ci_high_both",
    "verdict_both",
    "df_both",
    "se_seed",
    "se_image",
    "disagree_pct",
    "detectable",
    "floor",
    "images_needed",
)
"""Keys of :func:`seed_image_margin` (pp unless said): the mean paired margin, the seed-only 95 % interval and
verdict, the interval over seeds and images and its verdict (Satterthwaite ``df_both``), the standard errors
of the two main parts (``se_seed`` from the per-seed margins, ``se_image`` from the per-image ones), the test
images (%) on which the two models' top-1 hits differ, mean over seeds, and what this design can resolve
(:func:`detectable_margin`, 95 % and 80 % power): ``detectable``, the smallest true margin at these seeds and
images; ``floor``, the same with unlimited seeds on these ``n_images`` (what the test split alone allows);
``images_needed``, how many test images would make the observed margin detectable with unlimited seeds
(:func:`images_needed`)."""

LEVEL = 0.95
"""Confidence level of every margin interval (per comparison)."""


def paired_interval(differences: Sequence[float], level: float = LEVEL) -> tuple[float, float, float]:
    """Mean of paired differences and the two-sided Student-t confidence interval of that mean.

    ``mean ± t.ppf((1 + level) / 2, n - 1) * std / sqrt(n)`` with the sample std (ddof 1).

    Args:
        differences: one difference per seed; NaN entries are ignored.
        level: confidence level of the interval.

    Returns:
        ``(mean, low, high)``; the bounds are NaN below two differences (no spread to estimate),
        everything is NaN without any.
    """
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    from scipy import stats  # deferred: scipy.stats is slow to import and only this needs it

    quantile = float(stats.t.ppf(0.5 + level / 2, d.size - 1))
    half = quantile * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def _mean_squares(differences: np.ndarray, who: str) -> tuple[int, int, float, float, float, float]:
    """``(n, N, grand mean, MS_image, MS_seed, MS_res)`` of a seeds x images table of paired hit differences
    (two-way ANOVA, one observation per cell; ``MS_seed = MS_res = 0`` with one seed)."""
    d = np.asarray(differences, dtype=float)
    if d.ndim != 2 or d.shape[0] < 1 or d.shape[1] < 2:
        raise ValueError(f"{who}: need seeds x images (>= 1 x 2), got shape {d.shape}")
    if not np.isin(d, (-1.0, 0.0, 1.0)).all():
        raise ValueError(f"{who}: differences of per-image hits must be -1, 0 or 1")
    n, big_n = d.shape
    grand = float(d.mean())
    by_image, by_seed = d.mean(axis=0), d.mean(axis=1)
    ms_image = n * float(((by_image - grand) ** 2).sum()) / (big_n - 1)
    if n == 1:
        return n, big_n, grand, ms_image, 0.0, 0.0
    ms_seed = big_n * float(((by_seed - grand) ** 2).sum()) / (n - 1)
    resid = d - by_image[None, :] - by_seed[:, None] + grand
    ms_res = float((resid**2).sum()) / ((n - 1) * (big_n - 1))
    return n, big_n, grand, ms_image, ms_seed, ms_res


def seed_image_interval(differences: np.ndarray, level: float = LEVEL) -> dict[str, float]:
    """Mean paired margin with an interval over seeds *and* test images (a crossed two-way design).

    ``differences[s, i]`` is the policy's hit on test image ``i`` minus the rival's (each 0 or 1), both at
    seed ``s``. The seed-only interval (:func:`paired_interval` of the per-seed accuracy differences) treats
    the test images as fixed; here they are a sample too. With ``d[s, i] = mu + a_i + b_s + e_si`` (image,
    seed and interaction effects, all random), the variance of the grand mean is
    ``var_a / N + var_b / n + var_e / (n N)``, estimated without bias by ``(MS_image + MS_seed - MS_res) /
    (n N)`` from the two-way ANOVA mean squares (one observation per cell), with Satterthwaite's (1946)
    degrees of freedom for that combination of mean squares. The interval is never narrower than the
    seed-only one (same mean, t on ``n - 1`` df): it answers a question with more noise in it. With one
    seed it is the paired-proportion interval over images alone (``var_i(d) / N``), conditional on that seed.

    Args:
        differences: shape ``n x N`` (seeds x images), values in {-1, 0, 1}; every row on the same
            images in the same order.
        level: confidence level.

    Returns:
        ``mean``, ``low``, ``high`` (percentage points), ``se`` (pp), ``df``, and the two main parts of the
        variance in pp²: ``var_seed`` (``MS_seed / (n N)``, what the seed-only interval uses) and
        ``var_image`` (``MS_image / (n N)``); ``low``/``high`` are NaN when the variance estimate is 0.

    Raises:
        ValueError: not two-dimensional, no image, or a value outside {-1, 0, 1}.
    """
    n, big_n, grand, ms_image, ms_seed, ms_res = _mean_squares(differences, "seed_image_interval")
    parts = [(ms_image, big_n - 1)]
    var = ms_image
    if n > 1:
        parts += [(ms_seed, n - 1), (ms_res, (n - 1) * (big_n - 1))]
        var = ms_image + ms_seed - ms_res
        if var < ms_seed:  # by chance below the seeds' own spread: never report less than they show
            var, parts = ms_seed, [(ms_seed, n - 1)]
    var /= n * big_n
    scale = 100.0  # fractions to percentage points
    out = {
        "mean": scale * grand,
        "se": scale * math.sqrt(var),
        "var_seed": scale**2 * ms_seed / (n * big_n),
        "var_image": scale**2 * ms_image / (n * big_n),
        "low": math.nan,
        "high": math.nan,
        "df": math.nan,
    }
    if var <= 0:
        return out
    denom = sum((ms / (n * big_n)) ** 2 / dof for ms, dof in parts)
    dof = var**2 / denom if denom > 0 else math.inf
    from scipy import stats  # deferred, as in paired_interval

    half = float(stats.t.ppf(0.5 + level / 2, dof)) * out["se"]
    if n > 1:
        # Never narrower than the seeds alone (paired_interval's t on n - 1 df): where the seeds dominate,
        # Satterthwaite's df exceed n - 1 and would shrink it below the interval of a question with less
        # noise; simulated at n = 3 that undercovers (93 %), the hull does not.
        half = max(half, float(stats.t.ppf(0.5 + level / 2, n - 1)) * 100.0 * math.sqrt(ms_seed / (n * big_n)))
    out.update(low=out["mean"] - half, high=out["mean"] + half, df=float(dof))
    return out


def variance_components(differences: np.ndarray) -> dict[str, float]:
    """The three variance components of a seeds x images table of paired hit differences (fractions²).

    Under :func:`seed_image_interval`'s model ``d[s, i] = mu + a_i + b_s + e_si``, the unbiased ANOVA
    estimates ``image = (MS_image - MS_res) / n``, ``seed = (MS_seed - MS_res) / N`` and ``resid = MS_res``,
    each clipped at 0. With one seed only the image part is estimable, as ``var_i(d)`` (the interaction
    folded in). :func:`design_se` projects them to another number of seeds or images.

    Args:
        differences: shape ``n x N`` (seeds x images), values in {-1, 0, 1}.

    Raises:
        ValueError: as :func:`seed_image_interval`.
    """
    n, big_n, _, ms_image, ms_seed, ms_res = _mean_squares(differences, "variance_components")
    if n == 1:
        return {"image": ms_image, "seed": 0.0, "resid": 0.0}
    return {
        "image": max(0.0, (ms_image - ms_res) / n),
        "seed": max(0.0, (ms_seed - ms_res) / big_n),
        "resid": ms_res,
    }


def design_se(components: Mapping[str, float], n_seeds: float, n_images: float) -> float:
    """Standard error (pp) of a mean paired margin over ``n_seeds`` seeds and ``n_images`` test images, from
    :func:`variance_components`: ``sqrt(image / N + seed / n + resid / (n N))``; ``n_seeds = math.inf``
    gives the floor that no number of seeds lowers (the test images' own part)."""
    var = components["image"] / n_images + components["seed"] / n_seeds + components["resid"] / (n_seeds * n_images)
    return 100.0 * math.sqrt(var)


def detectable_margin(se: float, df: float = math.inf, level: float = LEVEL, power: float = 0.8) -> float:
    """The smallest true margin (pp) whose interval at ``level`` excludes 0 with probability ``power``:
    ``(t_{(1 + level) / 2} + t_{power}) * se`` on ``df`` degrees of freedom (the usual two-sided
    approximation, which ignores the far tail). A margin below it is one this design mostly calls
    *within noise* even when it is real.

    Raises:
        ValueError: ``power`` or ``level`` outside (0, 1), or ``df`` not positive.
    """
    if not (0.0 < level < 1.0 and 0.0 < power < 1.0):
        raise ValueError(f"detectable_margin: level and power must lie in (0, 1), got {level}, {power}")
    if not df > 0:
        raise ValueError(f"detectable_margin: df must be positive, got {df}")
    from scipy import stats  # deferred, as in paired_interval

    return float(stats.t.ppf(0.5 + level / 2, df) + stats.t.ppf(power, df)) * se


def images_needed(
    components: Mapping[str, float], margin: float, n_seeds: float = math.inf, power: float = 0.8
) -> float:
    """How many test images make ``margin`` (pp) detectable at 95 % with ``power`` over ``n_seeds`` seeds:
    ``N`` solving ``(z_0.975 + z_power) * design_se(components, n_seeds, N) = |margin|`` (normal quantiles).

    With unlimited seeds (the default) it is the test split a margin needs whatever the seeds; at a few
    seeds it is a lower bound, since :func:`seed_image_interval` is never narrower than the seeds' own t
    interval on ``n - 1`` df, which this ignores.

    Returns:
        The number of images (fractional); ``math.inf`` where the seeds' own part alone is too large (more
        seeds are needed, not images) or the margin is 0; NaN where no per-image part is estimated (e.g. two
        methods that found the same plans: the images do not limit such a design, the seeds do).
    """
    per_image = components["image"] + components["resid"] / n_seeds
    if per_image <= 0:
        return math.nan
    target = (abs(margin) / 100.0 / detectable_margin(1.0, power=power)) ** 2  # the se that margin needs, squared
    room = target - components["seed"] / n_seeds
    if room <= 0:
        return math.inf
    return per_image / room


def seed_image_margin(differences: np.ndarray) -> dict[str, Any]:
    """One policy's margin over one rival with seeds and test images as samples: :data:`SEED_IMAGE_COLUMNS`.

    Args:
        differences: shape ``n x N`` (seeds x images), the policy's hit minus the rival's on each test image
            at each seed, values in {-1, 0, 1} (as :func:`seed_image_interval`).

    Raises:
        ValueError: as :func:`seed_image_interval`.
    """
    d = np.asarray(differences)
    both = seed_image_interval(d)
    parts = variance_components(d)
    n, big_n = d.shape
    _, low_s, high_s, verdict_s = judged(100.0 * d.mean(axis=1))
    return {
        "n_seeds": n,
        "n_images": big_n,
        "margin": both["mean"],
        "ci_low_seed": low_s,
        "ci_high_seed": high_s,
        "verdict_seed": verdict_s,
        "ci_low_both": both["low"],
        "ci_high_both": both["high"],
        # one seed leaves the images as the only sample: that interval is a verdict too
        "verdict_both": margin_verdict(both["low"], both["high"], max(n, 2)),
        "df_both": both["df"],
        "se_seed": math.sqrt(both["var_seed"]),
        "se_image": math.sqrt(both["var_image"]),
        "disagree_pct": 100.0 * float((d != 0).mean()),
        "detectable": _detectable(both, n),
        "floor": detectable_margin(design_se(parts, math.inf, big_n)),
        "images_needed": images_needed(parts, both["mean"]),
    }


def _detectable(both: Mapping[str, float], n_seeds: int) -> float:
    """:func:`detectable_margin` of the seeds+images interval as it is drawn: the hull with the seed-only
    interval (t on ``n - 1`` df), so the larger of the two."""
    out = detectable_margin(both["se"], both["df"]) if both["df"] > 0 else math.nan
    if n_seeds > 1 and both["var_seed"] > 0:
        out = max(out, detectable_margin(math.sqrt(both["var_seed"]), n_seeds - 1))
    return out


def bonferroni_level(level: float, k: int) -> float:
    """Per-interval confidence level that makes ``k`` intervals hold together with probability at
    least ``level`` (Bonferroni: the miss rate ``1 - level`` split evenly, ``1 - (1 - level) / k``).

    Raises:
        ValueError: ``k`` below 1 or ``level`` outside (0, 1).
    """
    if k < 1:
        raise ValueError(f"bonferroni_level: k must be at least 1 interval, got {k}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"bonferroni_level: level must lie in (0, 1), got {level}")
    return 1.0 - (1.0 - level) / k


def every_rival_verdict(verdicts: Mapping[str, str | None]) -> str | None:
    """Is the policy ahead of every rival? One cell's answer from its per-rival verdicts.

    Ahead of all of them only when every rival's own 95 % interval excludes 0 on the policy's side
    (an intersection-union test: no multiplicity correction is needed for "all", Berger 1982);
    otherwise the rivals that stop it, by kind.

    Args:
        verdicts: rival name -> :func:`margin_verdict` of its paired margin, in display order;
            rivals not measured at this stage (None) are left out.

    Returns:
        ``"ahead of all 5"``, or e.g. ``"behind energy; within noise of tpe, random"`` (``1 seed:``
        names rivals paired on one seed only); None when no rival was measured.
    """
    measured = {r: v for r, v in verdicts.items() if v is not None}
    if not measured:
        return None
    if all(v == "policy ahead" for v in measured.values()):
        return f"ahead of all {len(measured)}"
    parts = []
    for verdict, label in (
        ("policy behind", "behind"),
        ("within noise", "within noise of"),
        ("1 seed: no interval", "1 seed:"),
    ):
        names = [r for r, v in measured.items() if v == verdict]
        if names:
            parts.append(f"{label} {', '.join(names)}")
    return "; ".join(parts)


def margin_verdict(low: float, high: float, n: int) -> str | None:
    """Verdict on a paired margin's interval: is the policy ahead, behind, or within noise?

    Returns:
        ``"policy ahead"`` (low > 0), ``"policy behind"`` (high < 0), ``"within noise"``,
        ``"1 seed: no interval"`` for ``n == 1``, None for ``n == 0``.
    """
    if n == 0:
        return None
    if n == 1:
        return "1 seed: no interval"
    if low > 0:
        return "policy ahead"
    if high < 0:
        return "policy behind"
    return "within noise"


def judged(differences: Sequence[float], level: float = LEVEL) -> tuple[float, float, float, str | None]:
    """``(mean, low, high, verdict)``: :func:`paired_interval` of per-seed ``differences`` at ``level`` and
    the :func:`margin_verdict` of it."""
    mean, low, high = paired_interval(differences, level)
    return mean, low, high, margin_verdict(low, high, len(differences))


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
    the seeds both measured, with its 95 % Student-t interval (see :func:`paired_interval`,
    :func:`margin_verdict`). Percentage points; NaN where a side was not measured (e.g. no
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
    Same pairing, interval and verdict as there (:func:`paired_interval`, :func:`margin_verdict`);
    the same rows of ``df`` count (HT-2, compared within one run). Each row also carries the
    simultaneous interval over the ``k`` rivals of its run, target, policy and stage that have an
    interval (Bonferroni, each at :func:`bonferroni_level` ``(0.95, k)``): the one to quote when a
    single rival's row is read as a finding while the others were looked at too. Where ``hits`` holds
    the per-image test hits of every final a margin pairs (:func:`~common.analysis.collect_hits`), the
    row also carries the interval over seeds *and* test images (:func:`seed_image_margin`), centred on
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
            cell = [r for r in rivals if (g["method"] == r).any()]
            diffs = {
                (r, stage): (
                    _paired_pp(_per_seed(g, policy, col), _per_seed(g, r, col)) if col in g.columns else np.array([])
                )
                for r in cell
                for stage, col in STAGES
            }
            family = {stage: sum(len(diffs[r, stage]) >= 2 for r in cell) for stage, _ in STAGES}
            for rival in cell:
                row = {c: g[c].iloc[0] for c in (*RUN_COLUMNS, "target")} | {"policy": policy, "rival": rival}
                row["macs_pct"] = _macs_pct_of(g, policy, rival)
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
                    both = _both_fields(g, policy, rival, stage, col, hits or {}, mean)
                    row |= {f"{k}_{stage}": v for k, v in both.items()}
                rows.append(row)
    return pd.DataFrame(rows, columns=list(RIVAL_MARGIN_COLUMNS))

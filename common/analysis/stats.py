"""Statistics of paired margins, on arrays: intervals, variance components and what a design can resolve.

A margin is the policy's test accuracy minus a rival's, paired by seed. :func:`paired_interval` gives the
mean of the per-seed differences with its Student-t interval. Seeds are not the only sample: every method is
scored on the same fixed test images, so the per-seed intervals answer "would other seeds give this margin
*on these images*"; whether it holds on other images of the same distribution is a second source of noise.
:func:`seed_image_interval` takes both (seeds and test images as crossed random factors, two-way ANOVA with
Satterthwaite's 1946 degrees of freedom) from a seeds x images table of per-image hit differences;
:func:`variance_components`, :func:`design_se`, :func:`detectable_margin`, :func:`images_needed` and
:func:`detectable` say what a design of ``n`` seeds and ``N`` test images can resolve.
:func:`bonferroni_level` is the per-interval level that makes ``k`` intervals hold together.

Numbers only: :mod:`~common.analysis.verdicts` turns these intervals into verdicts, and
:mod:`~common.analysis.margins` builds the margin tables from run rows.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

__all__ = [
    "LEVEL",
    "bonferroni_level",
    "design_se",
    "detectable",
    "detectable_margin",
    "images_needed",
    "paired_interval",
    "seed_image_interval",
    "variance_components",
]

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


def detectable(both: Mapping[str, float], n_seeds: int) -> float:
    """:func:`detectable_margin` of the seeds+images interval (``both``, :func:`seed_image_interval`'s) as it
    is drawn: the hull with the seed-only interval (t on ``n - 1`` df), so the larger of the two."""
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

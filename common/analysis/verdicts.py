"""Verdicts on paired margins: is the policy ahead of a rival, behind it, or within noise?

:func:`margin_verdict` reads one margin's interval, :func:`judged` gives a margin of per-seed differences with
its interval (:func:`~common.analysis.stats.paired_interval`) and verdict, and :func:`seed_image_margin`
everything one margin says with seeds *and* test images as samples (:data:`SEED_IMAGE_COLUMNS`: both
intervals, their verdicts and what the design can resolve, :mod:`~common.analysis.stats`).

Several rivals, one question each. The claim "the policy is ahead of *every* rival" is an
intersection-union test (Berger 1982, *Technometrics* 24(4)): it holds at level 5 % when every
per-rival 95 % interval excludes 0, with no correction (:func:`every_rival_verdict`). Reading one
rival's row as a finding of its own ("ahead of uniform") while the other rivals were looked at too is
a different question, and its error rate over the ``k`` rivals of the cell needs simultaneous
intervals (each at ``1 - 0.05 / k``, :func:`~common.analysis.stats.bonferroni_level`). Neither
corrects for seeds added after a look at the margins; that is the protocol's to declare.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from common.analysis.stats import (
    LEVEL,
    design_se,
    detectable,
    detectable_margin,
    images_needed,
    paired_interval,
    seed_image_interval,
    variance_components,
)

__all__ = [
    "SEED_IMAGE_COLUMNS",
    "every_rival_verdict",
    "judged",
    "margin_verdict",
    "seed_image_margin",
]

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
(:func:`~common.analysis.stats.detectable_margin`, 95 % and 80 % power): ``detectable``, the smallest true
margin at these seeds and images; ``floor``, the same with unlimited seeds on these ``n_images`` (what the test
split alone allows); ``images_needed``, how many test images would make the observed margin detectable with
unlimited seeds (:func:`~common.analysis.stats.images_needed`)."""


def seed_image_margin(differences: np.ndarray) -> dict[str, Any]:
    """One policy's margin over one rival with seeds and test images as samples: :data:`SEED_IMAGE_COLUMNS`.

    Args:
        differences: shape ``n x N`` (seeds x images), the policy's hit minus the rival's on each test image
            at each seed, values in {-1, 0, 1} (as :func:`~common.analysis.stats.seed_image_interval`).

    Raises:
        ValueError: as :func:`~common.analysis.stats.seed_image_interval`.
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
        "detectable": detectable(both, n),
        "floor": detectable_margin(design_se(parts, math.inf, big_n)),
        "images_needed": images_needed(parts, both["mean"]),
    }


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
    """``(mean, low, high, verdict)``: :func:`~common.analysis.stats.paired_interval` of per-seed
    ``differences`` at ``level`` and the :func:`margin_verdict` of it."""
    mean, low, high = paired_interval(differences, level)
    return mean, low, high, margin_verdict(low, high, len(differences))

"""The sensitivity-guided policy's distribution over per-layer choices (pure numpy, no model).

From a layer's *sensitivity profile* (its proxy score when only it is compressed, at a few levels;
measured by :meth:`common.search.Searcher.sensitivity`) :func:`drop_curve` interpolates the score it
loses at any level. :func:`choice_pdf` turns those drops and the choices' costs into one categorical
distribution per layer that meets a budget in expectation, and :func:`cem_refit` moves it towards
the choices of the best-scored plans (one cross-entropy step).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def drop_curve(points: Sequence[tuple[float, float]], dense: float, levels: Sequence[float]) -> np.ndarray:
    """Interpolated score drop at each of ``levels`` (0 at dense, monotone as the level falls).

    Args:
        points: ``(level, score)`` of the layer alone at each sensitivity level.
        dense: the uncompressed model's score (the drop at level 1).
    """
    pts = sorted(list(points) + [(1.0, dense)], key=lambda p: -p[0])
    fs = np.array([p[0] for p in pts])
    drops = np.maximum.accumulate(np.maximum(dense - np.array([p[1] for p in pts]), 0.0))
    out = []
    for f in levels:
        if f >= fs[0]:
            out.append(0.0)
        elif f <= fs[-1]:  # extrapolate along the last segment, never below the last value
            slope = (drops[-1] - drops[-2]) / max(fs[-2] - fs[-1], 1e-9)
            out.append(drops[-1] + max(slope, 0.0) * (fs[-1] - f))
        else:
            out.append(float(np.interp(-f, -fs, drops)))
    return np.array(out)


def choice_pdf(drops: np.ndarray, cost: np.ndarray, budget: float, temperature: float) -> tuple[np.ndarray, dict]:
    """``p[l, k] ∝ exp(-(drops[l, k] + μ·cost[l, k]) / T)``, with μ set so the expected total cost is ``budget``.

    ``cost`` is each choice's cost as a share of the dense model's total, ``budget`` the share left to
    the compressible layers. ``T`` is ``temperature`` times the median positive drop; μ is found by
    bisection in log μ (the expected cost falls as μ grows).

    Returns:
        (pdf of shape ``drops.shape``, ``{"mu", "temperature_abs", "drop_scale"}``).
    """
    pos = drops[drops > 0]
    scale = float(np.median(pos)) if pos.size else 1e-3
    temp = temperature * max(scale, 1e-9)

    def pdf(mu: float) -> np.ndarray:
        logits = -(drops + mu * cost) / temp
        logits -= logits.max(axis=1, keepdims=True)
        p = np.exp(logits)
        return p / p.sum(axis=1, keepdims=True)

    lo, hi = 1e-9, 1e9
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        if float((pdf(mid) * cost).sum()) > budget:
            lo = mid
        else:
            hi = mid
    mu = math.sqrt(lo * hi)
    return pdf(mu), {"mu": mu, "temperature_abs": temp, "drop_scale": scale}


def cem_refit(pdf: np.ndarray, hist: Sequence[dict], elite_frac: float, smoothing: float) -> np.ndarray:
    """One cross-entropy step: blend ``pdf`` with the choice frequencies of the elite candidates.

    ``hist`` holds scored candidates (``score``, ``index``, ``choices_drawn``: one choice per layer); the
    elite are the ``max(2, elite_frac·len)`` best (ties: the earlier); the result is
    ``(1 - smoothing)·pdf + smoothing·freq``.
    """
    n_elite = max(2, int(len(hist) * elite_frac))
    elite = sorted(hist, key=lambda h: (-h["score"], h["index"]))[:n_elite]
    freq = np.zeros_like(pdf)
    for h in elite:
        for li, k in enumerate(h["choices_drawn"]):
            freq[li, k] += 1
    freq /= freq.sum(axis=1, keepdims=True)
    return (1 - smoothing) * pdf + smoothing * freq

"""The sensitivity-guided policy's distribution over per-layer choices (no model: scores come in).

:func:`sensitivity_profile` measures each layer's *sensitivity profile* (its proxy score when only it
is compressed, at a few levels), through the search's recorded evaluation
(:meth:`common.search.searcher.Searcher.sensitivity`). From it :func:`drop_curve` interpolates the score a layer
loses at any level. :func:`choice_pdf` turns those drops and the choices' costs into one categorical
distribution per layer that meets a budget in expectation (:func:`policy_pdf` assembles both for a
search space), and :func:`cem_refit` moves it towards the choices of the best-scored plans (one
cross-entropy step). :func:`knapsack_choices` finds the plan that model rates best: the policy may
start from it (``SearchConfig.knapsack``), and ``studies/additivity/additivity.py`` measures how far the joint
loss of a plan is from the model's sum.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from common.search.space import SearchSpace

Profile = dict[str, dict[str, list[tuple[float, float]]]]
"""``{layer: {shape: [(level, score), ...]}}``: each layer alone at each sensitivity level and shape."""


def sensitivity_profile(
    space: SearchSpace,
    shapes: Sequence[str],
    levels: Sequence[float],
    evaluate: Callable[[list[tuple[dict, dict, dict]], Callable[[int, float], None]], list[float]],
    progress: Callable[[str], None],
) -> Profile:
    """Each layer of ``space`` alone at each of ``levels`` in each of ``shapes``, scored.

    ``evaluate(points, on_done)`` scores every point ``(plan, key, extra)`` (a one-layer ``plan``; ``key``
    (layer, level, shape) names the point and ``extra`` (its ranks and method) is recorded with it),
    calling ``on_done(i, score)`` in index order as scores arrive; all points are listed first so they
    can be scored in parallel (:mod:`common.dist`). ``progress`` gets one line per layer.
    """
    points, owner = [], []
    for ls in space.layers:
        for shape in shapes:
            for f in levels:
                lp = ls.choice(f, shape)
                key = {"layer": ls.info.name, "level": float(f), "shape": shape}
                points.append(({ls.info.name: lp}, key, {"ranks": list(lp.ranks), "method": lp.method}))
                owner.append((ls.info.name, shape, float(f)))
    out: Profile = {ls.info.name: {shape: [] for shape in shapes} for ls in space.layers}
    per_layer = len(shapes) * len(levels)

    def done(i: int, score: float) -> None:
        n, shape, f = owner[i]
        out[n][shape].append((f, score))
        if (i + 1) % per_layer == 0:
            k = (i + 1) // per_layer
            progress(
                f"sensitivity {k}/{len(space.layers)} {n}: "
                + "; ".join(f"{s} " + ", ".join(f"{f:g}->{v:.4g}" for f, v in p) for s, p in out[n].items())
            )

    evaluate(points, done)
    return out


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


def choice_costs(
    space: SearchSpace, choices: Sequence[tuple[float, str]], target: float, metric: str
) -> tuple[np.ndarray, float]:
    """Each layer's ``metric`` (MACs or params) at each of ``choices`` as a share of the dense model's
    total (shape ``(layers, choices)``), and the share left to the compressible layers at ``target``×."""
    idx = 0 if metric == "params" else 1
    dense_total = space.dense_params if metric == "params" else space.dense_macs
    fixed = space.fixed_params if metric == "params" else space.fixed_macs
    cost = np.array([[ls.cost(ls.choice(f, s))[idx] for f, s in choices] for ls in space.layers]) / dense_total
    return cost, 1.0 / target - fixed / dense_total


def choice_drops(
    space: SearchSpace, choices: Sequence[tuple[float, str]], profile: Profile, dense: float
) -> np.ndarray:
    """The score each layer loses alone at each of ``choices`` (shape ``(layers, choices)``): its
    :func:`drop_curve` in the choice's shape, at the choice's level, against the ``dense`` score."""
    drops = np.zeros((len(space.layers), len(choices)))
    for li, ls in enumerate(space.layers):
        for s in dict.fromkeys(cs for _, cs in choices):
            cols = [k for k, (_, cs) in enumerate(choices) if cs == s]
            drops[li, cols] = drop_curve(profile[ls.info.name][s], dense, [choices[k][0] for k in cols])
    return drops


def policy_pdf(
    space: SearchSpace,
    choices: Sequence[tuple[float, str]],
    profile: Profile,
    dense: float,
    target: float,
    metric: str,
    temperature: float,
) -> tuple[np.ndarray, dict]:
    """The policy's per-layer distribution over ``choices`` ((level, shape) pairs): :func:`choice_pdf`.

    A choice's ``drop`` is the layer's interpolated sensitivity (:func:`drop_curve` of its ``profile``
    against the ``dense`` model's score: the score lost when only that layer is compressed to that
    choice) and its ``cost`` the layer's MACs (or params) there as a share of the model's total, so big
    layers gain most by compressing; the expected total cost under the pdf meets ``target``× reduction
    of ``metric``, and the temperature is ``temperature`` times the median drop.

    Returns:
        (pdf, the :func:`choice_pdf` info plus the ``choices`` and the ``drops``, rounded).
    """
    drops = choice_drops(space, choices, profile, dense)
    cost, budget = choice_costs(space, choices, target, metric)
    pdf, info = choice_pdf(drops, cost, budget, temperature)
    return pdf, {
        **info,
        "choices": [list(c) for c in choices],
        "drops": [[float(f"{v:.4g}") for v in row] for row in drops],
    }


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


def knapsack_choices(drops: np.ndarray, cost: np.ndarray, budget: float, grid: int = 4000) -> list[int]:
    """The per-layer choices with the least total ``drops`` whose total ``cost`` is at most ``budget``.

    The policy's additive model at its optimum: a multiple-choice knapsack, solved exactly by dynamic
    programming over costs rounded *up* to ``1/grid`` of the budget's unit (so the result never
    exceeds ``budget``; it can miss a better plan within ``L/grid`` of it).

    Args:
        drops: ``(L, K)`` score drop of layer ``l`` at choice ``k``.
        cost: ``(L, K)`` cost of the same choices, in the unit of ``budget`` (e.g. share of dense MACs).
        budget: the most the chosen costs may add up to.

    Raises:
        ValueError: the cheapest choices already exceed ``budget``, or the shapes differ.
    """
    drops, cost = np.asarray(drops, float), np.asarray(cost, float)
    if drops.shape != cost.shape or drops.ndim != 2:
        raise ValueError(
            f"drops and cost must be (layers, choices) arrays of one shape, got {drops.shape} and {cost.shape}"
        )
    units = np.ceil(cost * grid - 1e-9).astype(int)
    cap = int(math.floor(budget * grid + 1e-9))
    if int(units.min(axis=1).sum()) > cap:
        raise ValueError(
            f"no choice of one option per layer fits the budget {budget:g} (cheapest: {cost.min(axis=1).sum():g})"
        )
    best = np.full(cap + 1, np.inf)
    best[0] = 0.0
    picks = []
    for d_row, u_row in zip(drops, units):
        nxt, arg = np.full(cap + 1, np.inf), np.zeros(cap + 1, dtype=int)
        for k, (d, u) in enumerate(zip(d_row, u_row)):
            if u > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[u:] = best[: cap + 1 - u] + d
            better = cand < nxt
            nxt[better], arg[better] = cand[better], k
        picks.append(arg)
        best = nxt
    used = int(np.argmin(best))
    out = []
    for arg, u_row in zip(reversed(picks), reversed(units)):
        k = int(arg[used])
        out.append(k)
        used -= int(u_row[k])
    return out[::-1]

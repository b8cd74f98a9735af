"""Local refinement of a search's best plan: budget moved between pairs of layers, accepted by the proxy.

The ``guided`` search (:func:`common.search.methods.search_guided`, the default method) seeds the
sensitivity-guided policy with the rule plans and then spends the last part of its candidate budget
(``SearchConfig.refine``) here, around its *incumbent*, the best-scored candidate so far. Seeding alone
makes the rules' plans candidates, so the search can tie the best rule but not beat it when the policy's
distribution never proposes anything as good; refining from the incumbent makes the best rule plan a floor.

A *move* takes cost from one layer and gives it to another: layer ``i``'s ranks are scaled up until its
cost (MACs, or params with ``metric="params"``) grows by a step ``δ`` of its own cost, layer ``j``'s are
scaled down by as much, keeping each layer's rank *shape* (the ratios between R1, R3 and R13; a rule plan
shaped by its spectra stays so), and :func:`common.search.space.repair_plan` puts the result back inside
the budget band. With ``"energy"`` among ``SearchConfig.shapes`` a move may instead re-shape one layer at
equal cost (level-shaped ranks ↔ the layer's energy-shaped ranks).

Which pairs: the policy's additive model (:func:`common.search.policy.drop_curve`: each layer's measured
sensitivity, as a function of its cost) predicts each pair's gain, ``drop_i(c_i) − drop_i(c_i + Δ) −
(drop_j(c_j − Δ) − drop_j(c_j))``, and pairs are drawn with probability rising with it (a softmax, mixed
with a uniform share for exploration). The model proposes and the proxy decides: a plan's loss is only
roughly the sum of its layers' (``studies/additivity``).

Each batch of ``SearchConfig.refine_batch`` proposals is drawn from the incumbent with a generator seeded
by the search seed and the batch number, before any of them is evaluated, so a resumed search proposes
the same plans under the same record keys, and a ``torchrun`` launch scores a batch on all ranks. The best
of a batch replaces the incumbent when it scores higher.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np

from common.decompose.ranks import full_ranks, round_rank
from common.decompose.surgery import LayerPlan
from common.search.policy import drop_curve
from common.search.space import LayerSpace, plan_key, repair_plan

__all__ = ["MOVE_STEPS", "refine", "rescaled"]

MOVE_STEPS = (0.15, 0.3, 0.5)
"""The relative cost steps ``δ`` a move gives its up layer (one drawn per proposal)."""

_UNIFORM_SHARE = 0.2
"""Share of each pair's probability spread evenly over all pairs (exploration beyond the model)."""

_GRID = np.linspace(0.04, 1.0, 25)
"""Levels at which each layer's drop curve and level-shaped cost are tabulated."""


def _cost(ls: LayerSpace, lp: LayerPlan, metric: str) -> float:
    return float(ls.cost(lp)[0 if metric == "params" else 1])


def _dense_cost(ls: LayerSpace, metric: str) -> float:
    return float(ls.info.params if metric == "params" else ls.info.macs)


def _scaled_ranks(ls: LayerSpace, base: Sequence[int], s: float) -> tuple[int, ...]:
    full = full_ranks(ls.method, ls.info.group_shape)
    out = [round_rank(r * s, f, ls.multiple) for r, f in zip(base, full)]
    if ls.method == "ht2":
        _, _, kh, kw = ls.info.group_shape
        out[2] = min(out[2], out[0] * kh, out[1] * kw)
    return tuple(int(v) for v in out)


def rescaled(ls: LayerSpace, lp: LayerPlan, want: float, metric: str = "macs") -> LayerPlan:
    """Layer ``ls``'s plan ``lp`` with all its ranks scaled by one factor so that it costs about ``want``
    (the closest the rank rounding allows); dense when that costs at least the dense conv. A dense layer
    is scaled down from its full ranks."""
    base = full_ranks(ls.method, ls.info.group_shape) if lp.method == "dense" else lp.ranks
    dense = _dense_cost(ls, metric)
    if want >= dense:
        return LayerPlan("dense")

    def cost(s: float) -> float:
        return _cost(ls, LayerPlan(ls.method, _scaled_ranks(ls, base, s)), metric)

    lo, hi = 1e-3, 1e3
    for _ in range(40):  # log-space bisection on the common scale of the ranks
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if cost(mid) < want else (lo, mid)
    best = min((lo, hi), key=lambda s: abs(math.log(max(cost(s), 1.0) / want)))
    ranks = _scaled_ranks(ls, base, best)
    cand = LayerPlan(ls.method, ranks)
    if ranks == full_ranks(ls.method, ls.info.group_shape) or _cost(ls, cand, metric) >= dense:
        return LayerPlan("dense")
    return cand


def _curves(searcher, metric: str) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per layer, ``(costs, drops)`` of the level-shaped choices on :data:`_GRID` (costs increasing):
    the additive model's drop as a function of the layer's cost."""
    profile, dense = searcher.sensitivity(), searcher.dense_score()
    shape = searcher.config.shapes[0]
    out = []
    for ls in searcher.space.layers:
        costs = np.array([_cost(ls, ls.choice(float(f)), metric) for f in _GRID])
        drops = drop_curve(profile[ls.info.name][shape], dense, _GRID)
        order = np.argsort(costs, kind="stable")
        out.append((costs[order], np.asarray(drops, dtype=float)[order]))
    return out


def _drop_at(curve: tuple[np.ndarray, np.ndarray], cost: float) -> float:
    costs, drops = curve
    return float(np.interp(cost, costs, drops))


def _pair_gains(plan: Mapping[str, LayerPlan], searcher, curves, delta: float, metric: str) -> np.ndarray:
    """``gains[i, j]``: the additive model's predicted gain of moving ``δ`` of layer i's cost from j to i
    (−inf on the diagonal and where a layer cannot take or give)."""
    layers = searcher.space.layers
    cost = [_cost(ls, plan.get(ls.info.name, LayerPlan("dense")), metric) for ls in layers]
    n = len(layers)
    gains = np.full((n, n), -np.inf)
    for i, ls in enumerate(layers):
        up = min(_dense_cost(ls, metric), cost[i] * (1 + delta))
        moved = up - cost[i]
        if moved <= 0:
            continue
        gain = _drop_at(curves[i], cost[i]) - _drop_at(curves[i], up)
        for j in range(n):
            if j != i and cost[j] - moved > 0:
                gains[i, j] = gain - (_drop_at(curves[j], cost[j] - moved) - _drop_at(curves[j], cost[j]))
    return gains


def _pair_probabilities(gains: np.ndarray) -> np.ndarray:
    """Softmax of the finite gains (scaled by their spread), mixed with a uniform share."""
    ok = np.isfinite(gains)
    if not ok.any():
        return np.zeros_like(gains)
    g = np.where(ok, gains, 0.0)
    scale = float(np.std(g[ok])) or 1.0
    w = np.where(ok, np.exp((g - g[ok].max()) / scale), 0.0)
    p = (1 - _UNIFORM_SHARE) * w / w.sum() + _UNIFORM_SHARE * ok / ok.sum()
    return p / p.sum()


def _shift(searcher, plan: dict, i: int, j: int, delta: float, metric: str) -> dict:
    """``plan`` with ``δ`` of layer i's cost taken from layer j (each rescaled in its own shape)."""
    li, lj = searcher.space.layers[i], searcher.space.layers[j]
    pi, pj = plan.get(li.info.name, LayerPlan("dense")), plan.get(lj.info.name, LayerPlan("dense"))
    ci, cj = _cost(li, pi, metric), _cost(lj, pj, metric)
    new_i = rescaled(li, pi, min(_dense_cost(li, metric), ci * (1 + delta)), metric)
    moved = _cost(li, new_i, metric) - ci
    new_j = rescaled(lj, pj, max(cj - moved, 1.0), metric)
    return {**plan, li.info.name: new_i, lj.info.name: new_j}


def _reshape(searcher, plan: dict, i: int, metric: str) -> dict | None:
    """``plan`` with layer i re-shaped at equal cost (level ↔ energy shape), or None if nothing changes."""
    ls = searcher.space.layers[i]
    lp = plan.get(ls.info.name, LayerPlan("dense"))
    if lp.method == "dense":
        return None
    want = _cost(ls, lp, metric)
    f = min(_GRID, key=lambda x: abs(_cost(ls, ls.choice(float(x)), metric) - want))
    for shape in ("energy", "level"):
        cand = ls.choice(float(f), shape)
        if cand != lp and cand.method != "dense":
            return {**plan, ls.info.name: cand}
    return None


def _propose(searcher, incumbent: dict, curves, rng, count: int, seen: set, target: float, metric: str) -> list:
    """Up to ``count`` new in-band plans one move from ``incumbent``: ``[(plan, move), ...]``."""
    tol, n = searcher.config.tol, len(searcher.space.layers)
    reshape = "energy" in searcher.config.shapes
    out = []
    for _ in range(count * 20):
        if len(out) == count or n < 2:
            break
        delta = float(rng.choice(MOVE_STEPS))
        if reshape and rng.random() < 0.25:
            i = int(rng.integers(n))
            plan, move = _reshape(searcher, incumbent, i, metric), {"reshape": searcher.space.names[i]}
            if plan is None:
                continue
        else:
            p = _pair_probabilities(_pair_gains(incumbent, searcher, curves, delta, metric)).ravel()
            if p.sum() <= 0:
                break
            i, j = divmod(int(rng.choice(n * n, p=p)), n)
            plan = _shift(searcher, incumbent, i, j, delta, metric)
            move = {"up": searcher.space.names[i], "down": searcher.space.names[j], "step": delta}
        if abs(searcher.space.factor(plan, metric) / target - 1) > tol:
            plan, move["repair_steps"] = repair_plan(searcher.space, plan, target, metric, tol)
        key = plan_key(plan)
        if key in seen or abs(searcher.space.factor(plan, metric) / target - 1) > tol:
            continue
        seen.add(key)
        out.append((plan, move))
    return out


def refine(searcher, method: str, target: float, metric: str, hist: list[dict], n: int, seed: int) -> tuple:
    """Spend ``n`` candidate evaluations refining the best of ``hist`` (the search's candidates so far).

    Returns:
        (the new scored candidates, in :func:`common.search.methods.search_policy`'s form, and what the
        refinement did: its starting incumbent, the accepted moves and the final incumbent, indices and
        scores).
    """
    if n <= 0 or not hist:
        return [], {"evaluations": 0}
    curves = _curves(searcher, metric)
    best = max(hist, key=lambda h: (h["score"], -h["index"]))
    start = {"index": best["index"], "score": best["score"], "seeded_from": best.get("seeded_from")}
    seen = {plan_key(h["plan"]) for h in hist}
    first_round = max(h["round"] for h in hist) + 1
    out: list[dict] = []
    accepted = []
    batch = 0
    while len(out) < n:
        rng = np.random.default_rng([seed, 7919, batch])
        count = min(searcher.config.refine_batch, n - len(out))
        proposals = _propose(searcher, best["plan"], curves, rng, count, seen, target, metric)
        if not proposals:
            searcher.progress(f"{method} x{target:g} refine: no new plan one move from #{best['index']}; stopped")
            break
        start_index = len(hist) + len(out)
        rnd = first_round + batch
        items = [
            (
                plan,
                "candidate",
                {"method": method, "target": float(target), "index": start_index + k, "round": rnd},
                {"refine_of": best["index"], "move": move},
            )
            for k, (plan, move) in enumerate(proposals)
        ]
        scores = searcher.evaluate_many(items)
        new = [
            {"index": start_index + k, "round": rnd, "score": sc, "plan": plan, "refine_of": best["index"]}
            for k, ((plan, _), sc) in enumerate(zip(proposals, scores))
        ]
        out += new
        top = max(new, key=lambda h: (h["score"], -h["index"]))
        if top["score"] > best["score"]:
            accepted.append(top["index"])
            best = top
        searcher.progress(
            f"{method} x{target:g} refine batch {batch}: best {top['score']:.5g}, incumbent #{best['index']} "
            f"{best['score']:.5g} ({len(out)}/{n})"
        )
        batch += 1
    final = {"index": best["index"], "score": best["score"]}
    return out, {"evaluations": len(out), "start": start, "accepted": accepted, "final": final}

"""The candidate-producing rank selections, as functions of a :class:`common.search.searcher.Searcher`.

The per-layer choices are the pairs (level, shape) of :mod:`common.search.space`: ``SearchConfig.levels`` ×
``SearchConfig.shapes`` (the searcher's ``choices``); a draw of one choice per layer is projected onto the
budget (:func:`choice_plan`). The policy samples them from a per-layer distribution built from each layer's
sensitivity (the proxy's loss when only that layer is compressed) and its cost, refined by
cross-entropy steps (:mod:`common.search.policy`); ``policy_seeded`` is the same search with the rule-based
plans (uniform, energy, VBMF) among its first round's candidates, counted in its budget, so the
selection sees them too and the elite that the cross-entropy step fits may include them; random draws
the choices uniformly; TPE (:mod:`common.search.tpe`, Optuna) models them. With ``SearchConfig.knapsack`` both
policies also put their additive model's optimum (:func:`model_optimum`: the least summed sensitivity
drop on the budget) among their first candidates. A search returns its scored candidates
(:data:`SEARCHES`, by method name) and :meth:`common.search.searcher.Searcher.run` picks once among them
(:func:`common.search.pick.pick`); the rule-based methods (uniform, energy, VBMF: :mod:`common.search.rules`)
bisect one global knob (:func:`rule_plan`).

Every candidate is scored through the searcher's recorder the moment it is evaluated; the draws of a
round are made before anything in it is evaluated (random, policy) or depend only on recorded scores
(TPE), so a resumed search draws the same plans under the same record keys.

Each function takes the searcher first (its ``space``, ``choices``, ``config``, ``progress`` and recorded
``evaluate``/``evaluate_many``); the parameter is not annotated, since importing the class here would
make an import cycle with :mod:`common.search.searcher`, which dispatches through :data:`SEARCHES`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence

import numpy as np

from common.decompose.surgery import LayerPlan
from common.search.policy import cem_refit, choice_costs, choice_drops, knapsack_choices
from common.search.refine import refine
from common.search.rules import RULES, energy_plan, rank0_note, uniform_plan, vbmf_plan
from common.search.space import plan_key, project, repair_plan
from common.search.tpe import tpe_search

__all__ = [
    "SEARCHES",
    "choice_plan",
    "model_optimum",
    "nearest_choices",
    "rule_plan",
    "search_guided",
    "search_policy",
    "search_policy_seeded",
    "search_random",
    "search_tpe",
    "seed_of",
]


def rule_plan(searcher, method: str, target: float, metric: str) -> tuple[dict, dict]:
    """The plan of a rule-based method (:mod:`common.search.rules`) on the budget, and its params."""
    if method == "vbmf":
        plan, params = vbmf_plan(searcher.space, *searcher.vbmf_base(), target, metric)
        note = rank0_note(target, params["evbmf_rank0"])
        if note is not None:  # one line per plan, not a warning block per layer
            searcher.progress(note)
    elif method == "energy":
        plan, params = energy_plan(searcher.space, searcher.spectra, target, metric)
    else:
        plan, params = uniform_plan(searcher.space, target, metric)
    if abs(searcher.space.factor(plan, metric) / target - 1) > searcher.config.tol:
        # Global knobs (e, β, α) move many layers' rounded ranks at once; finish layer by layer.
        plan, params["repair_steps"] = repair_plan(searcher.space, plan, target, metric, searcher.config.tol)
    return plan, params


def _draw(searcher, pdf: np.ndarray, rng: np.random.Generator) -> list[int]:
    return [int(rng.choice(len(searcher.choices), p=p)) for p in pdf]


def choice_plan(searcher, ks: Sequence[int], target: float, metric: str) -> tuple[dict, bool]:
    """The projected plan of per-layer choice indices, and whether it is within the budget tolerance."""
    levels = {n: searcher.choices[k][0] for n, k in zip(searcher.space.names, ks)}
    shapes = {n: searcher.choices[k][1] for n, k in zip(searcher.space.names, ks)}
    plan, achieved = project(searcher.space, levels, target, metric, searcher.config.tol, shapes)
    return plan, abs(achieved / target - 1) <= searcher.config.tol


def model_optimum(
    searcher, target: float, metric: str, drops: np.ndarray | None = None
) -> tuple[dict, list[int], float, bool]:
    """The plan the policy's additive model rates best: per-layer choices with the least summed drop
    whose summed cost meets the budget (:func:`common.search.policy.knapsack_choices`), projected onto it
    like a draw.

    Args:
        drops: ``(layers, choices)`` drops to use; default: from the sensitivity profile
            (:func:`common.search.policy.choice_drops`), as
            :meth:`common.search.searcher.Searcher.policy_pdf` has them.

    Returns:
        (plan, choice indices, the model's summed drop, whether the plan is within the budget tolerance).

    Raises:
        ValueError: not even the cheapest choices fit the budget.
    """
    if drops is None:
        drops = choice_drops(searcher.space, searcher.choices, searcher.sensitivity(), searcher.dense_score())
    drops = np.asarray(drops, dtype=float)
    cost, budget = choice_costs(searcher.space, searcher.choices, target, metric)
    ks = knapsack_choices(drops, cost, budget)
    plan, ok = choice_plan(searcher, ks, target, metric)
    return plan, ks, float(sum(drops[li, k] for li, k in enumerate(ks))), ok


def _sample_round(
    searcher,
    method: str,
    target: float,
    metric: str,
    pdf: np.ndarray,
    count: int,
    rng: np.random.Generator,
    rnd: int,
    start: int,
    seen: set,
    fixed: Sequence[dict] = (),
) -> list[dict]:
    """Draw ``count`` distinct plans from ``pdf`` (per-layer choice probabilities), project each onto
    the budget and evaluate; all draws happen before any evaluation (resume-safe).

    ``fixed`` candidates (``plan``, ``choices_drawn``, ``seeded_from``) come first and take their
    places among the ``count``; their plans are not drawn again."""
    drawn = [dict(d) for d in fixed][:count]
    seen.update(plan_key(d["plan"]) for d in drawn)
    for _ in range(count * 20):
        if len(drawn) == count:
            break
        ks = _draw(searcher, pdf, rng)
        plan, ok = choice_plan(searcher, ks, target, metric)
        key = plan_key(plan)
        if key in seen or not ok:
            continue
        seen.add(key)
        drawn.append({"choices_drawn": ks, "plan": plan})
    state = seed_of(rng)
    items = [
        (
            d["plan"],
            "candidate",
            {"method": method, "target": float(target), "index": start + j, "round": rnd},
            {"rng_state": state, "choices_drawn": d["choices_drawn"]}
            | ({"seeded_from": d["seeded_from"]} if "seeded_from" in d else {}),
        )
        for j, d in enumerate(drawn)
    ]
    best = -math.inf

    def report(j: int, score: float) -> None:
        nonlocal best
        best = max(best, score)
        if (j + 1) % 10 == 0 or j + 1 == len(drawn):
            searcher.progress(f"{method} x{target:g} round {rnd}: {j + 1}/{len(drawn)} evaluated, best {best:.5g}")

    scores = searcher.evaluate_many(items, report)
    return [{"index": start + j, "round": rnd, "score": sc, **d} for j, (d, sc) in enumerate(zip(drawn, scores))]


def search_random(searcher, target, metric, n, seed):
    """``n`` plans drawn with every choice equally likely, in one round."""
    rng = np.random.default_rng(seed)
    pdf = np.full((len(searcher.space.layers), len(searcher.choices)), 1.0 / len(searcher.choices))
    return _sample_round(searcher, "random", target, metric, pdf, n, rng, 0, 0, set()), {"seed": seed}


def search_policy(searcher, target, metric, n, seed, method="policy", fixed=()):
    """``n`` plans drawn from the policy pdf (:meth:`common.search.searcher.Searcher.policy_pdf`) over
    ``config.rounds`` rounds, a cross-entropy step on the elite between rounds; ``fixed`` candidates first."""
    rng = np.random.default_rng(seed)
    pdf, info = searcher.policy_pdf(target, metric)
    extra = {}
    if searcher.config.knapsack:
        fixed, extra["knapsack"] = _with_optimum(searcher, list(fixed), target, metric, method)
    rounds = max(1, searcher.config.rounds)
    per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
    hist: list[dict] = []
    seen: set = set()
    for r, count in enumerate(per_round):
        hist += _sample_round(
            searcher, method, target, metric, pdf, count, rng, r, len(hist), seen, fixed if r == 0 else ()
        )
        if r + 1 < rounds and hist:  # cross-entropy step on the elite plans' draws
            pdf = cem_refit(pdf, hist, searcher.config.elite_frac, searcher.config.smoothing)
    return hist, {"seed": seed, "pdf": info, **extra}


def _with_optimum(searcher, fixed: list[dict], target: float, metric: str, method: str) -> tuple[list[dict], dict]:
    """``fixed`` with the model optimum (:func:`model_optimum`) after it, unless it is there already or
    misses the budget; and what became of it (its model drop, or why it was left out)."""
    try:
        plan, ks, drop, ok = model_optimum(searcher, target, metric)
    except ValueError as e:
        searcher.progress(f"{method} x{target:g}: no model optimum ({e})")
        return fixed, {"used": False, "why": str(e)}
    note = {"model_drop": drop, "choices": ks}
    if not ok:
        why = f"its projection misses {target:g}x by more than ±{searcher.config.tol:.0%}"
        searcher.progress(f"{method} x{target:g}: model optimum left out: {why}")
        return fixed, {**note, "used": False, "why": why}
    if plan_key(plan) in {plan_key(d["plan"]) for d in fixed}:
        return fixed, {**note, "used": False, "why": "equal to a seeded plan"}
    return [*fixed, {"plan": plan, "choices_drawn": ks, "seeded_from": "knapsack"}], {**note, "used": True}


def search_policy_seeded(searcher, target, metric, n, seed, method="policy_seeded"):
    """The policy with the rule-based plans (:data:`common.search.rules.RULES`, each once) as its first
    candidates: they are scored like any draw and count in the ``n`` evaluations."""
    fixed, seen = [], set()
    for rule in RULES:
        plan, _ = rule_plan(searcher, rule, target, metric)
        if plan_key(plan) in seen:
            continue
        seen.add(plan_key(plan))
        fixed.append({"plan": plan, "choices_drawn": nearest_choices(searcher, plan, metric), "seeded_from": rule})
    hist, params = search_policy(searcher, target, metric, n, seed, method, fixed)
    # a first round smaller than the rule plans takes only the first of them
    return hist, {**params, "seeded_from": [h["seeded_from"] for h in hist if h.get("seeded_from") in RULES]}


def search_guided(searcher, target, metric, n, seed):
    """The default search: :func:`search_policy_seeded` on the first ``n − r`` evaluations, then
    :func:`common.search.refine.refine` of its best candidate on the last ``r = round(n · refine)``
    (``SearchConfig.refine``), so that the best rule plan is where the search starts, not where it ends."""
    r = min(int(round(n * searcher.config.refine)), max(n - len(RULES) - 1, 0))
    hist, params = search_policy_seeded(searcher, target, metric, n - r, seed, "guided")
    more, info = refine(searcher, "guided", target, metric, hist, r, seed)
    return hist + more, {**params, "refine": info}


def nearest_choices(searcher, plan: Mapping[str, LayerPlan], metric: str = "macs") -> list[int]:
    """Per layer, the index in the searcher's ``choices`` whose cost (``metric``) is closest to the
    layer's cost under ``plan`` (in log ratio; ties: the earlier choice): how the cross-entropy step
    counts a plan that was not drawn from the choices."""
    idx = 0 if metric == "params" else 1
    out = []
    for ls in searcher.space.layers:
        want = max(ls.cost(plan.get(ls.info.name, LayerPlan("dense")))[idx], 1)
        gaps = [abs(math.log(max(ls.cost(ls.choice(f, s))[idx], 1) / want)) for f, s in searcher.choices]
        out.append(int(np.argmin(gaps)))
    return out


def search_tpe(searcher, target, metric, n, seed):
    """Optuna's TPE over the same per-layer choices, projection, proxy and number of evaluations."""
    hist: list[dict] = []
    known: dict[tuple, float] = {}

    def objective(ks: list[int]) -> tuple[float, bool] | None:
        plan, ok = choice_plan(searcher, ks, target, metric)
        if not ok:
            return None
        key = plan_key(plan)
        if key in known:
            return known[key], False
        idx = len(hist)
        score = searcher.evaluate(
            plan,
            "candidate",
            {"method": "tpe", "target": float(target), "index": idx, "round": 0},
            {"choices_drawn": list(ks)},
        )
        known[key] = score
        hist.append({"index": idx, "round": 0, "score": score, "plan": plan, "choices_drawn": list(ks)})
        if len(hist) % 10 == 0 or len(hist) == n:
            searcher.progress(f"tpe x{target:g}: {len(hist)}/{n} evaluated, best {max(known.values()):.5g}")
        return score, True

    trials = tpe_search(
        [len(searcher.choices)] * len(searcher.space.layers), objective, n, seed, n_startup=searcher.config.tpe_startup
    )
    return hist, {"seed": seed, "trials": len(trials)}


SEARCHES: dict[str, Callable[..., tuple[list[dict], dict]]] = {
    "random": search_random,
    "policy": search_policy,
    "tpe": search_tpe,
    "policy_seeded": search_policy_seeded,
    "guided": search_guided,
}
"""Each searching method (:data:`common.search.options.SEARCHING`) by name:
``search(searcher, target, metric, n, seed) -> (scored candidates, params)``."""


def seed_of(rng: np.random.Generator) -> int:
    """A compact id of the generator's state (recorded with candidates for traceability)."""
    return int(rng.bit_generator.state["state"]["state"] % (2**31))

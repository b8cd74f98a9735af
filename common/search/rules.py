"""The rule-based rank selections: one global knob of a rank rule, bisected onto the budget.

* ``uniform``: one level ``f`` for every layer (each rank the same fraction of its full value);
* ``energy``: one singular-value energy threshold ``e`` for every unfolding (the HT-2 paper's rule);
* ``vbmf``: every layer's EVBMF ranks (Kim et al. 2016) scaled by one factor ``β``.

Each returns ``(plan, params)``, ``params`` naming the knob's value. A layer whose ranks come out full,
or whose factorized form would cost at least its dense conv, stays dense. Rank rounding can leave the
plan off the budget's tolerance: :func:`common.search.methods.rule_plan` then finishes it layer by layer
(:func:`common.search.space.repair_plan`).
"""

from __future__ import annotations

from collections.abc import Callable

from common.decompose.ranks import energy_ranks, evbmf_ranks, full_ranks, ranks_from_level, rounded_ranks
from common.decompose.surgery import LayerPlan, SpectraCache
from common.search.space import LayerSpace, SearchSpace, bisect

RULES = ("uniform", "energy", "vbmf")


def explicit_plan(
    space: SearchSpace, ranks_of: Callable[[LayerSpace, float], tuple[int, ...]], x: float
) -> dict[str, LayerPlan]:
    """The plan of ``ranks_of(layer, x)`` for every layer (dense where that does not pay)."""
    plan = {}
    for ls in space.layers:
        ranks = ranks_of(ls, x)
        lp = LayerPlan(ls.method, ranks)
        plan[ls.info.name] = (
            LayerPlan("dense")
            if ranks == full_ranks(ls.method, ls.info.group_shape) or ls.cost(lp)[1] >= ls.info.macs
            else lp
        )
    return plan


def uniform_plan(space: SearchSpace, target: float, metric: str) -> tuple[dict[str, LayerPlan], dict]:
    """One fraction of every full rank."""

    def plan_at(f):
        return explicit_plan(
            space, lambda ls, v: ranks_from_level(ls.method, ls.info.group_shape, min(v, 1.0), ls.multiple), f
        )

    f, _ = bisect(lambda v: space.factor(plan_at(v), metric), 1e-3, 1.0, target)
    return plan_at(f), {"level": f}


def energy_plan(
    space: SearchSpace, spectra: SpectraCache, target: float, metric: str
) -> tuple[dict[str, LayerPlan], dict]:
    """One energy threshold ``e`` for every unfolding."""

    def ranks_of(ls: LayerSpace, e: float):
        return energy_ranks(spectra.get(ls.info.name), ls.method, e, ls.multiple)

    # Energy kept grows with e, so cost grows: bisect e in (0, 1] on a logit-like scale 1 - e.
    def plan_at(one_minus_e):
        return explicit_plan(space, ranks_of, 1.0 - one_minus_e)

    x, _ = bisect(lambda v: space.factor(plan_at(v), metric), 1e-7, 0.999, target)
    return plan_at(x), {"energy": 1.0 - x}


def evbmf_base(space: SearchSpace, spectra: SpectraCache) -> tuple[dict[str, tuple[int, ...]], dict[str, list[str]]]:
    """Every layer's EVBMF ranks (:func:`common.decompose.ranks.evbmf_ranks`), and the layers where EVBMF found
    rank 0 (rank 1 used instead): ``{layer: [matrix, ...]}``."""
    base, rank0 = {}, {}
    for ls in space.layers:
        base[ls.info.name], zero = evbmf_ranks(spectra.get(ls.info.name), ls.method)
        if zero:
            rank0[ls.info.name] = list(zero)
    return base, rank0


def vbmf_plan(
    space: SearchSpace,
    base: dict[str, tuple[int, ...]],
    rank0: dict[str, list[str]],
    target: float,
    metric: str,
) -> tuple[dict[str, LayerPlan], dict]:
    """Every EVBMF rank of ``base`` (:func:`evbmf_base`) scaled by one ``β``, rounded up.

    The layers of ``rank0`` are kept in the params (``evbmf_rank0``; :func:`rank0_note` words them as
    the one line a caller reports per plan).
    """

    def ranks_of(ls: LayerSpace, beta: float):
        b = base[ls.info.name]
        return rounded_ranks(ls.method, ls.info.group_shape, lambda name, full, done: beta * b[len(done)], ls.multiple)

    beta, _ = bisect(lambda v: space.factor(explicit_plan(space, ranks_of, v), metric), 1e-3, 1e3, target)
    return explicit_plan(space, ranks_of, beta), {"beta": beta, "vbmf_ranks": base, "evbmf_rank0": rank0}


def rank0_note(target: float, rank0: dict[str, list[str]]) -> str | None:
    """The one line naming the layers where EVBMF found rank 0 (and rank 1 is used), or None if none."""
    if not rank0:
        return None
    return f"vbmf x{target:g}: EVBMF found rank 0 in {len(rank0)} layer(s), using rank 1 there: {', '.join(rank0)}"

"""The per-layer search space of the rank search and the budget arithmetic over it.

A per-layer choice is a *level* ``f`` in (0, 1] and a *shape*. The level sets the layer's budget; the
shape says how that budget is split between its ranks:

* ``"level"``: every rank is the same fraction ``f`` of its full value
  (:func:`common.decompose.ranks.ranks_from_level`, rounded to hardware-friendly multiples);
* ``"energy"``: the ranks of one singular-value energy threshold for that layer (R1, R3 and R13 each
  from its own spectrum), the threshold chosen so the layer costs what the ``"level"`` ranks cost
  (:func:`energy_shaper`; installed by :class:`common.search.searcher.Searcher`, which owns the spectra).

``f = 1`` always means dense, and so does any choice whose factorized form would cost at least as much
as the dense conv. Every method's plan is moved onto the same budget by :func:`project` (one common
scale of all levels, then :func:`repair_plan` for what rank rounding leaves over).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from common.decompose.ranks import energy_ranks, full_ranks, ranks_from_level
from common.decompose.surgery import LayerInfo, LayerPlan, SpectraCache

SHAPES = ("level", "energy")

Shaper = Callable[["LayerSpace", float], tuple[int, ...]]


@dataclass
class LayerSpace:
    """One compressible layer: its info, decomposition method, rank rounding and rank shapes."""

    info: LayerInfo
    method: str
    multiple: int = 8
    shapers: dict[str, Shaper] = field(default_factory=dict, repr=False)

    def ranks(self, f: float, shape: str = "level") -> tuple[int, ...]:
        """Ranks at level ``f`` in ``shape`` (see the module docstring)."""
        f = min(max(f, 1e-6), 1.0)
        if shape == "level":
            return ranks_from_level(self.method, self.info.group_shape, f, self.multiple)
        if shape not in self.shapers:
            raise ValueError(
                f"layer {self.info.name!r}: rank shape {shape!r} is not available "
                f"(have {', '.join(map(repr, ['level', *self.shapers]))})"
            )
        return self.shapers[shape](self, f)

    def choice(self, f: float, shape: str = "level") -> LayerPlan:
        """The layer plan for level ``f`` (dense when f ≥ 1 or when factorizing would not pay)."""
        if f >= 1.0:
            return LayerPlan("dense")
        ranks = self.ranks(f, shape)
        if self.info.cost(self.method, ranks)[1] >= self.info.macs:
            return LayerPlan("dense")
        return LayerPlan(self.method, ranks)

    def cost(self, lp: LayerPlan) -> tuple[int, int]:
        return self.info.cost(lp.method, lp.ranks)


class SearchSpace:
    """The compressible layers of a model and the budget arithmetic over them.

    Args:
        layers: all conv layers (from :func:`common.decompose.surgery.list_conv_layers`); non-eligible ones
            count as fixed cost.
        decomposition: ``"ht2"`` or ``"tucker2"`` for k×k kernels (1×1 kernels use ``"svd"``).
        include_1x1: also compress 1×1 convs (with SVD).
        min_channels: skip layers with fewer input channels (e.g. the RGB stem, where no rank helps).
        multiple: rank rounding multiple.
    """

    def __init__(
        self,
        layers: Sequence[LayerInfo],
        decomposition: str = "ht2",
        include_1x1: bool = True,
        min_channels: int = 4,
        multiple: int = 8,
    ):
        if decomposition not in ("ht2", "tucker2"):
            raise ValueError(f"decomposition must be 'ht2' or 'tucker2', got {decomposition!r}")
        self.decomposition, self.multiple = decomposition, multiple
        self.all_layers = list(layers)
        self.layers: list[LayerSpace] = []
        for info in layers:
            if not info.eligible or info.weight_shape[1] < min_channels:
                continue
            is_1x1 = info.kernel_size == (1, 1)
            if is_1x1 and not include_1x1:
                continue
            self.layers.append(LayerSpace(info, "svd" if is_1x1 else decomposition, multiple))
        if not self.layers:
            raise ValueError("no compressible conv layers in the model")
        self.names = [ls.info.name for ls in self.layers]
        self.dense_params = sum(i.params for i in layers)
        self.dense_macs = sum(i.macs for i in layers)
        names = set(self.names)
        self.fixed_params = sum(i.params for i in layers if i.name not in names)
        self.fixed_macs = sum(i.macs for i in layers if i.name not in names)

    def plan(self, levels: Mapping[str, float], shapes: Mapping[str, str] | None = None) -> dict[str, LayerPlan]:
        shapes = shapes or {}
        return {ls.info.name: ls.choice(levels[ls.info.name], shapes.get(ls.info.name, "level")) for ls in self.layers}

    def cost(self, plan: Mapping[str, LayerPlan]) -> tuple[int, int]:
        """Total conv (params, MACs) of the whole model under ``plan``."""
        p, m = self.fixed_params, self.fixed_macs
        for ls in self.layers:
            cp, cm = ls.cost(plan.get(ls.info.name, LayerPlan("dense")))
            p, m = p + cp, m + cm
        return p, m

    def factors(self, plan: Mapping[str, LayerPlan]) -> dict:
        """Reduction factors of total conv MACs and params under ``plan``."""
        p, m = self.cost(plan)
        return {"macs_factor": self.dense_macs / m, "params_factor": self.dense_params / p}

    def factor(self, plan: Mapping[str, LayerPlan], metric: str) -> float:
        return self.factors(plan)[f"{metric}_factor"]

    def max_factor(self, metric: str) -> float:
        """The largest reduction of total conv ``metric`` any plan reaches: every compressible layer at
        rank 1 (dense where even that would not pay), the fixed layers as they are."""
        smallest = {}
        for ls in self.layers:
            lp = LayerPlan(ls.method, ranks_from_level(ls.method, ls.info.group_shape, 1e-9, 1))
            smallest[ls.info.name] = lp if ls.cost(lp)[1] < ls.info.macs else LayerPlan("dense")
        return self.factor(smallest, metric)


def check_reachable(space: SearchSpace, target: float, metric: str, tol: float) -> float:
    """``target`` if some plan of ``space`` reaches it within ``tol``; else ``ValueError`` with the
    reachable range (:meth:`SearchSpace.max_factor`)."""
    most = space.max_factor(metric)
    if target > most * (1 + tol):
        raise ValueError(
            f"target {target:g}x is out of reach: with every compressible conv at rank 1 the model's total conv "
            f"{metric} shrink only {most:.4g}x ({space.decomposition}), so reachable targets are above 1 and at "
            f"most {most * (1 + tol):.4g}x (±{tol:.0%} tolerance)"
        )
    return target


def plan_key(plan: Mapping[str, LayerPlan]) -> tuple:
    """A hashable identity of a plan (to tell duplicates apart)."""
    return tuple(sorted((n, lp.method, lp.ranks) for n, lp in plan.items()))


def bisect(
    fn: Callable[[float], float],
    lo: float,
    hi: float,
    target: float,
    iters: int = 40,
    log: bool = True,
    close: float = 0.004,
) -> tuple[float, float]:
    """Find x in [lo, hi] with fn(x) closest to ``target`` for a monotone (either way) fn.

    Returns (x, fn(x)). Rank rounding makes fn stepwise, so the best seen point is kept.
    """
    tr = math.log if log else (lambda v: v)
    inv = math.exp if log else (lambda v: v)
    a, b = tr(lo), tr(hi)
    fa, fb = fn(inv(a)), fn(inv(b))
    increasing = fb >= fa
    best = min(((abs(math.log(fa / target)), inv(a), fa), (abs(math.log(fb / target)), inv(b), fb)))
    for _ in range(iters):
        mid = 0.5 * (a + b)
        fm = fn(inv(mid))
        best = min(best, (abs(math.log(fm / target)), inv(mid), fm))
        if best[0] < close:  # well inside any tolerance: more steps only cost evaluations
            break
        if (fm < target) == increasing:
            a = mid
        else:
            b = mid
    return best[1], best[2]


def energy_shaper(spectra: SpectraCache) -> Shaper:
    """The ``"energy"`` shape: a layer's energy-threshold ranks (:func:`common.decompose.ranks.energy_ranks`)
    whose MACs match those of its level-``f`` ranks, the threshold found by bisection."""
    cache: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}

    def shaped(ls: LayerSpace, f: float) -> tuple[int, ...]:
        # Keyed by the level ranks, not by f: projection asks for arbitrary f, but rank rounding
        # makes the level ranks (hence the cost to match) a step function with few steps.
        level_ranks = ranks_from_level(ls.method, ls.info.group_shape, f, ls.multiple)
        key = (ls.info.name, level_ranks)
        if key not in cache:
            sp = spectra.get(ls.info.name)

            def macs(one_minus_e: float) -> float:
                return float(ls.info.cost(ls.method, energy_ranks(sp, ls.method, 1.0 - one_minus_e, ls.multiple))[1])

            x, _ = bisect(macs, 1e-7, 0.999, float(ls.info.cost(ls.method, level_ranks)[1]), iters=30, close=0.01)
            cache[key] = energy_ranks(sp, ls.method, 1.0 - x, ls.multiple)
        return cache[key]

    return shaped


def project(
    space: SearchSpace,
    levels: Mapping[str, float],
    target: float,
    metric: str = "macs",
    tol: float = 0.03,
    shapes: Mapping[str, str] | None = None,
) -> tuple[dict[str, LayerPlan], float]:
    """The plan of ``levels`` (and ``shapes``) moved onto ``target``× reduction of total conv ``metric``.

    All levels are scaled by one factor α (``f ← min(1, α f)``), which keeps the plan's shape (which
    layers are compressed more than others); if rank rounding leaves the result outside ``tol``,
    :func:`repair_plan` finishes layer by layer.

    Returns:
        (plan, achieved factor).
    """
    base = {n: float(levels[n]) for n in space.names}

    def plan_at(alpha: float) -> dict[str, LayerPlan]:
        return space.plan({n: min(1.0, alpha * f) for n, f in base.items()}, shapes)

    alpha, _ = bisect(lambda a: space.factor(plan_at(a), metric), 1e-3, 1e3, target)
    plan = plan_at(alpha)
    if abs(space.factor(plan, metric) / target - 1) > tol:
        plan, _ = repair_plan(space, plan, target, metric, tol)
    return plan, space.factor(plan, metric)


def _rank_moves(ls: LayerSpace, lp: LayerPlan, up: bool, step: int) -> list[LayerPlan]:
    """Plans one step dearer (``up``) or cheaper for one layer: each rank moved alone by ``step``."""
    if lp.method == "dense":
        if up:
            return []
        for f in np.arange(0.95, 0.0, -0.05):  # the dearest factorized form still cheaper than dense
            c = ls.choice(float(f))
            if c.method != "dense":
                return [c]
        return []
    full = full_ranks(ls.method, ls.info.group_shape)
    _, _, kh, kw = ls.info.group_shape
    out = []
    for i in range(len(lp.ranks)):
        new = list(lp.ranks)
        new[i] += step if up else -step
        if ls.method == "ht2":
            new[2] = min(new[2], new[0] * kh, new[1] * kw)
        new = [int(min(max(v, 1), fr)) for v, fr in zip(new, full)]
        if tuple(new) == lp.ranks:
            continue
        cand = LayerPlan(ls.method, tuple(new))
        if up and (tuple(new) == full or ls.cost(cand)[1] >= ls.info.macs):
            cand = LayerPlan("dense")
        out.append(cand)
    return out


def repair_plan(
    space: SearchSpace,
    plan: Mapping[str, LayerPlan],
    target: float,
    metric: str = "macs",
    tol: float = 0.03,
    max_steps: int = 400,
) -> tuple[dict[str, LayerPlan], int]:
    """Move single ranks of single layers until the plan is within ``tol`` of the target factor.

    The one budget repair of the package. Each step takes the move that brings the achieved factor
    closest to the target, first in steps of the rounding multiple, then (if that cannot reach the
    tolerance) in steps of 1.

    Returns:
        (plan, number of steps).
    """
    plan = {n: plan.get(n, LayerPlan("dense")) for n in space.names}
    lookup = {ls.info.name: ls for ls in space.layers}
    steps = 0
    for unit in sorted({max(space.multiple, 1), 1}, reverse=True):
        seen = set()
        while steps < max_steps:
            achieved = space.factor(plan, metric)
            if abs(achieved / target - 1) <= tol:
                return plan, steps
            key = plan_key(plan)
            if key in seen:  # oscillating at this step size: go finer
                break
            seen.add(key)
            up = achieved > target  # too compressed: make something dearer
            best = None
            for n, lp in plan.items():
                for cand in _rank_moves(lookup[n], lp, up, unit):
                    gap = abs(math.log(space.factor({**plan, n: cand}, metric) / target))
                    if best is None or gap < best[0]:
                        best = (gap, n, cand)
            if best is None:
                break
            plan[best[1]] = best[2]
            steps += 1
    return plan, steps

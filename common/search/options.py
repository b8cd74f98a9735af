"""What a rank-selection search is asked and what it returns: the method and metric names, their
validators, :class:`SearchConfig` (every choice of the searches) and :class:`SearchResult` (a chosen plan).

The methods (:data:`METHODS`) are the rule-based ones (uniform, energy, VBMF: :mod:`common.search.rules`)
and the searching ones (:data:`SEARCHING`: random, policy, TPE, policy_seeded: :mod:`common.search.methods`);
:class:`common.search.searcher.Searcher` runs them. The budget :data:`METRICS` is total conv MACs or params,
reduced ``target`` times within ``tol`` (:func:`check_budget_tol`).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from common.decompose.surgery import plan_to_dict
from common.search.rules import RULES
from common.search.space import SHAPES

SEARCHING = ("random", "policy", "tpe", "policy_seeded", "guided")
METHODS = RULES + SEARCHING  # uniform, energy, vbmf, random, policy, tpe, policy_seeded, guided
POLICIES = ("policy", "policy_seeded", "guided")
"""The sensitivity-guided searches (all need the sensitivity profile)."""
DEFAULT_METHOD = "guided"
"""What a user gets without choosing: the policy seeded with the rule plans, then refined
(:func:`common.search.methods.search_guided`). ``policy`` (unseeded, unrefined) and ``policy_seeded``
(seeded, unrefined) stay as its ablations."""
METRICS = ("macs", "params")


__all__ = [
    "DEFAULT_METHOD",
    "METHODS",
    "METRICS",
    "POLICIES",
    "SEARCHING",
    "SearchConfig",
    "SearchResult",
    "check_budget_tol",
    "check_method",
    "check_metric",
    "check_target",
]


def check_method(name: str) -> str:
    """``name`` if it is a rank-selection method (:data:`METHODS`); else ``ValueError`` naming it."""
    if name not in METHODS:
        raise ValueError(f"unknown rank-selection method {name!r}; expected one of {METHODS}")
    return name


def check_metric(name: str) -> str:
    """``name`` if it is a budget metric (:data:`METRICS`); else ``ValueError`` naming it."""
    if name not in METRICS:
        raise ValueError(f"metric must be 'macs' or 'params', got {name!r}")
    return name


def check_target(value) -> float:
    """``value`` as a float if it is a finite reduction factor > 1 (dense / compressed); else
    ``ValueError`` naming it."""
    try:
        target = float(value)
    except (TypeError, ValueError):
        target = math.nan
    if isinstance(value, bool) or not (math.isfinite(target) and target > 1.0):
        raise ValueError(f"target reduction must be a finite number > 1, got {value!r}")
    return target


def check_budget_tol(value: float, name: str = "tol") -> float:
    """``value`` if it is a budget band: a relative distance to the target in (0, 0.5); else
    ``ValueError`` naming it as ``name`` (the field or flag the caller was given). The one place
    the bound lives: :class:`SearchConfig` and the experiment's ``budget_tol`` both call it."""
    if isinstance(value, bool) or not 0 < value < 0.5:
        raise ValueError(f"{name} must be in (0, 0.5), a relative distance to the target, got {value!r}")
    return value


@dataclass
class SearchResult:
    """A chosen plan. ``score`` is its proxy score; ``val_top1`` its val top-1 where that was measured
    (re-ranking, or the ``top1`` proxy), else ``None``."""

    method: str
    target: float
    metric: str
    plan: dict
    score: float
    val_top1: float | None
    proxy: str
    macs_factor: float
    params_factor: float
    evaluations: int
    seconds: float
    seed: int
    params: dict = field(default_factory=dict)
    history: list = field(default_factory=list)

    @property
    def achieved_factor(self) -> float:
        return self.macs_factor if self.metric == "macs" else self.params_factor

    def record(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("plan", "history")}
        d["plan"] = plan_to_dict(self.plan)
        d["achieved_factor"] = self.achieved_factor
        return d


@dataclass
class SearchConfig:
    """Every choice of the searches, with defaults; written into each record.

    levels: the per-layer level grid (1.0 = dense) that random, TPE and policy draw from.
    shapes: rank shapes a layer may take (:mod:`common.search.space`): ``("level",)`` ties R1, R3 and R13 to
        one fraction of their full values; adding ``"energy"`` lets the search also split a layer's
        budget by its spectra, per layer.
    sensitivity_levels: levels at which each layer's sensitivity curve is measured (per shape).
    temperature: softness of the policy pdf, in units of the median sensitivity drop.
    rounds: policy sampling rounds (>1 re-fits the pdf on the elite plans between rounds: CEM).
    elite_frac / smoothing: CEM elite fraction and the weight of the new fit.
    rerank: how many of a search's best-scored candidates val top-1 decides among (label-free
        proxies only; 1 = take the best score).
    tpe_startup: random draws before TPE starts modelling.
    knapsack: the policies also score their additive model's optimum
        (:func:`common.search.methods.model_optimum`: the least summed sensitivity drop on the budget) in
        their first round: first for the policy, after the rule plans for ``policy_seeded``; it counts in
        the budget.
    rescore: before the pick, a search's this many best-scored candidates are scored again with the same
        proxy on ``rescore_images`` calibration images (same seed), and the pick (val among the
        ``rerank`` best, or the best) goes by that score; 0 = off. The search's own score is unchanged
        (it ranks and refits on the cheap score); the re-scores are extra evaluations, not candidates.
    rescore_images: calibration images of the re-scores.
    refine: the share of a ``guided`` search's candidate budget spent refining its best candidate
        (:mod:`common.search.refine`); the rest goes to the seeded policy's rounds. 0 = ``policy_seeded``.
    refine_batch: refinement proposals drawn from one incumbent before they are evaluated (together).
    """

    levels: tuple = (1.0, 0.75, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)
    shapes: tuple = ("level",)
    sensitivity_levels: tuple = (0.5, 0.3, 0.15)
    temperature: float = 1.0
    rounds: int = 2
    elite_frac: float = 0.2
    smoothing: float = 0.7
    tol: float = 0.03
    rerank: int = 3
    tpe_startup: int = 10
    knapsack: bool = False
    rescore: int = 0
    rescore_images: int = 1024
    refine: float = 0.3
    refine_batch: int = 5

    def __post_init__(self) -> None:
        self.levels, self.shapes = tuple(self.levels), tuple(self.shapes)
        self.sensitivity_levels = tuple(self.sensitivity_levels)
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {self.shapes!r}")
        if self.rerank < 1:
            raise ValueError(f"rerank must be >= 1, got {self.rerank}")
        check_budget_tol(self.tol, "budget tolerance (tol)")
        if self.rescore and self.rescore < max(2, self.rerank):
            raise ValueError(
                f"rescore must be 0 (off) or at least 2 and at least rerank ({self.rerank}), got {self.rescore}"
            )
        if self.rescore_images < 2:
            raise ValueError(f"rescore_images must be at least 2, got {self.rescore_images}")
        if isinstance(self.refine, bool) or not (0.0 <= self.refine < 1.0):
            raise ValueError(f"refine must be a share of the search budget in [0, 1), got {self.refine!r}")
        if self.refine_batch < 1:
            raise ValueError(f"refine_batch must be at least 1, got {self.refine_batch}")

    def choices(self) -> list[tuple[float, str]]:
        """The per-layer (level, shape) options; dense (level 1) once."""
        return [(float(f), s) for f in self.levels for s in self.shapes if f < 1.0 or s == self.shapes[0]]

"""Rank selection at a fixed budget: uniform, energy, VBMF, random, TPE and the sensitivity-guided policy.

Every method returns a plan whose total conv cost (MACs by default, or params) is ``target`` times
smaller than the dense model's, within ``tol`` (±3 % by default), so methods are compared at equal
cost (:func:`common.search.space.project`). Candidates are scored by a *proxy* (:mod:`common.search.proxy`; by
default minus the label-free centered-logit MSE to the dense model on BN-calibration train images); the
searching methods (random, TPE, policy, policy_seeded) then let top-1 on a fixed val subset decide among their
``rerank`` best candidates. Only ``val`` is ever used for selection.

The per-layer choices are the pairs (level, shape) of :mod:`common.search.space`: ``SearchConfig.levels`` ×
``SearchConfig.shapes``. The policy samples them from a per-layer distribution built from each layer's
sensitivity (the proxy's loss when only that layer is compressed) and its cost, refined by
cross-entropy steps (:mod:`common.search.policy`); ``policy_seeded`` is the same search with the rule-based
plans (uniform, energy, VBMF) among its first round's candidates, counted in its budget, so the
selection sees them too and the elite that the cross-entropy step fits may include them; random draws
the choices uniformly; TPE (:mod:`common.search.tpe`, Optuna) models them. With ``SearchConfig.knapsack`` both
policies also put their additive model's optimum (the least summed sensitivity drop on the budget) among
their first candidates. A search returns its scored candidates and :meth:`Searcher.run` picks once among
them (with ``SearchConfig.rescore``, after scoring its best few again on more calibration images, so that
val sees the best by a less noisy score); the rule-based methods (uniform, energy, VBMF:
:mod:`common.search.rules`) bisect one global knob.

Resumability: every sensitivity point, candidate and re-ranking goes through a *recorder*
(:mod:`common.search.recorder`: a :class:`common.run.logs.RunLog` or a :class:`MemoryRecorder`) the moment it is
evaluated; re-running with the same recorder skips what is recorded and reproduces the same result,
because the draws of a round are made before anything in it is evaluated (random, policy) or depend
only on recorded scores (TPE).
"""

from __future__ import annotations

import contextlib
import math
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import numpy as np
from torch import nn

from common.decompose.surgery import LayerPlan, SpectraCache, list_conv_layers, plan_to_dict
from common.dist import shard_map
from common.progress import progress_bar
from common.search.policy import (
    Profile,
    cem_refit,
    choice_costs,
    choice_drops,
    knapsack_choices,
    policy_pdf,
    sensitivity_profile,
)
from common.search.proxy import ProxyEvaluator
from common.search.recorder import MemoryRecorder, Recorder
from common.search.rules import RULES, energy_plan, evbmf_base, rank0_note, uniform_plan, vbmf_plan
from common.search.space import SHAPES, SearchSpace, check_reachable, energy_shaper, plan_key, project, repair_plan
from common.search.tpe import tpe_search

SEARCHING = ("random", "policy", "tpe", "policy_seeded")
METHODS = RULES + SEARCHING  # uniform, energy, vbmf, random, policy, tpe, policy_seeded
POLICIES = ("policy", "policy_seeded")
"""The sensitivity-guided searches (both need the sensitivity profile)."""
METRICS = ("macs", "params")

__all__ = [
    "METHODS",
    "METRICS",
    "POLICIES",
    "SEARCHING",
    "ProxyEvaluator",
    "SearchConfig",
    "SearchResult",
    "SearchSpace",
    "Searcher",
    "build_searcher",
    "check_budget_tol",
    "check_method",
    "check_metric",
    "check_reachable",
    "check_target",
    "project",
    "repair_plan",
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
    knapsack: the policies also score their additive model's optimum (:meth:`Searcher.model_optimum`: the
        least summed sensitivity drop on the budget) in their first round: first for the policy, after the
        rule plans for ``policy_seeded``; it counts in the budget.
    rescore: before the pick, a search's this many best-scored candidates are scored again with the same
        proxy on ``rescore_images`` calibration images (same seed), and the pick (val among the
        ``rerank`` best, or the best) goes by that score; 0 = off. The search's own score is unchanged
        (it ranks and refits on the cheap score); the re-scores are extra evaluations, not candidates.
    rescore_images: calibration images of the re-scores.
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

    def choices(self) -> list[tuple[float, str]]:
        """The per-layer (level, shape) options; dense (level 1) once."""
        return [(float(f), s) for f in self.levels for s in self.shapes if f < 1.0 or s == self.shapes[0]]


class Searcher:
    """Runs the rank-selection methods on one model at one budget.

    Args:
        space: the :class:`common.search.space.SearchSpace`.
        evaluator: a :class:`common.search.proxy.ProxyEvaluator` (or anything with its ``proxy`` name,
            ``score(plan)`` and ``val_top1(plan)``).
        spectra: kernel spectra of the dense model (energy, VBMF and the energy shape read them).
        recorder: where sensitivity points and candidates are written and looked up (resume).
        config: :class:`SearchConfig`.
        progress: gets the searches' progress lines (rounds, best so far, the re-ranking).
        tag: merged into every record key (e.g. the decomposition and the seed).
        bars: show a progress bar (with ETA) over the evaluations of the sensitivity profile and of
            each search.
        rescorer: the evaluator of ``config.rescore``'s re-scores (same proxy, more calibration images);
            required when ``config.rescore`` is set.
    """

    def __init__(
        self,
        space: SearchSpace,
        evaluator: ProxyEvaluator,
        spectra: SpectraCache,
        recorder: Recorder | None = None,
        config: SearchConfig | None = None,
        progress: Callable[[str], None] | None = None,
        tag: Mapping | None = None,
        bars: bool = False,
        rescorer: ProxyEvaluator | None = None,
    ):
        self.space, self.evaluator, self.spectra = space, evaluator, spectra
        self.rescorer = rescorer
        self.bars = bars
        self._bar = progress_bar(None, None)
        self.tag = dict(tag or {})
        self.recorder = recorder if recorder is not None else MemoryRecorder()
        self.config = config or SearchConfig()
        self.progress = progress or (lambda msg: None)
        self.proxy = evaluator.proxy
        if self.config.rescore and (rescorer is None or self.proxy == "top1" or rescorer.proxy != self.proxy):
            raise ValueError(
                f"rescore={self.config.rescore} needs a label-free proxy and a rescorer with the same proxy "
                f"(proxy {self.proxy!r}, rescorer {getattr(rescorer, 'proxy', None)!r}); build_searcher makes one"
            )
        self.choices = self.config.choices()
        self._sensitivity: dict | None = None
        self._dense_score: float | None = None
        self._vbmf_base: tuple[dict, dict] | None = None
        energy = energy_shaper(spectra)
        for ls in self.space.layers:
            ls.shapers["energy"] = energy

    # -- bookkeeping ------------------------------------------------------------------------- #
    def _evaluate(self, plan: Mapping[str, LayerPlan], kind: str, key: dict, extra: dict | None = None) -> float:
        """The score of ``plan`` (val top-1 for ``rerank`` records), from the recorder if this ``key``
        was already evaluated."""
        return self._evaluate_many([(plan, kind, key, extra)])[0]

    def _evaluate_many(
        self,
        items: Sequence[tuple[Mapping[str, LayerPlan], str, dict, dict | None]],
        on_done: Callable[[int, float], None] | None = None,
    ) -> list[float]:
        """:meth:`_evaluate` of each ``(plan, kind, key, extra)``; what the recorder lacks is scored
        over the ranks of a ``torchrun`` launch (:func:`common.dist.shard_map`) and recorded in index
        order. ``on_done(i, value)`` follows each item, in index order."""
        out: list[float | None] = [None] * len(items)
        todo = []
        for i, (plan, kind, key, _) in enumerate(items):
            out[i] = self._recorded(plan, kind, {**self.tag, **key})
            if out[i] is None:
                todo.append(i)

        def record(j: int, value: float) -> None:
            i = todo[j]
            plan, kind, key, extra = items[i]
            self._record(plan, kind, {**self.tag, **key}, extra, value)
            out[i] = value

        done = 0

        def advance() -> None:  # report, in index order, every item up to the first still unscored one
            nonlocal done
            while done < len(items) and out[done] is not None:
                self._bar.update()
                if on_done is not None:
                    on_done(done, out[done])
                done += 1

        def record_and_report(j: int, value: float) -> None:
            record(j, value)
            advance()

        advance()
        shard_map(lambda i: self._score(items[i][0], items[i][1]), todo, record_and_report)
        return [float(v) for v in out]

    def _recorded(self, plan: Mapping[str, LayerPlan], kind: str, key: dict) -> float | None:
        """The recorded value of ``key`` (``None`` when not recorded yet)."""
        hit = self.recorder.find(kind, **key)
        if hit is None:
            return None
        if hit.get("plan") not in (None, plan_to_dict(plan)):
            raise RuntimeError(
                f"resumed {kind} record {key} has a different plan than this run draws: "
                "the log belongs to a run with other settings; use a new run id"
            )
        return float(hit["val_top1" if kind == "rerank" else "score"])

    def _score(self, plan: Mapping[str, LayerPlan], kind: str) -> float:
        if kind == "rescore":
            return float(self.rescorer.score(plan))
        return float(self.evaluator.val_top1(plan) if kind == "rerank" else self.evaluator.score(plan))

    def _record(self, plan: Mapping[str, LayerPlan], kind: str, key: dict, extra: dict | None, value: float) -> None:
        f = self.space.factors(plan)
        if kind == "rerank":
            self.recorder.write(
                kind, f"{key} val_top1={value:.4f}", **key, val_top1=value, plan=plan_to_dict(plan), **f
            )
            return
        self.recorder.write(
            kind,
            f"{key} {self.proxy}={value:.5g} x{f['macs_factor']:.2f} MACs",
            **key,
            score=value,
            proxy=self.proxy,
            plan=plan_to_dict(plan),
            **f,
            **(extra or {}),
        )

    @property
    def profiled(self) -> bool:
        """Whether the sensitivity profile is computed (or read back) already."""
        return self._sensitivity is not None

    def dense_score(self) -> float:
        """Proxy score of the uncompressed model (same recalibration as every candidate)."""
        if self._dense_score is None:
            self._dense_score = self._evaluate({}, "sensitivity", {"layer": "<dense>", "level": 1.0})
        return self._dense_score

    @contextlib.contextmanager
    def _bar_over(self, total: int, desc: str) -> Iterator[None]:
        """A progress bar (when :attr:`bars`) counting the evaluations made inside the block."""
        self._bar = progress_bar(total, desc if self.bars else None, "plan")
        try:
            yield
        finally:
            self._bar.close()
            self._bar = progress_bar(None, None)

    # -- sensitivity and the policy's pdf ----------------------------------------------------- #
    def sensitivity(self) -> Profile:
        """Each layer alone at each sensitivity level and shape: ``{name: {shape: [(f, score), ...]}}``
        (:func:`common.search.policy.sensitivity_profile`, every point recorded)."""
        if self._sensitivity is None:
            cfg = self.config
            n = 1 + len(self.space.layers) * len(cfg.shapes) * len(cfg.sensitivity_levels)
            with self._bar_over(n, f"sensitivity {self._tag_text()}"):
                self.dense_score()
                self._sensitivity = sensitivity_profile(
                    self.space,
                    cfg.shapes,
                    cfg.sensitivity_levels,
                    lambda points, on_done: self._evaluate_many(
                        [(plan, "sensitivity", key, extra) for plan, key, extra in points], on_done
                    ),
                    self.progress,
                )
        return self._sensitivity

    def _tag_text(self) -> str:
        return " ".join(f"{k} {v}" for k, v in self.tag.items())

    def policy_pdf(self, target: float, metric: str) -> tuple[np.ndarray, dict]:
        """Per-layer distribution over :attr:`choices` from the sensitivity profile
        (:func:`common.search.policy.policy_pdf`)."""
        profile, dense = self.sensitivity(), self.dense_score()
        return policy_pdf(self.space, self.choices, profile, dense, target, metric, self.config.temperature)

    # -- methods ------------------------------------------------------------------------------- #
    def run(
        self, method: str, target: float, metric: str = "macs", n_candidates: int = 100, seed: int = 0
    ) -> SearchResult:
        """Run one method at ``target``× reduction of total conv ``metric`` ("macs" or "params")."""
        method, target, metric = check_method(method), check_target(target), check_metric(metric)
        check_reachable(self.space, target, metric, self.config.tol)
        if method in SEARCHING and n_candidates < 1:
            raise ValueError(f"{method}: the search budget must be at least 1 candidate, got {n_candidates}")
        t0 = time.perf_counter()
        if method in SEARCHING:
            search = {
                "random": self._random,
                "policy": self._policy,
                "tpe": self._tpe,
                "policy_seeded": self._policy_seeded,
            }[method]
            rerank = 0 if self.proxy == "top1" or self.config.rerank == 1 else self.config.rerank
            with self._bar_over(
                n_candidates + self.config.rescore + rerank, f"{method} x{target:g} {self._tag_text()}"
            ):
                hist, params = search(target, metric, n_candidates, seed)
                if not hist:
                    raise ValueError(f"{method}: no plan drawn reaches {target}x within ±{self.config.tol:.0%}")
                best, val, rescored = self.pick(method, target, hist)
            plan, score = best["plan"], best["score"]
            if rescored:
                params["rescore"] = rescored
        else:
            (plan, params), hist, val = self._rule(method, target, metric), [], None
            score = self._evaluate(
                plan, "candidate", {"method": method, "target": float(target), "index": 0, "round": 0}
            )
        if self.proxy == "top1":
            val = score
        f = self.space.factors(plan)
        achieved = f[f"{metric}_factor"]
        if abs(achieved / target - 1) > self.config.tol:
            warnings.warn(
                f"{method}: achieved {achieved:.3f}x vs target {target}x (outside ±{self.config.tol:.0%})", stacklevel=2
            )
        return SearchResult(
            method,
            float(target),
            metric,
            plan,
            score,
            val,
            self.proxy,
            f["macs_factor"],
            f["params_factor"],
            max(1, len(hist)),
            time.perf_counter() - t0,
            seed,
            {**params, "config": asdict(self.config), "decomposition": self.space.decomposition},
            _strip(hist),
        )

    def pick(self, method: str, target: float, hist: list[dict]) -> tuple[dict, float | None, dict]:
        """The one choice among a search's scored candidates, its val top-1 (when measured), and the
        re-scores (``{}`` without ``config.rescore``).

        ``hist``: candidates as the searches make them (``index``, ``score``, ``plan``); public so that a
        logged search's candidates can be chosen among again (``studies/matched_macs/matched_macs.py``), re-ranks
        already in the recorder being read back, not measured.

        With ``config.rescore`` the ``rescore`` best-scored candidates are scored again on
        ``rescore_images`` calibration images (recorded as ``rescore`` records) and ranked by that
        instead (ties: the better search score, then the earlier candidate); the re-scores come back as
        ``{"calib_images", "indices", "scores"}`` in the order of the search scores, and the pick's
        ``"picked"``. The best wins when the score is val top-1 already or ``config.rerank`` is 1; else
        val top-1 decides among the ``config.rerank`` best-ranked ones (ties: the better (re-)score, then
        the earlier candidate).
        """
        ranked = sorted(hist, key=lambda h: (-h["score"], h["index"]))
        if self.proxy == "top1":
            return ranked[0], None, {}
        again: dict[int, float] = {}
        if self.config.rescore:
            pool = ranked[: self.config.rescore]
            n = self.rescorer.calib_images
            keys = [{"method": method, "target": float(target), "index": h["index"]} for h in pool]
            values = self._evaluate_many([(h["plan"], "rescore", k, {"calib_images": n}) for h, k in zip(pool, keys)])
            again = {h["index"]: v for h, v in zip(pool, values)}
            ranked = sorted(pool, key=lambda h: (-again[h["index"]], -h["score"], h["index"]))
            self.progress(
                f"{method} x{target:g}: the {len(pool)} best-scored candidates on {n} calibration images: "
                + ", ".join(f"#{h['index']} {again[h['index']]:.5g}" for h in ranked)
            )

        def rescored(best: dict) -> dict:
            if not again:
                return {}
            return {
                "calib_images": self.rescorer.calib_images,
                "indices": list(again),
                "scores": list(again.values()),
                "picked": again[best["index"]],
            }

        if self.config.rerank == 1:
            return ranked[0], None, rescored(ranked[0])
        top = ranked[: self.config.rerank]
        vals = self._evaluate_many(
            [(h["plan"], "rerank", {"method": method, "target": float(target), "index": h["index"]}, None) for h in top]
        )
        k = max(range(len(top)), key=lambda i: (vals[i], again.get(top[i]["index"], top[i]["score"]), -top[i]["index"]))
        self.progress(
            f"{method} x{target:g}: val top-1 of the {len(top)} best-{'re' if again else ''}scored candidates "
            + ", ".join(f"#{h['index']} {v:.4f}" for h, v in zip(top, vals))
        )
        return top[k], vals[k], rescored(top[k])

    def _rule(self, method: str, target: float, metric: str) -> tuple[dict, dict]:
        """The plan of a rule-based method (:mod:`common.search.rules`) on the budget, and its params."""
        if method == "vbmf":
            if self._vbmf_base is None:  # EVBMF ranks once per searcher, for every target
                self._vbmf_base = evbmf_base(self.space, self.spectra)
            plan, params = vbmf_plan(self.space, *self._vbmf_base, target, metric)
            note = rank0_note(target, params["evbmf_rank0"])
            if note is not None:  # one line per plan, not a warning block per layer
                self.progress(note)
        elif method == "energy":
            plan, params = energy_plan(self.space, self.spectra, target, metric)
        else:
            plan, params = uniform_plan(self.space, target, metric)
        if abs(self.space.factor(plan, metric) / target - 1) > self.config.tol:
            # Global knobs (e, β, α) move many layers' rounded ranks at once; finish layer by layer.
            plan, params["repair_steps"] = repair_plan(self.space, plan, target, metric, self.config.tol)
        return plan, params

    def _draw(self, pdf: np.ndarray, rng: np.random.Generator) -> list[int]:
        return [int(rng.choice(len(self.choices), p=p)) for p in pdf]

    def choice_plan(self, ks: Sequence[int], target: float, metric: str) -> tuple[dict, bool]:
        """The projected plan of per-layer choice indices, and whether it is within the budget tolerance."""
        levels = {n: self.choices[k][0] for n, k in zip(self.space.names, ks)}
        shapes = {n: self.choices[k][1] for n, k in zip(self.space.names, ks)}
        plan, achieved = project(self.space, levels, target, metric, self.config.tol, shapes)
        return plan, abs(achieved / target - 1) <= self.config.tol

    def model_optimum(
        self, target: float, metric: str, drops: np.ndarray | None = None
    ) -> tuple[dict, list[int], float, bool]:
        """The plan the policy's additive model rates best: per-layer choices with the least summed drop
        whose summed cost meets the budget (:func:`common.search.policy.knapsack_choices`), projected onto it
        like a draw.

        Args:
            drops: ``(layers, choices)`` drops to use; default: from the sensitivity profile
                (:func:`common.search.policy.choice_drops`), as :meth:`policy_pdf` has them.

        Returns:
            (plan, choice indices, the model's summed drop, whether the plan is within the budget tolerance).

        Raises:
            ValueError: not even the cheapest choices fit the budget.
        """
        if drops is None:
            drops = choice_drops(self.space, self.choices, self.sensitivity(), self.dense_score())
        drops = np.asarray(drops, dtype=float)
        cost, budget = choice_costs(self.space, self.choices, target, metric)
        ks = knapsack_choices(drops, cost, budget)
        plan, ok = self.choice_plan(ks, target, metric)
        return plan, ks, float(sum(drops[li, k] for li, k in enumerate(ks))), ok

    def _sample_round(
        self,
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
            ks = self._draw(pdf, rng)
            plan, ok = self.choice_plan(ks, target, metric)
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
                self.progress(f"{method} x{target:g} round {rnd}: {j + 1}/{len(drawn)} evaluated, best {best:.5g}")

        scores = self._evaluate_many(items, report)
        return [{"index": start + j, "round": rnd, "score": sc, **d} for j, (d, sc) in enumerate(zip(drawn, scores))]

    def _random(self, target, metric, n, seed):
        rng = np.random.default_rng(seed)
        pdf = np.full((len(self.space.layers), len(self.choices)), 1.0 / len(self.choices))
        return self._sample_round("random", target, metric, pdf, n, rng, 0, 0, set()), {"seed": seed}

    def _policy(self, target, metric, n, seed, method="policy", fixed=()):
        rng = np.random.default_rng(seed)
        pdf, info = self.policy_pdf(target, metric)
        extra = {}
        if self.config.knapsack:
            fixed, extra["knapsack"] = self._with_optimum(list(fixed), target, metric, method)
        rounds = max(1, self.config.rounds)
        per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
        hist: list[dict] = []
        seen: set = set()
        for r, count in enumerate(per_round):
            hist += self._sample_round(
                method, target, metric, pdf, count, rng, r, len(hist), seen, fixed if r == 0 else ()
            )
            if r + 1 < rounds and hist:  # cross-entropy step on the elite plans' draws
                pdf = cem_refit(pdf, hist, self.config.elite_frac, self.config.smoothing)
        return hist, {"seed": seed, "pdf": info, **extra}

    def _with_optimum(self, fixed: list[dict], target: float, metric: str, method: str) -> tuple[list[dict], dict]:
        """``fixed`` with the model optimum (:meth:`model_optimum`) after it, unless it is there already or
        misses the budget; and what became of it (its model drop, or why it was left out)."""
        try:
            plan, ks, drop, ok = self.model_optimum(target, metric)
        except ValueError as e:
            self.progress(f"{method} x{target:g}: no model optimum ({e})")
            return fixed, {"used": False, "why": str(e)}
        note = {"model_drop": drop, "choices": ks}
        if not ok:
            why = f"its projection misses {target:g}x by more than ±{self.config.tol:.0%}"
            self.progress(f"{method} x{target:g}: model optimum left out: {why}")
            return fixed, {**note, "used": False, "why": why}
        if plan_key(plan) in {plan_key(d["plan"]) for d in fixed}:
            return fixed, {**note, "used": False, "why": "equal to a seeded plan"}
        return [*fixed, {"plan": plan, "choices_drawn": ks, "seeded_from": "knapsack"}], {**note, "used": True}

    def _policy_seeded(self, target, metric, n, seed):
        """The policy with the rule-based plans (:data:`common.search.rules.RULES`, each once) as its first
        candidates: they are scored like any draw and count in the ``n`` evaluations."""
        fixed, seen = [], set()
        for rule in RULES:
            plan, _ = self._rule(rule, target, metric)
            if plan_key(plan) in seen:
                continue
            seen.add(plan_key(plan))
            fixed.append({"plan": plan, "choices_drawn": self.nearest_choices(plan, metric), "seeded_from": rule})
        hist, params = self._policy(target, metric, n, seed, "policy_seeded", fixed)
        # a first round smaller than the rule plans takes only the first of them
        return hist, {**params, "seeded_from": [h["seeded_from"] for h in hist if h.get("seeded_from") in RULES]}

    def nearest_choices(self, plan: Mapping[str, LayerPlan], metric: str = "macs") -> list[int]:
        """Per layer, the index in :attr:`choices` whose cost (``metric``) is closest to the layer's cost
        under ``plan`` (in log ratio; ties: the earlier choice): how the cross-entropy step counts a
        plan that was not drawn from the choices."""
        idx = 0 if metric == "params" else 1
        out = []
        for ls in self.space.layers:
            want = max(ls.cost(plan.get(ls.info.name, LayerPlan("dense")))[idx], 1)
            gaps = [abs(math.log(max(ls.cost(ls.choice(f, s))[idx], 1) / want)) for f, s in self.choices]
            out.append(int(np.argmin(gaps)))
        return out

    def _tpe(self, target, metric, n, seed):
        """Optuna's TPE over the same per-layer choices, projection, proxy and number of evaluations."""
        hist: list[dict] = []
        known: dict[tuple, float] = {}

        def objective(ks: list[int]) -> tuple[float, bool] | None:
            plan, ok = self.choice_plan(ks, target, metric)
            if not ok:
                return None
            key = plan_key(plan)
            if key in known:
                return known[key], False
            idx = len(hist)
            score = self._evaluate(
                plan,
                "candidate",
                {"method": "tpe", "target": float(target), "index": idx, "round": 0},
                {"choices_drawn": list(ks)},
            )
            known[key] = score
            hist.append({"index": idx, "round": 0, "score": score, "plan": plan, "choices_drawn": list(ks)})
            if len(hist) % 10 == 0 or len(hist) == n:
                self.progress(f"tpe x{target:g}: {len(hist)}/{n} evaluated, best {max(known.values()):.5g}")
            return score, True

        trials = tpe_search(
            [len(self.choices)] * len(self.space.layers), objective, n, seed, n_startup=self.config.tpe_startup
        )
        return hist, {"seed": seed, "trials": len(trials)}


def seed_of(rng: np.random.Generator) -> int:
    """A compact id of the generator's state (recorded with candidates for traceability)."""
    return int(rng.bit_generator.state["state"]["state"] % (2**31))


def _strip(hist: list[dict]) -> list[dict]:
    return [{"index": h["index"], "round": h["round"], "score": h["score"]} for h in hist]


def build_searcher(
    model: nn.Module,
    data,
    *,
    decomposition: str = "ht2",
    input_size: Sequence[int] | None = None,
    multiple: int = 8,
    include_1x1: bool = True,
    recorder: Recorder | None = None,
    config: SearchConfig | None = None,
    progress: Callable[[str], None] | None = None,
    spectra: SpectraCache | None = None,
    tag: Mapping | None = None,
    bars: bool = False,
    **proxy_options,
) -> Searcher:
    """Everything a search needs for ``model`` on ``data``: layers, space, spectra cache, proxy.

    ``proxy_options`` are the :class:`common.search.proxy.ProxyEvaluator` settings (``proxy``,
    ``calib_images``, ``val_images``, ``batch_size``, ``device``, ``seed``, ``channels_last``,
    ``amp_dtype``), its defaults but for ``channels_last``, on here. ``seed`` picks the proxy's
    calibration (and val) subsets; the search methods take their own seed. ``channels_last`` is for
    speed on both devices: on a 2-core Xeon at batch 250 a 3x-compressed ResNet-18 runs ~1.9x faster
    in channels_last than contiguous (where oneDNN's 1×k / k×1 convs are as slow as the dense model),
    and CUDA tensor cores want it too.
    """
    if input_size is None:
        input_size = (1, 3, data.image_size, data.image_size)
    model = model.eval()
    spectra = spectra or SpectraCache(model)
    proxy_options.setdefault("channels_last", True)
    # Built first: it checks its settings before the costly steps (the forward pass, the spectra).
    evaluator = ProxyEvaluator(model, data, spectra, **proxy_options)
    rescorer = None
    if config is not None and config.rescore:
        rescorer = evaluator.with_calib_images(data, config.rescore_images)
    layers = list_conv_layers(model, input_size)
    space = SearchSpace(layers, decomposition, include_1x1=include_1x1, multiple=multiple)
    spectra.warm(space.names)
    return Searcher(space, evaluator, spectra, recorder, config, progress, tag, bars, rescorer)

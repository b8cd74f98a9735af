"""Rank selection at a fixed budget: uniform, energy, VBMF, random, TPE and the sensitivity-guided policy.

Every method returns a plan whose total conv cost (MACs by default, or params) is ``target`` times
smaller than the dense model's, within ``tol`` (±3 % by default), so methods are compared at equal
cost (:func:`common.space.project`). Candidates are scored by a *proxy* (:mod:`common.proxy`; by
default the label-free KL divergence to the dense model on BN-calibration train images); the searching
methods (random, TPE, policy) then let top-1 on a fixed val subset decide among their ``rerank`` best
candidates. Only ``val`` is ever used for selection.

The per-layer choices are the pairs (level, shape) of :mod:`common.space`: ``SearchConfig.levels`` ×
``SearchConfig.shapes``. The policy samples them from a per-layer distribution built from each layer's
sensitivity (the proxy's loss when only that layer is compressed) and its cost, refined by
cross-entropy steps; random draws them uniformly; TPE (:mod:`common.tpe`, Optuna) models them.

Resumability: every sensitivity point, candidate and re-ranking goes through a *recorder* (a
:class:`common.logs.RunLog` or :class:`MemoryRecorder`) the moment it is evaluated; re-running with
the same recorder skips what is recorded and reproduces the same result, because the draws of a round
are made before anything in it is evaluated (random, policy) or depend only on recorded scores (TPE).
"""
from __future__ import annotations

import math
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import numpy as np
import torch
from torch import nn

from .evbmf import evbmf_rank_from_singular_values
from .ht import energy_rank
from .proxy import PROXIES, ProxyEvaluator
from .ranks import full_ranks, ranks_from_level, round_rank
from .space import SHAPES, LayerSpace, SearchSpace, bisect, plan_key, project, repair_plan
from .surgery import LayerPlan, SpectraCache, list_conv_layers, plan_to_dict
from .tpe import tpe_search

METHODS = ("uniform", "energy", "vbmf", "random", "policy", "tpe")
SEARCHING = ("random", "policy", "tpe")

__all__ = ["METHODS", "SEARCHING", "MemoryRecorder", "ProxyEvaluator", "SearchConfig", "SearchResult",
           "SearchSpace", "Searcher", "build_searcher", "project", "repair_plan"]


class Recorder(Protocol):
    def write(self, kind: str, text: str = "", **payload) -> dict: ...
    def find(self, kind: str, **match) -> dict | None: ...


class MemoryRecorder:
    """In-memory stand-in for :class:`common.logs.RunLog` (same ``write``/``find`` contract)."""

    def __init__(self):
        self.items: list[dict] = []

    def write(self, kind: str, text: str = "", **payload) -> dict:
        rec = {"kind": kind, **payload}
        self.items.append(rec)
        return rec

    def find(self, kind: str, **match) -> dict | None:
        for rec in reversed(self.items):
            if rec["kind"] == kind and all(rec.get(k) == v for k, v in match.items()):
                return rec
        return None


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
    shapes: rank shapes a layer may take (:mod:`common.space`): ``("level",)`` ties R1, R3 and R13 to
        one fraction of their full values; adding ``"energy"`` lets the search also split a layer's
        budget by its spectra, per layer.
    sensitivity_levels: levels at which each layer's sensitivity curve is measured (per shape).
    temperature: softness of the policy pdf, in units of the median sensitivity drop.
    rounds: policy sampling rounds (>1 re-fits the pdf on the elite plans between rounds: CEM).
    elite_frac / smoothing: CEM elite fraction and the weight of the new fit.
    rerank: how many of a search's best-scored candidates val top-1 decides among (label-free
        proxies only; 1 = take the best score).
    tpe_startup: random draws before TPE starts modelling.
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

    def __post_init__(self) -> None:
        self.levels, self.shapes = tuple(self.levels), tuple(self.shapes)
        self.sensitivity_levels = tuple(self.sensitivity_levels)
        bad = [s for s in self.shapes if s not in SHAPES]
        if bad or not self.shapes:
            raise ValueError(f"shapes must be a non-empty subset of {SHAPES}, got {self.shapes!r}")
        if self.rerank < 1:
            raise ValueError(f"rerank must be >= 1, got {self.rerank}")

    def choices(self) -> list[tuple[float, str]]:
        """The per-layer (level, shape) options; dense (level 1) once."""
        return [(float(f), s) for f in self.levels for s in self.shapes if f < 1.0 or s == self.shapes[0]]


class Searcher:
    """Runs the rank-selection methods on one model at one budget.

    Args:
        space: the :class:`common.space.SearchSpace`.
        evaluator: a :class:`common.proxy.ProxyEvaluator` (or anything with its ``proxy`` name,
            ``score(plan)`` and ``val_top1(plan)``).
        spectra: kernel spectra of the dense model (energy, VBMF and the energy shape read them).
        recorder: where sensitivity points and candidates are written and looked up (resume).
        config: :class:`SearchConfig`.
        tag: merged into every record key (e.g. the decomposition and the seed).
    """

    def __init__(self, space: SearchSpace, evaluator: ProxyEvaluator,
                 spectra: SpectraCache, recorder: Recorder | None = None, config: SearchConfig | None = None,
                 progress: Callable[[str], None] | None = None, tag: Mapping | None = None):
        self.space, self.evaluator, self.spectra = space, evaluator, spectra
        self.tag = dict(tag or {})
        self.recorder = recorder if recorder is not None else MemoryRecorder()
        self.config = config or SearchConfig()
        self.progress = progress or (lambda msg: None)
        self.proxy = evaluator.proxy
        self.choices = self.config.choices()
        self._sensitivity: dict | None = None
        self._dense_score: float | None = None
        self._shape_cache: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
        for ls in self.space.layers:
            ls.shapers["energy"] = self._energy_shaped_ranks

    # -- bookkeeping ------------------------------------------------------------------------- #
    def _evaluate(self, plan: Mapping[str, LayerPlan], kind: str, key: dict, extra: dict | None = None) -> float:
        """The score of ``plan`` (val top-1 for ``rerank`` records), from the recorder if this ``key``
        was already evaluated."""
        key = {**self.tag, **key}
        hit = self.recorder.find(kind, **key)
        if hit is not None:
            if hit.get("plan") not in (None, plan_to_dict(plan)):
                raise RuntimeError(f"resumed {kind} record {key} has a different plan than this run draws: "
                                   "the log belongs to a run with other settings; use a new run id")
            return float(hit["val_top1" if kind == "rerank" else "score"])
        f = self.space.factors(plan)
        if kind == "rerank":
            val = self.evaluator.val_top1(plan)
            self.recorder.write(kind, f"{key} val_top1={val:.4f}", **key, val_top1=val, plan=plan_to_dict(plan), **f)
            return val
        score = float(self.evaluator.score(plan))
        self.recorder.write(kind, f"{key} {self.proxy}={score:.5g} x{f['macs_factor']:.2f} MACs",
                            **key, score=score, proxy=self.proxy, plan=plan_to_dict(plan), **f, **(extra or {}))
        return score

    @property
    def profiled(self) -> bool:
        """Whether the sensitivity profile is computed (or read back) already."""
        return self._sensitivity is not None

    def dense_score(self) -> float:
        """Proxy score of the uncompressed model (same recalibration as every candidate)."""
        if self._dense_score is None:
            self._dense_score = self._evaluate({}, "sensitivity", {"layer": "<dense>", "level": 1.0})
        return self._dense_score

    # -- sensitivity ------------------------------------------------------------------------- #
    def sensitivity(self) -> dict[str, dict[str, list[tuple[float, float]]]]:
        """Each layer alone at each sensitivity level and shape: ``{name: {shape: [(f, score), ...]}}``."""
        if self._sensitivity is not None:
            return self._sensitivity
        self.dense_score()
        out = {}
        for i, ls in enumerate(self.space.layers):
            n = ls.info.name
            out[n] = {}
            for shape in self.config.shapes:
                pts = []
                for f in self.config.sensitivity_levels:
                    lp = ls.choice(f, shape)
                    score = self._evaluate({n: lp}, "sensitivity", {"layer": n, "level": float(f), "shape": shape},
                                           {"ranks": list(lp.ranks), "method": lp.method})
                    pts.append((float(f), score))
                out[n][shape] = pts
            self.progress(f"sensitivity {i + 1}/{len(self.space.layers)} {n}: " + "; ".join(
                f"{s} " + ", ".join(f"{f:g}->{v:.4g}" for f, v in p) for s, p in out[n].items()))
        self._sensitivity = out
        return out

    def _drop_curve(self, name: str, shape: str, levels: Sequence[float]) -> np.ndarray:
        """Interpolated score drop of one layer at each level (0 at dense, monotone as f falls)."""
        dense = self.dense_score()
        pts = sorted(self._sensitivity[name][shape] + [(1.0, dense)], key=lambda p: -p[0])
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

    # -- policy pdf ---------------------------------------------------------------------------- #
    def policy_pdf(self, target: float, metric: str) -> tuple[np.ndarray, dict]:
        """Per-layer distribution over :attr:`choices`: ``p[l, k] ∝ exp(-(drop[l,k] + μ·cost[l,k]) / T)``.

        ``drop`` is the layer's interpolated sensitivity (proxy score lost when only it is compressed
        to choice k) and ``cost`` its MACs (or params) at choice k as a share of the model's total, so
        big layers gain most by compressing. μ is set by bisection so the expected total cost under
        the pdf meets the budget; T is ``config.temperature`` times the median positive drop.
        """
        self.sensitivity()
        idx = 0 if metric == "params" else 1
        dense_total = self.space.dense_params if metric == "params" else self.space.dense_macs
        fixed = self.space.fixed_params if metric == "params" else self.space.fixed_macs
        drops = np.zeros((len(self.space.layers), len(self.choices)))
        for li, ls in enumerate(self.space.layers):
            for s in self.config.shapes:
                cols = [k for k, (_, cs) in enumerate(self.choices) if cs == s]
                drops[li, cols] = self._drop_curve(ls.info.name, s, [self.choices[k][0] for k in cols])
        cost = np.array([[ls.cost(ls.choice(f, s))[idx] for f, s in self.choices]
                         for ls in self.space.layers]) / dense_total
        pos = drops[drops > 0]
        scale = float(np.median(pos)) if pos.size else 1e-3
        temp = self.config.temperature * max(scale, 1e-9)
        budget = 1.0 / target - fixed / dense_total

        def pdf(mu: float) -> np.ndarray:
            logits = -(drops + mu * cost) / temp
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            return p / p.sum(axis=1, keepdims=True)

        lo, hi = 1e-9, 1e9
        for _ in range(100):  # expected cost falls as μ grows; bisection in log μ
            mid = math.sqrt(lo * hi)
            if float((pdf(mid) * cost).sum()) > budget:
                lo = mid
            else:
                hi = mid
        mu = math.sqrt(lo * hi)
        return pdf(mu), {"mu": mu, "temperature_abs": temp, "drop_scale": scale,
                         "choices": [list(c) for c in self.choices], "drops": [[float(f"{v:.4g}") for v in row] for row in drops]}

    # -- methods ------------------------------------------------------------------------------- #
    def run(self, method: str, target: float, metric: str = "macs", n_candidates: int = 100,
            seed: int = 0) -> SearchResult:
        """Run one method at ``target``× reduction of total conv ``metric`` ("macs" or "params")."""
        if method not in METHODS:
            raise ValueError(f"unknown rank-selection method {method!r}; expected one of {METHODS}")
        if metric not in ("macs", "params"):
            raise ValueError(f"metric must be 'macs' or 'params', got {metric!r}")
        if not (math.isfinite(target) and target > 1.0):
            raise ValueError(f"target reduction must be a finite number > 1, got {target}")
        if method in SEARCHING and n_candidates < 1:
            raise ValueError(f"{method}: the search budget must be at least 1 candidate, got {n_candidates}")
        t0 = time.perf_counter()
        fn = {"uniform": self._uniform, "energy": self._energy, "vbmf": self._vbmf,
              "random": self._random, "policy": self._policy, "tpe": self._tpe}[method]
        plan, params, hist = fn(target, metric, n_candidates, seed)
        evals = max(1, len(hist))
        if abs(self.space.factor(plan, metric) / target - 1) > self.config.tol:
            # Global knobs (e, β, α) move many layers' rounded ranks at once; finish layer by layer.
            plan, params["repair_steps"] = repair_plan(self.space, plan, target, metric, self.config.tol)
        val = None
        if method in SEARCHING:
            best, val = self._rerank(method, target, hist)
            plan, score = best["plan"], best["score"]
        else:
            score = self._evaluate(plan, "candidate", {"method": method, "target": float(target), "index": 0,
                                                       "round": 0})
        if self.proxy == "top1":
            val = score
        f = self.space.factors(plan)
        achieved = f[f"{metric}_factor"]
        if abs(achieved / target - 1) > self.config.tol:
            warnings.warn(f"{method}: achieved {achieved:.3f}x vs target {target}x (outside ±{self.config.tol:.0%})")
        return SearchResult(method, float(target), metric, plan, score, val, self.proxy, f["macs_factor"],
                            f["params_factor"], evals, time.perf_counter() - t0, seed,
                            {**params, "config": asdict(self.config), "decomposition": self.space.decomposition},
                            _strip(hist))

    def _rerank(self, method: str, target: float, hist: list[dict]) -> tuple[dict, float | None]:
        """The candidate val top-1 picks among the ``config.rerank`` best-scored ones (with its val)."""
        ranked = sorted(hist, key=lambda h: (-h["score"], h["index"]))
        if self.proxy == "top1" or self.config.rerank == 1:
            return ranked[0], None
        top = ranked[:self.config.rerank]
        vals = [self._evaluate(h["plan"], "rerank", {"method": method, "target": float(target), "index": h["index"]})
                for h in top]
        k = max(range(len(top)), key=lambda i: (vals[i], top[i]["score"], -top[i]["index"]))
        self.progress(f"{method} x{target:g}: val top-1 of the {len(top)} best-scored candidates "
                      + ", ".join(f"#{h['index']} {v:.4f}" for h, v in zip(top, vals)))
        return top[k], vals[k]

    def _explicit_plan(self, ranks_of: Callable[[LayerSpace, float], tuple[int, ...]], x: float) -> dict:
        plan = {}
        for ls in self.space.layers:
            ranks = ranks_of(ls, x)
            lp = LayerPlan(ls.method, ranks)
            plan[ls.info.name] = LayerPlan("dense") if ranks == full_ranks(ls.method, ls.info.group_shape) \
                or ls.cost(lp)[1] >= ls.info.macs else lp
        return plan

    def _uniform(self, target, metric, n, seed):
        def plan_at(f):  # one fraction of every full rank
            return self._explicit_plan(lambda ls, v: ranks_from_level(ls.method, ls.info.group_shape, min(v, 1.0),
                                                                      ls.multiple), f)
        f, _ = bisect(lambda v: self.space.factor(plan_at(v), metric), 1e-3, 1.0, target)
        return plan_at(f), {"level": f}, []

    def _energy_ranks(self, ls: LayerSpace, e: float) -> tuple[int, ...]:
        """Per-unfolding energy threshold (the HT-2 paper's rule), ranks rounded up."""
        sp = self.spectra.get(ls.info.name)
        t, c, kh, kw = ls.info.group_shape
        m = ls.multiple
        if ls.method == "svd":
            full = min(c, t)
            return (round_rank(energy_rank(sp.s3[:, :full], e), full, m),)
        r1 = round_rank(energy_rank(sp.s1, e), c, m)
        r3 = round_rank(energy_rank(sp.s3, e), t, m)
        if ls.method == "tucker2":
            return (r1, r3)
        full13 = min(r1 * kh, r3 * kw)
        return (r1, r3, round_rank(energy_rank(sp.core_spectrum(r1, r3), e), full13, m))

    def _energy_shaped_ranks(self, ls: LayerSpace, f: float) -> tuple[int, ...]:
        """Energy-threshold ranks of one layer costing (in MACs) what level-``f`` ranks cost."""
        # Keyed by the level ranks, not by f: projection asks for arbitrary f, but rank rounding
        # makes the level ranks (hence the cost to match) a step function with few steps.
        level_ranks = ranks_from_level(ls.method, ls.info.group_shape, f, ls.multiple)
        key = (ls.info.name, level_ranks)
        hit = self._shape_cache.get(key)
        if hit is not None:
            return hit
        goal = ls.info.cost(ls.method, level_ranks)[1]

        def macs(one_minus_e: float) -> float:
            return float(ls.info.cost(ls.method, self._energy_ranks(ls, 1.0 - one_minus_e))[1])

        x, _ = bisect(macs, 1e-7, 0.999, float(goal), iters=30, close=0.01)
        ranks = self._energy_ranks(ls, 1.0 - x)
        self._shape_cache[key] = ranks
        return ranks

    def _energy(self, target, metric, n, seed):
        # Energy kept grows with e, so cost grows: bisect e in (0, 1] on a logit-like scale 1 - e.
        def plan_at(one_minus_e):
            return self._explicit_plan(self._energy_ranks, 1.0 - one_minus_e)
        x, _ = bisect(lambda v: self.space.factor(plan_at(v), metric), 1e-7, 0.999, target)
        return plan_at(x), {"energy": 1.0 - x}, []

    def _vbmf_base(self) -> dict[str, tuple[int, ...]]:
        if getattr(self, "_vbmf_cache", None) is None:
            base = {}
            for ls in self.space.layers:
                sp = self.spectra.get(ls.info.name)
                t, c, kh, kw = ls.info.group_shape

                def rank(s, rows, cols, what):
                    k = min(rows, cols)
                    try:
                        r = max(int(evbmf_rank_from_singular_values(s.max(0).values[:k].numpy(), rows, cols).rank) for _ in [0])
                    except (ValueError, FloatingPointError) as e:
                        warnings.warn(f"layer {ls.info.name!r}: EVBMF failed on {what} ({e}); using rank 1")
                        return 1
                    if r == 0:
                        warnings.warn(f"layer {ls.info.name!r}: EVBMF found rank 0 for {what}; using rank 1")
                    return max(r, 1)

                if ls.method == "svd":
                    base[ls.info.name] = (rank(sp.s3, t, c, "the 1x1 kernel"),)
                    continue
                r1 = rank(sp.s1, c, t * kh * kw, "the C-mode unfolding")
                r3 = rank(sp.s3, t, c * kh * kw, "the T-mode unfolding")
                if ls.method == "tucker2":
                    base[ls.info.name] = (r1, r3)
                    continue
                r13 = rank(sp.core_spectrum(r1, r3), r1 * kh, r3 * kw, "the HT-2 core")
                base[ls.info.name] = (r1, r3, r13)
            self._vbmf_cache = base
        return self._vbmf_cache

    def _vbmf(self, target, metric, n, seed):
        base = self._vbmf_base()

        def ranks_of(ls: LayerSpace, beta: float):
            t, c, kh, kw = ls.info.group_shape
            b = base[ls.info.name]
            if ls.method == "svd":
                return (round_rank(beta * b[0], min(c, t), ls.multiple),)
            r1 = round_rank(beta * b[0], c, ls.multiple)
            r3 = round_rank(beta * b[1], t, ls.multiple)
            if ls.method == "tucker2":
                return (r1, r3)
            full13 = min(r1 * kh, r3 * kw)
            return (r1, r3, round_rank(min(beta * b[2], full13), full13, ls.multiple))

        beta, _ = bisect(lambda v: self.space.factor(self._explicit_plan(ranks_of, v), metric), 1e-3, 1e3, target)
        return self._explicit_plan(ranks_of, beta), {"beta": beta, "vbmf_ranks": base}, []

    def _draw(self, pdf: np.ndarray, rng: np.random.Generator) -> list[int]:
        return [int(rng.choice(len(self.choices), p=p)) for p in pdf]

    def _choice_plan(self, ks: Sequence[int], target: float, metric: str) -> tuple[dict, bool]:
        """The projected plan of per-layer choice indices, and whether it is within the budget tolerance."""
        levels = {n: self.choices[k][0] for n, k in zip(self.space.names, ks)}
        shapes = {n: self.choices[k][1] for n, k in zip(self.space.names, ks)}
        plan, achieved = project(self.space, levels, target, metric, self.config.tol, shapes)
        return plan, abs(achieved / target - 1) <= self.config.tol

    def _sample_round(self, method: str, target: float, metric: str, pdf: np.ndarray, count: int,
                      rng: np.random.Generator, rnd: int, start: int, seen: set) -> list[dict]:
        """Draw ``count`` distinct plans from ``pdf`` (per-layer choice probabilities), project each onto
        the budget and evaluate; all draws happen before any evaluation (resume-safe)."""
        drawn = []
        for _ in range(count * 20):
            if len(drawn) == count:
                break
            ks = self._draw(pdf, rng)
            plan, ok = self._choice_plan(ks, target, metric)
            key = plan_key(plan)
            if key in seen or not ok:
                continue
            seen.add(key)
            drawn.append({"choices_drawn": ks, "plan": plan})
        out = []
        for j, d in enumerate(drawn):
            idx = start + j
            score = self._evaluate(d["plan"], "candidate",
                                   {"method": method, "target": float(target), "index": idx, "round": rnd},
                                   {"rng_state": seed_of(rng), "choices_drawn": d["choices_drawn"]})
            out.append({"index": idx, "round": rnd, "score": score, **d})
            if (j + 1) % 10 == 0 or j + 1 == len(drawn):
                best = max(o["score"] for o in out)
                self.progress(f"{method} x{target:g} round {rnd}: {j + 1}/{len(drawn)} evaluated, best {best:.5g}")
        return out

    def _random(self, target, metric, n, seed):
        rng = np.random.default_rng(seed)
        pdf = np.full((len(self.space.layers), len(self.choices)), 1.0 / len(self.choices))
        hist = self._sample_round("random", target, metric, pdf, n, rng, 0, 0, set())
        if not hist:
            raise ValueError(f"random: no plan drawn reaches {target}x within ±{self.config.tol:.0%}")
        return _best(hist)["plan"], {"seed": seed}, hist

    def _policy(self, target, metric, n, seed):
        rng = np.random.default_rng(seed)
        pdf, info = self.policy_pdf(target, metric)
        rounds = max(1, self.config.rounds)
        per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
        hist: list[dict] = []
        seen: set = set()
        for r, count in enumerate(per_round):
            hist += self._sample_round("policy", target, metric, pdf, count, rng, r, len(hist), seen)
            if r + 1 < rounds and hist:
                # Cross-entropy step: re-fit each layer's choice distribution on the elite plans' draws.
                n_elite = max(2, int(len(hist) * self.config.elite_frac))
                elite = sorted(hist, key=lambda h: (-h["score"], h["index"]))[:n_elite]
                freq = np.zeros_like(pdf)
                for h in elite:
                    for li, k in enumerate(h["choices_drawn"]):
                        freq[li, k] += 1
                freq /= freq.sum(axis=1, keepdims=True)
                pdf = (1 - self.config.smoothing) * pdf + self.config.smoothing * freq
        if not hist:
            raise ValueError(f"policy: no plan drawn reaches {target}x within ±{self.config.tol:.0%}")
        return _best(hist)["plan"], {"seed": seed, "pdf": info}, hist

    def _tpe(self, target, metric, n, seed):
        """Optuna's TPE over the same per-layer choices, projection, proxy and number of evaluations."""
        hist: list[dict] = []
        known: dict[tuple, float] = {}

        def objective(ks: list[int]) -> tuple[float, bool] | None:
            plan, ok = self._choice_plan(ks, target, metric)
            if not ok:
                return None
            key = plan_key(plan)
            if key in known:
                return known[key], False
            idx = len(hist)
            score = self._evaluate(plan, "candidate", {"method": "tpe", "target": float(target), "index": idx,
                                                       "round": 0}, {"choices_drawn": list(ks)})
            known[key] = score
            hist.append({"index": idx, "round": 0, "score": score, "plan": plan, "choices_drawn": list(ks)})
            if len(hist) % 10 == 0 or len(hist) == n:
                self.progress(f"tpe x{target:g}: {len(hist)}/{n} evaluated, best {max(known.values()):.5g}")
            return score, True

        trials = tpe_search([len(self.choices)] * len(self.space.layers), objective, n, seed,
                            n_startup=self.config.tpe_startup)
        if not hist:
            raise ValueError(f"tpe: no plan drawn reaches {target}x within ±{self.config.tol:.0%}")
        return _best(hist)["plan"], {"seed": seed, "trials": len(trials)}, hist


def _best(hist: list[dict]) -> dict:
    return max(hist, key=lambda h: (h["score"], -h["index"]))


def seed_of(rng: np.random.Generator) -> int:
    """A compact id of the generator's state (recorded with candidates for traceability)."""
    return int(rng.bit_generator.state["state"]["state"] % (2 ** 31))


def _strip(hist: list[dict]) -> list[dict]:
    return [{"index": h["index"], "round": h["round"], "score": h["score"]} for h in hist]


def build_searcher(model: nn.Module, data, *, decomposition: str = "ht2", input_size: Sequence[int] | None = None,
                   proxy: str = "kl", calib_images: int = 256, val_images: int | None = None,
                   batch_size: int = 250, device: str | torch.device = "cpu", seed: int = 0, multiple: int = 8,
                   include_1x1: bool = True, recorder: Recorder | None = None,
                   config: SearchConfig | None = None, progress: Callable[[str], None] | None = None,
                   spectra: SpectraCache | None = None, channels_last: bool = True,
                   amp_dtype: torch.dtype | None = None, tag: Mapping | None = None) -> Searcher:
    """Everything a search needs for ``model`` on ``data``: layers, space, spectra cache, proxy.

    ``seed`` picks the proxy's calibration (and val) subsets; the search methods take their own seed.
    ``channels_last`` (default on) is for speed on both devices: on a 2-core Xeon at batch 250 a
    3x-compressed ResNet-18 runs ~1.9x faster in channels_last than contiguous (where oneDNN's
    1×k / k×1 convs are as slow as the dense model), and CUDA tensor cores want it too.
    """
    if proxy not in PROXIES:
        raise ValueError(f"unknown proxy {proxy!r}; expected one of {PROXIES}")
    if input_size is None:
        input_size = (1, 3, data.image_size, data.image_size)
    model = model.eval()
    layers = list_conv_layers(model, input_size)
    space = SearchSpace(layers, decomposition, include_1x1=include_1x1, multiple=multiple)
    spectra = spectra or SpectraCache(model)
    spectra.warm(space.names)
    evaluator = ProxyEvaluator(model, data, spectra, proxy, calib_images, val_images, batch_size, device, seed,
                               channels_last=channels_last, amp_dtype=amp_dtype)
    return Searcher(space, evaluator, spectra, recorder, config, progress, tag)

"""Rank selection at a fixed budget: uniform, energy, VBMF, random and the sensitivity-guided policy.

Every method returns a plan whose total conv cost (MACs by default, or params) is ``target`` times
smaller than the dense model's, within ``tol`` (±3 % by default), so methods are compared at equal
cost. Candidates are scored by a *proxy*: apply the plan from cached factors, recalibrate batch norm
on a fixed train subset, top-1 on a fixed val subset. Only ``val`` is ever used for selection.

A per-layer choice is a *level* ``f`` in (0, 1]: the layer's ranks are
:func:`common.ranks.ranks_from_level` of ``f`` (rounded to hardware-friendly multiples), and a layer
whose factorized form would cost at least as much as the dense conv stays dense (``f = 1`` always
means dense).

Resumability: every sensitivity point and candidate goes through a *recorder* (a
:class:`common.logs.RunLog` or :class:`MemoryRecorder`) the moment it is evaluated; re-running with
the same recorder skips what is recorded and reproduces the same result, because all random draws of
a round are made before anything in it is evaluated.
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
from .ranks import full_ranks, ranks_from_level, round_rank
from .surgery import LayerInfo, LayerPlan, SpectraCache, apply_plan, list_conv_layers, plan_to_dict

METHODS = ("uniform", "energy", "vbmf", "random", "policy")


# --------------------------------------------------------------------------------------------- #
# Recording (resume support)
# --------------------------------------------------------------------------------------------- #
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


# --------------------------------------------------------------------------------------------- #
# Search space and budget
# --------------------------------------------------------------------------------------------- #
@dataclass
class LayerSpace:
    """One compressible layer: its info, decomposition method and rank rounding."""

    info: LayerInfo
    method: str
    multiple: int = 8
    shaper: Callable[["LayerSpace", float], tuple[int, ...]] | None = field(default=None, repr=False)

    def ranks(self, f: float) -> tuple[int, ...]:
        """Ranks at level ``f``: :func:`ranks_from_level`, or the ``shaper`` (see ``SearchConfig.rank_shape``)."""
        f = min(max(f, 1e-6), 1.0)
        if self.shaper is not None:
            return self.shaper(self, f)
        return ranks_from_level(self.method, self.info.group_shape, f, self.multiple)

    def choice(self, f: float) -> LayerPlan:
        """The layer plan for level ``f`` (dense when f ≥ 1 or when factorizing would not pay)."""
        if f >= 1.0:
            return LayerPlan("dense")
        ranks = self.ranks(f)
        if self.info.cost(self.method, ranks)[1] >= self.info.macs:
            return LayerPlan("dense")
        return LayerPlan(self.method, ranks)

    def cost(self, lp: LayerPlan) -> tuple[int, int]:
        return self.info.cost(lp.method, lp.ranks)


class SearchSpace:
    """The compressible layers of a model and the budget arithmetic over them.

    Args:
        layers: all conv layers (from :func:`list_conv_layers`); non-eligible ones count as fixed cost.
        decomposition: ``"ht2"`` or ``"tucker2"`` for k×k kernels (1×1 kernels use ``"svd"``).
        include_1x1: also compress 1×1 convs (with SVD).
        min_channels: skip layers with fewer input channels (e.g. the RGB stem, where no rank helps).
        multiple: rank rounding multiple.
    """

    def __init__(self, layers: Sequence[LayerInfo], decomposition: str = "ht2", include_1x1: bool = True,
                 min_channels: int = 4, multiple: int = 8):
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

    def plan(self, levels: Mapping[str, float]) -> dict[str, LayerPlan]:
        return {ls.info.name: ls.choice(levels[ls.info.name]) for ls in self.layers}

    def cost(self, plan: Mapping[str, LayerPlan]) -> tuple[int, int]:
        """Total conv (params, MACs) of the whole model under ``plan``."""
        p, m = self.fixed_params, self.fixed_macs
        for ls in self.layers:
            lp = plan.get(ls.info.name, LayerPlan("dense"))
            cp, cm = ls.cost(lp)
            p, m = p + cp, m + cm
        return p, m

    def factors(self, plan: Mapping[str, LayerPlan]) -> dict:
        """Reduction factors of total conv MACs and params under ``plan``."""
        p, m = self.cost(plan)
        return {"macs_factor": self.dense_macs / m, "params_factor": self.dense_params / p}

    def factor(self, plan: Mapping[str, LayerPlan], metric: str) -> float:
        return self.factors(plan)[f"{metric}_factor"]


def _bisect(fn: Callable[[float], float], lo: float, hi: float, target: float, iters: int = 40,
            log: bool = True, close: float = 0.004) -> tuple[float, float]:
    """Find x in [lo, hi] with fn(x) closest to ``target`` for a monotone (either way) fn.

    Returns (x, fn(x)). Rank rounding makes fn stepwise, so the best seen point is kept.
    """
    tr = (math.log if log else (lambda v: v))
    inv = (math.exp if log else (lambda v: v))
    a, b = tr(lo), tr(hi)
    fa, fb = fn(inv(a)), fn(inv(b))
    increasing = fb >= fa
    best = min(((abs(math.log(fa / target)), inv(a), fa), (abs(math.log(fb / target)), inv(b), fb)))
    for _ in range(iters):
        mid = 0.5 * (a + b)
        fm = fn(inv(mid))
        cand = (abs(math.log(fm / target)), inv(mid), fm)
        best = min(best, cand)
        if best[0] < close:  # well inside any tolerance: more steps only cost evaluations
            break
        if (fm < target) == increasing:
            a = mid
        else:
            b = mid
    return best[1], best[2]


def project_levels(space: SearchSpace, levels: Mapping[str, float], target: float, metric: str = "macs",
                   tol: float = 0.03) -> tuple[dict[str, float], float]:
    """Scale all levels by one factor α (``f ← min(1, α f)``) so the plan hits ``target`` reduction.

    Keeps the plan's shape (which layers are compressed more than others). If rank rounding leaves
    the result outside ``tol``, layers are nudged one rounding step at a time, largest first.

    Returns (projected levels, achieved factor).
    """
    base = {n: float(levels[n]) for n in space.names}

    def scaled(alpha: float) -> dict[str, float]:
        return {n: min(1.0, alpha * f) for n, f in base.items()}

    alpha, _ = _bisect(lambda a: space.factor(space.plan(scaled(a)), metric), 1e-3, 1e3, target)
    out = scaled(alpha)
    achieved = space.factor(space.plan(out), metric)
    if abs(achieved / target - 1) > tol:
        out, achieved = _nudge(space, out, target, metric, tol)
    return out, achieved


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
    t, c, kh, kw = ls.info.group_shape
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


def repair_plan(space: SearchSpace, plan: Mapping[str, LayerPlan], target: float, metric: str = "macs",
                tol: float = 0.03, max_steps: int = 400) -> tuple[dict[str, LayerPlan], int]:
    """Move single ranks of single layers until the plan is within ``tol`` of the target factor.

    Each step takes the move that brings the achieved factor closest to the target, first in steps of
    the rounding multiple, then (if that cannot reach the tolerance) in steps of 1.
    Returns (plan, number of steps).
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
            key = tuple(sorted((n, lp.method, lp.ranks) for n, lp in plan.items()))
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


def _nudge(space: SearchSpace, levels: dict[str, float], target: float, metric: str, tol: float):
    """Greedy repair: move single layers' levels in small steps toward the budget."""
    levels = dict(levels)
    order = sorted(space.layers, key=lambda ls: -ls.info.macs)
    for _ in range(200):
        achieved = space.factor(space.plan(levels), metric)
        if abs(achieved / target - 1) <= tol:
            break
        step = 0.97 if achieved < target else 1.03
        best = None
        for ls in order:
            n = ls.info.name
            trial = dict(levels, **{n: min(1.0, levels[n] * step)})
            a = space.factor(space.plan(trial), metric)
            if a != achieved:
                gap = abs(math.log(a / target))
                if best is None or gap < best[0]:
                    best = (gap, trial)
        if best is None:
            break
        levels = best[1]
    return levels, space.factor(space.plan(levels), metric)


# --------------------------------------------------------------------------------------------- #
# Proxy evaluation
# --------------------------------------------------------------------------------------------- #
class ProxyEvaluator:
    """Score a plan: apply it from cached factors, BN-recalibrate on a fixed train subset, top-1 on a
    fixed val subset. Batches are materialized once (normalized, on ``device``).

    Args:
        model: dense model (not modified).
        data: a :class:`common.data.DatasetSplits`.
        calib_images / val_images: subset sizes (seeded, class-stratified); ``val_images=None`` = all.
    """

    def __init__(self, model: nn.Module, data, spectra: SpectraCache, calib_images: int = 256,
                 val_images: int | None = 1000, batch_size: int = 250, device: str | torch.device = "cpu",
                 seed: int = 0, channels_last: bool = False, amp_dtype: torch.dtype | None = None):
        from .data import make_loader

        self.model, self.spectra, self.device = model, spectra, torch.device(device)
        self.channels_last, self.amp_dtype = channels_last, amp_dtype
        kw = dict(channels_last=channels_last)
        self.calib = list(make_loader(data, "train", batch_size, device=self.device, train=False, seed=seed,
                                      subset=min(calib_images, len(data.train)), **kw))
        vn = None if val_images is None or val_images >= len(data.val) else val_images
        self.val = list(make_loader(data, "val", batch_size, device=self.device, train=False, seed=seed,
                                    subset=vn, **kw))
        self.calib_images = sum(len(y) for _, y in self.calib)
        self.val_images = sum(len(y) for _, y in self.val)
        self.has_bn = any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())

    def build(self, plan: Mapping[str, LayerPlan]) -> nn.Module:
        """The compressed, BN-recalibrated model for ``plan`` (on the evaluator's device)."""
        from .train import bn_recalibrate

        m = apply_plan(self.model, plan, self.spectra).to(self.device)
        if self.channels_last:
            m = m.to(memory_format=torch.channels_last)
        if self.has_bn:
            bn_recalibrate(m, self.calib, device=self.device)
        return m.eval()

    def __call__(self, plan: Mapping[str, LayerPlan]) -> float:
        from .train import evaluate

        return float(evaluate(self.build(plan), self.val, device=self.device, amp_dtype=self.amp_dtype)["top1"])


# --------------------------------------------------------------------------------------------- #
# Results
# --------------------------------------------------------------------------------------------- #
@dataclass
class SearchResult:
    method: str
    target: float
    metric: str
    plan: dict
    val_top1: float
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

    levels: the per-layer level grid (1.0 = dense) that random and policy draw from.
    sensitivity_levels: levels at which each layer's sensitivity curve is measured.
    temperature: softness of the policy pdf, in units of the median sensitivity drop.
    rounds: policy sampling rounds (>1 re-fits the pdf on the elite plans between rounds: CEM).
    elite_frac / smoothing: CEM elite fraction and the weight of the new fit.
    rank_shape: how a level becomes ranks for random and policy. ``"level"``: every rank is the
        same fraction of its full value (:func:`common.ranks.ranks_from_level`). ``"energy"``: the
        ranks of one singular-value energy threshold for that layer (R1, R3 and R13 each from its own
        spectrum, as the energy method), the threshold set so that the layer costs what the
        ``"level"`` ranks cost; the spectrum then decides how the layer's budget is split
        between R1, R3 and R13, while the search still decides how much budget each layer gets.
    """

    levels: tuple = (1.0, 0.75, 0.6, 0.5, 0.42, 0.35, 0.3, 0.25, 0.2, 0.15, 0.1)
    sensitivity_levels: tuple = (0.5, 0.3, 0.15)
    temperature: float = 1.0
    rounds: int = 2
    elite_frac: float = 0.2
    smoothing: float = 0.7
    tol: float = 0.03
    rank_shape: str = "level"


class Searcher:
    """Runs the rank-selection methods on one model at one budget.

    Args:
        space: the :class:`SearchSpace`.
        evaluator: plan → proxy val top-1 (a :class:`ProxyEvaluator`).
        spectra: kernel spectra of the dense model (energy and VBMF read them).
        recorder: where sensitivity points and candidates are written and looked up (resume).
        config: :class:`SearchConfig`.
    """

    def __init__(self, space: SearchSpace, evaluator: Callable[[Mapping[str, LayerPlan]], float],
                 spectra: SpectraCache, recorder: Recorder | None = None, config: SearchConfig | None = None,
                 progress: Callable[[str], None] | None = None, tag: Mapping | None = None):
        self.space, self.evaluator, self.spectra = space, evaluator, spectra
        self.tag = dict(tag or {})  # merged into every record key (e.g. the decomposition)
        self.recorder = recorder if recorder is not None else MemoryRecorder()
        self.config = config or SearchConfig()
        self.progress = progress or (lambda msg: None)
        self._sensitivity: dict | None = None
        self._dense_acc: float | None = None
        if self.config.rank_shape not in ("level", "energy"):
            raise ValueError(f"rank_shape must be 'level' or 'energy', got {self.config.rank_shape!r}")
        self._shape_cache: dict[tuple[str, tuple[int, ...]], tuple[int, ...]] = {}
        for ls in self.space.layers:
            ls.shaper = self._energy_shaped_ranks if self.config.rank_shape == "energy" else None

    # -- bookkeeping ------------------------------------------------------------------------- #
    def _evaluate(self, plan: Mapping[str, LayerPlan], kind: str, key: dict, extra: dict | None = None) -> tuple[float, bool]:
        """Proxy accuracy of ``plan``, from the recorder if this ``key`` was already evaluated."""
        key = {**self.tag, **key}
        hit = self.recorder.find(kind, **key)
        if hit is not None:
            if hit.get("plan") not in (None, plan_to_dict(plan)):
                raise RuntimeError(f"resumed {kind} record {key} has a different plan than this run draws: "
                                   "the log belongs to a run with other settings; use a new run id")
            return float(hit["val_top1"]), True
        acc = self.evaluator(plan)
        f = self.space.factors(plan)
        self.recorder.write(kind, f"{key} val_top1={acc:.4f} x{f['macs_factor']:.2f} MACs",
                            **key, val_top1=acc, plan=plan_to_dict(plan), **f, **(extra or {}))
        return acc, False

    def dense_accuracy(self) -> float:
        """Proxy accuracy of the uncompressed model (same recalibration as every candidate)."""
        if self._dense_acc is None:
            self._dense_acc, _ = self._evaluate({}, "sensitivity", {"layer": "<dense>", "level": 1.0})
        return self._dense_acc

    # -- sensitivity ------------------------------------------------------------------------- #
    def sensitivity(self) -> dict[str, list[tuple[float, float]]]:
        """For each layer alone, proxy accuracy at each sensitivity level: ``{name: [(f, acc), ...]}``."""
        if self._sensitivity is not None:
            return self._sensitivity
        self.dense_accuracy()
        out = {}
        for i, ls in enumerate(self.space.layers):
            n = ls.info.name
            pts = []
            for f in self.config.sensitivity_levels:
                lp = ls.choice(f)
                acc, _ = self._evaluate({n: lp}, "sensitivity", {"layer": n, "level": float(f)},
                                        {"ranks": list(lp.ranks), "method": lp.method})
                pts.append((float(f), acc))
            out[n] = pts
            self.progress(f"sensitivity {i + 1}/{len(self.space.layers)} {n}: " +
                          ", ".join(f"{f:g}->{a:.3f}" for f, a in pts))
        self._sensitivity = out
        return out

    def _drop_curve(self, name: str, levels: Sequence[float]) -> np.ndarray:
        """Interpolated accuracy drop of one layer at each level (0 at dense, monotone as f falls)."""
        pts = sorted(self._sensitivity[name] + [(1.0, self.dense_accuracy())], key=lambda p: -p[0])
        fs = np.array([p[0] for p in pts])
        drops = np.maximum.accumulate(np.maximum(self.dense_accuracy() - np.array([p[1] for p in pts]), 0.0))
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
        """Per-layer distribution over ``config.levels``: ``p[l, k] ∝ exp(-(drop[l,k] + μ·cost[l,k]) / T)``.

        ``drop`` is the layer's interpolated sensitivity (accuracy lost when only it is compressed to
        level k) and ``cost`` its MACs (or params) at level k as a share of the model's total, so big
        layers gain most by compressing. μ is set by bisection so the expected total cost under the
        pdf meets the budget; T is ``config.temperature`` times the median positive drop.
        """
        self.sensitivity()
        levels = list(self.config.levels)
        idx = 0 if metric == "params" else 1
        dense_total = self.space.dense_params if metric == "params" else self.space.dense_macs
        fixed = self.space.fixed_params if metric == "params" else self.space.fixed_macs
        drops = np.stack([self._drop_curve(ls.info.name, levels) for ls in self.space.layers])
        cost = np.array([[ls.cost(ls.choice(f))[idx] for f in levels] for ls in self.space.layers]) / dense_total
        pos = drops[drops > 0]
        scale = float(np.median(pos)) if pos.size else 1e-3
        temp = self.config.temperature * max(scale, 1e-4)
        budget = 1.0 / target - fixed / dense_total

        def pdf(mu: float) -> np.ndarray:
            logits = -(drops + mu * cost) / temp
            logits -= logits.max(axis=1, keepdims=True)
            p = np.exp(logits)
            return p / p.sum(axis=1, keepdims=True)

        def expected(mu: float) -> float:
            return float((pdf(mu) * cost).sum())

        lo, hi = 1e-6, 1e6
        for _ in range(80):  # expected cost falls as μ grows; bisection in log μ
            mid = math.sqrt(lo * hi)
            if expected(mid) > budget:
                lo = mid
            else:
                hi = mid
        mu = math.sqrt(lo * hi)
        return pdf(mu), {"mu": mu, "temperature_abs": temp, "drop_scale": scale, "levels": levels,
                         "drops": drops.round(5).tolist()}

    # -- methods ------------------------------------------------------------------------------- #
    def run(self, method: str, target: float, metric: str = "macs", n_candidates: int = 100,
            seed: int = 0) -> SearchResult:
        """Run one method at ``target``× reduction of total conv ``metric`` ("macs" or "params")."""
        if method not in METHODS:
            raise ValueError(f"unknown rank-selection method {method!r}; expected one of {METHODS}")
        if metric not in ("macs", "params"):
            raise ValueError(f"metric must be 'macs' or 'params', got {metric!r}")
        if target <= 1.0:
            raise ValueError(f"target reduction must be > 1, got {target}")
        t0 = time.perf_counter()
        fn = {"uniform": self._uniform, "energy": self._energy, "vbmf": self._vbmf,
              "random": self._random, "policy": self._policy}[method]
        plan, val, evals, params, history = fn(target, metric, n_candidates, seed)
        if abs(self.space.factor(plan, metric) / target - 1) > self.config.tol:
            # Global knobs (e, β, α) move many layers' rounded ranks at once; finish layer by layer.
            plan, steps = repair_plan(self.space, plan, target, metric, self.config.tol)
            params["repair_steps"] = steps
            val = self._final_eval(method, target, plan, index=1)
            evals += 1
        f = self.space.factors(plan)
        achieved = f[f"{metric}_factor"]
        if abs(achieved / target - 1) > self.config.tol:
            warnings.warn(f"{method}: achieved {achieved:.3f}x vs target {target}x (outside ±{self.config.tol:.0%})")
        return SearchResult(method, float(target), metric, plan, val, f["macs_factor"], f["params_factor"], evals,
                            time.perf_counter() - t0, seed, {**params, "config": asdict(self.config),
                                                             "decomposition": self.space.decomposition},
                            history)

    def _final_eval(self, method: str, target: float, plan, index: int = 0) -> float:
        acc, _ = self._evaluate(plan, "candidate", {"method": method, "target": float(target), "index": index,
                                                    "round": 0})
        return acc

    def _uniform(self, target, metric, n, seed):
        def plan_at(f):  # always level-shaped ranks: one fraction of every full rank (rank_shape aside)
            return self._explicit_plan(
                lambda ls, v: ranks_from_level(ls.method, ls.info.group_shape, min(v, 1.0), ls.multiple), f)
        f, _ = _bisect(lambda v: self.space.factor(plan_at(v), metric), 1e-3, 1.0, target)
        plan = plan_at(f)
        return plan, self._final_eval("uniform", target, plan), 1, {"level": f}, []

    def _explicit_plan(self, ranks_of: Callable[[LayerSpace, float], tuple[int, ...]], x: float) -> dict:
        plan = {}
        for ls in self.space.layers:
            ranks = ranks_of(ls, x)
            lp = LayerPlan(ls.method, ranks)
            plan[ls.info.name] = LayerPlan("dense") if ranks == full_ranks(ls.method, ls.info.group_shape) \
                or ls.cost(lp)[1] >= ls.info.macs else lp
        return plan

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

        x, _ = _bisect(macs, 1e-7, 0.999, float(goal), iters=30, close=0.01)
        ranks = self._energy_ranks(ls, 1.0 - x)
        self._shape_cache[key] = ranks
        return ranks

    def _energy(self, target, metric, n, seed):
        # Energy kept grows with e, so cost grows: bisect e in (0, 1] on a logit-like scale 1 - e.
        def plan_at(one_minus_e):
            return self._explicit_plan(self._energy_ranks, 1.0 - one_minus_e)
        x, _ = _bisect(lambda v: self.space.factor(plan_at(v), metric), 1e-7, 0.999, target)
        plan = plan_at(x)
        return plan, self._final_eval("energy", target, plan), 1, {"energy": 1.0 - x}, []

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

        beta, _ = _bisect(lambda v: self.space.factor(self._explicit_plan(ranks_of, v), metric), 1e-3, 1e3, target)
        plan = self._explicit_plan(ranks_of, beta)
        return plan, self._final_eval("vbmf", target, plan), 1, {"beta": beta, "vbmf_ranks": base}, []

    def _sample_round(self, method: str, target: float, metric: str, pdf: np.ndarray, count: int,
                      rng: np.random.Generator, rnd: int, start: int, seen: set) -> list[dict]:
        """Draw ``count`` distinct plans from ``pdf`` (per-layer level probabilities), project each onto
        the budget and evaluate; all draws happen before any evaluation (resume-safe)."""
        levels = np.array(self.config.levels)
        drawn = []
        for _ in range(count * 20):
            if len(drawn) == count:
                break
            ks = np.array([rng.choice(len(levels), p=p) for p in pdf])
            proj, achieved = project_levels(self.space, dict(zip(self.space.names, levels[ks])), target, metric,
                                            self.config.tol)
            plan = self.space.plan(proj)
            key = tuple(sorted((n, lp.method, lp.ranks) for n, lp in plan.items()))
            if key in seen or abs(achieved / target - 1) > self.config.tol:
                continue
            seen.add(key)
            drawn.append({"levels_drawn": levels[ks].tolist(), "plan": plan})
        out = []
        for j, d in enumerate(drawn):
            idx = start + j
            acc, _ = self._evaluate(d["plan"], "candidate",
                                    {"method": method, "target": float(target), "index": idx, "round": rnd},
                                    {"seed": seed_of(rng)})
            out.append({"index": idx, "round": rnd, "val_top1": acc, "plan": d["plan"],
                        "levels_drawn": d["levels_drawn"]})
            if (j + 1) % 10 == 0 or j + 1 == len(drawn):
                best = max(o["val_top1"] for o in out)
                self.progress(f"{method} x{target:g} round {rnd}: {j + 1}/{len(drawn)} evaluated, best {best:.4f}")
        return out

    def _random(self, target, metric, n, seed):
        rng = np.random.default_rng(seed)
        k = len(self.config.levels)
        pdf = np.full((len(self.space.layers), k), 1.0 / k)
        hist = self._sample_round("random", target, metric, pdf, n, rng, 0, 0, set())
        best = max(hist, key=lambda h: (h["val_top1"], -h["index"]))
        return best["plan"], best["val_top1"], len(hist), {"seed": seed}, _strip(hist)

    def _policy(self, target, metric, n, seed):
        rng = np.random.default_rng(seed)
        pdf, info = self.policy_pdf(target, metric)
        rounds = max(1, self.config.rounds)
        per_round = [n // rounds + (1 if r < n % rounds else 0) for r in range(rounds)]
        hist: list[dict] = []
        seen: set = set()
        levels = np.array(self.config.levels)
        for r, count in enumerate(per_round):
            hist += self._sample_round("policy", target, metric, pdf, count, rng, r, len(hist), seen)
            if r + 1 < rounds and hist:
                # Cross-entropy step: re-fit each layer's level distribution on the elite plans' draws.
                elite = sorted(hist, key=lambda h: (-h["val_top1"], h["index"]))[:max(2, int(len(hist) * self.config.elite_frac))]
                freq = np.zeros_like(pdf)
                for h in elite:
                    for li, f in enumerate(h["levels_drawn"]):
                        freq[li, int(np.argmin(np.abs(levels - f)))] += 1
                freq /= freq.sum(axis=1, keepdims=True)
                pdf = (1 - self.config.smoothing) * pdf + self.config.smoothing * freq
        best = max(hist, key=lambda h: (h["val_top1"], -h["index"]))
        return best["plan"], best["val_top1"], len(hist), {"seed": seed, "pdf": info}, _strip(hist)


def seed_of(rng: np.random.Generator) -> int:
    """A compact id of the generator's state (recorded with candidates for traceability)."""
    return int(rng.bit_generator.state["state"]["state"] % (2 ** 31))


def _strip(hist: list[dict]) -> list[dict]:
    return [{"index": h["index"], "round": h["round"], "val_top1": h["val_top1"]} for h in hist]


def build_searcher(model: nn.Module, data, *, decomposition: str = "ht2", input_size: Sequence[int] | None = None,
                   calib_images: int = 256, val_images: int | None = 1000, batch_size: int = 250,
                   device: str | torch.device = "cpu", seed: int = 0, multiple: int = 8,
                   include_1x1: bool = True, recorder: Recorder | None = None,
                   config: SearchConfig | None = None, progress: Callable[[str], None] | None = None,
                   spectra: SpectraCache | None = None, channels_last: bool = True,
                   amp_dtype: torch.dtype | None = None, tag: Mapping | None = None) -> Searcher:
    """Everything a search needs for ``model`` on ``data``: layers, space, spectra cache, proxy.

    ``channels_last`` (default on) is for speed on both devices: on a 2-core Xeon at batch 250 a
    3x-compressed ResNet-18 runs ~1.9x faster in channels_last than contiguous (where oneDNN's
    1×k / k×1 convs are as slow as the dense model), and CUDA tensor cores want it too.
    """
    if input_size is None:
        input_size = (1, 3, data.image_size, data.image_size)
    model = model.eval()
    layers = list_conv_layers(model, input_size)
    space = SearchSpace(layers, decomposition, include_1x1=include_1x1, multiple=multiple)
    spectra = spectra or SpectraCache(model)
    spectra.warm(space.names)
    evaluator = ProxyEvaluator(model, data, spectra, calib_images, val_images, batch_size, device, seed,
                               channels_last=channels_last, amp_dtype=amp_dtype)
    return Searcher(space, evaluator, spectra, recorder, config, progress, tag)

"""Rank selection at a fixed budget: uniform, energy, VBMF, random, TPE and the sensitivity-guided policy.

Every method returns a plan whose total conv cost (MACs by default, or params) is ``target`` times
smaller than the dense model's, within ``tol`` (±3 % by default), so methods are compared at equal
cost (:func:`common.search.space.project`). :class:`Searcher` holds one model's search: its space,
proxy, recorder and sensitivity profile; :meth:`Searcher.run` runs a rule-based method
(:func:`common.search.methods.rule_plan`) or a search (:data:`common.search.methods.SEARCHES`: random,
policy, TPE, policy_seeded), and picks once among the search's scored candidates
(:func:`common.search.pick.pick`: the proxy score, then top-1 on a fixed val subset among the best).
The methods, metrics, :class:`common.search.options.SearchConfig` and
:class:`common.search.options.SearchResult` are in :mod:`common.search.options`; :func:`build_searcher`
builds a searcher for a model and its data.

Resumability: every sensitivity point, candidate and re-ranking goes through a *recorder*
(:mod:`common.search.recorder`: a :class:`common.run.logs.RunLog` or a :class:`MemoryRecorder`) the moment it is
evaluated (:meth:`Searcher.evaluate_many`); re-running with the same recorder skips what is recorded and
reproduces the same result, because the draws of a round are made before anything in it is evaluated
(random, policy) or depend only on recorded scores (TPE).
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict

import numpy as np
from torch import nn

from common.decompose.surgery import LayerPlan, SpectraCache, list_conv_layers, plan_to_dict
from common.dist import shard_map
from common.progress import Estimate, progress_bar
from common.search.methods import SEARCHES, rule_plan
from common.search.options import SEARCHING, SearchConfig, SearchResult, check_method, check_metric, check_target
from common.search.pick import pick
from common.search.policy import Profile, policy_pdf, sensitivity_profile
from common.search.proxy import ProxyEvaluator
from common.search.recorder import MemoryRecorder, Recorder
from common.search.rules import evbmf_base
from common.search.space import SearchSpace, check_reachable, energy_shaper

__all__ = ["Searcher", "build_searcher"]


class Searcher:
    """Runs the rank-selection methods on one model at one budget.

    It holds what the methods share: the recorded evaluation of plans (:meth:`evaluate_many`: read back
    when the recorder has them, else scored and recorded), the dense score, the sensitivity profile and
    the policy pdf, and the per-layer choices ``choices`` (``config.choices()``). :meth:`run` runs a
    rule-based method or a search (:mod:`common.search.methods`, functions of the searcher) and picks
    among the search's candidates (:func:`common.search.pick.pick`).

    Args:
        space: the :class:`common.search.space.SearchSpace`.
        evaluator: a :class:`common.search.proxy.ProxyEvaluator` (or anything with its ``proxy`` name,
            ``score(plan)`` and ``val_top1(plan)``).
        spectra: kernel spectra of the dense model (energy, VBMF and the energy shape read them).
        recorder: where sensitivity points and candidates are written and looked up (resume).
        config: :class:`common.search.options.SearchConfig`.
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
        self._estimate = Estimate("", 0, "plan", None)
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
    def evaluate(self, plan: Mapping[str, LayerPlan], kind: str, key: dict, extra: dict | None = None) -> float:
        """The score of ``plan`` (val top-1 for ``rerank`` records), from the recorder if this ``key``
        was already evaluated."""
        return self.evaluate_many([(plan, kind, key, extra)])[0]

    def evaluate_many(
        self,
        items: Sequence[tuple[Mapping[str, LayerPlan], str, dict, dict | None]],
        on_done: Callable[[int, float], None] | None = None,
    ) -> list[float]:
        """:meth:`evaluate` of each ``(plan, kind, key, extra)``; what the recorder lacks is scored
        over the ranks of a ``torchrun`` launch (:func:`common.dist.shard_map`) and recorded in index
        order. ``on_done(i, value)`` follows each item, in index order."""
        out: list[float | None] = [None] * len(items)
        todo = []
        for i, (plan, kind, key, _) in enumerate(items):
            out[i] = self._recorded(plan, kind, {**self.tag, **key})
            if out[i] is None:
                todo.append(i)
            else:
                self._estimate.skip()

        def record(j: int, value: float) -> None:
            i = todo[j]
            plan, kind, key, extra = items[i]
            self._record(plan, kind, {**self.tag, **key}, extra, value)
            out[i] = value
            self._estimate.step()

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
            self._dense_score = self.evaluate({}, "sensitivity", {"layer": "<dense>", "level": 1.0})
        return self._dense_score

    @contextlib.contextmanager
    def _bar_over(self, total: int, desc: str, unit: str) -> Iterator[None]:
        """A progress bar (when :attr:`bars`) counting the evaluations made inside the block, and the
        estimate of their time that :attr:`progress` gets once the first few were scored."""
        self._bar = progress_bar(total, desc if self.bars else None, "plan")
        self._estimate = Estimate(desc, total, unit, self.progress)
        try:
            yield
        finally:
            self._bar.close()
            self._bar = progress_bar(None, None)
            self._estimate = Estimate("", 0, unit, None)

    # -- sensitivity and the policy's pdf ----------------------------------------------------- #
    def sensitivity(self) -> Profile:
        """Each layer alone at each sensitivity level and shape: ``{name: {shape: [(f, score), ...]}}``
        (:func:`common.search.policy.sensitivity_profile`, every point recorded)."""
        if self._sensitivity is None:
            cfg = self.config
            n = 1 + len(self.space.layers) * len(cfg.shapes) * len(cfg.sensitivity_levels)
            with self._bar_over(n, f"sensitivity {self._tag_text()}".strip(), "point"):
                self.dense_score()
                self._sensitivity = sensitivity_profile(
                    self.space,
                    cfg.shapes,
                    cfg.sensitivity_levels,
                    lambda points, on_done: self.evaluate_many(
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

    def vbmf_base(self) -> tuple[dict, dict]:
        """The EVBMF ranks of :func:`common.search.rules.evbmf_base`, once per searcher, for every target."""
        if self._vbmf_base is None:
            self._vbmf_base = evbmf_base(self.space, self.spectra)
        return self._vbmf_base

    # -- running a method ------------------------------------------------------------------------ #
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
            search = SEARCHES[method]
            rerank = 0 if self.proxy == "top1" or self.config.rerank == 1 else self.config.rerank
            with self._bar_over(
                n_candidates + self.config.rescore + rerank,
                f"search {method} x{target:g} {self._tag_text()}".strip(),
                "candidate",
            ):
                hist, params = search(self, target, metric, n_candidates, seed)
                if not hist:
                    raise ValueError(f"{method}: no plan drawn reaches {target}x within ±{self.config.tol:.0%}")
                best, val, rescored = pick(self, method, target, hist)
            plan, score = best["plan"], best["score"]
            if rescored:
                params["rescore"] = rescored
        else:
            (plan, params), hist, val = rule_plan(self, method, target, metric), [], None
            score = self.evaluate(
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

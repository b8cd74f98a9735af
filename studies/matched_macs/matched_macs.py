"""Accuracy at matched MACs: each method's logged choice made again under a tight budget band.

A search accepts any plan within the run's ``budget_tol`` (±3 % by default) of the target factor, and a search that
scores candidates by how close they stay to the dense model prefers the band's generous edge (fewer MACs
removed): two methods' plans can differ by a few per cent in MACs at "the same" budget. This benchmark
narrows the band to ``--tol`` (default 0.5 %) after the fact, for every HT-2 plan a run log chose at
``--target`` that lies outside it (a plan inside it is what the method would choose again and keeps its
logged number), each method by its own means (``--match reselect``, the default):

- a search method (``policy``, ``policy_seeded``, ``tpe``, ``random``: more than one logged candidate)
  chooses again among its own logged candidates that lie within the band, by its own rule
  (:func:`common.search.pick.pick`: the run's proxy scores, then val top-1 among the ``rerank`` best;
  re-ranks the run logged are read back, the others measured exactly as the run measured them, on a
  searcher rebuilt from the log's ``config`` whose dense proxy score must equal the logged one, and kept
  in a log beside the CSV, ``<out>.measured.log``, so a resumed replay reads them back too);
- a rule method (``uniform``, ``energy``, ``vbmf``) is moved by :func:`common.search.space.repair_plan`, the
  package's one budget repair, which is how the searcher finishes rule plans onto the budget.

``--match move`` moves every plan with ``repair_plan`` instead: one greedy move cuts wherever the factor
lands closest, not where it hurts least, and measured on ResNet18 at 5× it cost one TPE plan 1.4 pp, so it
judges the move more than the method (kept to reproduce the first pass, reported in the README).

The chosen plan is evaluated exactly as the run's ``final`` records were (:func:`common.search.proxy.final_model`:
exact BN recalibration on the run's ``final_calib_images`` augmented train images drawn with the plan's
seed; top-1 on the whole test split, :func:`common.run.measure.evaluate_splits`); ``--reevaluate-all``
measures the unchanged plans again too, which is how the test suite checks that these numbers are the
run's. Per (method, seed) it prints the factor and test top-1 before and after, per method the mean over
seeds, and the policy's paired margin over each rival as logged and at matched MACs with 95 % intervals
(:func:`common.analysis.rival_margins`, the summary's own margins). One CSV row per plan is appended as it
is measured (``<results dir>/matched_macs_<model>.csv`` by default), so an interrupted run resumes; a
stored row for another plan or setting is an error naming it.

    python studies/matched_macs/matched_macs.py --log results/cpu-mse/logs/resnet18/results-resnet18-cpu.log --target 5
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import pandas as pd
import torch

from common.analysis import POLICY_METHODS, rival_margins
from common.data.splits import DatasetSplits
from common.decompose.surgery import LayerPlan, SpectraCache, list_conv_layers, plan_from_dict, plan_to_dict
from common.deploy.latency import cpu_name
from common.files import append_csv_rows, keyed_csv_rows
from common.run.cli import add_config_options
from common.run.config import search_config
from common.run.logs import RunLog, final_records, plan_records
from common.run.measure import evaluate_splits
from common.search.pick import pick
from common.search.proxy import final_model
from common.search.recorder import MemoryRecorder
from common.search.searcher import Searcher, build_searcher
from common.search.space import SearchSpace, repair_plan
from studies.replay import add_logged_input_args, checked_dense_score, logged_inputs, logged_run

MATCHES = ("reselect", "move")
FIELDS = [
    "run_id",
    "model",
    "method",
    "seed",
    "target",
    "tol",
    "match",
    "how",
    "factor_logged",
    "factor_matched",
    "steps",
    "pick_index",
    "test_top1_logged",
    "test_top1_matched",
    "reevaluated",
    "calib_images",
    "seconds",
    "plan_json",
]
"""CSV columns. ``how``: ``within`` (the logged plan meets the band: kept), ``moved`` (``repair_plan``,
``steps`` single-rank moves) or ``reselected`` (the search's own pick among its candidates within the band:
``pick_index``)."""


def _candidates(records: Sequence[dict], method: str, seed: int, target: float) -> list[dict]:
    """The logged HT-2 ``candidate`` records of one search, the latest per index, in index order."""
    latest = {
        int(r["index"]): r
        for r in records
        if r.get("kind") == "candidate"
        and r.get("decomposition", "ht2") == "ht2"
        and r.get("method") == method
        and int(r.get("seed", 0)) == seed
        and float(r["target"]) == target
    }
    return [latest[i] for i in sorted(latest)]


MEASURED = ("rerank", "rescore")
"""Record kinds a rebuilt searcher measures when it picks again (val top-1 of the best, re-scores)."""


class _Kept(MemoryRecorder):
    """A rebuilt searcher's recorder: it reads back ``items`` (the run's records, then what earlier replays
    measured) and writes what it measures now to ``measured`` too, marked ``of_run``, so that an interrupted or
    repeated replay never measures a re-rank twice."""

    def __init__(self, items: Sequence[dict], measured: RunLog, of_run: str):
        super().__init__()
        self.items, self.measured, self.of_run = list(items), measured, of_run

    def write(self, kind: str, text: str = "", **payload) -> dict:
        rec = self.measured.write(kind, text, **payload, of_run=self.of_run)
        self.items.append(rec)
        return rec


class _Searchers:
    """One searcher per seed, rebuilt from the run's ``config`` record and fed the run's own records and the
    measurements of earlier replays kept in ``measured_path`` (so that no re-rank is measured again), built
    when first needed."""

    def __init__(
        self,
        model: torch.nn.Module,
        data: DatasetSplits,
        cfg: dict,
        records: Sequence[dict],
        spectra: SpectraCache,
        measured_path: Path,
    ):
        self.model, self.data, self.cfg, self.records, self.spectra = model, data, cfg, records, spectra
        self.measured_path, self.measured = measured_path, None
        self.by_seed: dict[int, Searcher] = {}

    def __call__(self, seed: int) -> Searcher:
        if seed in self.by_seed:
            return self.by_seed[seed]
        cfg = self.cfg
        if self.measured is None:  # opened (created) only once a search picks again
            self.measured = RunLog.at(self.measured_path, cfg["model"], "matched_macs")
        run_id = str(cfg.get("run_id", ""))

        def mine(r: dict) -> bool:
            return r.get("decomposition", "ht2") == "ht2" and int(r.get("seed", 0)) == seed

        kept = [r for r in self.records if r.get("kind") in ("candidate", *MEASURED) and mine(r)]
        kept += [r for r in self.measured.records() if r.get("of_run") == run_id and r["kind"] in MEASURED and mine(r)]
        recorder = _Kept(kept, self.measured, run_id)
        s = build_searcher(
            self.model,
            self.data,
            proxy=cfg["proxy"],
            calib_images=cfg["calib_images"],
            val_images=cfg.get("val_images"),
            seed=seed,
            multiple=cfg.get("rank_multiple", 8),
            recorder=recorder,
            config=search_config(cfg),
            spectra=self.spectra,
            tag={"decomposition": "ht2", "seed": seed},
            channels_last=True,
        )
        checked_dense_score(s, self.records, seed)
        self.by_seed[seed] = s
        return s


def _reselect(
    searcher: Searcher, cands: Sequence[dict], method: str, target: float, tol: float
) -> tuple[dict[str, LayerPlan], int] | None:
    """The search's own pick among its logged candidates within ``tol`` of ``target``: (plan, index), or None
    when none is."""
    hist = [
        {
            "index": int(c["index"]),
            "round": c.get("round", 0),
            "score": float(c["score"]),
            "plan": plan_from_dict(c["plan"]),
        }
        for c in cands
        if abs(float(c["macs_factor"]) / target - 1) <= tol
    ]
    if not hist:
        return None
    best, _, _ = pick(searcher, method, target, hist)
    return best["plan"], best["index"]


def margins_table(rows: Sequence[dict]) -> pd.DataFrame:
    """The policy's paired margin over each rival, as logged and at matched MACs: pp, 95 % interval,
    seed count and verdict each, from :func:`common.analysis.rival_margins`.

    Args:
        rows: this script's rows (:data:`FIELDS`), one model, target and match.

    Returns:
        One row per (policy, rival) that both ran.
    """
    df = pd.DataFrame(rows)
    base = df.assign(decomposition="ht2", seed=df["seed"].astype(int), target=df["target"].astype(float))
    out = None
    for name in ("logged", "matched"):
        m = rival_margins(base.assign(test_top1_bn=base[f"test_top1_{name}"].astype(float)))
        m = m[["policy", "rival", "margin_bn", "ci_low_bn", "ci_high_bn", "n_bn", "verdict_bn"]]
        m = m.rename(columns={c: c.replace("_bn", f"_{name}") for c in m.columns})
        out = m if out is None else out.merge(m, on=["policy", "rival"])
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="a run log with plan and final records (common.run.experiment)")
    p.add_argument("--target", type=float, default=3.0)
    p.add_argument("--tol", type=float, default=0.005, help="relative distance of the factor to the target")
    p.add_argument("--match", default="reselect", choices=MATCHES, help="how a search method meets the band")
    p.add_argument("--seeds", help="comma-separated; default every seed with a final at the target")
    p.add_argument("--methods", help="comma-separated; default every method with a final at the target")
    p.add_argument("--reevaluate-all", action="store_true", help="also evaluate plans already within --tol")
    add_logged_input_args(p)
    p.add_argument("--out", help="CSV (resumable); default <results dir>/matched_macs_<model>.csv")
    add_config_options(p, ["threads"], defaults={"threads": 2})
    return p.parse_args(argv)


def _wanted(a: argparse.Namespace, log: Path, finals: dict, plans: dict) -> list[tuple[str, int]]:
    """The (method, seed) of every HT-2 final with a plan at ``--target`` that ``--methods`` and ``--seeds``
    select."""
    methods = a.methods.split(",") if a.methods else None
    seeds = {int(s) for s in a.seeds.split(",")} if a.seeds else None
    wanted = [
        (m, s)
        for (m, s) in finals
        if (methods is None or m in methods) and (seeds is None or s in seeds) and (m, s, a.target) in plans
    ]
    if not wanted:
        raise SystemExit(f"{log}: no HT-2 final with a plan at target {a.target:g} for these methods and seeds")
    return wanted


@dataclass
class _Replay:
    """What every plan's match reads: the options, the run's records and its inputs rebuilt here."""

    a: argparse.Namespace
    log: Path
    out: Path
    records: Sequence[dict]
    model_name: str
    metric: str
    model: torch.nn.Module
    data: DatasetSplits
    spectra: SpectraCache
    space: SearchSpace
    searchers: _Searchers
    calib: int  # BN-calibration images of each final model


def _replay(a: argparse.Namespace, log: Path, out: Path, records: Sequence[dict], cfg: dict) -> _Replay:
    """The run's inputs rebuilt from its ``config`` record (model, data, spectra, search space, searchers);
    ``out``: the CSV (the searchers' measurements are kept beside it)."""
    model, data = logged_inputs(cfg, a.data_root, a.checkpoint)
    space = SearchSpace(
        list_conv_layers(model, (1, 3, data.image_size, data.image_size)), "ht2", multiple=cfg.get("rank_multiple", 8)
    )
    spectra = SpectraCache(model)
    searchers = _Searchers(model, data, cfg, records, spectra, out.with_name(out.stem + ".measured.log"))
    calib = int(cfg.get("final_calib_images", 4096))
    metric = cfg.get("metric", "macs")
    return _Replay(a, log, out, records, cfg["model"], metric, model, data, spectra, space, searchers, calib)


def _match(r: _Replay, method: str, seed: int, plan: dict[str, LayerPlan], factor: float) -> tuple:
    """``plan`` (at ``factor``) within ``--tol`` of the target: ``(plan, steps, pick index, how)``, ``how`` one
    of ``within`` (kept), ``reselected`` (the search's own pick among its candidates in the band) or
    ``moved`` (:func:`common.search.space.repair_plan`)."""
    a = r.a
    if abs(factor / a.target - 1) <= a.tol:
        return plan, 0, "", "within"
    cands = _candidates(r.records, method, seed, a.target)
    picked = None
    if a.match == "reselect" and len(cands) > 1:
        picked = _reselect(r.searchers(seed), cands, method, a.target, a.tol)
        if picked is None:
            print(f"warning: {method} seed {seed}: no candidate within {a.tol:.1%}; moved", file=sys.stderr)
    if picked is not None:
        return picked[0], 0, picked[1], "reselected"
    matched, steps = repair_plan(r.space, plan, a.target, r.metric, a.tol)
    return matched, steps, "", "moved"


def _stored(r: _Replay, done: dict, method: str, seed: int, plan_json: str) -> dict | None:
    """The stored row of (method, seed) to keep, if any; raises if it is another plan's or tolerance's."""
    a = r.a
    stored = done.get((method, seed, a.target, a.match))
    if stored is None:
        return None
    if stored["plan_json"] != plan_json or float(stored["tol"]) != a.tol:
        raise SystemExit(f"{r.out}: the stored row ({method}, seed {seed}, {a.match}) is for another plan or --tol")
    return None if a.reevaluate_all and stored["reevaluated"] != "True" else stored


def _plan_row(r: _Replay, method: str, seed: int, final: dict, plan: dict[str, LayerPlan], done: dict) -> dict:
    """The row of one (method, seed): the stored one when it is this plan's, else the plan matched to the band
    and evaluated as the run evaluated its finals, appended to the CSV and printed."""
    a = r.a
    logged_factor = r.space.factor(plan, r.metric)
    if abs(logged_factor / float(final["macs_factor"]) - 1) > 1e-6:
        raise SystemExit(
            f"{r.log}: {method} seed {seed}: the rebuilt space gives factor {logged_factor:.4f}, "
            f"the final record {float(final['macs_factor']):.4f}; not the run's layers"
        )
    t0 = time.perf_counter()
    matched, steps, index, how = _match(r, method, seed, plan, logged_factor)
    factor = r.space.factor(matched, r.metric)
    plan_json = json.dumps(plan_to_dict(matched), sort_keys=True)
    stored = _stored(r, done, method, seed, plan_json)
    if stored is not None:
        return stored
    if abs(factor / a.target - 1) > a.tol:
        print(f"warning: {method} seed {seed}: the repair stopped at x{factor:.4f}", file=sys.stderr)
    reevaluate = how != "within" or a.reevaluate_all
    if reevaluate:
        device = torch.device("cpu")
        comp = final_model(r.model, matched, r.spectra, r.data, r.calib, seed, device)
        acc = evaluate_splits(comp, r.data, device, splits=("test",))["test"]["top1"]
    else:
        acc = float(final["test_top1_bn"])
    row = {
        "run_id": final.get("run_id", ""),
        "model": r.model_name,
        "method": method,
        "seed": seed,
        "target": a.target,
        "tol": a.tol,
        "match": a.match,
        "how": how,
        "factor_logged": f"{logged_factor:.6f}",
        "factor_matched": f"{factor:.6f}",
        "steps": steps,
        "pick_index": index,
        "test_top1_logged": f"{float(final['test_top1_bn']):.6f}",
        "test_top1_matched": f"{acc:.6f}",
        "reevaluated": str(reevaluate),
        "calib_images": r.calib,
        "seconds": f"{time.perf_counter() - t0:.1f}",
        "plan_json": plan_json,
    }
    append_csv_rows(r.out, [row], FIELDS)
    what = {"within": "within tol: logged", "moved": f"{steps} moves", "reselected": f"candidate #{index}"}[how]
    print(
        f"{method:<14s} seed {seed}: x{logged_factor:.3f} -> x{factor:.3f} ({what}), test "
        f"{100 * float(row['test_top1_logged']):.2f} -> {100 * acc:.2f} %",
        flush=True,
    )
    return row


def main(argv: Sequence[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = Path(a.log)
    records, cfg = logged_run(log)
    band = search_config(cfg).tol
    if not 0 < a.tol < band:
        raise SystemExit(f"--tol {a.tol}: must be in (0, {band}), tighter than the run's band (budget_tol)")
    finals = {(m, s): r for (m, s, t), r in final_records(records).items() if t == a.target}
    plans = plan_records(records)
    wanted = _wanted(a, log, finals, plans)
    home = log.parents[2] if log.parent.parent.name == "logs" else log.parent
    out = Path(a.out) if a.out else home / f"matched_macs_{cfg['model']}.csv"
    done = keyed_csv_rows(out, lambda row: (row["method"], int(row["seed"]), float(row["target"]), row["match"]))
    r = _replay(a, log, out, records, cfg)
    print(
        f"# {r.model_name} x{a.target:g}: plans outside {a.tol:.1%} of the target chosen again ({a.match}); "
        f"{cpu_name()}, {a.threads} threads"
    )
    rows = []
    for method, seed in wanted:
        final, prec = finals[method, seed], plans[method, seed, a.target]
        rows.append(_plan_row(r, method, seed, final, plan_from_dict(prec["plan"]), done))
    _print_tables(rows)
    return rows


def _print_tables(rows: Sequence[dict]) -> None:
    df = pd.DataFrame(rows)
    for c in ("factor_logged", "factor_matched", "test_top1_logged", "test_top1_matched"):
        df[c] = df[c].astype(float)
    print("\n| method | seeds | factor logged | test logged | factor matched | test matched | change (pp) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for method, g in df.groupby("method", sort=False):
        print(
            f"| {method} | {len(g)} | {g.factor_logged.mean():.3f} | {100 * g.test_top1_logged.mean():.2f} | "
            f"{g.factor_matched.mean():.3f} | {100 * g.test_top1_matched.mean():.2f} | "
            f"{100 * (g.test_top1_matched - g.test_top1_logged).mean():+.2f} |"
        )
    if not df["method"].isin(POLICY_METHODS).any():
        return
    print("\n| policy − rival | as logged, pp [95 % CI] | verdict | matched MACs, pp [95 % CI] | verdict |")
    print("|---|---:|---|---:|---|")
    for r in margins_table(rows).to_dict("records"):
        cells = [
            f"{r[f'margin_{k}']:+.2f} [{r[f'ci_low_{k}']:+.2f}, {r[f'ci_high_{k}']:+.2f}] | {r[f'verdict_{k}']}"
            for k in ("logged", "matched")
        ]
        print(f"| {r['policy']} − {r['rival']} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()

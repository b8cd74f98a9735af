"""Is a plan's proxy loss the sum of its layers' losses? The policy's model, measured (a benchmark).

The policy (:mod:`common.search.policy`) rates a plan by the sum of its layers' *sensitivity drops*: the score
each layer loses when it alone is compressed. This script measures that assumption on the HT-2 plans a
logged run chose. For every seed of the run it rebuilds the run's proxy (model and checkpoint, data,
proxy, calibration images and seed, all read from the log's ``config`` record; the rebuilt proxy must
reproduce the run's logged dense score) and, for each method's chosen plan (the log's ``plan``
records) plus the **model optimum** (the choices with the least total drop under the budget,
:func:`common.search.methods.model_optimum` over the drops the policy logged, projected onto the budget as
the search projects its draws), it measures

- ``joint``: the dense model's score minus the plan's score (the loss the proxy sees),
- ``sum_alone``: the sum over the plan's compressed layers of the dense score minus the score of that
  layer alone compressed as in the plan (the loss the additive model sees, measured, not interpolated),
- ``ratio`` = joint / sum_alone (1 = additive; > 1: the layers' losses compound),
- ``model_sum``: for the model optimum, the sum of the policy's interpolated drops at its choices.

It prints one table per seed and the mean over seeds, and appends one CSV row per (seed, plan) as
each is measured, so an interrupted run resumes where it stopped (a stored row whose plan differs is
an error). The scores of single layers are cached, so plans that share a layer's ranks share its cost.

    python studies/additivity/additivity.py --log results/cpu-mse/logs/resnet18/results-resnet18-cpu.log --threads 2
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import numpy as np
import torch

from common.decompose.surgery import LayerPlan, plan_from_dict, plan_to_dict
from common.deploy.latency import cpu_name
from common.files import append_csv_rows, keyed_csv_rows
from common.run.cli import add_config_options
from common.run.config import search_config
from common.run.logs import plan_records
from common.search.methods import model_optimum
from common.search.searcher import build_searcher
from common.search.space import plan_key
from studies.replay import add_logged_input_args, checked_dense_score, logged_inputs, logged_run

OPTIMUM = "model_optimum"
FIELDS = ["seed", "plan", "joint", "sum_alone", "ratio", "model_sum", "compressed_layers", "plan_json"]


def _config(log: Path) -> tuple[list[dict], dict]:
    recs, cfg = logged_run(log)
    if cfg.get("proxy") not in ("logit_mse", "kl"):
        raise SystemExit(f"{log}: proxy {cfg.get('proxy')!r} is not a label-free divergence; nothing to add up")
    return recs, cfg


def _plans(recs: Sequence[dict], seed: int, target: float, methods: Sequence[str] | None) -> dict[str, dict]:
    # HT-2 only: a Tucker-2 policy row is another search space
    return {
        m: r
        for (m, s, t), r in plan_records(recs).items()
        if s == seed and t == target and (methods is None or m in methods)
    }


def _optimum(searcher, policy_rec: dict, target: float, metric: str) -> tuple[dict, float]:
    """The policy model's own best plan from the drops and choices its ``plan`` record logged."""
    info = policy_rec["params"]["pdf"]
    choices = [(float(f), s) for f, s in info["choices"]]
    if choices != list(searcher.choices):
        raise SystemExit(f"the logged policy choices {choices} are not the rebuilt search's {searcher.choices}")
    plan, _, drop, ok = model_optimum(searcher, target, metric, drops=np.array(info["drops"], dtype=float))
    if not ok:
        raise SystemExit("the model optimum cannot be projected onto the budget")
    return plan, drop


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="a run log with policy rows (common.run.experiment)")
    p.add_argument("--target", type=float, default=3.0)
    p.add_argument("--seeds", help="comma-separated; default every seed the log has a policy plan for")
    p.add_argument("--methods", help="comma-separated; default every method the log has a plan for")
    add_logged_input_args(p)
    p.add_argument(
        "--out",
        help="CSV (resumable); default <results dir>/additivity_<model>.csv for <results dir>/logs/<model>/*.log",
    )
    add_config_options(p, ["threads"], defaults={"threads": 2})
    return p.parse_args(argv)


def _seeds(a: argparse.Namespace, recs: Sequence[dict], log: Path) -> list[int]:
    """``--seeds``, else every seed the log has a policy plan for at the target."""
    seeds = (
        [int(s) for s in a.seeds.split(",")]
        if a.seeds
        else sorted({s for (m, s, t) in plan_records(recs) if m == "policy" and t == a.target})
    )
    if not seeds:
        raise SystemExit(f"{log}: no policy plan at target {a.target:g}")
    return seeds


def _seed_plans(s, recs: Sequence[dict], seed: int, a: argparse.Namespace, metric: str) -> tuple[dict, dict]:
    """The plans of one seed to measure (the chosen ones of ``--methods``, then the model optimum) and the
    policy model's own sum of drops for the optimum."""
    methods = a.methods.split(",") if a.methods else None
    plans = {m: plan_from_dict(r["plan"]) for m, r in _plans(recs, seed, a.target, methods).items()}
    model_sums: dict[str, float] = {}
    policy_rec = _plans(recs, seed, a.target, ["policy"]).get("policy")
    if policy_rec is not None and "pdf" in policy_rec.get("params", {}):
        plans[OPTIMUM], model_sums[OPTIMUM] = _optimum(s, policy_rec, a.target, metric)
    return plans, model_sums


def _measured(s, seed: int, name: str, plan: dict, dense: float, model_sum: float | None, alone: dict) -> dict:
    """The CSV row of one plan: its joint loss and the sum of its layers' losses alone (``alone``: the
    scores of single layers, a cache shared by the seed's plans)."""
    joint = dense - s.evaluator.score(plan)
    total = 0.0
    for n, lp in plan.items():
        if lp.method == "dense":
            continue
        if (n, lp) not in alone:
            alone[n, lp] = dense - s.evaluator.score({n: lp})
        total += alone[n, lp]
    return {
        "seed": seed,
        "plan": name,
        "joint": f"{joint:.6g}",
        "sum_alone": f"{total:.6g}",
        "ratio": f"{joint / total:.4g}" if total > 0 else "",
        "model_sum": f"{model_sum:.6g}" if model_sum is not None else "",
        "compressed_layers": sum(lp.method != "dense" for lp in plan.values()),
        "plan_json": json.dumps(plan_to_dict(plan), sort_keys=True),
    }


def _seed_rows(
    s, recs: Sequence[dict], seed: int, dense: float, a: argparse.Namespace, metric: str, done: dict, out: Path
) -> list[dict]:
    """One seed's rows (``s``: its searcher, ``dense``: its dense score): stored ones read back from ``done``
    (their plan must be this run's), the others measured and appended to ``out`` as each is."""
    plans, model_sums = _seed_plans(s, recs, seed, a, metric)
    alone: dict[tuple[str, LayerPlan], float] = {}
    seen: dict[tuple, dict] = {}
    rows = []
    for name, plan in plans.items():
        if (seed, name) in done:
            row = done[seed, name]
            if row["plan_json"] != json.dumps(plan_to_dict(plan), sort_keys=True):
                raise SystemExit(f"{out}: the stored row (seed {seed}, {name}) is for another plan; move the file away")
            rows.append(row)
            continue
        key = plan_key(plan)
        if key in seen:  # e.g. policy_seeded picking the energy plan: measured once
            row = {**seen[key], "plan": name, "model_sum": model_sums.get(name, "")}
        else:
            row = seen[key] = _measured(s, seed, name, plan, dense, model_sums.get(name), alone)
        append_csv_rows(out, [row], FIELDS)
        rows.append(row)
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = Path(a.log)
    recs, cfg = _config(log)
    model_name, metric = cfg["model"], cfg.get("metric", "macs")
    # a run_results log lives in <results dir>/logs/<model>/: the CSV goes to <results dir>
    home = log.parents[2] if log.parent.parent.name == "logs" else log.parent
    out = Path(a.out) if a.out else home / f"additivity_{model_name}.csv"
    seeds = _seeds(a, recs, log)
    done = keyed_csv_rows(out, lambda row: (int(row["seed"]), row["plan"]))
    model, data = logged_inputs(cfg, a.data_root, a.checkpoint)
    search_cfg = search_config(cfg)
    print(
        f"# {model_name} x{a.target:g}, {cfg['proxy']} on {cfg['calib_images']} train images; {cpu_name()}, {a.threads} threads"
    )
    rows, spectra = [], None
    for seed in seeds:
        t0 = time.perf_counter()
        s = build_searcher(
            model,
            data,
            proxy=cfg["proxy"],
            calib_images=cfg["calib_images"],
            seed=seed,
            multiple=cfg.get("rank_multiple", 8),
            config=search_cfg,
            spectra=spectra,
            channels_last=True,
        )
        spectra = s.spectra
        dense = checked_dense_score(s, recs, seed)
        rows += _seed_rows(s, recs, seed, dense, a, metric, done, out)
        _print_table(
            [r for r in rows if int(r["seed"]) == seed],
            f"seed {seed} (dense score {dense:.5g}, {time.perf_counter() - t0:.0f} s)",
        )
    _print_mean(rows)
    return rows


def _print_table(rows: Sequence[dict], title: str) -> None:
    print(
        f"\n## {title}\n\n| plan | joint | Σ alone | joint / Σ alone | model's sum | compressed layers |\n|---|---:|---:|---:|---:|---:|"
    )
    for r in sorted(rows, key=lambda r: float(r["joint"])):
        print(
            f"| {r['plan']} | {float(r['joint']):.4f} | {float(r['sum_alone']):.4f} | {r['ratio']} | {r['model_sum'] or '—'} | {r['compressed_layers']} |"
        )


def _print_mean(rows: Sequence[dict]) -> None:
    names = list(dict.fromkeys(r["plan"] for r in rows))
    seeds = sorted({int(r["seed"]) for r in rows})
    print(
        f"\n## mean over seeds {', '.join(map(str, seeds))}\n\n| plan | joint | Σ alone | joint / Σ alone | seeds |\n|---|---:|---:|---:|---:|"
    )
    stats = []
    for n in names:
        rs = [r for r in rows if r["plan"] == n]
        j = np.array([float(r["joint"]) for r in rs])
        sa = np.array([float(r["sum_alone"]) for r in rs])
        stats.append((j.mean(), n, sa.mean(), (j / sa).mean(), len(rs)))
    for jm, n, sm, ratio, k in sorted(stats):
        print(f"| {n} | {jm:.4f} | {sm:.4f} | {ratio:.3f} | {k} |")


if __name__ == "__main__":
    main()

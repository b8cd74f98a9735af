"""Seeds and test images: the policy's margins with both sources of noise, from a run log's finals.

Every method of a run is scored on the same fixed test images, so the margins' 95 % intervals over seeds
(``policy_vs_rivals.csv``) answer whether other seeds would give the margin *on these images*. Whether it
would hold on other images from the same distribution depends on how many images the two models disagree
on, which accuracies alone do not say. Per policy and rival this prints and writes the paired margin with
the seed-only interval (:func:`common.analysis.paired_interval`, the summary's) and with the interval over
seeds and images (:func:`common.analysis.seed_image_interval`: the two as crossed random factors), and how
many test images the two models disagree on.

The hits come from the log where its ``final`` records carry them (``test_hits_bn`` / ``test_hits_ft``,
logged since 2026-12-06). For an older log the finals are rebuilt exactly as the run measured them
(:func:`common.search.proxy.final_model`: exact BN recalibration on the run's ``final_calib_images`` augmented
train images of the plan's seed; the whole test split, :func:`common.run.measure.evaluate_splits`), and
the re-measured top-1 must be the logged one. ``--stage ft`` then finetunes that model again with the
run's recipe and seed (:func:`common.run.finetune_stage.finetune_best`, the run's own function, the dense model
in the run's memory format). That is the run's model only where the finetuning is bit-reproducible
(the digits runs of the tests, at one thread, are); on this repository's 2-core CPU a replayed epoch of
AlexNet was not: 3 and 4 test images off the logged top-1 for two finals, 10 val images off for a third
(2026-12-07). So a finetuned replay is a *replica*: its val and test top-1 must lie within
:data:`TOLERANCE` of the logged ones and it must keep the same epoch, or the script stops naming the
final; the hits are the replica's (each difference is printed and kept in the record). Those
hits are appended as they are measured to a run log beside the CSV (``<results dir>/image_hits_<model>.log``,
one ``test_hits`` record per plan and stage), so an interrupted run resumes; a stored record for another
plan is an error naming it.

    python studies/image_noise/image_noise.py --log results/cpu-mse-tight/logs/resnet18/results-resnet18-cpu.log --target 2
"""

from __future__ import annotations

import argparse
import math
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import numpy as np
import pandas as pd
import torch

from common.analysis import (
    HITS_KIND,
    POLICY_METHODS,
    POLICY_RIVALS,
    REPLICA_TOLERANCE,
    SEED_IMAGE_COLUMNS,
    seed_image_margin,
)
from common.decompose.surgery import SpectraCache, plan_from_dict
from common.deploy.latency import cpu_name
from common.files import atomic_write
from common.run.cli import add_config_options, config_from_args
from common.run.finetune_stage import finetune_best
from common.run.jsonvalues import values_equal
from common.run.logs import (
    RunLog,
    final_records,
    pack_hits,
    plan_records,
    unpack_hits,
)
from common.run.measure import evaluate_splits
from common.run.preflight import PreflightError
from common.search.proxy import final_model
from studies.replay import add_logged_input_args, logged_inputs, logged_run

KIND = HITS_KIND
TOLERANCE = REPLICA_TOLERANCE
"""Largest difference between the re-measured and the logged top-1 (a fraction; val and test) accepted as
the run's model or its replica (:data:`common.analysis.REPLICA_TOLERANCE`, the one the analysis applies
when it reads the hits back). Any difference is printed and kept in the record."""

COLUMNS = ["model", "target", "stage", "policy", "rival", *SEED_IMAGE_COLUMNS]
"""CSV columns: the margin's key, then :data:`common.analysis.SEED_IMAGE_COLUMNS`."""


def margin_rows(hits: Mapping[tuple[str, int], np.ndarray], model: str, target: float, stage: str = "bn") -> list[dict]:
    """:data:`COLUMNS` rows for each policy method and each rival (in :data:`POLICY_RIVALS` order) with
    hits at a common seed.

    Args:
        hits: ``{(method, seed): per-image hits}``, every array on the same test images in the same order.
    """
    rows = []
    methods = {m for m, _ in hits}
    for policy in (p for p in POLICY_METHODS if p in methods):
        for rival in (r for r in POLICY_RIVALS if r in methods):
            seeds = sorted({s for m, s in hits if m == policy} & {s for m, s in hits if m == rival})
            if not seeds:
                continue
            d = np.stack([hits[policy, s].astype(np.int8) - hits[rival, s].astype(np.int8) for s in seeds])
            key = {"model": model, "target": target, "stage": stage, "policy": policy, "rival": rival}
            rows.append(key | seed_image_margin(d))
    return rows


class _Remeasure:
    """The hits of finals whose log lacks them, rebuilt as the run measured them and kept in the hits log
    ``out`` (read back first, so nothing is measured twice); the model and data are loaded when first needed.

    The BN stage is the run's :func:`~common.search.proxy.final_model`; the finetuned stage finetunes that model
    again with the run's recipe and seed (:func:`common.run.finetune_stage.finetune_best`, the function the run
    used): a replica of the run's model unless the finetuning is bit-reproducible, so its val and test
    top-1 must lie within :data:`TOLERANCE` of the logged ones and its kept epoch be the run's."""

    def __init__(self, cfg: dict, args: argparse.Namespace, out: Path, run_id: str):
        self.cfg, self.args, self.out, self.run_id = cfg, args, out, run_id
        self.log: RunLog | None = None
        self.stored: dict[tuple[str, int, float, str], dict] = {}
        self.loaded: tuple | None = None

    def _stored(self, method: str, seed: int, target: float, stage: str, plan: dict) -> np.ndarray | None:
        if self.log is None:
            self.log = RunLog.at(self.out, self.cfg["model"], "image_noise")
            self.stored = {
                (str(r["method"]), int(r["seed"]), float(r["target"]), str(r.get("stage", "bn"))): r
                for r in self.log.records()
                if r.get("kind") == KIND and r.get("of_run") == self.run_id
            }
        rec = self.stored.get((method, seed, target, stage))
        if rec is None:
            return None
        if not values_equal(rec["plan"], plan):
            raise SystemExit(
                f"{self.out}: the stored {KIND} of {method} seed {seed} x{target:g} ({stage}) is for another plan"
            )
        return unpack_hits(rec["hits"], int(rec["n"]))

    def _inputs(self) -> tuple:
        if self.loaded is None:
            try:
                model, data = logged_inputs(self.cfg, self.args.data_root, self.args.checkpoint)
            except (PreflightError, FileNotFoundError) as e:
                raise SystemExit(
                    f"{e} (a log from another machine: --checkpoint and --data-root name this one's)"
                ) from None
            # As every run had it when its finals ran: build_searcher evaluates the dense model with
            # channels_last=True, which converts it in place (the teacher's and the uncompressed layers' format).
            model.to(memory_format=torch.channels_last)
            self.loaded = model, data, SpectraCache(model)
        return self.loaded

    def _check(self, what: str, measured: float, logged: float) -> None:
        if abs(measured - logged) > TOLERANCE:
            raise SystemExit(
                f"{self.args.log}: {what}: re-measured {measured:.4f} is not the logged {logged:.4f}; not the "
                "run's model (checkpoint, data, code or a nondeterministic finetuning differ)"
            )

    def _write(self, stage: str, method: str, seed: int, target: float, plan: dict, ev: dict, **extra) -> np.ndarray:
        text = f"{method} x{target:g} s{seed} {stage}: test {ev['top1']:.4f} (logged {extra['test_top1_logged']:.4f})"
        rec = self.log.write(
            KIND,
            text,
            of_run=self.run_id,
            method=method,
            seed=seed,
            target=target,
            stage=stage,
            n=ev["n"],
            test_top1=ev["top1"],
            **extra,
            plan=plan,
            hits=pack_hits(ev["correct"]),
        )
        self.stored[method, seed, target, stage] = rec
        return unpack_hits(rec["hits"], int(rec["n"]))

    def __call__(self, method: str, seed: int, target: float, stage: str, prec: dict, final: dict) -> np.ndarray:
        plan = prec["plan"]
        hits = self._stored(method, seed, target, stage, plan)
        if hits is not None:
            return hits
        model, data, spectra = self._inputs()
        calib = int(self.cfg.get("final_calib_images", 4096))
        label = f"{method} seed {seed} x{target:g}"
        t0 = time.perf_counter()
        device = torch.device("cpu")
        comp = final_model(model, plan_from_dict(plan), spectra, data, calib, seed, device)
        splits = ("val", "test") if stage == "ft" else ("test",)
        ev = evaluate_splits(comp, data, device, splits=splits, per_image=True)
        self._check(f"{label} test top-1 (BN)", ev["test"]["top1"], float(final["test_top1_bn"]))
        bn = self._stored(method, seed, target, "bn", plan)
        if bn is None:
            bn = self._write(
                "bn",
                method,
                seed,
                target,
                plan,
                ev["test"],
                test_top1_logged=float(final["test_top1_bn"]),
                calib_images=calib,
                seconds=time.perf_counter() - t0,
            )
        if stage == "bn":
            return bn
        self._check(f"{label} val top-1 (BN)", ev["val"]["top1"], float(final["val_top1_bn"]))
        key = {"method": method, "target": target, "decomposition": "ht2", "seed": seed}
        # the logged config as the run had it; its deadline (a time box, no effect on results) has passed
        run_cfg = config_from_args(self.cfg, deadline=None, progress=False)
        t1 = time.perf_counter()
        ft = finetune_best(comp, model, data, run_cfg, key, ev["val"]["top1"], device)
        self._check(f"{label} val top-1 (FT)", ft["val_top1_ft"], float(final["val_top1_ft"]))
        self._check(f"{label} test top-1 (FT)", ft["test_top1_ft"], float(final["test_top1_ft"]))
        if float(ft["finetune_selected_epoch"]) != float(final.get("finetune_selected_epoch", -1)):
            raise SystemExit(
                f"{self.args.log}: {label}: the replayed finetuning keeps epoch {ft['finetune_selected_epoch']:g}, "
                f"the run kept {final.get('finetune_selected_epoch')}; not the run's model"
            )
        test_hits = unpack_hits(ft["test_hits_ft"], ev["test"]["n"])
        return self._write(
            "ft",
            method,
            seed,
            target,
            plan,
            {"n": test_hits.size, "top1": ft["test_top1_ft"], "correct": test_hits},
            test_top1_logged=float(final["test_top1_ft"]),
            val_top1=ft["val_top1_ft"],
            val_top1_logged=float(final["val_top1_ft"]),
            finetune_selected_epoch=ft["finetune_selected_epoch"],
            calib_images=calib,
            seconds=time.perf_counter() - t1,
        )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="a run log with plan and final records (common.run.experiment)")
    p.add_argument("--target", type=float, default=3.0)
    p.add_argument("--seeds", help="comma-separated; default every seed with a final at the target")
    p.add_argument("--methods", help="comma-separated; default every policy and rival with a final there")
    add_logged_input_args(p)
    p.add_argument("--out", help="the hits log (resumable); default <results dir>/image_hits_<model>.log")
    p.add_argument("--csv", help="the margins; default <results dir>/image_margins_<model>.csv")
    p.add_argument("--stage", default="bn", choices=("bn", "ft"), help="after BN recalibration or finetuning")
    add_config_options(p, ["threads"], defaults={"threads": 2})
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    log = Path(a.log)
    records, cfg = logged_run(log)
    model_name, run_id = cfg["model"], str(cfg.get("run_id", ""))
    home = log.parents[2] if log.parent.parent.name == "logs" else log.parent
    out = Path(a.out) if a.out else home / f"image_hits_{model_name}.log"
    csv_path = Path(a.csv) if a.csv else home / f"image_margins_{model_name}.csv"
    finals, plans = final_records(records), plan_records(records)
    methods = a.methods.split(",") if a.methods else [*POLICY_METHODS, *POLICY_RIVALS]
    seeds = {int(s) for s in a.seeds.split(",")} if a.seeds else None
    wanted = [
        (m, s)
        for (m, s, t) in finals
        if t == a.target and m in methods and (seeds is None or s in seeds) and (m, s, t) in plans
    ]
    if not wanted:
        raise SystemExit(f"{log}: no HT-2 final with a plan at target {a.target:g} for these methods and seeds")

    col = f"test_top1_{a.stage}"
    missing = [f"{m} seed {s}" for m, s in wanted if finals[m, s, a.target].get(col) is None]
    if missing:
        raise SystemExit(f"{log}: no {col} at x{a.target:g} for {', '.join(missing)} (not finetuned there?)")
    logged_hits = [k for k in wanted if finals[k[0], k[1], a.target].get(f"test_hits_{a.stage}") is not None]
    print(
        f"# {model_name} x{a.target:g} {a.stage.upper()}: test hits of {len(wanted)} finals "
        f"({len(logged_hits)} logged); {cpu_name()}, {a.threads} threads"
    )
    measure = _Remeasure(cfg, a, out, run_id)
    hits: dict[tuple[str, int], np.ndarray] = {}
    for method, seed in sorted(wanted, key=lambda k: (k[1], k[0])):
        final, prec = finals[method, seed, a.target], plans[method, seed, a.target]
        logged = float(final[col])
        if (method, seed) in logged_hits:
            h = unpack_hits(final[f"test_hits_{a.stage}"], int(final["test_images"]))
            if abs(h.mean() - logged) > 1e-12:
                raise SystemExit(
                    f"{log}: {method} seed {seed} x{a.target:g}: its test_hits_{a.stage} are not its {col}"
                )
        else:
            h = measure(method, seed, a.target, a.stage, prec, final)
        hits[method, seed] = h
        flag = "" if abs(h.mean() - logged) < 0.5 / h.size else f"  (logged {100 * logged:.2f}: differs)"
        print(f"{method:<14s} seed {seed}: test {100 * h.mean():.2f} %{flag}", flush=True)
    sizes = {h.size for h in hits.values()}
    if len(sizes) != 1:
        raise SystemExit(f"{out}: hits of different test splits ({sorted(sizes)} images)")
    rows = margin_rows(hits, model_name, a.target, a.stage)
    table = pd.DataFrame(rows, columns=COLUMNS)
    write_margins(csv_path, table)
    _print(table)
    return rows


def write_margins(path: Path, table: pd.DataFrame) -> None:
    """Write ``table`` to ``path`` in place of the rows of its (model, target, stage) there; the others stay."""
    if path.exists():
        old = pd.read_csv(path)
        keys = set(zip(table["model"], table["target"].astype(float), table["stage"]))
        keep = [(m, float(t), st) not in keys for m, t, st in zip(old["model"], old["target"], old["stage"])]
        table = pd.concat([old[keep], table], ignore_index=True).sort_values(
            ["model", "target", "stage"], kind="stable"
        )
    text = table.to_csv(index=False, float_format="%.4f")
    atomic_write(path, lambda fh: fh.write(text.encode()))


def _print(table: pd.DataFrame) -> None:
    print(
        "\n| policy − rival | seeds | margin (pp) | 95 % CI, seeds | verdict | 95 % CI, seeds and images | verdict |"
        " disagree | detectable | floor | images needed |"
    )
    print("|---|---:|---:|---:|---|---:|---|---:|---:|---:|---:|")
    for r in table.to_dict("records"):
        print(
            f"| {r['policy']} − {r['rival']} | {r['n_seeds']} | {r['margin']:+.2f} | "
            f"[{r['ci_low_seed']:+.2f}, {r['ci_high_seed']:+.2f}] | {r['verdict_seed']} | "
            f"[{r['ci_low_both']:+.2f}, {r['ci_high_both']:+.2f}] | {r['verdict_both']} | {r['disagree_pct']:.1f} % | "
            f"{r['detectable']:.2f} | {r['floor']:.2f} | {_count(r['images_needed'])} |"
        )


def _count(n: float) -> str:
    if math.isnan(n):
        return "— (no per-image part)"
    return "never (margin 0)" if math.isinf(n) else f"{n:,.0f}"


if __name__ == "__main__":
    main()

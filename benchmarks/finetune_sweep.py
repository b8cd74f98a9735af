"""Which finetuning recipe recovers the most of a compressed model, chosen on val (a benchmark, resumable).

For each model, the seed-``--seed`` plans of ``--methods`` at ``--target`` are read from a results run's
JSON documents (``jsonify_logs.py``), rebuilt as every run's final models are (exact BN recalibration on
``--final-calib-images`` augmented train images drawn with the plan's seed), and finetuned once per recipe
of the grid: learning rate × optimizer (SGD nesterov, AdamW) × gradient-norm clipping × balanced factors
(:func:`common.decompose.layers.balance_factors`), for ``--epochs`` epochs of distillation from the dense
model on ``--max-images`` train images (one-cycle schedule, batch ``--batch-size``, seed 0). Each row holds
the val top-1 before finetuning and after each epoch; a diverged recipe (a non-finite loss) is a recorded
outcome, not a crash. Test accuracy is never measured here: the recipe is chosen on val.

Rows are appended to ``<out>/finetune_sweep.csv`` as each recipe finishes; a re-run skips the rows present,
so an interrupted sweep resumes. ``<out>/finetune_sweep.md`` (per model, the recipes ranked by mean best
val over the plans) and ``<out>/finetune_sweep.png`` (best val against the learning rate) are rewritten
from the whole CSV.

    python benchmarks/finetune_sweep.py --json json/cpu-mse --models alexnet --methods policy,energy \\
        --epochs 1 --max-images 11250 --out results/finetune-sweep
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import platform
import sys
import time
from collections.abc import Sequence
from itertools import product
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import matplotlib.pyplot as plt
import pandas as pd
import torch

from common.analysis import latest_plans, load_runs, markdown_table
from common.data.datasets import load_dataset
from common.data.loader import make_loader
from common.decompose.layers import balance_factors
from common.decompose.surgery import SpectraCache, plan_from_dict
from common.deploy.latency import cpu_name
from common.files import append_csv_rows, read_csv_rows
from common.models import load_baseline
from common.search.proxy import final_model
from common.train.evaluate import evaluate
from common.train.finetune import FinetuneConfig, finetune

KEY = ("model", "method", "target", "seed", "lr", "optimizer", "clip", "balance", "epochs", "max_images")
COLUMNS = (*KEY, "val_bn", "val_best", "best_epoch", "val_epochs", "diverged", "seconds", "device", "date")
"""One row per (plan, recipe); ``val_epochs`` lists the val top-1 after each epoch (``;``-separated)."""


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="folder of a results run's JSON documents (jsonify_logs.py)")
    p.add_argument("--models", default="alexnet", help="comma-separated models of that run")
    p.add_argument("--methods", default="policy,energy", help="comma-separated methods whose plans are finetuned")
    p.add_argument("--target", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0, help="the plans of this run seed")
    p.add_argument("--lrs", default="5e-4,1e-3,2e-3,5e-3,1e-2,2e-2", help="peak learning rates of SGD")
    p.add_argument(
        "--adamw-lrs",
        default="5e-5,1e-4,2e-4,5e-4,1e-3,2e-3",
        help="peak learning rates of AdamW (its scale is 10x smaller)",
    )
    p.add_argument("--optimizers", default="sgd,adamw", help="sgd (nesterov) and/or adamw")
    p.add_argument("--clips", default="none,1", help="gradient-norm clips; none = off")
    p.add_argument("--balance", default="off,on", help="balanced factors before finetuning: off and/or on")
    p.add_argument("--epochs", type=float, default=1.0)
    p.add_argument("--max-images", type=int, default=None, help="train on a stratified subset of this many images")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--final-calib-images", type=int, default=4096)
    p.add_argument("--val-subset", type=int, default=None, help="evaluate val on a seeded subset of this size")
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", default="out/finetune-sweep")
    return p.parse_args(argv)


def recipes(a: argparse.Namespace) -> list[dict]:
    """The grid of recipes, in the order they run."""
    clips = [None if c.strip().lower() == "none" else float(c) for c in a.clips.split(",")]
    return [
        {"lr": lr, "optimizer": opt, "clip": clip, "balance": bal == "on"}
        for opt in a.optimizers.split(",")
        for lr, clip, bal in product(_floats(a.lrs if opt == "sgd" else a.adamw_lrs), clips, a.balance.split(","))
    ]


def _key(row: dict) -> tuple:
    return tuple(str(row[k]) for k in KEY)


def run_recipe(comp, dense, data, recipe: dict, a: argparse.Namespace, device: torch.device) -> dict:
    """Finetune a copy of ``comp`` with ``recipe``: val before, after each epoch, best, and divergence."""
    model = copy.deepcopy(comp)
    if recipe["balance"]:
        balance_factors(model)
    cfg = FinetuneConfig(
        a.epochs,
        batch_size=a.batch_size,
        lr=recipe["lr"],
        optimizer=recipe["optimizer"],
        clip_grad_norm=recipe["clip"],
        max_images=a.max_images,
        seed=0,
        hflip=data.hflip,
        val_subset=a.val_subset,
    )
    t = time.perf_counter()
    try:
        history = finetune(model, data, cfg, teacher=copy.deepcopy(dense), device=device, progress=False)
        vals, diverged = [float(r["val_top1"]) for r in history], False
    except FloatingPointError:  # a diverged recipe is an outcome of the sweep
        vals, diverged = [], True
    return {
        "val_epochs": ";".join(f"{v:.4f}" for v in vals),
        "diverged": diverged,
        "vals": vals,
        "seconds": time.perf_counter() - t,
    }


def sweep_plan(model: str, method: str, plan_rec: dict, a, done: set, csv: Path, device) -> None:
    """Every recipe of the grid not yet in the CSV for one plan, each row appended as it finishes."""
    todo = [r for r in recipes(a) if _key(_row_key(model, method, a, r)) not in done]
    if not todo:
        return
    data = load_dataset("cifar10-jpeg")
    dense = load_baseline(model).to(device).eval()
    comp = final_model(
        dense, plan_from_dict(plan_rec["plan"]), SpectraCache(dense), data, a.final_calib_images, a.seed, device
    )
    val_bn = evaluate(comp, make_loader(data, "val", 500, device=device), device)["top1"]
    for recipe in todo:
        out = run_recipe(comp, dense, data, recipe, a, device)
        vals = out.pop("vals")
        best = max(range(len(vals)), key=lambda i: vals[i]) if vals else None
        row = {
            **_row_key(model, method, a, recipe),
            "val_bn": f"{val_bn:.4f}",
            "val_best": f"{max(vals):.4f}" if vals else "",
            "best_epoch": "" if best is None else best + 1,
            **{k: out[k] for k in ("val_epochs", "diverged")},
            "seconds": f"{out['seconds']:.1f}",
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d"),
        }
        append_csv_rows(csv, [row], COLUMNS, lineterminator="\n")
        print(f"{model} {method} {recipe}: val {row['val_bn']} -> {row['val_best'] or 'diverged'} ({row['seconds']} s)")


def _row_key(model: str, method: str, a, recipe: dict) -> dict:
    return {
        "model": model,
        "method": method,
        "target": f"{a.target:g}",
        "seed": a.seed,
        "lr": f"{recipe['lr']:g}",
        "optimizer": recipe["optimizer"],
        "clip": "none" if recipe["clip"] is None else f"{recipe['clip']:g}",
        "balance": "on" if recipe["balance"] else "off",
        "epochs": f"{a.epochs:g}",
        "max_images": a.max_images if a.max_images is not None else "all",
    }


def ranking(df: pd.DataFrame) -> pd.DataFrame:
    """Per model and recipe: the mean over the plans of the best val top-1 (a diverged plan counts as
    0), how many plans diverged, and the mean gain over the BN model; best recipe first per model."""
    df = df.assign(
        val=pd.to_numeric(df["val_best"], errors="coerce").fillna(0.0),
        gain=pd.to_numeric(df["val_best"], errors="coerce") - pd.to_numeric(df["val_bn"], errors="coerce"),
        div=df["diverged"].astype(str).str.lower() == "true",
    )
    recipe = ["lr", "optimizer", "clip", "balance", "epochs", "max_images"]
    out = (
        df.groupby(["model", *recipe], sort=False)
        .agg(plans=("method", "count"), mean_val=("val", "mean"), gain_pp=("gain", "mean"), diverged=("div", "sum"))
        .reset_index()
    )
    out["gain_pp"] = 100 * out["gain_pp"]
    return out.sort_values(["model", "mean_val"], ascending=[True, False], kind="stable").reset_index(drop=True)


def plot(df: pd.DataFrame, path: Path) -> None:
    """Best val top-1 against the learning rate, one panel per model, a line per method × recipe family."""
    models = sorted(df["model"].unique())
    fig, axes = plt.subplots(1, len(models), figsize=(6 * len(models), 4.5), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = df[df["model"] == model]
        for (method, opt, clip, bal), g in sub.groupby(["method", "optimizer", "clip", "balance"]):
            g = g.assign(lr=g["lr"].astype(float)).sort_values("lr")
            y = 100 * pd.to_numeric(g["val_best"], errors="coerce")
            ax.plot(g["lr"], y, marker="o", label=f"{method}, {opt}, clip {clip}, balance {bal}")
            bn = 100 * pd.to_numeric(g["val_bn"], errors="coerce").iloc[0]
            ax.axhline(bn, color="gray", lw=0.5, ls=":")
        ax.set_xscale("log")
        ax.set_xlabel("peak learning rate")
        ax.set_ylabel("val top-1 after finetuning (%) (dotted: before)")
        ax.set_title(f"{model}: finetuning recipes (missing point: diverged)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(csv: Path, out: Path, command: str) -> None:
    """``finetune_sweep.md`` and ``.png`` from the whole CSV."""
    df = pd.DataFrame(read_csv_rows(csv))
    if df.empty:
        return
    ranked = ranking(df)
    plot(df, out / "finetune_sweep.png")
    lines = [
        "# Finetuning recipes, chosen on val",
        "",
        f"`{command}` on {platform.node() and cpu_name()} (rows: `finetune_sweep.csv`, with each row's device and date).",
        "",
        "Per model, recipes ranked by the mean over the plans of the best val top-1 (a diverged run counts "
        "0); `gain_pp`: mean val gain over the BN-recalibrated model, in pp.",
        "",
        markdown_table(ranked, list(ranked.columns), {"mean_val": ".4f", "gain_pp": "+.2f"}),
    ]
    (out / "finetune_sweep.md").write_text("\n".join(lines))


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = torch.device(
        "cuda" if a.device == "auto" and torch.cuda.is_available() else ("cpu" if a.device == "auto" else a.device)
    )
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / "finetune_sweep.csv"
    done = {_key(r) for r in read_csv_rows(csv)} if csv.exists() else set()
    runs = {r.get("model"): r for r in load_runs(a.json)}
    for model in a.models.split(","):
        if model not in runs:
            print(f"finetune_sweep: no run of {model} in {a.json}", file=sys.stderr)
            return 2
        plans = latest_plans(runs[model], {a.target}, {a.seed})
        for method in a.methods.split(","):
            rec = next((p for (m, d, *_), p in plans.items() if m == method and d == "ht2"), None)
            if rec is None:
                print(f"finetune_sweep: {model} has no {method} plan at {a.target:g}x seed {a.seed}", file=sys.stderr)
                return 2
            sweep_plan(model, method, rec, a, done, csv, device)
    report(csv, out, "python benchmarks/finetune_sweep.py " + " ".join(sys.argv[1:] if argv is None else argv))
    return 0


if __name__ == "__main__":
    sys.exit(main())

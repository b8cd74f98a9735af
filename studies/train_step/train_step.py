"""What a finetuning step of each chosen plan costs, and which factor convs it goes to.

Reads the JSON documents of results runs (``jsonify_logs.py``), rebuilds each compressed model from its
logged plan (``--seeds``, default 0) and times its distilled training step phase by phase
(:func:`studies.train_step.stepcost.time_train_step`: the dense model as teacher, the finetuning recipe's optimizer
and batch), next to the dense model's own step. ``--layers`` also times every stage conv of every
factorized layer alone, forward and backward (:func:`studies.train_step.stepcost.stage_times`), with its GMAC/s:
the shapes the convolution backend handles slowly stand out. Each row carries the ``finetune_seconds``
its run logged, so the in-situ cost (data loading and the evaluation included) sits beside the step.

Rows are appended to ``<out>/train_step_<device>.csv`` (and ``train_step_layers_<device>.csv``) as they
are measured; a re-run skips rows already there; ``<out>/train_step_<device>.md`` is rewritten from the
whole CSVs.

    python studies/train_step/train_step.py --json json/cpu-mse-tight-ft --out results/cpu-mse-tight-ft \\
        --models resnet18 --targets 5 --threads 2 --layers
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import pandas as pd
import torch

from common.analysis import latest_of, latest_plans, load_runs, markdown_table
from common.decompose.cost import count_model
from common.decompose.surgery import SpectraCache, apply_plan, plan_from_dict
from common.deploy.latency import cpu_name
from common.files import append_csv_rows
from common.models import baseline_or_random, input_size
from common.paths import CHECKPOINT_DIR
from common.run.cli import add_config_options
from common.train.finetune import FinetuneConfig
from studies.train_step.stepcost import PHASES, stage_times, time_train_step

KEY = ["model", "method", "decomposition", "target", "seed"]
STEP_COLUMNS = [
    *KEY,
    "macs_factor",
    "params_factor",
    "batch",
    *(f"{p}_ms" for p in PHASES),
    "step_p10_ms",
    "step_p90_ms",
    "step_vs_dense",
    "finetune_seconds",
    "iters",
    "threads",
    "weights",
    "device_name",
    "load1",
    "torch",
    "date",
]
LAYER_COLUMNS = [*KEY, "layer", "stage", "cin", "cout", "kernel", "stride", "in_hw", "macs", "fwd_ms", "bwd_ms"]
LAYER_COLUMNS += ["fwd_gmacs", "bwd_gmacs"]


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="folder of jsonify_logs.py documents")
    p.add_argument("--out", required=True, help="folder for the CSVs and the Markdown table")
    p.add_argument("--models", default="", help="comma-separated; default: every model in --json")
    p.add_argument("--targets", default="5", help="comma-separated compression targets")
    p.add_argument("--methods", default="", help="comma-separated; default: every method")
    p.add_argument("--seeds", default="0", help="run seeds whose plans are timed, comma-separated, or 'all'")
    p.add_argument("--batch", type=int, default=FinetuneConfig(epochs=1).batch_size, help="the finetuning batch")
    add_config_options(p, ["threads"])
    p.add_argument("--device", default="cpu")  # no "auto": the device names the CSVs
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--layers", action="store_true", help="also time each factor conv alone")
    p.add_argument("--weights", choices=("baseline", "random"), default="baseline")
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    return p.parse_args(argv)


def _read(csv: Path, columns: list[str]) -> pd.DataFrame:
    return pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=columns)


def _append(csv: Path, rows: list[dict], columns: list[str]) -> None:
    """Append ``rows`` (their ``columns``, in that order; other keys are not written) to ``csv``."""
    append_csv_rows(csv, [{c: r[c] for c in columns} for r in rows], columns, lineterminator="\n")


def _keys(df: pd.DataFrame) -> set[tuple]:
    return {(r.model, r.method, r.decomposition, float(r.target), int(r.seed)) for r in df[KEY].itertuples()}


def _finetune_seconds(run: dict) -> dict[tuple, float]:
    """``{(method, decomposition, target, seed): finetune_seconds}`` of the run's latest final records
    (the key :func:`~common.analysis.latest_plans` gives the plans); a final without finetuning has none."""
    return {
        k: float(rec["finetune_seconds"])
        for k, rec in latest_of(run, "final").items()
        if rec.get("finetune_seconds") is not None
    }


def _time_run(run: dict, a: argparse.Namespace, out: Path, done: set, done_layers: set, device_name: str) -> None:
    name = run["model"]
    targets = {float(t) for t in a.targets.split(",")}
    seeds = None if a.seeds == "all" else {int(s) for s in a.seeds.split(",")}
    methods = set(a.methods.split(",")) if a.methods else None
    plans = {
        k: plan_from_dict(rec["plan"])
        for k, rec in latest_plans(run, targets, seeds).items()
        if methods is None or k[0] in methods
    }
    todo = {k: p for k, p in plans.items() if (name, *k) not in done or (a.layers and (name, *k) not in done_layers)}
    if not todo:
        return
    dense, weights = baseline_or_random(name, a.weights, a.checkpoint_dir)
    size = input_size(name)
    shape = (a.batch, 3, size, size)
    num_classes = dense(torch.zeros(1, 3, size, size)).shape[1]
    logged = _finetune_seconds(run)
    kw = {"device": a.device, "threads": a.threads, "warmup": a.warmup, "iters": a.iters}
    # the dense reference step and cost only when a step row is to be written (a --layers top-up needs none)
    need_step = any((name, *k) not in done for k in todo)
    dense_step = time_train_step(dense, dense, shape, num_classes, **kw)["step_ms"] if need_step else None
    dense_cost = count_model(dense, (1, 3, size, size)) if need_step else None
    spectra = SpectraCache(dense)
    for config, plan in sorted(todo.items()):
        comp = apply_plan(dense, plan, spectra)
        key = dict(zip(KEY, (name, *config)))
        if (name, *config) not in done:
            load1 = os.getloadavg()[0]
            t = time_train_step(comp, dense, shape, num_classes, **kw)
            cost = count_model(comp, (1, 3, size, size))
            row = {
                **key,
                **t,
                "macs_factor": dense_cost.conv_macs / cost.conv_macs,
                "params_factor": dense_cost.conv_params / cost.conv_params,
                "step_vs_dense": t["step_ms"] / dense_step,
                "finetune_seconds": logged.get(config),
                "weights": weights,
                "device_name": device_name,
                "load1": round(max(load1, os.getloadavg()[0]), 2),
                "torch": torch.__version__,
                "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            }
            _append(out / f"train_step_{a.device}.csv", [row], STEP_COLUMNS)
            print(
                f"{name} {config[0]} x{config[2]:g} seed {config[3]}: step {t['step_ms']:.0f} ms "
                f"({t['step_ms'] / dense_step:.2f}x dense; backward {t['backward_ms']:.0f} ms)",
                flush=True,
            )
        if a.layers and (name, *config) not in done_layers:
            rows = [{**key, **r} for r in stage_times(comp, shape, **kw)]
            _append(out / f"train_step_layers_{a.device}.csv", rows, LAYER_COLUMNS)


def _markdown(steps: pd.DataFrame, layers: pd.DataFrame, device_name: str, argv: Sequence[str]) -> str:
    lines = [
        f"# Finetuning step cost ({device_name})",
        "",
        "One distilled training step (teacher forward, student forward + loss, backward, optimizer) of each",
        "plan on random data, median over the timed steps; `step_vs_dense` is against the dense model's own",
        "step in the same call; `finetune_seconds` is what the run logged for its whole finetune (data",
        "loading and evaluation included). Written by `python studies/train_step/train_step.py "
        + " ".join(argv)
        + "`.",
        "",
    ]
    cols = ["model", "method", "target", "seed", "macs_factor", "batch", "step_ms", "step_vs_dense"]
    cols += ["teacher_fwd_ms", "student_fwd_ms", "backward_ms", "optimizer_ms", "finetune_seconds"]
    show = steps.drop_duplicates(KEY, keep="last").sort_values(["model", "target", "step_ms"])
    fmt = {c: ".2f" for c in ("macs_factor", "step_vs_dense")} | {c: ".0f" for c in cols if c.endswith("_ms")}
    lines += [markdown_table(show, cols, fmt | {"finetune_seconds": ".0f"}), ""]
    if len(layers):
        lay = layers.drop_duplicates([*KEY, "layer", "stage"], keep="last")
        per = (
            lay[lay["stage"] != "dense"]
            .groupby(KEY, as_index=False)[["fwd_ms", "bwd_ms"]]
            .sum()
            .rename(columns={"fwd_ms": "stages_fwd_ms", "bwd_ms": "stages_bwd_ms"})
            .sort_values(["model", "target", "stages_bwd_ms"])
        )
        lines += [
            "## Factor convs timed alone, summed per plan",
            "",
            markdown_table(per, list(per.columns), {"stages_fwd_ms": ".1f", "stages_bwd_ms": ".1f"}),
            "",
        ]
        slow = lay[lay["stage"] != "dense"].sort_values("bwd_ms", ascending=False).head(15)
        cols = ["model", "method", "seed", "layer", "stage", "cin", "cout", "kernel", "in_hw", "bwd_ms", "bwd_gmacs"]
        cols += ["fwd_ms", "fwd_gmacs"]
        lines += [
            "## The 15 slowest factor convs (backward)",
            "",
            markdown_table(slow, cols, {c: ".2f" for c in cols if c.endswith(("_ms", "_gmacs"))}),
            "",
        ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    argv = list(sys.argv[1:] if argv is None else argv)
    a = parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    step_csv, layer_csv = out / f"train_step_{a.device}.csv", out / f"train_step_layers_{a.device}.csv"
    done, done_layers = _keys(_read(step_csv, STEP_COLUMNS)), _keys(_read(layer_csv, LAYER_COLUMNS))
    device_name = cpu_name() if a.device == "cpu" else torch.cuda.get_device_name(a.device)
    wanted = set(a.models.split(",")) if a.models else None
    for run in load_runs(a.json):
        if wanted is None or run["model"] in wanted:
            _time_run(run, a, out, done, done_layers, device_name)
    steps, layers = _read(step_csv, STEP_COLUMNS), _read(layer_csv, LAYER_COLUMNS)
    (out / f"train_step_{a.device}.md").write_text(_markdown(steps, layers, device_name, argv))
    return steps


if __name__ == "__main__":
    main()

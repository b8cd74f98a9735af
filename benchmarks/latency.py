"""Latency of every chosen plan against its dense baseline, on this machine's CPU or CUDA GPU.

Reads the JSON documents of results runs (``jsonify_logs.py``), rebuilds each compressed model from
its logged plan (one per run seed in a multi-seed run: ``--seeds``, default 0; the seed is part of each
row's key) and times dense, as-factorized and deployed forwards, all with
``common.deploy.merge.fastest_latency`` (deployed = every factorized layer in its fastest exact partition
of merged factor convs, timed in the same setting; the faster memory format per model). Latency does
not depend on the trained values, so ``--weights random`` (or a missing checkpoint) times the same
architecture with seeded random weights.

On the CPU the same three models are also exported to ONNX (``common.deploy.export.export_onnx``: dynamic
batch, checked, verified against PyTorch eager) and timed in ONNX Runtime with ``--threads``
intra-op threads (``common.deploy.export.ort_interleaved_latency``; ``--no-ort`` skips it). ``--imagenet``
adds rows for the ImageNet architectures at 224×224 (``--imagenet-models``), with seeded random
weights and ``uniform``/``energy`` plans built from those weights (``common.search.rules``, no data needed):
speed rows, not accuracy ones. ``--compile MODE`` adds columns for the dense and the deployed model
compiled by ``torch.compile`` (inductor; ``common.deploy.latency.compile_for_inference``) in that mode, e.g.
``default`` on the CPU or ``max-autotune`` on CUDA (inductor's own CUDA graphs, next to the eager
CUDA-graph replay of the other columns).

Settings: CPU ``cpu_b<B>`` (``--threads`` threads, fp32, contiguous vs channels_last; ``--batches`` at
32×32, ``--imagenet-batches`` at 224×224); CUDA ``cuda_b256_bf16_graph`` at 32×32 and
``cuda_b64_bf16_graph`` at 224×224 (bf16, channels_last, CUDA-graph replay). Rows are appended to
``<out>/latency_<device>.csv`` as they are measured, and a re-run skips rows already there (a row
without ONNX Runtime timings counts as missing while ONNX Runtime is on), so an interrupted run
continues; ``<out>/latency_<device>.md`` is rewritten from the whole CSV (the last row per key).

This script holds the command line and the rows; the timing settings and the ONNX Runtime columns are in
``benchmarks/latency_setup.py``, the CSV's columns and the Markdown report in ``benchmarks/latency_report.py``.

    python benchmarks/latency.py --json json/gpu --out results/gpu --device cpu --threads 2 --batches 1,64
    python benchmarks/latency.py --json json/gpu --out results/gpu --device cpu --imagenet --models \\
        resnet18_imagenet,vgg16_imagenet,alexnet_imagenet
    python benchmarks/latency.py --json json/gpu --out results/gpu --device cuda --compile max-autotune
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import pandas as pd
import torch

from benchmarks.latency_report import (
    COMPILE_COLUMNS,
    ORT_COLUMNS,
    ROW_COLUMNS,
    markdown_report,
    read_table,
    row_seed,
)
from benchmarks.latency_setup import Bench, OnnxFiles, batch_shape, ort_columns, ort_version
from common.analysis import latest_plans, load_runs
from common.decompose.surgery import LayerPlan, SpectraCache, apply_plan, list_conv_layers, plan_from_dict
from common.deploy.latency import compile_for_inference, interleaved_latency
from common.files import append_csv_rows
from common.models import baseline_or_random, build_model, input_size
from common.paths import CHECKPOINT_DIR
from common.search.options import SearchConfig
from common.search.rules import energy_plan, uniform_plan
from common.search.space import SearchSpace, repair_plan

IMAGENET_MODELS = "resnet18_imagenet,vgg16_imagenet,alexnet_imagenet"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="json/gpu")
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64", help="CPU batch sizes at 32×32")
    p.add_argument("--targets", default="3", help="only plans at these targets")
    p.add_argument(
        "--seeds",
        default="0",
        help="only plans of these run seeds (comma-separated; 'all' for every seed): a multi-seed run has one "
        "plan per seed, and the seed is part of each row's key",
    )
    p.add_argument("--models", default=None, help="only these models (comma-separated; JSON runs and --imagenet)")
    p.add_argument("--methods", default=None, help="only these methods (comma-separated)")
    p.add_argument("--decompositions", default=None, help="only these decompositions (comma-separated: ht2,tucker2)")
    p.add_argument("--weights", default="baseline", choices=["baseline", "random"])
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed forwards (default: CUDA 50; CPU 10 at batch >= 20, 200/batch below; at 224×224 "
        "max(3, 200·32²/(batch·224²)))",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed forwards (default 3 CPU, 1 CPU at 224×224, 10 CUDA)"
    )
    p.add_argument("--deploy-iters", type=int, default=3, help="timed forwards per partition of a layer")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the final dense/compressed timing")
    p.add_argument(
        "--ort",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time ONNX exports in ONNX Runtime (default: on for the CPU when onnxruntime is installed)",
    )
    p.add_argument(
        "--onnx-dir", default=None, help="folder for the ONNX files while they are timed (default: a temporary one)"
    )
    p.add_argument("--imagenet", action="store_true", help="also time the ImageNet architectures at 224×224")
    p.add_argument("--imagenet-models", default=IMAGENET_MODELS)
    p.add_argument("--imagenet-methods", default="uniform,energy", help="rule plans of the 224×224 rows")
    p.add_argument("--imagenet-batches", default="1,8", help="CPU batch sizes at 224×224")
    p.add_argument("--imagenet-rounds", type=int, default=3, help="interleaved rounds at 224×224")
    p.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also time the dense and the deployed model compiled by torch.compile (inductor) in this mode "
        "(e.g. default; max-autotune on CUDA, which replays CUDA graphs itself); off by default",
    )
    p.add_argument("--minutes", type=float, default=None, help="start no new row after this long")
    return p.parse_args(argv)


def _interleaved(s: dict, timed: dict[str, dict], cuda_graph: bool) -> dict:
    """:func:`interleaved_latency` in setting ``s`` of ``timed`` (``{name: {"model", "channels_last"}}``, as
    :meth:`Bench.timed` gives them), the speed-ups relative to ``"dense"``."""
    return interleaved_latency(
        {k: t["model"] for k, t in timed.items()},
        batch_shape(s),
        rounds=s["rounds"],
        device=s["device"],
        dtype=s["dtype"],
        channels_last={k: t["channels_last"] for k, t in timed.items()},
        threads=s["threads"],
        cuda_graph=cuda_graph,
        warmup=s["warmup"],
        iters=s["iters"],
        reference="dense",
    )


def _compile_row(bench: Bench, s: dict, d: dict, dep: dict) -> dict:
    """The torch.compile columns of one row: the dense model and the deployed one (each in the memory format
    and partition chosen in eager mode), compiled by inductor in ``bench.compile`` mode and timed in
    alternation. The dense model is compiled once per setting (kept in ``d``)."""

    def compiled(m: dict) -> dict:
        model = compile_for_inference(
            m["model"], batch_shape(s), bench.compile, s["device"], s["dtype"], m["channels_last"], s["threads"]
        )
        return {"model": model, "channels_last": m["channels_last"]}

    if "compiled" not in d:
        d["compiled"] = compiled(d)["model"]
    dense = {"model": d["compiled"], "channels_last": d["channels_last"]}
    # a compiled model replays CUDA graphs itself when its mode says so
    il = _interleaved(s, {"dense": dense, "deployed": compiled(dep)}, cuda_graph=False)
    return {
        "compile_mode": bench.compile,
        "compile_dense_ms": il["dense"]["median_ms"],
        "compile_deployed_ms": il["deployed"]["median_ms"],
        "compile_speedup": il["speedup"]["deployed"],
    }


def _torch_columns(d: dict, fact: dict, dep: dict, il: dict) -> dict:
    """A row's PyTorch columns from the timings of the dense (``d``), factorized and deployed models and
    their interleaved rounds (``il``)."""
    return {
        "macs_factor": d["conv_macs"] / fact["conv_macs"],
        "deployed_macs_factor": d["conv_macs"] / dep["conv_macs"],
        "dense_ms": il["dense"]["median_ms"],
        "factorized_ms": il["factorized"]["median_ms"],
        "deployed_ms": il["deployed"]["median_ms"],
        "speedup_factorized": il["speedup"]["factorized"],
        "speedup": il["speedup"]["deployed"],
        "channels_last": dep["channels_last"],
        "dense_channels_last": d["channels_last"],
        "forms": ";".join(f"{f}:{n}" for f, n in sorted(dep["forms"].items())) or "as factorized",
    }


def _row(
    bench: Bench,
    name: str,
    config: tuple,
    comp: torch.nn.Module,
    s: dict,
    d: dict,
    weights: str,
    files: OnnxFiles | None,
) -> dict:
    """One CSV row: pick ``comp``'s memory format (and deployment) first, then time the dense model, it as
    factorized and it deployed in alternation (``d``: the dense model's own :meth:`Bench.timed`), then the
    same in ONNX Runtime when ``files`` is given."""
    method, decomp, target, seed = config
    load1 = os.getloadavg()[0]  # before the row: what else ran on the cores while it was timed
    dep = bench.timed(comp, s, "latency")
    fact = dep["factorized"]
    il = _interleaved(s, {"dense": d, "factorized": fact, "deployed": dep}, s["cuda_graph"])
    ort = ort_columns(files, config, comp, s) if files is not None else dict.fromkeys(ORT_COLUMNS)
    compiled = _compile_row(bench, s, d, dep) if bench.compile else dict.fromkeys(COMPILE_COLUMNS)
    key = {"model": name, "method": method, "decomposition": decomp, "target": target, "seed": seed}
    row = {
        **key,
        "input_size": s["size"],
        "setting": s["setting"],
        "batch": s["batch"],
        **_torch_columns(d, fact, dep, il),
        **ort,
        **compiled,
        "rounds": s["rounds"],
        "warmup": s["warmup"],
        "iters": s["iters"],
        "weights": weights,
        "device_name": bench.device_name,
        "load1": round(max(load1, os.getloadavg()[0]), 2),
        "torch": torch.__version__,
        "onnxruntime": ort_version() if files is not None else None,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": bench.command,
    }
    return {k: row[k] for k in ROW_COLUMNS}


def _print_row(name: str, row: dict, setting: str, ort: bool) -> None:
    """One line per measured row (the ONNX Runtime speed-ups when ``ort``)."""
    ort_txt = (
        f"; ORT dense {row['ort_dense_ms']:.2f} ms, factorized {row['ort_speedup_factorized']:.2f}x, "
        f"deployed {row['ort_speedup']:.2f}x"
        if ort
        else ""
    )
    print(
        f"{name} {row['method']} {row['decomposition']} x{row['target']:g} seed {row['seed']} {setting}: dense "
        f"{row['dense_ms']:.2f} ms, factorized {row['factorized_ms']:.2f} ms "
        f"({row['speedup_factorized']:.2f}x), deployed {row['deployed_ms']:.2f} ms ({row['speedup']:.2f}x) "
        f"[{row['forms']}]{ort_txt} (load {row['load1']:.1f})",
        flush=True,
    )


def _time_configs(
    bench: Bench,
    name: str,
    dense: torch.nn.Module,
    weights: str,
    plans: dict[tuple, dict],
    csv: Path,
    done_keys: set,
) -> None:
    """Time every ``(config, setting)`` of ``plans`` (``{config: plan}``) not in ``done_keys`` yet, appending
    each row to ``csv``."""
    size = input_size(name)
    todo = [
        (config, plan, s)
        for config, plan in sorted(plans.items())
        for s in bench.settings_for(size)
        if (name, *config, s["setting"]) not in done_keys
    ]
    if not todo:
        return
    spectra = SpectraCache(dense)
    dense_ms: dict[str, dict] = {}
    files = OnnxFiles(bench, name, dense, size) if bench.ort else None
    try:
        for config, plan, s in todo:
            if bench.out_of_time():
                break
            if s["setting"] not in dense_ms:
                dense_ms[s["setting"]] = bench.timed(dense, s, None)
            comp = apply_plan(dense, plan, spectra)
            row = _row(bench, name, config, comp, s, dense_ms[s["setting"]], weights, files)
            append_csv_rows(csv, [row], ROW_COLUMNS, lineterminator="\n")
            _print_row(name, row, s["setting"], files is not None)
    finally:
        if files is not None:
            files.close()


def _wanted(name: str, a: argparse.Namespace) -> bool:
    return not a.models or name in set(a.models.split(","))


def _time_run(bench: Bench, run: dict, a: argparse.Namespace, csv: Path, done_keys: set) -> None:
    """Time every plan of one run document not in ``done_keys`` yet."""
    name = run["model"]
    if not _wanted(name, a):
        return
    targets = {float(t) for t in a.targets.split(",")}
    seeds = None if a.seeds == "all" else {int(x) for x in a.seeds.split(",")}
    methods = set(a.methods.split(",")) if a.methods else None
    decomps = set(a.decompositions.split(",")) if a.decompositions else None
    plans = {
        k: plan_from_dict(rec["plan"])
        for k, rec in latest_plans(run, targets, seeds).items()
        if (methods is None or k[0] in methods) and (decomps is None or k[1] in decomps)
    }
    if not any((name, *k, s["setting"]) not in done_keys for k in plans for s in bench.settings_for(input_size(name))):
        return  # nothing to do: no model load
    dense, weights = baseline_or_random(name, a.weights, a.checkpoint_dir)
    _time_configs(bench, name, dense, weights, plans, csv, done_keys)


def rule_plans(
    model: torch.nn.Module, size: int, targets: Sequence[float], methods: Sequence[str], decomposition: str = "ht2"
) -> dict[tuple, dict[str, LayerPlan]]:
    """``{(method, decomposition, target, 0): plan}`` of the data-free rules (``uniform``, ``energy``) on the
    conv MACs of ``model`` at ``size``×``size``, finished onto the budget like the searcher's rule plans
    (:func:`common.search.methods.rule_plan`). Seed 0: the rules draw nothing, and the random weights they
    read are drawn with seed 0."""
    space = SearchSpace(list_conv_layers(model, (1, 3, size, size)), decomposition)
    spectra = SpectraCache(model)
    tol = SearchConfig().tol
    plans = {}
    for target in targets:
        for method in methods:
            if method == "uniform":
                plan, _ = uniform_plan(space, target, "macs")
            elif method == "energy":
                plan, _ = energy_plan(space, spectra, target, "macs")
            else:
                raise ValueError(f"--imagenet-methods: only the data-free rules uniform, energy; got {method!r}")
            if abs(space.factor(plan, "macs") / target - 1) > tol:
                plan, _ = repair_plan(space, plan, target, "macs", tol)
            plans[(method, decomposition, float(target), 0)] = plan
    return plans


def _time_imagenet(bench: Bench, a: argparse.Namespace, csv: Path, done_keys: set) -> None:
    """The 224×224 rows: each ImageNet architecture with seeded random weights and its rule plans."""
    targets = [float(t) for t in a.targets.split(",")]
    methods = [m for m in a.imagenet_methods.split(",") if not a.methods or m in set(a.methods.split(","))]
    for name in a.imagenet_models.split(","):
        if bench.out_of_time():
            return
        if not _wanted(name, a):
            continue
        keys = [(name, m, "ht2", t, 0, s["setting"]) for m in methods for t in targets for s in bench.settings_for(224)]
        if all(k in done_keys for k in keys):
            continue
        torch.manual_seed(0)
        dense = build_model(name).eval()
        _time_configs(bench, name, dense, "random", rule_plans(dense, 224, targets, methods), csv, done_keys)


def _done_keys(bench: Bench, csv: Path) -> set[tuple]:
    """The keys of the rows of ``csv`` a re-run keeps (an older file is widened to :data:`ROW_COLUMNS` first)."""
    done = read_table(csv)
    if csv.is_file() and list(pd.read_csv(csv, nrows=0).columns) != ROW_COLUMNS:
        done.to_csv(csv, index=False)  # an older file: widened once, so appended rows line up
    # while ONNX Runtime is on, a row without its timings is not done (it is measured again)
    complete = done["ort_speedup"].notna() if bench.ort else pd.Series(True, index=done.index)
    if bench.compile:  # likewise a row without the torch.compile timings while --compile is on
        complete &= done["compile_speedup"].notna()
    return {
        (r.model, r.method, r.decomposition, float(r.target), row_seed(r.seed), r.setting)
        for r in done[complete].itertuples()
    }


def _run(a: argparse.Namespace, argv: Sequence[str], onnx_dir: Path) -> pd.DataFrame:
    """Time what ``a`` asks for that the CSV lacks, then rewrite the Markdown report; the whole table."""
    # OpenMP's wait policy changes timings on shared cores by orders of magnitude: part of the command
    wait = os.environ.get("OMP_WAIT_POLICY")
    command = (f"OMP_WAIT_POLICY={wait} " if wait else "") + f"python benchmarks/latency.py {' '.join(argv)}"
    bench = Bench.from_args(a, onnx_dir, command)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"latency_{bench.device}.csv"
    done_keys = _done_keys(bench, csv)
    if Path(a.json).is_dir() or not a.imagenet:
        for run in load_runs(a.json):
            if bench.out_of_time():
                break
            _time_run(bench, run, a, csv, done_keys)
    if a.imagenet and not bench.out_of_time():
        _time_imagenet(bench, a, csv, done_keys)
    if bench.out_of_time():
        print("time box reached; re-run the same command to continue", flush=True)
    df = read_table(csv)
    if csv.is_file() and len(df) != len(pd.read_csv(csv)):
        df.to_csv(csv, index=False)  # rows measured again replace the older ones
    report = markdown_report(df, argv, bench.device, bench.device_name, bench.threads)
    (out / f"latency_{bench.device}.md").write_text(report)
    return df


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    a = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    tmp = None
    if a.onnx_dir:
        onnx_dir = Path(a.onnx_dir)
        onnx_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="latency-onnx-")
        onnx_dir = Path(tmp)
    try:
        return _run(a, argv, onnx_dir)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

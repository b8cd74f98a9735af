"""Benchmark of the HT-2 decomposition engine on the shared CIFAR baselines (not a test).

For each baseline found under ``../shared/checkpoints/cifar10-jpeg`` it times:

1. the one-time cache: ``SpectraCache(model).warm(...)`` over every eligible conv with more than 3
   input channels (the layers the rank search compresses);
2. decomposing every k×k conv (HT-2) for several rank plans the cache has never seen
   (``SpectraCache.decompose``, which runs layers on parallel threads as ``apply_plan`` does; levels
   via ``ranks_from_level(..., multiple=8)``; the per-kernel Gram caches are cleared before every
   repetition, so each timing is that of a new plan);
3. ``apply_plan`` (model copy included) for the same plans, HT-2 on k×k and SVD on 1×1 convs: once
   as a new plan (decomposition included) and once as a plan already seen.

Each plan is timed ``--repeats`` times; the table gives min, median and max per plan (min estimates
the uncontended time; on a shared VM median and max also carry other tenants' load).

Usage (from the repository root)::

    python -m benchmarks.bench_decompose --threads 2 --models vgg16 resnet18 alexnet
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable, Sequence

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import torch
from torch import nn

from common.decompose.ranks import ranks_from_level
from common.decompose.surgery import LayerInfo, LayerPlan, SpectraCache, apply_plan, list_conv_layers
from common.deploy.latency import cpu_name
from common.models import load_baseline
from common.paths import CHECKPOINT_DIR
from common.run.cli import add_config_options

DEFAULT_MODELS = ("resnet18", "vgg16", "alexnet")
DEFAULT_LEVELS = (0.5, 0.45, 0.4, 0.35)


def machine_info(threads: int) -> str:
    load = " ".join(f"{v:.2f}" for v in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    # OMP_WAIT_POLICY matters on a shared machine: spinning OpenMP workers that lose their core to
    # another process can make a 2-thread eigh/matmul ~100x slower than one thread.
    omp = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (
        f"CPU: {cpu_name()} ({os.cpu_count()} logical cores); torch {torch.__version__}, "
        f"{threads} torch threads (set), {torch.get_num_threads()} in use, OMP_WAIT_POLICY={omp}; "
        f"load average (1/5/15 min): {load}"
    )


def timed(fn: Callable[[], object]) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of one call; CPU time is less sensitive to other load."""
    t0, c0 = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - t0, time.process_time() - c0


def compressible(layers: Sequence[LayerInfo], min_channels: int = 4) -> list[LayerInfo]:
    """Eligible convs with at least ``min_channels`` input channels per group (as the search uses)."""
    return [i for i in layers if i.eligible and i.weight_shape[1] >= min_channels]


def level_plan(layers: Sequence[LayerInfo], level: float, multiple: int = 8) -> dict[str, LayerPlan]:
    """HT-2 at ``level`` on k×k convs and SVD on 1×1 convs."""
    plan = {}
    for info in layers:
        method = "svd" if info.kernel_size == (1, 1) else "ht2"
        plan[info.name] = LayerPlan(method, ranks_from_level(method, info.group_shape, level, multiple))
    return plan


def forget_plans(cache: SpectraCache, names: Sequence[str]) -> None:
    """Drop the per-(R1, R3) Gram eigendecompositions, so the next plan is new to the cache."""
    for n in names:
        cache.get(n)._gram_cache.clear()


def bench_model(name: str, model: nn.Module, levels: Sequence[float], repeats: int) -> dict:
    layers = compressible(list_conv_layers(model))
    names = [i.name for i in layers]
    kxk = [i.name for i in layers if i.kernel_size != (1, 1)]
    cache = SpectraCache(model)
    warm_s, warm_cpu = timed(lambda: cache.warm(names))
    rows = []
    for level in levels:
        plan = level_plan(layers, level)
        kxk_plan = {n: plan[n] for n in kxk}

        def decompose_all(kxk_plan=kxk_plan) -> None:
            cache.decompose(kxk_plan)

        dec, dec_cpu, new_apply, seen_apply = [], [], [], []
        for _ in range(repeats):
            forget_plans(cache, kxk)
            wall, cpu = timed(decompose_all)
            dec.append(wall)
            dec_cpu.append(cpu)
            forget_plans(cache, kxk)
            new_apply.append(timed(lambda plan=plan: apply_plan(model, plan, cache))[0])
            seen_apply.append(timed(lambda plan=plan: apply_plan(model, plan, cache))[0])
        rows.append(
            {
                "level": level,
                "decompose": dec,
                "decompose_cpu": dec_cpu,
                "apply_new": new_apply,
                "apply_seen": seen_apply,
            }
        )
    return {"model": name, "layers": len(names), "kxk": len(kxk), "warm_s": warm_s, "warm_cpu": warm_cpu, "plans": rows}


def print_table(results: Sequence[dict]) -> None:
    head = (
        f"{'model':9s} {'level':>5s} {'convs':>5s} {'k×k':>4s} {'cache s':>8s} {'(cpu s)':>8s} "
        f"{'decomp min':>10s} {'decomp med':>10s} {'decomp max':>10s} {'(cpu med)':>9s} {'apply new med':>13s} "
        f"{'apply new max':>13s} {'apply seen med':>14s}"
    )
    print(head)
    print("-" * len(head))
    for r in results:
        for i, p in enumerate(r["plans"]):
            cache_s = f"{r['warm_s']:8.3f} {r['warm_cpu']:8.3f}" if i == 0 else " " * 17
            print(
                f"{r['model']:9s} {p['level']:5.2f} {r['layers']:5d} {r['kxk']:4d} {cache_s} "
                f"{min(p['decompose']):10.4f} {statistics.median(p['decompose']):10.4f} {max(p['decompose']):10.4f} "
                f"{statistics.median(p['decompose_cpu']):9.4f} "
                f"{statistics.median(p['apply_new']):13.4f} {max(p['apply_new']):13.4f} "
                f"{statistics.median(p['apply_seen']):14.4f}"
            )


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_config_options(ap, ["threads"], defaults={"threads": 2})
    ap.add_argument(
        "--models",
        nargs="+",
        default=list(DEFAULT_MODELS),
        choices=DEFAULT_MODELS,
        help="baselines to time (default: all three)",
    )
    ap.add_argument(
        "--levels",
        nargs="+",
        type=float,
        default=list(DEFAULT_LEVELS),
        help="rank levels of the new plans (default 0.5 0.45 0.4 0.35)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timings per plan (default 3)")
    args = ap.parse_args(argv)
    if args.threads < 1 or args.repeats < 1:
        ap.error("--threads and --repeats must be >= 1")
    torch.set_num_threads(args.threads)
    print(machine_info(args.threads))
    results = []
    for name in args.models:
        path = CHECKPOINT_DIR / f"{name}.pt"
        if not path.is_file():
            print(f"skipping {name}: {path} not found")
            continue
        with torch.no_grad():
            results.append(bench_model(name, load_baseline(name), args.levels, args.repeats))
    if not results:
        print("no baselines found: nothing timed")
        return 1
    print_table(results)
    print(
        "times in seconds (wall; '(cpu ...)' = process CPU time, all threads); 'decomp' = HT-2 of every "
        "k×k conv with C>3 for a plan new to the cache; 'apply' = apply_plan incl. model copy "
        "(k×k HT-2 + 1×1 SVD), new plan or already seen"
    )
    print(machine_info(args.threads).split("; ")[-1])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Time of each stage of a rank search on this machine (a benchmark, not a test).

For one shared baseline (default ResNet18) on the CPU with the CPU defaults of
``benchmarks/run_results.py`` (proxy: exact BN recalibration on 256 augmented train images, then
minus the default label-free divergence to the dense model on them (``--proxy``); val top-1 on the
whole val split decides among the 3 best candidates; rank multiple 8; 100 candidates), it times:
loading the data and model, the one-time spectra cache, the dense proxy score, the sensitivity profile (every layer alone at each
sensitivity level and rank shape), and each method at the target (default 3× fewer conv MACs). The
policy's time includes nothing it can reuse from the profile beyond the profile itself, which is
reported separately. ``--shapes level,energy`` runs the richer per-layer space (the ablation).

``--nproc N`` times the same search twice, as ``torchrun`` would run it (:mod:`common.dist`: the
sensitivity points and each round's candidates sharded over N processes of 1 thread each) and as one
process with N threads, checks that both choose the same plans, and prints the two times side by side.

    python benchmarks/bench_search.py --model resnet18 --target 3 --threads 2
    python benchmarks/bench_search.py --nproc 2 --methods random,policy --candidates 40
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import torch

from common.data.datasets import load_dataset
from common.data.loader import make_loader
from common.deploy.latency import cpu_name
from common.dist import init_from_env, is_main
from common.models import load_baseline
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT
from common.run.cli import add_config_options
from common.run.config import field_value
from common.search.options import SearchConfig
from common.search.proxy import final_model
from common.search.searcher import build_searcher
from common.train.evaluate import evaluate

T = TypeVar("T")
DEFAULT_METHODS = ("uniform", "energy", "vbmf", "policy")
"""The methods timed by default (``--methods``)."""


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_options(p, ["model"])
    p.add_argument("--target", type=float, default=3.0)
    add_config_options(
        p, ["methods", "proxy", "rerank", "rescore", "rescore_images"], defaults={"methods": DEFAULT_METHODS}
    )
    p.add_argument("--candidates", type=int, default=100)
    add_config_options(
        p,
        ["calib_images", "val_images", "threads", "seed", "shapes"],
        defaults={"val_images": 0, "threads": 2, "shapes": ("level",)},
    )
    p.add_argument(
        "--test",
        action="store_true",
        help="also report each chosen plan's test top-1 (common.search.proxy.final_model)",
    )
    add_config_options(p, ["final_calib_images", "data_root"], defaults={"data_root": str(CIFAR_JPEG_ROOT)})
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    p.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="compare N processes of 1 thread (torchrun) with 1 process of N threads; --threads is then ignored",
    )
    p.add_argument("--json", help="write the stage times and chosen plans here (rank 0)")
    a = p.parse_args(argv)
    a.methods, a.shapes = field_value("methods", a.methods), field_value("shapes", a.shapes)
    return a


class _Stages:
    """Times named stages of the benchmark, printing each as it ends (rank 0)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    def __call__(self, name: str, fn: Callable[[], T]) -> T:
        t = time.perf_counter()
        out = fn()
        self.seconds[name] = time.perf_counter() - t
        _main_print(f"{name:<28s} {self.seconds[name]:8.1f} s", flush=True)
        return out


def _search(a: argparse.Namespace, stage: _Stages) -> tuple:
    """Load the data and model, build the searcher, profile it and run every method: (data, model, searcher,
    dense proxy score, {method: result})."""
    data = stage("load data", lambda: load_dataset("cifar10-jpeg", root=a.data_root))
    model = stage("load model", lambda: load_baseline(a.model, a.checkpoint_dir))
    config = SearchConfig(shapes=a.shapes, rerank=a.rerank, rescore=a.rescore, rescore_images=a.rescore_images)
    searcher = stage(
        "spectra cache + proxy setup",
        lambda: build_searcher(
            model,
            data,
            proxy=a.proxy,
            calib_images=a.calib_images,
            val_images=a.val_images or None,
            seed=a.seed,
            config=config,
        ),
    )
    dense = stage("dense proxy score", searcher.dense_score)
    stage("sensitivity profile", searcher.sensitivity)
    results = {}
    for method in a.methods:
        results[method] = stage(
            f"search: {method}", lambda m=method: searcher.run(m, a.target, "macs", a.candidates, a.seed)
        )
    return data, model, searcher, dense, results


def _report(a: argparse.Namespace, data, model, searcher, results: dict) -> None:
    """One line per method: its proxy score, val (and with ``--test`` test) top-1, factor, evaluations, time."""
    for m, r in results.items():
        test = ""
        if a.test:  # reporting only: the plan was chosen on val
            built = final_model(model, r.plan, searcher.spectra, data, a.final_calib_images, a.seed)
            test = f"  test {evaluate(built, make_loader(data, 'test', 500), 'cpu')['top1']:.4f}"
        val = "" if r.val_top1 is None else f"  val {r.val_top1:.4f}"
        _main_print(
            f"{m:<13s} {r.proxy} {r.score:.5g}{val}{test}  x{r.macs_factor:.2f} MACs  {r.evaluations} evaluations  "
            f"{r.seconds:.1f} s",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    a = parse_args(argv)
    if a.nproc > 1 and "WORLD_SIZE" not in os.environ:
        return _compare(a, list(sys.argv[1:] if argv is None else argv))
    init_from_env("cpu")
    torch.set_num_threads(a.threads)
    stage = _Stages()
    t_all = time.perf_counter()
    _main_print(
        f"{a.model} on {cpu_name()}, {int(os.environ.get('WORLD_SIZE', '1'))} process(es) x {a.threads} threads, torch "
        f"{torch.__version__}; proxy {a.calib_images} calibration / {a.val_images} val images, "
        f"{a.candidates} candidates, target {a.target:g}x conv MACs, seed {a.seed}, proxy {a.proxy}, "
        f"rerank {a.rerank}, rescore {a.rescore} on {a.rescore_images} images, shapes {','.join(a.shapes)}",
        flush=True,
    )
    data, model, searcher, dense, results = _search(a, stage)
    stages = stage.seconds
    total = time.perf_counter() - t_all
    _main_print(f"{'total':<28s} {total:8.1f} s")
    _main_print(
        f"\ndense proxy score {dense:.5g}; {len(searcher.space.layers)} layers profiled at "
        f"{len(searcher.config.sensitivity_levels)} levels x {len(searcher.config.shapes)} shapes"
    )
    _report(a, data, model, searcher, results)
    if "search: policy" in stages:
        prof = stages["sensitivity profile"] + stages["search: policy"]
        _main_print(
            f"\nsensitivity profile + {a.candidates}-candidate policy search: {prof / 60:.1f} min "
            f"(target: <= 6 min on the 2-core machine)"
        )
    if a.json and is_main():
        plans = {
            m: {"plan": {k: [v.method, list(v.ranks)] for k, v in r.plan.items()}, "score": r.score}
            for m, r in results.items()
        }
        Path(a.json).write_text(json.dumps({"stages": stages, "total": total, "results": plans}, indent=1))
    return stages


def _main_print(*args, **kw) -> None:
    if is_main():
        print(*args, **kw)


def _drop(argv: list[str], flag: str) -> list[str]:
    """``argv`` without ``flag`` and its value (either spelling)."""
    out, skip = [], False
    for x in argv:
        if skip:
            skip = False
        elif x == flag:
            skip = True
        elif not x.startswith(flag + "="):
            out.append(x)
    return out


def _compare(a: argparse.Namespace, argv: list[str]) -> dict[str, float]:
    """The search as ``a.nproc`` processes x 1 thread (torchrun) and as 1 process x ``a.nproc`` threads."""
    base = _drop(_drop(_drop(argv, "--nproc"), "--threads"), "--json")
    me = str(Path(__file__).resolve())
    env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
    runs = {
        f"1 process x {a.nproc} threads": [sys.executable, me, *base, "--threads", str(a.nproc)],
        f"{a.nproc} processes x 1 thread": [
            *(sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={a.nproc}"),
            *(me, *base, "--threads", "1"),
        ],
    }
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (name, cmd) in enumerate(runs.items()):
            print(f"\n=== {name} ===", flush=True)
            subprocess.run([*cmd, "--json", f"{tmp}/{i}.json"], check=True, env=env)
            out[name] = json.loads(Path(f"{tmp}/{i}.json").read_text())
    (n1, r1), (n2, r2) = out.items()
    print(f"\n{'stage':<28s} {n1:>24s} {n2:>24s} {'speed-up':>9s}")
    for k in [*r1["stages"], "total"]:
        t1, t2 = (r["total"] if k == "total" else r["stages"][k] for r in (r1, r2))
        print(f"{k:<28s} {t1:22.1f} s {t2:22.1f} s {t1 / t2:8.2f}x")
    same = {m: r1["results"][m]["plan"] == r2["results"][m]["plan"] for m in r1["results"]}
    print("same plans chosen: " + ", ".join(f"{m} {'yes' if v else 'NO'}" for m, v in same.items()))
    return {"speedup_total": r1["total"] / r2["total"]}


if __name__ == "__main__":
    main()

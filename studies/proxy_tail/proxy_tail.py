"""Where a plan's label-free proxy score comes from: the per-image divergence to the dense model on
each seed's images.

A label-free proxy (:mod:`common.search.proxy`) is minus the *mean* per-image divergence (``kl`` or
``logit_mse``) over the BN-calibration train images (256 by default), drawn by the run's seed. A mean
over a few hundred images can be carried by a handful of them; this prints, for plans read from a run
log (its ``plan`` records) and for each calibration seed, the mean (the proxy, negated), the median,
the largest per-image divergence, the share of the sum carried by the ``--top`` largest and the mean
without them. ``--divergence`` defaults to the run's own proxy (``kl`` for a ``top1`` run). A
diagnostic: nothing is selected with it.

    python studies/proxy_tail/proxy_tail.py --log results/cpu/logs/resnet18/results-resnet18-cpu.log \\
        --plans energy:0,uniform:0,policy_seeded:2 --seeds 0,1,2
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import torch

from common.data.datasets import load_dataset
from common.decompose.surgery import SpectraCache, plan_from_dict
from common.models import load_baseline
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT
from common.run.cli import add_config_options
from common.run.logs import config_record, parse_log, plan_records
from common.search.proxy import DIVERGENCES, ProxyEvaluator


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--log", required=True, help="a run log (logs/<model>/<run_id>.log)")
    p.add_argument("--plans", required=True, help="method:seed of each plan record to read, comma-separated")
    p.add_argument("--target", type=float, default=None, help="the plans' target (default: the log's only one)")
    p.add_argument("--seeds", default="0,1,2", help="calibration seeds to score every plan on")
    add_config_options(p, ["calib_images"])
    p.add_argument(
        "--divergence", default=None, choices=tuple(DIVERGENCES), help="per-image divergence (default: the run's proxy)"
    )
    p.add_argument("--top", type=int, default=3, help="how many of the largest per-image divergences to single out")
    add_config_options(p, ["threads", "data_root"], defaults={"threads": 2, "data_root": str(CIFAR_JPEG_ROOT)})
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    return p.parse_args(argv)


def read_plans(log: Path, wanted: Sequence[str], target: float | None = None) -> tuple[dict, dict]:
    """The log's ``config`` record and ``{"method:seed": plan record}`` (the latest of each, HT-2) at
    ``target`` (default: the log's one target; a log of several needs it)."""
    records, _ = parse_log(log)
    config = config_record(records, log)
    plans = plan_records(records)
    out = {}
    for item in wanted:
        method, _, seed = item.partition(":")
        try:
            seed_value = int(seed)
        except ValueError:
            raise ValueError(f"--plans: {item!r} is not method:seed (e.g. energy:0)") from None
        found = {t: r for (m, s, t), r in plans.items() if m == method and s == seed_value}
        if target is not None:
            found = {t: r for t, r in found.items() if t == float(target)}
        if not found:
            at = "" if target is None else f" at target {target:g}"
            raise ValueError(f"{log}: no HT-2 plan record of method {method!r} at seed {seed_value}{at}")
        if len(found) > 1:
            raise ValueError(f"{log}: {item} has plans at targets {sorted(found)}; name one with --target")
        out[item] = next(iter(found.values()))
    return config, out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    a = parse_args(argv)
    torch.set_num_threads(a.threads)
    config, plans = read_plans(Path(a.log), [x for x in a.plans.split(",") if x], a.target)
    data = load_dataset(config["dataset"], root=a.data_root)
    model = load_baseline(config["model"], a.checkpoint_dir)
    spectra = SpectraCache(model)
    rows = []
    divergence = a.divergence or (config.get("proxy") if config.get("proxy") in DIVERGENCES else "kl")
    print(
        f"{config['model']} on {config['dataset']}: per-image {divergence}(dense, plan), "
        f"{a.calib_images} calibration images"
    )
    for seed in (int(s) for s in a.seeds.split(",") if s):
        evaluator = ProxyEvaluator(model, data, spectra, calib_images=a.calib_images, seed=seed, channels_last=True)
        for name, rec in plans.items():
            d = torch.cat(evaluator.per_image(plan_from_dict(rec["plan"]), divergence))
            top = d.sort(descending=True).values
            row = {
                "plan": name,
                "seed": seed,
                "mean": float(d.mean()),
                "median": float(d.median()),
                "max": float(top[0]),
                "top_share": float(top[: a.top].sum() / d.sum()),
                "mean_without_top": float(top[a.top :].mean()),
            }
            rows.append(row)
            print(
                f"seed {seed}  {name:<18s} mean {row['mean']:.5f}  median {row['median']:.6f}  max {row['max']:.3f}  "
                f"top-{a.top} share {row['top_share']:.0%}  mean without them {row['mean_without_top']:.5f}",
                flush=True,
            )
    return rows


if __name__ == "__main__":
    main()

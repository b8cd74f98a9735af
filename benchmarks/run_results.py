"""The results table: every shared baseline × budget × rank-selection method × seed, HT-2 (and Tucker-2 for
the policy), BN-recalibrated accuracy, finetuned accuracy at every budget, params/MACs and measured latency.

Each model is one resumable experiment (``common.experiment.run_experiment``) logging to
``<log-dir>/<model>/<run id>.log``; an interrupted run continues where it stopped when started again.
Then ``jsonify_logs.py`` and ``analyze_results.py`` turn the logs into ``results/``.

    python benchmarks/run_results.py                       # CUDA if present, else CPU settings
    python benchmarks/run_results.py --models alexnet --targets 3 --finetune-epochs 0.1

Finetune budget: 3 epochs with CUDA; on CPU a stated smaller budget (``--finetune-epochs``, default
0.1 epoch), the same for every method. Selection uses ``val`` only; reported accuracies are ``test``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):  # run as a script from anywhere: make the repo importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from common.experiment import ExperimentConfig, run_experiment  # noqa: E402
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT  # noqa: E402
from common.search import METHODS  # noqa: E402


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,vgg16,alexnet")
    p.add_argument("--targets", default="3,2,5", help="conv-MAC reduction factors (first = finetuned one)")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--no-tucker2", action="store_true", help="skip the Tucker-2 policy comparison")
    p.add_argument("--search-budget", type=int, default=100)
    p.add_argument("--n-seeds", type=int, default=3, help="seeds per (target, method): search draws + calibration")
    p.add_argument("--proxy", default="kl", choices=["kl", "top1"])
    p.add_argument("--shapes", default="level", help="per-layer rank shapes of the searches: level[,energy]")
    p.add_argument("--finetune-epochs", type=float, default=None, help="default: 3 on CUDA, 0.1 on CPU")
    p.add_argument("--finetune-targets", default="", help="targets to finetune at (default: all)")
    p.add_argument("--data-root", default=str(CIFAR_JPEG_ROOT))
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    p.add_argument("--calib-images", type=int, default=None, help="default: 1024 on CUDA, 256 on CPU")
    p.add_argument("--val-images", type=int, default=None, help="default: the whole val split (re-ranking)")
    p.add_argument("--device", default="auto")
    p.add_argument("--log-dir", default="logs/results")
    p.add_argument("--run-tag", default=None, help="run id suffix (default: the device type)")
    p.add_argument("--minutes", type=float, default=None, help="per model: start no new stage after this long")
    p.add_argument("--no-latency", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    a = parse_args(argv)
    cuda = torch.cuda.is_available() and a.device in ("auto", "cuda")
    device = "cuda" if cuda else "cpu"
    epochs = a.finetune_epochs if a.finetune_epochs is not None else (3.0 if cuda else 0.1)
    tag = a.run_tag or device
    for model in [m for m in a.models.split(",") if m]:
        deadline = time.time() + 60 * a.minutes if a.minutes else None  # per model
        ckpt = Path(a.checkpoint_dir) / f"{model}.pt"
        if not ckpt.exists():
            print(f"skipping {model}: no checkpoint at {ckpt}")
            continue
        cfg = ExperimentConfig(
            model=model, dataset="cifar10-jpeg", data_root=a.data_root, checkpoint=str(ckpt),
            targets=tuple(float(t) for t in a.targets.split(",")), metric="macs",
            methods=tuple(m for m in a.methods.split(",") if m), policy_tucker2=not a.no_tucker2,
            search_budget=a.search_budget, finetune=epochs > 0, finetune_epochs=epochs or 3.0,
            finetune_targets=tuple(float(t) for t in a.finetune_targets.split(",") if t) or None,
            n_seeds=a.n_seeds, proxy=a.proxy, shapes=tuple(x for x in a.shapes.split(",") if x),
            finetune_batch_size=256 if cuda else 128, finetune_lr=0.0005,
            calib_images=a.calib_images or (1024 if cuda else 256),
            val_images=a.val_images or None,
            latency=not a.no_latency, latency_devices=("cuda",) if cuda else ("cpu",), device=device, seed=a.seed, run_id=f"results-{model}-{tag}",
            log_dir=a.log_dir, deadline=deadline, progress=True)
        t = time.perf_counter()
        finals = run_experiment(cfg)
        print(f"{model}: {len(finals)} final records in {time.perf_counter() - t:.0f}s")
        if deadline and time.time() > deadline:
            print(f"{model}: time box reached; re-run the same command to continue")


if __name__ == "__main__":
    main()

"""The results table: every shared baseline × budget × rank-selection method × seed, HT-2 (and Tucker-2 for
the policy), BN-recalibrated accuracy, finetuned accuracy at every budget, params/MACs and measured latency.

Each model is one resumable experiment (``common.run.experiment.run_experiment``) logging to
``<log-dir>/<model>/<run id>.log``; an interrupted run continues where it stopped when started again.
Then ``jsonify_logs.py`` and ``analyze_results.py`` turn the logs into ``results/``.

    python benchmarks/run_results.py                       # CUDA if present, else CPU settings
    python benchmarks/run_results.py --models alexnet --targets 3 --finetune-epochs 0.1

Finetune budget: 3 epochs with CUDA; on CPU a stated smaller budget (``--finetune-epochs``, default
0.1 epoch), the same for every method. Selection uses ``val`` only; reported accuracies are ``test``.

Every ``ExperimentConfig`` field but the per-model ones is an option (as in ``python -m common.run``),
with this table's defaults: targets 3,2,5, 3 seeds, the Tucker-2 policy and latency on (``--no-tucker2``,
``--no-latency``), device-dependent finetuning and proxy sizes.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import torch

from common.notebook import run_status
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT
from common.run.cli import add_config_arguments, config_from_args
from common.run.config import DEFAULT_FINETUNE_EPOCHS, ExperimentConfig
from common.run.experiment import run_experiment
from common.run.lock import LogLockedError
from common.run.preflight import PreflightError

# Fixed per model by this script, so not options.
PER_MODEL = ("model", "dataset", "checkpoint", "run_id", "deadline")
# Where the results table departs from ExperimentConfig's defaults.
DEFAULTS = {
    "targets": (3.0, 2.0, 5.0),
    "n_seeds": 3,
    "policy_tucker2": True,
    "latency": True,
    "data_root": str(CIFAR_JPEG_ROOT),
    "log_dir": "logs/results",
}
BY_DEVICE_HELP = {
    "finetune_epochs": f"finetuning epochs (default: {DEFAULT_FINETUNE_EPOCHS:g} on CUDA, 0.1 on CPU; 0 = off)",
    "calib_images": "proxy: BN-recalibration (and KL-scoring) train images (default: 1024 on CUDA, 256 on CPU)",
    "finetune_batch_size": "finetuning batch size (default: 256 on CUDA, 128 on CPU)",
    "latency_devices": "which of cpu, cuda to time (default: the device the run uses)",
}


def _by_device(cuda: bool) -> dict:
    """The defaults that depend on the device (a given option wins over them)."""
    return {
        "finetune_epochs": DEFAULT_FINETUNE_EPOCHS if cuda else 0.1,
        "calib_images": 1024 if cuda else 256,
        "finetune_batch_size": 256 if cuda else 128,
        "latency_devices": ("cuda",) if cuda else ("cpu",),
    }


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="resnet18,vgg16,alexnet")
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    p.add_argument("--run-tag", default=None, help="run id suffix (default: the device type)")
    p.add_argument("--minutes", type=float, default=None, help="per model: start no new stage after this long")
    add_config_arguments(p, exclude=PER_MODEL, defaults=DEFAULTS, helps=BY_DEVICE_HELP)
    p.add_argument(
        "--no-tucker2",
        dest="policy_tucker2",
        action="store_false",
        default=argparse.SUPPRESS,
        help="same as --no-policy-tucker2: skip the Tucker-2 policy comparison",
    )
    return p


def model_config(a: argparse.Namespace, model: str, cuda: bool, deadline: float | None) -> ExperimentConfig:
    """The experiment of one model: the options given, else this table's defaults, else the config's."""
    device = "cuda" if cuda else "cpu"
    given = {k: v for k, v in vars(a).items() if k not in ("models", "checkpoint_dir", "run_tag", "minutes")}
    return config_from_args(
        {**_by_device(cuda), **given},
        model=model,
        dataset="cifar10-jpeg",
        checkpoint=str(Path(a.checkpoint_dir) / f"{model}.pt"),
        device=device,
        run_id=f"results-{model}-{a.run_tag or device}",
        deadline=deadline,
    )


def main(argv: Sequence[str] | None = None) -> None:
    p = build_parser()
    a = p.parse_args(argv)
    cuda = torch.cuda.is_available() and getattr(a, "device", "auto") in ("auto", "cuda")
    try:
        model_config(a, "resnet18", cuda, None)  # a bad value is a usage error before any work
    except ValueError as e:
        p.error(str(e))
    for model in [m for m in a.models.split(",") if m]:
        deadline = time.time() + 60 * a.minutes if a.minutes else None  # per model
        ckpt = Path(a.checkpoint_dir) / f"{model}.pt"
        if not ckpt.exists():
            print(f"skipping {model}: no checkpoint at {ckpt}")
            continue
        t = time.perf_counter()
        cfg = model_config(a, model, cuda, deadline)
        try:
            finals = run_experiment(cfg)
        except (PreflightError, LogLockedError) as e:  # refused before any work (e.g. a log of other settings)
            print(f"{p.prog}: error: {model}: {e}", file=sys.stderr)
            raise SystemExit(2) from None
        print(f"{model}: {len(finals)} final records in {time.perf_counter() - t:.0f}s")
        if run_status(cfg) == "deadline":  # not the clock: a last stage may end past the deadline, all done
            print(f"{model}: time box reached; re-run the same command to continue")


if __name__ == "__main__":
    main()

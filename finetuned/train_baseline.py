"""Train a baseline ("finetuned" starting point) model from scratch and save it with a JSON sidecar.

Example::

    python -m finetuned.train_baseline --model resnet18 --dataset digits --out out/baselines
    python finetuned/train_baseline.py --model vgg16 --dataset cifar10-jpeg --epochs 100 \\
        --batch-size 512 --lr 0.1 --device cuda

Writes ``<out>/<model>-<dataset>.pt`` (a ``state_dict``, fp32 or ``--fp16``) and
``<out>/<model>-<dataset>.json`` (val/test accuracy, the recipe, sha256 of the .pt, versions, seed,
date, parameter count), both atomically (temp file + ``os.replace``).

Recipe: SGD (nesterov, momentum 0.9) with OneCycleLR stepped per batch, cross-entropy with optional
label smoothing, random crop from 4-px reflect padding (+ horizontal flip except on digits, where
mirroring changes the digit), bf16 autocast + channels_last on CUDA; optionally (``--bn-recalibrate``,
on by default for digits) BN statistics set exactly on augmented train images after the last step.

The digits default (ResNet-18's; AlexNet and VGG-16 have their own, :data:`MODEL_DEFAULTS`) is short
(4.5 epochs, 152 steps) with strong weight decay (0.1): with momentum 0.9 the
decay scales a weight's random-init part by about ``exp(-10 * wd * sum(lr))``, e^-4 here as in 100 CIFAR-10
epochs at 5e-4 (the conv kernels end at ~4 % of their init norm), so they hold learned, low-rank structure
rather than their near-random init: the top 30 % of each 3x3 conv's channel-mode singular values keep ~75 %
of the energy, as in the CIFAR-10 ResNet-18 (78 / 76 %), where 3 epochs at 5e-4 left ~44 %, a random init's
value. The weights shrink so fast that BN's running averages lag them, hence the exact recalibration
(without it, 3 epochs at weight decay 0.1 gave chance accuracy in eval mode, 98.9 % val after it).

A baseline whose val top-1 ends under twice chance did not train: it is refused, not saved
(:func:`check_trained`; ``--allow-chance`` saves it, marked ``at_chance`` in its JSON). ImageNet
architectures train with torchvision's ImageNet normalization, as :mod:`common.run` then evaluates them
(:func:`common.models.normalized_for`).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import hashlib
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import torch
import torchvision
from torch import nn

from common.data.datasets import DATASET_NAMES, load_dataset
from common.data.loader import calibration_loader, make_loader
from common.data.memory import atomic_torch_save
from common.device import resolve_device
from common.files import atomic_write
from common.models import MODEL_NAMES, build_model, count_params, load_checkpoint, normalized_for
from common.paths import REPO
from common.train.bn import bn_recalibrate
from common.train.evaluate import evaluate
from common.train.finetune import finetune

# defaults per dataset; digits: resnet18 trains in ~1.6 min on 2 idle CPU cores (see the module docstring)
_CIFAR10 = {
    "epochs": 100.0,
    "batch_size": 512,
    "lr": 0.1,
    "weight_decay": 5e-4,
    "optimizer": "sgd",
    "bn_recalibrate": 0,
    "hflip": True,
}
DEFAULTS = {
    "digits": {
        "epochs": 4.5,
        "batch_size": 32,
        "lr": 0.05,
        "weight_decay": 0.1,
        "optimizer": "sgd",
        "bn_recalibrate": 4096,
        "hflip": False,
    },
    "cifar10-jpeg": _CIFAR10,
    "cifar10": _CIFAR10,  # the same images, from torchvision's binaries
    "imagefolder": {
        "epochs": 30.0,
        "batch_size": 128,
        "lr": 0.05,
        "weight_decay": 5e-4,
        "optimizer": "sgd",
        "bn_recalibrate": 0,
        "hflip": True,
    },
}
MODEL_DEFAULTS: dict[tuple[str, str], dict] = {
    # AlexNet has no batch norm: ResNet-18's lr 0.05 and weight decay 0.1 left it at chance (val 10.0 %,
    # loss 2.3027), and from its small default init plain SGD sits near chance for five epochs (lr 0.02,
    # 15 epochs: 94 % val); AdamW leaves chance in its second epoch: 94.4 % val after 8 (2026-12-07)
    ("digits", "alexnet"): {"epochs": 8.0, "optimizer": "adamw", "lr": 1e-3, "weight_decay": 0.05},
    # VGG-16 under ResNet-18's recipe ended at 19.8 % val (lr 0.05 with weight decay 5e-4: 21.2 %); at lr
    # 0.02 and weight decay 5e-3 it reached 97.5 % in 4.5 epochs
    ("digits", "vgg16"): {"epochs": 3.0, "lr": 0.02, "weight_decay": 5e-3},
}
"""Where a model needs another recipe than its dataset's :data:`DEFAULTS`: ``(dataset, model)`` -> the
settings that differ."""

CHANCE_MARGIN = 2.0
"""A baseline whose val top-1 is under this many times chance (1 / classes) did not train: refused."""


class UntrainedBaselineError(ValueError):
    """A baseline that ended at chance level: the message names it, its accuracy and what to try."""


def recipe_defaults(model: str, dataset: str) -> dict:
    """The default recipe of ``model`` on ``dataset``: :data:`DEFAULTS` with :data:`MODEL_DEFAULTS` over it."""
    return DEFAULTS[dataset] | MODEL_DEFAULTS.get((dataset, model), {})


def check_trained(stem: str, val_top1: float, num_classes: int, epochs: float) -> None:
    """Refuse a baseline at chance level: val top-1 under :data:`CHANCE_MARGIN` / ``num_classes``.

    Raises:
        UntrainedBaselineError: naming the baseline, its accuracy, chance and the options to change.
    """
    chance = 1.0 / num_classes
    if val_top1 >= CHANCE_MARGIN * chance:
        return
    raise UntrainedBaselineError(
        f"baseline {stem}: val top-1 {val_top1:.1%} after {epochs:g} epochs is chance level ({chance:.1%} for "
        f"{num_classes} classes): the recipe did not train it, so it is not saved. Change --lr, --epochs, "
        "--weight-decay or --optimizer (python -m finetuned.train_baseline -h), or save it anyway with "
        "--allow-chance (marked at_chance in its JSON)"
    )


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    p.add_argument("--model", default="resnet18", choices=MODEL_NAMES)
    p.add_argument("--dataset", default="digits", choices=[d for d in DATASET_NAMES if d != "auto"])
    p.add_argument("--data-root", default=None, help="dataset root (imagefolder/cifar10/cifar10-jpeg)")
    p.add_argument("--out", default=str(REPO / "out" / "baselines"), help="output folder")
    p.add_argument(
        "--epochs",
        type=float,
        default=None,
        help="default: per dataset and model (digits: resnet18 4.5, alexnet 8, vgg16 3)",
    )
    p.add_argument("--batch-size", type=int, default=None, help="default: per dataset (digits 32)")
    p.add_argument(
        "--lr", type=float, default=None, help="OneCycle max lr; default: per dataset and model (digits: resnet18 0.05)"
    )
    p.add_argument(
        "--weight-decay",
        type=float,
        default=None,
        help="default: per dataset and model (digits: resnet18 0.1; else 5e-4)",
    )
    p.add_argument(
        "--optimizer", choices=("sgd", "adamw"), default=None, help="default: per dataset and model (sgd nesterov)"
    )
    p.add_argument(
        "--allow-chance",
        action="store_true",
        help=f"save a baseline whose val top-1 is under {CHANCE_MARGIN:g}x chance (marked at_chance), not refuse it",
    )
    p.add_argument("--label-smoothing", type=float, default=0.0)
    p.add_argument("--pct-start", type=float, default=0.15, help="OneCycle warm-up fraction")
    p.add_argument("--no-augment", action="store_true", help="no random crop / flip")
    p.add_argument(
        "--hflip", choices=["auto", "on", "off"], default="auto", help="horizontal flips (auto: off for digits)"
    )
    p.add_argument("--max-images", type=int, default=None, help="train on a stratified subset")
    p.add_argument(
        "--bn-recalibrate",
        type=int,
        default=None,
        metavar="N",
        help="after training, set BN statistics exactly on N augmented train images (0: keep the running "
        "averages); default: per dataset (digits 4096, i.e. the whole train split, else 0)",
    )
    p.add_argument("--init-weights", default=None, help="local state_dict to start from")
    p.add_argument("--fp16", action="store_true", help="save the state_dict in float16")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def recipe_values(args: argparse.Namespace) -> dict:
    """The recipe to train with: each option given, else the model's default (:func:`recipe_defaults`)."""
    defaults = recipe_defaults(args.model, args.dataset)
    given = {k: getattr(args, k) for k in ("epochs", "batch_size", "lr", "weight_decay", "optimizer", "bn_recalibrate")}
    out = {k: defaults[k] if v is None else v for k, v in given.items()}
    out["hflip"] = defaults["hflip"] if args.hflip == "auto" else args.hflip == "on"
    return out


def train(args: argparse.Namespace, values: dict, data, device: torch.device) -> tuple[nn.Module, list]:
    """A model trained from scratch (or ``--init-weights``) on ``data`` (the loaded dataset) with the recipe
    ``values`` (:func:`recipe_values`), its BN statistics set exactly after the last step when
    ``values["bn_recalibrate"]``; and its history."""
    torch.manual_seed(args.seed)  # weight init
    model = build_model(args.model, num_classes=data.num_classes)
    if args.init_weights:
        load_checkpoint(model, args.init_weights)
    history = finetune(
        model,
        data,
        values["epochs"],
        batch_size=values["batch_size"],
        lr=values["lr"],
        optimizer=values["optimizer"],
        weight_decay=values["weight_decay"],
        schedule="onecycle",
        label_smoothing=args.label_smoothing,
        max_images=args.max_images,
        device=device,
        seed=args.seed,
        pct_start=args.pct_start,
        augment=not args.no_augment,
        hflip=values["hflip"],
        eval_every_epoch=False,
        progress=False if args.no_progress else f"train baseline {args.model}",
        distributed=False,  # one process; under torchrun an experiment trains its missing baseline on rank 0
    )
    model.to(memory_format=torch.contiguous_format)
    if values["bn_recalibrate"] > 0:
        bn_recalibrate(model, calibration_loader(data, values["bn_recalibrate"], args.seed, device=device), device)
    return model, history


def save_state(model: nn.Module, path: Path, fp16: bool) -> None:
    """The model's ``state_dict`` on the CPU (in float16 with ``fp16``), saved atomically to ``path``."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if fp16:
        state = {k: v.half() if v.is_floating_point() else v for k, v in state.items()}
    atomic_torch_save(state, path)


def sidecar_dict(args: argparse.Namespace, values: dict, model: nn.Module, data, pt_path: Path, results: dict) -> dict:
    """The JSON sidecar's content but the history, seconds, device, versions and date (see :func:`main`):
    the saved file, the accuracies of ``results`` (per split), and the recipe (``values``: :func:`recipe_values`)."""
    recipe = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()} | values
    opt = values["optimizer"]
    recipe.update(optimizer="sgd nesterov 0.9" if opt == "sgd" else opt, schedule="onecycle")
    return {
        "model": args.model,
        "dataset": args.dataset,
        "data_source": data.source,
        "file": pt_path.name,
        "sha256": sha256_file(pt_path),
        "dtype": "float16" if args.fp16 else "float32",
        "params": count_params(model),
        "num_classes": data.num_classes,
        "accuracy": {s: r["top1"] for s, r in results.items()},
        "at_chance": results["val"]["top1"] < CHANCE_MARGIN / data.num_classes,
        "top5": {s: r["top5"] for s, r in results.items()},
        "loss": {s: r["loss"] for s, r in results.items()},
        "n": {s: r["n"] for s, r in results.items()},
        "recipe": recipe,
    }


def main(argv: Sequence[str] | argparse.Namespace | None = None) -> dict:
    """Train, evaluate and save one baseline; return the sidecar dict (also written as JSON)."""
    args = argv if isinstance(argv, argparse.Namespace) else parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    values = recipe_values(args)
    device = resolve_device(args.device)

    t0 = time.perf_counter()
    data, normalization = normalized_for(args.model, load_dataset(args.dataset, root=args.data_root))
    model, history = train(args, values, data, device)
    results = {
        split: evaluate(model, make_loader(data, split, 256, device=device), device) for split in ("val", "test")
    }
    train_seconds = time.perf_counter() - t0

    out = Path(args.out)
    stem = f"{args.model}-{args.dataset}"
    if not args.allow_chance:
        check_trained(stem, results["val"]["top1"], data.num_classes, values["epochs"])
    elif results["val"]["top1"] < CHANCE_MARGIN / data.num_classes:
        print(f"warning: baseline {stem} is at chance level; saved anyway (--allow-chance)", file=sys.stderr)
    pt_path = out / f"{stem}.pt"
    save_state(model, pt_path, args.fp16)
    sidecar = {
        **sidecar_dict(args, values, model, data, pt_path, results),
        "normalization": normalization,
        "history": history,
        "seed": args.seed,
        "seconds": train_seconds,
        "device": str(device),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }
    text = json.dumps(sidecar, indent=1) + "\n"
    atomic_write(out / f"{stem}.json", lambda fh: fh.write(text.encode()))
    if not args.no_progress:
        print(
            f"{stem}: val {results['val']['top1']:.4f} test {results['test']['top1']:.4f} "
            f"in {train_seconds:.1f}s -> {pt_path}"
        )
    return sidecar


if __name__ == "__main__":
    try:
        main()
    except UntrainedBaselineError as e:  # named, no traceback: the numbers are the message
        print(f"python -m finetuned.train_baseline: error: {e}", file=sys.stderr)
        raise SystemExit(1) from None

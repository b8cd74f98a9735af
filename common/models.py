"""Model constructors and checkpoint loading.

CIFAR variants (32x32 inputs) follow ``../shared/checkpoints/cifar10-jpeg/README.md`` exactly:
torchvision constructors with a few modules swapped, so state_dict keys are torchvision's.

* ``resnet18``: ``resnet18(num_classes)``, ``conv1`` = 3x3/s1/p1 conv without bias, ``maxpool`` = identity.
* ``vgg16``: ``vgg16_bn(num_classes)``, ``avgpool`` = ``AdaptiveAvgPool2d(1)``, ``classifier`` =
  ``Linear(512, num_classes)``.
* ``alexnet``: ``alexnet(num_classes)``, ``features[0]`` = 5x5/s1/p2 conv 3->64 with bias,
  ``avgpool`` = ``AdaptiveAvgPool2d(3)``, classifier Linear layers 2304->1024->1024->num_classes.

ImageNet variants (224x224 inputs, torchvision as is, ``weights=None``; never downloads):
``resnet18_imagenet``, ``vgg16_imagenet`` (plain ``vgg16``, no batch norm, as in the
decomposition literature), ``alexnet_imagenet``, ``mobilenet_v2_imagenet``. Pass ``weights_path``
to load a local state_dict file.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
import torchvision.models as tvm

from common.data.splits import DatasetSplits
from common.paths import CHECKPOINT_DIR

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""torchvision's ImageNet normalization: what its (and most published) ImageNet weights were trained with."""


def _resnet18_cifar(num_classes: int) -> nn.Module:
    m = tvm.resnet18(weights=None, num_classes=num_classes)
    m.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
    m.maxpool = nn.Identity()
    return m


def _vgg16_cifar(num_classes: int) -> nn.Module:
    m = tvm.vgg16_bn(weights=None, num_classes=num_classes)
    m.avgpool = nn.AdaptiveAvgPool2d((1, 1))
    m.classifier = nn.Linear(512, num_classes)
    return m


def _alexnet_cifar(num_classes: int) -> nn.Module:
    m = tvm.alexnet(weights=None, num_classes=num_classes)
    m.features[0] = nn.Conv2d(3, 64, kernel_size=5, stride=1, padding=2, bias=True)
    m.avgpool = nn.AdaptiveAvgPool2d((3, 3))
    m.classifier[1] = nn.Linear(2304, 1024)
    m.classifier[4] = nn.Linear(1024, 1024)
    m.classifier[6] = nn.Linear(1024, num_classes)
    return m


# name -> (constructor(num_classes), default num_classes, input size)
_REGISTRY: dict[str, tuple[Callable[[int], nn.Module], int, int]] = {
    "resnet18": (_resnet18_cifar, 10, 32),
    "vgg16": (_vgg16_cifar, 10, 32),
    "alexnet": (_alexnet_cifar, 10, 32),
    "resnet18_imagenet": (lambda n: tvm.resnet18(weights=None, num_classes=n), 1000, 224),
    "vgg16_imagenet": (lambda n: tvm.vgg16(weights=None, num_classes=n), 1000, 224),
    "alexnet_imagenet": (lambda n: tvm.alexnet(weights=None, num_classes=n), 1000, 224),
    "mobilenet_v2_imagenet": (lambda n: tvm.mobilenet_v2(weights=None, num_classes=n), 1000, 224),
}
MODEL_NAMES: tuple[str, ...] = tuple(_REGISTRY)


def input_size(name: str) -> int:
    """Native input resolution (H = W) of model ``name``."""
    _check_name(name)
    return _REGISTRY[name][2]


def normalized_for(
    name: str, data: DatasetSplits, mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None
) -> tuple[DatasetSplits, dict]:
    """``data`` fed with the normalization model ``name`` expects, and where it comes from.

    ``mean``/``std`` given (the statistics the user's weights were trained with) win; else an ImageNet
    architecture (``*_imagenet``) gets :data:`IMAGENET_MEAN` / :data:`IMAGENET_STD`; else the dataset's own
    (for cifar10 and cifar10-jpeg the fixed CIFAR-10 statistics the shared baselines were trained with,
    for digits and an ImageFolder the train split's, estimated when loaded).

    Returns:
        ``(data, {"mean", "std", "source"})`` with ``source`` one of ``"given"``, ``"imagenet"``, ``"dataset"``.

    Raises:
        ValueError: an unknown model, or a normalization :func:`common.data.splits.check_normalization` refuses.
    """
    _check_name(name)
    if mean is not None or std is not None:
        data, source = data.normalized(mean, std), "given"
    elif name.endswith("_imagenet"):
        data, source = data.normalized(IMAGENET_MEAN, IMAGENET_STD), "imagenet"
    else:
        source = "dataset"
    return data, {"mean": list(data.mean), "std": list(data.std), "source": source}


def _check_name(name: str) -> None:
    if name not in _REGISTRY:
        raise ValueError(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}")


def build_model(name: str, num_classes: int | None = None, weights_path: str | Path | None = None) -> nn.Module:
    """Build model ``name`` with fresh (seeded by the global RNG) weights, fp32, train mode.

    Args:
        name: one of ``MODEL_NAMES``.
        num_classes: output classes; default 10 for CIFAR variants, 1000 for ImageNet variants.
        weights_path: optional local state_dict file loaded with :func:`load_checkpoint`.

    Raises:
        ValueError: unknown name (valid names are listed).
    """
    _check_name(name)
    ctor, default_classes, _ = _REGISTRY[name]
    model = ctor(default_classes if num_classes is None else num_classes)
    if weights_path is not None:
        load_checkpoint(model, weights_path)
    return model


def _extract_state_dict(obj, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if key in obj and isinstance(obj[key], dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise ValueError(
            f"{path} does not hold a state_dict (a dict of tensors, or a dict with a 'model'/'state_dict' entry)"
        )
    if obj and all(k.startswith("module.") for k in obj):  # saved from a DDP wrapper
        obj = {k[len("module.") :]: v for k, v in obj.items()}
    return obj


_EXPECTED = "a state_dict saved by torch.save (a dict of tensors, plain or under a 'model'/'state_dict' key)"


def _unreadable(exc: Exception) -> str:
    """Why ``torch.load`` could not read a file, in words (not PyTorch's advice to unpickle anything)."""
    if isinstance(exc, EOFError):
        return "the file ends early (truncated)"
    text = str(exc)
    if "Weights only load failed" in text:
        return (
            "it is no torch.save file of tensors (unreadable bytes, or pickled Python objects, which are never loaded)"
        )
    if "zip archive" in text:
        return "its torch.save archive is cut off or damaged"
    return f"{type(exc).__name__}: {text.splitlines()[0][:120] if text else 'unreadable'}"


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """The state_dict in ``path`` (CPU tensors, as saved; ``module.`` prefixes of DDP dropped).

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` is a directory, empty, unreadable or holds no state_dict, naming the path
            and what was expected.
    """
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"checkpoint {path} is a directory; expected {_EXPECTED}")
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    if path.stat().st_size == 0:
        raise ValueError(f"checkpoint {path} is empty (0 bytes); expected {_EXPECTED}")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every way a file is unreadable gets the same named error
        raise ValueError(f"checkpoint {path} could not be read: {_unreadable(exc)}; expected {_EXPECTED}") from None
    return _extract_state_dict(obj, path)


def load_checkpoint(model: nn.Module, path: str | Path) -> nn.Module:
    """Load a state_dict file into ``model`` strictly, casting fp16/bf16 floats to fp32.

    Accepts a plain state_dict, or a dict with a ``"model"`` or ``"state_dict"`` entry.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        ValueError: ``path`` holds no state_dict (:func:`read_state_dict`); the keys or shapes do not match ``model`` (missing, unexpected and mismatched
            keys are listed, with the path).
    """
    path = Path(path)
    sd = read_state_dict(path)
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    problems = state_dict_mismatch({k: tuple(v.shape) for k, v in model.state_dict().items()}, sd)
    if problems:
        raise ValueError(f"checkpoint {path} does not match {type(model).__name__}: " + "; ".join(problems))
    model.load_state_dict(sd, strict=True)
    return model


def state_dict_mismatch(shapes: dict[str, tuple[int, ...]], state: dict[str, torch.Tensor]) -> list[str]:
    """How ``state`` differs from a model whose state_dict has ``shapes``: its missing keys, unexpected keys
    and shape mismatches, each a phrase listing the first eight (empty: it fits)."""
    missing = [k for k in shapes if k not in state]
    unexpected = [k for k in state if k not in shapes]
    mismatched = [
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {shapes[k]}"
        for k in shapes
        if k in state and tuple(state[k].shape) != shapes[k]
    ]

    def fmt(items: list[str]) -> str:
        return ", ".join(items[:8]) + (f", ... ({len(items)} in all)" if len(items) > 8 else "")

    parts = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", mismatched))
    return [f"{label} [{fmt(items)}]" for label, items in parts if items]


@functools.cache
def _architecture(name: str) -> tuple[dict[str, tuple[int, ...]], frozenset[str]]:
    """The state_dict shapes of model ``name`` (default classes; built on the meta device, so nothing is
    allocated) and the keys of its classifier (the last ``Linear``), whose first dimension is the classes."""
    with torch.device("meta"):
        m = build_model(name)
    head = [n for n, mod in m.named_modules() if isinstance(mod, nn.Linear)][-1]
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}, frozenset({f"{head}.weight", f"{head}.bias"})


def architecture_problems(name: str, state: dict[str, torch.Tensor]) -> list[str]:
    """Why ``state`` is no state_dict of model ``name`` (:func:`state_dict_mismatch`), for any number of
    classes (the classifier's first dimension may differ); empty when it is one."""
    shapes, head = _architecture(name)
    shapes = {
        k: tuple(state[k].shape) if k in head and k in state and tuple(state[k].shape)[1:] == s[1:] else s
        for k, s in shapes.items()
    }
    return state_dict_mismatch(shapes, state)


def architectures_of(state: dict[str, torch.Tensor]) -> list[str]:
    """The registered models whose state_dict ``state`` is (:func:`architecture_problems` finds nothing), in
    registry order."""
    return [name for name in MODEL_NAMES if not architecture_problems(name, state)]


def manifest(checkpoint_dir: str | Path = CHECKPOINT_DIR) -> dict:
    """The parsed ``manifest.json`` of a checkpoint folder.

    Raises:
        FileNotFoundError: naming the missing manifest path.
    """
    path = Path(checkpoint_dir) / "manifest.json"
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint manifest not found: {path}")
    with open(path) as fh:
        return json.load(fh)


def load_baseline(name: str, checkpoint_dir: str | Path = CHECKPOINT_DIR) -> nn.Module:
    """The trained CIFAR baseline ``name`` from ``checkpoint_dir/<name>.pt``: fp32, eval mode, CPU."""
    model = build_model(name)
    load_checkpoint(model, Path(checkpoint_dir) / f"{name}.pt")
    return model.float().eval()


def baseline_or_random(
    name: str, weights: str = "baseline", checkpoint_dir: str | Path = CHECKPOINT_DIR
) -> tuple[nn.Module, str]:
    """``(model, "baseline")`` from ``checkpoint_dir`` when ``weights == "baseline"`` and the checkpoint
    is there, else ``(model, "random")`` with seeded random weights (eval mode): for timings, which do not
    depend on the trained values."""
    if weights == "baseline" and (Path(checkpoint_dir) / f"{name}.pt").is_file():
        return load_baseline(name, checkpoint_dir), "baseline"
    torch.manual_seed(0)
    return build_model(name).eval(), "random"


def count_params(model: nn.Module) -> int:
    """Number of parameters (not buffers)."""
    return sum(p.numel() for p in model.parameters())

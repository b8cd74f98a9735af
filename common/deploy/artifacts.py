"""Compressed models as self-describing files: save one, and load it back with nothing else.

An *artifact* holds what it takes to rebuild a compressed model and to know what it is: the base
model's name and number of classes, the input size and normalization it expects, the plan (which
layers are factorized, by which method, at which ranks), the state dict, the metrics of the run's
``final`` record, the run's identity and the versions that made it. :func:`load_compressed` rebuilds
the ``nn.Module`` from the file alone (no dense checkpoint, no data) with ``torch.load(weights_only=
True)``, so opening an artifact executes no code from it.

The file is written atomically (:func:`common.files.atomic_write`) and carries a SHA-256 of all it
holds, metadata (normalization, metrics, plan, versions, run) and tensors: a truncated file, a changed
tensor or value, or a plan that does not fit its state dict is refused with an :class:`ArtifactError`
naming the file (and the layer, where one is at fault). Files of the first format
(``htd-compressed-model/1``, whose checksum covers the plan and tensors only) still load, with a
warning that their other contents are unchecked.

An artifact written by a run names its ``owner``: the run's log file. A write never replaces another
run's artifact (:func:`check_replace`): one whose owner is another log that still exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from common.decompose.surgery import apply_plan, plan_from_dict, plan_to_dict
from common.files import atomic_write
from common.models import build_model

FORMAT = "htd-compressed-model/2"
FORMAT_V1 = "htd-compressed-model/1"
"""The first format: its ``content_sha256`` covers the plan and the tensors only."""

__all__ = [
    "FORMAT",
    "ArtifactError",
    "artifact_name",
    "artifact_owner",
    "check_replace",
    "file_sha256",
    "load_compressed",
    "read_artifact",
    "save_artifact",
]


class ArtifactError(ValueError):
    """An artifact file that cannot be used as one: the message names the file and what is wrong."""


def artifact_name(method: str, target: float, decomposition: str, finetuned: bool) -> str:
    """``<method>-x<target>-<decomposition>[-ft].pt``: one file per final model of a run."""
    return f"{method}-x{target:g}-{decomposition}{'-ft' if finetuned else ''}.pt"


def _tensors_sha256(h, state: Mapping[str, torch.Tensor]) -> str:
    """``h`` updated with every tensor's name, dtype, shape and bytes (in name order); its hex digest."""
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _content_sha256(doc: Mapping[str, Any]) -> str:
    """SHA-256 over everything an artifact holds but the checksum itself: every other value as canonical
    JSON (floats exactly: a flipped bit of the mean changes it), then every tensor."""
    meta = {k: v for k, v in doc.items() if k not in ("state_dict", "content_sha256")}
    return _tensors_sha256(hashlib.sha256(_canonical(meta)), doc["state_dict"])


def _content_sha256_v1(plan: Mapping, state: Mapping[str, torch.Tensor]) -> str:
    """The checksum of :data:`FORMAT_V1` files: the plan (canonical JSON) and the tensors."""
    return _tensors_sha256(hashlib.sha256(_canonical(plan)), state)


def _canonical(value: Any) -> bytes:
    return json.dumps(value, sort_keys=True, separators=(",", ":")).encode()


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (what the run log records next to an artifact's path)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _versions() -> dict[str, str]:
    import torchvision

    return {
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "python": platform.python_version(),
    }


def save_artifact(
    path: str | os.PathLike,
    model: nn.Module | Mapping[str, torch.Tensor],
    plan: Mapping,
    *,
    base_model: str,
    num_classes: int,
    input_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    metrics: Mapping[str, Any] | None = None,
    extra: Mapping[str, Any] | None = None,
    owner: str | os.PathLike | None = None,
) -> dict:
    """Write a compressed model (or its state dict) and what describes it to ``path``, atomically.

    Args:
        model: the compressed model, or its ``state_dict``.
        plan: ``{layer: LayerPlan}`` (or its :func:`common.decompose.surgery.plan_to_dict` form) it was built with.
        base_model: :func:`common.models.build_model` name of the dense architecture.
        input_size: side of the square inputs it was evaluated on; ``mean``/``std``: their normalization.
        metrics: numbers to keep with it (e.g. the ``final`` record's accuracies, params, MACs).
        extra: anything else JSON-like (run id, method, target, seed, dataset, stage).
        owner: the log of the run that writes it (kept absolute); ``path`` is not replaced when it is
            another run's (:func:`check_replace`).

    Returns:
        ``{"path", "sha256"}``: the file and the SHA-256 of its bytes.

    Raises:
        ArtifactError: ``path`` holds another run's artifact, or a file that is no readable artifact.
    """
    plan_dict = plan_to_dict(plan_from_dict(plan) if _is_dict_form(plan) else plan)
    state = model.state_dict() if isinstance(model, nn.Module) else model
    state = {k: v.detach().cpu().clone() for k, v in state.items()}
    payload = {
        "format": FORMAT,
        "model": str(base_model),
        "num_classes": int(num_classes),
        "input_size": int(input_size),
        "mean": [float(v) for v in mean],
        "std": [float(v) for v in std],
        "plan": plan_dict,
        "metrics": _plain(metrics or {}),
        "extra": _plain(extra or {}),
        "versions": _versions(),
        "owner": None if owner is None else str(Path(owner).resolve()),
        "state_dict": state,
    }
    payload["content_sha256"] = _content_sha256(payload)
    check_replace(path, payload["owner"])
    out = atomic_write(path, lambda fh: torch.save(payload, fh))
    return {"path": str(out), "sha256": file_sha256(out)}


def _is_dict_form(plan: Mapping) -> bool:
    """Whether ``plan`` is the JSON form (``{name: {"method", "ranks"}}``) rather than LayerPlans."""
    return any(isinstance(v, Mapping) for v in plan.values())


def _plain(d: Mapping[str, Any]) -> dict:
    """JSON-like copy (numbers, strings, lists, dicts, None) so ``weights_only`` loading accepts it."""
    return json.loads(json.dumps(dict(d), default=float))


def read_artifact(path: str | os.PathLike) -> dict:
    """The artifact's contents, checked: every key of :func:`save_artifact` and an intact checksum.

    Raises:
        ArtifactError: a missing, unreadable or truncated file, another format, missing keys, or
            tensors or plan that differ from those the file was written with.
    """
    p = Path(path)
    if not p.is_file():
        raise ArtifactError(f"artifact {p}: no such file")
    try:
        doc = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # truncated zip, not a torch file, a pickle with code in it, ...
        raise ArtifactError(f"artifact {p} is unreadable ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, FORMAT_V1):
        raise ArtifactError(f"{p} is not a compressed-model artifact (format {FORMAT})")
    required = ("model", "num_classes", "input_size", "mean", "std", "plan", "metrics", "state_dict", "content_sha256")
    missing = [k for k in required if k not in doc]
    if missing:
        raise ArtifactError(f"artifact {p} lacks {', '.join(missing)}")
    if doc["format"] == FORMAT_V1:
        intact = _content_sha256_v1(doc["plan"], doc["state_dict"]) == doc["content_sha256"]
    else:
        intact = _content_sha256(doc) == doc["content_sha256"]
    if not intact:
        raise ArtifactError(
            f"artifact {p}: its contents differ from those it was written with (checksum mismatch); "
            "the file was modified or damaged"
        )
    if doc["format"] == FORMAT_V1:
        warnings.warn(
            f"artifact {p} is of the first format ({FORMAT_V1}): its checksum covers its plan and tensors "
            "only, so its mean/std, metrics and other values are unchecked; re-run its stage to write a "
            f"fully checked file ({FORMAT})",
            stacklevel=2,
        )
    return doc


def artifact_owner(path: str | os.PathLike) -> str | None:
    """The log of the run that wrote the artifact at ``path`` (None: written without one, e.g. format /1).
    Reads the file's metadata only (its tensors are mapped, not read).

    Raises:
        ArtifactError: the file is unreadable or no artifact.
    """
    try:
        doc = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # not a zip-format torch file, a pickle with code in it, ...
        raise ArtifactError(f"{path} is no readable artifact ({type(exc).__name__}: {exc})") from None
    if not isinstance(doc, dict) or doc.get("format") not in (FORMAT, FORMAT_V1):
        raise ArtifactError(f"{path} is not a compressed-model artifact (format {FORMAT})")
    owner = doc.get("owner")
    return owner if isinstance(owner, str) else None


def check_replace(path: str | os.PathLike, owner: str | None) -> None:
    """Refuse to replace ``path`` unless it is missing, or an artifact of this run (``owner``, its log),
    of no recorded run, or of a run whose log is gone (deleted: nothing refers to the file any more).

    Raises:
        ArtifactError: ``path`` is another run's artifact (naming that run's log) or no readable
            artifact; the file is left as it is.
    """
    p = Path(path)
    if not p.exists():
        return
    try:
        other = artifact_owner(p)
    except ArtifactError as exc:
        raise ArtifactError(f"{exc}; it is not replaced: move or delete it") from None
    if other is not None and other != owner and Path(other).exists():
        raise ArtifactError(
            f"artifact {p} belongs to another run, whose log is {other} (this run's log: {owner}); it is not "
            "replaced. Give this run its own artifacts folder (--artifacts-dir) or run id, or delete that file"
        )


def load_compressed(path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the compressed model of an artifact, in eval mode on ``device``, from the file alone.

    The dense architecture is built without weights (on the meta device), the plan's factorized
    layers replace their convs with the right shapes, and the state dict is loaded strictly.

    Raises:
        ArtifactError: see :func:`read_artifact`; also an unknown base model, a plan naming a layer the
            architecture lacks, or a state dict that does not fit the plan (named by layer).
    """
    doc = read_artifact(path)
    try:
        with torch.device("meta"):
            dense = build_model(doc["model"], num_classes=doc["num_classes"])
        model = apply_plan(dense, plan_from_dict(doc["plan"]), init="empty", inplace=True)
    except (KeyError, ValueError, TypeError) as exc:
        raise ArtifactError(f"artifact {path}: its plan does not fit model {doc['model']!r}: {exc}") from None
    _check_fit(path, model.state_dict(), doc["state_dict"])
    model = model.to_empty(device=device)
    model.load_state_dict(doc["state_dict"], strict=True)
    return model.eval()


def _check_fit(path: str | os.PathLike, own: Mapping[str, torch.Tensor], state: Mapping[str, torch.Tensor]) -> None:
    """Refuse a state dict whose tensors do not match the rebuilt model's, naming the tensors."""
    problems = []
    shapes = sorted(k for k, v in state.items() if k in own and tuple(own[k].shape) != tuple(v.shape))
    if shapes:
        problems.append(
            "shapes differ for " + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in shapes)
        )
    for what, keys in (("missing", own.keys() - state.keys()), ("unexpected", state.keys() - own.keys())):
        if keys:
            problems.append(f"{what}: {', '.join(sorted(keys))}")
    if problems:
        raise ArtifactError(f"artifact {path}: its state dict does not fit its plan: {'; '.join(problems)}")

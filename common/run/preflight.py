"""What :func:`common.run.experiment.run_experiment` checks before it works, and what it compares on resume.

Before any data or model work, and before a new log file is made: the log and cache folders must be
writable (:func:`check_writable`; ``HTD_CACHE`` naming a file fails here, not after a baseline was
trained), so must the artifacts folder, which must hold no other run's artifact
(:func:`check_artifacts_folder`); a data root must be a folder (:func:`check_data_root`) and the dataset's
folders must be there (:func:`check_data`: an ImageFolder's ``train/``, ``val/`` and ``test/``), and an
explicit checkpoint must be a readable state_dict of the model whose every floating tensor is finite
(:func:`inspect_checkpoint`, which also returns the SHA-256 of its bytes; a state_dict of another
registered architecture is named: :func:`check_architecture`). Once the model's conv layers are known, every target
must be reachable (:func:`check_targets`). Each failure is a :class:`PreflightError` naming what to fix.

A run's log records the identity of its inputs in its ``config`` record (:func:`input_identity`:
``checkpoint_sha256`` and ``dataset_identity``). Resuming a log compares them, with the settings that
affect results (:func:`resume_changes`), and refuses any difference (:func:`refuse_resume`). A log
whose run failed before its baseline was logged holds no result: it is moved aside to
``<log>.failed-<n>`` (:func:`rotate_failed`) and the run starts over under the same id, so it can be
re-run with corrected arguments.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from common.data.datasets import check_layout
from common.data.splits import SPLITS, DatasetSplits, content_fingerprint
from common.decompose.surgery import LayerInfo
from common.deploy.artifacts import ArtifactError, check_replace
from common.models import MODEL_NAMES, architecture_problems, architectures_of, read_state_dict
from common.paths import CHECKPOINT_DIR, REPO, default_cache_dir
from common.run.config import RESUME_FIELDS, ExperimentConfig
from common.search.space import SearchSpace, check_reachable
from finetuned.train_baseline import UntrainedBaselineError
from finetuned.train_baseline import main as train_baseline

__all__ = [
    "PreflightError",
    "check_architecture",
    "check_artifacts_folder",
    "check_data",
    "check_data_root",
    "check_targets",
    "check_writable",
    "input_identity",
    "inspect_checkpoint",
    "refuse_resume",
    "resolve_checkpoint",
    "resume_changes",
    "unrecorded_inputs",
    "rotate_failed",
]


class PreflightError(ValueError):
    """A run refused before it works (or before it resumes a log): the message says what to fix."""


def check_writable(folder: str | os.PathLike, what: str) -> Path:
    """``folder``, created if missing, after a probe file was written to it and removed.

    Raises:
        PreflightError: it is a file, or cannot be created or written (naming it and ``what`` it is).
    """
    path = Path(folder)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(dir=path, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        kind = "a file" if path.is_file() else "not writable"
        raise PreflightError(f"{what} {path} is {kind}: {exc.strerror or exc}; it must be a writable folder") from None
    return path


def check_artifacts_folder(folder: str | os.PathLike, log_path: str | os.PathLike) -> Path:
    """The run's artifacts folder, writable (:func:`check_writable`), and no file in it another run's
    (:func:`common.deploy.artifacts.check_replace`, with the run's log as the owner).

    Raises:
        PreflightError: the folder cannot be written, or holds another run's artifact (named).
    """
    path = check_writable(folder, "artifacts folder")
    owner = str(Path(log_path).resolve())
    for file in sorted(path.glob("*.pt")):
        try:
            check_replace(file, owner)
        except ArtifactError as exc:
            raise PreflightError(str(exc)) from None
    return path


def check_data_root(cfg: ExperimentConfig) -> None:
    """A given ``data_root`` must be a folder (digits, embedded, reads none).

    Raises:
        PreflightError: naming the option and the path.
    """
    if cfg.data_root is not None and cfg.dataset != "digits" and not Path(cfg.data_root).is_dir():
        what = "a file" if Path(cfg.data_root).exists() else "missing"
        raise PreflightError(f"data_root {cfg.data_root} is {what}; it must be the dataset's folder (--data-root DIR)")


def inspect_checkpoint(path: str | os.PathLike, model: str | None = None) -> str:
    """The SHA-256 of a checkpoint's bytes, once it is known to hold a finite state_dict (of ``model``,
    when given: :func:`check_architecture`).

    Raises:
        PreflightError: ``path`` is missing, a directory, empty, unreadable, no state_dict
            (:func:`common.models.read_state_dict`), a tensor holds NaN or inf (naming it), or the
            state_dict is not one of ``model``.
    """
    path = Path(path)
    try:
        state = read_state_dict(path)
    except (OSError, ValueError) as exc:
        raise PreflightError(str(exc)) from None
    for name, tensor in state.items():
        if tensor.is_floating_point() or tensor.is_complex():
            bad = int((~torch.isfinite(tensor)).sum())
            if bad:
                raise PreflightError(
                    f"checkpoint {path}: tensor {name!r} has {bad} non-finite value(s) (NaN or inf) of "
                    f"{tensor.numel()}; these weights cannot be compressed or evaluated"
                )
    if model is not None:
        check_architecture(model, state, path)
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_architecture(model: str, state: dict[str, torch.Tensor], path: str | os.PathLike) -> None:
    """``state`` (read from ``path``) must be a state_dict of ``model``, for any number of classes.

    Raises:
        PreflightError: naming the registered architecture(s) it is a state_dict of (``--model`` to use),
            or else how it differs from ``model`` (:func:`common.models.architecture_problems`).
    """
    problems = architecture_problems(model, state)
    if not problems:
        return
    others = architectures_of(state)
    if others:
        raise PreflightError(
            f"checkpoint {path} holds a {' / '.join(others)} state_dict (every tensor's name and shape fit it), "
            f"not a {model} one: use --model {others[0]} (a notebook: MODEL = {others[0]!r})"
        )
    raise PreflightError(
        f"checkpoint {path} is no {model} state_dict, nor one of any other model ({', '.join(MODEL_NAMES)}): "
        + "; ".join(problems)
    )


def check_data(cfg: ExperimentConfig) -> None:
    """The dataset's files are where ``cfg`` says (:func:`common.data.datasets.check_layout`).

    Raises:
        PreflightError: naming the missing root or split folder.
    """
    try:
        check_layout(cfg.dataset, cfg.data_root)
    except (FileNotFoundError, ValueError) as exc:
        raise PreflightError(str(exc)) from None


def input_identity(data: DatasetSplits, checkpoint_sha256: str | None) -> dict:
    """What a run's results depend on beyond its settings: the checkpoint's bytes (None: random init)
    and the dataset as loaded (resolved name, root, split sizes, each split's content fingerprint
    (:func:`common.data.splits.content_fingerprint`: an ImageFolder's file names, sizes and labels, or the
    pixels and labels in memory); streamed or not, and the crop size, when streamed). Logged in the
    ``config`` record."""
    sizes = {s: int(len(data.split(s).labels)) for s in SPLITS}
    content = {s: content_fingerprint(data.split(s)) for s in SPLITS}
    identity = {"name": data.name, "root": data.source, "sizes": sizes, "content": content}
    if getattr(data, "streaming", False):  # other transforms than in memory (and logs before streaming lack it)
        identity |= {"streamed": True, "image_size": int(data.image_size)}
    return {"checkpoint_sha256": checkpoint_sha256, "dataset_identity": identity}


def resume_changes(prev: dict, cfg: ExperimentConfig, device: torch.device, inputs: dict | None = None) -> list:
    """``(field, logged, now)`` for every :data:`common.run.config.RESUME_FIELDS` field (``device`` by its
    type) and, given ``inputs`` (:func:`input_identity`), every input identity where this run differs
    from the logged ``config`` record; the dataset's part by part (``dataset_identity.content.test``
    names the test split's content). What an older log does not record is not compared
    (:func:`unrecorded_inputs` says what)."""
    now = json.loads(json.dumps(dataclasses.asdict(cfg))) | {"device_type": device.type}
    if prev.get("finetune") is False:  # older logs: a finetune switch beside the epochs; off = 0 epochs
        prev = {**prev, "finetune_epochs": 0.0}
    keys = [("device_type" if name == "device" else name, name) for name in RESUME_FIELDS]
    # == after JSON: 3 == 3.0, tuples are lists
    out = [(name, prev[key], now[key]) for key, name in keys if key in prev and prev[key] != now[key]]
    for key, value in json.loads(json.dumps(inputs or {})).items():
        if key in prev:
            out += _changes(key, prev[key], value)
    return out


def _changes(name: str, logged: object, now: object) -> list[tuple[str, object, object]]:
    """Where ``now`` differs from ``logged``, naming each part of a dict (``a.b.c``); a part the log
    lacks is not compared, one only the log has differs."""
    if not (isinstance(logged, dict) and isinstance(now, dict)):
        return [] if logged == now else [(name, logged, now)]
    out = []
    for key in sorted(logged.keys() | now.keys()):
        if key in logged:
            out += _changes(f"{name}.{key}", logged[key], now.get(key))
    return out


def unrecorded_inputs(prev: dict) -> list[str]:
    """The input identities a resumed run cannot compare because its log (older) did not record them."""
    dataset = prev.get("dataset_identity")
    if isinstance(dataset, dict) and "content" not in dataset:
        return ["the dataset's content (each split's fingerprint: its files' names, sizes and labels, or its pixels)"]
    return []


def refuse_resume(run_id: str, log_path: Path, changes: Sequence[tuple[str, object, object]]) -> None:
    """Raise the :class:`PreflightError` that lists each difference and the ways out (no-op without any)."""
    if not changes:
        return
    lines = "\n".join(f"  {name}: logged {old!r}, now {new!r}" for name, old, new in changes)
    inputs = [n for n, _, _ in changes if n == "checkpoint_sha256" or n.startswith("dataset_identity")]
    splits = sorted({n.split(".")[2] for n in inputs if n.startswith("dataset_identity.content.")})
    back = "" if inputs else "To resume that run, set these back to the logged values. "
    raise PreflightError(
        f"run id {run_id!r} already has a log, {log_path}, whose config differs in "
        f"{', '.join(name for name, _, _ in changes)}:\n{lines}\n"
        + ("(the checkpoint's bytes or the dataset are not those the run started with)\n" if inputs else "")
        + (f"(the images or labels of the {', '.join(splits)} split(s) changed)\n" if splits else "")
        + f"Resuming it would mix results of different settings or inputs. {back}Either start a separate "
        "run: give another run id, or none (run_id / RUN_ID = None: the default run id hashes every setting "
        f"that affects results, so these settings get their own log); or delete the log {log_path} to redo "
        "this run from scratch."
    )


def resolve_checkpoint(cfg: ExperimentConfig, data, lone_process: bool = False) -> Path | None:
    """The baseline weights to compress: explicit path, shared baseline, or a cached trained one.

    ``lone_process``: train a missing baseline in a child process with the threads a process started
    on its own gets (without ``torchrun``'s ``OMP_NUM_THREADS=1``): CPU training is not bitwise the same
    across thread counts, and the cached baseline must be the file a single-process run trains.
    """
    if cfg.checkpoint not in (None, "auto"):
        p = Path(cfg.checkpoint)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        return p
    if data.name == "cifar10-jpeg" and (CHECKPOINT_DIR / f"{cfg.model}.pt").exists():
        return CHECKPOINT_DIR / f"{cfg.model}.pt"
    if cfg.checkpoint is None:
        return None
    # No shared baseline for this dataset: train one once and cache it (the embedded default path).
    out = default_cache_dir() / "baselines"
    pt = out / f"{cfg.model}-{cfg.dataset if cfg.dataset != 'auto' else data.name}.pt"
    if not pt.exists():
        args = [
            "--model",
            cfg.model,
            "--dataset",
            data.name,
            "--out",
            str(out),
            "--seed",
            str(cfg.seed),
            "--device",
            cfg.device,
        ]
        if cfg.data_root:
            args += ["--data-root", cfg.data_root]
        if not cfg.progress:
            args.append("--no-progress")
        if not lone_process:
            try:
                train_baseline(args)
            except UntrainedBaselineError as exc:  # named, before the run's baseline: a usage error
                raise PreflightError(str(exc)) from None
            return pt
        if cfg.threads:  # a lone run_experiment sets them before training
            args += ["--threads", str(cfg.threads)]
        env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
        subprocess.run([sys.executable, "-m", "finetuned.train_baseline", *args], check=True, env=env)
    return pt


def rotate_failed(log_path: Path) -> Path:
    """Move a log aside to the first free ``<log>.failed-<n>`` (n = 1, 2, ...); returns the new path."""
    n = 1
    while (target := log_path.with_name(f"{log_path.name}.failed-{n}")).exists():
        n += 1
    os.replace(log_path, target)
    return target


def check_targets(cfg: ExperimentConfig, layers: Sequence[LayerInfo], decompositions: Sequence[str]) -> None:
    """Every target reachable by some plan of each decomposition (:func:`common.search.space.check_reachable`).

    Raises:
        PreflightError: naming the target and the reachable range.
    """
    tol = cfg.budget_tol
    for decomposition in decompositions:
        space = SearchSpace(layers, decomposition, multiple=cfg.rank_multiple)
        for target in cfg.targets:
            try:
                check_reachable(space, target, cfg.metric, tol)
            except ValueError as exc:
                raise PreflightError(f"{exc}; choose --targets within that range") from None

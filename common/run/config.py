"""The experiment's configuration: :class:`ExperimentConfig`, the one place every setting of a run is
defined (type, default, validation, help), and the command-line options generated from its fields
(:func:`add_config_arguments`, :func:`config_parser`, :func:`config_from_args`), which
``python -m common.run``, ``benchmarks/run_results.py`` and the notebooks
(``common.notebook.experiment_config``) all go through; the benchmarks and studies take the settings
they share with an experiment (``--threads``, ``--seed``, ...) as the same options (:func:`add_config_options`).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common.data.datasets import DATASET_NAMES
from common.data.splits import check_normalization
from common.device import resolve_device
from common.models import MODEL_NAMES
from common.run.logs import check_name
from common.run.validate import check_ranges, check_relations
from common.run.values import convert_value
from common.search.options import (
    DEFAULT_METHOD,
    METHODS,
    SearchConfig,
    check_budget_tol,
    check_method,
    check_target,
)
from common.search.proxy import DEFAULT_PROXY, PROXIES
from common.train.finetune import FinetuneConfig

DEFAULT_FINETUNE_EPOCHS = 3.0
"""The finetuning budget that "finetune: yes" stands for (the notebooks' ``FINETUNE = True``, CUDA runs)."""


EXTENDING_FIELDS = ("targets", "methods", "policy_tucker2", "n_seeds")
"""Result-affecting fields that a resumed run (same run id) may change: they only add or drop stages
(target × method × decomposition × seed), and the stages already logged are read back unchanged."""
_NORM = "ImageNet's for *_imagenet models, else the dataset's (CIFAR-10's, or the train split's)"


def _option(default: Any, help: str, *, affects_results: bool = True, **cli: Any) -> Any:
    """A config field with its command-line help and CLI extras: ``choices``, ``metavar``, ``off_flag`` (an
    extra flag that turns a bool off) and ``shown`` (the default in words, where its value says little).
    ``affects_results=False`` marks the fields that change nothing a run logs as a result (where the
    log goes, how much it prints, threads, time box): they are left out of the default run id."""
    return dataclasses.field(default=default, metadata={"help": help, "affects_results": affects_results, **cli})


@dataclass
class ExperimentConfig:
    """Everything an experiment depends on (written whole into the log's ``config`` record).

    Each field's meaning is its ``help`` metadata, which is also the help of its command-line option
    (``python -m common.run --help``). Validated on construction: a bad value raises
    ``ValueError`` before any data or model work (on the command line: a usage error, exit 2).

    Values are taken as a notebook, YAML or the command line gives them (see :func:`field_value`): a
    list field takes a list or tuple, one number, or a string of comma-separated items (``"0.5,0.3"``,
    also in brackets: ``"[0.5, 0.3]"``); anything else, or an item of the wrong type, is a
    ``ValueError`` naming the field. A string is never taken apart character by character.

    The default run id (:meth:`resolved_run_id`) is ``<model>-<dataset>-x<targets>-s<seed>-<hash>``
    where the hash covers every field that affects results (:data:`RESULT_FIELDS`: all but
    ``run_id``, ``log_dir``, ``artifacts``, ``artifacts_dir``, ``threads``, ``progress`` and ``deadline``;
    ``device`` as the device type
    it resolves to), so a run with different settings never resumes another one's log.
    """

    model: str = _option("resnet18", "model to compress", choices=MODEL_NAMES)
    dataset: str = _option(
        "auto", "auto: the shared cifar10-jpeg when ../shared exists, else digits", choices=DATASET_NAMES
    )
    data_root: str | None = _option(None, "dataset root", metavar="DIR", shown="the dataset's own")
    stream: str = _option(
        "auto",
        "imagefolder: decode images on the fly with DataLoader workers (on), all into memory once (off), or "
        "stream when the decoded splits would exceed a quarter of the RAM (auto)",
        choices=("auto", "on", "off"),
    )
    crop_size: int | None = _option(
        None, "streamed imagefolder: crop size of the transforms (RandomResizedCrop / CenterCrop)", shown="224"
    )
    resize_size: int | None = _option(None, "streamed imagefolder: the eval transform's Resize", shown="256")
    checkpoint: str | None = _option(
        "auto",
        "state_dict path; auto: the shared baseline for cifar10-jpeg, else a baseline trained once by "
        "finetuned/train_baseline.py and cached",
        metavar="PATH",
    )
    mean: tuple[float, ...] | None = _option(
        None, "per-channel mean (pixel/255) the weights were trained with", shown=_NORM
    )
    std: tuple[float, ...] | None = _option(
        None, "per-channel std the weights were trained with (with mean)", shown=_NORM
    )
    targets: tuple[float, ...] = _option((3.0,), "reduction factors of the total conv metric (dense / compressed)")
    metric: str = _option("macs", "what the targets reduce", choices=("macs", "params"))
    budget_tol: float = _option(
        SearchConfig.tol,
        "how far a plan's reduction factor may lie from its target, relative (0.03: within ±3 %); every "
        "method's plan is finished into this band",
    )
    methods: tuple[str, ...] = _option(
        (DEFAULT_METHOD,),
        f"rank-selection methods, a subset of {','.join(METHODS)}; {DEFAULT_METHOD} (the default): the "
        "sensitivity-guided policy seeded with the uniform, energy and vbmf plans, then refined around its best",
    )
    policy_tucker2: bool = _option(False, "also run the policy method with Tucker-2 layers (HT-2 for every method)")
    search_budget: int = _option(100, "candidate evaluations of each search (random, tpe, the policies)")
    n_seeds: int = _option(
        1,
        "every (target, method) at seeds seed .. seed+n_seeds-1: a seed picks the search's "
        "draws and the proxy's calibration subset",
    )
    proxy: str = _option(
        DEFAULT_PROXY,
        "candidate score: logit_mse or kl (label-free divergences to the dense model) or top1 (val)",
        choices=PROXIES,
    )
    rerank: int = _option(SearchConfig.rerank, "val top-1 decides among this many best-scored candidates")
    shapes: tuple[str, ...] = _option(
        SearchConfig.shapes, "per-layer rank shapes the searches may choose: level and/or energy"
    )
    final_calib_images: int = _option(4096, "BN-calibration train images of each final model")
    finetune_epochs: float = _option(0.0, "finetuning epochs after BN recalibration (fractions allowed); 0 = off")
    finetune_targets: tuple[float, ...] | None = _option(None, "targets to finetune at", shown="all targets")
    # factorized chains amplify SGD steps (the effective lr grows with the product of factor norms);
    # 0.01 diverged on AlexNet
    finetune_lr: float = _option(0.0005, "finetuning peak learning rate (SGD, one-cycle)")
    finetune_optimizer: str = _option("sgd", "finetuning optimizer: sgd (nesterov) or adamw", choices=("sgd", "adamw"))
    finetune_clip: float | None = _option(None, "clip the gradients' global norm to this while finetuning", shown="off")
    finetune_warmup: float = _option(0.15, "share of the finetuning steps the one-cycle schedule warms up over")
    finetune_balance: bool = _option(
        False, "balance each factorized layer's factor norms before finetuning (the same function)"
    )
    finetune_batch_size: int = _option(128, "finetuning batch size")
    finetune_max_images: int | None = _option(
        None, "finetune on a stratified subset of this many train images", shown="all"
    )
    distill: bool = _option(True, "finetune with distillation from the dense model")
    calib_images: int = _option(256, "proxy: BN-recalibration (and divergence-scoring) train images of each candidate")
    val_images: int | None = _option(
        None,
        "val images of the re-ranking (and of every candidate with proxy top1); 0 = the whole val split",
        shown="the whole val split",
    )
    sensitivity_levels: tuple[float, ...] = _option(
        SearchConfig.sensitivity_levels, "rank levels of each layer's sensitivity curve (policy)"
    )
    policy_rounds: int = _option(SearchConfig.rounds, "policy sampling rounds (>1: cross-entropy refits)")
    temperature: float = _option(SearchConfig.temperature, "softness of the policy pdf")
    policy_knapsack: bool = _option(
        SearchConfig.knapsack,
        "the policies also score the plan their additive model rates best (exact knapsack over the "
        "sensitivity drops) in their first round; one of the search budget's evaluations",
    )
    rescore: int = _option(
        SearchConfig.rescore,
        "before the pick, score a search's this many best candidates again on rescore_images calibration "
        "images and let val decide among the best rerank of those; 0 = off",
    )
    rescore_images: int = _option(SearchConfig.rescore_images, "calibration train images of each re-score")
    refine: float = _option(
        SearchConfig.refine,
        "share of the guided search's budget spent refining its best candidate (moves of budget between "
        "pairs of layers, kept when the proxy scores them higher); 0 = policy_seeded",
    )
    rank_multiple: int = _option(8, "ranks are rounded to multiples of this")
    latency: bool = _option(False, "measure latency of the dense model and of every final model")
    latency_batches: tuple[int, ...] = _option((1, 64), "CPU latency batch sizes")
    latency_threads: int = _option(2, "CPU latency threads")
    latency_devices: tuple[str, ...] = _option(("cpu", "cuda"), "which of cpu, cuda to time (cuda only when present)")
    device: str = _option("auto", "auto: CUDA when present, else CPU (cpu, cuda, cuda:N)")
    seed: int = _option(0, "first seed")
    run_id: str | None = _option(
        None,
        "run id; an existing id resumes its log, whose config must then agree on every setting that affects "
        "results except targets, methods, policy_tucker2 and n_seeds (these add stages). The default id "
        "is a readable stem plus an 8-hex hash of every setting that affects results (all but run_id, "
        "log_dir, artifacts, artifacts_dir, threads, progress, deadline; device as cpu/cuda), so other settings get another log",
        metavar="ID",
        shown="<model>-<dataset>-x<targets>-s<seed>-<hash>",
        affects_results=False,
    )
    log_dir: str = _option("logs", "logs go to <log_dir>/<model>/<run_id>.log", metavar="DIR", affects_results=False)
    artifacts: bool = _option(
        True,
        "save every final model (after BN recalibration, and finetuned) as a file common.deploy.artifacts.load_compressed "
        "reads back",
        affects_results=False,
    )
    artifacts_dir: str | None = _option(
        None,
        "artifacts go to <artifacts_dir>/<model>/<run_id>/",
        metavar="DIR",
        shown="<log_dir>/../artifacts/<log folder name>, beside the log folder",
        affects_results=False,
    )
    threads: int | None = _option(None, "torch CPU threads", shown="torch's", affects_results=False)
    progress: bool = _option(True, "print progress", off_flag="--quiet", affects_results=False)
    deadline: float | None = _option(
        None, "unix time after which no new (target, method) stage starts", shown="none", affects_results=False
    )

    def __post_init__(self) -> None:
        # Refuse what would fail late or log nonsense, before any data or model work (common.run.validate).
        for f in dataclasses.fields(self):
            value = field_value(f.name, getattr(self, f.name))
            if "choices" in f.metadata and value not in f.metadata["choices"]:
                raise ValueError(f"{f.name} must be one of {', '.join(f.metadata['choices'])}, got {value!r}")
            setattr(self, f.name, value)
        check_normalization(self.mean, self.std)
        if self.run_id:  # the log's file name: no path separators, newlines or leading dot
            check_name("run_id", self.run_id)
        if not self.targets:
            raise ValueError("targets: give at least one reduction factor, e.g. --targets 3")
        if not self.methods:
            raise ValueError(f"methods: give at least one of {','.join(METHODS)}")
        self.targets = tuple(check_target(t) for t in self.targets)
        ft = self.finetune_epochs
        if not (math.isfinite(ft) and ft >= 0):
            raise ValueError(f"finetune_epochs must be a number of epochs >= 0 (0 = off), got {self.finetune_epochs!r}")
        if self.val_images == 0:
            self.val_images = None  # the whole val split, as documented
        check_ranges(self.__dict__)
        check_relations(self.__dict__)
        for m in self.methods:
            check_method(m)
        check_budget_tol(self.budget_tol, "budget_tol")  # named as the user typed it, before SearchConfig's own check
        search_config(dataclasses.asdict(self))  # validates the search options as the searches get them
        if self.rescore and self.proxy == "top1":
            raise ValueError("rescore needs a label-free proxy (logit_mse or kl), not top1")
        try:
            resolve_device(self.device)
        except (RuntimeError, ValueError):
            raise ValueError(f"device must be auto, cpu, cuda or cuda:N, got {self.device!r}") from None

    def result_settings(self) -> dict[str, Any]:
        """Every field that affects results (:data:`RESULT_FIELDS`) as JSON values, ``device`` as the
        type it resolves to on this machine (``cpu`` / ``cuda``), less the :data:`ADDED_FIELDS` at their
        defaults: what the default run id hashes."""
        out = {name: json.loads(json.dumps(getattr(self, name))) for name in RESULT_FIELDS}
        for name in ADDED_FIELDS:  # see ADDED_FIELDS
            if getattr(self, name) == FIELDS[name].default:
                del out[name]
        out["device"] = resolve_device(self.device).type
        return out

    def fingerprint(self) -> str:
        """8 hex digits of the SHA-256 of :meth:`result_settings`: equal exactly when the settings are."""
        text = json.dumps(self.result_settings(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()[:8]

    def resolved_run_id(self) -> str:
        """``run_id``, else ``<model>-<dataset>-x<targets>-s<seed>-<fingerprint>`` (see :meth:`fingerprint`)."""
        if self.run_id:
            return self.run_id
        t = "-".join(f"{x:g}" for x in self.targets)
        return f"{self.model}-{self.dataset}-x{t}-s{self.seed}-{self.fingerprint()}"

    def log_path(self) -> Path:
        """The run's log file: ``<log_dir>/<model>/<run_id>.log`` (:class:`common.run.logs.RunLog`)."""
        return Path(self.log_dir) / self.model / f"{self.resolved_run_id()}.log"

    def artifact_folder(self) -> Path:
        """Where this run's artifacts go: ``<artifacts_dir>/<model>/<run_id>/``, by default
        ``artifacts/<log folder's name>/<model>/<run_id>/`` beside the log folder: two log folders never
        share one (see ``artifacts_dir``)."""
        if self.artifacts_dir:
            return Path(self.artifacts_dir) / self.model / self.resolved_run_id()
        logs = Path(self.log_dir)
        if logs.name in ("", ".", ".."):  # "." or "a/..": name the folder it is
            logs = logs.resolve()
        return logs.parent / "artifacts" / (logs.name or "root") / self.model / self.resolved_run_id()

    def finetune_targets_or_all(self) -> tuple[float, ...]:
        """The targets at which plans are finetuned (when ``finetune_epochs > 0``)."""
        return tuple(float(x) for x in (self.targets if self.finetune_targets is None else self.finetune_targets))

    def finetune_config(self, seed: int, hflip: bool) -> FinetuneConfig:
        """The recipe of each final model's finetuning (:func:`common.train.finetune.finetune`): the
        :data:`FINETUNE_RECIPE` fields, the stage's seed and the data's flips, every epoch evaluated."""
        recipe = {option: getattr(self, name) for name, option in FINETUNE_RECIPE.items()}
        return FinetuneConfig(self.finetune_epochs, **recipe, seed=seed, eval_every_epoch=True, hflip=hflip)


FINETUNE_RECIPE: dict[str, str] = {
    "finetune_batch_size": "batch_size",
    "finetune_lr": "lr",
    "finetune_optimizer": "optimizer",
    "finetune_warmup": "pct_start",
    "finetune_clip": "clip_grad_norm",
    "finetune_max_images": "max_images",
}
"""The config fields that set a final model's finetuning recipe, and the :class:`FinetuneConfig` option each sets."""

FIELDS = {f.name: f for f in dataclasses.fields(ExperimentConfig)}

RESULT_FIELDS: tuple[str, ...] = tuple(name for name, f in FIELDS.items() if f.metadata["affects_results"])
"""The fields that affect a run's results: all but ``run_id``, ``log_dir``, ``artifacts``,
``artifacts_dir``, ``threads``, ``progress`` and ``deadline``. The default run id hashes them (:meth:`ExperimentConfig.fingerprint`)."""

ADDED_FIELDS: tuple[str, ...] = (
    "policy_knapsack",
    "rescore",
    "rescore_images",
    "budget_tol",
    "refine",
    "finetune_optimizer",
    "finetune_clip",
    "finetune_warmup",
    "finetune_balance",
    "mean",
    "std",
)
"""Result fields added after default run ids were in use: the run id hashes each only when it is set
off its default, so adding an option leaves every existing default run id (and its log) as it was."""

RESUME_FIELDS: tuple[str, ...] = tuple(n for n in RESULT_FIELDS if n not in EXTENDING_FIELDS)
"""The fields a resumed run must share with its log's ``config`` record (``device`` by its type)."""


# --- values as notebooks, YAML and the command line give them ---------------------------------------- #


def field_value(name: str, value: Any, label: str | None = None, hint: str | None = None) -> Any:
    """``value`` as :class:`ExperimentConfig` field ``name`` holds it (what ``__post_init__`` applies).

    A list field takes a list or tuple of its items, one item (one number: ``TARGET = 2.5``), or a
    string of comma-separated items, optionally in brackets (``"0.5,0.3"``, ``"[0.5, 0.3]"``,
    ``"[uniform, policy]"``; what papermill's ``-p`` and the command line pass), each item converted
    to the item type; an empty list is ``None`` where the field may be ``None``. Other fields take
    their own type (a whole float for an int, a path for a string); nothing else is converted.

    Args:
        name: the field.
        value: the given value.
        label: the name in the error message (default ``name``; e.g. a notebook parameter).
        hint: appended to the error message (e.g. how to pass a list with papermill).

    Raises:
        ValueError: a value or item of the wrong type, naming ``label`` and the offending value.
    """
    kind, many, optional = field_kinds()[name]
    return convert_value(value, kind, many, optional, label or name, hint)


# --- the command line, generated from the config's fields ------------------------------------------ #


@functools.cache
def field_kinds() -> dict[str, tuple[type, bool, bool]]:
    """``{field: (element type, is a tuple, may be None)}`` from the config's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(ExperimentConfig).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            hint = next(a for a in args if a is not type(None))
        many = typing.get_origin(hint) is tuple
        out[name] = (typing.get_args(hint)[0] if many else hint, many, optional)
    return out


def search_config(cfg: Mapping) -> SearchConfig:
    """The searches' settings of an experiment: ``cfg`` is an :class:`ExperimentConfig` as a dict or a
    logged ``config`` record; a setting an older log lacks takes its default (as the run had it)."""
    d = SearchConfig()
    return SearchConfig(
        sensitivity_levels=tuple(cfg.get("sensitivity_levels", d.sensitivity_levels)),
        rounds=cfg.get("policy_rounds", d.rounds),
        temperature=cfg.get("temperature", d.temperature),
        rerank=cfg.get("rerank", d.rerank),
        shapes=tuple(cfg.get("shapes", d.shapes)),
        knapsack=cfg.get("policy_knapsack", d.knapsack),
        rescore=cfg.get("rescore", d.rescore),
        rescore_images=cfg.get("rescore_images", d.rescore_images),
        tol=cfg.get("budget_tol", d.tol),
        refine=cfg.get("refine", d.refine),
    )

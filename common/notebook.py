"""What the ``htd-<model>-res.ipynb`` notebooks call: defaults, the experiment config, results and plots.

The notebooks hold parameters (a papermill ``parameters`` cell) and calls into ``common`` only; the
logic lives here and in :mod:`common.experiment` / :mod:`common.analysis`, so it is tested once.

* :func:`default_params`: what ``DATASET = "auto"`` / ``CHECKPOINT = "auto"`` mean on this machine
  (the shared cifar10-jpeg data and baseline when ``../shared`` exists, else the embedded digits
  dataset with a baseline trained once and cached).
* :func:`experiment_config`: notebook parameters → :class:`common.config.ExperimentConfig`
  (keyword names are the config's field names).
* :func:`show_results` / :func:`show_plots`: the run's summary table (a DataFrame) and its plots,
  read back from the run log and drawn inline.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import pandas as pd

from .analysis import PLOTS as ANALYSIS_PLOTS
from .analysis import summary_table
from .config import DEFAULT_FINETUNE_EPOCHS, ExperimentConfig
from .logs import run_document
from .models import MODEL_NAMES
from .paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT

__all__ = ["PLOTS", "default_params", "experiment_config", "log_path", "load_run", "show_plots", "show_results"]

_LOG = logging.getLogger(__name__)

PLOTS: dict[str, Callable] = {plot.__name__.removeprefix("plot_"): plot for plot in ANALYSIS_PLOTS}
"""The plots a notebook shows, by name (``acc_vs_macs``, ``ranks``, ...), in display order: the
per-model plots of :data:`common.analysis.PLOTS`, each named after its function without ``plot_``."""


def default_params(model: str) -> dict[str, str | None]:
    """Dataset, data root and checkpoint that ``"auto"`` stands for, for ``model``.

    Returns:
        ``{"dataset", "data_root", "checkpoint"}``: the shared cifar10-jpeg tree and the shared
        ``<model>.pt`` when both exist next to the repository, else ``"digits"`` (embedded, no
        files), no root and ``"auto"`` (a digits baseline trained once by
        ``finetuned/train_baseline.py`` and cached under ``default_cache_dir()/baselines``).

    Raises:
        ValueError: unknown model name.
    """
    if model not in MODEL_NAMES:
        raise ValueError(f"unknown model {model!r}; valid: {', '.join(MODEL_NAMES)}")
    shared_ckpt = CHECKPOINT_DIR / f"{model}.pt"
    if CIFAR_JPEG_ROOT.is_dir() and shared_ckpt.is_file():
        return {"dataset": "cifar10-jpeg", "data_root": str(CIFAR_JPEG_ROOT), "checkpoint": str(shared_ckpt)}
    return {"dataset": "digits", "data_root": None, "checkpoint": "auto"}


def experiment_config(
    model: str,
    *,
    dataset: str = "auto",
    data_root: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = "auto",
    finetune_epochs: float | bool = 0.0,
    targets: float | Sequence[float] = 3.0,
    **config: Any,
) -> ExperimentConfig:
    """The experiment config of notebook parameters: keyword names are :class:`ExperimentConfig` fields.

    Notebook values are taken as a notebook writes them: lists for tuples, one number for
    ``targets``, paths for ``data_root`` / ``checkpoint``, and a yes/no or a number for finetuning.

    Args:
        model: a name of :data:`common.models.MODEL_NAMES`.
        dataset: ``"auto"`` (see :func:`default_params`) or a dataset name of :mod:`common.data`.
        data_root: dataset root (``None``: the dataset's default).
        checkpoint: state_dict path, ``"auto"`` (shared baseline, else a trained-and-cached one) or
            ``None`` (the seeded random init: for smoke runs only).
        finetune_epochs: epochs of finetuning after BN recalibration (fractions allowed); ``True`` =
            :data:`common.config.DEFAULT_FINETUNE_EPOCHS` (3), ``False`` or 0 = off.
        targets: reduction factor of total conv MACs, or several.
        **config: any other field (``methods``, ``search_budget``, ``calib_images``,
            ``val_images``, ``sensitivity_levels``, ``device``, ``seed``, ``run_id``, ``log_dir``, ...).

    Returns:
        The config; ``dataset`` and ``checkpoint`` left at ``"auto"`` are resolved here so that the
        log's ``config`` record names the data and weights actually used.

    Raises:
        ValueError: a negative or non-numeric ``finetune_epochs``, or any value the config refuses;
        TypeError: an unknown config field.
    """
    if isinstance(finetune_epochs, bool):
        finetune_epochs = DEFAULT_FINETUNE_EPOCHS if finetune_epochs else 0.0
    if not isinstance(finetune_epochs, Real) or finetune_epochs < 0:
        raise ValueError(
            f"finetune_epochs must be a number of epochs >= 0 (0 = off) or True/False, got {finetune_epochs!r}"
        )
    if dataset == "auto":
        auto = default_params(model)
        dataset = auto["dataset"]
        data_root = data_root if data_root is not None else auto["data_root"]
        if checkpoint == "auto":
            checkpoint = auto["checkpoint"]
    targets = (targets,) if isinstance(targets, Real) else targets
    return ExperimentConfig(
        model=model,
        dataset=dataset,
        data_root=None if data_root is None else str(data_root),
        checkpoint=None if checkpoint is None else str(checkpoint),
        targets=targets,
        finetune_epochs=float(finetune_epochs),
        **config,
    )


def log_path(cfg: ExperimentConfig) -> Path:
    """The run log ``run_experiment(cfg)`` writes: ``<log_dir>/<model>/<run_id>.log``."""
    return Path(cfg.log_dir) / cfg.model / f"{cfg.resolved_run_id()}.log"


def load_run(path: str | os.PathLike) -> dict:
    """The run document (see :func:`common.logs.run_document`) of one log; corrupt lines are logged."""
    document, errors = run_document(path)
    for err in errors:
        _LOG.warning("%s", err)
    return document


def _display_image(path: Path) -> None:
    try:
        from IPython.display import Image, display
    except ImportError:  # plain Python: the PNG on disk is the result
        print(path)
        return
    display(Image(filename=str(path)))


def show_plots(
    path: str | os.PathLike,
    kinds: Sequence[str] = tuple(PLOTS),
    out_dir: str | os.PathLike | None = None,
    display: bool = True,
) -> list[Path]:
    """Draw the run's plots as PNGs and show them inline.

    Args:
        path: the run log.
        kinds: names from :data:`PLOTS`, in display order.
        out_dir: where the PNGs go; default ``<log folder>/<run_id>-plots/``.
        display: show each PNG with IPython's display (else only write them).

    Returns:
        The PNG paths written (plots without data, e.g. sensitivity without the policy method,
        are skipped).

    Raises:
        ValueError: an unknown plot name.
    """
    unknown = [k for k in kinds if k not in PLOTS]
    if unknown:
        raise ValueError(f"unknown plot(s) {unknown}; valid: {', '.join(PLOTS)}")
    path = Path(path)
    document = load_run(path)
    out = Path(out_dir) if out_dir is not None else path.with_name(f"{path.stem}-plots")
    written = []
    for kind in kinds:
        png = PLOTS[kind]([document], document["model"], out)
        if png is not None:
            written.append(png)
            if display:
                _display_image(png)
    return written


def show_results(
    finals: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    plots: bool = True,
    out_dir: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """The summary table of a run's final models (and its plots, drawn inline).

    Args:
        finals: what :func:`common.experiment.run_experiment` returned (rows are limited to these
            method × decomposition × target; empty = every final in the log).
        path: the run log.
        plots: also draw every plot of :data:`PLOTS` (see :func:`show_plots`).
        out_dir: folder of the PNGs (default: next to the log).

    Returns:
        :func:`common.analysis.summary_table` rows (accuracies as fractions, factors dense/compressed).
    """
    df = summary_table([load_run(path)])
    if finals:
        wanted = {(f["method"], f["decomposition"], float(f["target"])) for f in finals}
        keep = [(m, d, float(t)) in wanted for m, d, t in zip(df["method"], df["decomposition"], df["target"])]
        df = df[keep].reset_index(drop=True)
    if plots:
        show_plots(path, out_dir=out_dir)
    return df

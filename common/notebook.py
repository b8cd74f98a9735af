"""What the ``htd-<model>-res.ipynb`` notebooks call: defaults, the experiment config, results and plots.

The notebooks hold parameters (a papermill ``parameters`` cell) and calls into ``common`` only; the
logic lives here and in :mod:`common.run.experiment` / :mod:`common.analysis`, so it is tested once.

* :func:`check_parameters`: the notebooks' first call, ``check_parameters(globals())``: a parameter no
  notebook has (papermill injects any ``-p NAME``) is refused before any work, naming the closest one.
* :func:`default_params`: what ``DATASET = "auto"`` / ``CHECKPOINT = "auto"`` mean on this machine
  (the shared cifar10-jpeg data and baseline when ``../shared`` exists, else the embedded digits
  dataset with a baseline trained once and cached).
* :func:`experiment_config`: notebook parameters → :class:`common.run.config.ExperimentConfig`
  (keyword names are the config's field names; :data:`PARAMETERS` maps the notebook names), each
  value checked first, with an error naming the notebook parameter.
* :func:`show_results` / :func:`show_plots`: the run's results table (:func:`results_table`) and its
  plots, read back from the run log and drawn inline.
* :func:`artifacts_table` / :func:`factorized_layers`: where the run saved its compressed models, and
  what a model loaded back with :func:`common.deploy.artifacts.load_compressed` holds.

List parameters (``METHODS``, ``SENSITIVITY_LEVELS``, several ``TARGET`` values) are real lists:
papermill passes them with ``-y "SENSITIVITY_LEVELS: [0.3]"`` (YAML). ``-p`` passes text, which is
read like the command line reads lists: comma-separated items, optionally in brackets
(``-p SENSITIVITY_LEVELS 0.3,0.15`` or ``"[0.3, 0.15]"``, ``-p METHODS uniform,policy``); an item
that is not of the list's type is an error naming the parameter and showing the ``-y`` form.
"""

from __future__ import annotations

import ast
import dataclasses
import difflib
import logging
import math
import os
from collections.abc import Callable, Mapping, Sequence
from numbers import Real
from pathlib import Path
from typing import Any

import pandas as pd

from common.analysis import PLOTS as ANALYSIS_PLOTS
from common.analysis import end_status, summary_table
from common.decompose.layers import FactorizedConv
from common.decompose.ranks import RANK_NAMES
from common.models import MODEL_NAMES
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT
from common.run.config import DEFAULT_FINETUNE_EPOCHS, ExperimentConfig, field_value
from common.run.documents import run_document
from common.search.options import METHODS, check_method, check_target

__all__ = [
    "PARAMETERS",
    "PLOTS",
    "check_parameters",
    "default_params",
    "experiment_config",
    "log_path",
    "load_run",
    "run_status",
    "results_table",
    "show_plots",
    "show_results",
]

_LOG = logging.getLogger(__name__)

PLOTS: dict[str, Callable] = {plot.__name__.removeprefix("plot_"): plot for plot in ANALYSIS_PLOTS}
"""The plots a notebook shows, by name (``acc_vs_macs``, ``ranks``, ...), in display order: the
per-model plots of :data:`common.analysis.PLOTS`, each named after its function without ``plot_``."""

PARAMETERS: dict[str, str] = {
    "MODEL": "model",
    "DATASET": "dataset",
    "DATA_ROOT": "data_root",
    "CHECKPOINT": "checkpoint",
    "MEAN": "mean",
    "STD": "std",
    "TARGET": "targets",
    "METHODS": "methods",
    "SEARCH_BUDGET": "search_budget",
    "FINETUNE": "finetune_epochs",
    "CALIB_IMAGES": "calib_images",
    "VAL_IMAGES": "val_images",
    "SENSITIVITY_LEVELS": "sensitivity_levels",
    "DEVICE": "device",
    "SEED": "seed",
    "RUN_ID": "run_id",
    "LOG_DIR": "log_dir",
}
"""The notebooks' papermill parameters and the :class:`ExperimentConfig` field each one sets."""

_PARAMETER_OF = {field: param for param, field in PARAMETERS.items()}
FIELDS = frozenset(f.name for f in dataclasses.fields(ExperimentConfig))

_HINTS = {
    "TARGET": 'with papermill: -p TARGET 2.5, or several as YAML: -y "TARGET: [2, 3]"',
    "METHODS": f'with papermill pass a list as YAML, e.g. -y "METHODS: [uniform, policy]" (of {", ".join(METHODS)})',
    "SENSITIVITY_LEVELS": 'with papermill pass a list as YAML: -y "SENSITIVITY_LEVELS: [0.5, 0.3, 0.15]"',
    "MEAN": 'with papermill pass a list as YAML: -y "MEAN: [0.485, 0.456, 0.406]"',
    "STD": 'with papermill pass a list as YAML: -y "STD: [0.229, 0.224, 0.225]"',
}
"""How each list parameter is passed to papermill (``-y`` YAML), shown in its errors."""

_ITEM_CHECKS: dict[str, Callable[[Any], Any]] = {"targets": check_target, "methods": check_method}


def _parameter_value(field: str, value: Any) -> Any:
    """``value`` checked as field ``field`` (:func:`common.run.config.field_value`, and each item of
    ``targets`` / ``methods``), errors naming the notebook parameter (and the field, where the names
    differ) and, for lists, papermill's ``-y`` form."""
    param = _PARAMETER_OF.get(field)
    if param is None:
        return field_value(field, value)
    label = param if param.lower() == field else f"{param} ({field})"
    hint = _HINTS.get(param)
    out = field_value(field, value, label=label, hint=hint)
    for item in out if field in _ITEM_CHECKS else ():
        try:
            _ITEM_CHECKS[field](item)
        except ValueError as e:
            raise ValueError(f"{label}: {e}" + (f"; {hint}" if hint else "")) from None
    return out


_INJECTED_HEADER = "# Parameters\n"
"""How papermill's injected-parameters cell starts (its ``codify`` comment line)."""


def _given_parameters(namespace: Mapping[str, Any]) -> list[str]:
    """The parameter names given to this notebook run: those assigned by papermill's injected cell, the
    latest in the kernel's input history (``In``); without one (cells run by ``exec``), every upper-case
    name bound to a plain value."""
    history = namespace.get("In")
    if isinstance(history, list):
        for source in reversed(history):
            if isinstance(source, str) and source.startswith(_INJECTED_HEADER):
                tree = ast.parse(source)
                return [
                    t.id for s in tree.body if isinstance(s, ast.Assign) for t in s.targets if isinstance(t, ast.Name)
                ]
        return []
    plain = (str, int, float, bool, list, tuple, dict, type(None))
    return [n for n, v in namespace.items() if n.isupper() and not n.startswith("_") and isinstance(v, plain)]


def check_parameters(namespace: Mapping[str, Any]) -> None:
    """Refuse a parameter that no notebook reads, before any work: the notebooks call
    ``check_parameters(globals())`` right after their parameters. Papermill injects ``-p NAME VALUE`` as
    an assignment whatever the name, so a misspelt ``-p SEARCH_BUDGT 6`` would leave SEARCH_BUDGET at its
    default (papermill's own warning is one line among many).

    Raises:
        ValueError: naming each unknown parameter, the closest known one (``difflib``) and all of them.
    """
    unknown = [n for n in _given_parameters(namespace) if n not in PARAMETERS]
    if not unknown:
        return
    hints = []
    for name in unknown:
        close = difflib.get_close_matches(name, list(PARAMETERS), n=1, cutoff=0.6)
        hints.append(f"{name} (did you mean {close[0]}?)" if close else name)
    raise ValueError(
        f"unknown notebook parameter{'s' if len(unknown) > 1 else ''} {', '.join(hints)}: nothing was run. "
        f"The parameters are {', '.join(PARAMETERS)}"
    )


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
    Every value is checked before anything else (:func:`common.run.config.field_value`): a wrong type,
    e.g. ``SENSITIVITY_LEVELS = "[0.3"``, is a ``ValueError`` naming the notebook parameter
    (:data:`PARAMETERS`) and, for a list, papermill's ``-y`` form. Text for a list is read as
    comma-separated items, optionally in brackets (what papermill's ``-p`` passes).

    Args:
        model: a name of :data:`common.models.MODEL_NAMES`.
        dataset: ``"auto"`` (see :func:`default_params`) or a dataset name of :mod:`common.data.datasets`.
        data_root: dataset root (``None``: the dataset's default).
        checkpoint: state_dict path, ``"auto"`` (shared baseline, else a trained-and-cached one) or
            ``None`` (the seeded random init: for smoke runs only).
        finetune_epochs: epochs of finetuning after BN recalibration (fractions allowed); ``True`` =
            :data:`common.run.config.DEFAULT_FINETUNE_EPOCHS` (3), ``False`` or 0 = off.
        targets: reduction factor of total conv MACs, or several.
        **config: any other field (``methods``, ``search_budget``, ``calib_images``,
            ``val_images``, ``sensitivity_levels``, ``device``, ``seed``, ``run_id``, ``log_dir``, ...).

    Returns:
        The config; ``dataset`` and ``checkpoint`` left at ``"auto"`` are resolved here so that the
        log's ``config`` record names the data and weights actually used.

    Raises:
        ValueError: a value of the wrong type (naming the notebook parameter), a negative
            ``finetune_epochs``, or any value the config refuses;
        TypeError: an unknown config field.
    """
    given = {"model": model, "dataset": dataset, "data_root": data_root, "checkpoint": checkpoint, "targets": targets}
    checked = {name: _parameter_value(name, value) for name, value in {**given, **config}.items() if name in FIELDS}
    model, dataset, data_root, checkpoint, targets = (checked[name] for name in given)
    config = {name: checked.get(name, value) for name, value in config.items()}
    if isinstance(finetune_epochs, bool):
        finetune_epochs = DEFAULT_FINETUNE_EPOCHS if finetune_epochs else 0.0
    if not isinstance(finetune_epochs, Real) or not finetune_epochs >= 0:
        raise ValueError(
            "FINETUNE (finetune_epochs) must be a number of epochs >= 0 (0 = off) or True/False, "
            f"got {finetune_epochs!r}"
        )
    if dataset == "auto":
        auto = default_params(model)
        dataset = auto["dataset"]
        data_root = data_root if data_root is not None else auto["data_root"]
        if checkpoint == "auto":
            checkpoint = auto["checkpoint"]
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


def run_status(cfg: ExperimentConfig) -> str | None:
    """How the latest ``run_experiment(cfg)`` that returned ended: :func:`common.analysis.end_status`
    of its log, the Status that :func:`common.analysis.runs_table` shows (``"ok"``, ``"deadline"``);
    None when the log is missing or has no ``end`` record yet (a run that crashed leaves an earlier
    run's, if any, as the last)."""
    path = log_path(cfg)
    if not path.exists():
        return None
    return end_status(run_document(path)[0])  # corrupt lines were reported when the run read its log


def load_run(path: str | os.PathLike) -> dict:
    """The run document (see :func:`common.run.documents.run_document`) of one log; corrupt lines are logged."""
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


_MISSING = "–"
"""What the results table shows where a step did not run (e.g. finetuning) or a value is absent."""

# (column, source column, format): accuracies in %, factors and percentage points with two decimals.
_RESULT_COLUMNS = (
    ("MACs ×", "macs_factor", "{:.2f}"),
    ("params ×", "params_factor", "{:.2f}"),
    ("val BN %", "val_top1_bn", "pct"),
    ("test BN %", "test_top1_bn", "pct"),
    ("val FT %", "val_top1_ft", "pct"),
    ("test FT %", "test_top1_ft", "pct"),
    ("FT epochs", "finetune_epochs", "{:g}"),
    ("dense test %", "baseline_test_top1", "pct"),
    ("Δ test pp", "delta_pp", "{:+.2f}"),
    ("CPU speed-up", "speedup_cpu", "{:.2f}"),
    ("CUDA speed-up", "speedup_cuda", "{:.2f}"),
    ("evaluations", "evaluations", "{:.0f}"),
    ("seconds", "wall_seconds", "{:.0f}"),
)
_STEP_COLUMNS = ("val FT %", "test FT %")
"""Columns of a step that may not run: shown with "–" even when no row ran it, so the table says so."""


def _cell(value: Any, fmt: str) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return _MISSING
    return f"{100.0 * value:.2f}" if fmt == "pct" else fmt.format(value)


def results_table(summary: pd.DataFrame, methods: Sequence[str] = METHODS) -> pd.DataFrame:
    """The notebook's display of :func:`common.analysis.summary_table` rows: formatted text cells.

    One row per method (in the order of ``methods``, others after them alphabetically) within each
    target and decomposition, indexed by method and, where the rows differ in them, target,
    decomposition and seed. Accuracies are in %
    with two decimals (BN = after BN recalibration, FT = after finetuning), factors (dense /
    compressed) and ``Δ test pp`` (final test accuracy minus the dense model's, in percentage points)
    with two; "–" where a step did not run (FT columns of a model not finetuned: never the BN value)
    or a value is absent. Columns without any value (e.g. speed-ups without latency) are left out,
    except the FT accuracies.
    """
    order = {m: i for i, m in enumerate(methods)}
    rank = [(order.get(m, len(order)), m) for m in summary["method"]]
    df = summary.assign(_order=rank).sort_values(["target", "decomposition", "_order", "seed"], kind="stable")
    df = df.reset_index(drop=True)
    varying = {k for k in ("target", "decomposition", "seed") if df[k].nunique(dropna=False) > 1}
    keys = [k for k in ("target", "decomposition", "method", "seed") if k == "method" or k in varying]
    out = pd.DataFrame({k: [f"{v:g}" if k == "target" else v for v in df[k]] for k in keys})
    for label, col, fmt in _RESULT_COLUMNS:
        if col in df and (label in _STEP_COLUMNS or df[col].notna().any()):
            out[label] = [_cell(v, fmt) for v in df[col]]
    return out.set_index(keys)


def show_results(
    finals: Sequence[Mapping[str, Any]],
    path: str | os.PathLike,
    plots: bool = True,
    out_dir: str | os.PathLike | None = None,
    raw: bool = False,
) -> pd.DataFrame:
    """The results table of a run's final models (and its plots, drawn inline).

    Args:
        finals: what :func:`common.run.experiment.run_experiment` returned (rows are limited to these
            method × decomposition × target; empty = every final in the log).
        path: the run log.
        plots: also draw every plot of :data:`PLOTS` (see :func:`show_plots`).
        out_dir: folder of the PNGs (default: next to the log).
        raw: return the :func:`common.analysis.summary_table` rows themselves (accuracies as
            fractions, every column) instead of the display.

    Returns:
        :func:`results_table` of the run's rows (or the raw rows).
    """
    df = summary_table([load_run(path)])
    if finals:
        wanted = {(f["method"], f["decomposition"], float(f["target"])) for f in finals}
        keep = [(m, d, float(t)) in wanted for m, d, t in zip(df["method"], df["decomposition"], df["target"])]
        df = df[keep].reset_index(drop=True)
    if plots:
        show_plots(path, out_dir=out_dir)
    return df if raw else results_table(df)


def artifacts_table(finals: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Where a run saved each final model (:mod:`common.deploy.artifacts`): one row per method, target,
    decomposition, seed and stage (``BN``, or ``FT`` for the finetuned model), with its test top-1 in %.

    Empty when the run was made with ``artifacts=False`` (or before artifacts existed).
    """
    rows = [
        {
            "method": f["method"],
            "target": f"{float(f['target']):g}",
            "decomposition": f["decomposition"],
            "seed": f.get("seed"),
            "stage": stage.upper(),
            "test %": _cell(f.get(f"test_top1_{stage}"), "pct"),
            "path": entry["path"],
        }
        for f in finals
        for stage, entry in (f.get("artifacts") or {}).items()
    ]
    return pd.DataFrame(rows, columns=["method", "target", "decomposition", "seed", "stage", "test %", "path"])


def factorized_layers(model: Any) -> pd.DataFrame:
    """The factorized layers of a compressed model: name, method and ranks (the rest is dense)."""
    rows = [
        {"layer": name, "method": m.method, "ranks": dict(zip(RANK_NAMES[m.method], m.ranks))}
        for name, m in model.named_modules()
        if isinstance(m, FactorizedConv)
    ]
    return pd.DataFrame(rows, columns=["layer", "method", "ranks"]).set_index("layer")

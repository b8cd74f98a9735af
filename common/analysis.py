"""Results analysis: run documents (``json/<model>/<run_id>.json``) to tables and plots.

The documents are written by :func:`common.logs.jsonify` (see :mod:`common.logs` for the record
kinds). Conventions: accuracies are fractions in [0, 1] in the data and the CSV, shown in % in
Markdown and plots; factors are dense / compressed; when the same (model, method, decomposition,
target, seed) appears more than once, the record written last (largest ``t``, then ``seq``) wins.

Seeds: a run may compute every configuration at several seeds (``final.seed``). Records without a
``seed`` (older logs) take their run's ``config.seed`` (0 when absent). :func:`summary_table` keeps
one row per seed, :func:`aggregate_seeds` folds the seeds into mean, std and count, and
:func:`policy_margins` compares the policy with its rivals seed by seed.

Figures are drawn on :class:`matplotlib.figure.Figure` objects (Agg canvas) without ``pyplot``, so
importing this module never changes the matplotlib backend of a notebook.
"""

from __future__ import annotations

import logging
import math
import os
from datetime import datetime, UTC
from pathlib import Path
from typing import Any
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from common.logs import load_document

__all__ = [
    "AGGREGATE_COLUMNS",
    "LATENCY_COLUMNS",
    "LATENCY_SPEEDUP_COLUMNS",
    "MARKDOWN_COLUMNS",
    "METHOD_ORDER",
    "POLICY_MARGIN_COLUMNS",
    "POLICY_RIVALS",
    "README_BEGIN",
    "README_END",
    "SEED_STAT_COLUMNS",
    "SUMMARY_COLUMNS",
    "aggregate_seeds",
    "join_latency",
    "latest_records",
    "load_latency",
    "load_runs",
    "machine_description",
    "make_plots",
    "margin_verdict",
    "markdown_table",
    "paired_interval",
    "pareto_front",
    "plot_acc_vs_macs",
    "plot_ranks",
    "plot_search_trace",
    "plot_sensitivity",
    "policy_margins",
    "readme_block",
    "replace_marked_block",
    "split_speedup",
    "summary_table",
    "update_readme",
    "write_summary",
]

_LOG = logging.getLogger(__name__)

SUMMARY_COLUMNS: tuple[str, ...] = (
    "model",
    "method",
    "decomposition",
    "target",
    "seed",
    "metric",
    "macs_factor",
    "params_factor",
    "val_top1_bn",
    "test_top1_bn",
    "val_top1_ft",
    "test_top1_ft",
    "baseline_test_top1",
    "delta_pp",
    "speedup_cpu",
    "speedup_cpu_setting",
    "speedup_cuda",
    "evaluations",
    "finetune_epochs",
    "wall_seconds",
    "run_id",
)
"""Columns of :func:`summary_table`, one row per seed (accuracies as fractions; ``delta_pp`` in
percentage points)."""

SEED_STAT_COLUMNS: tuple[str, ...] = (
    "val_top1_bn",
    "test_top1_bn",
    "val_top1_ft",
    "test_top1_ft",
    "delta_pp",
)
"""Columns :func:`aggregate_seeds` reports as ``<col>_mean`` and ``<col>_std`` (ddof 1)."""

_GROUP_COLUMNS = ("model", "method", "decomposition", "target")

METHOD_ORDER: tuple[str, ...] = ("uniform", "energy", "vbmf", "random", "policy", "tpe")
"""Row order of the methods in tables; other methods follow, alphabetically."""

_ACC_COLUMNS = ("val_top1_bn", "test_top1_bn", "val_top1_ft", "test_top1_ft", "baseline_test_top1")
_NUMERIC_COLUMNS = (
    "target",
    "macs_factor",
    "params_factor",
    *_ACC_COLUMNS,
    "delta_pp",
    "speedup_cpu",
    "speedup_cuda",
    "evaluations",
    "finetune_epochs",
    "wall_seconds",
)


# --------------------------------------------------------------------------- loading


def load_runs(json_dir: str | os.PathLike) -> list[dict]:
    """Load every run document under ``json_dir`` (recursively, ``*.json``), sorted by path.

    Raises:
        FileNotFoundError: ``json_dir`` does not exist.
        ValueError: a file is not a run document (names the file).
    """
    json_dir = Path(json_dir)
    if not json_dir.is_dir():
        raise FileNotFoundError(f"run-document folder not found: {json_dir}")
    return [load_document(p) for p in sorted(json_dir.rglob("*.json"), key=lambda p: p.as_posix())]


def _order(record: Mapping[str, Any]) -> tuple[float, int]:
    t = record.get("t")
    seq = record.get("seq")
    return (
        float(t) if isinstance(t, (int, float)) else -math.inf,
        int(seq) if isinstance(seq, int) else -1,
    )


def _records(
    runs: Iterable[Mapping], kind: str, model: str | None = None
) -> list[tuple[dict, dict]]:
    """``(run, record)`` pairs of one kind, optionally of one model, in write-time order."""
    pairs = [
        (run, record)
        for run in runs
        if model is None or run.get("model") == model
        for record in run.get("records", [])
        if record.get("kind") == kind
    ]
    return sorted(pairs, key=lambda pr: _order(pr[1]))


def latest_records(
    runs: Iterable[Mapping], kind: str, key: Callable[[dict, dict], Any], model: str | None = None
) -> dict[Any, tuple[dict, dict]]:
    """The last-written record of ``kind`` per ``key(run, record)``.

    Returns:
        ``{key: (run, record)}`` in order of first appearance of each key.
    """
    out: dict[Any, tuple[dict, dict]] = {}
    for run, record in _records(runs, kind, model):
        out[key(run, record)] = (run, record)
    return out


def _latest_baseline(
    runs: Sequence[Mapping], model: str, run: Mapping | None = None
) -> dict | None:
    """The run's own last baseline record, else the model's last one across runs."""
    if run is not None:
        own = [r for r in run.get("records", []) if r.get("kind") == "baseline"]
        if own:
            return max(own, key=_order)
    pairs = _records(runs, "baseline", model)
    return pairs[-1][1] if pairs else None


def _float(value: Any) -> float:
    """Numeric value or NaN (None, strings and containers become NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def _target_key(value: Any) -> Any:
    return (
        float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    )


def _int_seed(value: Any, default: int) -> int:
    """``value`` as an integer seed, else ``default`` (None, text and fractions are no seeds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return int(value) if float(value).is_integer() else default


def _config_seed(run: Mapping) -> int:
    """The seed of the run's last ``config`` record; 0 when absent (the experiments' default)."""
    configs = [r for r in run.get("records", []) if r.get("kind") == "config"]
    return _int_seed(configs[-1].get("seed"), 0) if configs else 0


def _multi_seed(run: Mapping) -> bool:
    """Whether the run's records carry their own run seed.

    Older single-seed runs wrote a per-candidate sampling seed under ``candidate.seed``; it must
    not be read as the run seed. A run is multi-seed when its config lists ``seeds`` or one of its
    ``final`` records has a ``seed``.
    """
    return any(
        (r.get("kind") == "config" and r.get("seeds") is not None)
        or (r.get("kind") == "final" and r.get("seed") is not None)
        for r in run.get("records", [])
    )


def _seed_lookup() -> Callable[[Mapping, Mapping], int]:
    """A ``seed(run, record)`` function; each run's defaults are computed once, not per record.

    A ``final`` record's own ``seed`` always counts; other kinds' only in multi-seed runs (see
    :func:`_multi_seed`); otherwise the run's config seed.
    """
    cache: dict[int, tuple[int, bool]] = {}

    def seed(run: Mapping, record: Mapping) -> int:
        if id(run) not in cache:
            cache[id(run)] = (_config_seed(run), _multi_seed(run))
        default, multi = cache[id(run)]
        own = record.get("seed") if multi or record.get("kind") == "final" else None
        return _int_seed(own, default)

    return seed


def _lowest_seed(
    pairs: Sequence[tuple[dict, dict]], key: Callable[[dict], Any] = lambda record: None
) -> list[tuple[dict, dict]]:
    """The ``(run, record)`` pairs of the lowest seed within each ``key(record)`` group, in order.

    Plots of one search or one sensitivity sweep would mix unrelated curves across seeds; the
    lowest seed (normally 0) is the one every run computes.
    """
    seed = _seed_lookup()
    seeds = [seed(run, rec) for run, rec in pairs]
    lowest: dict[Any, int] = {}
    for (_, rec), s in zip(pairs, seeds):
        k = key(rec)
        lowest[k] = min(s, lowest.get(k, s))
    return [pr for pr, s in zip(pairs, seeds) if s == lowest[key(pr[1])]]


def _method_sort_key(methods: pd.Series) -> pd.Series:
    """Sort key for a method column: :data:`METHOD_ORDER`, then unknown methods alphabetically."""
    unknown = sorted({str(m) for m in methods if m not in METHOD_ORDER})
    rank = {m: i for i, m in enumerate([*METHOD_ORDER, *unknown])}
    return methods.map(lambda m: rank[m] if m in rank else rank[str(m)])


def _sort_rows(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Rows sorted by model, decomposition, method (:data:`METHOD_ORDER`), target, ``extra``."""
    return df.sort_values(
        ["model", "decomposition", "method", "target", *extra],
        na_position="last",
        kind="stable",
        key=lambda col: _method_sort_key(col) if col.name == "method" else col,
    ).reset_index(drop=True)


# --------------------------------------------------------------------------- summary


def split_speedup(speedup: Mapping[str, Any] | None) -> tuple[float, str | None, float]:
    """Best CPU and best CUDA speed-up from a ``final.speedup`` dict.

    Settings whose name contains ``cuda`` or ``gpu`` (any case) are CUDA settings; all others CPU.
    Non-numeric values are ignored.

    Returns:
        ``(best_cpu, best_cpu_setting, best_cuda)``; NaN / None where absent.
    """
    cpu: dict[str, float] = {}
    cuda: list[float] = []
    for name, value in (speedup or {}).items():
        v = _float(value)
        if math.isnan(v):
            continue
        if "cuda" in name.lower() or "gpu" in name.lower():
            cuda.append(v)
        else:
            cpu[name] = v
    best = max(cpu, key=cpu.__getitem__) if cpu else None
    best_cpu = cpu[best] if best is not None else math.nan
    return best_cpu, best, (max(cuda) if cuda else math.nan)


def _metric_for(run: Mapping, final: Mapping) -> Any:
    if final.get("metric") is not None:
        return final["metric"]
    for record in reversed(run.get("records", [])):
        if (
            record.get("kind") == "plan"
            and record.get("method") == final.get("method")
            and _target_key(record.get("target")) == _target_key(final.get("target"))
            and record.get("decomposition", final.get("decomposition"))
            == final.get("decomposition")
        ):
            return record.get("metric")
    configs = [r for r in run.get("records", []) if r.get("kind") == "config"]
    return configs[-1].get("metric") if configs else None


def summary_table(runs: Sequence[Mapping]) -> pd.DataFrame:
    """One row per model x method x decomposition x target x seed, from the ``final`` records.

    ``delta_pp`` is the final test accuracy (after finetuning when present, else after BN
    recalibration) minus the dense baseline's, in percentage points. The baseline is the run's own
    ``baseline`` record, else the model's latest one. A final record without ``seed`` has its
    run's config seed (0 when the run has no config); see :func:`aggregate_seeds` for one row per
    configuration.

    Returns:
        A DataFrame with :data:`SUMMARY_COLUMNS`, sorted by model, decomposition, method (in
        :data:`METHOD_ORDER`), target, seed.

    Raises:
        ValueError: an accuracy outside [0, 1] (they must be fractions), naming run and field.
    """
    seed_of = _seed_lookup()
    finals = latest_records(
        runs,
        "final",
        key=lambda run, r: (
            run.get("model"),
            r.get("method"),
            r.get("decomposition"),
            _target_key(r.get("target")),
            seed_of(run, r),
        ),
    )
    rows = []
    for (model, method, decomposition, target, seed), (run, final) in finals.items():
        baseline = _latest_baseline(runs, model, run)
        cpu, cpu_setting, cuda = split_speedup(final.get("speedup"))
        row = {
            "model": model,
            "method": method,
            "decomposition": decomposition,
            "target": target,
            "seed": seed,
            "metric": _metric_for(run, final),
            "macs_factor": _float(final.get("macs_factor")),
            "params_factor": _float(final.get("params_factor")),
            "val_top1_bn": _float(final.get("val_top1_bn")),
            "test_top1_bn": _float(final.get("test_top1_bn")),
            "val_top1_ft": _float(final.get("val_top1_ft")),
            "test_top1_ft": _float(final.get("test_top1_ft")),
            "baseline_test_top1": _float(baseline.get("test_top1")) if baseline else math.nan,
            "speedup_cpu": cpu,
            "speedup_cpu_setting": cpu_setting,
            "speedup_cuda": cuda,
            "evaluations": _float(final.get("evaluations")),
            "finetune_epochs": _float(final.get("finetune_epochs")),
            "wall_seconds": _float(final.get("wall_seconds")),
            "run_id": run.get("run_id"),
        }
        for col in _ACC_COLUMNS:
            if not math.isnan(row[col]) and not 0.0 <= row[col] <= 1.0:
                raise ValueError(
                    f"run {row['run_id']!r} ({model}, {method}, target {target}): {col}="
                    f"{row[col]} is not a fraction in [0, 1]"
                )
        best = row["test_top1_ft"] if not math.isnan(row["test_top1_ft"]) else row["test_top1_bn"]
        row["delta_pp"] = 100.0 * (best - row["baseline_test_top1"])
        rows.append(row)
    df = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for col in _NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["seed"] = df["seed"].astype(int)
    return _sort_rows(df, extra=["seed"])


def _aggregate_columns(columns: Iterable[str]) -> list[str]:
    """Output columns of :func:`aggregate_seeds` for input ``columns``, in the same places."""
    out: list[str] = []
    for col in columns:
        if col == "seed":
            out += ["n_seeds", "seeds"]
        elif col in SEED_STAT_COLUMNS:
            out += [f"{col}_mean", f"{col}_std"]
        else:
            out.append(col)
    return out


AGGREGATE_COLUMNS: tuple[str, ...] = tuple(_aggregate_columns(SUMMARY_COLUMNS))
"""Columns of :func:`aggregate_seeds` on a :func:`summary_table` (``results/summary.csv``)."""


def _most_common(values: pd.Series) -> Any:
    """The most frequent non-missing value (first seen on ties), None when there is none."""
    present = [v for v in values if not _is_missing(v)]
    return max(dict.fromkeys(present), key=present.count) if present else None


def _aggregate_group(group: pd.DataFrame) -> dict[str, Any]:
    """One configuration's row of :func:`aggregate_seeds` from its per-seed rows."""
    row: dict[str, Any] = {}
    for col in group.columns:
        values = group[col]
        if col in _GROUP_COLUMNS:
            row[col] = values.iloc[0]  # not the groupby key: that turns a None into NaN
        elif col == "seed":
            row["n_seeds"] = len(group)
            row["seeds"] = ";".join(str(s) for s in sorted(set(values)))
        elif col in SEED_STAT_COLUMNS:
            row[f"{col}_mean"] = values.mean()
            row[f"{col}_std"] = values.std(ddof=1)  # NaN with fewer than two measured seeds
        elif col == "run_id":
            row[col] = ";".join(dict.fromkeys(str(v) for v in values if not _is_missing(v)))
        elif pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values):
            row[col] = values.mean()
        else:
            row[col] = _most_common(values)
    return row


def aggregate_seeds(df: pd.DataFrame) -> pd.DataFrame:
    """One row per (model, method, decomposition, target) from per-seed rows.

    :data:`SEED_STAT_COLUMNS` become ``<col>_mean`` and ``<col>_std`` (sample std, ddof 1; NaN
    with one seed), ``seed`` becomes ``n_seeds`` (rows folded) and ``seeds`` (e.g. ``"0;1;2"``).
    Other numeric columns (factors, speed-ups, costs) are means; text columns the most frequent
    value, except ``run_id``: every run, ``;``-separated. Missing values are skipped.

    Args:
        df: output of :func:`summary_table` or :func:`join_latency`; a frame without ``seed``
            counts as seed 0 throughout.

    Returns:
        A new DataFrame, columns as :data:`AGGREGATE_COLUMNS` for a :func:`summary_table` input,
        sorted like it.
    """
    if "seed" not in df.columns:
        df = df.assign(seed=0)
    columns = _aggregate_columns(df.columns)
    if df.empty:
        return pd.DataFrame(columns=columns)
    groups = df.groupby(list(_GROUP_COLUMNS), dropna=False, sort=False)
    out = pd.DataFrame([_aggregate_group(g) for _, g in groups], columns=columns)
    return _sort_rows(out)


# --------------------------------------------------------------------------- latency tables

LATENCY_COLUMNS: tuple[str, ...] = (
    "model",
    "method",
    "decomposition",
    "target",
    "macs_factor",
    "deployed_macs_factor",
    "setting",
    "batch",
    "dense_ms",
    "factorized_ms",
    "deployed_ms",
    "speedup_factorized",
    "speedup",
    "channels_last",
    "forms",
    "device_name",
)
"""Columns of a latency table (``results/latency_{cpu,cuda}.csv``), one row per configuration and
setting. Only :data:`_LATENCY_REQUIRED` must be present, so that extra or later-added columns of the
benchmark never break the summary."""

_LATENCY_REQUIRED = ("model", "method", "decomposition", "target", "setting", "speedup")
_LATENCY_TEXT = ("model", "method", "decomposition", "setting", "device_name", "forms")
_LATENCY_NUMERIC = tuple(c for c in LATENCY_COLUMNS if c not in _LATENCY_TEXT and c != "channels_last")
_RUN_SPEEDUP_COLUMNS = ("speedup_cpu", "speedup_cpu_setting", "speedup_cuda")

LATENCY_SPEEDUP_COLUMNS: tuple[str, ...] = (
    "speedup_cpu_b1",
    "speedup_cpu_b64",
    "speedup_cuda",
    "speedup_cuda_setting",
)
"""Columns :func:`join_latency` puts in place of the run records' ``speedup_cpu``,
``speedup_cpu_setting`` and ``speedup_cuda``."""

_CPU_SETTINGS = {"speedup_cpu_b1": "cpu_b1", "speedup_cpu_b64": "cpu_b64"}


def _check_numeric(df: pd.DataFrame, col: str, path: Path, required: bool) -> None:
    """Parse ``df[col]`` as floats in place; a non-number (or, when required, a blank) is an error.

    Silently coercing would turn a malformed table into rows of "–" nobody notices.
    """
    values = pd.to_numeric(df[col], errors="coerce")
    bad = values.isna() & (df[col].notna() | required)
    if bad.any():
        i = int(np.flatnonzero(bad.to_numpy())[0])
        raise ValueError(
            f"{path}: column {col!r} must be numeric, got {df[col].iloc[i]!r} on line {i + 2}"
        )
    df[col] = values.astype(float)


def _read_latency_csv(path: Path) -> pd.DataFrame:
    """One latency table, validated; a ``source`` column records the file for the headers."""
    if not path.is_file():
        raise FileNotFoundError(f"latency table not found: {path}")
    df = pd.read_csv(path, dtype={c: str for c in _LATENCY_TEXT})
    missing = [c for c in _LATENCY_REQUIRED if c not in df.columns]
    if missing:
        raise ValueError(
            f"{path}: latency table lacks column(s) {missing} "
            f"(needs at least {list(_LATENCY_REQUIRED)})"
        )
    for col in ("model", "method", "setting"):
        df[col] = df[col].str.strip()
        blank = df[col].isna() | (df[col] == "")
        if blank.any():
            line = int(np.flatnonzero(blank.to_numpy())[0]) + 2
            raise ValueError(f"{path}: column {col!r} is empty on line {line}")
    for col in _LATENCY_NUMERIC:
        if col in df.columns:
            _check_numeric(df, col, path, required=col == "target")
    df["source"] = str(path)
    return df


def load_latency(paths: Iterable[str | os.PathLike]) -> pd.DataFrame:
    """Concatenate latency tables (see :data:`LATENCY_COLUMNS`), adding a ``source`` column.

    Numeric columns are parsed as floats, so a target written ``3`` matches a run's ``3.0``.

    Returns:
        One row per input row, in file order; empty (with the documented columns) for no paths.

    Raises:
        FileNotFoundError: a path that is not a file.
        ValueError: a required column missing, a blank key, or a non-numeric value in a numeric
            column; the message names the file and the column.
    """
    frames = [_read_latency_csv(Path(p)) for p in paths]
    if not frames:
        return pd.DataFrame(columns=[*LATENCY_COLUMNS, "source"])
    return pd.concat(frames, ignore_index=True)


def _join_key(model: Any, method: Any, decomposition: Any, target: Any) -> tuple | None:
    """Join key with a float target (``3``, ``3.0`` and ``"3"`` all match) and None for a missing
    decomposition; None when the target is not a number."""
    try:
        t = float(target)
    except (TypeError, ValueError):
        return None
    if math.isnan(t):
        return None
    return (str(model), str(method), None if _is_missing(decomposition) else str(decomposition), t)


def _speedups_by_key(latency: pd.DataFrame) -> dict[tuple, dict[str, float]]:
    """``{key: {setting: speedup}}``; for a repeated (key, setting) the later row wins."""
    table: dict[tuple, dict[str, float]] = {}
    for model, method, decomposition, target, setting, speedup in zip(
        *(latency[c] for c in ("model", "method", "decomposition", "target", "setting", "speedup"))
    ):
        key = _join_key(model, method, decomposition, target)
        if key is not None:
            table.setdefault(key, {})[str(setting)] = float(speedup)
    return table


def _with_latency_columns(columns: Sequence[str]) -> list[str]:
    """``columns`` with the run-record speed-up columns swapped for :data:`LATENCY_SPEEDUP_COLUMNS`
    at the place of ``speedup_cpu`` (else at the end)."""
    out: list[str] = []
    for col in columns:
        if col == "speedup_cpu":
            out += LATENCY_SPEEDUP_COLUMNS
        elif col not in _RUN_SPEEDUP_COLUMNS and col not in LATENCY_SPEEDUP_COLUMNS:
            out.append(col)
    return out if "speedup_cpu" in columns else out + list(LATENCY_SPEEDUP_COLUMNS)


def join_latency(summary: pd.DataFrame, latency: pd.DataFrame) -> pd.DataFrame:
    """Replace the summary's speed-ups by the latency tables' ``speedup`` (dense / deployed).

    Rows are matched on (model, method, decomposition, target), the target compared as a float.
    ``speedup_cpu_b1`` / ``speedup_cpu_b64`` are the settings ``cpu_b1`` / ``cpu_b64``;
    ``speedup_cuda`` is the best setting whose name starts with ``cuda`` (any case), named in
    ``speedup_cuda_setting``. Unmatched rows get NaN. The run records' ``speedup_cpu``,
    ``speedup_cpu_setting`` and ``speedup_cuda`` are dropped so that the two sources never mix.

    Args:
        summary: output of :func:`summary_table`.
        latency: output of :func:`load_latency`.

    Returns:
        A new DataFrame, same rows and order; columns as :func:`_with_latency_columns` says.
    """
    table = _speedups_by_key(latency)
    used: set[tuple] = set()
    rows = []
    for model, method, decomposition, target in zip(
        *(summary[c] for c in ("model", "method", "decomposition", "target"))
    ):
        key = _join_key(model, method, decomposition, target)
        speedups = table.get(key, {}) if key is not None else {}
        if speedups:
            used.add(key)
        row = {col: speedups.get(setting, math.nan) for col, setting in _CPU_SETTINGS.items()}
        cuda = {
            s: v for s, v in speedups.items() if s.lower().startswith("cuda") and not math.isnan(v)
        }
        best = max(cuda, key=cuda.__getitem__) if cuda else None
        row["speedup_cuda"] = cuda[best] if best is not None else math.nan
        row["speedup_cuda_setting"] = best
        rows.append(row)
    unmatched = len(table) - len(used)
    if unmatched:
        _LOG.info("%d latency configuration(s) match no summary row", unmatched)
    joined = pd.DataFrame(rows, columns=list(LATENCY_SPEEDUP_COLUMNS), index=summary.index)
    out = summary.drop(columns=[c for c in summary.columns if c in LATENCY_SPEEDUP_COLUMNS])
    out = pd.concat([out, joined], axis=1)
    for col in ("speedup_cpu_b1", "speedup_cpu_b64", "speedup_cuda"):
        out[col] = out[col].astype(float)
    return out[_with_latency_columns(list(summary.columns))]


def _latency_sources(latency: pd.DataFrame | None) -> list[str]:
    """The distinct ``source`` files of a latency frame, in order."""
    if latency is None or "source" not in latency.columns:
        return []
    return list(dict.fromkeys(str(s) for s in latency["source"]))


def _speedup_origin(sources: Sequence[str | os.PathLike]) -> str:
    """Where the speed-ups come from, for headers: the latency files, else the run records."""
    if not sources:
        return "the runs' `final` records"
    return ", ".join(f"`{Path(s).as_posix()}`" for s in sources)


def _is_missing(value: Any) -> bool:
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


def markdown_table(
    df: pd.DataFrame,
    columns: Sequence[str] | Mapping[str, str],
    formats: Mapping[str, str | Callable[[Any], str]] | None = None,
    right: Iterable[str] = (),
) -> str:
    """Render DataFrame columns as a GitHub Markdown table.

    Args:
        df: the data.
        columns: column names, or ``{column: header}`` to rename them.
        formats: per column a format spec (``".2f"``, ``".2%"``, ...) or a callable value -> str;
            other columns use ``str``. Missing values (None / NaN) print as ``–``.
        right: text columns to right-align too (numbers preformatted as text, e.g. mean ± std).

    Returns:
        The table, one line per row, ending with a newline. Numeric columns are right-aligned.

    Raises:
        KeyError: a column that ``df`` lacks.
    """
    headers = dict(columns) if isinstance(columns, Mapping) else {c: c for c in columns}
    missing = [c for c in headers if c not in df.columns]
    if missing:
        raise KeyError(f"markdown_table: DataFrame has no column(s) {missing}")
    formats = formats or {}
    right = set(right)

    def cell(col: str, value: Any) -> str:
        if _is_missing(value):
            return "–"
        fmt = formats.get(col)
        text = fmt(value) if callable(fmt) else format(value, fmt) if fmt else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(headers.values()) + " |",
        "|"
        + "|".join(
            "---:" if c in right or pd.api.types.is_numeric_dtype(df[c]) else ":---"
            for c in headers
        )
        + "|",
    ]
    for _, row in df.iterrows():
        lines.append("| " + " | ".join(cell(c, row[c]) for c in headers) + " |")
    return "\n".join(lines) + "\n"


def _pct(value: float) -> str:
    return f"{100.0 * value:.2f}"


def _factor(value: float) -> str:
    return f"{value:.2f}×"


MARKDOWN_COLUMNS: dict[str, str] = {
    "model": "Model",
    "method": "Method",
    "decomposition": "Decomp.",
    "target": "Target",
    "metric": "Metric",
    "n_seeds": "Seeds",
    "macs_factor": "MACs ×",
    "params_factor": "Params ×",
    "val_top1_bn": "Val BN (%)",
    "test_top1_bn": "Test BN (%)",
    "test_top1_ft": "Test FT (%)",
    "baseline_test_top1": "Dense test (%)",
    "delta_pp": "Δ vs dense (pp)",
    "speedup_cpu": "CPU speed-up",
    "speedup_cpu_setting": "CPU setting",
    "speedup_cuda": "CUDA speed-up",
    "evaluations": "Evals",
    "wall_seconds": "Wall (min)",
}
"""Columns (and headers) of the Markdown summary table (rows of :func:`aggregate_seeds`)."""

_LATENCY_HEADERS = {
    "speedup_cpu_b1": "CPU speed-up b1",
    "speedup_cpu_b64": "CPU speed-up b64",
    "speedup_cuda": "CUDA speed-up",
}


def _markdown_columns(df: pd.DataFrame) -> dict[str, str]:
    """:data:`MARKDOWN_COLUMNS`, with the latency-table speed-ups when ``df`` has them."""
    if "speedup_cpu_b1" not in df.columns:
        return MARKDOWN_COLUMNS
    return {
        c: MARKDOWN_COLUMNS.get(c) or _LATENCY_HEADERS[c]
        for c in _with_latency_columns(list(MARKDOWN_COLUMNS))
        if c in MARKDOWN_COLUMNS or c in _LATENCY_HEADERS
    }

_MARKDOWN_FORMATS: dict[str, str | Callable[[Any], str]] = {
    "target": _factor,
    "macs_factor": _factor,
    "params_factor": _factor,
    **{c: _pct for c in _ACC_COLUMNS},
    "delta_pp": "+.2f",
    "speedup_cpu": _factor,
    "speedup_cpu_b1": _factor,
    "speedup_cpu_b64": _factor,
    "speedup_cuda": _factor,
    "evaluations": ".0f",
    "wall_seconds": lambda s: f"{s / 60.0:.1f}",
}


def _mean_std_cell(
    mean: float,
    std: float,
    n_seeds: int,
    fmt: Callable[[float], str],
    std_fmt: Callable[[float], str],
) -> str | None:
    """``"mean ± std"`` over several seeds, the plain mean for one; None ("–") without a mean."""
    if _is_missing(mean):
        return None
    if n_seeds > 1 and not _is_missing(std):
        return f"{fmt(mean)} ± {std_fmt(std)}"
    return fmt(mean)


def _seed_display(agg: pd.DataFrame) -> pd.DataFrame:
    """``agg`` (from :func:`aggregate_seeds`) with each :data:`SEED_STAT_COLUMNS` mean/std pair
    folded into one text column under the plain name, ready for :func:`markdown_table` with
    :data:`_DISPLAY_FORMATS`."""
    out = agg.copy()
    for col in SEED_STAT_COLUMNS:
        if f"{col}_mean" not in out.columns:
            continue
        fmt, std_fmt = (_signed, _plain) if col == "delta_pp" else (_pct, _pct)
        out[col] = [
            _mean_std_cell(m, sd, int(n), fmt, std_fmt)
            for m, sd, n in zip(out[f"{col}_mean"], out[f"{col}_std"], out["n_seeds"])
        ]
    return out


def _signed(value: float) -> str:
    return f"{value:+.2f}"


def _plain(value: float) -> str:
    return f"{value:.2f}"


_DISPLAY_FORMATS = {c: f for c, f in _MARKDOWN_FORMATS.items() if c not in SEED_STAT_COLUMNS}
"""Formats for :func:`_seed_display` frames, whose seed-statistic cells are already text."""


def _seed_sentence(agg: pd.DataFrame) -> str:
    """How many seeds the accuracies of ``agg`` (non-empty) summarize, as a sentence."""
    if int(agg["n_seeds"].max()) == 1:
        return "One seed per configuration."
    return f"Accuracies and Δ: mean ± std over {_seed_count_text(agg)} per configuration."


def _seed_count_text(agg: pd.DataFrame) -> str:
    """``"1 seed"``, ``"3 seeds"`` or ``"1–3 seeds"`` per configuration."""
    low, high = int(agg["n_seeds"].min()), int(agg["n_seeds"].max())
    count = str(low) if low == high else f"{low}–{high}"
    return f"{count} seed{'' if high == 1 else 's'}"


def write_summary(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    plots: Sequence[str | os.PathLike] = (),
    command: str | None = None,
    n_runs: int | None = None,
    latency_sources: Sequence[str | os.PathLike] = (),
) -> tuple[Path, Path, Path]:
    """Write ``summary.csv`` (per configuration), ``summary_seeds.csv`` (per seed), ``summary.md``.

    Args:
        df: output of :func:`summary_table`, or of :func:`join_latency` (then the Markdown shows
            the CPU b1 / b64 and CUDA speed-ups of the latency tables); one row per seed.
        out_dir: folder for the files (created if missing).
        plots: plot files to link from the Markdown (paths made relative to ``out_dir``).
        command: the command that produced the results, stated in the Markdown header.
        n_runs: number of runs analysed, stated in the header when given.
        latency_sources: the latency tables joined into ``df``, named in the header as the
            speed-ups' origin (else the run records are).

    Returns:
        ``(csv_path, md_path, seeds_csv_path)``: ``summary.csv`` holds :func:`aggregate_seeds` of
        ``df`` (mean / std / ``n_seeds`` columns), ``summary_seeds.csv`` every column of ``df``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    seeds_path = out_dir / "summary_seeds.csv"
    agg = aggregate_seeds(df)
    agg.to_csv(csv_path, index=False)
    df.to_csv(seeds_path, index=False)

    lines = _summary_intro(agg, command, n_runs, latency_sources)
    if df.empty:
        lines += ["No `final` records found.", ""]
    else:
        display = _seed_display(agg)
        columns = _markdown_columns(agg)
        lines.append(markdown_table(display, columns, _DISPLAY_FORMATS, right=SEED_STAT_COLUMNS))
        lines += _margins_section(policy_margins(df))
    lines += _plots_section(plots, out_dir)
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return csv_path, md_path, seeds_path


def _summary_intro(
    agg: pd.DataFrame,
    command: str | None,
    n_runs: int | None,
    latency_sources: Sequence[str | os.PathLike],
) -> list[str]:
    """Title, provenance and column definitions of ``summary.md``."""
    date = _utc_now().strftime("%Y-%m-%d %H:%M UTC")
    runs_text = f" from {n_runs} run(s)" if n_runs is not None else ""
    seeds_text = f" ({_seed_count_text(agg)} per configuration)" if not agg.empty else ""
    speedups = (
        "Speed-ups are dense / deployed forward latency (the fastest exact deployment of the "
        "compressed model) at CPU batch 1 and 64 and on CUDA"
        if latency_sources
        else "Speed-ups are measured forward latency ratios (best CPU setting, and CUDA when "
        "measured)"
    )
    return [
        "# Compression results",
        "",
        f"Generated by `{command or 'common.analysis.write_summary'}` on {date}{runs_text}; "
        f"speed-ups from {_speedup_origin(latency_sources)}.",
        "",
        "Accuracies are top-1 in %. BN = after BatchNorm recalibration, FT = after finetuning. "
        "Factors (×) are dense / compressed. Δ vs dense = final test accuracy (FT when present, "
        f"else BN) minus the dense model's, in percentage points. {speedups}; – = not measured. "
        "Accuracies and Δ are mean ± sample std (ddof 1) over the Seeds column's seeds"
        f"{seeds_text}; a single seed shows its value; factors, speed-ups and costs are means. "
        "When a configuration was run more than once at the same seed, the latest run counts. "
        "`summary.csv` holds these means and stds, `summary_seeds.csv` one row per seed.",
        "",
    ]


def _plots_section(plots: Sequence[str | os.PathLike], out_dir: Path) -> list[str]:
    """The "Plots" list of ``summary.md`` (links relative to ``out_dir`` where possible)."""
    if not plots:
        return []
    lines = ["## Plots", ""]
    for plot in plots:
        plot = Path(plot)
        try:
            rel = plot.resolve().relative_to(out_dir.resolve()).as_posix()
        except ValueError:
            rel = plot.as_posix()
        lines.append(f"- [{plot.stem}]({rel}): {_plot_caption(plot.stem)}")
    lines.append("")
    return lines


# --------------------------------------------------------------------------- policy vs rivals

POLICY_RIVALS: tuple[str, ...] = ("uniform", "energy", "vbmf", "random", "tpe")
"""Methods :func:`policy_margins` compares the policy with (those present)."""

_MARGIN_FIELDS = ("best_rival", "margin", "ci_low", "ci_high", "n", "verdict", "each_rival")
_STAGES = (("bn", "test_top1_bn"), ("ft", "test_top1_ft"))
_STAGE_NAMES = {"bn": "BN", "ft": "FT"}

POLICY_MARGIN_COLUMNS: tuple[str, ...] = (
    "model",
    "target",
    *(f"{field}_{stage}" for stage, _ in _STAGES for field in _MARGIN_FIELDS),
)
"""Columns of :func:`policy_margins`: per stage (``bn``, ``ft``) the best rival, the mean paired
margin and its 95 % interval in percentage points, the number of paired seeds, the verdict and
every rival's mean paired margin as text."""


def paired_interval(
    differences: Sequence[float], level: float = 0.95
) -> tuple[float, float, float]:
    """Mean of paired differences and the two-sided Student-t confidence interval of that mean.

    ``mean ± t.ppf((1 + level) / 2, n - 1) * std / sqrt(n)`` with the sample std (ddof 1).

    Args:
        differences: one difference per seed; NaN entries are ignored.
        level: confidence level of the interval.

    Returns:
        ``(mean, low, high)``; the bounds are NaN below two differences (no spread to estimate),
        everything is NaN without any.
    """
    d = np.asarray(differences, dtype=float)
    d = d[~np.isnan(d)]
    if d.size == 0:
        return math.nan, math.nan, math.nan
    mean = float(d.mean())
    if d.size < 2:
        return mean, math.nan, math.nan
    from scipy import stats  # deferred: scipy.stats is slow to import and only this needs it

    quantile = float(stats.t.ppf(0.5 + level / 2, d.size - 1))
    half = quantile * float(d.std(ddof=1)) / math.sqrt(d.size)
    return mean, mean - half, mean + half


def margin_verdict(low: float, high: float, n: int) -> str | None:
    """Verdict on a paired margin's interval: is the policy ahead, behind, or within noise?

    Returns:
        ``"policy ahead"`` (low > 0), ``"policy behind"`` (high < 0), ``"within noise"``,
        ``"1 seed: no interval"`` for ``n == 1``, None for ``n == 0``.
    """
    if n == 0:
        return None
    if n == 1:
        return "1 seed: no interval"
    if low > 0:
        return "policy ahead"
    if high < 0:
        return "policy behind"
    return "within noise"


def _per_seed(group: pd.DataFrame, method: str, col: str) -> pd.Series:
    """One method's accuracy per seed (index: seed), unmeasured seeds dropped."""
    return group[group["method"] == method].groupby("seed")[col].mean().dropna()


def _paired_pp(policy: pd.Series, rival: pd.Series) -> np.ndarray:
    """Policy minus rival in percentage points, over the seeds both measured."""
    common = policy.index.intersection(rival.index)
    return 100.0 * (policy[common] - rival[common]).to_numpy(dtype=float)


def _stage_margins(group: pd.DataFrame, col: str, rivals: Sequence[str]) -> dict[str, Any]:
    """The :data:`_MARGIN_FIELDS` of one (model, target) group for accuracy column ``col``."""
    out: dict[str, Any] = dict.fromkeys(_MARGIN_FIELDS, math.nan)
    out.update(best_rival=None, n=0, verdict=None, each_rival=None)
    if col not in group.columns:
        return out
    policy = _per_seed(group, "policy", col)
    scores = {r: s for r in rivals if not (s := _per_seed(group, r, col)).empty}
    if policy.empty or not scores:
        return out
    # The strongest rival over all its seeds, not only the ones paired with the policy.
    best = max(scores, key=lambda r: scores[r].mean())
    diffs = _paired_pp(policy, scores[best])
    mean, low, high = paired_interval(diffs)
    each = {r: _paired_pp(policy, s) for r, s in scores.items()}
    out.update(
        best_rival=best,
        margin=mean,
        ci_low=low,
        ci_high=high,
        n=len(diffs),
        verdict=margin_verdict(low, high, len(diffs)),
        each_rival=", ".join(f"{r} {d.mean():+.2f}" for r, d in each.items() if d.size) or None,
    )
    return out


def policy_margins(df: pd.DataFrame, rivals: Sequence[str] = POLICY_RIVALS) -> pd.DataFrame:
    """Per (model, target): the HT-2 policy's test accuracy minus the best rival's, BN and finetuned.

    The research claim is that the policy beats every other method at equal cost; this table says,
    for each budget, whether it does beyond seed noise and which method it loses to. The best
    rival has the highest mean test accuracy over its seeds; the margin pairs seeds: the mean of
    ``policy_s - rival_s`` over the seeds both measured, with its 95 % Student-t interval (see
    :func:`paired_interval`, :func:`margin_verdict`). Percentage points; NaN where a side was
    not measured (e.g. no finetuning at that budget).

    Args:
        df: per-seed rows (:func:`summary_table`); without a ``seed`` column all rows count as
            seed 0. Rows of other decompositions than ``ht2`` (missing counts as ``ht2``) are
            ignored.
        rivals: methods to compare with, in order of preference on ties.

    Returns:
        :data:`POLICY_MARGIN_COLUMNS`, one row per (model, target) with the policy and a rival.
    """
    if "seed" not in df.columns:
        df = df.assign(seed=0)
    rows = []
    ht2 = df[df["decomposition"].fillna("ht2") == "ht2"]
    for (model, target), g in ht2.groupby(["model", "target"], sort=True):
        if not (g["method"] == "policy").any() or not g["method"].isin(rivals).any():
            continue
        row = {"model": model, "target": target}
        for stage, col in _STAGES:
            row.update({f"{k}_{stage}": v for k, v in _stage_margins(g, col, rivals).items()})
        rows.append(row)
    out = pd.DataFrame(rows, columns=list(POLICY_MARGIN_COLUMNS))
    for stage, _ in _STAGES:
        out[f"n_{stage}"] = out[f"n_{stage}"].astype(int)
    return out


def _interval_cell(low: float, high: float) -> str | None:
    return None if _is_missing(low) else f"[{low:+.2f}, {high:+.2f}]"


def _margins_display(margins: pd.DataFrame) -> tuple[pd.DataFrame, dict[str, str]]:
    """The margins with interval cells as text, and the Markdown headers; a stage nobody
    measured (e.g. no finetuning anywhere) is left out."""
    display = margins.copy()
    headers = {"model": "Model", "target": "Target"}
    for stage, _ in _STAGES:
        if margins[f"best_rival_{stage}"].isna().all():
            continue
        name = _STAGE_NAMES[stage]
        bounds = zip(margins[f"ci_low_{stage}"], margins[f"ci_high_{stage}"])
        display[f"ci_{stage}"] = [_interval_cell(lo, hi) for lo, hi in bounds]
        headers |= {
            f"best_rival_{stage}": f"Best rival ({name})",
            f"margin_{stage}": f"Margin {name} (pp)",
            f"ci_{stage}": f"95 % CI {name}",
            f"n_{stage}": f"Seeds {name}",
            f"verdict_{stage}": f"Verdict {name}",
            f"each_rival_{stage}": f"vs each rival ({name})",
        }
    return display, headers


def _margins_section(margins: pd.DataFrame) -> list[str]:
    """The "Does the policy win?" section of ``summary.md``; empty without policy and rival."""
    if margins.empty:
        return []
    display, headers = _margins_display(margins)
    formats: dict[str, str | Callable[[Any], str]] = {"target": _factor}
    for stage, _ in _STAGES:
        formats |= {f"margin_{stage}": "+.2f", f"n_{stage}": lambda n: str(n) if n else "–"}
    return [
        "## Does the policy win?",
        "",
        "HT-2 policy minus its best rival at the same budget, in percentage points of test "
        f"accuracy; rivals: {', '.join(POLICY_RIVALS)} (those run). The best rival has the "
        "highest mean accuracy over its seeds. The margin is paired by seed: the mean of the "
        "per-seed differences over the seeds both methods ran, with its 95 % Student-t "
        "confidence interval (– with a single seed). Verdict: ahead / behind when the interval "
        "excludes 0, else within noise. *vs each rival*: the mean paired margin over every rival.",
        "",
        markdown_table(display, headers, formats, right=[f"ci_{s}" for s, _ in _STAGES]),
        "",
    ]


# --------------------------------------------------------------------------- README block

README_BEGIN = "<!-- results:begin -->"
README_END = "<!-- results:end -->"
"""Marker lines around the generated results block in the README."""

_README_COLUMNS = {
    "model": "Model",
    "method": "Method",
    "decomposition": "Decomp.",
    "macs_factor": "MACs ×",
    "params_factor": "Params ×",
    "test_top1_bn": "Test BN (%)",
    "test_top1_ft": "Test FT (%)",
    "delta_pp": "Δ vs dense (pp)",
    "speedup_cpu_b64": "CPU speed-up b64",
    "speedup_cuda": "CUDA speed-up",
}


def _utc_now() -> datetime:
    """The current UTC time (one place, so tests can pin the date)."""
    return datetime.now(UTC)


def _describe_config(record: Mapping[str, Any]) -> str:
    """``"<device> (<machine>, torch <version>)"`` from a ``config`` record."""
    device = record.get("device_name")
    name = "CPU" if _is_missing(device) or str(device).lower() == "cpu" else str(device)
    extras = [str(record["machine"])] if record.get("machine") else []
    if record.get("torch"):
        extras.append(f"torch {record['torch']}")
    return f"{name} ({', '.join(extras)})" if extras else name


def machine_description(runs: Sequence[Mapping], latency: pd.DataFrame | None = None) -> str:
    """Where the numbers were measured: the runs' devices, then each latency table's devices.

    The runs' part comes from their ``config`` records (``device_name``, ``machine``, ``torch``;
    the host name is left out, it identifies a box, not hardware). Latency tables add their
    ``device_name`` values, per file.

    Returns:
        E.g. ``"runs on NVIDIA H100 80GB HBM3 (x86_64, torch 2.11.0); latency on Intel Xeon
        (latency_cpu.csv)"``; ``"runs on an unrecorded machine"`` without config records.
    """
    runs_part = list(dict.fromkeys(_describe_config(rec) for _, rec in _records(runs, "config")))
    parts = [f"runs on {', '.join(runs_part) if runs_part else 'an unrecorded machine'}"]
    latency_part = []
    for source in _latency_sources(latency):
        rows = latency[latency["source"] == source]
        names = rows["device_name"].dropna() if "device_name" in rows.columns else []
        names = list(dict.fromkeys(str(n) for n in names)) or ["an unrecorded device"]
        latency_part.append(f"{', '.join(names)} (`{Path(source).name}`)")
    if latency_part:
        parts.append(f"latency on {', '.join(latency_part)}")
    return "; ".join(parts)


def _readme_rows(df: pd.DataFrame, target: float) -> pd.DataFrame:
    """The configurations at ``target`` (:func:`aggregate_seeds` rows) with ``speedup_cpu_b64``.

    Without latency tables, the run records' CPU speed-up counts only when its setting is
    ``cpu_b64``; another setting would be a different measurement under the same header. That is
    decided per seed, before the seeds are averaged, since each seed names its own best setting.
    """
    rows = df[np.isclose(df["target"].astype(float), target)].copy()
    if "speedup_cpu_b64" not in rows.columns:
        setting = rows.get("speedup_cpu_setting", pd.Series(None, index=rows.index))
        rows["speedup_cpu_b64"] = rows["speedup_cpu"].where(setting == "cpu_b64").astype(float)
    return aggregate_seeds(rows)


def readme_block(
    df: pd.DataFrame,
    runs: Sequence[Mapping],
    command: str,
    summary_link: str = "results/summary.md",
    latency: pd.DataFrame | None = None,
    target: float = 3.0,
    date: datetime | None = None,
) -> str:
    """The generated README results block (without the marker lines).

    A provenance line (command, UTC date, machines, origin of the speed-ups), a compact table of
    every model at one target, and a pointer to the full summary.

    Args:
        df: output of :func:`summary_table` or :func:`join_latency` (one row per seed; the
            table shows mean ± std over seeds).
        runs: the run documents (for :func:`machine_description`).
        command: the command that generated the block.
        summary_link: link to the full summary, relative to the README.
        latency: output of :func:`load_latency` when speed-ups come from latency tables.
        target: the only target shown.
        date: the stated date (default: today, UTC).

    Returns:
        Markdown text ending with a newline.
    """
    day = (date or _utc_now()).strftime("%Y-%m-%d")
    sources = _latency_sources(latency)
    lines = [
        f"Generated by `{command}` on {day} (UTC); {machine_description(runs, latency)}; "
        f"speed-ups from {_speedup_origin(sources)}.",
        "",
    ]
    rows = _readme_rows(df, target)
    if rows.empty:
        lines += [f"No results at target {target:g}× yet.", ""]
    else:
        lines += [
            _seed_sentence(rows),
            "",
            markdown_table(
                _seed_display(rows), _README_COLUMNS, _DISPLAY_FORMATS, right=SEED_STAT_COLUMNS
            ),
        ]
    lines.append(
        f"Target {target:g}× MACs reduction only; the full table (2× and 5× targets, validation "
        f"accuracies, search cost, column definitions) is in [{summary_link}]({summary_link})."
    )
    return "\n".join(lines) + "\n"


def _marker_lines(text: str, source: str, begin: str, end: str) -> tuple[list[str], int, int]:
    """The text's lines and the indices of its single begin and end marker lines."""
    lines = text.splitlines(keepends=True)
    starts = [i for i, line in enumerate(lines) if line.strip() == begin]
    ends = [i for i, line in enumerate(lines) if line.strip() == end]
    if len(starts) != 1 or len(ends) != 1 or starts[0] > ends[0]:
        raise ValueError(
            f"{source}: needs exactly one line {begin!r} followed by one line {end!r} around the "
            f"generated results (found {len(starts)} and {len(ends)})"
        )
    return lines, starts[0], ends[0]


def replace_marked_block(
    text: str,
    block: str,
    source: str = "text",
    begin: str = README_BEGIN,
    end: str = README_END,
) -> str:
    """``text`` with everything between its marker lines replaced by ``block``.

    The marker lines themselves are kept, so the result can be regenerated any number of times.

    Raises:
        ValueError: the markers are missing, repeated or out of order (naming ``source`` and the
            markers), or ``block`` contains a marker.
    """
    if begin in block or end in block:
        raise ValueError(f"the generated block must not contain {begin!r} or {end!r}")
    lines, b, e = _marker_lines(text, source, begin, end)
    body = block if block.endswith("\n") or not block else block + "\n"
    if not lines[b].endswith("\n"):
        lines[b] += "\n"
    return "".join(lines[: b + 1]) + body + "".join(lines[e:])


def update_readme(path: str | os.PathLike, block: str) -> bool:
    """Put ``block`` between the marker lines of the file ``path``.

    The file is only written when its text changes, and never when the markers are wrong.

    Returns:
        Whether the file changed.

    Raises:
        ValueError: see :func:`replace_marked_block`; the file is left untouched.
    """
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    new = replace_marked_block(text, block, source=str(path))
    if new == text:
        return False
    path.write_text(new, encoding="utf-8")
    return True


def _plot_caption(stem: str) -> str:
    captions = {
        "acc_vs_macs": "mean test accuracy (error bars: std over seeds) vs MACs reduction factor, "
        "per method, with Pareto front",
        "ranks": "per-layer kept-MACs fraction of each method's chosen plan",
        "sensitivity": "proxy score (validation accuracy in older runs) vs rank level, per layer, "
        "lowest seed",
        "search_trace": "best-so-far proxy score (validation accuracy in older runs) vs number of "
        "evaluations, lowest seed",
    }
    for prefix, caption in captions.items():
        if stem.startswith(prefix + "_"):
            return caption
    return stem


# --------------------------------------------------------------------------- plots


def pareto_front(xs: Sequence[float], ys: Sequence[float]) -> list[int]:
    """Indices of the points not dominated when both coordinates are to be maximized.

    A point is dominated when another has ``x' >= x`` and ``y' >= y`` with one inequality strict.
    NaN points are never on the front. Identical points are all kept.

    Args:
        xs, ys: coordinates, same length.

    Returns:
        Indices of front points sorted by increasing x (then decreasing y).
    """
    x = np.asarray(xs, dtype=float)
    y = np.asarray(ys, dtype=float)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(
            f"pareto_front: xs and ys must be 1-D of equal length, got {x.shape}, {y.shape}"
        )
    ok = ~(np.isnan(x) | np.isnan(y))
    front = []
    for i in np.flatnonzero(ok):
        ge = ok & (x >= x[i]) & (y >= y[i])
        gt = (x > x[i]) | (y > y[i])
        if not np.any(ge & gt):
            front.append(int(i))
    return sorted(front, key=lambda i: (x[i], -y[i]))


def _new_figure(width: float = 7.5, height: float = 4.8) -> Figure:
    fig = Figure(figsize=(width, height), dpi=120)
    FigureCanvasAgg(fig)
    return fig


def _save(fig: Figure, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png")
    return path


def _skip(plot: str, model: str, why: str) -> None:
    _LOG.info("skipping %s plot for %s: %s", plot, model, why)


def _series_label(method: Any, decomposition: Any, several_decompositions: bool) -> str:
    return f"{method} ({decomposition})" if several_decompositions else str(method)


def plot_acc_vs_macs(
    runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike
) -> Path | None:
    """Plot test accuracy vs MACs reduction factor per method: ``acc_vs_macs_<model>.png``.

    Solid lines: after BN recalibration; dashed: after finetuning (when present). Points are means
    over seeds, with error bars of one std where a configuration has several. The Pareto front
    over every plotted point is outlined; the dense baseline is a horizontal line.

    Returns:
        The PNG path, or None (logged) when the model has no ``final`` records.
    """
    df = aggregate_seeds(summary_table([r for r in runs if r.get("model") == model]))
    if df.empty:
        _skip("acc_vs_macs", model, "no final records")
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    several = df["decomposition"].nunique(dropna=False) > 1
    several_seeds = bool((df["n_seeds"] > 1).any())
    colors = _colors(len(df.groupby(["method", "decomposition"], dropna=False)))
    px: list[float] = []
    py: list[float] = []
    for color, ((method, decomposition), group) in zip(
        colors, df.groupby(["method", "decomposition"], dropna=False, sort=True)
    ):
        group = group.sort_values("macs_factor")
        label = _series_label(method, decomposition, several)
        for col, style, marker, suffix in (
            ("test_top1_bn", "-", "o", "BN recal."),
            ("test_top1_ft", "--", "^", "finetuned"),
        ):
            pts = group[["macs_factor", f"{col}_mean", f"{col}_std"]].dropna(
                subset=["macs_factor", f"{col}_mean"]
            )
            if pts.empty:
                continue
            std = 100 * pts[f"{col}_std"]
            ax.errorbar(
                pts["macs_factor"],
                100 * pts[f"{col}_mean"],
                # No bars at all for single-seed results, zero-length ones where a point lacks them.
                yerr=None if std.isna().all() else std.fillna(0.0),
                fmt=style,
                marker=marker,
                color=color,
                capsize=3,
                label=f"{label}, {suffix}",
            )
            px += pts["macs_factor"].tolist()
            py += (100 * pts[f"{col}_mean"]).tolist()
    front = pareto_front(px, py)
    if front:
        ax.plot(
            [px[i] for i in front],
            [py[i] for i in front],
            linestyle=":",
            color="black",
            marker="o",
            markersize=11,
            markerfacecolor="none",
            label="Pareto front",
            zorder=0,
        )
    baseline = _latest_baseline(runs, model)
    if baseline is not None and not math.isnan(_float(baseline.get("test_top1"))):
        ax.axhline(
            100 * baseline["test_top1"],
            color="gray",
            linestyle="-.",
            label=f"dense baseline ({100 * baseline['test_top1']:.2f} %)",
        )
    ax.set_xlabel("MACs reduction factor (dense / compressed, ×)")
    ax.set_ylabel("test top-1 accuracy (%)" + (", mean ± std over seeds" if several_seeds else ""))
    ax.set_title(f"{model}: accuracy vs MACs reduction")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    return _save(fig, Path(out_dir) / f"acc_vs_macs_{model}.png")


def _colors(n: int) -> list:
    from matplotlib import colormaps

    cmap = colormaps["tab10"] if n <= 10 else colormaps["viridis"]
    return [cmap(i if n <= 10 else i / max(n - 1, 1)) for i in range(max(n, 1))]


def _default_kept_fraction(layer: Mapping[str, Any], entry: Mapping[str, Any]) -> float:
    """Kept-MACs fraction of a layer from its plan entry's ``macs`` and the layer's dense MACs."""
    dense = _float(entry.get("dense_macs", layer.get("macs")))
    macs = _float(entry.get("macs"))
    return macs / dense if dense > 0 else math.nan


def _pick_target(targets: Sequence[Any]) -> Any:
    """The target planned most often (ties: the largest)."""
    counts: dict[Any, int] = {}
    for t in targets:
        counts[t] = counts.get(t, 0) + 1
    return max(counts, key=lambda t: (counts[t], _float(t)))


def plot_ranks(
    runs: Sequence[Mapping],
    model: str,
    out_dir: str | os.PathLike,
    target: float | None = None,
    kept_fraction: Callable[[Mapping[str, Any], Mapping[str, Any]], float] | None = None,
) -> Path | None:
    """Grouped bars of each plan's per-layer kept-MACs fraction: ``ranks_<model>.png``.

    Layers (x, in network order from the ``layers`` record, eligible ones only) x methods (bars),
    at one target. A layer absent from a plan is kept dense (fraction 1).

    Args:
        runs: run documents.
        model: model name.
        out_dir: output folder.
        target: which target's plans; default the one planned most often (ties: largest).
        kept_fraction: ``f(layer_record, plan_entry) -> float``; default: the plan entry's
            ``macs`` divided by its ``dense_macs`` or the layer record's ``macs``.

    Returns:
        The PNG path, or None (logged) when there are no plans or no per-layer cost.
    """
    plans = latest_records(
        runs,
        "plan",
        model=model,
        key=lambda run, r: (r.get("method"), r.get("decomposition"), _target_key(r.get("target"))),
    )
    if not plans:
        _skip("ranks", model, "no plan records")
        return None
    target = _pick_target([k[2] for k in plans]) if target is None else _target_key(target)
    chosen = {k[:2]: rec for k, (_, rec) in plans.items() if k[2] == target}
    if not chosen:
        _skip("ranks", model, f"no plan at target {target}")
        return None
    layer_pairs = _records(runs, "layers", model)
    if layer_pairs:
        layers = [ly for ly in layer_pairs[-1][1].get("layers", []) if ly.get("eligible", True)]
    else:
        names = list(dict.fromkeys(n for rec in chosen.values() for n in (rec.get("plan") or {})))
        layers = [{"name": n} for n in names]
    fraction = kept_fraction or _default_kept_fraction
    table = np.full((len(chosen), len(layers)), np.nan)
    for i, rec in enumerate(chosen.values()):
        plan = rec.get("plan") or {}
        for j, layer in enumerate(layers):
            entry = plan.get(layer["name"])
            table[i, j] = 1.0 if entry is None else fraction(layer, entry)
    if np.isnan(table).all():
        _skip(
            "ranks",
            model,
            "plan entries carry no per-layer 'macs' (store them in the plan "
            "record or pass kept_fraction)",
        )
        return None
    fig = _new_figure(width=max(7.5, 0.45 * len(layers) * max(1, len(chosen) / 2) + 2))
    ax = fig.add_subplot()
    several = len({k[1] for k in chosen}) > 1
    width = 0.8 / len(chosen)
    pos = np.arange(len(layers))
    for i, ((method, decomposition), color) in enumerate(zip(chosen, _colors(len(chosen)))):
        ax.bar(
            pos + (i - (len(chosen) - 1) / 2) * width,
            table[i],
            width,
            color=color,
            label=_series_label(method, decomposition, several),
        )
    metric = next(iter(chosen.values())).get("metric")
    if metric == "macs" and isinstance(target, float) and target > 0:
        ax.axhline(
            1.0 / target, color="gray", linestyle=":", label=f"1 / target = {1 / target:.3f}"
        )
    ax.set_xticks(pos)
    ax.set_xticklabels([ly["name"] for ly in layers], rotation=90, fontsize=7)
    ax.set_xlabel("layer")
    ax.set_ylabel("kept MACs (fraction of dense layer)")
    ax.set_title(
        f"{model}: per-layer allocation of each method's plan at target {target}× ({metric})"
    )
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / f"ranks_{model}.png")


def _has_score(records: Iterable[Mapping[str, Any]]) -> bool:
    """Whether any record carries a numeric ``score`` (then plots use scores, not accuracies)."""
    return any(not math.isnan(_float(r.get("score"))) for r in records)


def _proxy_value(record: Mapping[str, Any], use_score: bool) -> float:
    """The record's ``score``, or its ``val_top1`` in %; NaN when absent."""
    return _float(record.get("score")) if use_score else 100 * _float(record.get("val_top1"))


def _proxy_label(use_score: bool) -> str:
    return "proxy score (higher is better)" if use_score else "validation top-1 accuracy (%)"


def plot_sensitivity(
    runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike
) -> Path | None:
    """Proxy score (or validation accuracy) vs rank level, one line per layer:
    ``sensitivity_<model>.png``.

    Records of the lowest seed only; their ``score`` when any has one (newer runs: a proxy score,
    higher is better), else their ``val_top1`` in %.

    Returns:
        The PNG path, or None (logged) when the model has no ``sensitivity`` records.
    """
    pairs = _lowest_seed(_records(runs, "sensitivity", model))
    records = {(r.get("layer"), _float(r.get("level"))): r for _, r in pairs}  # last one wins
    if not records:
        _skip("sensitivity", model, "no sensitivity records")
        return None
    use_score = _has_score(records.values())
    by_layer: dict[str, list[tuple[float, float]]] = {}
    for (layer, level), rec in records.items():
        by_layer.setdefault(str(layer), []).append((level, _proxy_value(rec, use_score)))
    layer_pairs = _records(runs, "layers", model)
    order = [ly.get("name") for ly in layer_pairs[-1][1].get("layers", [])] if layer_pairs else []
    names = sorted(by_layer, key=lambda n: (order.index(n) if n in order else len(order), n))
    fig = _new_figure(width=9.0 if len(names) > 10 else 7.5)
    ax = fig.add_subplot()
    for name, color in zip(names, _colors(len(names))):
        pts = sorted(by_layer[name])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=color, label=name)
    baseline = _latest_baseline(runs, model)
    # The dense accuracy is no reference line for a proxy score, which has other units.
    if (
        not use_score
        and baseline is not None
        and not math.isnan(_float(baseline.get("val_top1")))
    ):
        ax.axhline(
            100 * baseline["val_top1"],
            color="gray",
            linestyle="-.",
            label=f"dense ({100 * baseline['val_top1']:.2f} %)",
        )
    ax.set_xlabel("rank level (fraction of full rank)")
    ax.set_ylabel(_proxy_label(use_score))
    ax.set_title(f"{model}: per-layer sensitivity to rank truncation")
    ax.grid(alpha=0.3)
    ncol = 1 + len(names) // 16
    ax.legend(fontsize=6, ncol=ncol, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, Path(out_dir) / f"sensitivity_{model}.png")


def plot_search_trace(
    runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike
) -> Path | None:
    """Best-so-far proxy score (or validation accuracy) vs evaluations per search:
    ``search_trace_<model>.png``.

    One line per (method, decomposition, target) from ``candidate`` records in write order, of
    that search's lowest seed, using the run that wrote it last; faint dots are the individual
    candidates. Values are the records' ``score`` when any has one (newer runs: a proxy score,
    higher is better), else their ``val_top1`` in %.

    Returns:
        The PNG path, or None (logged) when the model has no ``candidate`` records.
    """

    def search_key(rec: Mapping[str, Any]) -> tuple:
        return rec.get("method"), rec.get("decomposition"), _target_key(rec.get("target"))

    pairs = _lowest_seed(_records(runs, "candidate", model), key=search_key)
    if not pairs:
        _skip("search_trace", model, "no candidate records")
        return None
    use_score = _has_score(rec for _, rec in pairs)
    searches: dict[tuple, dict[str, list[float]]] = {}
    for run, rec in pairs:
        by_run = searches.setdefault(search_key(rec), {})
        # Re-inserting moves the run to the end, so the last run to write a candidate wins.
        vals = by_run.pop(run.get("run_id"), [])
        vals.append(_proxy_value(rec, use_score))
        by_run[run.get("run_id")] = vals
    several = len({k[1] for k in searches}) > 1
    methods = sorted({str(k[0]) for k in searches})
    colors = dict(zip(methods, _colors(len(methods))))
    targets = sorted({k[2] for k in searches}, key=_float)
    styles = dict(zip(targets, ["-", "--", ":", "-."] * (1 + len(targets) // 4)))
    fig = _new_figure()
    ax = fig.add_subplot()
    for key in sorted(searches, key=lambda k: (str(k[0]), str(k[1]), _float(k[2]))):
        method, decomposition, target = key
        vals = np.array(list(searches[key].values())[-1], dtype=float)
        n = np.arange(1, len(vals) + 1)
        best = np.fmax.accumulate(vals)
        color = colors[str(method)]
        ax.scatter(n, vals, s=6, color=color, alpha=0.25)
        ax.step(
            n,
            best,
            where="post",
            linestyle=styles[target],
            color=color,
            label=f"{_series_label(method, decomposition, several)}, target {target}×",
        )
    ax.scatter([], [], s=6, color="gray", alpha=0.5, label="single candidates")
    ax.set_xlabel("evaluations (candidate plans scored)")
    ax.set_ylabel(_proxy_label(use_score))
    ax.set_title(f"{model}: rank-search progress (lines: best so far)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, Path(out_dir) / f"search_trace_{model}.png")


PLOTS: tuple[Callable[[Sequence[Mapping], str, str | os.PathLike], Path | None], ...] = (
    plot_acc_vs_macs,
    plot_ranks,
    plot_sensitivity,
    plot_search_trace,
)
"""Every per-model plot, in the order they are listed in the Markdown summary."""


def make_plots(runs: Sequence[Mapping], out_dir: str | os.PathLike) -> list[Path]:
    """Draw every plot in :data:`PLOTS` for every model; skipped plots are logged, not returned."""
    models = sorted({str(r.get("model")) for r in runs})
    return [
        p for model in models for plot in PLOTS if (p := plot(runs, model, out_dir)) is not None
    ]

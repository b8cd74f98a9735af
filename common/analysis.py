"""Results analysis: run documents (``json/<model>/<run_id>.json``) to tables and plots.

The documents are written by :func:`common.logs.jsonify` (see :mod:`common.logs` for the record
kinds). Conventions: accuracies are fractions in [0, 1] in the data and the CSV, shown in % in
Markdown and plots; factors are dense / compressed; when the same (model, method, decomposition,
target) appears more than once, the record written last (largest ``t``, then ``seq``) wins.

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
    "LATENCY_COLUMNS",
    "LATENCY_SPEEDUP_COLUMNS",
    "MARKDOWN_COLUMNS",
    "README_BEGIN",
    "README_END",
    "SUMMARY_COLUMNS",
    "join_latency",
    "latest_records",
    "load_latency",
    "load_runs",
    "machine_description",
    "make_plots",
    "markdown_table",
    "pareto_front",
    "plot_acc_vs_macs",
    "plot_ranks",
    "plot_search_trace",
    "plot_sensitivity",
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
"""Columns of :func:`summary_table` (accuracies as fractions; ``delta_pp`` in percentage points)."""

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
    """One row per model x method x decomposition x target, from the ``final`` records.

    ``delta_pp`` is the final test accuracy (after finetuning when present, else after BN
    recalibration) minus the dense baseline's, in percentage points. The baseline is the run's own
    ``baseline`` record, else the model's latest one.

    Returns:
        A DataFrame with :data:`SUMMARY_COLUMNS`, sorted by model, decomposition, method, target.

    Raises:
        ValueError: an accuracy outside [0, 1] (they must be fractions), naming run and field.
    """
    finals = latest_records(
        runs,
        "final",
        key=lambda run, r: (
            run.get("model"),
            r.get("method"),
            r.get("decomposition"),
            _target_key(r.get("target")),
        ),
    )
    rows = []
    for (model, method, decomposition, target), (run, final) in finals.items():
        baseline = _latest_baseline(runs, model, run)
        cpu, cpu_setting, cuda = split_speedup(final.get("speedup"))
        row = {
            "model": model,
            "method": method,
            "decomposition": decomposition,
            "target": target,
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
    return df.sort_values(
        ["model", "decomposition", "method", "target"], na_position="last", kind="stable"
    ).reset_index(drop=True)


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
) -> str:
    """Render DataFrame columns as a GitHub Markdown table.

    Args:
        df: the data.
        columns: column names, or ``{column: header}`` to rename them.
        formats: per column a format spec (``".2f"``, ``".2%"``, ...) or a callable value -> str;
            other columns use ``str``. Missing values (None / NaN) print as ``–``.

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

    def cell(col: str, value: Any) -> str:
        if _is_missing(value):
            return "–"
        fmt = formats.get(col)
        text = fmt(value) if callable(fmt) else format(value, fmt) if fmt else str(value)
        return text.replace("|", "\\|").replace("\n", " ")

    lines = [
        "| " + " | ".join(headers.values()) + " |",
        "|"
        + "|".join("---:" if pd.api.types.is_numeric_dtype(df[c]) else ":---" for c in headers)
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
"""Columns (and headers) of the Markdown summary table."""

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


def write_summary(
    df: pd.DataFrame,
    out_dir: str | os.PathLike,
    plots: Sequence[str | os.PathLike] = (),
    command: str | None = None,
    n_runs: int | None = None,
    latency_sources: Sequence[str | os.PathLike] = (),
) -> tuple[Path, Path]:
    """Write ``summary.csv`` (every column of ``df``) and ``summary.md``.

    Args:
        df: output of :func:`summary_table`, or of :func:`join_latency` (then the Markdown shows
            the CPU b1 / b64 and CUDA speed-ups of the latency tables).
        out_dir: folder for both files (created if missing).
        plots: plot files to link from the Markdown (paths made relative to ``out_dir``).
        command: the command that produced the results, stated in the Markdown header.
        n_runs: number of runs analysed, stated in the header when given.
        latency_sources: the latency tables joined into ``df``, named in the header as the
            speed-ups' origin (else the run records are).

    Returns:
        ``(csv_path, md_path)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    df.to_csv(csv_path, index=False)

    date = _utc_now().strftime("%Y-%m-%d %H:%M UTC")
    runs_text = f" from {n_runs} run(s)" if n_runs is not None else ""
    speedups = (
        "Speed-ups are dense / deployed forward latency (the fastest exact deployment of the "
        "compressed model) at CPU batch 1 and 64 and on CUDA"
        if latency_sources
        else "Speed-ups are measured forward latency ratios (best CPU setting, and CUDA when "
        "measured)"
    )
    lines = [
        "# Compression results",
        "",
        f"Generated by `{command or 'common.analysis.write_summary'}` on {date}{runs_text}; "
        f"speed-ups from {_speedup_origin(latency_sources)}.",
        "",
        "Accuracies are top-1 in %. BN = after BatchNorm recalibration, FT = after finetuning. "
        "Factors (×) are dense / compressed. Δ vs dense = final test accuracy (FT when present, "
        f"else BN) minus the dense model's, in percentage points. {speedups}; – = not measured. "
        "When a configuration was run more than once, the latest run is shown.",
        "",
    ]
    if df.empty:
        lines += ["No `final` records found.", ""]
    else:
        lines.append(markdown_table(df, _markdown_columns(df), _MARKDOWN_FORMATS))
        margins = policy_margins(df)
        if not margins.empty:
            lines += ["## Does the policy win?", "",
                      "HT-2 policy minus the best of uniform, energy and VBMF at the same budget, in percentage "
                      "points of test accuracy (negative: the policy loses, and to which method).", "",
                      markdown_table(margins, list(margins.columns), {"margin_bn": "+.2f", "margin_ft": "+.2f"}), ""]
    if plots:
        lines += ["## Plots", ""]
        for plot in plots:
            plot = Path(plot)
            try:
                rel = plot.resolve().relative_to(out_dir.resolve()).as_posix()
            except ValueError:
                rel = plot.as_posix()
            lines.append(f"- [{plot.stem}]({rel}): {_plot_caption(plot.stem)}")
        lines.append("")
    md_path.write_text("\n".join(lines), encoding="utf-8")
    return csv_path, md_path


def policy_margins(df: pd.DataFrame, rivals: Sequence[str] = ("uniform", "energy", "vbmf")) -> pd.DataFrame:
    """Per (model, target): the HT-2 policy's test accuracy minus the best rival's, BN and finetuned.

    The research claim is that the policy beats every rule-based method at equal cost; this table
    says, for each budget, whether it does and which method it loses to. Margins are in percentage
    points; NaN where either side was not measured (e.g. no finetuning at that budget).

    Returns:
        columns ``model, target, margin_bn, best_rival_bn, margin_ft, best_rival_ft``.
    """
    rows = []
    ht2 = df[df["decomposition"].fillna("ht2") == "ht2"]
    for (model, target), g in ht2.groupby(["model", "target"], sort=True):
        pol = g[g["method"] == "policy"]
        riv = g[g["method"].isin(rivals)]
        if pol.empty or riv.empty:
            continue
        row = {"model": model, "target": target}
        for stage, col in (("bn", "test_top1_bn"), ("ft", "test_top1_ft")):
            scores = riv[["method", col]].dropna()
            p = float(pol[col].iloc[0]) if col in pol else math.nan
            if scores.empty or math.isnan(p):
                row[f"margin_{stage}"], row[f"best_rival_{stage}"] = math.nan, None
                continue
            best = scores.loc[scores[col].idxmax()]
            row[f"margin_{stage}"] = 100.0 * (p - float(best[col]))
            row[f"best_rival_{stage}"] = best["method"]
        rows.append(row)
    return pd.DataFrame(rows, columns=["model", "target", "margin_bn", "best_rival_bn", "margin_ft", "best_rival_ft"])


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
    """The summary rows at ``target`` with a ``speedup_cpu_b64`` column.

    Without latency tables, the run records' CPU speed-up counts only when its setting is
    ``cpu_b64``; another setting would be a different measurement under the same header.
    """
    rows = df[np.isclose(df["target"].astype(float), target)].copy()
    if "speedup_cpu_b64" not in rows.columns:
        setting = rows.get("speedup_cpu_setting", pd.Series(None, index=rows.index))
        rows["speedup_cpu_b64"] = rows["speedup_cpu"].where(setting == "cpu_b64").astype(float)
    return rows


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
        df: output of :func:`summary_table` or :func:`join_latency`.
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
        lines.append(markdown_table(rows, _README_COLUMNS, _MARKDOWN_FORMATS))
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
        "acc_vs_macs": "test accuracy vs MACs reduction factor, per method, with Pareto front",
        "ranks": "per-layer kept-MACs fraction of each method's chosen plan",
        "sensitivity": "validation accuracy vs rank level, per layer",
        "search_trace": "best-so-far validation accuracy vs number of evaluations",
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

    Solid lines: after BN recalibration; dashed: after finetuning (when present). The Pareto front
    over every plotted point is outlined; the dense baseline is a horizontal line.

    Returns:
        The PNG path, or None (logged) when the model has no ``final`` records.
    """
    df = summary_table([r for r in runs if r.get("model") == model])
    if df.empty:
        _skip("acc_vs_macs", model, "no final records")
        return None
    fig = _new_figure()
    ax = fig.add_subplot()
    several = df["decomposition"].nunique(dropna=False) > 1
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
            pts = group[["macs_factor", col]].dropna()
            if pts.empty:
                continue
            ax.plot(
                pts["macs_factor"],
                100 * pts[col],
                style,
                marker=marker,
                color=color,
                label=f"{label}, {suffix}",
            )
            px += pts["macs_factor"].tolist()
            py += (100 * pts[col]).tolist()
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
    ax.set_ylabel("test top-1 accuracy (%)")
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


def plot_sensitivity(
    runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike
) -> Path | None:
    """Validation accuracy vs rank level, one line per layer: ``sensitivity_<model>.png``.

    Returns:
        The PNG path, or None (logged) when the model has no ``sensitivity`` records.
    """
    records = latest_records(
        runs,
        "sensitivity",
        model=model,
        key=lambda run, r: (r.get("layer"), _float(r.get("level"))),
    )
    if not records:
        _skip("sensitivity", model, "no sensitivity records")
        return None
    by_layer: dict[str, list[tuple[float, float]]] = {}
    for (layer, level), (_, rec) in records.items():
        by_layer.setdefault(str(layer), []).append((level, 100 * _float(rec.get("val_top1"))))
    layer_pairs = _records(runs, "layers", model)
    order = [ly.get("name") for ly in layer_pairs[-1][1].get("layers", [])] if layer_pairs else []
    names = sorted(by_layer, key=lambda n: (order.index(n) if n in order else len(order), n))
    fig = _new_figure(width=9.0 if len(names) > 10 else 7.5)
    ax = fig.add_subplot()
    for name, color in zip(names, _colors(len(names))):
        pts = sorted(by_layer[name])
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=".", color=color, label=name)
    baseline = _latest_baseline(runs, model)
    if baseline is not None and not math.isnan(_float(baseline.get("val_top1"))):
        ax.axhline(
            100 * baseline["val_top1"],
            color="gray",
            linestyle="-.",
            label=f"dense ({100 * baseline['val_top1']:.2f} %)",
        )
    ax.set_xlabel("rank level (fraction of full rank)")
    ax.set_ylabel("validation top-1 accuracy (%)")
    ax.set_title(f"{model}: per-layer sensitivity to rank truncation")
    ax.grid(alpha=0.3)
    ncol = 1 + len(names) // 16
    ax.legend(fontsize=6, ncol=ncol, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _save(fig, Path(out_dir) / f"sensitivity_{model}.png")


def plot_search_trace(
    runs: Sequence[Mapping], model: str, out_dir: str | os.PathLike
) -> Path | None:
    """Best-so-far validation accuracy vs evaluations per search: ``search_trace_<model>.png``.

    One line per (method, decomposition, target) from ``candidate`` records in write order, using
    the run that wrote that search last; faint dots are the individual candidates.

    Returns:
        The PNG path, or None (logged) when the model has no ``candidate`` records.
    """
    pairs = _records(runs, "candidate", model)
    if not pairs:
        _skip("search_trace", model, "no candidate records")
        return None
    searches: dict[tuple, dict[str, list[float]]] = {}
    for run, rec in pairs:
        key = (rec.get("method"), rec.get("decomposition"), _target_key(rec.get("target")))
        by_run = searches.setdefault(key, {})
        # Re-inserting moves the run to the end, so the last run to write a candidate wins.
        vals = by_run.pop(run.get("run_id"), [])
        vals.append(100 * _float(rec.get("val_top1")))
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
    ax.set_ylabel("validation top-1 accuracy (%)")
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

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
    "MARKDOWN_COLUMNS",
    "SUMMARY_COLUMNS",
    "latest_records",
    "load_runs",
    "make_plots",
    "markdown_table",
    "pareto_front",
    "plot_acc_vs_macs",
    "plot_ranks",
    "plot_search_trace",
    "plot_sensitivity",
    "split_speedup",
    "summary_table",
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

_MARKDOWN_FORMATS: dict[str, str | Callable[[Any], str]] = {
    "target": _factor,
    "macs_factor": _factor,
    "params_factor": _factor,
    **{c: _pct for c in _ACC_COLUMNS},
    "delta_pp": "+.2f",
    "speedup_cpu": _factor,
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
) -> tuple[Path, Path]:
    """Write ``summary.csv`` (all of :data:`SUMMARY_COLUMNS`) and ``summary.md``.

    Args:
        df: output of :func:`summary_table`.
        out_dir: folder for both files (created if missing).
        plots: plot files to link from the Markdown (paths made relative to ``out_dir``).
        command: the command that produced the results, stated in the Markdown header.
        n_runs: number of runs analysed, stated in the header when given.

    Returns:
        ``(csv_path, md_path)``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "summary.csv", out_dir / "summary.md"
    df.to_csv(csv_path, index=False)

    date = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    runs_text = f" from {n_runs} run(s)" if n_runs is not None else ""
    lines = [
        "# Compression results",
        "",
        f"Generated by `{command or 'common.analysis.write_summary'}` on {date}{runs_text}.",
        "",
        "Accuracies are top-1 in %. BN = after BatchNorm recalibration, FT = after finetuning. "
        "Factors (×) are dense / compressed. Δ vs dense = final test accuracy (FT when present, "
        "else BN) minus the dense model's, in percentage points. Speed-ups are measured forward "
        "latency ratios (best CPU setting, and CUDA when measured). When a configuration was run "
        "more than once, the latest run is shown.",
        "",
    ]
    if df.empty:
        lines += ["No `final` records found.", ""]
    else:
        lines.append(markdown_table(df, MARKDOWN_COLUMNS, _MARKDOWN_FORMATS))
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

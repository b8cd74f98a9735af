"""Run documents in, one summary row per final record out.

Loading the documents (:func:`load_runs`), picking records (the latest of a kind per key, a run's
baseline, the seed of a record) and :func:`summary_table`: one row per run x method x
decomposition x target x seed, from the ``final`` records. Speed-ups come from the final records'
own ``speedup`` (see :func:`split_speedup` and the package docstring).
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from common.analysis.context import RUN_COLUMNS, run_context
from common.run.documents import load_document, records_of
from common.run.logs import KIND_KEYS

__all__ = [
    "METHOD_ORDER",
    "SUMMARY_COLUMNS",
    "final_problem",
    "latest_records",
    "load_runs",
    "split_speedup",
    "summary_table",
]

# The final-record fields copied into a row as floats (NaN when absent or not a number).
_FINAL_FLOATS = (
    "macs_factor",
    "params_factor",
    "val_top1_bn",
    "test_top1_bn",
    "val_top1_ft",
    "test_top1_ft",
)
_FINAL_COSTS = ("evaluations", "finetune_epochs", "wall_seconds")

SUMMARY_COLUMNS: tuple[str, ...] = (
    *RUN_COLUMNS,
    "method",
    "decomposition",
    "target",
    "seed",
    "metric",
    *_FINAL_FLOATS,
    "baseline_test_top1",
    "delta_pp",
    "speedup_cpu",
    "speedup_cpu_setting",
    "speedup_cuda",
    *_FINAL_COSTS,
)
"""Columns of :func:`summary_table`, one row per run and seed: the run's context
(:data:`~common.analysis.context.RUN_COLUMNS`), the configuration, accuracies as fractions,
``delta_pp`` in percentage points."""

METHOD_ORDER: tuple[str, ...] = ("uniform", "energy", "vbmf", "random", "policy", "tpe", "policy_seeded", "guided")
"""Row order of the methods in tables; other methods follow, alphabetically."""

ACC_COLUMNS = ("val_top1_bn", "test_top1_bn", "val_top1_ft", "test_top1_ft", "baseline_test_top1")
"""Accuracy columns (fractions in [0, 1])."""

_NUMERIC_COLUMNS = (
    "target",
    *_FINAL_FLOATS,
    "baseline_test_top1",
    "delta_pp",
    "speedup_cpu",
    "speedup_cuda",
    *_FINAL_COSTS,
)


# --------------------------------------------------------------------------- values


def to_float(value: Any) -> float:
    """Numeric value or NaN (None, strings and containers become NaN)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return math.nan
    return float(value)


def target_key(value: Any) -> Any:
    """A target as a float when it is a number (``3`` and ``3.0`` are one target)."""
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else value


def is_missing(value: Any) -> bool:
    """Whether ``value`` is None or a pandas missing value (NaN, NaT, NA)."""
    if value is None:
        return True
    try:
        return bool(pd.isna(value))
    except (TypeError, ValueError):
        return False


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


def kind_records(runs: Iterable[Mapping], kind: str, model: str | None = None) -> list[tuple[dict, dict]]:
    """``(run, record)`` pairs of one kind, optionally of one model, in write-time order. A malformed
    ``final`` record (:func:`final_problem`) is left out with a warning naming its log and ``seq``."""
    pairs = [
        (run, record) for run in runs if model is None or run.get("model") == model for record in records_of(run, kind)
    ]
    if kind == "final":
        pairs = [(run, record) for run, record in pairs if _well_formed(run, record)]
    return sorted(pairs, key=lambda pr: _order(pr[1]))


_FINAL_OPTIONAL_NUMBERS = (
    "val_top1_bn",
    "val_top1_ft",
    "test_top1_ft",
    "baseline_test_top1",
    "evaluations",
    "finetune_epochs",
    "wall_seconds",
)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def final_problem(final: Mapping[str, Any]) -> str | None:
    """What makes a ``final`` record unusable for the tables, in words; None when nothing does.

    It must carry every key a writer gives it (:data:`common.run.logs.KIND_KEYS`): ``method`` and
    ``decomposition`` as names, ``target``, ``test_top1_bn``, ``macs_factor`` and ``params_factor`` as
    finite numbers (the target and factors > 0); the other numbers it may carry as numbers or None,
    ``seed`` as a whole number, ``metric`` as a name, ``speedup`` as a mapping.
    """
    missing = [k for k in KIND_KEYS["final"] if final.get(k) is None]
    if missing:
        return f"lacks {', '.join(missing)}"
    for key in ("method", "decomposition"):
        if not isinstance(final[key], str):
            return f"has {key}={final[key]!r}, not a name"
    for key in ("target", "test_top1_bn", "macs_factor", "params_factor"):
        value = final[key]
        if not (_is_number(value) and math.isfinite(value)) or (key != "test_top1_bn" and value <= 0):
            return f"has {key}={value!r}, not a finite {'number' if key == 'test_top1_bn' else 'positive number'}"
    for key in _FINAL_OPTIONAL_NUMBERS:
        if final.get(key) is not None and not _is_number(final[key]):
            return f"has {key}={final[key]!r}, not a number"
    seed = final.get("seed")
    if seed is not None and not (_is_number(seed) and math.isfinite(seed) and float(seed).is_integer()):
        return f"has seed={seed!r}, not a whole number"
    if final.get("metric") is not None and not isinstance(final["metric"], str):
        return f"has metric={final['metric']!r}, not a name"
    if final.get("speedup") is not None and not isinstance(final["speedup"], Mapping):
        return f"has speedup={final['speedup']!r}, not a mapping of settings to numbers"
    return None


def _well_formed(run: Mapping, final: Mapping) -> bool:
    """Whether a final record makes a row; a malformed one is reported (a warning naming the log and the
    record's ``seq``) and skipped."""
    problem = final_problem(final)
    if problem is not None:
        # warned from here (not the caller): one location, so the default filter shows each record once
        warnings.warn(f"{run_file(run)}: final record (seq {final.get('seq')!r}) {problem}; skipped", stacklevel=1)
    return problem is None


def latest_records(
    runs: Iterable[Mapping], kind: str, key: Callable[[dict, dict], Any], model: str | None = None
) -> dict[Any, tuple[dict, dict]]:
    """The last-written record of ``kind`` per ``key(run, record)``.

    Returns:
        ``{key: (run, record)}`` in order of first appearance of each key.
    """
    out: dict[Any, tuple[dict, dict]] = {}
    for run, record in kind_records(runs, kind, model):
        out[key(run, record)] = (run, record)
    return out


def latest_of(
    run: Mapping, kind: str, targets: set[float] | None = None, seeds: set[int] | None = None
) -> dict[tuple, dict]:
    """``{(method, decomposition, target, seed): record}``: one run's last-written record of ``kind``
    per configuration and run seed (as :func:`seed_lookup` reads it), of ``targets`` and ``seeds``
    (None: all of them).

    A stage logged twice (a resumed or repeated run) counts its later record, by write time, as
    :func:`summary_table` does; the benchmarks pair a plan with its final through this one key.
    """
    seed = seed_lookup()
    latest = latest_records(
        [run],
        kind,
        lambda r, rec: (rec["method"], rec.get("decomposition", "ht2"), float(rec["target"]), seed(r, rec)),
    )
    return {
        k: rec
        for k, (_, rec) in latest.items()
        if (targets is None or k[2] in targets) and (seeds is None or k[3] in seeds)
    }


def latest_plans(run: Mapping, targets: set[float], seeds: set[int] | None = None) -> dict[tuple, dict]:
    """:func:`latest_of` for ``plan`` records."""
    return latest_of(run, "plan", targets, seeds)


def run_baseline(run: Mapping) -> dict | None:
    """The run's own last ``baseline`` record (None without one: never another run's)."""
    own = records_of(run, "baseline")
    return max(own, key=_order) if own else None


# --------------------------------------------------------------------------- seeds


def _int_seed(value: Any, default: int) -> int:
    """``value`` as an integer seed, else ``default`` (None, text and fractions are no seeds)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return default
    return int(value) if float(value).is_integer() else default


def _config_seed(run: Mapping) -> int:
    """The seed of the run's last ``config`` record; 0 when absent (the experiments' default)."""
    configs = records_of(run, "config")
    return _int_seed(configs[-1].get("seed"), 0) if configs else 0


def _multi_seed(run: Mapping) -> bool:
    """Whether the run's records carry their own run seed.

    Older single-seed runs wrote a per-candidate sampling seed under ``candidate.seed``; it must
    not be read as the run seed. A run is multi-seed when its config lists ``seeds`` or one of its
    ``final`` records has a ``seed``.
    """
    return any(r.get("seeds") is not None for r in records_of(run, "config")) or any(
        r.get("seed") is not None for r in records_of(run, "final")
    )


def seed_lookup() -> Callable[[Mapping, Mapping], int]:
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


def lowest_seed(
    pairs: Sequence[tuple[dict, dict]], key: Callable[[dict], Any] = lambda record: None
) -> list[tuple[dict, dict]]:
    """The ``(run, record)`` pairs of the lowest seed within each ``key(record)`` group, in order.

    Plots of one search or one sensitivity sweep would mix unrelated curves across seeds; the
    lowest seed (normally 0) is the one every run computes.
    """
    seed = seed_lookup()
    seeds = [seed(run, rec) for run, rec in pairs]
    lowest: dict[Any, int] = {}
    for (_, rec), s in zip(pairs, seeds):
        k = key(rec)
        lowest[k] = min(s, lowest.get(k, s))
    return [pr for pr, s in zip(pairs, seeds) if s == lowest[key(pr[1])]]


# --------------------------------------------------------------------------- sorting


def method_rank(method: Any) -> tuple[int, str]:
    """Sort key of a method: its place in :data:`METHOD_ORDER`, unknown methods after them,
    alphabetically."""
    return (METHOD_ORDER.index(method) if method in METHOD_ORDER else len(METHOD_ORDER), str(method))


def _method_sort_key(methods: pd.Series) -> pd.Series:
    """Sort key for a method column (:func:`method_rank`)."""
    return methods.map(method_rank)


def sort_rows(df: pd.DataFrame, extra: Sequence[str] = ()) -> pd.DataFrame:
    """Rows sorted by run (model, dataset, checkpoint, run id: those present), decomposition,
    method (:data:`METHOD_ORDER`), target, ``extra``."""
    runs = [c for c in RUN_COLUMNS if c in df.columns]
    return df.sort_values(
        [*runs, "decomposition", "method", "target", *extra],
        na_position="last",
        kind="stable",
        key=lambda col: _method_sort_key(col) if col.name == "method" else col,
    ).reset_index(drop=True)


# --------------------------------------------------------------------------- summary rows


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
        v = to_float(value)
        if math.isnan(v):
            continue
        if "cuda" in name.lower() or "gpu" in name.lower():
            cuda.append(v)
        else:
            cpu[name] = v
    best = max(cpu, key=cpu.__getitem__) if cpu else None
    best_cpu = cpu[best] if best is not None else math.nan
    return best_cpu, best, (max(cuda) if cuda else math.nan)


def run_file(run: Mapping) -> str:
    """The run's log file (its ``source``) for messages, else its run id."""
    return str(run.get("source") or f"run {run.get('run_id')!r}")


def final_metric(run: Mapping, final: Mapping) -> str:
    """The budget metric of a final record: its own ``metric``, else the run's config ``metric``.

    Final records carry ``metric`` (``"macs"`` or ``"params"``); older logs have it only in the
    run's ``config`` record, which then holds for every final record of the run.

    Raises:
        ValueError: neither the record nor any config record of the run has a metric (names the
            run's log file and the record).
    """
    if final.get("metric") is not None:
        return final["metric"]
    configs = [r["metric"] for r in records_of(run, "config") if r.get("metric") is not None]
    if configs:
        return configs[-1]
    raise ValueError(
        f"{run_file(run)}: final record of {final.get('method')!r} at target "
        f"{final.get('target')!r} has no 'metric', and the run has no config record with one"
    )


def _check_fractions(row: Mapping[str, Any], run: Mapping, final: Mapping) -> None:
    """Accuracies must be fractions in [0, 1]; a percentage would silently skew every table."""
    for col in ACC_COLUMNS:
        if not math.isnan(row[col]) and not 0.0 <= row[col] <= 1.0:
            raise ValueError(
                f"{run_file(run)}: final record (seq {final.get('seq')!r}) of run {row['run_id']!r} ({row['model']}, "
                f"{row['method']}, target {row['target']}): {col}={row[col]} is not a fraction in [0, 1]"
            )


def _baseline_test(run: Mapping, final: Mapping) -> float:
    """The dense test accuracy a final record is compared with: its run's ``baseline`` record's,
    else the record's own ``baseline_test_top1``; NaN without either (never another run's)."""
    baseline = run_baseline(run)
    own = to_float(baseline.get("test_top1")) if baseline else math.nan
    return own if not math.isnan(own) else to_float(final.get("baseline_test_top1"))


def _summary_row(key: tuple, run: Mapping, final: Mapping) -> dict:
    """One :data:`SUMMARY_COLUMNS` row from a final record (``key``: run id, model … seed)."""
    _, model, method, decomposition, target, seed = key
    cpu, cpu_setting, cuda = split_speedup(final.get("speedup"))
    row: dict[str, Any] = {
        **run_context(run),
        "model": model,
        "method": method,
        "decomposition": decomposition,
        "target": target,
        "seed": seed,
        "metric": final_metric(run, final),
        **{col: to_float(final.get(col)) for col in _FINAL_FLOATS},
        "baseline_test_top1": _baseline_test(run, final),
        "speedup_cpu": cpu,
        "speedup_cpu_setting": cpu_setting,
        "speedup_cuda": cuda,
        **{col: to_float(final.get(col)) for col in _FINAL_COSTS},
    }
    _check_fractions(row, run, final)
    best = row["test_top1_ft"] if not math.isnan(row["test_top1_ft"]) else row["test_top1_bn"]
    row["delta_pp"] = 100.0 * (best - row["baseline_test_top1"])
    return row


def summary_table(runs: Sequence[Mapping]) -> pd.DataFrame:
    """One row per run x method x decomposition x target x seed, from the ``final`` records.

    Rows of different runs are never merged: a configuration that two runs computed gives two
    rows, told apart by their run's ``dataset``, ``checkpoint`` and ``run_id``
    (:func:`~common.analysis.context.run_context`). Within one run, a configuration logged twice
    at one seed (a resumed or repeated stage) counts its last record.

    ``delta_pp`` is the final test accuracy (after finetuning when present, else after BN
    recalibration) minus the dense baseline's, in percentage points; the baseline is the run's
    ``baseline`` record, else the final record's own ``baseline_test_top1`` (NaN without either).
    ``metric`` is the record's own, else the run's config's (:func:`final_metric`). A final record
    without ``seed`` has its run's config seed (0 when the run has no config); see
    :func:`~common.analysis.aggregate_seeds` for one row per configuration. A malformed final record
    (:func:`final_problem`: a key every writer gives it missing, a value of the wrong type, a NaN
    factor) is reported with a warning naming its log and ``seq``, and makes no row.

    Returns:
        A DataFrame with :data:`SUMMARY_COLUMNS`, sorted by run (model, dataset, checkpoint, run
        id), decomposition, method (in :data:`METHOD_ORDER`), target, seed.

    Raises:
        ValueError: an accuracy outside [0, 1] (they must be fractions), naming run and field; a
            final record without a metric anywhere in its run (naming the run's log file).
    """
    seed_of = seed_lookup()
    finals = latest_records(
        runs,
        "final",
        key=lambda run, r: (
            run.get("run_id"),
            run.get("model"),
            r.get("method"),
            r.get("decomposition"),
            target_key(r.get("target")),
            seed_of(run, r),
        ),
    )
    rows = [_summary_row(key, run, final) for key, (run, final) in finals.items()]
    df = pd.DataFrame(rows, columns=list(SUMMARY_COLUMNS))
    for col in _NUMERIC_COLUMNS:
        df[col] = pd.to_numeric(df[col], errors="coerce").astype(float)
    df["seed"] = df["seed"].astype(int)
    return sort_rows(df, extra=["seed"])

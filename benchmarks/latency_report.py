"""The latency benchmark's table: the columns of a row, reading the CSV back, and its Markdown report.

``benchmarks/latency.py`` appends one row per (model, method, decomposition, target, seed, setting)
(:data:`KEY`) with the columns :data:`ROW_COLUMNS` to ``<out>/latency_<device>.csv``;
:func:`read_table` reads the whole CSV back (an older file widened to the columns, the last row per
key), and :func:`markdown_report` renders it as ``<out>/latency_<device>.md``: the machine, versions,
commands and load, then one table per input size (32×32, and 224×224 for the ImageNet architectures).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.analysis import markdown_table
from common.models import input_size

KEY = ["model", "method", "decomposition", "target", "seed", "setting"]
ORT_COLUMNS = [
    "ort_dense_ms",
    "ort_factorized_ms",
    "ort_deployed_ms",
    "ort_speedup_factorized",
    "ort_speedup",
    "ort_max_rel_error",
    "ort_forms",
]
COMPILE_COLUMNS = ["compile_mode", "compile_dense_ms", "compile_deployed_ms", "compile_speedup"]
# every CSV row has exactly these columns, in this order (an older file is widened to them on start)
ROW_COLUMNS = [
    "model",
    "method",
    "decomposition",
    "target",
    "seed",
    "input_size",
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
    "dense_channels_last",
    "forms",
    *ORT_COLUMNS,
    *COMPILE_COLUMNS,
    "rounds",
    "warmup",
    "iters",
    "weights",
    "device_name",
    "load1",
    "torch",
    "onnxruntime",
    "date",
    "command",
]
MD_FLOATS = (
    "macs_factor",
    "deployed_macs_factor",
    "dense_ms",
    "factorized_ms",
    "deployed_ms",
    "speedup_factorized",
    "speedup",
)
ORT_MD_FLOATS = ("ort_dense_ms", "ort_factorized_ms", "ort_deployed_ms", "ort_speedup_factorized", "ort_speedup")
COMPILE_MD_FLOATS = ("compile_dense_ms", "compile_deployed_ms", "compile_speedup")
MD_FORMATS = dict.fromkeys((*MD_FLOATS, *ORT_MD_FLOATS, *COMPILE_MD_FLOATS, "speedup_best"), ".2f") | {"load1": ".1f"}


def read_table(csv: Path) -> pd.DataFrame:
    """The CSV with every :data:`ROW_COLUMNS` column (older files lack some) and one row per key (the last)."""
    df = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=ROW_COLUMNS)
    for c in ROW_COLUMNS:
        if c not in df.columns:
            df[c] = [input_size(m) for m in df["model"]] if c == "input_size" else np.nan
    df = df[ROW_COLUMNS + [c for c in df.columns if c not in ROW_COLUMNS]]
    return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def row_seed(value: object) -> int | None:
    """A CSV row's seed; None for a row of a file written before rows had seeds (never taken as done)."""
    return None if pd.isna(value) else int(value)


def _values(sub: pd.DataFrame, col: str) -> str:
    """The distinct values of ``col`` (as integers) in ``sub``, or ``?`` for rows of a file without it."""
    vals = sorted({int(v) for v in sub[col].dropna()})
    return "/".join(map(str, vals)) if vals else "?"


def _counts(df: pd.DataFrame) -> str:
    """How the rows of ``df`` (one input size) were timed, per setting, from the rows themselves."""
    parts = []
    for setting, sub in df.groupby("setting", sort=False):
        parts.append(
            f"`{setting}` {_values(sub, 'iters')} forwards after {_values(sub, 'warmup')} warm-up, "
            f"{_values(sub, 'rounds')} rounds"
        )
    return "; ".join(parts)


def _commands(df: pd.DataFrame, argv: Sequence[str]) -> list[str]:
    """The commands that wrote the rows (this one for rows of files without the column)."""
    commands = list(dict.fromkeys(str(c) for c in df["command"].dropna())) if len(df) else []
    if not commands or df["command"].isna().any():
        commands.append(
            f"python benchmarks/latency.py {' '.join(argv)}" + (" (rows of earlier runs)" if commands else "")
        )
    return commands


def _load_text(df: pd.DataFrame) -> str:
    """The load average the rows were timed under, with a warning when it exceeded the core count."""
    load = df["load1"].dropna() if len(df) else pd.Series(dtype=float)
    cores = os.cpu_count() or 1
    load_txt = ""
    if len(load):
        load_txt = f"1-min load average while the rows were timed (`load1`): {load.min():.1f} to {load.max():.1f} on {cores} cores"
        if load.max() > cores:
            load_txt += (
                " — above the core count other jobs shared the cores: **these timings are under contention** (the "
                "interleaved rounds keep the ratios fair against drift, absolute ms are inflated and noisier)"
            )
        load_txt += ". "
    return load_txt


def _header(df: pd.DataFrame, commands: Sequence[str], device: str, device_name: str) -> str:
    """The report's title, commands, machine, versions, dates and load, and what the columns mean."""
    ort_versions = sorted({str(v) for v in df["onnxruntime"].dropna()}) if len(df) else []
    torch_versions = sorted({str(v) for v in df["torch"].dropna()}) if len(df) else [torch.__version__]
    dates = sorted(str(d)[:10] for d in df["date"].dropna()) if len(df) else []
    when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "no rows yet"
    return (
        f"# {device.upper()} latency vs dense\n\n"
        + "".join(f"`{c}`\n" if len(commands) == 1 else f"- `{c}`\n" for c in commands)
        + f"\non {device_name}, torch {', '.join(torch_versions)}"
        + (f", onnxruntime {', '.join(ort_versions)}" if ort_versions else "")
        + f", {when}. {_load_text(df)}Each row times dense, factorized and deployed in alternation, in rounds "
        "(ms: median over rounds of the per-round medians; speed-up: median of the per-round ratios, so that "
        "machine drift cancels); the forward counts are given per table. Memory format and deployment are chosen "
        "by separate timings first. *factorized*: the "
        "compressed model's chains of factor convs as they are; *deployed*: each factorized layer in the "
        "partition of merged adjacent factor convs that ran fastest here (exact: the same function), or the "
        "model as factorized when that was faster as a whole (`forms` = as factorized); "
        "`forms` counts layers per partition, e.g. `(1, 1, 1, 1)` = HT-2 as four convs, `(4,)` = merged "
        "back to one dense conv. *deployed MACs ×*: conv-MAC reduction of what actually runs.\n\n"
    )


def _notes(df: pd.DataFrame, commands: Sequence[str], device: str, threads: int) -> str:
    """What the wait policy, the ``ort_*`` and the ``compile_*`` columns mean, where the rows have them."""
    notes = ""
    if any("OMP_WAIT_POLICY=PASSIVE" in c for c in commands):
        notes += (
            "`OMP_WAIT_POLICY=PASSIVE` (ONNX Runtime's intra-op spinning off to match): idle threads sleep "
            "instead of spinning. On cores shared with other jobs a spinning thread takes the time slice its "
            "partner waits for; here that made 2-thread PyTorch forwards 30–100× slower at batch 1.\n\n"
        )
    if _has(df, "ort_speedup"):
        notes += (
            "*ort_*: the same dense, factorized and deployed models exported to ONNX (`common.deploy.export.export_onnx`: "
            "torch's dynamo exporter at its default opset, dynamic batch, `onnx.checker` passed, ONNX Runtime's "
            "output within 1e-4 of PyTorch eager relative to the output's scale: `ort_max_rel_error` in the CSV) "
            f"and run by ONNX Runtime's CPU provider with {threads} intra-op threads and all graph "
            "optimizations, timed in their own interleaved rounds with the same counts. ORT runs NCHW, so its "
            "deployment is the partition that ran fastest in PyTorch in the contiguous format at that batch "
            "(`ort_forms` in the CSV). *speedup_best*: the dense model in its faster runtime over the fastest "
            "compressed form in either runtime.\n\n"
        )
    if _has(df, "compile_speedup"):
        modes = ", ".join(sorted({str(m) for m in df["compile_mode"].dropna()}))
        notes += (
            f"*compile_*: the dense and the deployed model compiled by `torch.compile` (inductor, mode {modes}, "
            "static shapes, no graph breaks; `common.deploy.latency.compile_for_inference`) in the memory format and "
            "partition chosen in eager mode, compiled before timing and timed in their own interleaved rounds"
            + (" without our CUDA-graph capture" if device == "cuda" else "")
            + ".\n\n"
        )
    return notes


def _has(df: pd.DataFrame, column: str) -> bool:
    """Whether any row has a value in ``column``."""
    return len(df) > 0 and df[column].notna().any()


def _columns(df: pd.DataFrame) -> list[str]:
    """The tables' columns: the ``ort_*`` and ``compile_*`` ones (and ``speedup_best``) where rows have them."""
    has_ort, has_compile = _has(df, "ort_speedup"), _has(df, "compile_speedup")
    columns = [*KEY, *MD_FLOATS]
    if has_ort:
        columns += [*ORT_MD_FLOATS]
    if has_compile:
        columns += [*COMPILE_MD_FLOATS]
    if has_ort or has_compile:
        columns += ["speedup_best"]
    return columns + ["channels_last", "forms", "load1"]


def _with_best(df: pd.DataFrame) -> pd.DataFrame:
    """``df`` with ``speedup_best``: the dense model in its fastest runtime over the fastest compressed form."""
    if not len(df):
        return df
    df = df.copy()
    best_dense = df[["dense_ms", "ort_dense_ms", "compile_dense_ms"]].min(axis=1)
    best_comp = df[["factorized_ms", "deployed_ms", "ort_factorized_ms", "ort_deployed_ms", "compile_deployed_ms"]].min(
        axis=1
    )
    df["speedup_best"] = best_dense / best_comp
    return df


def _tables(df: pd.DataFrame, columns: Sequence[str]) -> list[str]:
    """One titled table per input size (32×32; 224×224, or a line saying it was not measured)."""
    cuda = (
        "CUDA rows: `latency_cuda.md`."
        if torch.cuda.is_available()
        else "CUDA at 224×224: not measured: no GPU on this machine."
    )
    parts = []
    for size, title in ((32, "## 32×32"), (224, "## 224×224: ImageNet architectures")):
        sub = df[df["input_size"] == size] if len(df) else df
        sub = sub.sort_values(["model", "method", "decomposition", "target", "seed", "batch"], kind="stable")
        if not len(sub):
            if size == 224:
                parts.append(f"{title}\n\nNot measured (`--imagenet`). {cuda}\n\n")
            continue
        note = f"Weights: {', '.join(sorted(set(sub['weights'].dropna())))}. " + _counts(sub) + "."
        if size == 32:
            note = "The plans of the run documents (`--json`). " + note
        else:
            note = (
                "Seeded random weights (no ImageNet checkpoint is used: latency does not depend on the values), "
                f"{', '.join(sorted(set(sub['method'])))} plans at the same conv-MAC targets built from those "
                "weights' spectra by the data-free rules (`common.search.rules`, finished onto the budget like the "
                "searcher's): speed rows; the energy ranks are not those of a trained model. "
                f"{note} {cuda}"
            )
        parts += [f"{title}\n\n{note}\n\n", markdown_table(sub, columns, MD_FORMATS), "\n"]
    return parts


def markdown_report(df: pd.DataFrame, argv: Sequence[str], device: str, device_name: str, threads: int) -> str:
    """The Markdown report of the whole CSV (:func:`read_table`): machine, versions, commands, load, then one
    table per input size. ``argv``: this invocation's arguments; ``device``: ``cpu`` or ``cuda``;
    ``device_name``: the machine in words; ``threads``: the CPU timing threads (ONNX Runtime's too)."""
    commands = _commands(df, argv)
    header = _header(df, commands, device, device_name) + _notes(df, commands, device, threads)
    return "".join([header, *_tables(_with_best(df), _columns(df))])

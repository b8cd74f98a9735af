"""What a run is: its model, dataset, checkpoint and run id, the context of every row and plot.

Results are compared within one run only (:data:`RUN_COLUMNS`): two runs may differ in checkpoint,
data, protocol or machine, so a policy margin or a Pareto front across them would compare
unlike things. Every table row and every plot panel carries its run's context.

The checkpoint is named by a fingerprint: a content hash when the run logged one (the first of
:data:`CHECKPOINT_HASH_FIELDS` found in the run's ``baseline``, then ``config`` record, shortened
to 12 characters), else the checkpoint file's name (``alexnet.pt``), else ``"random init"`` when
the run logged that it had no checkpoint, else None (unknown).
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

from common.run.documents import records_of

__all__ = [
    "CHECKPOINT_HASH_FIELDS",
    "RUN_COLUMNS",
    "checkpoint_fingerprint",
    "device_of",
    "RUNS_COLUMNS",
    "model_runs",
    "run_context",
    "run_dataset",
    "run_title",
    "runs_table",
]

RUN_COLUMNS: tuple[str, ...] = ("model", "dataset", "checkpoint", "run_id")
"""What one run is, in tables: rows are only ever compared within one value of these columns."""

CHECKPOINT_HASH_FIELDS: tuple[str, ...] = (
    "checkpoint_sha256",
    "checkpoint_sha",
    "checkpoint_fingerprint",
)
"""Record fields that may hold a content hash of the run's checkpoint (first found wins)."""

_HASH_LENGTH = 12


def _last(run: Mapping, kind: str) -> dict:
    """The run's last record of ``kind`` ({} without one)."""
    records = records_of(run, kind)
    return records[-1] if records else {}


def end_status(run: Mapping) -> str | None:
    """The status of the run's last ``end`` record (``"ok"`` when every stage finished,
    ``"deadline"`` when the time box stopped it before one); None while the run has not ended."""
    return _last(run, "end").get("status")


def run_dataset(run: Mapping) -> str | None:
    """The dataset of the run's last ``config`` record (a ``baseline.dataset`` wins), else None."""
    for record in (_last(run, "baseline"), _last(run, "config")):
        if record.get("dataset"):
            return str(record["dataset"])
    return None


def checkpoint_fingerprint(run: Mapping) -> str | None:
    """The run's checkpoint: a logged content hash, else the file name (see the module docstring).

    The ``baseline`` record holds the checkpoint actually loaded; the ``config`` one may say
    ``"auto"``, which names no file and is skipped.
    """
    records = (_last(run, "baseline"), _last(run, "config"))
    for record in records:
        for field in CHECKPOINT_HASH_FIELDS:
            if isinstance(record.get(field), str) and record[field]:
                return record[field][:_HASH_LENGTH]
    for record in records:
        path = record.get("checkpoint")
        if isinstance(path, str) and path and path != "auto":
            return os.path.basename(path.rstrip("/\\")) or path
    if any("checkpoint" in r and r["checkpoint"] is None for r in records):
        return "random init"
    return None


def run_context(run: Mapping) -> dict[str, Any]:
    """``{model, dataset, checkpoint, run_id}`` of a run document (None where not logged)."""
    return {
        "model": run.get("model"),
        "dataset": run_dataset(run),
        "checkpoint": checkpoint_fingerprint(run),
        "run_id": run.get("run_id"),
    }


RUNS_COLUMNS: tuple[str, ...] = (
    "run_id",
    "model",
    "dataset",
    "checkpoint",
    "checkpoint_path",
    "device",
    "date",
    "status",
)
"""Columns of :func:`runs_table`."""


def device_of(config: Mapping[str, Any]) -> str | None:
    """The device a ``config`` record names: its ``device_name``, or for a CPU run the CPU's model name
    where the run logged it (``cpu``, since 2026-12-07): two CPU models can give a run different last
    digits, and so a different finetuned model."""
    device = config.get("device_name")
    if (device is None or str(device).lower() == "cpu") and config.get("cpu"):
        return str(config["cpu"])
    return device


def runs_table(runs: Sequence[Mapping]) -> list[dict[str, Any]]:
    """One row per run (:data:`RUNS_COLUMNS`), sorted by model and start: the context of every
    result row: ``checkpoint`` is the fingerprint, ``checkpoint_path`` the file as logged,
    ``device`` the config's device (:func:`device_of`), ``date`` its start, ``status`` :func:`end_status`."""
    rows = []
    for model in sorted({str(r.get("model")) for r in runs}):
        for run in model_runs(runs, model):
            base, config = _last(run, "baseline"), _last(run, "config")
            rows.append(
                {
                    **run_context(run),
                    "checkpoint_path": base.get("checkpoint") or config.get("checkpoint"),
                    "device": device_of(config),
                    "date": config.get("date"),
                    "status": end_status(run),
                }
            )
    return [{c: row.get(c) for c in RUNS_COLUMNS} for row in rows]


def _started(run: Mapping) -> float:
    times = [r["t"] for r in run.get("records", []) if isinstance(r.get("t"), (int, float))]
    return min(times) if times else math.inf


def model_runs(runs: Sequence[Mapping], model: str) -> list[Mapping]:
    """The model's runs, in the order they started (then by run id)."""
    return sorted(
        (r for r in runs if r.get("model") == model),
        key=lambda r: (_started(r), str(r.get("run_id"))),
    )


def _text(value: Any, missing: str) -> str:
    return missing if value is None or (isinstance(value, float) and math.isnan(value)) else str(value)


def run_title(context: Mapping[str, Any], what: str) -> str:
    """A panel title: ``"<model> on <dataset>: <what>\\nrun <run_id>, checkpoint <checkpoint>"``."""
    return (
        f"{_text(context.get('model'), '?')} on {_text(context.get('dataset'), 'unlogged dataset')}: {what}\n"
        f"run {_text(context.get('run_id'), '?')}, checkpoint {_text(context.get('checkpoint'), 'unlogged')}"
    )

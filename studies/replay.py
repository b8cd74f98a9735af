"""Replaying a logged run in a one-off study: its records and ``config`` record (:func:`logged_run`), the
dense model and data it names, its checkpoint's bytes checked (:func:`logged_inputs`, with the
``--data-root`` and ``--checkpoint`` options of :func:`add_logged_input_args` for a log written on another
machine), and a rebuilt proxy's dense score checked against the logged one (:func:`checked_dense_score`).

The studies are command-line scripts: an input that is not the run's ends them with ``SystemExit`` and a
message naming it.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from torch import nn

from common.data.datasets import load_dataset
from common.data.splits import DatasetSplits
from common.models import build_model, load_checkpoint
from common.run.logs import config_record, parse_log
from common.run.preflight import inspect_checkpoint


def add_logged_input_args(p: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--checkpoint``: where this machine keeps the inputs of a logged run that a
    study replays, for :func:`logged_inputs` (``logged_inputs(cfg, a.data_root, a.checkpoint)``)."""
    p.add_argument("--data-root", help="default: the log's data_root")
    p.add_argument("--checkpoint", help="the dense checkpoint here (default: the log's path; its sha256 must match)")


def logged_run(log: str | Path) -> tuple[list[dict], dict]:
    """A run log's records and its ``config`` record, for studies that replay a run: corrupt lines are
    reported on stderr and skipped (:func:`common.run.logs.parse_log`).

    Raises:
        SystemExit: the log has no ``config`` record, naming the file.
    """
    records, errors = parse_log(log)
    for e in errors:
        print(f"warning: {e}", file=sys.stderr)
    try:
        return records, config_record(records, log)
    except ValueError as e:
        raise SystemExit(str(e)) from None


def logged_inputs(
    cfg: Mapping, data_root: str | None = None, checkpoint: str | Path | None = None
) -> tuple[nn.Module, DatasetSplits]:
    """The dense model (eval mode) and data a logged run's ``config`` record names, for studies that
    replay a run: the checkpoint's bytes must be the run's (its logged ``checkpoint_sha256``, when logged).

    Args:
        cfg: the run's ``config`` record.
        data_root: the dataset's root here (default: the logged one).
        checkpoint: the checkpoint file here (default: the logged path), for a log written on another
            machine; its bytes are checked all the same.

    Raises:
        SystemExit: the checkpoint differs, naming both digests.
    """
    ckpt = str(checkpoint) if checkpoint is not None else cfg["checkpoint"]
    sha = inspect_checkpoint(ckpt)
    if cfg.get("checkpoint_sha256") and sha != cfg["checkpoint_sha256"]:
        raise SystemExit(f"{ckpt}: sha256 {sha[:12]}… is not the run's {cfg['checkpoint_sha256'][:12]}…")
    data = load_dataset(cfg["dataset"], root=data_root or cfg["data_root"])
    return load_checkpoint(build_model(cfg["model"], num_classes=data.num_classes), ckpt).eval(), data


def checked_dense_score(searcher, records: Sequence[Mapping], seed: int) -> float:
    """The dense model's score under ``searcher``'s proxy, which must equal the one the run logged for
    ``seed`` (its ``<dense>`` sensitivity record, when there is one): a replayed search scores as the run did.

    Raises:
        SystemExit: the scores differ (relative 1e-5), naming both.
    """
    dense = searcher.evaluator.score({})
    logged = next(
        (
            float(r["score"])
            for r in records
            if r.get("kind") == "sensitivity" and r.get("seed") == seed and r.get("layer") == "<dense>"
        ),
        None,
    )
    if logged is not None and abs(dense - logged) > 1e-5 * max(1.0, abs(logged)):
        raise SystemExit(
            f"seed {seed}: the rebuilt proxy scores the dense model {dense:.6g}, the run logged {logged:.6g}"
        )
    return dense

"""Per-image test hits of the runs' finals, for margins over seeds *and* test images.

A final's hits (which test images its model gets right, in the split's fixed order) come from two places:
its own ``final`` record (``test_hits_bn`` / ``test_hits_ft``, logged since 2026-12-06), or a ``test_hits``
record of a *hits log*, which ``studies/image_noise/image_noise.py`` keeps beside a results folder for logs from
before then (``<results dir>/image_hits_<model>.log``, run id ``image_noise``, each record naming its run in
``of_run``). ``jsonify_logs.py <results dir>`` turns both kinds of log into documents;
:func:`is_hits_document` tells a hits log's from a run's, :func:`collect_hits` reads the hits of both.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

from common.analysis.records import latest_of, run_file
from common.run.documents import records_of
from common.run.logs import unpack_hits

__all__ = ["HITS_KIND", "REPLICA_TOLERANCE", "HitsKey", "collect_hits", "is_hits_document"]

HITS_KIND = "test_hits"
"""Record kind of a hits log (one record per plan and stage)."""

REPLICA_TOLERANCE = 1e-3
"""Largest difference between a hits record's top-1 and its final's logged one (a fraction) for the record
to count as that final's: a few images flip with another summation order (a GPU-calibrated final
re-measured on the CPU, a finetuning replayed); another plan, calibration or recipe moves far more."""

HitsKey = tuple[str, str, str, float, int, str]
"""``(model, run_id, method, target, seed, stage)`` of an HT-2 final; ``stage`` is ``bn`` or ``ft``."""

_STAGES = ("bn", "ft")


def is_hits_document(document: Mapping) -> bool:
    """Whether a document is a hits log's (``test_hits`` records, no ``config`` or ``final``): not a run."""
    kinds = {r.get("kind") for r in document.get("records", [])}
    return HITS_KIND in kinds and not kinds & {"config", "final"}


def collect_hits(documents: Iterable[Mapping]) -> dict[HitsKey, np.ndarray]:
    """The per-image test hits of every HT-2 final the documents hold, by :data:`HitsKey`.

    From a run document: the hits its latest ``final`` record per (method, target, seed) carries (as
    :func:`~common.analysis.summary_table` picks finals). From a hits document: its latest ``test_hits``
    record per key whose top-1 lies within :data:`REPLICA_TOLERANCE` of the logged one (further off, a
    record is a replica of another model and is left out, as ``image_noise.py`` would refuse it).

    Raises:
        ValueError: a final's logged hits and a hits record disagree (names both logs and the final), or
            hits that do not unpack to their image count.
    """
    out: dict[HitsKey, np.ndarray] = {}
    source: dict[HitsKey, str] = {}

    def put(key: HitsKey, hits: np.ndarray, where: str) -> None:
        if key in out and (out[key].shape != hits.shape or (out[key] != hits).any()):
            raise ValueError(
                f"{where} and {source[key]}: different test hits for {key[2]} seed {key[4]} x{key[3]:g} "
                f"({key[5]}) of run {key[1]!r} ({key[0]})"
            )
        out[key], source[key] = hits, where

    hits_docs = []
    for run in documents:
        if is_hits_document(run):
            hits_docs.append(run)
            continue
        for (method, decomposition, target, seed), final in latest_of(run, "final").items():
            if decomposition != "ht2" or final.get("test_images") is None:
                continue
            for stage in _STAGES:
                packed = final.get(f"test_hits_{stage}")
                if packed is not None:
                    key = (str(run["model"]), str(run["run_id"]), str(method), float(target), int(seed), stage)
                    put(key, unpack_hits(packed, int(final["test_images"])), run_file(run))
    for doc in hits_docs:
        latest: dict[HitsKey, dict] = {}
        for rec in records_of(doc, HITS_KIND):
            if abs(float(rec["test_top1"]) - float(rec["test_top1_logged"])) > REPLICA_TOLERANCE:
                continue
            stage = str(rec.get("stage", "bn"))  # the first hits logs measured BN finals only
            key = (
                str(doc["model"]),
                str(rec["of_run"]),
                str(rec["method"]),
                float(rec["target"]),
                int(rec["seed"]),
                stage,
            )
            latest[key] = rec
        for key, rec in latest.items():
            put(key, unpack_hits(rec["hits"], int(rec["n"])), run_file(doc))
    return out

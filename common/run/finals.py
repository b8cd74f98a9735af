"""Finishing the chosen plans of a run: each plan's final model, BN-recalibrated
(:func:`common.search.proxy.final_model`) and optionally finetuned (:mod:`common.run.finetune_stage`),
evaluated on val and test with each test image's hit (:func:`common.run.measure.evaluate_splits`),
counted (params/MACs and their factors over the baseline), timed (:func:`common.run.measure.latency`),
saved as artifacts when asked (:mod:`common.deploy.artifacts`) and logged as its ``final`` record.

:func:`finish_stages` finishes a budget's planned stages: under ``torchrun`` one final model per rank at a
time, each rank's records kept aside (:class:`_Buffered`) and then logged by every rank in stage order.
:class:`Run` is what every stage of one experiment reads (:mod:`common.run.experiment` builds it).
"""

from __future__ import annotations

import copy
import dataclasses
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from common.data.splits import DatasetSplits
from common.decompose.cost import count_model
from common.decompose.surgery import plan_from_dict
from common.deploy.artifacts import artifact_name, save_artifact
from common.dist import from_main, shard_map, world
from common.run.config import ExperimentConfig
from common.run.finetune_stage import finetune_best, finetune_checkpoint, finetune_owner
from common.run.logs import RunLog, pack_hits
from common.run.measure import evaluate_splits, latency
from common.search.proxy import final_model


@dataclass
class Run:
    """What every stage of one experiment reads: config, log, device, data, dense model and baseline."""

    cfg: ExperimentConfig
    log: RunLog
    say: Callable[[str], None]
    device: torch.device
    data: DatasetSplits
    model: nn.Module
    base: dict
    t_start: float


def past_deadline(run: Run, key: dict) -> bool:
    """Whether ``cfg.deadline`` has passed (rank 0's clock decides for every rank); if so, say so and log ``end``."""
    deadline = run.cfg.deadline
    if deadline is None or not from_main(lambda: time.time() > deadline):
        return False
    run.say(f"deadline reached before {key}; re-run with the same run id to continue")
    run.log.write("end", status="deadline", wall_seconds=time.perf_counter() - run.t_start)
    return True


def finish_stages(run: Run, searchers: dict, pending: Sequence[tuple[dict, dict]]) -> bool:
    """Finish the planned stages ``pending`` (``(key, plan record)``): under ``torchrun`` each rank builds,
    recalibrates, finetunes and evaluates one final model at a time (the code of a single process, so
    the numbers are the same), and every rank logs each stage's records in stage order; False when the
    deadline stopped it."""
    size = world()[1]

    def finish(item: tuple[dict, dict]) -> list[tuple]:
        key, prec = item
        searcher = searchers[key["decomposition"], key["seed"]]
        if size == 1:  # straight into the log, as they come
            _finish(run, searcher, prec, key)
            return []
        buf = _Buffered(run.log)
        _finish(dataclasses.replace(run, log=buf, say=buf.comment), searcher, prec, key)
        return buf.items

    def replay(_: int, items: list[tuple]) -> None:
        for kind, text, payload in items:
            if kind == "#":
                run.say(text)
            else:
                run.log.write(kind, text, **payload)

    for start in range(0, len(pending), size):
        if past_deadline(run, pending[start][0]):
            return False
        shard_map(finish, pending[start : start + size], replay)
    return True


class _Buffered:
    """Stands in for the run's log while one rank finishes one stage: records and comments are kept
    (``items``, to be logged by every rank in stage order) and found again; the rest reads the log."""

    def __init__(self, log: RunLog):
        self.log, self.path, self.run_id = log, log.path, log.run_id
        self.items: list[tuple] = []

    def write(self, kind: str, text: str = "", **payload) -> dict:
        self.items.append((kind, text, copy.deepcopy(payload)))
        return {"kind": kind, "run_id": self.run_id, **copy.deepcopy(payload)}

    def comment(self, text: str) -> None:
        self.items.append(("#", text, None))

    def find(self, kind: str, **match) -> dict | None:
        for k, _, payload in reversed(self.items):
            if k == kind and all(payload.get(m) == v for m, v in match.items()):
                return {"kind": kind, **copy.deepcopy(payload)}
        return self.log.find(kind, **match)


def _finish(run: Run, searcher, prec: dict, key: dict) -> dict:
    """BN-recalibrate, evaluate, optionally finetune, count and time one chosen plan; log ``final``."""
    t0 = time.perf_counter()
    cfg = run.cfg
    label = _stage_label(key) if cfg.progress else None
    comp = final_model(
        run.model,
        plan_from_dict(prec["plan"]),
        searcher.spectra,
        run.data,
        cfg.final_calib_images,
        key["seed"],
        run.device,
        progress=label and f"{label}: BN recalibration",
    )
    ev = evaluate_splits(comp, run.data, run.device, label, per_image=True)
    rec = {
        "val_top1_bn": ev["val"]["top1"],
        "test_top1_bn": ev["test"]["top1"],
        "test_images": ev["test"]["n"],
        "test_hits_bn": pack_hits(ev["test"]["correct"]),
        "val_top1_ft": None,
        "test_top1_ft": None,
        "finetune_epochs": None,
    }
    ckpt = finetune_checkpoint(run.log, key)
    states = {"bn": _state_copy(comp)} if cfg.artifacts else {}
    if cfg.finetune_epochs > 0 and key["target"] in cfg.finetune_targets_or_all():
        # epochs logged, checkpointed to ckpt so an interrupted run resumes the finetuning where it stopped
        ft = finetune_best(
            comp,
            run.model,
            run.data,
            cfg,
            key,
            ev["val"]["top1"],
            run.device,
            log=run.log,
            checkpoint=ckpt,
            owner=finetune_owner(run.log, cfg, prec["plan"]),
            say=run.say,
            progress=f"{_stage_label(key)}: finetune" if cfg.progress else None,
        )
        rec.update(ft)
        if cfg.artifacts:
            states["ft"] = _state_copy(comp)
    final = _write_final(run, comp, prec, key, rec, t0, states)
    ckpt.unlink(missing_ok=True)  # its results are in the log now
    return final


def _stage_label(key: dict) -> str:
    return f"{key['method']} x{key['target']:g} {key['decomposition']} s{key['seed']}"


def _state_copy(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _write_final(
    run: Run, comp: nn.Module, prec: dict, key: dict, rec: dict, t0: float, states: dict | None = None
) -> dict:
    """Count (and time) ``comp``, save the artifacts of ``states`` and log the ``final`` record of ``key``
    (after the artifacts: a logged ``final`` means its files are complete)."""
    cfg, base, size = run.cfg, run.base, run.data.image_size
    cost = count_model(comp, (1, 3, size, size))
    lat = latency(comp, cfg, size, run.device) if cfg.latency else {}
    dense_lat = base.get("latency") or {}
    payload = dict(
        **rec,
        params=cost.params,
        macs=cost.macs,
        conv_params=cost.conv_params,
        conv_macs=cost.conv_macs,
        macs_factor=base["conv_macs"] / cost.conv_macs,
        params_factor=base["conv_params"] / cost.conv_params,
        model_params_factor=base["params"] / cost.params,
        latency_ms=lat,
        speedup=_speedups(dense_lat, lat),
        evaluations=prec.get("evaluations"),
        search_seconds=prec.get("search_seconds"),
        wall_seconds=time.perf_counter() - t0 + (prec.get("search_seconds") or 0.0),
        proxy=prec.get("proxy"),
        proxy_score=prec.get("score"),
        proxy_val_top1=prec.get("val_top1"),
        metric=cfg.metric,
        baseline_test_top1=base["test_top1"],
    )
    artifacts = _save_artifacts(run, prec, key, payload, states) if states else {}
    out = run.log.write(
        "final",
        f"{key['method']} x{key['target']:g} {key['decomposition']}: test {rec['test_top1_bn']:.4f} after BN"
        + (f", {rec['test_top1_ft']:.4f} after finetune" if rec["test_top1_ft"] is not None else ""),
        **key,
        **payload,
        artifacts=artifacts,
    )
    run.say(
        f"final {key}: test {rec['test_top1_bn']:.4f} (BN)"
        + (f" / {rec['test_top1_ft']:.4f} (finetuned)" if rec["test_top1_ft"] is not None else "")
        + f", x{out['macs_factor']:.2f} conv MACs"
    )
    return out


def _speedups(dense: dict, comp: dict) -> dict:
    return {k: dense[k] / comp[k] for k in comp if isinstance(comp[k], float) and k in dense and comp[k] > 0}


def _save_artifacts(run: Run, prec: dict, key: dict, payload: dict, states: dict) -> dict:
    """Each state of a final model (``bn``, and ``ft`` when finetuned) as an artifact file with the
    ``final`` record's numbers: ``{stage: {"path", "sha256"}}`` for that record."""
    cfg, data = run.cfg, run.data
    folder = cfg.artifact_folder()
    out = {}
    for stage, state in states.items():
        metrics = {**payload, "val_top1": payload[f"val_top1_{stage}"], "test_top1": payload[f"test_top1_{stage}"]}
        path = folder / artifact_name(key["method"], key["target"], key["decomposition"], stage == "ft")
        out[stage] = save_artifact(
            path,
            state,
            prec["plan"],
            base_model=cfg.model,
            num_classes=data.num_classes,
            input_size=data.image_size,
            mean=data.mean,
            std=data.std,
            metrics=metrics,
            extra={
                **key,
                "stage": stage,
                "run_id": run.log.run_id,
                "dataset": data.name,
                "checkpoint": run.base.get("checkpoint"),
                "metric": cfg.metric,
            },
            owner=run.log.path,
        )
    return out

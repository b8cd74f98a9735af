"""One experiment: baseline → layer table → rank selection per method → BN recalibration → optional
finetune → final val/test metrics, params/MACs and latency, every step logged as it happens.

``run_experiment(ExperimentConfig(...))`` is what the notebooks, ``make run`` and the benchmarks call;
``python -m common.run --help`` exposes the same config on the command line: one option per
field (``--field-name``), generated from the dataclass (:func:`config_parser`). Re-running with the
same ``run_id`` resumes: finished stages (baseline, each plan, each final) are read back from the log,
and an interrupted search continues from its last recorded candidate. The default run id hashes every
setting that affects results (:meth:`ExperimentConfig.resolved_run_id`); an explicit one whose log was
written with other settings (:data:`common.run.config.RESUME_FIELDS`) is refused, naming each difference.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import platform
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import torch
from torch import nn

from common.data.datasets import load_dataset
from common.data.splits import DatasetSplits
from common.decompose.cost import count_model
from common.decompose.surgery import LayerPlan, list_conv_layers
from common.deploy.latency import cpu_name
from common.device import resolve_device
from common.dist import from_main, init_from_env, initialized, leaving, rank_device, world
from common.models import build_model, load_checkpoint, normalized_for
from common.paths import default_cache_dir
from common.run.cli import config_from_args, config_parser
from common.run.config import ExperimentConfig, search_config
from common.run.estimate import say_run_estimate
from common.run.finals import Run, finish_stages, past_deadline
from common.run.lock import LogLockedError
from common.run.logs import RunLog
from common.run.measure import evaluate_splits, latency
from common.run.preflight import (
    PreflightError,
    check_artifacts_folder,
    check_data,
    check_data_root,
    check_targets,
    check_writable,
    input_identity,
    inspect_checkpoint,
    refuse_resume,
    resolve_checkpoint,
    resume_changes,
    rotate_failed,
    unrecorded_inputs,
)
from common.search.options import POLICIES, SearchResult
from common.search.searcher import build_searcher


def parse_args(argv: Sequence[str] | None = None) -> ExperimentConfig:
    p = config_parser("python -m common.run", __doc__)
    a = p.parse_args(argv)
    try:
        return config_from_args(a)
    except ValueError as e:  # a bad value is a usage error: name it, exit 2, before any work
        p.error(str(e))


# --- the run ---------------------------------------------------------------------------------------- #


def _log_say(log: RunLog, progress: bool):
    def say(msg: str) -> None:
        log.comment(msg)
        if progress:
            print(msg, flush=True)

    return say


def run_experiment(cfg: ExperimentConfig) -> list[dict]:
    """Run (or resume) one experiment; return its ``final`` records.

    Raises:
        PreflightError: a folder that cannot be written, an artifacts folder holding another run's files,
            a data root that is no folder, an unreadable or non-finite checkpoint, an unreachable target,
            or a log to resume whose settings or inputs differ (before any work).
        LogLockedError: another process is writing this run's log.
    """
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    started = not initialized() and init_from_env(device.type)
    with leaving(started):
        rank, size = world()
        if size > 1:
            device = rank_device(device)
        if rank > 0:  # rank 0 alone prints and draws progress bars
            cfg = dataclasses.replace(cfg, progress=False)
        fresh = not (Path(cfg.log_dir) / cfg.model / f"{cfg.resolved_run_id()}.log").exists()
        log, say, sha = _open_log(cfg, device)
        try:
            return _run_logged(cfg, log, say, sha, device, t_start)
        except BaseException:
            if fresh and rank == 0 and not log.records():  # nothing logged but the header: leave no log
                log.path.unlink(missing_ok=True)
            raise
        finally:
            log.close()  # the lock goes now, even while a traceback (a notebook's) holds the log object


def _run_logged(
    cfg: ExperimentConfig, log: RunLog, say, sha: str | None, device: torch.device, t_start: float
) -> list[dict]:
    """:func:`run_experiment` once its log is open: data, dense model, input identity, baseline, stages."""
    data = load_dataset(
        cfg.dataset,
        root=cfg.data_root,
        stream={"auto": None, "on": True, "off": False}[cfg.stream],
        crop_size=cfg.crop_size,
        resize_size=cfg.resize_size,
    )
    data, normalization = normalized_for(cfg.model, data, cfg.mean, cfg.std)
    model, ckpt = _dense_model(cfg, data)
    if ckpt is not None and sha is None:  # resolved here: a shared or a cached trained baseline
        sha = inspect_checkpoint(ckpt)
    # rank 0 lists the files
    _log_inputs(cfg, log, device, from_main(lambda: input_identity(data, sha)) | {"normalization": normalization})
    layers = list_conv_layers(model, (1, 3, data.image_size, data.image_size))
    check_targets(cfg, layers, [d for d, _ in _decompositions(cfg)])
    if log.find("baseline") is None:  # a fresh run: how long it will take, before the long work
        say_run_estimate(cfg, data, model, len(layers), device, say)
    base = _baseline(cfg, log, model, data, device, ckpt)
    model.to(device)
    if log.find("layers") is None:
        log.write("layers", f"{len(layers)} conv layers", layers=[i.to_dict() for i in layers])
    return _run_stages(Run(cfg, log, say, device, data, model, base, t_start))


def _open_log(cfg: ExperimentConfig, device: torch.device) -> tuple[RunLog, Callable[[str], None], str | None]:
    """The run's log and the SHA-256 of an explicit checkpoint: opened by rank 0 (:func:`_open_main_log`),
    whose records the other ranks of a ``torchrun`` launch follow in memory (:meth:`RunLog.follower`)."""
    if world()[1] == 1:
        return _open_main_log(cfg, device)
    held = []

    def open_main() -> tuple[list[dict], str | None]:
        held.append(_open_main_log(cfg, device))
        return held[0][0].records(), held[0][2]

    records, sha = from_main(open_main)
    if held:
        return held[0]
    log = RunLog.follower(cfg.log_dir, cfg.model, cfg.resolved_run_id(), records)
    return log, _log_say(log, False), sha


def _open_main_log(cfg: ExperimentConfig, device: torch.device) -> tuple[RunLog, Callable[[str], None], str | None]:
    """The run's log (locked; :mod:`common.run.preflight` checks first) and the SHA-256 of an explicit checkpoint.

    Every check that can fail before any work runs before the log file is made, so a refused run leaves
    no log behind. A log to resume must agree with ``cfg`` (:func:`resume_changes`); one whose run failed
    before its baseline was logged is moved aside (:func:`rotate_failed`) and the run starts over.
    """
    run_id = cfg.resolved_run_id()
    check_writable(Path(cfg.log_dir) / cfg.model, "log folder")
    check_writable(default_cache_dir(), "cache folder (HTD_CACHE, default .cache/)")
    check_data_root(cfg)
    check_data(cfg)
    if cfg.artifacts:
        check_artifacts_folder(cfg.artifact_folder(), cfg.log_path())
    explicit = cfg.checkpoint not in (None, "auto")
    resuming = (Path(cfg.log_dir) / cfg.model / f"{run_id}.log").exists()
    # a new log is made only once the checkpoint passed; a log to resume first says how its settings differ
    sha = inspect_checkpoint(cfg.checkpoint, cfg.model) if explicit and not resuming else None
    log = RunLog(Path(cfg.log_dir), cfg.model, run_id)
    if log.records() and log.find("baseline") is None:
        log.close()
        failed = rotate_failed(log.path)
        log = RunLog(Path(cfg.log_dir), cfg.model, run_id)
        log.comment(f"an earlier attempt failed before its baseline was logged; its log is kept as {failed.name}")
    try:
        if log.find("config") is not None:
            refuse_resume(run_id, log.path, resume_changes(log.find("config"), cfg, device))
        if explicit and resuming:
            sha = inspect_checkpoint(cfg.checkpoint, cfg.model)
        return log, _log_say(log, cfg.progress), sha
    except BaseException:
        log.close()
        raise


def _log_inputs(cfg: ExperimentConfig, log: RunLog, device: torch.device, inputs: dict) -> None:
    """Write the ``config`` record (settings and input identity), or check it against the logged one."""
    prev = log.find("config")
    if prev is not None:
        refuse_resume(log.run_id, log.path, resume_changes(prev, cfg, device, inputs))
        say = _log_say(log, cfg.progress)
        say(f"resuming run {log.run_id} from {log.path}")
        for what in unrecorded_inputs(prev):
            say(f"not compared on resume: {what}; this log predates recording it")
        return
    log.write(
        "config",
        f"{cfg.model} on {cfg.dataset}, targets {list(cfg.targets)}",
        **dataclasses.asdict(cfg) | {"run_id": log.run_id},
        **inputs,
        device_type=device.type,
        fingerprint=cfg.fingerprint(),
        torch=torch.__version__,
        host=platform.node(),
        machine=platform.processor() or platform.machine(),
        cpu=cpu_name(),  # CPU models differ in their kernels' last digits (README: the demo on two CPUs)
        device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        date=_dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    )


def _dense_model(cfg: ExperimentConfig, data: DatasetSplits) -> tuple[nn.Module, Path | None]:
    """The dense model to compress (eval mode, on the CPU) and the checkpoint it was loaded from."""
    # a missing baseline is trained once, on rank 0, as a lone process would train it
    ckpt = from_main(lambda: resolve_checkpoint(cfg, data, lone_process=world()[1] > 1))
    torch.manual_seed(cfg.seed)  # checkpoint=None keeps the random init: it must be the same on resume
    model = build_model(cfg.model, num_classes=data.num_classes)
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    return model.eval(), ckpt


def _baseline(
    cfg: ExperimentConfig, log: RunLog, model: nn.Module, data: DatasetSplits, device: torch.device, ckpt: Path | None
) -> dict:
    """The logged ``baseline`` record: read back, or the dense model evaluated, counted (and timed) now."""
    base = log.find("baseline")
    if base is not None:
        return base
    t = time.perf_counter()
    size = data.image_size

    def measure() -> dict:  # on rank 0 alone: its latency is timed on an otherwise idle machine
        ev = evaluate_splits(model, data, device, "baseline" if cfg.progress else None)
        return dict(
            val_top1=ev["val"]["top1"],
            test_top1=ev["test"]["top1"],
            val_loss=ev["val"]["loss"],
            checkpoint=str(ckpt) if ckpt else None,
            latency=latency(model, cfg, size, device) if cfg.latency else {},
            **count_model(model, (1, 3, size, size)).to_dict(),
        )

    payload = from_main(measure)
    base = log.write("baseline", f"val {payload['val_top1']:.4f} test {payload['test_top1']:.4f}", **payload)
    log.write("timing", stage="baseline", seconds=time.perf_counter() - t)
    return base


def _decompositions(cfg: ExperimentConfig) -> list[tuple[str, list[str]]]:
    """``(decomposition, methods)``: HT-2 for every method, Tucker-2 for the policy when asked."""
    decomps = [("ht2", list(cfg.methods))]
    if cfg.policy_tucker2 and "policy" in cfg.methods:
        decomps.append(("tucker2", ["policy"]))
    return decomps


def _stage_keys(
    cfg: ExperimentConfig, decomps: Sequence[tuple[str, list[str]]], seeds: Sequence[int]
) -> Iterator[dict]:
    """Every (method, target, decomposition, seed) stage, as the key of its records."""
    # Targets outermost, then seeds, so that an interrupted or time-boxed run has whole budgets done first.
    for target in cfg.targets:
        for seed in seeds:
            for decomposition, methods in decomps:
                for method in methods:
                    yield {"method": method, "target": float(target), "decomposition": decomposition, "seed": seed}


def _run_stages(run: Run) -> list[dict]:
    """Every stage's ``final`` record (read back, or searched and finished now), then the ``end`` record.

    Budget by budget: first the plan of every stage (each search's evaluations shared by the ranks of
    a ``torchrun`` launch), then their final models, one per rank at a time (:func:`finish_stages`).
    """
    cfg, log = run.cfg, run.log
    decomps = _decompositions(cfg)
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    searchers = _build_searchers(cfg, log, run.say, run.model, run.data, run.device, [d for d, _ in decomps], seeds)
    keys = list(_stage_keys(cfg, decomps, seeds))
    for target in cfg.targets:
        pending = []
        for key in (k for k in keys if k["target"] == float(target)):
            if log.find("final", **key) is not None:
                continue
            if past_deadline(run, key):
                return _finals(log, keys)
            searcher = searchers[key["decomposition"], key["seed"]]
            pending.append((key, _plan_record(cfg, log, searcher, key["method"], key["target"], key)))
        if not finish_stages(run, searchers, pending):
            return _finals(log, keys)
    log.write("end", status="ok", wall_seconds=time.perf_counter() - run.t_start)
    return _finals(log, keys)


def _finals(log: RunLog, keys: Sequence[dict]) -> list[dict]:
    """The logged ``final`` records of ``keys``, in stage order."""
    return [f for f in (log.find("final", **k) for k in keys) if f is not None]


def _build_searchers(
    cfg: ExperimentConfig,
    log: RunLog,
    say,
    model: nn.Module,
    data,
    device: torch.device,
    decompositions: Sequence[str],
    seeds: Sequence[int],
) -> dict:
    """One searcher per (decomposition, seed), sharing the dense model's spectra cache."""
    search_cfg = search_config(dataclasses.asdict(cfg))
    out, spectra = {}, None
    for decomposition in decompositions:
        for seed in seeds:
            t = time.perf_counter()
            out[decomposition, seed] = s = build_searcher(
                model,
                data,
                decomposition=decomposition,
                proxy=cfg.proxy,
                calib_images=cfg.calib_images,
                val_images=cfg.val_images,
                device=device,
                seed=seed,
                multiple=cfg.rank_multiple,
                recorder=log,
                config=search_cfg,
                progress=say,
                spectra=spectra,
                tag={"decomposition": decomposition, "seed": seed},
                channels_last=True,
                amp_dtype=torch.bfloat16 if device.type == "cuda" else None,
                bars=cfg.progress,
            )
            spectra = s.spectra
            log.write("timing", stage=f"setup_{decomposition}_s{seed}", seconds=time.perf_counter() - t)
    return out


def _plan_record(cfg: ExperimentConfig, log: RunLog, searcher, method: str, target: float, key: dict) -> dict:
    """The logged ``plan`` record of ``key``: read back, or searched now (sensitivity first for the policy)."""
    prec = log.find("plan", **key)
    if prec is not None:
        return prec
    if method in POLICIES and not searcher.profiled:
        t = time.perf_counter()
        searcher.sensitivity()
        log.write("timing", stage=f"sensitivity_{key['decomposition']}_s{key['seed']}", seconds=time.perf_counter() - t)
    res: SearchResult = searcher.run(method, target, cfg.metric, cfg.search_budget, key["seed"])
    rec = res.record()
    val = f", val {res.val_top1:.4f}" if res.val_top1 is not None else ""
    return log.write(
        "plan",
        f"{method} x{target:g} {key['decomposition']} seed {key['seed']}: "
        f"{res.proxy} {res.score:.5g}{val}, x{res.macs_factor:.2f} MACs, "
        f"{res.evaluations} evals, {res.seconds:.0f}s",
        **{k: v for k, v in rec.items() if k not in ("method", "target", "seed")},
        **key,
        search_seconds=res.seconds,
        layer_costs=_plan_layer_costs(searcher, res.plan),
    )


def _plan_layer_costs(searcher, plan) -> list[dict]:
    rows = []
    for ls in searcher.space.layers:
        lp = plan.get(ls.info.name, LayerPlan("dense"))
        p, m = ls.cost(lp)
        rows.append(
            {
                "name": ls.info.name,
                "method": lp.method,
                "ranks": list(lp.ranks),
                "params": p,
                "macs": m,
                "dense_params": ls.info.params,
                "dense_macs": ls.info.macs,
            }
        )
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    cfg = parse_args(argv)
    try:
        return run_experiment(cfg)
    except (PreflightError, LogLockedError) as e:  # named and refused before any work: no traceback
        print(f"python -m common.run: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

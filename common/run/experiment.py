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

import argparse
import copy
import dataclasses
import datetime as _dt
import platform
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from common.data.datasets import load_dataset
from common.data.loader import make_loader
from common.data.splits import DatasetSplits
from common.decompose.cost import count_model
from common.decompose.surgery import LayerPlan, list_conv_layers, plan_from_dict
from common.deploy.artifacts import artifact_name, save_artifact
from common.deploy.latency import cpu_name
from common.deploy.merge import fastest_latency
from common.device import resolve_device
from common.dist import from_main, init_from_env, initialized, leaving, rank_device, shard_map, world
from common.models import build_model, load_checkpoint
from common.paths import default_cache_dir
from common.run.config import ExperimentConfig, config_from_args, config_parser, search_config
from common.run.lock import LogLockedError
from common.run.logs import RunLog, config_record, pack_hits, parse_log
from common.run.preflight import (
    PreflightError,
    check_targets,
    check_writable,
    input_identity,
    inspect_checkpoint,
    refuse_resume,
    resolve_checkpoint,
    resume_changes,
    rotate_failed,
)
from common.search.options import POLICIES, SearchResult
from common.search.proxy import final_model
from common.search.searcher import build_searcher
from common.train.evaluate import evaluate
from common.train.finetune import finetune


def parse_args(argv: Sequence[str] | None = None) -> ExperimentConfig:
    p = config_parser("python -m common.run", __doc__)
    a = p.parse_args(argv)
    try:
        return config_from_args(a)
    except ValueError as e:  # a bad value is a usage error: name it, exit 2, before any work
        p.error(str(e))


# --- the run ---------------------------------------------------------------------------------------- #


@dataclass
class _Run:
    """What every stage of one experiment reads: config, log, device, data, dense model and baseline."""

    cfg: ExperimentConfig
    log: RunLog
    say: Callable[[str], None]
    device: torch.device
    data: DatasetSplits
    model: nn.Module
    base: dict
    t_start: float


def _log_say(log: RunLog, progress: bool):
    def say(msg: str) -> None:
        log.comment(msg)
        if progress:
            print(msg, flush=True)

    return say


def _latency(model: nn.Module, cfg: ExperimentConfig, image_size: int, device: torch.device) -> dict:
    """Median forward latency (ms) per setting, each in its fastest exact deployment and memory format."""
    out = {}
    cpu_model = copy.deepcopy(model).cpu().eval()
    for b in cfg.latency_batches if "cpu" in cfg.latency_devices else ():
        r = fastest_latency(cpu_model, (b, 3, image_size, image_size), threads=cfg.latency_threads)
        out[f"cpu_b{b}"] = r["median_ms"]
        out[f"cpu_b{b}_channels_last"] = bool(r["channels_last"])
    if device.type == "cuda" and "cuda" in cfg.latency_devices:
        r = fastest_latency(
            model,
            (256, 3, image_size, image_size),
            device=device,
            dtype=torch.bfloat16,
            formats=(True,),
            cuda_graph=True,
        )
        out["cuda_b256_bf16_graph"] = r["median_ms"]
    return out


def _speedups(dense: dict, comp: dict) -> dict:
    return {k: dense[k] / comp[k] for k in comp if isinstance(comp[k], float) and k in dense and comp[k] > 0}


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


def add_logged_input_args(p: argparse.ArgumentParser) -> None:
    """``--data-root`` and ``--checkpoint``: where this machine keeps the inputs of a logged run that a
    benchmark replays, for :func:`logged_inputs` (``logged_inputs(cfg, a.data_root, a.checkpoint)``)."""
    p.add_argument("--data-root", help="default: the log's data_root")
    p.add_argument("--checkpoint", help="the dense checkpoint here (default: the log's path; its sha256 must match)")


def logged_run(log: str | Path) -> tuple[list[dict], dict]:
    """A run log's records and its ``config`` record, for benchmarks that replay a run: corrupt lines are
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
    """The dense model (eval mode) and data a logged run's ``config`` record names, for benchmarks that
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


def evaluate_splits(
    model: nn.Module,
    data: DatasetSplits,
    device: torch.device,
    label: str | None = None,
    splits: Sequence[str] = ("val", "test"),
    per_image: bool = False,
) -> dict:
    """``evaluate`` on the whole of each split (with progress bars labelled ``label`` if given): how every
    reported accuracy of a run is measured. ``per_image`` adds each image's top-1 hit (``"correct"``, in the
    split's fixed order)."""
    return {
        s: evaluate(
            model,
            make_loader(data, s, 500, device=device),
            device,
            progress=label and f"{label}: {s}",
            per_image=per_image,
        )
        for s in splits
    }


def _stage_label(key: dict) -> str:
    return f"{key['method']} x{key['target']:g} {key['decomposition']} s{key['seed']}"


def run_experiment(cfg: ExperimentConfig) -> list[dict]:
    """Run (or resume) one experiment; return its ``final`` records.

    Raises:
        PreflightError: a folder that cannot be written, an unreadable or non-finite checkpoint, an
            unreachable target, or a log to resume whose settings or inputs differ (before any work).
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
        log, say, sha = _open_log(cfg, device)
        try:
            return _run_logged(cfg, log, say, sha, device, t_start)
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
    model, ckpt = _dense_model(cfg, data)
    if ckpt is not None and sha is None:  # resolved here: a shared or a cached trained baseline
        sha = inspect_checkpoint(ckpt)
    _log_inputs(cfg, log, device, input_identity(data, sha))
    layers = list_conv_layers(model, (1, 3, data.image_size, data.image_size))
    check_targets(cfg, layers, [d for d, _ in _decompositions(cfg)])
    base = _baseline(cfg, log, model, data, device, ckpt)
    model.to(device)
    if log.find("layers") is None:
        log.write("layers", f"{len(layers)} conv layers", layers=[i.to_dict() for i in layers])
    return _run_stages(_Run(cfg, log, say, device, data, model, base, t_start))


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

    A log to resume must agree with ``cfg`` (:func:`resume_changes`); one whose run failed before its
    baseline was logged is moved aside (:func:`rotate_failed`) and the run starts over.
    """
    run_id = cfg.resolved_run_id()
    check_writable(Path(cfg.log_dir) / cfg.model, "log folder")
    check_writable(default_cache_dir(), "cache folder (HTD_CACHE, default .cache/)")
    log = RunLog(Path(cfg.log_dir), cfg.model, run_id)
    if log.records() and log.find("baseline") is None:
        log.close()
        failed = rotate_failed(log.path)
        log = RunLog(Path(cfg.log_dir), cfg.model, run_id)
        log.comment(f"an earlier attempt failed before its baseline was logged; its log is kept as {failed.name}")
    try:
        if log.find("config") is not None:
            refuse_resume(run_id, log.path, resume_changes(log.find("config"), cfg, device))
        explicit = cfg.checkpoint not in (None, "auto")
        return log, _log_say(log, cfg.progress), inspect_checkpoint(cfg.checkpoint) if explicit else None
    except BaseException:
        log.close()
        raise


def _log_inputs(cfg: ExperimentConfig, log: RunLog, device: torch.device, inputs: dict) -> None:
    """Write the ``config`` record (settings and input identity), or check it against the logged one."""
    prev = log.find("config")
    if prev is not None:
        refuse_resume(log.run_id, log.path, resume_changes(prev, cfg, device, inputs))
        _log_say(log, cfg.progress)(f"resuming run {log.run_id} from {log.path}")
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
            latency=_latency(model, cfg, size, device) if cfg.latency else {},
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


def _run_stages(run: _Run) -> list[dict]:
    """Every stage's ``final`` record (read back, or searched and finished now), then the ``end`` record.

    Budget by budget: first the plan of every stage (each search's evaluations shared by the ranks of
    a ``torchrun`` launch), then their final models, one per rank at a time (:func:`_finish_stages`).
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
            if _past_deadline(run, key):
                return _finals(log, keys)
            searcher = searchers[key["decomposition"], key["seed"]]
            pending.append((key, _plan_record(cfg, log, searcher, key["method"], key["target"], key)))
        if not _finish_stages(run, searchers, pending):
            return _finals(log, keys)
    log.write("end", status="ok", wall_seconds=time.perf_counter() - run.t_start)
    return _finals(log, keys)


def _finals(log: RunLog, keys: Sequence[dict]) -> list[dict]:
    """The logged ``final`` records of ``keys``, in stage order."""
    return [f for f in (log.find("final", **k) for k in keys) if f is not None]


def _past_deadline(run: _Run, key: dict) -> bool:
    """Whether ``cfg.deadline`` has passed (rank 0's clock decides for every rank); if so, say so and log ``end``."""
    deadline = run.cfg.deadline
    if deadline is None or not from_main(lambda: time.time() > deadline):
        return False
    run.say(f"deadline reached before {key}; re-run with the same run id to continue")
    run.log.write("end", status="deadline", wall_seconds=time.perf_counter() - run.t_start)
    return True


def _finish_stages(run: _Run, searchers: dict, pending: Sequence[tuple[dict, dict]]) -> bool:
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
        if _past_deadline(run, pending[start][0]):
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


def _finish(run: _Run, searcher, prec: dict, key: dict) -> dict:
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
    ckpt = _finetune_checkpoint(run.log, key)
    states = {"bn": _state_copy(comp)} if cfg.artifacts else {}
    if cfg.finetune_epochs > 0 and key["target"] in cfg.finetune_targets_or_all():
        rec.update(_finetune_best(run, comp, key, ev["val"]["top1"], ckpt))
        if cfg.artifacts:
            states["ft"] = _state_copy(comp)
    final = _write_final(run, comp, prec, key, rec, t0, states)
    ckpt.unlink(missing_ok=True)  # its results are in the log now
    return final


def _state_copy(model: nn.Module) -> dict:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def _save_artifacts(run: _Run, prec: dict, key: dict, payload: dict, states: dict) -> dict:
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
        )
    return out


def _finetune_checkpoint(log: RunLog, key: dict) -> Path:
    """The file a final model's finetuning checkpoints to, beside the run's log (deleted once ``final`` is logged)."""
    name = f"{log.path.stem}.finetune-{key['method']}-x{key['target']:g}-{key['decomposition']}-s{key['seed']}.pt"
    return log.path.with_name(name)


class _BestValEpoch:
    """``on_epoch_end`` of a final model's finetuning: logs each ``finetune_epoch`` record (when given a log)
    and keeps the weights of the best val epoch (epoch 0 = before finetuning): selection on val only."""

    def __init__(self, log: RunLog | None, key: dict, val_top1: float, model: nn.Module):
        self.log, self.key = log, key
        self.val, self.epoch, self.state = val_top1, 0.0, copy.deepcopy(model.state_dict())

    def log_epoch(self, r: dict) -> None:
        """Log epoch record ``r`` unless it is logged already (a run resumed from a checkpoint saved just
        before or after it was logged sees it again, or never)."""
        if self.log is not None and self.log.find("finetune_epoch", **self.key, epoch=r["epoch"]) is None:
            self.log.write("finetune_epoch", **self.key, **{k: v for k, v in r.items() if k not in self.key})

    def __call__(self, r: dict, m: nn.Module) -> None:
        self.log_epoch(r)
        if r.get("val_top1") is not None and r["val_top1"] > self.val:
            self.val, self.epoch, self.state = r["val_top1"], r["epoch"], copy.deepcopy(m.state_dict())

    def state_dict(self) -> dict:
        """What a finetuning checkpoint keeps of it: the best epoch so far and its weights."""
        return {"val": self.val, "epoch": self.epoch, "state": self.state}

    def load_state_dict(self, d: dict) -> None:
        self.val, self.epoch, self.state = d["val"], d["epoch"], d["state"]


def finetune_best(
    comp: nn.Module,
    dense: nn.Module,
    data: DatasetSplits,
    cfg: ExperimentConfig,
    key: dict,
    val_top1_bn: float,
    device: torch.device,
    *,
    log: RunLog | None = None,
    checkpoint: Path | None = None,
    say: Callable[[str], None] = print,
    progress: str | None = None,
) -> dict:
    """A final model's finetuning, as every run does it: finetune ``comp`` in place with ``cfg``'s recipe and
    ``key["seed"]`` (distilled from ``dense`` when ``cfg.distill``), keep its best val epoch (epoch 0, the BN
    model at ``val_top1_bn``, included), evaluate it on val and test.

    Args:
        log: where each epoch's ``finetune_epoch`` record goes (None: nowhere, e.g. a replay).
        checkpoint: the file the finetuning checkpoints to every minute and resumes from.

    Returns:
        The ``final`` record's finetune fields (``test_hits_ft`` among them).
    """
    t = time.perf_counter()
    teacher = copy.deepcopy(dense) if cfg.distill else None
    best = _BestValEpoch(log, key, val_top1_bn, comp)
    if checkpoint is not None and checkpoint.exists():
        say(f"resuming the finetuning of {key} from {checkpoint}")
    history = finetune(
        comp,
        data,
        cfg.finetune_config(key["seed"], data.hflip),
        teacher=teacher,
        device=device,
        progress=progress or False,
        on_epoch_end=best,
        checkpoint=checkpoint,
        say=say,
        distributed=False,  # one final model per rank (common.dist): the single-process numbers
    )
    for r in history:  # epochs restored from the checkpoint whose records did not reach the log
        best.log_epoch(r)
    comp.load_state_dict(best.state)
    comp.to(memory_format=torch.contiguous_format).eval()
    ev = evaluate_splits(comp, data, device, progress, per_image=True)
    return {
        "finetune_selected_epoch": best.epoch,
        "val_top1_ft": ev["val"]["top1"],
        "test_top1_ft": ev["test"]["top1"],
        "test_hits_ft": pack_hits(ev["test"]["correct"]),
        "finetune_epochs": cfg.finetune_epochs,
        "finetune_seconds": time.perf_counter() - t,
    }


def _finetune_best(run: _Run, comp: nn.Module, key: dict, val_top1_bn: float, checkpoint: Path) -> dict:
    """:func:`finetune_best` within a run: epochs logged, checkpointed to ``checkpoint`` so an interrupted
    run resumes the finetuning where it stopped."""
    return finetune_best(
        comp,
        run.model,
        run.data,
        run.cfg,
        key,
        val_top1_bn,
        run.device,
        log=run.log,
        checkpoint=checkpoint,
        say=run.say,
        progress=f"{_stage_label(key)}: finetune" if run.cfg.progress else None,
    )


def _write_final(
    run: _Run, comp: nn.Module, prec: dict, key: dict, rec: dict, t0: float, states: dict | None = None
) -> dict:
    """Count (and time) ``comp``, save the artifacts of ``states`` and log the ``final`` record of ``key``
    (after the artifacts: a logged ``final`` means its files are complete)."""
    cfg, base, size = run.cfg, run.base, run.data.image_size
    cost = count_model(comp, (1, 3, size, size))
    lat = _latency(comp, cfg, size, run.device) if cfg.latency else {}
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


def main(argv: Sequence[str] | None = None) -> list[dict]:
    cfg = parse_args(argv)
    try:
        return run_experiment(cfg)
    except (PreflightError, LogLockedError) as e:  # named and refused before any work: no traceback
        print(f"python -m common.run: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()

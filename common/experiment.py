"""One experiment: baseline → layer table → rank selection per method → BN recalibration → optional
finetune → final val/test metrics, params/MACs and latency, every step logged as it happens.

``run_experiment(ExperimentConfig(...))`` is what the notebooks, ``make run`` and the benchmarks call;
``python -m common.experiment --help`` exposes the same config on the command line: one option per
field (``--field-name``), generated from the dataclass (:func:`config_parser`). Re-running with the
same ``run_id`` resumes: finished stages (baseline, each plan, each final) are read back from the log,
and an interrupted search continues from its last recorded candidate.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import functools
import json
import math
import platform
import time
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import torch
from torch import nn

from finetuned.train_baseline import main as train_baseline

from .cost import count_model
from .data import DATASET_NAMES, DatasetSplits, load_dataset, make_loader
from .deploy import fastest_latency
from .device import resolve_device
from .logs import RunLog
from .models import MODEL_NAMES, build_model, load_checkpoint
from .paths import CHECKPOINT_DIR, default_cache_dir
from .proxy import PROXIES, final_model
from .search import METHODS, SearchConfig, SearchResult, build_searcher, check_method, check_metric, check_target
from .surgery import LayerPlan, list_conv_layers, plan_from_dict
from .train import FinetuneConfig, evaluate, finetune

DEFAULT_FINETUNE_EPOCHS = 3.0
"""The finetuning budget that "finetune: yes" stands for (the notebooks' ``FINETUNE = True``, CUDA runs)."""


def _option(default: Any, help: str, **cli: Any) -> Any:
    """A config field with its command-line help and CLI extras: ``choices``, ``metavar``, ``off_flag`` (an
    extra flag that turns a bool off) and ``shown`` (the default in words, where its value says little)."""
    return dataclasses.field(default=default, metadata={"help": help, **cli})


@dataclass
class ExperimentConfig:
    """Everything an experiment depends on (written whole into the log's ``config`` record).

    Each field's meaning is its ``help`` metadata, which is also the help of its command-line option
    (``python -m common.experiment --help``). Validated on construction: a bad value raises
    ``ValueError`` before any data or model work (on the command line: a usage error, exit 2).
    """

    model: str = _option("resnet18", "model to compress", choices=MODEL_NAMES)
    dataset: str = _option("auto", "auto: the shared cifar10-jpeg when ../shared exists, else digits",
                           choices=DATASET_NAMES)
    data_root: str | None = _option(None, "dataset root", metavar="DIR", shown="the dataset's own")
    checkpoint: str | None = _option(
        "auto", "state_dict path; auto: the shared baseline for cifar10-jpeg, else a baseline trained once by "
                "finetuned/train_baseline.py and cached", metavar="PATH")
    targets: tuple[float, ...] = _option((3.0,), "reduction factors of the total conv metric (dense / compressed)")
    metric: str = _option("macs", "what the targets reduce", choices=("macs", "params"))
    methods: tuple[str, ...] = _option(METHODS, f"rank-selection methods, a subset of {','.join(METHODS)}")
    policy_tucker2: bool = _option(False, "also run the policy method with Tucker-2 layers (HT-2 for every method)")
    search_budget: int = _option(100, "candidate evaluations of random, tpe and policy")
    n_seeds: int = _option(1, "every (target, method) at seeds seed .. seed+n_seeds-1: a seed picks the search's "
                              "draws and the proxy's calibration subset")
    proxy: str = _option("kl", "candidate score: kl (label-free, to the dense model) or top1 (val)",
                         choices=PROXIES)
    rerank: int = _option(SearchConfig.rerank, "val top-1 decides among this many best-scored candidates")
    shapes: tuple[str, ...] = _option(SearchConfig.shapes, "per-layer rank shapes the searches may choose: "
                                                           "level and/or energy")
    final_calib_images: int = _option(4096, "BN-calibration train images of each final model")
    finetune_epochs: float = _option(0.0, "finetuning epochs after BN recalibration (fractions allowed); 0 = off")
    finetune_targets: tuple[float, ...] | None = _option(None, "targets to finetune at", shown="all targets")
    # factorized chains amplify SGD steps (the effective lr grows with the product of factor norms);
    # 0.01 diverged on AlexNet
    finetune_lr: float = _option(0.0005, "finetuning peak learning rate (SGD, one-cycle)")
    finetune_batch_size: int = _option(128, "finetuning batch size")
    finetune_max_images: int | None = _option(None, "finetune on a stratified subset of this many train images",
                                               shown="all")
    distill: bool = _option(True, "finetune with distillation from the dense model")
    calib_images: int = _option(256, "proxy: BN-recalibration (and KL-scoring) train images of each candidate")
    val_images: int | None = _option(None, "val images of the re-ranking (and of every candidate with proxy "
                                           "top1); 0 = the whole val split", shown="the whole val split")
    sensitivity_levels: tuple[float, ...] = _option(SearchConfig.sensitivity_levels,
                                                    "rank levels of each layer's sensitivity curve (policy)")
    policy_rounds: int = _option(SearchConfig.rounds, "policy sampling rounds (>1: cross-entropy refits)")
    temperature: float = _option(SearchConfig.temperature, "softness of the policy pdf")
    rank_multiple: int = _option(8, "ranks are rounded to multiples of this")
    latency: bool = _option(False, "measure latency of the dense model and of every final model")
    latency_batches: tuple[int, ...] = _option((1, 64), "CPU latency batch sizes")
    latency_threads: int = _option(2, "CPU latency threads")
    latency_devices: tuple[str, ...] = _option(("cpu", "cuda"), "which of cpu, cuda to time (cuda only when "
                                                                "present)")
    device: str = _option("auto", "auto: CUDA when present, else CPU")
    seed: int = _option(0, "first seed")
    run_id: str | None = _option(None, "run id; an existing id resumes", metavar="ID",
                                   shown="<model>-<dataset>-x<targets>-s<seed>")
    log_dir: str = _option("logs", "logs go to <log_dir>/<model>/<run_id>.log", metavar="DIR")
    threads: int | None = _option(None, "torch CPU threads", shown="torch's")
    progress: bool = _option(True, "print progress", off_flag="--quiet")
    deadline: float | None = _option(None, "unix time after which no new (target, method) stage starts",
                                    shown="none")

    def __post_init__(self) -> None:
        # Refuse what would fail late or log nonsense, before any data or model work.
        for name, (_, many, _) in _field_kinds().items():
            if many and isinstance(getattr(self, name), list):
                setattr(self, name, tuple(getattr(self, name)))  # e.g. notebook parameters
        if not self.targets:
            raise ValueError("targets: give at least one reduction factor, e.g. --targets 3")
        self.targets = tuple(check_target(t) for t in self.targets)
        for name in ("search_budget", "n_seeds", "rerank", "calib_images", "final_calib_images"):
            if int(getattr(self, name)) < (2 if "calib" in name else 1):
                raise ValueError(f"{name} must be at least {2 if 'calib' in name else 1}, "
                                 f"got {getattr(self, name)}")
        ft = self.finetune_epochs
        if isinstance(ft, bool) or not (isinstance(ft, (int, float)) and math.isfinite(ft) and ft >= 0):
            raise ValueError(f"finetune_epochs must be a number of epochs >= 0 (0 = off), got {self.finetune_epochs!r}")
        if self.val_images == 0:
            self.val_images = None  # the whole val split, as documented
        for m in self.methods:
            check_method(m)
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy must be one of {PROXIES}, got {self.proxy!r}")
        check_metric(self.metric)
        SearchConfig(shapes=tuple(self.shapes), rerank=self.rerank)  # validates the search options

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        t = "-".join(f"{x:g}" for x in self.targets)
        return f"{self.model}-{self.dataset}-x{t}-s{self.seed}"

    def finetune_targets_or_all(self) -> tuple[float, ...]:
        """The targets at which plans are finetuned (when ``finetune_epochs > 0``)."""
        return tuple(float(x) for x in (self.targets if self.finetune_targets is None else self.finetune_targets))

    def finetune_config(self, seed: int, hflip: bool) -> FinetuneConfig:
        """The recipe of each final model's finetuning (:func:`common.train.finetune`)."""
        return FinetuneConfig(self.finetune_epochs, batch_size=self.finetune_batch_size, lr=self.finetune_lr,
                              max_images=self.finetune_max_images, seed=seed, eval_every_epoch=True, hflip=hflip)


# --- the command line, generated from the config's fields ------------------------------------------ #

@functools.cache
def _field_kinds() -> dict[str, tuple[type, bool, bool]]:
    """``{field: (element type, is a tuple, may be None)}`` from the config's annotations."""
    out = {}
    for name, hint in typing.get_type_hints(ExperimentConfig).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) in (typing.Union, types.UnionType) and type(None) in args
        if optional:
            hint = next(a for a in args if a is not type(None))
        many = typing.get_origin(hint) is tuple
        out[name] = (typing.get_args(hint)[0] if many else hint, many, optional)
    return out


def _show(value: Any) -> str:
    """A default as it would be typed on the command line."""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, tuple):
        return ",".join(_show(v) for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return "none" if value is None else str(value)


def add_config_arguments(parser: argparse.ArgumentParser, *, exclude: Sequence[str] = (),
                         defaults: Mapping[str, Any] | None = None, helps: Mapping[str, str] | None = None) -> None:
    """One option per :class:`ExperimentConfig` field but ``exclude``, named ``--field-name``.

    Booleans are ``--name`` / ``--no-name`` switches (plus an ``off_flag`` alias where the field names one,
    e.g. ``--quiet``); tuples are comma-separated lists; other types convert with their own type; the help
    is the field's ``help`` metadata and its default. An option not given is absent from the parsed
    namespace, so the field keeps its default in :func:`config_from_args`; ``defaults`` (typed values)
    replace fields' defaults for this parser, and ``helps`` replaces whole help texts.
    """
    defaults, helps = dict(defaults or {}), dict(helps or {})
    kinds = _field_kinds()
    for f in dataclasses.fields(ExperimentConfig):
        if f.name in exclude:
            continue
        kind, many, _ = kinds[f.name]
        flag = "--" + f.name.replace("_", "-")
        shown = _show(defaults[f.name]) if f.name in defaults else f.metadata.get("shown", _show(f.default))
        text = helps.get(f.name, f"{f.metadata['help']} (default: {shown})")
        kw = dict(dest=f.name, default=argparse.SUPPRESS, help=text.replace("%", "%%"))
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
            if "off_flag" in f.metadata:
                parser.add_argument(f.metadata["off_flag"], dest=f.name, action="store_false",
                                    default=argparse.SUPPRESS, help=f"same as --no-{flag[2:]}")
        elif many:  # converted by config_from_args, where a bad element is a usage error that names it
            parser.add_argument(flag, metavar=f"{kind.__name__.upper()},...", **kw)
        elif "choices" in f.metadata:
            parser.add_argument(flag, type=kind, choices=f.metadata["choices"], **kw)
        else:
            parser.add_argument(flag, type=kind, metavar=f.metadata.get("metavar", kind.__name__.upper()), **kw)
    parser.set_defaults(**{k: v for k, v in defaults.items() if k not in exclude})


def config_parser(prog: str | None = None, description: str | None = None, **options: Any) -> argparse.ArgumentParser:
    """An argument parser holding :func:`add_config_arguments` (``options``: its keyword arguments)."""
    p = argparse.ArgumentParser(prog=prog, description=description,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_config_arguments(p, **options)
    return p


def _from_text(name: str, value: Any) -> Any:
    kind, many, optional = _field_kinds()[name]
    if not (many and isinstance(value, str)):
        return value
    items = tuple(kind(x) for x in value.split(",") if x)
    return None if optional and not items else items


def config_from_args(args: argparse.Namespace | Mapping[str, Any], **fixed: Any) -> ExperimentConfig:
    """The config of parsed options (:func:`add_config_arguments`); ``fixed`` fields win over them.

    Raises:
        ValueError: an element of a list that does not convert, or a value the config refuses.
    """
    given = vars(args) if isinstance(args, argparse.Namespace) else dict(args)
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    values = {k: _from_text(k, v) for k, v in given.items() if k in names}
    return ExperimentConfig(**{**values, **fixed})


def parse_args(argv: Sequence[str] | None = None) -> ExperimentConfig:
    p = config_parser("python -m common.experiment", __doc__)
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


def resolve_checkpoint(cfg: ExperimentConfig, data) -> Path | None:
    """The baseline weights to compress: explicit path, shared baseline, or a cached trained one."""
    if cfg.checkpoint not in (None, "auto"):
        p = Path(cfg.checkpoint)
        if not p.exists():
            raise FileNotFoundError(f"checkpoint not found: {p}")
        return p
    if data.name == "cifar10-jpeg" and (CHECKPOINT_DIR / f"{cfg.model}.pt").exists():
        return CHECKPOINT_DIR / f"{cfg.model}.pt"
    if cfg.checkpoint is None:
        return None
    # No shared baseline for this dataset: train one once and cache it (the embedded default path).
    out = default_cache_dir() / "baselines"
    pt = out / f"{cfg.model}-{cfg.dataset if cfg.dataset != 'auto' else data.name}.pt"
    if not pt.exists():
        args = ["--model", cfg.model, "--dataset", data.name, "--out", str(out), "--seed", str(cfg.seed),
                "--device", cfg.device]
        if cfg.data_root:
            args += ["--data-root", cfg.data_root]
        if not cfg.progress:
            args.append("--no-progress")
        train_baseline(args)
    return pt


def _latency(model: nn.Module, cfg: ExperimentConfig, image_size: int, device: torch.device) -> dict:
    """Median forward latency (ms) per setting, each in its fastest exact deployment and memory format."""
    out = {}
    cpu_model = copy.deepcopy(model).cpu().eval()
    for b in (cfg.latency_batches if "cpu" in cfg.latency_devices else ()):
        r = fastest_latency(cpu_model, (b, 3, image_size, image_size), threads=cfg.latency_threads)
        out[f"cpu_b{b}"] = r["median_ms"]
        out[f"cpu_b{b}_channels_last"] = bool(r["channels_last"])
    if device.type == "cuda" and "cuda" in cfg.latency_devices:
        r = fastest_latency(model, (256, 3, image_size, image_size), device=device, dtype=torch.bfloat16,
                            formats=(True,), cuda_graph=True)
        out["cuda_b256_bf16_graph"] = r["median_ms"]
    return out


def _speedups(dense: dict, comp: dict) -> dict:
    return {k: dense[k] / comp[k] for k in comp if isinstance(comp[k], float) and k in dense and comp[k] > 0}


def _plan_layer_costs(searcher, plan) -> list[dict]:
    rows = []
    for ls in searcher.space.layers:
        lp = plan.get(ls.info.name, LayerPlan("dense"))
        p, m = ls.cost(lp)
        rows.append({"name": ls.info.name, "method": lp.method, "ranks": list(lp.ranks), "params": p, "macs": m,
                     "dense_params": ls.info.params, "dense_macs": ls.info.macs})
    return rows


def _evaluate_splits(model: nn.Module, data: DatasetSplits, device: torch.device) -> dict:
    """``evaluate`` on the whole val and test splits."""
    return {s: evaluate(model, make_loader(data, s, 500, device=device), device) for s in ("val", "test")}


def run_experiment(cfg: ExperimentConfig) -> list[dict]:
    """Run (or resume) one experiment; return its ``final`` records."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
    log, say = _open_log(cfg, device)
    data = load_dataset(cfg.dataset, root=cfg.data_root)
    model, ckpt = _dense_model(cfg, data)
    base = _baseline(cfg, log, model, data, device, ckpt)
    model.to(device)
    layers = list_conv_layers(model, (1, 3, data.image_size, data.image_size))
    if log.find("layers") is None:
        log.write("layers", f"{len(layers)} conv layers",
                  layers=[{k: v for k, v in i.to_dict().items()} for i in layers])
    return _run_stages(_Run(cfg, log, say, device, data, model, base, t_start))


_RESUME_KEYS = ("model", "dataset", "checkpoint", "metric", "seed", "calib_images", "val_images", "sensitivity_levels",
                "rank_multiple", "search_budget", "n_seeds", "proxy", "rerank", "shapes", "final_calib_images")
"""Config fields a resumed run must share with the logged one (the others may change between sessions)."""


def _open_log(cfg: ExperimentConfig, device: torch.device) -> tuple[RunLog, Callable[[str], None]]:
    """The run's log, with its ``config`` record written, or checked against the logged one on resume."""
    run_id = cfg.resolved_run_id()
    log = RunLog(Path(cfg.log_dir), cfg.model, run_id)
    say = _log_say(log, cfg.progress)
    cfg_dict = dataclasses.asdict(cfg) | {"run_id": run_id}
    prev = log.find("config")
    if prev is None:
        log.write("config", f"{cfg.model} on {cfg.dataset}, targets {list(cfg.targets)}", **cfg_dict,
                  torch=torch.__version__, host=platform.node(), machine=platform.processor() or platform.machine(),
                  device_name=torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        return log, say
    changed = [k for k in _RESUME_KEYS if json.dumps(prev.get(k)) != json.dumps(cfg_dict.get(k), default=list)]
    if changed:
        raise ValueError(f"run id {run_id!r} already exists in {log.path} with different {changed}; "
                         "pick another run_id")
    say(f"resuming run {run_id} from {log.path}")
    return log, say


def _dense_model(cfg: ExperimentConfig, data: DatasetSplits) -> tuple[nn.Module, Path | None]:
    """The dense model to compress (eval mode, on the CPU) and the checkpoint it was loaded from."""
    ckpt = resolve_checkpoint(cfg, data)
    torch.manual_seed(cfg.seed)  # checkpoint=None keeps the random init: it must be the same on resume
    model = build_model(cfg.model, num_classes=data.num_classes)
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    return model.eval(), ckpt


def _baseline(cfg: ExperimentConfig, log: RunLog, model: nn.Module, data: DatasetSplits, device: torch.device,
              ckpt: Path | None) -> dict:
    """The logged ``baseline`` record: read back, or the dense model evaluated, counted (and timed) now."""
    base = log.find("baseline")
    if base is not None:
        return base
    t = time.perf_counter()
    size = data.image_size
    ev = _evaluate_splits(model, data, device)
    cost = count_model(model, (1, 3, size, size))
    lat = _latency(model, cfg, size, device) if cfg.latency else {}
    base = log.write("baseline", f"val {ev['val']['top1']:.4f} test {ev['test']['top1']:.4f}",
                     val_top1=ev["val"]["top1"], test_top1=ev["test"]["top1"], val_loss=ev["val"]["loss"],
                     checkpoint=str(ckpt) if ckpt else None, latency=lat, **cost.to_dict())
    log.write("timing", stage="baseline", seconds=time.perf_counter() - t)
    return base


def _decompositions(cfg: ExperimentConfig) -> list[tuple[str, list[str]]]:
    """``(decomposition, methods)``: HT-2 for every method, Tucker-2 for the policy when asked."""
    decomps = [("ht2", list(cfg.methods))]
    if cfg.policy_tucker2 and "policy" in cfg.methods:
        decomps.append(("tucker2", ["policy"]))
    return decomps


def _stage_keys(cfg: ExperimentConfig, decomps: Sequence[tuple[str, list[str]]],
                seeds: Sequence[int]) -> Iterator[dict]:
    """Every (method, target, decomposition, seed) stage, as the key of its records."""
    # Targets outermost, then seeds, so that an interrupted or time-boxed run has whole budgets done first.
    for target in cfg.targets:
        for seed in seeds:
            for decomposition, methods in decomps:
                for method in methods:
                    yield {"method": method, "target": float(target), "decomposition": decomposition, "seed": seed}


def _run_stages(run: _Run) -> list[dict]:
    """Every stage's ``final`` record (read back, or searched and finished now), then the ``end`` record."""
    cfg, log = run.cfg, run.log
    decomps = _decompositions(cfg)
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    searchers = _build_searchers(cfg, log, run.say, run.model, run.data, run.device, [d for d, _ in decomps], seeds)
    finals = []
    for key in _stage_keys(cfg, decomps, seeds):
        done = log.find("final", **key)
        if done is not None:
            finals.append(done)
            continue
        if cfg.deadline is not None and time.time() > cfg.deadline:
            run.say(f"deadline reached before {key}; re-run with the same run id to continue")
            log.write("end", status="deadline", wall_seconds=time.perf_counter() - run.t_start)
            return finals
        searcher = searchers[key["decomposition"], key["seed"]]
        prec = _plan_record(cfg, log, searcher, key["method"], key["target"], key)
        finals.append(_finish(run, searcher, prec, key))
    log.write("end", status="ok", wall_seconds=time.perf_counter() - run.t_start)
    return finals


def _build_searchers(cfg: ExperimentConfig, log: RunLog, say, model: nn.Module, data, device: torch.device,
                     decompositions: Sequence[str], seeds: Sequence[int]) -> dict:
    """One searcher per (decomposition, seed), sharing the dense model's spectra cache."""
    search_cfg = SearchConfig(sensitivity_levels=tuple(cfg.sensitivity_levels), rounds=cfg.policy_rounds,
                              temperature=cfg.temperature, rerank=cfg.rerank, shapes=tuple(cfg.shapes))
    out, spectra = {}, None
    for decomposition in decompositions:
        for seed in seeds:
            t = time.perf_counter()
            out[decomposition, seed] = s = build_searcher(
                model, data, decomposition=decomposition, proxy=cfg.proxy, calib_images=cfg.calib_images,
                val_images=cfg.val_images, device=device, seed=seed, multiple=cfg.rank_multiple, recorder=log,
                config=search_cfg, progress=say, spectra=spectra, tag={"decomposition": decomposition, "seed": seed},
                channels_last=True, amp_dtype=torch.bfloat16 if device.type == "cuda" else None)
            spectra = s.spectra
            log.write("timing", stage=f"setup_{decomposition}_s{seed}", seconds=time.perf_counter() - t)
    return out


def _plan_record(cfg: ExperimentConfig, log: RunLog, searcher, method: str, target: float, key: dict) -> dict:
    """The logged ``plan`` record of ``key``: read back, or searched now (sensitivity first for the policy)."""
    prec = log.find("plan", **key)
    if prec is not None:
        return prec
    if method == "policy" and not searcher.profiled:
        t = time.perf_counter()
        searcher.sensitivity()
        log.write("timing", stage=f"sensitivity_{key['decomposition']}_s{key['seed']}",
                  seconds=time.perf_counter() - t)
    res: SearchResult = searcher.run(method, target, cfg.metric, cfg.search_budget, key["seed"])
    rec = res.record()
    val = f", val {res.val_top1:.4f}" if res.val_top1 is not None else ""
    return log.write("plan", f"{method} x{target:g} {key['decomposition']} seed {key['seed']}: "
                             f"{res.proxy} {res.score:.5g}{val}, x{res.macs_factor:.2f} MACs, "
                             f"{res.evaluations} evals, {res.seconds:.0f}s",
                     **{k: v for k, v in rec.items() if k not in ("method", "target", "seed")}, **key,
                     search_seconds=res.seconds, layer_costs=_plan_layer_costs(searcher, res.plan))


def _finish(run: _Run, searcher, prec: dict, key: dict) -> dict:
    """BN-recalibrate, evaluate, optionally finetune, count and time one chosen plan; log ``final``."""
    t0 = time.perf_counter()
    cfg = run.cfg
    comp = final_model(run.model, plan_from_dict(prec["plan"]), searcher.spectra, run.data, cfg.final_calib_images,
                       key["seed"], run.device)
    ev = _evaluate_splits(comp, run.data, run.device)
    rec = {"val_top1_bn": ev["val"]["top1"], "test_top1_bn": ev["test"]["top1"], "val_top1_ft": None,
           "test_top1_ft": None, "finetune_epochs": None}
    if cfg.finetune_epochs > 0 and key["target"] in cfg.finetune_targets_or_all():
        rec.update(_finetune_best(run, comp, key, ev["val"]["top1"]))
    return _write_final(run, comp, prec, key, rec, t0)


class _BestValEpoch:
    """``on_epoch_end`` of a final model's finetuning: logs each ``finetune_epoch`` record and keeps the
    weights of the best val epoch (epoch 0 = before finetuning): selection on val only."""

    def __init__(self, log: RunLog, key: dict, val_top1: float, model: nn.Module):
        self.log, self.key = log, key
        self.val, self.epoch, self.state = val_top1, 0.0, copy.deepcopy(model.state_dict())

    def __call__(self, r: dict, m: nn.Module) -> None:
        self.log.write("finetune_epoch", **self.key, **{k: v for k, v in r.items() if k not in self.key})
        if r.get("val_top1") is not None and r["val_top1"] > self.val:
            self.val, self.epoch, self.state = r["val_top1"], r["epoch"], copy.deepcopy(m.state_dict())


def _finetune_best(run: _Run, comp: nn.Module, key: dict, val_top1_bn: float) -> dict:
    """Finetune ``comp`` in place, keep its best val epoch, evaluate it: the ``final`` record's finetune fields."""
    t = time.perf_counter()
    cfg = run.cfg
    teacher = copy.deepcopy(run.model) if cfg.distill else None
    best = _BestValEpoch(run.log, key, val_top1_bn, comp)
    finetune(comp, run.data, cfg.finetune_config(key["seed"], run.data.hflip), teacher=teacher, device=run.device,
             progress=cfg.progress, on_epoch_end=best)
    comp.load_state_dict(best.state)
    comp.to(memory_format=torch.contiguous_format).eval()
    ev = _evaluate_splits(comp, run.data, run.device)
    return {"finetune_selected_epoch": best.epoch, "val_top1_ft": ev["val"]["top1"], "test_top1_ft": ev["test"]["top1"],
            "finetune_epochs": cfg.finetune_epochs, "finetune_seconds": time.perf_counter() - t}


def _write_final(run: _Run, comp: nn.Module, prec: dict, key: dict, rec: dict, t0: float) -> dict:
    """Count (and time) ``comp`` and log the ``final`` record of ``key``."""
    cfg, base, size = run.cfg, run.base, run.data.image_size
    cost = count_model(comp, (1, 3, size, size))
    lat = _latency(comp, cfg, size, run.device) if cfg.latency else {}
    dense_lat = base.get("latency") or {}
    out = run.log.write(
        "final",
        f"{key['method']} x{key['target']:g} {key['decomposition']}: test {rec['test_top1_bn']:.4f} after BN"
        + (f", {rec['test_top1_ft']:.4f} after finetune" if rec["test_top1_ft"] is not None else ""),
        **key, **rec, params=cost.params, macs=cost.macs, conv_params=cost.conv_params, conv_macs=cost.conv_macs,
        macs_factor=base["conv_macs"] / cost.conv_macs, params_factor=base["conv_params"] / cost.conv_params,
        model_params_factor=base["params"] / cost.params, latency_ms=lat, speedup=_speedups(dense_lat, lat),
        evaluations=prec.get("evaluations"), search_seconds=prec.get("search_seconds"),
        wall_seconds=time.perf_counter() - t0 + (prec.get("search_seconds") or 0.0),
        proxy=prec.get("proxy"), proxy_score=prec.get("score"), proxy_val_top1=prec.get("val_top1"),
        metric=cfg.metric, baseline_test_top1=base["test_top1"])
    run.say(f"final {key}: test {rec['test_top1_bn']:.4f} (BN)"
            + (f" / {rec['test_top1_ft']:.4f} (finetuned)" if rec["test_top1_ft"] is not None else "")
            + f", x{out['macs_factor']:.2f} conv MACs")
    return out


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run_experiment(parse_args(argv))


if __name__ == "__main__":
    main()

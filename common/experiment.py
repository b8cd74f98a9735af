"""One experiment: baseline → layer table → rank selection per method → BN recalibration → optional
finetune → final val/test metrics, params/MACs and latency, every step logged as it happens.

``run_experiment(ExperimentConfig(...))`` is what the notebooks, ``make run`` and the benchmarks call;
``python -m common.experiment --help`` exposes the same config on the command line. Re-running with the
same ``run_id`` resumes: finished stages (baseline, each plan, each final) are read back from the log,
and an interrupted search continues from its last recorded candidate.
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import datetime as _dt
import json
import math
import platform
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
from torch import nn

from .cost import count_model
from .data import load_dataset, make_loader
from .logs import RunLog
from .paths import default_cache_dir
from .proxy import PROXIES, final_model
from .search import METHODS, SearchConfig, SearchResult, build_searcher
from .surgery import LayerPlan, list_conv_layers, plan_from_dict
from .train import evaluate, finetune, resolve_device


@dataclass
class ExperimentConfig:
    """Everything an experiment depends on (written whole into the log's ``config`` record).

    checkpoint: a state_dict path; ``"auto"`` = the shared baseline for cifar10-jpeg, else a baseline
        trained once by ``finetuned/train_baseline.py`` and cached (embedded digits default).
    targets: reduction factors of total conv ``metric`` ("macs" or "params").
    decompositions: HT-2 for every method; ``policy_tucker2`` adds Tucker-2 for the policy method.
    search_budget: candidate evaluations for ``random``, ``tpe`` and ``policy``.
    n_seeds: every (target, method) is run at seeds ``seed .. seed + n_seeds - 1``; a seed picks the
        search's draws and the proxy's calibration subset, so deterministic methods vary by their
        calibration only.
    proxy: candidate score (:mod:`common.proxy`): ``"kl"`` (label-free) or ``"top1"`` (val).
    rerank: val top-1 decides among this many best-scored candidates of a search.
    shapes: per-layer rank shapes the searches may choose (:class:`common.search.SearchConfig`).
    final_calib_images: BN-calibration images of each final model (the proxy uses ``calib_images``).
    finetune_targets: targets at which plans are finetuned (default: all targets).
    latency: measure latency of the dense model and of every final model.
    """

    model: str = "resnet18"
    dataset: str = "auto"
    data_root: str | None = None
    checkpoint: str | None = "auto"
    targets: tuple = (3.0,)
    metric: str = "macs"
    methods: tuple = METHODS
    policy_tucker2: bool = False
    search_budget: int = 100
    n_seeds: int = 1
    proxy: str = "kl"
    rerank: int = SearchConfig.rerank
    shapes: tuple = SearchConfig.shapes
    final_calib_images: int = 4096
    finetune: bool = False
    finetune_epochs: float = 3.0
    finetune_targets: tuple | None = None
    finetune_lr: float = 0.0005  # factorized chains amplify SGD steps (the effective lr grows with the product of factor norms); 0.01 diverged on AlexNet
    finetune_batch_size: int = 128
    finetune_max_images: int | None = None
    distill: bool = True
    calib_images: int = 256
    val_images: int | None = None
    sensitivity_levels: tuple = SearchConfig.sensitivity_levels
    policy_rounds: int = SearchConfig.rounds
    temperature: float = SearchConfig.temperature
    rank_multiple: int = 8
    latency: bool = False
    latency_batches: tuple = (1, 64)
    latency_threads: int = 2
    latency_devices: tuple = ("cpu", "cuda")  # which of these to time (cuda only when present)
    device: str = "auto"
    seed: int = 0
    run_id: str | None = None
    log_dir: str = "logs"
    threads: int | None = None
    progress: bool = True
    deadline: float | None = None  # unix time after which no new (target, method) stage starts

    def __post_init__(self) -> None:
        # Refuse what would fail late or log nonsense, before any data or model work.
        self.targets = tuple(float(t) for t in self.targets)
        if not self.targets:
            raise ValueError("targets: give at least one reduction factor, e.g. --targets 3")
        bad = [t for t in self.targets if not (math.isfinite(t) and t > 1.0)]
        if bad:
            raise ValueError(f"targets must be finite reduction factors > 1 (dense / compressed), got {bad}")
        for name in ("search_budget", "n_seeds", "rerank", "calib_images", "final_calib_images"):
            if int(getattr(self, name)) < (2 if "calib" in name else 1):
                raise ValueError(f"{name} must be at least {2 if 'calib' in name else 1}, "
                                 f"got {getattr(self, name)}")
        unknown = [m for m in self.methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; expected some of {METHODS}")
        if self.proxy not in PROXIES:
            raise ValueError(f"proxy must be one of {PROXIES}, got {self.proxy!r}")
        if self.metric not in ("macs", "params"):
            raise ValueError(f"metric must be 'macs' or 'params', got {self.metric!r}")
        SearchConfig(shapes=tuple(self.shapes), rerank=self.rerank)  # validates the search options

    def resolved_run_id(self) -> str:
        if self.run_id:
            return self.run_id
        t = "-".join(f"{x:g}" for x in self.targets)
        return f"{self.model}-{self.dataset}-x{t}-s{self.seed}"


def _log_say(log: RunLog, progress: bool):
    def say(msg: str) -> None:
        log.comment(msg)
        if progress:
            print(msg, flush=True)
    return say


def resolve_checkpoint(cfg: ExperimentConfig, data) -> Path | None:
    """The baseline weights to compress: explicit path, shared baseline, or a cached trained one."""
    from .paths import CHECKPOINT_DIR

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
        from finetuned.train_baseline import main as train_baseline

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
    from .latency import fastest_latency

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


def run_experiment(cfg: ExperimentConfig) -> list[dict]:
    """Run (or resume) one experiment; return its ``final`` records."""
    t_start = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device = resolve_device(cfg.device)
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
    else:
        changed = [k for k in ("model", "dataset", "checkpoint", "metric", "seed", "calib_images", "val_images",
                               "sensitivity_levels", "rank_multiple", "search_budget", "n_seeds", "proxy",
                               "rerank", "shapes", "final_calib_images")
                   if json.dumps(prev.get(k)) != json.dumps(cfg_dict.get(k), default=list)]
        if changed:
            raise ValueError(f"run id {run_id!r} already exists in {log.path} with different {changed}; "
                             "pick another run_id")
        say(f"resuming run {run_id} from {log.path}")

    data = load_dataset(cfg.dataset, root=cfg.data_root)
    from .models import build_model, load_checkpoint

    ckpt = resolve_checkpoint(cfg, data)
    torch.manual_seed(cfg.seed)  # checkpoint=None keeps the random init: it must be the same on resume
    model = build_model(cfg.model, num_classes=data.num_classes)
    if ckpt is not None:
        load_checkpoint(model, ckpt)
    model.eval()
    size = data.image_size
    input_size = (1, 3, size, size)

    def full_eval(m: nn.Module) -> dict:
        return {s: evaluate(m, make_loader(data, s, 500, device=device), device) for s in ("val", "test")}

    base = log.find("baseline")
    if base is None:
        t = time.perf_counter()
        ev = full_eval(model)
        cost = count_model(model, input_size)
        lat = _latency(model, cfg, size, device) if cfg.latency else {}
        base = log.write("baseline", f"val {ev['val']['top1']:.4f} test {ev['test']['top1']:.4f}",
                         val_top1=ev["val"]["top1"], test_top1=ev["test"]["top1"], val_loss=ev["val"]["loss"],
                         checkpoint=str(ckpt) if ckpt else None, latency=lat, **cost.to_dict())
        log.write("timing", stage="baseline", seconds=time.perf_counter() - t)
    model.to(device)
    layers = list_conv_layers(model, input_size)
    if log.find("layers") is None:
        log.write("layers", f"{len(layers)} conv layers",
                  layers=[{k: v for k, v in i.to_dict().items()} for i in layers])

    decomps = [("ht2", list(cfg.methods))]
    if cfg.policy_tucker2 and "policy" in cfg.methods:
        decomps.append(("tucker2", ["policy"]))
    seeds = [cfg.seed + i for i in range(cfg.n_seeds)]
    finals = []
    searchers = _build_searchers(cfg, log, say, model, data, device, [d for d, _ in decomps], seeds)
    ft_targets = [float(x) for x in (cfg.targets if cfg.finetune_targets is None else cfg.finetune_targets)]
    # Targets outermost, then seeds, so that an interrupted or time-boxed run has whole budgets done first.
    for target in cfg.targets:
        for seed in seeds:
            for decomposition, methods in decomps:
                searcher = searchers[decomposition, seed]
                for method in methods:
                    key = {"method": method, "target": float(target), "decomposition": decomposition, "seed": seed}
                    done = log.find("final", **key)
                    if done is not None:
                        finals.append(done)
                        continue
                    if cfg.deadline is not None and time.time() > cfg.deadline:
                        say(f"deadline reached before {key}; re-run with the same run id to continue")
                        log.write("end", status="deadline", wall_seconds=time.perf_counter() - t_start)
                        return finals
                    prec = _plan_record(cfg, log, searcher, method, float(target), key)
                    plan = plan_from_dict(prec["plan"])
                    finals.append(_finish(cfg, log, say, searcher, model, data, plan, prec, key, device, base,
                                          float(target) in ft_targets))
    log.write("end", status="ok", wall_seconds=time.perf_counter() - t_start)
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


def _finish(cfg, log, say, searcher, model, data, plan, prec, key, device, base, do_finetune) -> dict:
    """BN-recalibrate, evaluate, optionally finetune, count and time one chosen plan; log ``final``."""
    t0 = time.perf_counter()
    size = data.image_size
    comp = final_model(model, plan, searcher.spectra, data, cfg.final_calib_images, key["seed"], device)
    ev = {s: evaluate(comp, make_loader(data, s, 500, device=device), device) for s in ("val", "test")}
    rec = {"val_top1_bn": ev["val"]["top1"], "test_top1_bn": ev["test"]["top1"], "val_top1_ft": None,
           "test_top1_ft": None, "finetune_epochs": None}
    if cfg.finetune and do_finetune:
        t = time.perf_counter()
        teacher = copy.deepcopy(model) if cfg.distill else None

        # Keep the weights of the best val epoch (epoch 0 = before finetuning): selection on val only.
        best = {"val": ev["val"]["top1"], "epoch": 0.0, "state": copy.deepcopy(comp.state_dict())}

        def on_epoch(r: dict, m) -> None:
            log.write("finetune_epoch", **key, **{k: v for k, v in r.items() if k not in key})
            if r.get("val_top1") is not None and r["val_top1"] > best["val"]:
                best.update(val=r["val_top1"], epoch=r["epoch"], state=copy.deepcopy(m.state_dict()))

        finetune(comp, data, cfg.finetune_epochs, batch_size=cfg.finetune_batch_size, lr=cfg.finetune_lr,
                 teacher=teacher, max_images=cfg.finetune_max_images, device=device, seed=key["seed"],
                 progress=cfg.progress, on_epoch_end=on_epoch, eval_every_epoch=True, hflip=data.hflip)
        comp.load_state_dict(best["state"])
        comp.to(memory_format=torch.contiguous_format).eval()
        rec["finetune_selected_epoch"] = best["epoch"]
        ev = {s: evaluate(comp, make_loader(data, s, 500, device=device), device) for s in ("val", "test")}
        rec.update(val_top1_ft=ev["val"]["top1"], test_top1_ft=ev["test"]["top1"],
                   finetune_epochs=cfg.finetune_epochs, finetune_seconds=time.perf_counter() - t)
    cost = count_model(comp, (1, 3, size, size))
    lat = _latency(comp, cfg, size, device) if cfg.latency else {}
    dense_lat = base.get("latency") or {}
    out = log.write(
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
    say(f"final {key}: test {rec['test_top1_bn']:.4f} (BN)"
        + (f" / {rec['test_top1_ft']:.4f} (finetuned)" if rec["test_top1_ft"] is not None else "")
        + f", x{out['macs_factor']:.2f} conv MACs")
    return out


def _floats(s: str) -> tuple:
    return tuple(float(x) for x in s.split(",") if x)


def parse_args(argv: Sequence[str] | None = None) -> ExperimentConfig:
    d = ExperimentConfig()
    p = argparse.ArgumentParser(prog="python -m common.experiment", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=d.model)
    p.add_argument("--dataset", default=d.dataset, help="auto | digits | cifar10-jpeg | imagefolder | cifar10")
    p.add_argument("--data-root", default=None)
    p.add_argument("--checkpoint", default="auto", help="state_dict path, or 'auto'")
    p.add_argument("--targets", default="3", help="comma-separated reduction factors, e.g. 2,3,5")
    p.add_argument("--metric", default=d.metric, choices=["macs", "params"])
    p.add_argument("--methods", default=",".join(d.methods), help=f"comma-separated subset of {METHODS}")
    p.add_argument("--policy-tucker2", action="store_true", help="also run the policy with Tucker-2 layers")
    p.add_argument("--search-budget", type=int, default=d.search_budget)
    p.add_argument("--n-seeds", type=int, default=d.n_seeds, help="seeds per (target, method): seed, seed+1, ...")
    p.add_argument("--proxy", default=d.proxy, choices=["kl", "top1"], help="candidate score of the searches")
    p.add_argument("--rerank", type=int, default=d.rerank, help="val top-1 decides among this many best candidates")
    p.add_argument("--shapes", default=",".join(d.shapes), help="per-layer rank shapes: level and/or energy")
    p.add_argument("--final-calib-images", type=int, default=d.final_calib_images)
    p.add_argument("--finetune-epochs", type=float, default=0.0, help="0 = no finetuning")
    p.add_argument("--finetune-targets", default=None, help="targets to finetune at (default: all)")
    p.add_argument("--finetune-lr", type=float, default=d.finetune_lr)
    p.add_argument("--finetune-batch-size", type=int, default=d.finetune_batch_size)
    p.add_argument("--finetune-max-images", type=int, default=None)
    p.add_argument("--no-distill", action="store_true")
    p.add_argument("--calib-images", type=int, default=d.calib_images)
    p.add_argument("--val-images", type=int, default=d.val_images,
                   help="val images of the re-ranking (and of every candidate with --proxy top1); "
                        "default or 0 = the whole val split")
    p.add_argument("--sensitivity-levels", default=",".join(str(x) for x in d.sensitivity_levels))
    p.add_argument("--policy-rounds", type=int, default=d.policy_rounds)
    p.add_argument("--temperature", type=float, default=d.temperature)
    p.add_argument("--rank-multiple", type=int, default=d.rank_multiple)
    p.add_argument("--latency", action="store_true")
    p.add_argument("--latency-batches", default="1,64")
    p.add_argument("--device", default=d.device)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--run-id", default=None)
    p.add_argument("--log-dir", default=d.log_dir)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--quiet", action="store_true")
    a = p.parse_args(argv)
    try:
        return _config_from_args(a, d)
    except ValueError as e:  # a bad value is a usage error: name it, exit 2, before any work
        p.error(str(e))


def _config_from_args(a: argparse.Namespace, d: ExperimentConfig) -> ExperimentConfig:
    return ExperimentConfig(
        model=a.model, dataset=a.dataset, data_root=a.data_root, checkpoint=a.checkpoint,
        targets=_floats(a.targets), metric=a.metric, methods=tuple(m for m in a.methods.split(",") if m),
        policy_tucker2=a.policy_tucker2, search_budget=a.search_budget, n_seeds=a.n_seeds, proxy=a.proxy,
        rerank=a.rerank, shapes=tuple(x for x in a.shapes.split(",") if x),
        final_calib_images=a.final_calib_images, finetune=a.finetune_epochs > 0,
        finetune_epochs=a.finetune_epochs or d.finetune_epochs,
        finetune_targets=_floats(a.finetune_targets) if a.finetune_targets else None,
        finetune_lr=a.finetune_lr, finetune_batch_size=a.finetune_batch_size,
        finetune_max_images=a.finetune_max_images, distill=not a.no_distill, calib_images=a.calib_images,
        val_images=a.val_images or None, sensitivity_levels=_floats(a.sensitivity_levels),
        policy_rounds=a.policy_rounds, temperature=a.temperature, rank_multiple=a.rank_multiple,
        latency=a.latency, latency_batches=tuple(int(x) for x in a.latency_batches.split(",")),
        device=a.device, seed=a.seed, run_id=a.run_id, log_dir=a.log_dir, threads=a.threads,
        progress=not a.quiet)


def main(argv: Sequence[str] | None = None) -> list[dict]:
    return run_experiment(parse_args(argv))


if __name__ == "__main__":
    main()

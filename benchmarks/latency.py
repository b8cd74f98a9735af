"""Latency of every chosen plan against its dense baseline, on this machine's CPU or CUDA GPU.

Reads the JSON documents of results runs (``jsonify_logs.py``), rebuilds each compressed model from
its logged plan (one per run seed in a multi-seed run: ``--seeds``, default 0; the seed is part of each
row's key) and times dense, as-factorized and deployed forwards, all with
``common.deploy.merge.fastest_latency`` (deployed = every factorized layer in its fastest exact partition
of merged factor convs, timed in the same setting; the faster memory format per model). Latency does
not depend on the trained values, so ``--weights random`` (or a missing checkpoint) times the same
architecture with seeded random weights.

On the CPU the same three models are also exported to ONNX (``common.deploy.export.export_onnx``: dynamic
batch, checked, verified against PyTorch eager) and timed in ONNX Runtime with ``--threads``
intra-op threads (``common.deploy.export.ort_interleaved_latency``; ``--no-ort`` skips it). ``--imagenet``
adds rows for the ImageNet architectures at 224×224 (``--imagenet-models``), with seeded random
weights and ``uniform``/``energy`` plans built from those weights (``common.search.rules``, no data needed):
speed rows, not accuracy ones. ``--compile MODE`` adds columns for the dense and the deployed model
compiled by ``torch.compile`` (inductor; ``common.deploy.latency.compile_for_inference``) in that mode, e.g.
``default`` on the CPU or ``max-autotune`` on CUDA (inductor's own CUDA graphs, next to the eager
CUDA-graph replay of the other columns).

Settings: CPU ``cpu_b<B>`` (``--threads`` threads, fp32, contiguous vs channels_last; ``--batches`` at
32×32, ``--imagenet-batches`` at 224×224); CUDA ``cuda_b256_bf16_graph`` at 32×32 and
``cuda_b64_bf16_graph`` at 224×224 (bf16, channels_last, CUDA-graph replay). Rows are appended to
``<out>/latency_<device>.csv`` as they are measured, and a re-run skips rows already there (a row
without ONNX Runtime timings counts as missing while ONNX Runtime is on), so an interrupted run
continues; ``<out>/latency_<device>.md`` is rewritten from the whole CSV (the last row per key).

    python benchmarks/latency.py --json json/gpu --out results/gpu --device cpu --threads 2 --batches 1,64
    python benchmarks/latency.py --json json/gpu --out results/gpu --device cpu --imagenet --models \\
        resnet18_imagenet,vgg16_imagenet,alexnet_imagenet
    python benchmarks/latency.py --json json/gpu --out results/gpu --device cuda --compile max-autotune
"""

from __future__ import annotations

import argparse
import datetime as _dt
import os
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import numpy as np
import pandas as pd
import torch

from common.analysis import latest_plans, load_runs, markdown_table
from common.decompose.surgery import LayerPlan, SpectraCache, apply_plan, list_conv_layers, plan_from_dict
from common.deploy.latency import compile_for_inference, cpu_name, interleaved_latency
from common.deploy.merge import fastest_latency
from common.models import baseline_or_random, build_model, input_size
from common.paths import CHECKPOINT_DIR
from common.search.options import SearchConfig
from common.search.rules import energy_plan, uniform_plan
from common.search.space import SearchSpace, repair_plan

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
IMAGENET_MODELS = "resnet18_imagenet,vgg16_imagenet,alexnet_imagenet"


def _ort_version() -> str | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _settings(
    device: str, batches: Sequence[int], threads: int, size: int, warmup: int | None, iters: int | None, rounds: int
) -> list[dict]:
    """The timing settings of one input size: batch, device, dtype, formats and the forward counts."""
    if device == "cuda":
        batch = 256 if size <= 64 else 64  # a 224×224 batch of 256 would only time memory traffic
        return [
            dict(
                setting=f"cuda_b{batch}_bf16_graph",
                batch=batch,
                size=size,
                device="cuda",
                dtype=torch.bfloat16,
                threads=None,
                cuda_graph=True,
                formats=(True,),
                warmup=10 if warmup is None else warmup,
                iters=iters or 50,
                rounds=rounds,
            )
        ]
    out = []
    for b in batches:
        # small inputs are fast and noisy: time more of them; a 224×224 forward is ~50× a 32×32 one
        default_iters = max(10, 200 // b) if size <= 64 else max(3, 200 * 32 * 32 // (b * size * size))
        out.append(
            dict(
                setting=f"cpu_b{b}",
                batch=b,
                size=size,
                device="cpu",
                dtype=torch.float32,
                threads=threads,
                cuda_graph=False,
                formats=(False, True),
                # one untimed forward already warms a large one (oneDNN primitives are built on the first)
                warmup=(3 if size <= 64 else 1) if warmup is None else warmup,
                iters=iters or default_iters,
                rounds=rounds,
            )
        )
    return out


def _shape(s: dict) -> tuple[int, int, int, int]:
    return (s["batch"], 3, s["size"], s["size"])


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="json/gpu")
    p.add_argument("--out", default="results/gpu")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64", help="CPU batch sizes at 32×32")
    p.add_argument("--targets", default="3", help="only plans at these targets")
    p.add_argument(
        "--seeds",
        default="0",
        help="only plans of these run seeds (comma-separated; 'all' for every seed): a multi-seed run has one "
        "plan per seed, and the seed is part of each row's key",
    )
    p.add_argument("--models", default=None, help="only these models (comma-separated; JSON runs and --imagenet)")
    p.add_argument("--methods", default=None, help="only these methods (comma-separated)")
    p.add_argument("--decompositions", default=None, help="only these decompositions (comma-separated: ht2,tucker2)")
    p.add_argument("--weights", default="baseline", choices=["baseline", "random"])
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed forwards (default: CUDA 50; CPU 10 at batch >= 20, 200/batch below; at 224×224 "
        "max(3, 200·32²/(batch·224²)))",
    )
    p.add_argument(
        "--warmup", type=int, default=None, help="untimed forwards (default 3 CPU, 1 CPU at 224×224, 10 CUDA)"
    )
    p.add_argument("--deploy-iters", type=int, default=3, help="timed forwards per partition of a layer")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the final dense/compressed timing")
    p.add_argument(
        "--ort",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="also time ONNX exports in ONNX Runtime (default: on for the CPU when onnxruntime is installed)",
    )
    p.add_argument(
        "--onnx-dir", default=None, help="folder for the ONNX files while they are timed (default: a temporary one)"
    )
    p.add_argument("--imagenet", action="store_true", help="also time the ImageNet architectures at 224×224")
    p.add_argument("--imagenet-models", default=IMAGENET_MODELS)
    p.add_argument("--imagenet-methods", default="uniform,energy", help="rule plans of the 224×224 rows")
    p.add_argument("--imagenet-batches", default="1,8", help="CPU batch sizes at 224×224")
    p.add_argument("--imagenet-rounds", type=int, default=3, help="interleaved rounds at 224×224")
    p.add_argument(
        "--compile",
        default=None,
        metavar="MODE",
        help="also time the dense and the deployed model compiled by torch.compile (inductor) in this mode "
        "(e.g. default; max-autotune on CUDA, which replays CUDA graphs itself); off by default",
    )
    p.add_argument("--minutes", type=float, default=None, help="start no new row after this long")
    return p.parse_args(argv)


@dataclass
class Bench:
    """How this invocation times: device, settings per input size, ONNX Runtime, time box and the shared
    timing cache."""

    device: str
    threads: int
    settings: dict[int, list[dict]]  # input size -> settings
    deploy_iters: int
    deadline: float | None
    ort: bool
    onnx_dir: Path
    command: str = ""
    compile: str | None = None
    timing_cache: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, a: argparse.Namespace, onnx_dir: Path, command: str = "") -> Bench:
        device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
        ort = (device == "cpu" and _ort_version() is not None) if a.ort is None else bool(a.ort)
        if ort and device != "cpu":
            raise SystemExit("error: --ort times ONNX Runtime's CPU provider; use it with --device cpu")
        if ort and _ort_version() is None:
            raise SystemExit("error: --ort needs onnxruntime (pip install -r requirements.txt)")

        def batches(text: str) -> list[int]:
            return [int(b) for b in text.split(",")]

        settings = {32: _settings(device, batches(a.batches), a.threads, 32, a.warmup, a.iters, a.rounds)}
        settings[224] = _settings(
            device, batches(a.imagenet_batches), a.threads, 224, a.warmup, a.iters, a.imagenet_rounds
        )
        return cls(
            device=device,
            threads=a.threads,
            settings=settings,
            deploy_iters=a.deploy_iters,
            deadline=time.time() + 60 * a.minutes if a.minutes else None,
            ort=ort,
            onnx_dir=onnx_dir,
            command=command,
            compile=a.compile,
        )

    def settings_for(self, size: int) -> list[dict]:
        if size not in self.settings:
            base = self.settings[32 if size <= 64 else 224]
            self.settings[size] = [{**s, "size": size} for s in base]
        return self.settings[size]

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(0) if self.device == "cuda" else f"{cpu_name()}, {self.threads} threads"

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def deploy_kw(self, s: dict) -> dict:
        """The per-layer timing of a deployment in setting ``s``: one definition, so that the ONNX export's
        deployment (contiguous) is served from the timings :meth:`timed` already made."""
        return {"warmup": 1, "iters": max(self.deploy_iters, s["iters"] // 10), "timing_cache": self.timing_cache}

    def timed(self, model: torch.nn.Module, s: dict, deploy: str | None) -> dict:
        """:func:`fastest_latency` of ``model`` in setting ``s`` (``deploy=None``: as it is)."""
        kw = self.deploy_kw(s)
        return fastest_latency(
            model,
            _shape(s),
            device=s["device"],
            dtype=s["dtype"],
            return_model=True,
            threads=s["threads"],
            cuda_graph=s["cuda_graph"],
            formats=s["formats"],
            deploy=deploy,
            warmup=s["warmup"],
            iters=s["iters"],
            deploy_warmup=kw["warmup"],
            deploy_iters=kw["iters"],
            timing_cache=kw["timing_cache"],
        )


class OnnxFiles:
    """The ONNX exports of one model's rows, each made once and removed when no longer needed (a 224×224
    VGG-16 file is half a gigabyte): the dense model once, each plan once (any batch, the batch is
    dynamic), each deployment once per setting (it is chosen for that batch)."""

    def __init__(self, bench: Bench, name: str, dense: torch.nn.Module, size: int):
        self.bench, self.name, self.size = bench, name, size
        self.dense_model = dense
        self.dense: dict | None = None
        self.plan: tuple[tuple, dict] | None = None  # (config, export report) of the current plan

    def _export(self, model: torch.nn.Module, stem: str, shape: Sequence[int], **kw) -> dict:
        from common.deploy.export import export_onnx

        return export_onnx(model, shape, self.bench.onnx_dir / f"{self.name}-{stem}.onnx", **kw)

    def dense_file(self) -> dict:
        if self.dense is None:
            self.dense = self._export(self.dense_model, "dense", (2, 3, self.size, self.size))
        return self.dense

    def plan_file(self, config: tuple, comp: torch.nn.Module) -> dict:
        if self.plan is None or self.plan[0] != config:
            self._drop_plan()
            method, decomp, target, seed = config
            stem = f"{method}-{decomp}-x{target:g}-s{seed}"
            self.plan = (config, self._export(comp, stem, (2, 3, self.size, self.size)))
        return self.plan[1]

    def deployed_file(self, config: tuple, comp: torch.nn.Module, s: dict) -> dict:
        method, decomp, target, seed = config
        options = {"channels_last": False, "threads": s["threads"], **self.bench.deploy_kw(s)}
        stem = f"{method}-{decomp}-x{target:g}-s{seed}-{s['setting']}-deployed"
        return self._export(comp, stem, _shape(s), deployed=True, deploy_options=options)

    def _drop_plan(self) -> None:
        if self.plan is not None:
            Path(self.plan[1]["path"]).unlink(missing_ok=True)
            self.plan = None

    def close(self) -> None:
        self._drop_plan()
        if self.dense is not None:
            Path(self.dense["path"]).unlink(missing_ok=True)


def _ort_row(bench: Bench, files: OnnxFiles, config: tuple, comp: torch.nn.Module, s: dict) -> dict:
    """The ONNX Runtime columns of one row: dense, factorized and deployed exports timed in alternation."""
    from common.deploy.export import ort_interleaved_latency, ort_session

    dense, fact = files.dense_file(), files.plan_file(config, comp)
    dep = files.deployed_file(config, comp, s)
    try:
        sessions = {k: ort_session(r["path"], s["threads"]) for k, r in (("dense", dense), ("factorized", fact))}
        sessions["deployed"] = ort_session(dep["path"], s["threads"])
        il = ort_interleaved_latency(
            sessions, _shape(s), rounds=s["rounds"], warmup=s["warmup"], iters=s["iters"], reference="dense"
        )
    finally:
        Path(dep["path"]).unlink(missing_ok=True)
    forms = Counter(str(tuple(d["form"])) for d in dep["deployment"])
    return {
        "ort_dense_ms": il["dense"]["median_ms"],
        "ort_factorized_ms": il["factorized"]["median_ms"],
        "ort_deployed_ms": il["deployed"]["median_ms"],
        "ort_speedup_factorized": il["speedup"]["factorized"],
        "ort_speedup": il["speedup"]["deployed"],
        "ort_max_rel_error": max(r["max_rel_error"] for r in (dense, fact, dep)),
        "ort_forms": ";".join(f"{f}:{n}" for f, n in sorted(forms.items())),
    }


def _compile_row(bench: Bench, s: dict, d: dict, dep: dict) -> dict:
    """The torch.compile columns of one row: the dense model and the deployed one (each in the memory format
    and partition chosen in eager mode), compiled by inductor in ``bench.compile`` mode and timed in
    alternation. The dense model is compiled once per setting (kept in ``d``)."""

    def compiled(m: dict) -> torch.nn.Module:
        return compile_for_inference(
            m["model"], _shape(s), bench.compile, s["device"], s["dtype"], m["channels_last"], s["threads"]
        )

    if "compiled" not in d:
        d["compiled"] = compiled(d)
    il = interleaved_latency(
        {"dense": d["compiled"], "deployed": compiled(dep)},
        _shape(s),
        rounds=s["rounds"],
        device=s["device"],
        dtype=s["dtype"],
        channels_last={"dense": d["channels_last"], "deployed": dep["channels_last"]},
        threads=s["threads"],
        cuda_graph=False,  # a compiled model replays CUDA graphs itself when its mode says so
        warmup=s["warmup"],
        iters=s["iters"],
        reference="dense",
    )
    return {
        "compile_mode": bench.compile,
        "compile_dense_ms": il["dense"]["median_ms"],
        "compile_deployed_ms": il["deployed"]["median_ms"],
        "compile_speedup": il["speedup"]["deployed"],
    }


def _row(
    bench: Bench,
    name: str,
    config: tuple,
    comp: torch.nn.Module,
    s: dict,
    d: dict,
    weights: str,
    files: OnnxFiles | None,
) -> dict:
    """One CSV row: pick ``comp``'s memory format (and deployment) first, then time the dense model, it as
    factorized and it deployed in alternation (``d``: the dense model's own :meth:`Bench.timed`), then the
    same in ONNX Runtime when ``files`` is given."""
    method, decomp, target, seed = config
    load1 = os.getloadavg()[0]  # before the row: what else ran on the cores while it was timed
    dep = bench.timed(comp, s, "latency")
    fact = dep["factorized"]
    il = interleaved_latency(
        {"dense": d["model"], "factorized": fact["model"], "deployed": dep["model"]},
        _shape(s),
        rounds=s["rounds"],
        device=s["device"],
        dtype=s["dtype"],
        channels_last={
            "dense": d["channels_last"],
            "factorized": fact["channels_last"],
            "deployed": dep["channels_last"],
        },
        threads=s["threads"],
        cuda_graph=s["cuda_graph"],
        warmup=s["warmup"],
        iters=s["iters"],
        reference="dense",
    )
    ort = _ort_row(bench, files, config, comp, s) if files is not None else dict.fromkeys(ORT_COLUMNS)
    compiled = _compile_row(bench, s, d, dep) if bench.compile else dict.fromkeys(COMPILE_COLUMNS)
    row = {
        "model": name,
        "method": method,
        "decomposition": decomp,
        "target": target,
        "seed": seed,
        "input_size": s["size"],
        "macs_factor": d["conv_macs"] / fact["conv_macs"],
        "deployed_macs_factor": d["conv_macs"] / dep["conv_macs"],
        "setting": s["setting"],
        "batch": s["batch"],
        "dense_ms": il["dense"]["median_ms"],
        "factorized_ms": il["factorized"]["median_ms"],
        "deployed_ms": il["deployed"]["median_ms"],
        "speedup_factorized": il["speedup"]["factorized"],
        "speedup": il["speedup"]["deployed"],
        "channels_last": dep["channels_last"],
        "dense_channels_last": d["channels_last"],
        "forms": ";".join(f"{f}:{n}" for f, n in sorted(dep["forms"].items())) or "as factorized",
        **ort,
        **compiled,
        "rounds": s["rounds"],
        "warmup": s["warmup"],
        "iters": s["iters"],
        "weights": weights,
        "device_name": bench.device_name,
        "load1": round(max(load1, os.getloadavg()[0]), 2),
        "torch": torch.__version__,
        "onnxruntime": _ort_version() if files is not None else None,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "command": bench.command,
    }
    return {k: row[k] for k in ROW_COLUMNS}


def _time_configs(
    bench: Bench,
    name: str,
    dense: torch.nn.Module,
    weights: str,
    plans: dict[tuple, dict],
    csv: Path,
    done_keys: set,
) -> None:
    """Time every ``(config, setting)`` of ``plans`` (``{config: plan}``) not in ``done_keys`` yet, appending
    each row to ``csv``."""
    size = input_size(name)
    todo = [
        (config, plan, s)
        for config, plan in sorted(plans.items())
        for s in bench.settings_for(size)
        if (name, *config, s["setting"]) not in done_keys
    ]
    if not todo:
        return
    spectra = SpectraCache(dense)
    dense_ms: dict[str, dict] = {}
    files = OnnxFiles(bench, name, dense, size) if bench.ort else None
    try:
        for config, plan, s in todo:
            if bench.out_of_time():
                break
            if s["setting"] not in dense_ms:
                dense_ms[s["setting"]] = bench.timed(dense, s, None)
            comp = apply_plan(dense, plan, spectra)
            row = _row(bench, name, config, comp, s, dense_ms[s["setting"]], weights, files)
            pd.DataFrame([row], columns=ROW_COLUMNS).to_csv(csv, mode="a", header=not csv.is_file(), index=False)
            ort = (
                f"; ORT dense {row['ort_dense_ms']:.2f} ms, factorized {row['ort_speedup_factorized']:.2f}x, "
                f"deployed {row['ort_speedup']:.2f}x"
                if files is not None
                else ""
            )
            print(
                f"{name} {row['method']} {row['decomposition']} x{row['target']:g} seed {row['seed']} {s['setting']}: dense "
                f"{row['dense_ms']:.2f} ms, factorized {row['factorized_ms']:.2f} ms "
                f"({row['speedup_factorized']:.2f}x), deployed {row['deployed_ms']:.2f} ms ({row['speedup']:.2f}x) "
                f"[{row['forms']}]{ort} (load {row['load1']:.1f})",
                flush=True,
            )
    finally:
        if files is not None:
            files.close()


def _wanted(name: str, a: argparse.Namespace) -> bool:
    return not a.models or name in set(a.models.split(","))


def _time_run(bench: Bench, run: dict, a: argparse.Namespace, csv: Path, done_keys: set) -> None:
    """Time every plan of one run document not in ``done_keys`` yet."""
    name = run["model"]
    if not _wanted(name, a):
        return
    targets = {float(t) for t in a.targets.split(",")}
    seeds = None if a.seeds == "all" else {int(x) for x in a.seeds.split(",")}
    methods = set(a.methods.split(",")) if a.methods else None
    decomps = set(a.decompositions.split(",")) if a.decompositions else None
    plans = {
        k: plan_from_dict(rec["plan"])
        for k, rec in latest_plans(run, targets, seeds).items()
        if (methods is None or k[0] in methods) and (decomps is None or k[1] in decomps)
    }
    if not any((name, *k, s["setting"]) not in done_keys for k in plans for s in bench.settings_for(input_size(name))):
        return  # nothing to do: no model load
    dense, weights = baseline_or_random(name, a.weights, a.checkpoint_dir)
    _time_configs(bench, name, dense, weights, plans, csv, done_keys)


def rule_plans(
    model: torch.nn.Module, size: int, targets: Sequence[float], methods: Sequence[str], decomposition: str = "ht2"
) -> dict[tuple, dict[str, LayerPlan]]:
    """``{(method, decomposition, target, 0): plan}`` of the data-free rules (``uniform``, ``energy``) on the
    conv MACs of ``model`` at ``size``×``size``, finished onto the budget like the searcher's rule plans
    (:func:`common.search.methods.rule_plan`). Seed 0: the rules draw nothing, and the random weights they
    read are drawn with seed 0."""
    space = SearchSpace(list_conv_layers(model, (1, 3, size, size)), decomposition)
    spectra = SpectraCache(model)
    tol = SearchConfig().tol
    plans = {}
    for target in targets:
        for method in methods:
            if method == "uniform":
                plan, _ = uniform_plan(space, target, "macs")
            elif method == "energy":
                plan, _ = energy_plan(space, spectra, target, "macs")
            else:
                raise ValueError(f"--imagenet-methods: only the data-free rules uniform, energy; got {method!r}")
            if abs(space.factor(plan, "macs") / target - 1) > tol:
                plan, _ = repair_plan(space, plan, target, "macs", tol)
            plans[(method, decomposition, float(target), 0)] = plan
    return plans


def _time_imagenet(bench: Bench, a: argparse.Namespace, csv: Path, done_keys: set) -> None:
    """The 224×224 rows: each ImageNet architecture with seeded random weights and its rule plans."""
    targets = [float(t) for t in a.targets.split(",")]
    methods = [m for m in a.imagenet_methods.split(",") if not a.methods or m in set(a.methods.split(","))]
    for name in a.imagenet_models.split(","):
        if bench.out_of_time():
            return
        if not _wanted(name, a):
            continue
        keys = [(name, m, "ht2", t, 0, s["setting"]) for m in methods for t in targets for s in bench.settings_for(224)]
        if all(k in done_keys for k in keys):
            continue
        torch.manual_seed(0)
        dense = build_model(name).eval()
        _time_configs(bench, name, dense, "random", rule_plans(dense, 224, targets, methods), csv, done_keys)


def _read_csv(csv: Path) -> pd.DataFrame:
    """The CSV with every :data:`ROW_COLUMNS` column (older files lack some) and one row per key (the last)."""
    df = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=ROW_COLUMNS)
    for c in ROW_COLUMNS:
        if c not in df.columns:
            df[c] = [input_size(m) for m in df["model"]] if c == "input_size" else np.nan
    df = df[ROW_COLUMNS + [c for c in df.columns if c not in ROW_COLUMNS]]
    return df.drop_duplicates(KEY, keep="last").reset_index(drop=True)


def _row_seed(value: object) -> int | None:
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


def _markdown(bench: Bench, df: pd.DataFrame, argv: Sequence[str]) -> str:
    """The Markdown report of the whole CSV: machine, versions, commands, load, then one table per input size."""
    commands = list(dict.fromkeys(str(c) for c in df["command"].dropna())) if len(df) else []
    if not commands or df["command"].isna().any():
        commands.append(
            f"python benchmarks/latency.py {' '.join(argv)}" + (" (rows of earlier runs)" if commands else "")
        )
    ort_versions = sorted({str(v) for v in df["onnxruntime"].dropna()}) if len(df) else []
    torch_versions = sorted({str(v) for v in df["torch"].dropna()}) if len(df) else [torch.__version__]
    dates = sorted(str(d)[:10] for d in df["date"].dropna()) if len(df) else []
    when = (dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}") if dates else "no rows yet"
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
    header = (
        f"# {bench.device.upper()} latency vs dense\n\n"
        + "".join(f"`{c}`\n" if len(commands) == 1 else f"- `{c}`\n" for c in commands)
        + f"\non {bench.device_name}, torch {', '.join(torch_versions)}"
        + (f", onnxruntime {', '.join(ort_versions)}" if ort_versions else "")
        + f", {when}. {load_txt}Each row times dense, factorized and deployed in alternation, in rounds "
        "(ms: median over rounds of the per-round medians; speed-up: median of the per-round ratios, so that "
        "machine drift cancels); the forward counts are given per table. Memory format and deployment are chosen "
        "by separate timings first. *factorized*: the "
        "compressed model's chains of factor convs as they are; *deployed*: each factorized layer in the "
        "partition of merged adjacent factor convs that ran fastest here (exact: the same function), or the "
        "model as factorized when that was faster as a whole (`forms` = as factorized); "
        "`forms` counts layers per partition, e.g. `(1, 1, 1, 1)` = HT-2 as four convs, `(4,)` = merged "
        "back to one dense conv. *deployed MACs ×*: conv-MAC reduction of what actually runs.\n\n"
    )
    if any("OMP_WAIT_POLICY=PASSIVE" in c for c in commands):
        header += (
            "`OMP_WAIT_POLICY=PASSIVE` (ONNX Runtime's intra-op spinning off to match): idle threads sleep "
            "instead of spinning. On cores shared with other jobs a spinning thread takes the time slice its "
            "partner waits for; here that made 2-thread PyTorch forwards 30–100× slower at batch 1.\n\n"
        )
    has_ort = len(df) > 0 and df["ort_speedup"].notna().any()
    if has_ort:
        header += (
            "*ort_*: the same dense, factorized and deployed models exported to ONNX (`common.deploy.export.export_onnx`: "
            "torch's dynamo exporter at its default opset, dynamic batch, `onnx.checker` passed, ONNX Runtime's "
            "output within 1e-4 of PyTorch eager relative to the output's scale: `ort_max_rel_error` in the CSV) "
            f"and run by ONNX Runtime's CPU provider with {bench.threads} intra-op threads and all graph "
            "optimizations, timed in their own interleaved rounds with the same counts. ORT runs NCHW, so its "
            "deployment is the partition that ran fastest in PyTorch in the contiguous format at that batch "
            "(`ort_forms` in the CSV). *speedup_best*: the dense model in its faster runtime over the fastest "
            "compressed form in either runtime.\n\n"
        )
    has_compile = len(df) > 0 and df["compile_speedup"].notna().any()
    if has_compile:
        modes = ", ".join(sorted({str(m) for m in df["compile_mode"].dropna()}))
        header += (
            f"*compile_*: the dense and the deployed model compiled by `torch.compile` (inductor, mode {modes}, "
            "static shapes, no graph breaks; `common.deploy.latency.compile_for_inference`) in the memory format and "
            "partition chosen in eager mode, compiled before timing and timed in their own interleaved rounds"
            + (" without our CUDA-graph capture" if bench.device == "cuda" else "")
            + ".\n\n"
        )
    columns = [*KEY, *MD_FLOATS]
    if has_ort:
        columns += [*ORT_MD_FLOATS]
    if has_compile:
        columns += [*COMPILE_MD_FLOATS]
    if has_ort or has_compile:
        columns += ["speedup_best"]
    columns += ["channels_last", "forms", "load1"]
    if len(df):
        df = df.copy()
        best_dense = df[["dense_ms", "ort_dense_ms", "compile_dense_ms"]].min(axis=1)
        best_comp = df[
            ["factorized_ms", "deployed_ms", "ort_factorized_ms", "ort_deployed_ms", "compile_deployed_ms"]
        ].min(axis=1)
        df["speedup_best"] = best_dense / best_comp
    cuda = (
        "CUDA rows: `latency_cuda.md`."
        if torch.cuda.is_available()
        else "CUDA at 224×224: not measured: no GPU on this machine."
    )
    parts = [header]
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
    return "".join(parts)


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    a = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    tmp = None
    if a.onnx_dir:
        onnx_dir = Path(a.onnx_dir)
        onnx_dir.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.mkdtemp(prefix="latency-onnx-")
        onnx_dir = Path(tmp)
    try:
        # OpenMP's wait policy changes timings on shared cores by orders of magnitude: part of the command
        wait = os.environ.get("OMP_WAIT_POLICY")
        command = (f"OMP_WAIT_POLICY={wait} " if wait else "") + f"python benchmarks/latency.py {' '.join(argv)}"
        bench = Bench.from_args(a, onnx_dir, command)
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        csv = out / f"latency_{bench.device}.csv"
        done = _read_csv(csv)
        if csv.is_file() and list(pd.read_csv(csv, nrows=0).columns) != ROW_COLUMNS:
            done.to_csv(csv, index=False)  # an older file: widened once, so appended rows line up
        # while ONNX Runtime is on, a row without its timings is not done (it is measured again)
        complete = done["ort_speedup"].notna() if bench.ort else pd.Series(True, index=done.index)
        if bench.compile:  # likewise a row without the torch.compile timings while --compile is on
            complete &= done["compile_speedup"].notna()
        done_keys = {
            (r.model, r.method, r.decomposition, float(r.target), _row_seed(r.seed), r.setting)
            for r in done[complete].itertuples()
        }
        if Path(a.json).is_dir() or not a.imagenet:
            for run in load_runs(a.json):
                if bench.out_of_time():
                    break
                _time_run(bench, run, a, csv, done_keys)
        if a.imagenet and not bench.out_of_time():
            _time_imagenet(bench, a, csv, done_keys)
        if bench.out_of_time():
            print("time box reached; re-run the same command to continue", flush=True)
        df = _read_csv(csv)
        if csv.is_file() and len(df) != len(pd.read_csv(csv)):
            df.to_csv(csv, index=False)  # rows measured again replace the older ones
        (out / f"latency_{bench.device}.md").write_text(_markdown(bench, df, argv))
        return df
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

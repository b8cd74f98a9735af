"""How ``benchmarks/latency.py`` times: the settings, the invocation's :class:`Bench` and the ONNX exports.

A *setting* is one way of timing a model at one input size (:func:`timing_settings`): on the CPU
``cpu_b<B>`` (fp32, contiguous vs channels_last, ``--threads`` threads), on CUDA one
``cuda_b<B>_bf16_graph`` (bf16, channels_last, CUDA-graph replay), each with its forward counts.
:class:`Bench` holds what one invocation times with (device, settings per input size, ONNX Runtime on or
off, time box, the deployment timing cache shared by all rows) and times a model in a setting
(:func:`common.deploy.merge.fastest_latency`). :class:`OnnxFiles` exports a model's dense, factorized
and deployed forms to ONNX once each, and :func:`ort_columns` times them in ONNX Runtime: a row's
``ort_*`` columns.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from common.deploy.latency import cpu_name
from common.deploy.merge import fastest_latency


def ort_version() -> str | None:
    """The installed onnxruntime's version; None without it."""
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.__version__


def _setting(device: str, batch: int, size: int, threads: int | None, warmup: int, iters: int, rounds: int) -> dict:
    """One timing setting: on CUDA bf16, channels_last, CUDA-graph replay; on the CPU fp32, both memory formats."""
    cuda = device == "cuda"
    return dict(
        setting=f"cuda_b{batch}_bf16_graph" if cuda else f"cpu_b{batch}",
        batch=batch,
        size=size,
        device=device,
        dtype=torch.bfloat16 if cuda else torch.float32,
        threads=threads,
        cuda_graph=cuda,
        formats=(True,) if cuda else (False, True),
        warmup=warmup,
        iters=iters,
        rounds=rounds,
    )


def timing_settings(
    device: str, batches: Sequence[int], threads: int, size: int, warmup: int | None, iters: int | None, rounds: int
) -> list[dict]:
    """The timing settings of one input size: batch, device, dtype, formats and the forward counts."""
    if device == "cuda":
        batch = 256 if size <= 64 else 64  # a 224×224 batch of 256 would only time memory traffic
        return [_setting("cuda", batch, size, None, 10 if warmup is None else warmup, iters or 50, rounds)]
    out = []
    for b in batches:
        # small inputs are fast and noisy: time more of them; a 224×224 forward is ~50× a 32×32 one
        default_iters = max(10, 200 // b) if size <= 64 else max(3, 200 * 32 * 32 // (b * size * size))
        # one untimed forward already warms a large one (oneDNN primitives are built on the first)
        cpu_warmup = (3 if size <= 64 else 1) if warmup is None else warmup
        out.append(_setting("cpu", b, size, threads, cpu_warmup, iters or default_iters, rounds))
    return out


def batch_shape(s: dict) -> tuple[int, int, int, int]:
    """The input shape of setting ``s``: ``B x 3 x size x size``."""
    return (s["batch"], 3, s["size"], s["size"])


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
        ort = (device == "cpu" and ort_version() is not None) if a.ort is None else bool(a.ort)
        if ort and device != "cpu":
            raise SystemExit("error: --ort times ONNX Runtime's CPU provider; use it with --device cpu")
        if ort and ort_version() is None:
            raise SystemExit("error: --ort needs onnxruntime (pip install -r requirements.txt)")

        def batches(text: str) -> list[int]:
            return [int(b) for b in text.split(",")]

        settings = {32: timing_settings(device, batches(a.batches), a.threads, 32, a.warmup, a.iters, a.rounds)}
        settings[224] = timing_settings(
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
            batch_shape(s),
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
        return self._export(comp, stem, batch_shape(s), deployed=True, deploy_options=options)

    def _drop_plan(self) -> None:
        if self.plan is not None:
            Path(self.plan[1]["path"]).unlink(missing_ok=True)
            self.plan = None

    def close(self) -> None:
        self._drop_plan()
        if self.dense is not None:
            Path(self.dense["path"]).unlink(missing_ok=True)


def ort_columns(files: OnnxFiles, config: tuple, comp: torch.nn.Module, s: dict) -> dict:
    """The ONNX Runtime columns of one row: dense, factorized and deployed exports timed in alternation."""
    from common.deploy.export import ort_interleaved_latency, ort_session

    dense, fact = files.dense_file(), files.plan_file(config, comp)
    dep = files.deployed_file(config, comp, s)
    try:
        sessions = {k: ort_session(r["path"], s["threads"]) for k, r in (("dense", dense), ("factorized", fact))}
        sessions["deployed"] = ort_session(dep["path"], s["threads"])
        il = ort_interleaved_latency(
            sessions, batch_shape(s), rounds=s["rounds"], warmup=s["warmup"], iters=s["iters"], reference="dense"
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

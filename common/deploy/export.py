"""ONNX export of a (compressed) model, checked and verified in ONNX Runtime, and ONNX Runtime timing.

:func:`export_onnx` writes a model to ONNX with torch's ``torch.export``-based exporter
(``dynamo=True``, the current default opset unless one is asked for) with a dynamic batch dimension,
optionally after deploying its factorized layers in their fastest exact partition
(:func:`common.deploy.merge.deploy_model`); it then runs ``onnx.checker`` on the file and compares ONNX
Runtime's output (CPU provider) with PyTorch eager on a seeded random batch, so that a written file
is a verified one. :func:`ort_latency` times an ONNX model in ONNX Runtime the way
:func:`common.deploy.latency.measure_latency` times a PyTorch one (same summary keys), and
:func:`ort_interleaved_latency` times several in alternating rounds, both with the timing loops of
:mod:`common.deploy.latency` (:func:`~common.deploy.latency.time_calls`,
:func:`~common.deploy.latency.interleaved_rounds`) that time PyTorch models.

Command line, from a compressed-model artifact (:mod:`common.deploy.artifacts`)::

    python -m common.deploy.export ARTIFACT.pt --onnx OUT.onnx [--deployed] [--batch N]

Exit status 2 (message naming the file) for a missing or unreadable artifact, 1 when the exported file
fails its check or verification.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.deploy.latency import check_counts, check_rounds, interleaved_rounds, summarize_times, time_calls
from common.deploy.merge import deploy_model

__all__ = ["ExportError", "export_onnx", "ort_session", "ort_latency", "ort_interleaved_latency", "main"]

# The ONNX protobuf limit is 2 GiB; a model whose weights come near it must keep them in a side file.
_EXTERNAL_DATA_BYTES = 1_800_000_000


class ExportError(RuntimeError):
    """An exported ONNX file failed ``onnx.checker`` or did not reproduce PyTorch in ONNX Runtime."""


def _param_bytes(model: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers()))


def _file_bytes(path: Path) -> int:
    """Size of the ONNX file plus its external-data side file, when there is one."""
    side = path.with_name(path.name + ".data")
    return path.stat().st_size + (side.stat().st_size if side.is_file() else 0)


def _set_metadata(path: Path, metadata: Mapping[str, Any]) -> None:
    """Store ``metadata`` (values as JSON text) in the file's ``metadata_props`` for whoever deploys it."""
    import onnx

    # the weights are not loaded: an external-data file keeps its reference, an embedded one its tensors
    m = onnx.load(str(path), load_external_data=False)
    onnx.helper.set_model_props(m, {str(k): v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()})
    onnx.save(m, str(path))


def _remove(path: Path) -> None:
    for p in (path, path.with_name(path.name + ".data")):
        p.unlink(missing_ok=True)


def ort_session(path: str | os.PathLike, threads: int | None = None, spinning: bool | None = None):
    """An ONNX Runtime CPU inference session for ``path``.

    Args:
        path: the ONNX file.
        threads: intra-op threads (the calling thread included, like ``torch.set_num_threads``);
            ``None`` leaves ONNX Runtime's default (one per physical core).
        spinning: whether idle intra-op threads spin (ONNX Runtime's default) or sleep; ``None``
            follows ``OMP_WAIT_POLICY`` (``PASSIVE``: sleep), so that both runtimes wait alike. On
            shared cores a spinning thread steals the time slice its partner waits for.

    Returns:
        ``onnxruntime.InferenceSession`` on ``CPUExecutionProvider`` with all graph optimizations on.
    """
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.inter_op_num_threads = 1  # one branch at a time, as PyTorch eager runs it
    so.log_severity_level = 3  # errors only: the provider's notes are not the caller's business
    if threads is not None:
        so.intra_op_num_threads = int(threads)
    if spinning is None:
        spinning = os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE"
    so.add_session_config_entry("session.intra_op.allow_spinning", "1" if spinning else "0")
    return ort.InferenceSession(str(path), sess_options=so, providers=["CPUExecutionProvider"])


def _ort_run(session, x: np.ndarray) -> np.ndarray:
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def ort_latency(
    model: str | os.PathLike | Any,
    input_shape: Sequence[int],
    *,
    threads: int | None = None,
    warmup: int = 3,
    iters: int = 10,
    seed: int = 0,
) -> dict:
    """Time ``iters`` ONNX Runtime runs of ``model`` on a seeded random float32 input of ``input_shape``.

    The ONNX Runtime counterpart of :func:`common.deploy.latency.measure_latency`: ``time.perf_counter``
    around each run, warm-up runs never timed.

    Args:
        model: an ONNX file, or a session from :func:`ort_session` (reused: building one optimizes the
            graph, which takes longer than many runs).
        input_shape: ``B x C x H x W``.
        threads: intra-op threads of a session built here; for a given session, the threads it was
            built with are reported and this must be ``None`` or equal to them.
        warmup, iters: untimed and timed runs.
        seed: seed of the input.

    Returns:
        ``median_ms``, ``p10_ms``, ``p90_ms`` per run, plus ``iters``, ``batch``, ``device`` (``"cpu"``),
        ``threads`` and ``runtime`` (``"onnxruntime <version>"``).

    Raises:
        ValueError: ``iters <= 0``, ``warmup < 0``, or ``threads`` differing from a given session's.
    """
    import onnxruntime as ort

    check_counts(warmup, iters)
    if isinstance(model, (str, os.PathLike)):
        session = ort_session(model, threads)
    else:
        session = model
        built = session.get_session_options().intra_op_num_threads
        if threads is not None and built not in (0, threads):
            raise ValueError(f"the session was built with {built} intra-op threads, not {threads}")
    x = torch.randn(tuple(input_shape), generator=torch.Generator().manual_seed(seed)).numpy()
    times = time_calls(_ort_run, session, x, warmup=warmup, iters=iters)
    return {
        **summarize_times(times),
        "iters": iters,
        "batch": int(input_shape[0]),
        "device": "cpu",
        "threads": threads if threads is not None else session.get_session_options().intra_op_num_threads,
        "runtime": f"onnxruntime {ort.__version__}",
    }


def ort_interleaved_latency(
    sessions: Mapping[str, Any],
    input_shape: Sequence[int],
    *,
    rounds: int = 5,
    warmup: int = 3,
    iters: int = 10,
    reference: str | None = None,
) -> dict:
    """Time several ONNX Runtime sessions in alternation, ``rounds`` times each (:func:`ort_latency`).

    The ONNX Runtime counterpart of :func:`common.deploy.latency.interleaved_latency`, through the same
    :func:`common.deploy.latency.interleaved_rounds`: on a shared machine speed drifts over seconds, and a
    ratio taken within a round cancels drift slower than a round.

    Args:
        sessions: ``{name: session from ort_session, or an ONNX file}``.
        input_shape: ``B x C x H x W``.
        rounds, warmup, iters: rounds; untimed and timed runs per session and round.
        reference: the name the speed-ups are relative to.

    Returns:
        :func:`~common.deploy.latency.interleaved_rounds`' result: per session its median and per-round
        times (ms, each round's the median of its runs), and the speed-ups relative to ``reference``.

    Raises:
        ValueError: ``rounds < 1`` or an unknown ``reference`` (before any session is built).
    """
    check_rounds(rounds, sessions, reference)
    # a file is opened once here, not once per round: building a session optimizes its graph
    live = {k: ort_session(v) if isinstance(v, (str, os.PathLike)) else v for k, v in sessions.items()}

    def timer(session) -> Callable[[], float]:
        return lambda: ort_latency(session, input_shape, warmup=warmup, iters=iters)["median_ms"]

    return interleaved_rounds({name: timer(s) for name, s in live.items()}, rounds, reference)


def export_onnx(
    model: nn.Module,
    input_shape: Sequence[int],
    out: str | os.PathLike,
    *,
    deployed: bool = False,
    opset: int | None = None,
    verify: bool = True,
    rtol: float = 1e-4,
    seed: int = 0,
    deploy_options: Mapping[str, Any] | None = None,
    metadata: Mapping[str, Any] | None = None,
) -> dict:
    """Write ``model`` to ONNX at ``out`` with a dynamic batch dimension, check it and verify it.

    Args:
        model: the model (dense or holding factorized layers); it is not modified (exported on the CPU
            in float32, eval mode).
        input_shape: ``B x C x H x W``; ``C, H, W`` are fixed in the file, the batch is dynamic. The
            verification batch (and, with ``deployed``, the deployment's timing) uses ``B``.
        out: the ``.onnx`` file to write (its folder is created). Weights over ~1.8 GB go to a side
            file ``<out>.data`` (the protobuf limit is 2 GiB).
        deployed: first replace every factorized layer by its fastest exact partition of merged factor
            convs, :func:`common.deploy.merge.deploy_model` with ``choose="latency"`` timed on the CPU
            (PyTorch timings stand in for ONNX Runtime's: both run the same convs).
        opset: ONNX opset; ``None`` = the exporter's current default.
        verify: run ONNX Runtime on a seeded random batch and compare with PyTorch eager.
        rtol: largest allowed ``max |ort - torch| / max |torch|`` (relative to the output's scale, so
            that logits near zero do not inflate it).
        seed: seed of the verification batch.
        deploy_options: extra :func:`common.deploy.merge.deploy_model` keywords (``threads``, ``warmup``,
            ``iters``, ``channels_last``, ``timing_cache``, ``choose``, ...); default ``device="cpu"``.
        metadata: stored in the file's ``metadata_props`` (non-string values as JSON), e.g. the
            preprocessing (``mean``, ``std``, ``input_size``) a consumer needs.

    Returns:
        ``path``, ``opset``, ``bytes`` (file plus side file), ``input_shape``, ``dynamic_batch``,
        ``external_data``, ``max_rel_error`` (``None`` without ``verify``), ``export_s`` and
        ``deployment`` (one :meth:`common.deploy.merge.LayerDeployment.to_dict` per factorized layer, or
        ``None`` when not deployed).

    Raises:
        ExportError: the exporter fails, the checker rejects the file, or ONNX Runtime's output
            differs by more than ``rtol``; the message names the file and the error, and the file is
            removed so that no unverified file is left at ``out``.
    """
    import onnx  # noqa: F401  (first: without it, fail before any work)

    out = Path(out)
    shape = tuple(int(s) for s in input_shape)
    if len(shape) != 4 or min(shape) < 1:
        raise ValueError(f"input_shape must be B x C x H x W with positive sizes, got {input_shape}")
    t0 = time.perf_counter()
    was_training = model.training
    on_cpu = all(t.device.type == "cpu" for t in (*model.parameters(), *model.buffers()))
    src = model.eval() if on_cpu else copy.deepcopy(model).cpu().eval()  # the caller's model stays put
    try:
        exported, deployment = _deployed(src, shape, deploy_options) if deployed else (src, None)
        external = _param_bytes(exported) > _EXTERNAL_DATA_BYTES
        _write_checked(exported, shape, out, opset=opset, seed=seed, external=external, metadata=metadata)
        err_rel = _verify(src, out, shape, seed, rtol) if verify else None
    finally:
        model.train(was_training)
    return _written(out, shape, external, err_rel, t0, deployment)


def _deployed(
    src: nn.Module, shape: tuple[int, ...], deploy_options: Mapping[str, Any] | None
) -> tuple[nn.Module, list]:
    """``src`` with every factorized layer in its fastest exact partition, timed on the CPU, and the
    deployment report (:func:`common.deploy.merge.deploy_model`, ``deploy_options`` over the defaults)."""
    options = {"choose": "latency", "device": "cpu", **(deploy_options or {})}
    exported, report = deploy_model(src, shape, **options)
    return exported.float().cpu().eval(), [r.to_dict() for r in report]


def _write_checked(
    exported: nn.Module,
    shape: tuple[int, ...],
    out: Path,
    *,
    opset: int | None,
    seed: int,
    external: bool,
    metadata: Mapping[str, Any] | None,
) -> None:
    """Export ``exported`` to ``out`` (dynamic batch), store ``metadata`` and run ``onnx.checker`` on the file.

    Raises:
        ExportError: the exporter fails or the checker rejects the file (the file is removed).
    """
    import onnx

    # The example batch is at least 2: torch.export specializes sizes 0 and 1, which would pin it.
    example = torch.randn((max(2, shape[0]), *shape[1:]), generator=torch.Generator().manual_seed(seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove(out)  # a stale side file would otherwise be taken for this export's
    try:
        torch.onnx.export(
            exported,
            (example,),
            str(out),
            dynamo=True,
            opset_version=opset,
            input_names=["input"],
            output_names=["output"],
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            external_data=external,
            verbose=False,
        )
    except Exception as err:
        _remove(out)
        raise ExportError(f"{out}: torch.onnx.export failed: {type(err).__name__}: {err}") from err
    if metadata:
        _set_metadata(out, metadata)
    try:
        onnx.checker.check_model(str(out), full_check=True)  # by path: works past 2 GiB too
    except Exception as err:
        _remove(out)
        raise ExportError(f"{out}: onnx.checker rejected the exported model (file removed): {err}") from err


def _verify(src: nn.Module, out: Path, shape: tuple[int, ...], seed: int, rtol: float) -> float:
    """``max |ort - torch| / max |torch|`` of the file ``out`` against ``src`` on a seeded batch of ``shape``.

    Raises:
        ExportError: another output shape, or a difference over ``rtol`` (the file is removed).
    """
    x = torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1))
    with torch.inference_mode():
        ref = src(x).float().numpy()  # the model as given: checks the deployment's exactness too
    got = _ort_run(ort_session(out), x.numpy())
    if got.shape != ref.shape:
        _remove(out)
        raise ExportError(f"{out}: ONNX Runtime output shape {got.shape} != PyTorch {ref.shape} (file removed)")
    err_rel = float(np.abs(got - ref).max() / max(float(np.abs(ref).max()), 1e-30))
    if not err_rel <= rtol:  # `not <=` also catches NaN
        _remove(out)
        raise ExportError(
            f"{out}: ONNX Runtime output differs from PyTorch eager by max|diff|/max|out| = {err_rel:.3g} "
            f"> rtol {rtol:g} on a seeded batch of shape {shape} (file removed)"
        )
    return err_rel


def _written(
    out: Path, shape: tuple[int, ...], external: bool, err_rel: float | None, t0: float, deployment: list | None
) -> dict:
    """:func:`export_onnx`'s report of the written file (``t0``: when the export started)."""
    import onnx

    written = onnx.load(str(out), load_external_data=False)
    dim0 = written.graph.input[0].type.tensor_type.shape.dim[0]
    return {
        "path": str(out),
        "opset": next(int(o.version) for o in written.opset_import if o.domain in ("", "ai.onnx")),
        "bytes": _file_bytes(out),
        "input_shape": list(shape),
        "dynamic_batch": bool(dim0.dim_param),
        "external_data": external,
        "max_rel_error": err_rel,
        "export_s": time.perf_counter() - t0,
        "deployment": deployment,
    }


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m common.deploy.export",
        description="Export a compressed-model artifact to ONNX, check it and verify it in ONNX Runtime.",
    )
    p.add_argument("artifact", help="compressed-model artifact (common.deploy.artifacts.save_artifact)")
    p.add_argument("--onnx", required=True, help="the .onnx file to write")
    p.add_argument("--deployed", action="store_true", help="merge factor convs where faster on this CPU first (exact)")
    p.add_argument("--batch", type=int, default=1, help="batch of the verification (and deployment timing)")
    p.add_argument("--threads", type=int, default=None, help="torch threads of the deployment timing")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default: the exporter's)")
    p.add_argument("--rtol", type=float, default=1e-4, help="largest max|ort-torch|/max|torch| accepted")
    p.add_argument("--no-verify", action="store_true", help="skip the ONNX Runtime comparison")
    return p.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """The command line (see the module docstring); returns the exit status."""
    a = _parse_args(argv)
    if a.batch < 1:
        print(f"error: --batch must be >= 1, got {a.batch}", file=sys.stderr)
        return 2
    path = Path(a.artifact)
    if not path.is_file():
        print(f"error: artifact not found: {path}", file=sys.stderr)
        return 2
    try:
        from common.deploy.artifacts import load_compressed, read_artifact

        meta = read_artifact(path)
        model = load_compressed(path, device="cpu")
        size = int(meta["input_size"])
        channels = len(meta["mean"]) if isinstance(meta.get("mean"), (list, tuple)) else 3
    except Exception as err:  # any failure to read it is the artifact's fault, named as such
        print(f"error: cannot load artifact {path}: {type(err).__name__}: {err}", file=sys.stderr)
        return 2
    metadata = {k: meta[k] for k in ("model", "num_classes", "input_size", "mean", "std") if k in meta}
    metadata["artifact"] = path.name
    metadata["deployed"] = a.deployed
    try:
        r = export_onnx(
            model,
            (a.batch, channels, size, size),
            a.onnx,
            deployed=a.deployed,
            opset=a.opset,
            verify=not a.no_verify,
            rtol=a.rtol,
            deploy_options={"threads": a.threads},
            metadata=metadata,
        )
    except ExportError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    err_txt = "not verified" if r["max_rel_error"] is None else f"ORT max rel. error {r['max_rel_error']:.2e}"
    forms = f", {len(r['deployment'])} factorized layers deployed" if r["deployment"] is not None else ""
    print(f"wrote {r['path']}: opset {r['opset']}, {r['bytes'] / 1e6:.1f} MB, dynamic batch, {err_txt}{forms}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

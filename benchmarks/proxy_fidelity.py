"""How well each search proxy ranks near-optimal plans by their test accuracy (a benchmark, not a test).

A converging search does not have to tell a good plan from a bad one (uniform random plans spread
over 20-35 pp of accuracy, so any proxy ranks them well); it has to tell apart plans that are close
to each other and to the optimum. So the plans here are small perturbations of the uniform plan at
the target: plan 0 is the uniform plan (level f0), plan i draws per-layer levels
``f0 * exp(sigma * N(0, 1))`` clipped to (0.05, 1] and is projected onto the same MACs budget
(:func:`common.space.project`, ±3 %); duplicates and plans outside the tolerance are redrawn.

For every plan it records each proxy's score and seconds (``--proxies``, ``name:images``: for ``kl``
the images are the BN-calibration/scoring train images, for ``top1`` the val images, calibrated on
256) and the *reference*: top-1 on the whole test split after exact BN recalibration on
``--final-calib-images`` augmented train images (plus the whole-val top-1 of that same model), as
``common.experiment`` calibrates its final models. Every image subset is drawn from ``--seed``, so a
``kl`` proxy on as many images as the reference scores the very model the reference tests. It
then prints Kendall τ and Spearman ρ of each proxy against test top-1, the test top-1 lost by
trusting each proxy's best plan, the seconds per candidate, the plans' test spread and the binomial
standard error of one test accuracy, and writes them as a markdown table next to the CSV.

One CSV row is appended (and fsynced) per plan, so an interrupted run resumes where it stopped; the
plan list is a function of the seed and settings, and a stored row whose plan differs is an error.

    python benchmarks/proxy_fidelity.py --model resnet18 --target 3 --plans 24 --threads 2
"""

from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Spinning OpenMP workers make the spectra's small SVDs far slower on shared cores (see the Makefile);
# must be set before torch loads OpenMP.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scipy.stats import kendalltau, spearmanr  # noqa: E402
from torch import nn  # noqa: E402

from common.data import DatasetSplits, load_dataset  # noqa: E402
from common.latency import cpu_name  # noqa: E402
from common.loader import make_loader  # noqa: E402
from common.models import build_model, load_baseline, load_checkpoint  # noqa: E402
from common.paths import CHECKPOINT_DIR, REPO  # noqa: E402
from common.proxy import PROXIES, ProxyEvaluator  # noqa: E402
from common.search import build_searcher  # noqa: E402
from common.space import SearchSpace, plan_key, project  # noqa: E402
from common.surgery import LayerPlan, SpectraCache, plan_to_dict  # noqa: E402
from common.train import evaluate  # noqa: E402

TOL = 0.03
LEVEL_RANGE = (0.05, 1.0)
TOP1_CALIB_IMAGES = 256  # the top1 proxy's BN calibration, as in the search's defaults
MAX_DRAWS_PER_PLAN = 50


@dataclass(frozen=True)
class ProxySpec:
    """One proxy setting: ``name`` in :data:`common.proxy.PROXIES` and its number of images."""

    name: str
    images: int

    @property
    def label(self) -> str:
        return f"{self.name}:{self.images}"

    @property
    def column(self) -> str:
        return f"{self.name}_{self.images}"


def parse_proxies(text: str) -> list[ProxySpec]:
    """``"kl:256,top1:1000"`` -> specs; raises ``ValueError`` on a malformed or repeated entry."""
    specs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, n = part.partition(":")
        if name not in PROXIES or not n.isdigit() or int(n) < 2:
            raise ValueError(f"--proxies entry {part!r}: expected NAME:IMAGES with NAME in {PROXIES} and IMAGES >= 2")
        specs.append(ProxySpec(name, int(n)))
    if not specs or len(set(specs)) != len(specs):
        raise ValueError(f"--proxies {text!r}: give at least one proxy, each once")
    return specs


def load_model(name: str, data: DatasetSplits, checkpoint: str | None, seed: int) -> nn.Module:
    """The dense model: ``checkpoint`` if given, else the shared CIFAR-10 baseline.

    On a dataset without a shared baseline (digits) and no checkpoint, a seeded random init is used:
    for smoke tests only, its accuracies mean nothing.
    """
    if checkpoint is not None:
        return load_checkpoint(build_model(name, num_classes=data.num_classes), checkpoint).float().eval()
    if data.name == "cifar10-jpeg":
        return load_baseline(name, CHECKPOINT_DIR)
    torch.manual_seed(seed)
    return build_model(name, num_classes=data.num_classes).float().eval()


def make_evaluator(
    model: nn.Module, data: DatasetSplits, spectra: SpectraCache, spec: ProxySpec, seed: int, device: str
) -> ProxyEvaluator:
    """The :class:`ProxyEvaluator` of one proxy setting (same seed, so same image subsets per size)."""
    calib, val = (spec.images, 1000) if spec.name == "kl" else (TOP1_CALIB_IMAGES, spec.images)
    ev = ProxyEvaluator(
        model,
        data,
        spectra,
        spec.name,
        calib_images=calib,
        val_images=val,
        device=device,
        seed=seed,
        channels_last=True,
    )
    if spec.name == "kl":
        ev.teacher_logits()  # a one-time cost: keep it out of the first plan's seconds
    return ev


def draw_plans(
    space: SearchSpace, uniform: Mapping[str, LayerPlan], f0: float, n: int, sigma: float, target: float, seed: int
) -> list[dict[str, LayerPlan]]:
    """The uniform plan, then ``n - 1`` distinct log-normal perturbations of its level on the budget.

    Plan i depends only on the draws before it, so a longer list starts with the shorter one.
    """
    rng = np.random.default_rng(seed)
    plans = [dict(uniform)]
    seen = {plan_key(uniform)}
    for _ in range(n * MAX_DRAWS_PER_PLAN):
        if len(plans) >= n:
            break
        f = np.clip(f0 * np.exp(sigma * rng.standard_normal(len(space.names))), *LEVEL_RANGE)
        plan, achieved = project(space, dict(zip(space.names, f.tolist())), target, "macs", TOL)
        key = plan_key(plan)
        if abs(achieved / target - 1) <= TOL and key not in seen:
            seen.add(key)
            plans.append(plan)
    if len(plans) < n:
        raise RuntimeError(
            f"only {len(plans)} distinct plans within ±{TOL:.0%} of {target}x after "
            f"{n * MAX_DRAWS_PER_PLAN} draws; raise --sigma or lower --plans"
        )
    return plans


def plan_json(plan: Mapping[str, LayerPlan]) -> str:
    """Compact, canonical JSON of a plan (the resume check compares these strings)."""
    return json.dumps(plan_to_dict(plan), separators=(",", ":"), sort_keys=True)


def columns(specs: Sequence[ProxySpec]) -> list[str]:
    cols = ["plan", "macs_factor", "plan_json"]
    for s in specs:
        cols += [s.column, f"{s.column}_seconds"]
    return cols + ["test_top1", "val_top1", "reference_seconds"]


def read_rows(path: Path, cols: Sequence[str]) -> list[dict]:
    """The rows already in ``path`` (none if it does not exist); drops a torn last line."""
    if not path.exists():
        return []
    raw = path.read_bytes()
    if raw and not raw.endswith(b"\n"):  # killed mid-write: the row was never complete
        keep = raw[: raw.rfind(b"\n") + 1]
        print(f"note: dropping an incomplete last line of {path}", flush=True)
        path.write_bytes(keep)
    with open(path, newline="") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is not None and list(reader.fieldnames) != list(cols):
            raise ValueError(
                f"{path} has columns {reader.fieldnames}, this run writes {list(cols)}: "
                "other --proxies; use another --out"
            )
        return list(reader)


def check_resumed(rows: Sequence[dict], plans: Sequence[Mapping[str, LayerPlan]], path: Path) -> set[int]:
    """Indices already measured; raises if a stored plan is not the one this run draws at that index."""
    done = set()
    for row in rows:
        i = int(row["plan"])
        if i < len(plans) and row["plan_json"] != plan_json(plans[i]):
            raise ValueError(
                f"{path}: stored plan {i} differs from the plan this run draws (other --model, "
                "--target, --sigma, --seed or checkpoint?); use another --out"
            )
        done.add(i)
    return done


def append_row(path: Path, cols: Sequence[str], row: Mapping) -> None:
    """Append one row durably (header first if the file is new): a crash loses at most this row."""
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=list(cols))
        if new:
            w.writeheader()
        w.writerow(row)
        fh.flush()
        os.fsync(fh.fileno())


def reference(ref: ProxyEvaluator, test_loader, plan: Mapping[str, LayerPlan]) -> dict:
    """Test and whole-val top-1 of ``plan`` after exact BN recalibration on ``ref``'s calibration images."""
    t = time.perf_counter()
    model = ref.build(plan)
    test = evaluate(model, test_loader, device=ref.device)["top1"]
    val = evaluate(model, ref.val, device=ref.device)["top1"]
    return {"test_top1": float(test), "val_top1": float(val), "reference_seconds": time.perf_counter() - t}


def evaluate_plan(
    index: int,
    plan: Mapping[str, LayerPlan],
    space: SearchSpace,
    evaluators: Mapping[ProxySpec, ProxyEvaluator],
    ref: ProxyEvaluator,
    test_loader,
) -> dict:
    """One CSV row: every proxy's score and seconds, and the reference accuracies."""
    row: dict = {"plan": index, "macs_factor": space.factor(plan, "macs"), "plan_json": plan_json(plan)}
    for spec, ev in evaluators.items():
        t = time.perf_counter()
        row[spec.column] = float(ev.score(plan))
        row[f"{spec.column}_seconds"] = time.perf_counter() - t
    return {**row, **reference(ref, test_loader, plan)}


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Kendall τ-b and Spearman ρ; NaN where undefined (fewer than 2 plans, or a constant column)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(kendalltau(x, y)[0]), float(spearmanr(x, y)[0])


def summarize(rows: Sequence[Mapping], specs: Sequence[ProxySpec], n_test: int) -> dict:
    """Rank agreement of each proxy (and of whole-val top-1) with test top-1, and the context figures."""
    test = np.array([float(r["test_top1"]) for r in rows])
    out: dict = {
        "plans": len(rows),
        "test_min": float(test.min()),
        "test_max": float(test.max()),
        "test_spread_pp": 100 * float(test.max() - test.min()),
        "test_se_pp": 100 * math.sqrt(test.mean() * (1 - test.mean()) / n_test),
        "proxies": {},
    }
    named = [(s.label, s.column, f"{s.column}_seconds") for s in specs]
    named.append(("val top-1, whole split (reference model)", "val_top1", None))
    for label, col, sec in named:
        score = np.array([float(r[col]) for r in rows])
        tau, rho = _correlations(score, test)
        best = int(np.argmax(score))  # the plan a search trusting this score would keep
        out["proxies"][label] = {
            "kendall_tau": tau,
            "spearman_rho": rho,
            "regret_pp": 100 * float(test.max() - test[best]),
            "seconds": float(np.mean([float(r[sec]) for r in rows])) if sec else math.nan,
        }
    return out


def report_lines(summary: Mapping) -> list[str]:
    """The figures as a markdown table (also printed)."""
    lines = [
        "| proxy | Kendall τ | Spearman ρ | regret of its best plan (pp) | s / candidate |",
        "|---|---:|---:|---:|---:|",
    ]
    for label, p in summary["proxies"].items():
        sec = "—" if math.isnan(p["seconds"]) else f"{p['seconds']:.1f}"
        lines.append(f"| {label} | {p['kendall_tau']:+.3f} | {p['spearman_rho']:+.3f} | {p['regret_pp']:.2f} | {sec} |")
    lines += [
        "",
        f"{summary['plans']} plans; test top-1 {100 * summary['test_min']:.2f}-"
        f"{100 * summary['test_max']:.2f} % (spread {summary['test_spread_pp']:.2f} pp); binomial "
        f"standard error of one test accuracy {summary['test_se_pp']:.2f} pp.",
    ]
    return lines


def write_markdown(path: Path, header: Sequence[str], lines: Sequence[str]) -> None:
    path.write_text("\n".join(["# Proxy fidelity on near-optimal plans", "", *header, "", *lines]) + "\n")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="resnet18")
    p.add_argument(
        "--dataset",
        default="cifar10-jpeg",
        choices=["cifar10-jpeg", "digits"],
        help="digits: embedded data, for smoke tests",
    )
    p.add_argument("--target", type=float, default=3.0, help="conv-MACs reduction of every plan")
    p.add_argument("--plans", type=int, default=24, help="plans, the uniform one included")
    p.add_argument("--sigma", type=float, default=0.25, help="log-normal perturbation of the per-layer levels")
    p.add_argument("--seed", type=int, default=0, help="draws the plans; picks every image subset")
    p.add_argument(
        "--proxies",
        default="kl:256,kl:1024,top1:1000",
        help="NAME:IMAGES,...: kl: calibration (= scoring) images; top1: val images (calibrated "
        f"on {TOP1_CALIB_IMAGES})",
    )
    p.add_argument("--final-calib-images", type=int, default=1024, help="BN calibration of the reference")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", default=None, help="CSV (default results/proxy_fidelity_<model>.csv); .md beside it")
    p.add_argument(
        "--checkpoint",
        default=None,
        help="dense model state_dict (default: the shared cifar10-jpeg baseline; on digits a "
        "seeded random init, for smoke tests only)",
    )
    a = p.parse_args(argv)
    if a.plans < 2:
        p.error("--plans must be at least 2 (rank correlations need two plans)")
    return a


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse_args(argv)
    specs = parse_proxies(a.proxies)
    torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else REPO / "results" / f"proxy_fidelity_{a.model}.csv"
    command = "python benchmarks/proxy_fidelity.py " + shlex.join(sys.argv[1:] if argv is None else list(argv))
    header = [
        f"`{command}`",
        "",
        f"{a.model} on {a.dataset}, {cpu_name()}, {a.threads} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; target {a.target:g}x conv MACs, "
        f"sigma {a.sigma:g}, seed {a.seed}; reference: test top-1 after BN recalibration on "
        f"{a.final_calib_images} train images.",
    ]
    print(header[-1], flush=True)

    data = load_dataset(a.dataset)
    model = load_model(a.model, data, a.checkpoint, a.seed)
    # The searcher gives the space, the spectra and the uniform plan; its own proxy only scores that plan once.
    searcher = build_searcher(model, data, calib_images=TOP1_CALIB_IMAGES, seed=a.seed, device=a.device)
    uniform = searcher.run("uniform", a.target, "macs")
    f0 = float(uniform.params["level"])
    plans = draw_plans(searcher.space, uniform.plan, f0, a.plans, a.sigma, a.target, a.seed)
    cols = columns(specs)
    done = check_resumed(read_rows(out, cols), plans, out)
    print(
        f"uniform level {f0:.4f} (x{uniform.macs_factor:.3f}); {len(plans)} plans, "
        f"{len(done & set(range(len(plans))))} already in {out}",
        flush=True,
    )

    todo = [i for i in range(len(plans)) if i not in done]
    if todo:
        evaluators = {s: make_evaluator(model, data, searcher.spectra, s, a.seed, a.device) for s in specs}
        ref = ProxyEvaluator(
            model,
            data,
            searcher.spectra,
            "top1",
            calib_images=a.final_calib_images,
            val_images=None,
            device=a.device,
            seed=a.seed,
            channels_last=True,
        )
        test_loader = make_loader(data, "test", 500, device=a.device, channels_last=True)
        for i in todo:
            row = evaluate_plan(i, plans[i], searcher.space, evaluators, ref, test_loader)
            append_row(out, cols, row)
            print(
                f"plan {i:3d} x{row['macs_factor']:.3f}  "
                + "  ".join(f"{s.label} {row[s.column]:.5g} ({row[s.column + '_seconds']:.1f}s)" for s in specs)
                + f"  test {row['test_top1']:.4f}  val {row['val_top1']:.4f}",
                flush=True,
            )

    by_index = {int(r["plan"]): r for r in read_rows(out, cols) if int(r["plan"]) < len(plans)}
    rows = [by_index[i] for i in sorted(by_index)]  # one row per plan even if two runs shared the file
    summary = summarize(rows, specs, len(data.test))
    lines = report_lines(summary)
    print("\n" + "\n".join(lines), flush=True)
    write_markdown(out.with_suffix(".md"), header, lines)
    return summary


if __name__ == "__main__":
    main()

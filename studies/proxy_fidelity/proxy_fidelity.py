"""How well each search proxy ranks near-optimal plans by their test accuracy (a benchmark, not a test).

A converging search does not have to tell a good plan from a bad one (uniform random plans spread
over 20-35 pp of accuracy, so any proxy ranks them well); it has to tell apart plans that are close
to each other and to the optimum. So the plans here are small perturbations of the uniform plan at
the target: plan 0 is the uniform plan (level f0), plan i draws per-layer levels
``f0 * exp(sigma * N(0, 1))`` clipped to (0.05, 1] and is projected onto the same MACs budget
(:func:`common.search.space.project`, ±3 %); duplicates and plans outside the tolerance are redrawn.

For every plan it records each proxy's score and seconds (``--proxies``, ``name:images``: for a
label-free proxy, ``logit_mse`` or ``kl``, the images are the BN-calibration/scoring train images, for
``top1`` the val images, calibrated on 256) and the *reference*: top-1 on the whole test split after exact BN recalibration on
``--final-calib-images`` augmented train images (plus the whole-val top-1 of that same model), as
``common.run.finals`` calibrates a run's final models. Every image subset is drawn from ``--seed``, so a
label-free proxy on as many images as the reference scores the very model the reference tests. It
then prints Kendall τ and Spearman ρ of each proxy against test top-1, the test top-1 lost by
trusting each proxy's best plan, the seconds per candidate, the plans' test spread and the binomial
standard error of one test accuracy, and writes them as a markdown table next to the CSV.

The CSV is rewritten (atomically, fsynced) after every plan, so an interrupted run resumes where it
stopped; the plan list is a function of the seed and settings, and a stored row whose plan differs is
an error. A run that asks for proxies the CSV lacks adds their columns and scores only them: the
stored references (the expensive part) are kept.

    python studies/proxy_fidelity/proxy_fidelity.py --model resnet18 --target 3 --plans 24 --threads 2
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import shlex
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

# Spinning OpenMP workers make the spectra's small SVDs far slower on shared cores (see the Makefile);
# must be set before torch loads OpenMP.
import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import numpy as np
import torch
from scipy.stats import kendalltau, spearmanr
from torch import nn

from common.data.datasets import load_dataset
from common.data.loader import make_loader
from common.data.splits import DatasetSplits
from common.decompose.surgery import LayerPlan, SpectraCache, plan_to_dict
from common.deploy.latency import cpu_name
from common.files import csv_header, drop_torn_line, read_csv_rows, write_csv_rows
from common.models import build_model, load_baseline, load_checkpoint
from common.paths import CHECKPOINT_DIR, REPO
from common.run.cli import add_config_options
from common.search.options import SearchConfig
from common.search.proxy import DIVERGENCE_PROXIES, PROXIES, ProxyEvaluator
from common.search.searcher import build_searcher
from common.search.space import SearchSpace, plan_key, project
from common.train.evaluate import evaluate

TOL = 0.03
LEVEL_RANGE = (0.05, 1.0)
TOP1_CALIB_IMAGES = 256  # the top1 proxy's BN calibration, as in the search's defaults
MAX_DRAWS_PER_PLAN = 50


@dataclass(frozen=True)
class ProxySpec:
    """One proxy setting: ``name`` in :data:`common.search.proxy.PROXIES`, its number of images and the seed
    that draws them (``None``: the run's ``--seed``, the images the reference is calibrated on)."""

    name: str
    images: int
    seed: int | None = None

    @property
    def label(self) -> str:
        return f"{self.name}:{self.images}" + ("" if self.seed is None else f"@{self.seed}")

    @property
    def column(self) -> str:
        return f"{self.name}_{self.images}" + ("" if self.seed is None else f"_s{self.seed}")


def parse_proxies(text: str) -> list[ProxySpec]:
    """``"kl:256,logit_mse:256@1,top1:1000"`` -> specs; raises ``ValueError`` on a malformed or repeated
    entry."""
    specs = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        name, _, rest = part.partition(":")
        n, at, seed = rest.partition("@")
        if name not in PROXIES or not n.isdigit() or int(n) < 2 or (at and not seed.isdigit()):
            raise ValueError(
                f"--proxies entry {part!r}: expected NAME:IMAGES[@SEED] with NAME in {PROXIES}, IMAGES >= 2"
            )
        specs.append(ProxySpec(name, int(n), int(seed) if at else None))
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
    """The :class:`ProxyEvaluator` of one proxy setting (its own seed if it has one, else ``seed``: the
    same image subsets per size as the reference)."""
    label_free = spec.name in DIVERGENCE_PROXIES
    calib, val = (spec.images, 1000) if label_free else (TOP1_CALIB_IMAGES, spec.images)
    ev = ProxyEvaluator(
        model,
        data,
        spectra,
        spec.name,
        calib_images=calib,
        val_images=val,
        device=device,
        seed=seed if spec.seed is None else spec.seed,
        channels_last=True,
    )
    if label_free:
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


HEAD = ["plan", "macs_factor", "plan_json"]
REFERENCE = ["test_top1", "val_top1", "reference_seconds"]


def columns(specs: Sequence[ProxySpec], stored: Sequence[str] = ()) -> list[str]:
    """The CSV's columns: the stored file's proxy columns, then those of ``specs`` it lacks."""
    proxy_cols = [c for c in stored if c not in HEAD + REFERENCE]
    for s in specs:
        proxy_cols += [c for c in (s.column, f"{s.column}_seconds") if c not in proxy_cols]
    return HEAD + proxy_cols + REFERENCE


def read_rows(path: Path) -> tuple[list[dict], list[str]]:
    """The rows already in ``path`` and its columns (none if it does not exist); drops a torn last line."""
    if drop_torn_line(path):  # killed mid-write (older, appending versions): never complete
        print(f"note: dropping an incomplete last line of {path}", flush=True)
    fields = csv_header(path)
    missing = [c for c in HEAD + REFERENCE if fields and c not in fields]
    if missing:
        raise ValueError(f"{path}: not a proxy-fidelity CSV (no column {missing[0]!r}); use another --out")
    return read_csv_rows(path), fields


def check_resumed(rows: Sequence[dict], plans: Sequence[Mapping[str, LayerPlan]], path: Path) -> dict[int, dict]:
    """The stored rows by plan index; raises if a stored plan is not the one this run draws at that index."""
    done = {}
    for row in rows:
        i = int(row["plan"])
        if i < len(plans) and row["plan_json"] != plan_json(plans[i]):
            raise ValueError(
                f"{path}: stored plan {i} differs from the plan this run draws (other --model, "
                "--target, --sigma, --seed or checkpoint?); use another --out"
            )
        done[i] = row
    return done


def write_rows(path: Path, cols: Sequence[str], rows: Sequence[Mapping]) -> None:
    """Replace ``path`` by ``rows`` (sorted by plan; a cell a row lacks is empty) atomically and durably
    (:func:`common.files.write_csv_rows`): a crash leaves the old file or the new one, never a torn one."""
    ordered = sorted(rows, key=lambda r: int(r["plan"]))
    write_csv_rows(path, [{c: r.get(c, "") for c in cols} for r in ordered], cols)


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
    ref: ProxyEvaluator | None,
    test_loader,
) -> dict:
    """A CSV row's new cells: each of ``evaluators``' score and seconds, and (``ref`` given) the
    reference accuracies."""
    row: dict = {"plan": index, "macs_factor": space.factor(plan, "macs"), "plan_json": plan_json(plan)}
    for spec, ev in evaluators.items():
        t = time.perf_counter()
        row[spec.column] = float(ev.score(plan))
        row[f"{spec.column}_seconds"] = time.perf_counter() - t
    return row if ref is None else {**row, **reference(ref, test_loader, plan)}


def missing_specs(row: Mapping | None, specs: Sequence[ProxySpec]) -> list[ProxySpec]:
    """The proxies ``row`` has no score of (all of them for a plan not measured yet)."""
    return list(specs) if row is None else [s for s in specs if not row.get(s.column)]


def _correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """Kendall τ-b and Spearman ρ; NaN where undefined (fewer than 2 plans, or a constant column)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    return float(kendalltau(x, y)[0]), float(spearmanr(x, y)[0])


def summarize(
    rows: Sequence[Mapping], specs: Sequence[ProxySpec], n_test: int, rerank: int = SearchConfig.rerank
) -> dict:
    """Rank agreement of each proxy (and of whole-val top-1) with test top-1 (and of each proxy with
    whole-val top-1, the reference a choice between proxies may be made on), and the context figures.

    ``rerank_regret_pp`` is the test top-1 lost by the searches' default selection: the proxy's
    ``rerank`` best plans, of which the one with the best whole-val top-1 is kept (ties: the better score).
    """
    test = np.array([float(r["test_top1"]) for r in rows])
    val = np.array([float(r["val_top1"]) for r in rows])
    out: dict = {
        "plans": len(rows),
        "test_min": float(test.min()),
        "test_max": float(test.max()),
        "test_spread_pp": 100 * float(test.max() - test.min()),
        "test_se_pp": 100 * math.sqrt(test.mean() * (1 - test.mean()) / n_test),
        "rerank": rerank,
        "proxies": {},
    }
    named = [(s.label, s.column, f"{s.column}_seconds") for s in specs]
    named.append(("val top-1, whole split (reference model)", "val_top1", None))
    for label, col, sec in named:
        score = np.array([float(r[col]) for r in rows])
        tau, rho = _correlations(score, test)
        tau_val = _correlations(score, val)[0] if sec else math.nan  # whole-val top-1 against itself: 1
        best = int(np.argmax(score))  # the plan a search trusting this score would keep
        top = np.argsort(-score, kind="stable")[:rerank]
        kept = int(top[np.argmax(val[top])])  # argmax: the first, i.e. best-scored, of equal val
        out["proxies"][label] = {
            "kendall_tau": tau,
            "spearman_rho": rho,
            "kendall_tau_val": tau_val,
            "regret_pp": 100 * float(test.max() - test[best]),
            "rerank_regret_pp": 100 * float(test.max() - test[kept]) if sec else math.nan,
            "seconds": float(np.mean([float(r[sec]) for r in rows])) if sec else math.nan,
        }
    return out


def report_lines(summary: Mapping) -> list[str]:
    """The figures as a markdown table (also printed)."""
    lines = [
        "| proxy | Kendall τ | Spearman ρ | Kendall τ vs whole-val top-1 | regret of its best plan (pp) | regret, "
        f"its {summary['rerank']} best re-ranked on whole val (pp) | s / candidate |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for label, p in summary["proxies"].items():
        sec = "—" if math.isnan(p["seconds"]) else f"{p['seconds']:.1f}"
        rr = "—" if math.isnan(p["rerank_regret_pp"]) else f"{p['rerank_regret_pp']:.2f}"
        tv = "—" if math.isnan(p["kendall_tau_val"]) else f"{p['kendall_tau_val']:+.3f}"
        lines.append(
            f"| {label} | {p['kendall_tau']:+.3f} | {p['spearman_rho']:+.3f} | {tv} | {p['regret_pp']:.2f} | {rr} "
            f"| {sec} |"
        )
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
    add_config_options(p, ["model"])
    p.add_argument(
        "--dataset",
        default="cifar10-jpeg",
        choices=["cifar10-jpeg", "digits"],
        help="digits: embedded data, for smoke tests",
    )
    p.add_argument("--target", type=float, default=3.0, help="conv-MACs reduction of every plan")
    p.add_argument("--plans", type=int, default=24, help="plans, the uniform one included")
    p.add_argument("--sigma", type=float, default=0.25, help="log-normal perturbation of the per-layer levels")
    add_config_options(p, ["seed"])
    p.add_argument(
        "--proxies",
        default="logit_mse:256,kl:256,logit_mse:1024,kl:1024,top1:1000",
        help="NAME:IMAGES[@SEED],...: logit_mse, kl: calibration (= scoring) images; top1: val images "
        f"(calibrated on {TOP1_CALIB_IMAGES}); @SEED draws them with another seed than --seed",
    )
    add_config_options(p, ["final_calib_images", "threads"], defaults={"final_calib_images": 1024, "threads": 2})
    p.add_argument("--device", default="cpu")  # a torch device: no "auto"
    p.add_argument(
        "--out", default=None, help="CSV (default results/proxy-fidelity/proxy_fidelity_<model>.csv); .md beside it"
    )
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


def _header(a: argparse.Namespace, argv: Sequence[str] | None) -> list[str]:
    """The report's command line and the settings line (also printed first)."""
    command = "python studies/proxy_fidelity/proxy_fidelity.py " + shlex.join(
        sys.argv[1:] if argv is None else list(argv)
    )
    return [
        f"`{command}`",
        "",
        f"{a.model} on {a.dataset}, {cpu_name()}, {a.threads} threads, torch {torch.__version__}, "
        f"{datetime.datetime.now().isoformat(timespec='seconds')}; target {a.target:g}x conv MACs, "
        f"sigma {a.sigma:g}, seed {a.seed}; reference: test top-1 after BN recalibration on "
        f"{a.final_calib_images} train images.",
    ]


def _reference(model: nn.Module, data: DatasetSplits, spectra: SpectraCache, a: argparse.Namespace) -> tuple:
    """The reference's evaluator (exact BN recalibration on ``--final-calib-images``, whole val split) and
    the test loader."""
    ref = ProxyEvaluator(
        model,
        data,
        spectra,
        "top1",
        calib_images=a.final_calib_images,
        val_images=None,
        device=a.device,
        seed=a.seed,
        channels_last=True,
    )
    return ref, make_loader(data, "test", 500, device=a.device, channels_last=True)


def _measure(
    a: argparse.Namespace,
    model: nn.Module,
    data: DatasetSplits,
    searcher,
    plans: Sequence[dict[str, LayerPlan]],
    specs: Sequence[ProxySpec],
    todo: Mapping[int, list[ProxySpec]],
    done: Mapping[int, dict],
    stored_rows: Sequence[dict],
    out: Path,
    cols: Sequence[str],
) -> None:
    """Score every plan of ``todo`` with its missing proxies (and measure the reference of a plan not in
    ``done``), rewriting ``out`` after each plan."""
    needed = {s for m in todo.values() for s in m}
    evaluators = {s: make_evaluator(model, data, searcher.spectra, s, a.seed, a.device) for s in specs if s in needed}
    ref, test_loader = None, None
    if any(i not in done for i in todo):  # plans without a reference yet
        ref, test_loader = _reference(model, data, searcher.spectra, a)
    rows_by_index = {int(r["plan"]): r for r in stored_rows}  # also keeps rows of a longer plan list
    for i, specs_i in todo.items():
        new = evaluate_plan(
            i,
            plans[i],
            searcher.space,
            {s: evaluators[s] for s in specs_i},
            None if i in done else ref,
            test_loader,
        )
        row = rows_by_index[i] = {**rows_by_index.get(i, {}), **new}
        write_rows(out, cols, list(rows_by_index.values()))
        print(
            f"plan {i:3d} x{row['macs_factor']:.3f}  "
            + "  ".join(f"{s.label} {row[s.column]:.5g} ({row[s.column + '_seconds']:.1f}s)" for s in specs_i)
            + f"  test {float(row['test_top1']):.4f}  val {float(row['val_top1']):.4f}",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> dict:
    a = parse_args(argv)
    specs = parse_proxies(a.proxies)
    torch.set_num_threads(a.threads)
    out = Path(a.out) if a.out else REPO / "results" / "proxy-fidelity" / f"proxy_fidelity_{a.model}.csv"
    header = _header(a, argv)
    print(header[-1], flush=True)

    data = load_dataset(a.dataset)
    model = load_model(a.model, data, a.checkpoint, a.seed)
    # The searcher gives the space, the spectra and the uniform plan; its own proxy only scores that plan once.
    searcher = build_searcher(model, data, calib_images=TOP1_CALIB_IMAGES, seed=a.seed, device=a.device)
    uniform = searcher.run("uniform", a.target, "macs")
    f0 = float(uniform.params["level"])
    plans = draw_plans(searcher.space, uniform.plan, f0, a.plans, a.sigma, a.target, a.seed)
    stored_rows, stored_cols = read_rows(out)
    cols = columns(specs, stored_cols)
    done = check_resumed(stored_rows, plans, out)
    todo = {i: missing_specs(done.get(i), specs) for i in range(len(plans))}
    todo = {i: m for i, m in todo.items() if m}
    print(
        f"uniform level {f0:.4f} (x{uniform.macs_factor:.3f}); {len(plans)} plans, "
        f"{sum(i in done for i in range(len(plans)))} already in {out}; "
        f"{sum(i not in done for i in todo)} to measure, {sum(i in done for i in todo)} to score with more proxies",
        flush=True,
    )
    if todo:
        _measure(a, model, data, searcher, plans, specs, todo, done, stored_rows, out, cols)

    by_index = {int(r["plan"]): r for r in read_rows(out)[0] if int(r["plan"]) < len(plans)}
    rows = [by_index[i] for i in sorted(by_index)]
    summary = summarize(rows, specs, len(data.test))
    lines = report_lines(summary)
    print("\n" + "\n".join(lines), flush=True)
    write_markdown(out.with_suffix(".md"), header, lines)
    return summary


if __name__ == "__main__":
    main()

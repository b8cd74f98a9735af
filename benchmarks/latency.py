"""Latency of every chosen plan against its dense baseline, on this machine's CPU or CUDA GPU.

Reads the JSON documents of results runs (``jsonify_logs.py``), rebuilds each compressed model from
its logged plan and times dense, as-factorized and deployed forwards, all with
``common.deploy.fastest_latency`` (deployed = every factorized layer in its fastest exact partition
of merged factor convs, timed in the same setting; the faster memory format per model). Latency does
not depend on the trained values, so ``--weights random`` (or a missing checkpoint) times the same
architecture with seeded random weights.

Settings: CPU ``cpu_b<B>`` (``--threads`` threads, fp32, contiguous vs channels_last); CUDA
``cuda_b256_bf16_graph`` (bf16, channels_last, CUDA-graph replay). Rows are appended to
``<out>/latency_<device>.csv`` as they are measured, and a re-run skips rows already there, so an
interrupted run continues; ``<out>/latency_<device>.md`` is rewritten from the whole CSV.

    python benchmarks/latency.py --json json/results --out results --device cpu --threads 2 --batches 1,64
    python benchmarks/latency.py --json json/results --out results --device cuda
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common.analysis import load_runs, markdown_table  # noqa: E402
from common.deploy import fastest_latency  # noqa: E402
from common.latency import cpu_name, interleaved_latency  # noqa: E402
from common.logs import records_of  # noqa: E402
from common.models import build_model, load_baseline  # noqa: E402
from common.paths import CHECKPOINT_DIR  # noqa: E402
from common.surgery import SpectraCache, apply_plan, plan_from_dict  # noqa: E402

KEY = ["model", "method", "decomposition", "target", "setting"]
MD_FLOATS = (
    "macs_factor",
    "deployed_macs_factor",
    "dense_ms",
    "factorized_ms",
    "deployed_ms",
    "speedup_factorized",
    "speedup",
)
MD_COLUMNS = [*KEY, *MD_FLOATS, "channels_last", "forms"]
MD_FORMATS = dict.fromkeys(MD_FLOATS, ".2f")


def _settings(device: str, batches: Sequence[int], threads: int) -> list[dict]:
    if device == "cuda":
        return [
            dict(
                setting="cuda_b256_bf16_graph",
                batch=256,
                device="cuda",
                dtype=torch.bfloat16,
                threads=None,
                cuda_graph=True,
                formats=(True,),
            )
        ]
    return [
        dict(
            setting=f"cpu_b{b}",
            batch=b,
            device="cpu",
            dtype=torch.float32,
            threads=threads,
            cuda_graph=False,
            formats=(False, True),
        )
        for b in batches
    ]


def _load(model_name: str, weights: str, checkpoint_dir: Path) -> tuple[torch.nn.Module, str]:
    if weights == "baseline" and (checkpoint_dir / f"{model_name}.pt").is_file():
        return load_baseline(model_name, checkpoint_dir), "baseline"
    torch.manual_seed(0)
    return build_model(model_name).eval(), "random"


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="json/results")
    p.add_argument("--out", default="results")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64", help="CPU batch sizes")
    p.add_argument("--targets", default="3", help="only plans at these targets")
    p.add_argument("--models", default=None, help="only these models (comma-separated)")
    p.add_argument("--weights", default="baseline", choices=["baseline", "random"])
    p.add_argument("--checkpoint-dir", default=str(CHECKPOINT_DIR))
    p.add_argument(
        "--iters",
        type=int,
        default=None,
        help="timed forwards (default: CUDA 50; CPU 10 at batch >= 20, 200/batch below)",
    )
    p.add_argument("--warmup", type=int, default=None, help="untimed forwards (default 3 CPU, 10 CUDA)")
    p.add_argument("--deploy-iters", type=int, default=3, help="timed forwards per partition of a layer")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the final dense/compressed timing")
    p.add_argument("--minutes", type=float, default=None, help="start no new row after this long")
    return p.parse_args(argv)


@dataclass
class Bench:
    """How this invocation times: device, settings, forward counts, time box and the shared timing cache."""

    device: str
    settings: list[dict]
    threads: int
    warmup: int
    iters: int | None
    deploy_iters: int
    rounds: int
    deadline: float | None
    timing_cache: dict = field(default_factory=dict)

    @classmethod
    def from_args(cls, a: argparse.Namespace) -> Bench:
        device = "cuda" if a.device == "cuda" or (a.device == "auto" and torch.cuda.is_available()) else "cpu"
        return cls(
            device=device,
            settings=_settings(device, [int(b) for b in a.batches.split(",")], a.threads),
            threads=a.threads,
            warmup=a.warmup if a.warmup is not None else (10 if device == "cuda" else 3),
            iters=a.iters,
            deploy_iters=a.deploy_iters,
            rounds=a.rounds,
            deadline=time.time() + 60 * a.minutes if a.minutes else None,
        )

    @property
    def device_name(self) -> str:
        return torch.cuda.get_device_name(0) if self.device == "cuda" else f"{cpu_name()}, {self.threads} threads"

    def iters_for(self, batch: int) -> int:  # small batches are fast and noisy: time more of them
        return self.iters or (50 if self.device == "cuda" else max(10, 200 // batch))

    def out_of_time(self) -> bool:
        return self.deadline is not None and time.time() > self.deadline

    def timed(self, model: torch.nn.Module, s: dict, deploy: str | None) -> dict:
        """:func:`fastest_latency` of ``model`` in setting ``s`` (``deploy=None``: as it is)."""
        iters = self.iters_for(s["batch"])
        return fastest_latency(
            model,
            (s["batch"], 3, 32, 32),
            device=s["device"],
            dtype=s["dtype"],
            return_model=True,
            threads=s["threads"],
            cuda_graph=s["cuda_graph"],
            formats=s["formats"],
            deploy=deploy,
            warmup=self.warmup,
            iters=iters,
            deploy_warmup=1,
            deploy_iters=max(self.deploy_iters, iters // 10),
            timing_cache=self.timing_cache,
        )


def _latest_plans(run: dict, targets: set[float]) -> dict:
    """``{(method, decomposition, target): plan record}``: the latest plan per configuration."""
    plans = {}
    for rec in records_of(run, "plan"):
        if float(rec["target"]) in targets:
            plans[(rec["method"], rec.get("decomposition", "ht2"), float(rec["target"]))] = rec
    return plans


def _row(bench: Bench, name: str, config: tuple, comp: torch.nn.Module, s: dict, d: dict, weights: str) -> dict:
    """One CSV row: pick ``comp``'s memory format (and deployment) first, then time the dense model, it as
    factorized and it deployed in alternation (``d``: the dense model's own :meth:`Bench.timed`)."""
    method, decomp, target = config
    dep = bench.timed(comp, s, "latency")
    fact = dep["factorized"]
    il = interleaved_latency(
        {"dense": d["model"], "factorized": fact["model"], "deployed": dep["model"]},
        (s["batch"], 3, 32, 32),
        rounds=bench.rounds,
        device=s["device"],
        dtype=s["dtype"],
        channels_last={
            "dense": d["channels_last"],
            "factorized": fact["channels_last"],
            "deployed": dep["channels_last"],
        },
        threads=s["threads"],
        cuda_graph=s["cuda_graph"],
        warmup=bench.warmup,
        iters=bench.iters_for(s["batch"]),
        reference="dense",
    )
    return {
        "model": name,
        "method": method,
        "decomposition": decomp,
        "target": target,
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
        "rounds": bench.rounds,
        "weights": weights,
        "device_name": bench.device_name,
        "torch": torch.__version__,
        "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
    }


def _time_run(bench: Bench, run: dict, a: argparse.Namespace, csv: Path, done_keys: set) -> None:
    """Time every plan of one run document not in ``done_keys`` yet, appending each row to ``csv``."""
    name = run["model"]
    if a.models and name not in set(a.models.split(",")):
        return
    targets = {float(t) for t in a.targets.split(",")}
    todo = [
        (k, rec, s)
        for k, rec in sorted(_latest_plans(run, targets).items())
        for s in bench.settings
        if (name, *k, s["setting"]) not in done_keys
    ]
    if not todo:
        return
    dense, weights = _load(name, a.weights, Path(a.checkpoint_dir))
    spectra = SpectraCache(dense)
    dense_ms: dict[str, dict] = {}
    for config, rec, s in todo:
        if bench.out_of_time():
            break
        if s["setting"] not in dense_ms:
            dense_ms[s["setting"]] = bench.timed(dense, s, None)
        row = _row(
            bench,
            name,
            config,
            apply_plan(dense, plan_from_dict(rec["plan"]), spectra),
            s,
            dense_ms[s["setting"]],
            weights,
        )
        pd.DataFrame([row]).to_csv(csv, mode="a", header=not csv.is_file(), index=False)
        print(
            f"{name} {row['method']} {row['decomposition']} x{row['target']:g} {s['setting']}: dense "
            f"{row['dense_ms']:.2f} ms, factorized {row['factorized_ms']:.2f} ms ({row['speedup_factorized']:.2f}x), "
            f"deployed {row['deployed_ms']:.2f} ms ({row['speedup']:.2f}x) [{row['forms']}]",
            flush=True,
        )


def _markdown(bench: Bench, df: pd.DataFrame, argv: Sequence[str]) -> str:
    header = (
        f"# {bench.device.upper()} latency vs dense\n\n`python benchmarks/latency.py {' '.join(argv)}` on "
        f"{bench.device_name}, torch {torch.__version__}, {_dt.date.today().isoformat()}. Median of "
        f"{bench.iters_for(1)} (batch 1) or {bench.iters_for(64)} (batch 64) forwards after {bench.warmup} "
        f"warm-up ones, in {bench.rounds} rounds that time dense, factorized and deployed in "
        "alternation (ms: median over rounds; speed-up: median of the per-round ratios, so that machine drift "
        "cancels). Memory format and deployment are chosen by separate timings first. *factorized*: the "
        "compressed model's chains of factor convs as they are; *deployed*: each factorized layer in the "
        "partition of merged adjacent factor convs that ran fastest here (exact: the same function), or the "
        "model as factorized when that was faster as a whole (`forms` = as factorized); "
        "`forms` counts layers per partition, e.g. `(1, 1, 1, 1)` = HT-2 as four convs, `(4,)` = merged "
        "back to one dense conv. *deployed MACs ×*: conv-MAC reduction of what actually runs.\n\n"
    )
    table = markdown_table(df, MD_COLUMNS, MD_FORMATS) if len(df) else "(no plans found)\n"
    return header + table + "\n"


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    a = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    bench = Bench.from_args(a)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    csv = out / f"latency_{bench.device}.csv"
    done = pd.read_csv(csv) if csv.is_file() else pd.DataFrame(columns=KEY)
    done_keys = {(r.model, r.method, r.decomposition, float(r.target), r.setting) for r in done.itertuples()}
    for run in load_runs(a.json):
        if bench.out_of_time():
            break
        _time_run(bench, run, a, csv, done_keys)
    if bench.out_of_time():
        print("time box reached; re-run the same command to continue", flush=True)
    df = pd.read_csv(csv) if csv.is_file() else pd.DataFrame()
    (out / f"latency_{bench.device}.md").write_text(_markdown(bench, df, argv))
    return df


if __name__ == "__main__":
    main()

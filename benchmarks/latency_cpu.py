"""CPU latency of every chosen plan against its dense baseline, on this machine.

Reads the JSON documents of results runs (``jsonify_logs.py``), rebuilds each compressed model from the
shared baseline and its logged plan (latency does not depend on the finetuned values), and times dense
and compressed forwards with ``common.latency.best_cpu_format`` (contiguous vs channels_last, the faster
reported) at each batch size with a fixed thread count. Writes ``<out>/latency_cpu.csv`` and ``.md``.

    python benchmarks/latency_cpu.py --json json/results --out results --threads 2 --batches 1,64
"""
from __future__ import annotations

import argparse
import datetime as _dt
import platform
import sys
from pathlib import Path
from typing import Sequence

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import pandas as pd  # noqa: E402
import torch  # noqa: E402

from common.analysis import load_runs, markdown_table  # noqa: E402
from common.latency import best_cpu_format  # noqa: E402
from common.models import load_baseline  # noqa: E402
from common.surgery import SpectraCache, apply_plan, plan_from_dict  # noqa: E402


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def main(argv: Sequence[str] | None = None) -> pd.DataFrame:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--json", default="json/results")
    p.add_argument("--out", default="results")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batches", default="1,64")
    p.add_argument("--targets", default="3", help="only plans at these targets")
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=5)
    a = p.parse_args(argv)
    batches = [int(b) for b in a.batches.split(",")]
    targets = {float(t) for t in a.targets.split(",")}
    rows = []
    for run in load_runs(a.json):
        model_name = run["model"]
        plans = [r for r in run["by_kind"].get("plan", []) if float(r["target"]) in targets]
        if not plans:
            continue
        dense = load_baseline(model_name)
        spectra = SpectraCache(dense)
        # Timed twice, keeping the faster: the first timing of a fresh model pays one-off
        # allocator and kernel-selection costs that warm-up alone does not always absorb.
        dense_ms = {}
        for b in batches:
            runs = [best_cpu_format(dense, (b, 3, 32, 32), threads=a.threads, warmup=a.warmup, iters=a.iters)
                    for _ in range(2)]
            dense_ms[b] = min(runs, key=lambda r: r["median_ms"])
        for rec in plans:
            comp = apply_plan(dense, plan_from_dict(rec["plan"]), spectra)
            for b in batches:
                r = best_cpu_format(comp, (b, 3, 32, 32), threads=a.threads, warmup=a.warmup, iters=a.iters)
                d = dense_ms[b]
                rows.append({"model": model_name, "method": rec["method"], "decomposition": rec.get("decomposition", "ht2"),
                             "target": rec["target"], "macs_factor": rec.get("macs_factor"), "batch": b,
                             "dense_ms": d["median_ms"], "dense_channels_last": d["channels_last"],
                             "ms": r["median_ms"], "channels_last": r["channels_last"],
                             "speedup": d["median_ms"] / r["median_ms"]})
                print(f"{model_name} {rec['method']} {rec.get('decomposition')} x{rec['target']:g} b{b}: "
                      f"{r['median_ms']:.2f} ms vs dense {d['median_ms']:.2f} ms -> {d['median_ms'] / r['median_ms']:.2f}x",
                      flush=True)
    df = pd.DataFrame(rows)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    df.to_csv(out / "latency_cpu.csv", index=False)
    header = (f"# CPU latency vs dense\n\n`python benchmarks/latency_cpu.py {' '.join(argv or sys.argv[1:])}` on "
              f"{cpu_name()}, {a.threads} threads, torch {torch.__version__}, "
              f"{_dt.date.today().isoformat()}. Median of {a.iters} forwards after {a.warmup} warm-up ones (dense: the faster of two such timings); the faster of "
              "contiguous and channels_last for each model.\n\n")
    if len(df):
        table = markdown_table(df, ["model", "method", "decomposition", "target", "macs_factor", "batch", "dense_ms",
                                    "ms", "speedup", "channels_last"],
                               {"macs_factor": ".2f", "dense_ms": ".2f", "ms": ".2f", "speedup": ".2f"})
    else:
        table = "(no plans found)\n"
    (out / "latency_cpu.md").write_text(header + table + "\n")
    return df


if __name__ == "__main__":
    main()

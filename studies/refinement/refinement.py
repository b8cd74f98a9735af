"""What the guided search's refinement adds: how often it improves on its starting plan, by the proxy and on test.

``guided`` (the default method) runs the rule-seeded policy on 70 % of its candidate budget and refines its
best candidate on the rest (:mod:`common.search.refine`); ``policy_seeded`` spends the whole budget on the
seeded policy. For every run of a results folder that has both at the same target and seed, this reads
from the run documents (``jsonify_logs.py``):

- the refinement's starting incumbent and its final one (their proxy scores; the plan record's
  ``params.refine``), how many moves it accepted, and whether the pick (val among the 3 best-scored
  candidates) is a refined plan;
- the test top-1 after BN recalibration of ``guided``'s and ``policy_seeded``'s finals, and their paired
  margin over seeds with its 95 % interval (:func:`common.analysis.paired_interval`, as the summaries).

It prints one table per model and target and writes the rows to ``<out>/refinement.csv``.

    python jsonify_logs.py results/cpu-mse --out json/cpu-mse
    python studies/refinement/refinement.py --json json/cpu-mse --out results/cpu-mse
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from common.analysis import load_runs, markdown_table, paired_interval
from common.run.documents import records_of

COLUMNS = (
    "model",
    "run_id",
    "target",
    "seed",
    "start_score",
    "final_score",
    "improved",
    "accepted",
    "picked_refined",
    "test_guided",
    "test_policy_seeded",
    "delta_pp",
)


def _latest(records: Sequence[dict], method: str) -> dict:
    """``{(target, seed): record}`` of ``method``'s HT-2 records, the last written per key."""
    out = {}
    for r in sorted(records, key=lambda r: r.get("seq", 0)):
        if r.get("method") == method and r.get("decomposition", "ht2") == "ht2":
            out[float(r["target"]), int(r.get("seed", 0))] = r
    return out


def run_rows(run: dict) -> list[dict]:
    """One row per (target, seed) where ``guided`` has a plan and both methods a final."""
    plans = _latest(records_of(run, "plan"), "guided")
    finals = {m: _latest(records_of(run, "final"), m) for m in ("guided", "policy_seeded")}
    refined = {
        (float(r["target"]), r.get("seed", 0), str(r["plan"]))
        for r in records_of(run, "candidate")
        if r.get("method") == "guided" and "refine_of" in r
    }
    rows = []
    for (target, seed), plan in sorted(plans.items()):
        info = plan.get("params", {}).get("refine") or {}
        g, p = finals["guided"].get((target, seed)), finals["policy_seeded"].get((target, seed))
        if not info.get("start") or g is None or p is None:
            continue
        rows.append(
            {
                "model": run.get("model"),
                "run_id": run.get("run_id"),
                "target": target,
                "seed": seed,
                "start_score": info["start"]["score"],
                "final_score": info["final"]["score"],
                "improved": info["final"]["score"] > info["start"]["score"],
                "accepted": len(info.get("accepted", [])),
                "picked_refined": (target, seed, str(plan["plan"])) in refined,
                "test_guided": g["test_top1_bn"],
                "test_policy_seeded": p["test_top1_bn"],
                "delta_pp": 100.0 * (g["test_top1_bn"] - p["test_top1_bn"]),
            }
        )
    return rows


def summary(df: pd.DataFrame) -> pd.DataFrame:
    """Per model and target: refinements that improved the proxy, picks that are refined plans, and the
    paired test margin of guided over policy_seeded with its 95 % interval over seeds."""
    out = []
    for (model, target), g in df.groupby(["model", "target"], sort=True):
        mean, low, high = paired_interval(g["delta_pp"].to_numpy())
        out.append(
            {
                "model": model,
                "target": target,
                "seeds": len(g),
                "proxy_improved": f"{int(g['improved'].sum())}/{len(g)}",
                "pick_refined": f"{int(g['picked_refined'].sum())}/{len(g)}",
                "guided_minus_policy_seeded_pp": mean,
                "ci_low": low,
                "ci_high": high,
            }
        )
    return pd.DataFrame(out)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--json", required=True, help="folder of a results folder's run documents")
    p.add_argument("--out", help="write refinement.csv here (default: print only)")
    a = p.parse_args(argv)
    rows = [row for run in load_runs(a.json) for row in run_rows(run)]
    if not rows:
        print(f"refinement: no run in {a.json} has guided and policy_seeded finals at one target and seed")
        return 1
    df = pd.DataFrame(rows, columns=list(COLUMNS))
    table = summary(df)
    print(
        markdown_table(
            table,
            list(table.columns),
            {"guided_minus_policy_seeded_pp": "+.2f", "ci_low": "+.2f", "ci_high": "+.2f", "target": "g"},
        )
    )
    if a.out:
        Path(a.out).mkdir(parents=True, exist_ok=True)
        df.to_csv(Path(a.out) / "refinement.csv", index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

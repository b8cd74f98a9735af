"""The finals' per-image test hits in the analysis: :func:`common.analysis.collect_hits` (from run documents
and from hits logs), and the interval over seeds and test images of :func:`common.analysis.rival_margins` and
:func:`common.analysis.policy_margins` (the one
``seed_image_margin`` gives, centred on the logged margin; missing hits leave it empty; hits that are not
their final's are refused by name); ``jsonify_logs`` naming a hits log's model from its header."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

import analyze_results
from common.analysis import (
    collect_hits,
    every_rival_verdict,
    is_hits_document,
    load_runs,
    policy_margins,
    rival_margins,
    seed_image_margin,
)
from common.analysis.summary import margins_section
from common.run.documents import jsonify
from common.run.logs import RunLog, pack_hits

N = 2000
RUN = "r1"


def _hits(rng: np.random.Generator, top1: float) -> np.ndarray:
    """``N`` hits with exactly ``round(top1 * N)`` right, in a random order."""
    h = np.zeros(N, dtype=bool)
    h[rng.choice(N, round(top1 * N), replace=False)] = True
    return h


def _frame_and_hits(seed: int = 0) -> tuple[pd.DataFrame, dict]:
    """Per-seed rows (policy and uniform, seeds 0-2, target 3, BN only) and their hits."""
    rng = np.random.default_rng(seed)
    accs = {"policy": [0.850, 0.856, 0.853], "uniform": [0.846, 0.847, 0.849]}
    rows, hits = [], {}
    for method, per_seed in accs.items():
        for s, acc in enumerate(per_seed):
            rows.append(
                {"model": "m", "run_id": RUN, "target": 3.0, "method": method, "decomposition": "ht2", "seed": s}
                | {"test_top1_bn": acc, "test_top1_ft": math.nan}
            )
            hits["m", RUN, method, 3.0, s, "bn"] = _hits(rng, acc)
    return pd.DataFrame(rows), hits


def test_rival_margins_carry_the_interval_over_seeds_and_images_where_hits_are_known():
    df, hits = _frame_and_hits()
    row = rival_margins(df, hits=hits).iloc[0]
    d = np.stack(
        [
            hits["m", RUN, "policy", 3.0, s, "bn"].astype(np.int8) - hits["m", RUN, "uniform", 3.0, s, "bn"]
            for s in range(3)
        ]
    )
    want = seed_image_margin(d)
    assert row["margin_bn"] == pytest.approx(want["margin"])  # hits of exactly the logged top-1: same centre
    assert (row["ci_low_both_bn"], row["ci_high_both_bn"]) == pytest.approx((want["ci_low_both"], want["ci_high_both"]))
    assert row["ci_high_both_bn"] - row["ci_low_both_bn"] >= row["ci_high_bn"] - row["ci_low_bn"] - 1e-9
    assert row["verdict_both_bn"] == want["verdict_both"] and row["floor_bn"] == pytest.approx(want["floor"])
    assert math.isnan(row["ci_low_both_ft"]) and row["verdict_both_ft"] is None  # nothing finetuned

    plain = rival_margins(df).iloc[0]
    assert math.isnan(plain["ci_low_both_bn"]) and plain["verdict_both_bn"] is None
    del hits["m", RUN, "uniform", 3.0, 2, "bn"]  # one paired final without hits: no such interval
    assert math.isnan(rival_margins(df, hits=hits).iloc[0]["ci_low_both_bn"])


def test_a_replicas_hits_give_the_width_and_the_log_the_centre():
    df, hits = _frame_and_hits()
    exact = rival_margins(df, hits=hits).iloc[0]
    h = hits["m", RUN, "policy", 3.0, 1, "bn"]
    h[np.flatnonzero(~h)[0]] = True  # a replica one image better than the logged model (0.05 pp of 2,000)
    row = rival_margins(df, hits=hits).iloc[0]
    assert row["margin_bn"] == exact["margin_bn"]
    mid = (row["ci_low_both_bn"] + row["ci_high_both_bn"]) / 2
    assert mid == pytest.approx(row["margin_bn"])
    d = np.stack(
        [hits["m", RUN, "policy", 3.0, s, "bn"] * 1 - hits["m", RUN, "uniform", 3.0, s, "bn"] for s in range(3)]
    )
    replica = seed_image_margin(d)  # the width is the replica hits'
    assert row["ci_high_both_bn"] - row["ci_low_both_bn"] == pytest.approx(
        replica["ci_high_both"] - replica["ci_low_both"]
    )
    h[np.flatnonzero(~h)[:10]] = True  # now 11 images (0.55 pp) off: another model's hits
    with pytest.raises(ValueError, match=r"run 'r1' \(m\): the test hits of policy seed 1 x3 \(bn\) give top-1"):
        rival_margins(df, hits=hits)


def test_the_best_rival_table_carries_the_seeds_and_images_interval_and_the_claim_read_from_it():
    df, hits = _frame_and_hits()
    rng = np.random.default_rng(1)
    energy = [0.830, 0.832, 0.829]  # far behind: the claim then turns on uniform alone
    rows = df[df["method"] == "uniform"].assign(method="energy", test_top1_bn=energy)
    df = pd.concat([df, rows], ignore_index=True)
    for s, acc in enumerate(energy):
        hits["m", RUN, "energy", 3.0, s, "bn"] = _hits(rng, acc)
    row = policy_margins(df, hits=hits).iloc[0]
    each = rival_margins(df, hits=hits).set_index("rival")
    assert row["best_rival_bn"] == "uniform"
    for f in ("ci_low_both", "ci_high_both", "verdict_both"):  # the best rival's row of the per-rival table
        assert row[f"{f}_bn"] == each.loc["uniform", f"{f}_bn"]
    assert row["every_rival_both_bn"] == every_rival_verdict(dict(each["verdict_both_bn"]))
    assert each.loc["energy", "verdict_both_bn"] == "policy ahead"
    section = "\n".join(margins_section(policy_margins(df, hits=hits)))
    cell = f"[{row['ci_low_both_bn']:+.2f}, {row['ci_high_both_bn']:+.2f}]"
    bn_table = section.split("### After BN recalibration (BN)")[1]
    assert "| 95 % CI over seeds and test images |" in bn_table and cell in bn_table
    assert f"| {row['every_rival_both_bn']} |" in section

    del hits["m", RUN, "energy", 3.0, 0, "bn"]  # one rival without hits: no claim on these intervals
    partial = policy_margins(df, hits=hits).iloc[0]
    assert partial["every_rival_both_bn"] is None and partial["ci_low_both_bn"] == row["ci_low_both_bn"]
    plain = policy_margins(df).iloc[0]
    assert math.isnan(plain["ci_low_both_bn"]) and plain["every_rival_both_bn"] is None
    assert "seeds and test images" not in "\n".join(margins_section(policy_margins(df)))


def _final(method: str, seed: int, acc: float, hits: np.ndarray | None) -> dict:
    rec = dict(method=method, decomposition="ht2", target=3.0, seed=seed, metric="macs")
    rec |= dict(test_top1_bn=acc, macs_factor=3.0, params_factor=3.0)
    if hits is not None:
        rec |= dict(test_images=N, test_hits_bn=pack_hits(hits))
    return rec


def test_hits_come_from_finals_and_from_a_hits_log_and_replicas_beyond_tolerance_are_left_out(tmp_path):
    rng = np.random.default_rng(3)
    results = tmp_path / "results" / "folder"
    run = RunLog(results / "logs", "alexnet", RUN)
    run.write("config", model="alexnet", dataset="d", metric="macs", methods=["policy", "uniform"], seed=0, seeds=[0])
    own = _hits(rng, 0.85)
    run.write("final", **_final("policy", 0, 0.85, own))  # logged with its hits
    run.write("final", **_final("uniform", 0, 0.84, None))  # an older final: hits re-measured below
    for model in ("alexnet", "vgg16"):  # two models' hits logs in one folder, named by their headers
        side = RunLog.at(results / f"image_hits_{model}.log", model, "image_noise")
        re_measured = _hits(rng, 0.84)
        for top1, logged, method in ((0.84, 0.84, "uniform"), (0.80, 0.84, "energy")):  # energy: 4 pp off
            side.write(
                "test_hits",
                of_run=RUN,
                method=method,
                seed=0,
                target=3.0,
                stage="bn",
                n=N,
                test_top1=top1,
                test_top1_logged=logged,
                hits=pack_hits(re_measured),
            )
        del side
    del run
    assert len(jsonify(results, tmp_path / "json")) == 3
    docs = load_runs(tmp_path / "json")
    assert sorted((d["model"], d["run_id"], is_hits_document(d)) for d in docs) == [
        ("alexnet", "image_noise", True),
        ("alexnet", RUN, False),
        ("vgg16", "image_noise", True),
    ]
    hits = collect_hits(docs)
    assert (hits["alexnet", RUN, "policy", 3.0, 0, "bn"] == own).all()
    assert ("alexnet", RUN, "uniform", 3.0, 0, "bn") in hits
    assert not any(k[2] == "energy" for k in hits)  # 4 pp off its final: a replica of another model

    # one final, two different sets of hits: refused, naming both logs
    clash = [d for d in docs if d["model"] == "alexnet" and is_hits_document(d)][0]
    for rec in clash["records"]:
        if rec.get("method") == "uniform":
            rec.update(method="policy", hits=pack_hits(~own), test_top1=0.85, test_top1_logged=0.85)
    with pytest.raises(ValueError, match=r"different test hits for policy seed 0 x3 \(bn\) of run 'r1'"):
        collect_hits(docs)


def test_analyze_results_reads_a_folder_with_a_hits_log(tmp_path, capsys):
    rng = np.random.default_rng(5)
    results = tmp_path / "results"
    run = RunLog(results / "logs", "alexnet", RUN)
    run.write(
        "config", model="alexnet", dataset="d", metric="macs", methods=["policy", "uniform"], seed=0, seeds=[0, 1]
    )
    accs = {("policy", 0): 0.85, ("policy", 1): 0.86, ("uniform", 0): 0.84, ("uniform", 1): 0.845}
    side = RunLog.at(results / "image_hits_alexnet.log", "alexnet", "image_noise")
    for (method, seed), acc in accs.items():
        run.write("final", **_final(method, seed, acc, None))
        side.write(
            "test_hits",
            of_run=RUN,
            method=method,
            seed=seed,
            target=3.0,
            n=N,  # no stage: the first hits logs measured BN finals only
            test_top1=acc,
            test_top1_logged=acc,
            hits=pack_hits(_hits(rng, acc)),
        )
    del run, side
    jsonify(results, tmp_path / "json")
    assert analyze_results.main(["--json", str(tmp_path / "json"), "--out", str(tmp_path / "out")]) == 0
    table = pd.read_csv(tmp_path / "out" / "policy_vs_rivals.csv")
    assert len(table) == 1 and table["ci_low_both_bn"].notna().all() and table["verdict_both_bn"].notna().all()
    md = (tmp_path / "out" / "summary.md").read_text()
    assert "BN: 95 % CI over seeds and test images" in md and "1 run(s)" in md  # the hits log is no run

"""Smoke test of studies/proxy_fidelity/proxy_fidelity.py on the embedded digits data: rows, values, resume."""

from __future__ import annotations

import csv
import math
import re

import pytest
import torch

from studies.proxy_fidelity import proxy_fidelity as pf


def _rows(path):
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def test_proxy_fidelity_smoke_and_resume(tmp_path, digits_checkpoint, monkeypatch, capsys):
    torch.set_num_threads(1)
    out = tmp_path / "pf.csv"
    # A fitted digits AlexNet (conftest): compression visibly costs accuracy, so the ranks are defined.
    argv = [
        "--dataset",
        "digits",
        "--model",
        "alexnet",
        "--checkpoint",
        str(digits_checkpoint("alexnet")),
        "--plans",
        "4",
        "--proxies",
        "kl:64,top1:100",
        "--final-calib-images",
        "64",
        "--threads",
        "1",
        "--out",
        str(out),
    ]
    summary = pf.main(argv)
    rows = _rows(out)
    assert [int(r["plan"]) for r in rows] == [0, 1, 2, 3]
    assert len({r["plan_json"] for r in rows}) == 4
    for r in rows:
        assert abs(float(r["macs_factor"]) / 3.0 - 1) <= 0.03
        for col in ("kl_64", "kl_64_seconds", "top1_100", "top1_100_seconds"):
            assert math.isfinite(float(r[col])), (col, r[col])
        assert float(r["kl_64"]) <= 0.0  # minus a KL divergence
        for col in ("top1_100", "test_top1", "val_top1"):
            assert 0.0 <= float(r[col]) <= 1.0
    printed = capsys.readouterr().out
    table = [line for line in printed.splitlines() if line.startswith("| kl:64") or line.startswith("| top1:100")]
    assert len(table) == 2
    for line in table:
        tau, rho = (float(v) for v in re.split(r"\s*\|\s*", line)[2:4])
        assert -1.0 <= tau <= 1.0 and -1.0 <= rho <= 1.0
    for p in summary["proxies"].values():
        assert -1.0 <= p["kendall_tau"] <= 1.0 and -1.0 <= p["spearman_rho"] <= 1.0
    assert out.with_suffix(".md").read_text().count("| kl:64 |") == 1

    # Resume: a second run finds every plan in the CSV, evaluates none and leaves the rows as they were.
    before = out.read_bytes()
    calls = []
    monkeypatch.setattr(pf, "evaluate_plan", lambda *a, **k: calls.append(a) or {})
    again = pf.main(argv)
    assert calls == [] and out.read_bytes() == before
    assert again["proxies"].keys() == summary["proxies"].keys()

    # More proxies: only their columns are scored; the stored references and scores stay as they were.
    monkeypatch.undo()
    monkeypatch.setattr(pf, "reference", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-measured")))
    wider = pf.main(
        [
            *argv[: argv.index("--proxies") + 1],
            "kl:64,top1:100,logit_mse:64,logit_mse:64@1",
            *argv[argv.index("--proxies") + 2 :],
        ]
    )
    new_rows = _rows(out)
    assert [int(r["plan"]) for r in new_rows] == [0, 1, 2, 3]
    for old, new in zip(rows, new_rows):
        assert {k: new[k] for k in old} == old
        assert float(new["logit_mse_64"]) <= 0.0 and float(new["logit_mse_64_s1"]) <= 0.0
        assert new["logit_mse_64"] != new["logit_mse_64_s1"]  # other calibration images
    assert {"logit_mse:64", "logit_mse:64@1", "kl:64"} <= wider["proxies"].keys()
    assert not list(tmp_path.glob("*.tmp"))


def test_parse_proxies_takes_a_seed_and_names_a_bad_entry():
    specs = pf.parse_proxies("logit_mse:256, kl:256@2")
    assert [(s.label, s.column) for s in specs] == [("logit_mse:256", "logit_mse_256"), ("kl:256@2", "kl_256_s2")]
    for bad in ("mse:256", "kl:1", "kl:256@x", "kl:64,kl:64"):
        with pytest.raises(ValueError, match="--proxies"):
            pf.parse_proxies(bad)


def test_summary_regrets_follow_the_scores_and_the_val_rerank():
    # plan: score (higher is better), whole-val and test top-1
    table = [(0.9, 0.80, 0.80), (0.8, 0.85, 0.90), (0.7, 0.84, 0.95), (0.1, 0.99, 0.70)]
    rows = [
        {"plan": i, "p_10": sc, "p_10_seconds": 1.0, "val_top1": v, "test_top1": t}
        for i, (sc, v, t) in enumerate(table)
    ]
    spec = pf.ProxySpec("p", 10)
    out = pf.summarize(rows, [spec], n_test=10000, rerank=3)["proxies"]
    # its favourite is plan 0 (test 0.80, 15 pp below the best); of its 3 best, val picks plan 1 (0.90)
    assert out["p:10"]["regret_pp"] == pytest.approx(15.0)
    assert out["p:10"]["rerank_regret_pp"] == pytest.approx(5.0)
    assert out["p:10"]["spearman_rho"] == pytest.approx(0.2)  # rank differences 2, 0, -2, 0
    # whole-val top-1 as a score: no re-rank of its own
    whole = out["val top-1, whole split (reference model)"]
    assert whole["regret_pp"] == pytest.approx(25.0) and math.isnan(whole["rerank_regret_pp"])
    assert math.isnan(whole["kendall_tau_val"]) and out["p:10"]["kendall_tau_val"] == pytest.approx(
        -2 / 3
    )  # 1 of 6 pairs agrees

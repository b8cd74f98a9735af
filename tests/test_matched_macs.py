"""benchmarks/matched_macs.py: plans moved onto the budget are re-evaluated exactly as the run's finals
were (the committed AlexNet CPU run log is the oracle), rows resume, margins come from rival_margins."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from benchmarks import matched_macs
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT

LOG = Path(__file__).resolve().parents[1] / "results/cpu-mse/logs/alexnet/results-alexnet-cpu.log"
HAVE_SHARED = CIFAR_JPEG_ROOT.is_dir() and (CHECKPOINT_DIR / "alexnet.pt").is_file() and LOG.is_file()


@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared (CIFAR-10 JPEG, AlexNet checkpoint) and the CPU log")
def test_matched_plans_reevaluated_as_the_run_did_and_rows_resume(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    out = tmp_path / "mm.csv"
    argv = ["--log", str(LOG), "--target", "5", "--seeds", "0", "--methods", "energy,uniform", "--out", str(out)]
    rows = {r["method"]: r for r in matched_macs.main([*argv, "--reevaluate-all"])}
    # energy's plan is within 0.5 % already: unchanged, and measured again it is the logged number exactly
    energy = rows["energy"]
    assert energy["steps"] == 0 and energy["reevaluated"] == "True"
    assert energy["factor_matched"] == energy["factor_logged"]
    assert float(energy["test_top1_matched"]) == pytest.approx(float(energy["test_top1_logged"]), abs=1e-9)
    # uniform's (x4.94) is moved onto the budget and measured
    uniform = rows["uniform"]
    assert uniform["steps"] > 0 and uniform["reevaluated"] == "True"
    assert abs(float(uniform["factor_logged"]) / 5 - 1) > 0.005 >= abs(float(uniform["factor_matched"]) / 5 - 1)
    assert 0.5 < float(uniform["test_top1_matched"]) < 1.0

    # a second run reads the rows back and measures nothing
    monkeypatch.setattr(matched_macs, "final_model", lambda *a, **k: pytest.fail("re-measured a stored row"))
    again = matched_macs.main(argv)
    assert [r["test_top1_matched"] for r in again] == [rows[m]["test_top1_matched"] for m in ("energy", "uniform")]
    with open(out, newline="") as fh:
        stored = list(csv.DictReader(fh))
    stored[1]["plan_json"] = "{}"
    with open(out, "w", newline="") as fh:
        w = csv.DictWriter(fh, matched_macs.FIELDS)
        w.writeheader()
        w.writerows(stored)
    with pytest.raises(SystemExit, match=r"\(uniform, seed 0\) is for another plan"):
        matched_macs.main(argv)


def _rows(policy: list[float], rival: list[float], shift: float, factors: tuple[float, float]) -> list[dict]:
    """Policy and uniform rows over seeds; every plan's moved number is its logged one + ``shift`` (pp / 100)."""
    rows = []
    for method, accs, factor in (("policy", policy, factors[0]), ("uniform", rival, factors[1])):
        for seed, acc in enumerate(accs):
            rows.append(
                {
                    "method": method,
                    "seed": str(seed),
                    "target": "5.0",
                    "factor_logged": str(factor),
                    "test_top1_logged": str(acc),
                    "test_top1_matched": str(acc + shift),
                }
            )
    return rows


def test_margins_pair_seeds_and_only_moves_against_the_policy_count_in_against():
    # both plans on the generous side: moving them costs each 2 pp; only the policy's move goes against it
    m = matched_macs.margins_table(_rows([0.80, 0.81, 0.82], [0.79, 0.80, 0.81], -0.02, (4.9, 4.9))).iloc[0]
    assert (m.policy, m.rival, m.n_logged, m.n_matched, m.n_against) == ("policy", "uniform", 3, 3, 3)
    assert m.margin_logged == pytest.approx(1.0) and m.verdict_logged == "policy ahead"
    assert m.margin_matched == pytest.approx(1.0)  # both moved: the same cost on each side
    assert m.margin_against == pytest.approx(-1.0) and m.verdict_against == "policy behind"
    # both on the strict side, moves gain 2 pp: only the rival's move counts against the policy
    m = matched_macs.margins_table(_rows([0.80, 0.81, 0.82], [0.79, 0.80, 0.81], 0.02, (5.1, 5.1))).iloc[0]
    assert m.margin_against == pytest.approx(-1.0) and m.margin_matched == pytest.approx(1.0)
    # a plan within the tolerance has matched == logged, so either side leaves it as it was
    m = matched_macs.margins_table(_rows([0.80, 0.81, 0.82], [0.79, 0.80, 0.81], 0.0, (4.99, 5.01))).iloc[0]
    assert m.margin_against == pytest.approx(1.0)


def test_bad_tolerance_and_a_log_without_config_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--tol 0.05"):
        matched_macs.main(["--log", str(LOG), "--tol", "0.05"])
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no config record"):
        matched_macs.main(["--log", str(empty), "--out", str(tmp_path / "x.csv")])

"""studies/additivity/additivity.py on the committed AlexNet CPU run log (logit MSE): it rebuilds the run's
proxy exactly, adds up single-layer losses, and resumes from its CSV."""

from __future__ import annotations

import csv

import pytest
import torch

from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT, REPO
from common.run.logs import parse_log
from studies.additivity import additivity
from tests.helpers import rewrite_csv

LOG = REPO / "results/cpu-mse/logs/alexnet/results-alexnet-cpu.log"
HAVE_SHARED = CIFAR_JPEG_ROOT.is_dir() and (CHECKPOINT_DIR / "alexnet.pt").is_file() and LOG.is_file()


@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared (CIFAR-10 JPEG, AlexNet checkpoint) and the CPU log")
def test_joint_loss_is_the_logged_score_and_rows_resume(tmp_path, capsys):
    torch.set_num_threads(2)
    out = tmp_path / "add.csv"
    argv = ["--log", str(LOG), "--seeds", "1", "--methods", "energy,policy", "--out", str(out)]
    rows = additivity.main(argv)
    assert [r["plan"] for r in rows] == ["energy", "policy", additivity.OPTIMUM]
    recs, _ = parse_log(LOG)
    # the run also holds 2x and 5x plans (one run per model, every budget): the benchmark reads 3x
    logged = {
        r["method"]: r["score"] for r in recs if r["kind"] == "plan" and r.get("seed") == 1 and r.get("target") == 3.0
    }
    for r in rows[:2]:  # AlexNet has no BN: the dense model scores 0, so joint = -score
        assert float(r["joint"]) == pytest.approx(-logged[r["plan"]], rel=1e-4)
        assert float(r["sum_alone"]) > 0 and float(r["ratio"]) == pytest.approx(
            float(r["joint"]) / float(r["sum_alone"]), rel=1e-3
        )
    assert float(rows[2]["model_sum"]) > 0 and rows[0]["model_sum"] == ""
    assert "mean over seeds 1" in capsys.readouterr().out
    with open(out, newline="") as fh:
        stored = list(csv.DictReader(fh))
    assert [r["plan"] for r in stored] == ["energy", "policy", additivity.OPTIMUM]

    # a second run reads the rows back; a stored row for another plan is refused, naming it
    assert [r["joint"] for r in additivity.main(argv)] == [r["joint"] for r in stored]
    stored[1]["plan_json"] = "{}"
    rewrite_csv(out, additivity.FIELDS, stored)
    with pytest.raises(SystemExit, match=r"\(seed 1, policy\) is for another plan"):
        additivity.main(argv)


def test_a_log_without_config_is_named(tmp_path):
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no config record"):
        additivity.main(["--log", str(empty), "--out", str(tmp_path / "x.csv")])


def test_checkpoint_option_reaches_the_replay(monkeypatch, tmp_path):
    def stop(cfg, data_root, checkpoint):
        raise SystemExit(f"replay with {checkpoint}")

    monkeypatch.setattr(additivity, "logged_inputs", stop)
    argv = ["--log", str(LOG), "--out", str(tmp_path / "a.csv"), "--checkpoint", "/here/alexnet.pt"]
    with pytest.raises(SystemExit, match="replay with /here/alexnet.pt"):
        additivity.main(argv)

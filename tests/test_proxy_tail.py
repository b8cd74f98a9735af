"""benchmarks/proxy_tail.py on the committed AlexNet CPU run log: it reproduces the logged proxy score."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from benchmarks import proxy_tail
from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT

LOG = Path(__file__).resolve().parents[1] / "results/cpu/logs/alexnet/results-alexnet-cpu.log"
HAVE_SHARED = CIFAR_JPEG_ROOT.is_dir() and (CHECKPOINT_DIR / "alexnet.pt").is_file() and LOG.is_file()


@pytest.mark.skipif(not HAVE_SHARED, reason="needs ../shared (CIFAR-10 JPEG, AlexNet checkpoint) and the CPU log")
def test_per_image_kl_averages_to_the_logged_proxy_score(capsys):
    torch.set_num_threads(2)
    config, plans = proxy_tail.read_plans(LOG, ["policy:1"])
    assert config["model"] == "alexnet" and config["calib_images"] == 256
    rows = proxy_tail.main(["--log", str(LOG), "--plans", "policy:1,uniform:0", "--seeds", "1", "--top", "2"])
    assert [(r["plan"], r["seed"]) for r in rows] == [("policy:1", 1), ("uniform:0", 1)]
    # seed 1's 256 images are the very ones the run scored seed 1's policy plan on
    assert rows[0]["mean"] == pytest.approx(-plans["policy:1"]["score"], rel=1e-4)
    for r in rows:
        assert 0 <= r["median"] <= r["mean"] <= r["max"] and 0 < r["top_share"] <= 1
        assert r["mean_without_top"] <= r["mean"]
    assert "top-2 share" in capsys.readouterr().out


def test_a_missing_plan_or_a_bad_item_is_named(tmp_path):
    if not LOG.is_file():
        pytest.skip("committed CPU log absent")
    with pytest.raises(ValueError, match="no HT-2 plan record of method 'greedy' at seed 0"):
        proxy_tail.read_plans(LOG, ["greedy:0"])
    with pytest.raises(ValueError, match="'energy' is not method:seed"):
        proxy_tail.read_plans(LOG, ["energy"])
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(ValueError, match="no config record"):
        proxy_tail.read_plans(empty, ["energy:0"])

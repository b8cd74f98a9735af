"""studies/proxy_tail/proxy_tail.py on the committed AlexNet CPU run log: it reproduces the logged proxy score."""

from __future__ import annotations

import pytest
import torch

from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT, REPO
from studies.proxy_tail import proxy_tail

LOG = REPO / "results/cpu/logs/alexnet/results-alexnet-cpu.log"
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


def test_a_log_of_several_targets_needs_one_named(tmp_path):
    log = tmp_path / "two.log"
    lines = ['{"kind":"config","model":"alexnet","seq":0}']
    lines += [
        f'{{"kind":"plan","method":"energy","seed":0,"target":{t},"plan":{{}},"seq":{i}}}' for i, t in ((1, 2), (2, 3))
    ]
    log.write_text(
        "".join(f"2026-01-01T00:00:00.000Z {'CONFIG' if i == 0 else 'PLAN'} x @@ {x}\n" for i, x in enumerate(lines))
    )
    with pytest.raises(ValueError, match=r"energy:0 has plans at targets \[2\.0, 3\.0\]; name one with --target"):
        proxy_tail.read_plans(log, ["energy:0"])
    _, plans = proxy_tail.read_plans(log, ["energy:0"], target=3)
    assert plans["energy:0"]["seq"] == 2
    with pytest.raises(ValueError, match="at seed 0 at target 5"):
        proxy_tail.read_plans(log, ["energy:0"], target=5)

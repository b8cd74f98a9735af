"""Margins over seeds *and* test images: :func:`common.analysis.seed_image_interval` (its coverage on a
simulated crossed design, its one-seed case, its refusals), per-image hits from ``evaluate`` and in the
logs, and ``studies/image_noise/image_noise.py`` on a digits run: it reads the logged hits, and for a log from
before they were logged it re-measures them image for image, resumes without evaluating, and refuses a
stored record for another plan or a model that is not the run's."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import analyze_results
from common.analysis import (
    design_se,
    detectable_margin,
    images_needed,
    paired_interval,
    seed_image_interval,
    variance_components,
)
from common.data.loader import make_loader
from common.run.documents import jsonify
from common.run.experiment import run_experiment
from common.run.logs import final_records, pack_hits, parse_log, unpack_hits
from common.train.evaluate import evaluate
from studies.image_noise import image_noise
from tests.test_experiment import config, log_file


def _crossed(rng: np.random.Generator, seeds: int, images: int, seed_sd: float) -> np.ndarray:
    """Policy-minus-rival hits with an image effect (2 % of the images one side wins 70 % of the time, 2 % the
    other) and a seed effect (a seed's share, mean 1 % and sd ``seed_sd``, of the other images goes to the
    policy, or to the rival when negative). The true mean is 0.96 %."""
    kind = rng.choice(3, size=images, p=[0.02, 0.02, 0.96])
    u = rng.random((seeds, images))
    d = np.where((kind == 0) & (u < 0.7), 1, 0) - np.where((kind == 1) & (u < 0.7), 1, 0)
    share = 0.01 + seed_sd * rng.standard_normal(seeds)
    r = rng.random((seeds, images))
    free = (kind == 2)[None, :]
    return d + (free & (r < np.clip(share, 0, None)[:, None])) - (free & (r < np.clip(-share, 0, None)[:, None]))


@pytest.mark.parametrize("seed_sd, seeds_only_covers", [(0.001, False), (0.01, True)])
def test_the_interval_covers_over_new_seeds_and_images(seed_sd, seeds_only_covers):
    """Where the images dominate the noise, the seed-only interval misses the true margin far more often than
    5 %; where the seeds dominate, the two agree. The interval over both covers at about 95 % either way."""
    rng = np.random.default_rng(7)
    both = seeds_only = 0
    reps = 300
    for _ in range(reps):
        d = _crossed(rng, 3, 4000, seed_sd)
        r = seed_image_interval(d)
        both += r["low"] <= 0.96 <= r["high"]
        _, low, high = paired_interval(100 * d.mean(axis=1))
        seeds_only += low <= 0.96 <= high
        assert r["mean"] == pytest.approx(100 * d.mean()) and r["high"] - r["low"] >= high - low - 1e-9
    assert 0.91 <= both / reps <= 0.99  # nominal 95 %
    assert (seeds_only / reps > 0.91) == seeds_only_covers


def test_one_seed_is_the_paired_proportion_interval_over_images():
    d = np.zeros((1, 1000))
    d[0, :30], d[0, 30:40] = 1, -1
    r = seed_image_interval(d)
    se = 100 * math.sqrt(d[0].var(ddof=1) / 1000)
    assert r["mean"] == pytest.approx(2.0) and r["se"] == pytest.approx(se) and r["df"] == pytest.approx(999)
    assert r["low"] == pytest.approx(2.0 - 1.9623 * se, abs=1e-3) and r["var_seed"] == 0


def test_seed_spread_alone_is_never_shrunk_and_no_spread_gives_no_interval():
    # every image moves with the seed: no image effect, the seeds' spread is all there is
    d = np.zeros((3, 500))
    d[0, :5], d[2, :5] = 1, -1
    r = seed_image_interval(d)
    _, low, high = paired_interval(100 * d.mean(axis=1))
    assert r["se"] >= 100 * d.mean(axis=1).std(ddof=1) / math.sqrt(3) - 1e-12
    assert r["high"] - r["low"] >= (high - low) - 1e-9
    tied = seed_image_interval(np.zeros((3, 100)))
    assert tied["mean"] == 0 and math.isnan(tied["low"]) and math.isnan(tied["high"])


@pytest.mark.parametrize(
    "bad, phrase",
    [(np.zeros(5), "seeds x images"), (np.zeros((2, 1)), "seeds x images"), (np.full((2, 3), 2), "-1, 0 or 1")],
)
def test_bad_differences_are_refused_naming_the_problem(bad, phrase):
    with pytest.raises(ValueError, match=phrase):
        seed_image_interval(bad)


@given(st.lists(st.booleans(), min_size=1, max_size=40))
@settings(max_examples=50, deadline=None)
def test_hits_pack_and_unpack_losslessly(bits):
    hits = np.array(bits, dtype=bool)
    assert (unpack_hits(pack_hits(hits), hits.size) == hits).all()
    with pytest.raises(ValueError, match="bytes of hits"):
        unpack_hits(pack_hits(hits) + "00", hits.size)


def test_per_image_hits_average_to_top1(digits):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 10))
    loader = make_loader(digits, "test", 100)
    ev = evaluate(model, loader, "cpu", per_image=True)
    assert ev["correct"].shape == (ev["n"],) and ev["correct"].dtype == bool
    assert ev["correct"].mean() == pytest.approx(ev["top1"], abs=1e-12)
    assert "correct" not in evaluate(model, loader, "cpu")


@pytest.fixture(scope="module")
def run_log(tmp_path_factory, digits_checkpoint):
    cfg = config(
        tmp_path_factory.mktemp("logs"),
        digits_checkpoint("alexnet"),
        "noise",
        methods=("uniform", "energy", "policy"),
        n_seeds=2,
        final_calib_images=64,
        finetune_epochs=1,
        finetune_max_images=400,  # enough steps that some finals keep the finetuned epoch
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the replays below run at one thread: a finetuning is reproduced at the run's count
    try:
        run_experiment(cfg)
    finally:
        torch.set_num_threads(threads)
    return log_file(cfg)


def _margins_are_the_logged_ones(rows: list[dict], finals: dict, stage: str = "bn") -> None:
    assert [(r["policy"], r["rival"], r["n_seeds"], r["stage"]) for r in rows] == [
        ("policy", "uniform", 2, stage),
        ("policy", "energy", 2, stage),
    ]
    col = f"test_top1_{stage}"
    for r in rows:
        logged = [100 * (finals["policy", s, 3.0][col] - finals[r["rival"], s, 3.0][col]) for s in (0, 1)]
        assert r["margin"] == pytest.approx(np.mean(logged))
        assert (r["ci_low_seed"], r["ci_high_seed"]) == pytest.approx(paired_interval(logged)[1:], nan_ok=True)


def test_logged_hits_are_read_and_give_every_rivals_margin(run_log, tmp_path, monkeypatch):
    finals = final_records(parse_log(run_log)[0])
    monkeypatch.setattr(image_noise, "final_model", lambda *a, **k: pytest.fail("re-measured a logged plan"))
    csv = tmp_path / "margins.csv"
    rows = image_noise.main(["--log", str(run_log), "--out", str(tmp_path / "h.log"), "--csv", str(csv)])
    _margins_are_the_logged_ones(rows, finals)
    assert not (tmp_path / "h.log").exists()  # nothing measured, nothing kept
    table = pd.read_csv(csv)
    assert list(table.columns) == image_noise.COLUMNS and list(table["stage"]) == ["bn", "bn"]
    monkeypatch.setattr(image_noise, "finetune_best", lambda *a, **k: pytest.fail("finetuned a logged plan"))
    ft = image_noise.main(["--log", str(run_log), "--stage", "ft", "--out", str(tmp_path / "h.log"), "--csv", str(csv)])
    _margins_are_the_logged_ones(ft, finals, "ft")
    assert list(pd.read_csv(csv)["stage"]) == ["bn", "bn", "ft", "ft"]
    unfinetuned = tmp_path / "bn_only.log"
    unfinetuned.write_text(run_log.read_text().replace('"test_top1_ft":', '"was_ft":'))
    with pytest.raises(SystemExit, match=r"no test_top1_ft at x3 for .*policy seed 0"):
        image_noise.main(["--log", str(unfinetuned), "--stage", "ft", "--csv", str(csv)])


def test_an_older_log_is_re_measured_image_for_image_and_resumes(run_log, tmp_path, monkeypatch):
    torch.set_num_threads(1)
    finals = final_records(parse_log(run_log)[0])
    old = tmp_path / "old" / "logs" / "alexnet" / "old.log"  # a run log from before finals carried hits
    old.parent.mkdir(parents=True)
    lines = []
    for line in run_log.read_text().splitlines(keepends=True):
        if '"kind":"final"' in line:
            human, record = line.split(" @@ ", 1)
            rec = json.loads(record)
            rec.pop("test_hits_bn"), rec.pop("test_hits_ft"), rec.pop("test_images")
            line = f"{human} @@ {json.dumps(rec, separators=(',', ':'))}\n"
        lines.append(line)
    old.write_text("".join(lines))
    csv = tmp_path / "old" / "image_margins_alexnet.csv"
    argv = ["--log", str(old), "--threads", "1"]
    rows = image_noise.main(argv)
    _margins_are_the_logged_ones(rows, finals)
    out = tmp_path / "old" / "image_hits_alexnet.log"  # the defaults: beside the run's results
    stored, _ = parse_log(out)
    assert len(stored) == 6
    for rec in stored:  # the very hits the run logged, image by image
        logged = finals[rec["method"], rec["seed"], 3.0]
        assert (unpack_hits(rec["hits"], rec["n"]) == unpack_hits(logged["test_hits_bn"], logged["test_images"])).all()

    # finetuned again with the run's recipe and seed: the run's finetuned models, image for image
    assert any(f["finetune_selected_epoch"] == 1 for f in finals.values()), [
        f["finetune_selected_epoch"] for f in finals.values()
    ]
    ft_argv = [*argv, "--stage", "ft"]
    rows_ft = image_noise.main(ft_argv)
    _margins_are_the_logged_ones(rows_ft, finals, "ft")
    stored, _ = parse_log(out)
    assert len(stored) == 12 and sorted({r.get("stage", "bn") for r in stored}) == ["bn", "ft"]
    for rec in (r for r in stored if r.get("stage") == "ft"):
        logged = finals[rec["method"], rec["seed"], 3.0]
        assert rec["finetune_selected_epoch"] == logged["finetune_selected_epoch"]
        assert (unpack_hits(rec["hits"], rec["n"]) == unpack_hits(logged["test_hits_ft"], logged["test_images"])).all()

    # resumed: read back, nothing evaluated; another target's rows in the CSV stay
    monkeypatch.setattr(image_noise, "final_model", lambda *a, **k: pytest.fail("re-measured a stored plan"))
    table = pd.read_csv(csv)
    table[table["stage"] == "bn"].assign(target=5.0).to_csv(csv, index=False)
    assert pd.DataFrame(image_noise.main(argv)).equals(pd.DataFrame(rows))
    assert pd.DataFrame(image_noise.main(ft_argv)).equals(pd.DataFrame(rows_ft))
    assert sorted(zip(pd.read_csv(csv)["target"], pd.read_csv(csv)["stage"])) == [
        (3.0, "bn"),
        (3.0, "bn"),
        (3.0, "ft"),
        (3.0, "ft"),
        (5.0, "bn"),
        (5.0, "bn"),
    ]

    # the analysis reads the same hits back from the folder (run log + hits log): the same intervals
    jsonify(tmp_path / "old", tmp_path / "json")
    assert analyze_results.main(["--json", str(tmp_path / "json"), "--out", str(tmp_path / "analysis")]) == 0
    folded = pd.read_csv(tmp_path / "analysis" / "policy_vs_rivals.csv").set_index("rival")
    for r in (*rows, *rows_ft):
        st = r["stage"]
        got = folded.loc[r["rival"], [f"margin_{st}", f"ci_low_both_{st}", f"ci_high_both_{st}", f"floor_{st}"]]
        assert list(got) == pytest.approx([r["margin"], r["ci_low_both"], r["ci_high_both"], r["floor"]])
        assert folded.loc[r["rival"], f"verdict_both_{st}"] == r["verdict_both"]

    lines = out.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if '"method":"energy"' in line)
    lines[i] = lines[i].replace('"ranks":[', '"ranks":[1,', 1)
    out.write_text("".join(lines))
    with pytest.raises(SystemExit, match=r"energy seed \d x3 \(bn\) is for another plan"):
        image_noise.main(argv)


def test_a_model_that_is_not_the_runs_is_refused(run_log, tmp_path, monkeypatch):
    old = tmp_path / "old.log"
    old.write_text(
        run_log.read_text().replace('"test_hits_bn":', '"was_hits":').replace('"test_hits_ft":', '"was_ft":')
    )
    real = image_noise.evaluate_splits

    def off(*a, **k):
        ev = real(*a, **k)
        ev["test"]["top1"] += 0.01
        return ev

    monkeypatch.setattr(image_noise, "evaluate_splits", off)
    argv = ["--log", str(old), "--methods", "energy", "--seeds", "0", "--out", str(tmp_path / "h.log")]
    with pytest.raises(SystemExit, match=r"energy seed 0 x3 test top-1 \(BN\): re-measured .* is not the logged"):
        image_noise.main([*argv, "--csv", str(tmp_path / "m.csv")])
    monkeypatch.setattr(image_noise, "evaluate_splits", real)
    ft_argv = [*argv, "--stage", "ft", "--threads", "1", "--csv", str(tmp_path / "m.csv")]
    real_ft = image_noise.finetune_best

    monkeypatch.setattr(
        image_noise, "finetune_best", lambda *a, **k: real_ft(*a, **k) | {"finetune_selected_epoch": 7.0}
    )
    with pytest.raises(SystemExit, match=r"energy seed 0 x3: the replayed finetuning keeps epoch 7, the run kept"):
        image_noise.main(ft_argv)
    monkeypatch.setattr(image_noise, "finetune_best", lambda *a, **k: real_ft(*a, **k) | {"test_top1_ft": 2.0})
    with pytest.raises(SystemExit, match=r"energy seed 0 x3 test top-1 \(FT\): re-measured 2\.0000"):
        image_noise.main(ft_argv)
    with pytest.raises(SystemExit, match="no HT-2 final with a plan at target 7"):
        image_noise.main([*argv, "--target", "7"])
    fresh = [*argv[:-1], str(tmp_path / "fresh.log"), "--csv", str(tmp_path / "m.csv")]  # nothing stored yet
    with pytest.raises(SystemExit, match=r"not found: .*nowhere\.pt \(a log from another machine: --checkpoint"):
        image_noise.main([*fresh, "--checkpoint", str(tmp_path / "nowhere.pt")])


def test_components_give_the_intervals_standard_error_and_project_it():
    rng = np.random.default_rng(11)
    d = _crossed(rng, 3, 4000, 0.01)  # a seed effect large enough to be estimated above 0
    c = variance_components(d)
    assert all(v > 0 for v in c.values())
    assert design_se(c, 3, 4000) == pytest.approx(seed_image_interval(d)["se"], rel=1e-9)
    assert design_se(c, math.inf, 4000) < design_se(c, 3, 4000) < design_se(c, 3, 1000)
    one = variance_components(d[:1])
    assert one["seed"] == one["resid"] == 0 and design_se(one, 1, 4000) == pytest.approx(
        seed_image_interval(d[:1])["se"], rel=1e-9
    )


def test_images_needed_gives_the_promised_power():
    """A margin of 0.96 pp measured on as many images as images_needed says is found (interval above 0) in about
    80 % of new draws; on a quarter of them in far fewer."""
    rng = np.random.default_rng(5)
    c = variance_components(_crossed(rng, 1, 20000, 0.001))
    n = round(images_needed(c, 0.96, 1))
    assert design_se(c, 1, n) * (1.959964 + 0.841621) == pytest.approx(0.96, rel=1e-3)
    found = {
        k: np.mean([seed_image_interval(_crossed(rng, 1, k, 0.001))["low"] > 0 for _ in range(300)])
        for k in (n, n // 4)
    }
    assert 0.72 <= found[n] <= 0.88 and found[n // 4] < 0.45
    assert images_needed(c, 0.0) == math.inf
    assert images_needed({"image": 1e-3, "seed": 1e-3, "resid": 0.0}, 0.5, 3) == math.inf  # seeds first
    assert math.isnan(images_needed({"image": 0.0, "seed": 1e-3, "resid": 0.0}, 0.5))  # the images do not limit


def test_detectable_margin_is_the_usual_power_formula_and_refuses_nonsense():
    assert detectable_margin(1.0) == pytest.approx(1.959964 + 0.841621, rel=1e-6)
    assert detectable_margin(1.0, df=2) == pytest.approx(4.302653 + 1.060660, rel=1e-6)
    assert detectable_margin(0.1, power=0.5) == pytest.approx(0.1959964, rel=1e-6)
    for bad in ({"power": 1.0}, {"level": 0.0}, {"df": 0}):
        with pytest.raises(ValueError, match="detectable_margin"):
            detectable_margin(1.0, **bad)

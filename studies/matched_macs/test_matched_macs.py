"""studies/matched_macs/matched_macs.py on the committed AlexNet CPU run log (the oracle): moved plans are evaluated
exactly as the run's finals were, a search's pick made again from its logged candidates is the run's own
pick when the band is the run's, rows resume, and margins come from rival_margins."""

from __future__ import annotations

import csv

import pytest
import torch

from common.paths import CHECKPOINT_DIR, CIFAR_JPEG_ROOT, REPO
from common.run.logs import config_record, parse_log, plan_records
from studies.matched_macs import matched_macs
from tests.helpers import rewrite_csv

LOG = REPO / "results/cpu-mse/logs/alexnet/results-alexnet-cpu.log"
HAVE_SHARED = CIFAR_JPEG_ROOT.is_dir() and (CHECKPOINT_DIR / "alexnet.pt").is_file() and LOG.is_file()
needs_shared = pytest.mark.skipif(
    not HAVE_SHARED, reason="needs ../shared (CIFAR-10 JPEG, AlexNet checkpoint) and the CPU log"
)


@needs_shared
def test_moved_plans_evaluated_as_the_run_did_and_rows_resume(tmp_path, monkeypatch):
    torch.set_num_threads(2)
    out = tmp_path / "mm.csv"
    argv = ["--log", str(LOG), "--target", "5", "--seeds", "0", "--methods", "energy,uniform", "--out", str(out)]
    argv += ["--match", "move"]
    rows = {r["method"]: r for r in matched_macs.main([*argv, "--reevaluate-all"])}
    # energy's plan is within 0.5 % already: unchanged, and measured again it is the logged number exactly
    energy = rows["energy"]
    assert energy["how"] == "within" and energy["steps"] == 0 and energy["reevaluated"] == "True"
    assert energy["factor_matched"] == energy["factor_logged"]
    assert float(energy["test_top1_matched"]) == pytest.approx(float(energy["test_top1_logged"]), abs=1e-9)
    # uniform's (x4.94, a rule method: moved in either mode) is moved onto the budget and measured
    uniform = rows["uniform"]
    assert uniform["how"] == "moved" and uniform["steps"] > 0 and uniform["reevaluated"] == "True"
    assert abs(float(uniform["factor_logged"]) / 5 - 1) > 0.005 >= abs(float(uniform["factor_matched"]) / 5 - 1)
    assert 0.5 < float(uniform["test_top1_matched"]) < 1.0

    # a second run reads the rows back and measures nothing
    monkeypatch.setattr(matched_macs, "final_model", lambda *a, **k: pytest.fail("re-measured a stored row"))
    again = matched_macs.main(argv)
    assert [r["test_top1_matched"] for r in again] == [rows[m]["test_top1_matched"] for m in ("energy", "uniform")]
    assert not (tmp_path / "mm.measured.log").exists()  # no search picked again: nothing measured to keep
    with open(out, newline="") as fh:
        stored = list(csv.DictReader(fh))
    stored[1]["plan_json"] = "{}"
    rewrite_csv(out, matched_macs.FIELDS, stored)
    with pytest.raises(SystemExit, match=r"\(uniform, seed 0, move\) is for another plan"):
        matched_macs.main(argv)


@needs_shared
def test_a_search_picks_again_as_the_run_picked(tmp_path, monkeypatch):
    """With the run's own band, the rebuilt searcher's pick among the logged candidates is the logged plan,
    and its re-ranks measured afresh equal the logged ones; with the tight band it picks a candidate in it;
    what it measured is kept, and a searcher rebuilt later picks the same from it without measuring."""
    torch.set_num_threads(2)
    from common.decompose.surgery import SpectraCache, plan_from_dict
    from studies.replay import logged_inputs

    records, _ = parse_log(LOG)
    cfg = config_record(records, LOG)
    model, data = logged_inputs(cfg)
    kept = tmp_path / "mm.measured.log"
    searchers = matched_macs._Searchers(model, data, cfg, records, SpectraCache(model), kept)
    s = searchers(1)
    cands = matched_macs._candidates(records, "policy", 1, 5.0)
    assert len(cands) == cfg["search_budget"]
    logged = plan_from_dict(plan_records(records)["policy", 1, 5.0]["plan"])
    s.recorder.items = []  # nothing read back: every re-rank measured here
    plan, _ = matched_macs._reselect(s, cands, "policy", 5.0, 0.03)
    assert plan == logged
    measured = {r["index"]: r["val_top1"] for r in s.recorder.items if r["kind"] == "rerank"}
    run = {
        r["index"]: r["val_top1"]
        for r in records
        if r["kind"] == "rerank" and r.get("seed") == 1 and r.get("method") == "policy" and r.get("target") == 5.0
    }
    assert len(measured) == cfg["rerank"] and all(measured[i] == pytest.approx(run[i], abs=1e-9) for i in measured)

    plan, index = matched_macs._reselect(s, cands, "policy", 5.0, 0.005)
    factor = next(float(c["macs_factor"]) for c in cands if c["index"] == index)
    assert abs(factor / 5 - 1) <= 0.005 and plan == plan_from_dict(cands[index]["plan"])

    again = matched_macs._Searchers(model, data, cfg, [r for r in records if r["kind"] != "rerank"], s.spectra, kept)
    s2 = again(1)
    monkeypatch.setattr(type(s2), "_score", lambda *a: pytest.fail("measured a re-rank kept from before"))
    assert matched_macs._reselect(s2, cands, "policy", 5.0, 0.005) == (plan, index)
    assert matched_macs._reselect(s2, cands, "policy", 5.0, 0.03)[0] == logged
    kept_records, errors = parse_log(kept)
    assert not errors and {r["of_run"] for r in kept_records} == {cfg["run_id"]}
    assert matched_macs._reselect(s, cands, "policy", 50.0, 0.005) is None  # no candidate near 50x


def _rows(policy: list[float], rival: list[float], shift: float) -> list[dict]:
    """Policy and uniform rows over seeds; the policy's matched number is its logged one + ``shift``."""
    rows = []
    for method, accs in (("policy", policy), ("uniform", rival)):
        for seed, acc in enumerate(accs):
            matched = acc + (shift if method == "policy" else 0.0)
            rows.append(
                {
                    "method": method,
                    "seed": str(seed),
                    "target": "5.0",
                    "test_top1_logged": str(acc),
                    "test_top1_matched": str(matched),
                }
            )
    return rows


def test_margins_table_pairs_seeds_for_each_column():
    m = matched_macs.margins_table(_rows([0.80, 0.81, 0.82], [0.79, 0.80, 0.81], -0.02)).iloc[0]
    assert (m.policy, m.rival, m.n_logged, m.n_matched) == ("policy", "uniform", 3, 3)
    assert m.margin_logged == pytest.approx(1.0) and m.verdict_logged == "policy ahead"
    assert m.margin_matched == pytest.approx(-1.0) and m.verdict_matched == "policy behind"


def test_bad_tolerance_and_a_log_without_config_are_named(tmp_path):
    with pytest.raises(SystemExit, match="--tol 0.05"):
        matched_macs.main(["--log", str(LOG), "--tol", "0.05"])
    # the band is the run's own: a run searched within ±1 % refuses a "tighter" 2 %
    lines = LOG.read_text().splitlines(keepends=True)
    i = next(i for i, line in enumerate(lines) if '"kind":"config"' in line)
    lines[i] = lines[i].replace('"kind":"config",', '"kind":"config","budget_tol":0.01,', 1)
    narrow = tmp_path / "narrow.log"
    narrow.write_text("".join(lines))
    with pytest.raises(SystemExit, match=r"--tol 0.02: must be in \(0, 0.01\)"):
        matched_macs.main(["--log", str(narrow), "--tol", "0.02", "--out", str(tmp_path / "n.csv")])
    empty = tmp_path / "empty.log"
    empty.write_text("")
    with pytest.raises(SystemExit, match="no config record"):
        matched_macs.main(["--log", str(empty), "--out", str(tmp_path / "x.csv")])


def test_a_log_from_another_machine_replays_with_its_checkpoint_here(tmp_path, digits_checkpoint):
    """--checkpoint: the logged path need not exist here, the bytes must still be the run's."""
    import shutil

    from common.deploy.artifacts import file_sha256
    from common.run.preflight import PreflightError
    from studies.replay import logged_inputs

    here = tmp_path / "alexnet.pt"
    shutil.copy(digits_checkpoint("alexnet"), here)
    cfg = {
        "model": "alexnet",
        "dataset": "digits",
        "data_root": None,
        "checkpoint": str(tmp_path / "elsewhere" / "alexnet.pt"),
        "checkpoint_sha256": file_sha256(here),
    }
    with pytest.raises(PreflightError, match="elsewhere"):
        logged_inputs(cfg)
    model, data = logged_inputs(cfg, checkpoint=here)
    assert not model.training and data.num_classes == 10
    other = tmp_path / "other.pt"
    shutil.copy(digits_checkpoint("alexnet", fit=False), other)
    with pytest.raises(SystemExit, match=r"other\.pt: sha256 .* is not the run's"):
        logged_inputs(cfg, checkpoint=other)


def test_checkpoint_option_reaches_the_replay(monkeypatch):
    def stop(cfg, data_root, checkpoint):
        raise SystemExit(f"replay with {checkpoint}")

    monkeypatch.setattr(matched_macs, "logged_inputs", stop)
    with pytest.raises(SystemExit, match="replay with /here/alexnet.pt"):
        matched_macs.main(["--log", str(LOG), "--target", "5", "--checkpoint", "/here/alexnet.pt"])

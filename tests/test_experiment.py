"""End-to-end experiments on digits: the log round-trips, every method meets the budget, a re-run
resumes without evaluating anything, and an interrupted search resumes to the uninterrupted result."""

from __future__ import annotations

import dataclasses
import json
import re
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

import common.run.experiment as experiment
import common.run.measure as measure
from common.data.datasets import load_dataset
from common.data.loader import make_loader
from common.decompose.surgery import SpectraCache, plan_from_dict
from common.deploy.artifacts import file_sha256, load_compressed, read_artifact
from common.deploy.latency import cpu_name
from common.run.config import EXTENDING_FIELDS, RESULT_FIELDS, RESUME_FIELDS, ExperimentConfig, search_config
from common.run.documents import jsonify, load_document, run_document
from common.run.experiment import parse_args, run_experiment
from common.run.logs import encode_value, parse_log, unpack_hits
from common.search.options import METHODS, SearchConfig
from common.search.proxy import ProxyEvaluator, final_model
from common.train.evaluate import evaluate

TARGET = 3.0


def config(log_dir: Path, checkpoint: Path | None, run_id: str, methods=METHODS, **kw) -> ExperimentConfig:
    kw = {"targets": (TARGET,), "sensitivity_levels": (0.5, 0.2), "artifacts_dir": str(log_dir / "artifacts"), **kw}
    return ExperimentConfig(
        model="alexnet",
        dataset="digits",
        checkpoint=None if checkpoint is None else str(checkpoint),
        methods=tuple(methods),
        search_budget=3,
        calib_images=64,
        val_images=200,
        log_dir=str(log_dir),
        run_id=run_id,
        progress=False,
        seed=0,
        **kw,
    )


def log_file(cfg: ExperimentConfig) -> Path:
    return Path(cfg.log_dir) / cfg.model / f"{cfg.resolved_run_id()}.log"


def canon(x) -> str:
    """Comparable text of records (NaN-safe, key-order-free)."""
    return json.dumps(encode_value(x, "test"), sort_keys=True)


def strip(rec: dict) -> dict:
    """A record without what differs between runs (time, position, run id, wall-clock seconds)."""
    return {k: v for k, v in rec.items() if k not in ("t", "seq", "run_id") and "seconds" not in k}


def scoreless(rec: dict) -> dict:
    return {k: v for k, v in strip(rec).items() if k != "score"}


def of_kind(records: list[dict], kind: str, **match) -> list[dict]:
    return [r for r in records if r["kind"] == kind and all(r.get(k) == v for k, v in match.items())]


class Interrupted(RuntimeError):
    pass


@pytest.fixture(scope="module")
def reference(tmp_path_factory, digits_checkpoint):
    """One uninterrupted run of every method (the slow part of this file, done once)."""
    cfg = config(tmp_path_factory.mktemp("logs"), digits_checkpoint("alexnet"), "reference")
    finals = run_experiment(cfg)
    return cfg, finals


def test_log_round_trips_through_jsonify(reference, tmp_path):
    cfg, finals = reference
    records, errors = parse_log(log_file(cfg))
    assert errors == []
    kinds = {r["kind"] for r in records}
    assert {"config", "baseline", "layers", "sensitivity", "candidate", "plan", "final", "timing", "end"} <= kinds
    written = jsonify(log_file(cfg), tmp_path / "json")
    assert [p.relative_to(tmp_path / "json").as_posix() for p in written] == ["alexnet/reference.json"]
    text = written[0].read_text()
    json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    doc = load_document(written[0])
    assert doc["errors"] == [] and doc["model"] == "alexnet" and doc["run_id"] == "reference"
    assert canon(doc["records"]) == canon(records)
    assert canon(of_kind(records, "final")[: len(finals)]) == canon(finals)
    config_rec = of_kind(records, "config")[0]
    assert config_rec["calib_images"] == 64 and config_rec["sensitivity_levels"] == [0.5, 0.2]
    assert config_rec["cpu"] == cpu_name()  # the CPU model: its kernels' last digits are the run's


def test_every_method_meets_the_budget(reference):
    cfg, finals = reference
    records, _ = parse_log(log_file(cfg))
    assert sorted(f["method"] for f in finals) == sorted(METHODS)
    base = of_kind(records, "baseline")[0]
    assert base["val_top1"] > 0.9  # the fitted digits checkpoint: compression has something to lose
    for f in finals:
        assert abs(f["macs_factor"] / TARGET - 1) <= 0.03, (f["method"], f["macs_factor"])
        assert 0.0 <= f["test_top1_bn"] <= 1.0 and f["test_top1_ft"] is None
        # The search's cost model agrees with counting the built compressed model.
        plan = of_kind(records, "plan", method=f["method"])[0]
        assert f["macs_factor"] == pytest.approx(plan["macs_factor"], rel=1e-9)
    searched = {f["method"]: f["evaluations"] for f in finals}
    assert searched["random"] >= 3 and searched["policy"] >= 3


def test_rerun_resumes_without_evaluating(reference, monkeypatch):
    cfg, finals = reference
    before, _ = parse_log(log_file(cfg))

    def no_evaluation(*_a, **_k):
        raise AssertionError("a resumed run evaluated a model")

    monkeypatch.setattr(ProxyEvaluator, "score", no_evaluation)
    monkeypatch.setattr(measure, "evaluate", no_evaluation)
    again = run_experiment(cfg)
    after, _ = parse_log(log_file(cfg))
    assert canon(again) == canon(finals)
    assert canon(after[: len(before)]) == canon(before)
    assert {r["kind"] for r in after[len(before) :]} <= {"timing", "end"}
    for kind in ("sensitivity", "candidate", "plan", "final", "baseline"):
        assert len(of_kind(after, kind)) == len(of_kind(before, kind)), kind


def test_interrupted_search_resumes_to_the_uninterrupted_plan(reference, tmp_path, monkeypatch, digits_checkpoint):
    ref_cfg, ref_finals = reference
    ref, _ = parse_log(log_file(ref_cfg))
    n_sens = len(of_kind(ref, "sensitivity"))
    ref_cands = of_kind(ref, "candidate", method="policy")
    assert n_sens >= 5 and len(ref_cands) >= 3  # so the cut below falls inside the policy search

    cfg = config(tmp_path, digits_checkpoint("alexnet"), "interrupted", methods=("policy",))
    real_call = ProxyEvaluator.score
    calls = {"n": 0, "limit": n_sens + 2}  # sensitivity, then two policy candidates, then it dies

    def counting(self, plan):
        calls["n"] += 1
        if calls["limit"] is not None and calls["n"] > calls["limit"]:
            raise Interrupted("killed mid-search")
        return real_call(self, plan)

    monkeypatch.setattr(ProxyEvaluator, "score", counting)
    with pytest.raises(Interrupted):
        run_experiment(cfg)
    partial, errors = parse_log(log_file(cfg))
    assert errors == []
    assert len(of_kind(partial, "candidate")) == 2 and not of_kind(partial, "plan") and not of_kind(partial, "final")

    calls.update(n=0, limit=None)
    (final,) = run_experiment(cfg)
    assert calls["n"] == len(ref_cands) - 2  # only the candidates the killed run had not scored
    (ref_final,) = [f for f in ref_finals if f["method"] == "policy"]
    resumed, _ = parse_log(log_file(cfg))
    assert of_kind(resumed, "plan")[0]["plan"] == of_kind(ref, "plan", method="policy")[0]["plan"]
    for key in ("val_top1_bn", "test_top1_bn", "macs_factor", "params_factor", "proxy_val_top1", "evaluations"):
        assert final[key] == ref_final[key], key
    for kind, theirs in (("candidate", ref_cands), ("sensitivity", of_kind(ref, "sensitivity"))):
        ours = of_kind(resumed, kind)
        # Exact draws and plans; the KL score is continuous, and oneDNN's float sums may differ in the
        # last bits between runs (thread splits, memory alignment), so it is compared to 1e-5.
        assert canon([scoreless(r) for r in ours]) == canon([scoreless(r) for r in theirs]), kind
        assert [r["score"] for r in ours] == pytest.approx([r["score"] for r in theirs], rel=1e-5, abs=1e-9), kind


def test_random_init_is_reproducible(tmp_path):
    """checkpoint=None (smoke runs) must give the same weights on every run, or resuming mixes models."""
    base = []
    for run_id in ("a", "b"):
        cfg = config(tmp_path, None, run_id, methods=("uniform",), deadline=0.0)
        assert run_experiment(cfg) == []  # the deadline stops it right after the baseline
        records, _ = parse_log(log_file(cfg))
        base.append(strip(of_kind(records, "baseline")[0]))
        assert of_kind(records, "end")[0]["status"] == "deadline"
    assert canon(base[0]) == canon(base[1])


def test_cli_maps_flags_to_the_config():
    cfg = parse_args(
        [
            "--model",
            "vgg16",
            "--dataset",
            "digits",
            "--targets",
            "2,3.5",
            "--methods",
            "uniform,policy",
            "--finetune-epochs",
            "0.5",
            "--val-images",
            "0",
            "--sensitivity-levels",
            "0.5,0.25",
            "--run-id",
            "x",
            "--quiet",
        ]
    )
    assert (cfg.model, cfg.dataset, cfg.targets, cfg.methods) == ("vgg16", "digits", (2.0, 3.5), ("uniform", "policy"))
    assert cfg.finetune_epochs == 0.5 and cfg.val_images is None
    assert cfg.sensitivity_levels == (0.5, 0.25) and cfg.run_id == "x" and not cfg.progress
    assert parse_args(["--finetune-epochs", "0"]).finetune_epochs == 0.0  # 0 = off
    with pytest.raises(ValueError, match="unknown rank-selection method"):
        run_experiment(ExperimentConfig(methods=("nope",), log_dir="unused"))


def test_cli_is_generated_from_every_config_field(capsys):
    """One option per field, named after it, with the field's help and default; no option = the default."""
    assert parse_args([]) == ExperimentConfig()
    parser = experiment.config_parser()
    options = {o for a in parser._actions for o in a.option_strings}
    for f in dataclasses.fields(ExperimentConfig):
        assert "--" + f.name.replace("_", "-") in options, f.name
        assert f.metadata.get("help"), f"{f.name} has no help text"
    assert "finetune" not in {f.name for f in dataclasses.fields(ExperimentConfig)}  # finetune_epochs = 0 is off
    helps = {a.dest: a.help for a in parser._actions}
    assert helps["sensitivity_levels"].endswith("(default: 0.5,0.3,0.15)")
    assert helps["val_images"].endswith("(default: the whole val split)") and helps["latency"].endswith(
        "(default: off)"
    )
    with pytest.raises(SystemExit):
        parse_args(["--help"])
    text = capsys.readouterr().out
    assert "--finetune-epochs FLOAT" in text and "--latency-batches INT,..." in text and "--no-distill" in text


def test_cli_switches_lists_and_none():
    cfg = parse_args(
        [
            "--policy-tucker2",
            "--no-distill",
            "--latency",
            "--latency-batches",
            "1,8",
            "--latency-devices",
            "cpu",
            "--finetune-targets",
            "3",
            "--no-progress",
            "--threads",
            "1",
        ]
    )
    assert cfg.policy_tucker2 and not cfg.distill and cfg.latency and not cfg.progress
    assert cfg.latency_batches == (1, 8) and cfg.latency_devices == ("cpu",) and cfg.finetune_targets == (3.0,)
    assert cfg.threads == 1
    assert parse_args(["--finetune-targets", ""]).finetune_targets is None  # an empty optional list = default
    assert parse_args(["--quiet", "--progress"]).progress  # the last switch wins
    # notebook-style lists become tuples
    assert ExperimentConfig(methods=["uniform"], sensitivity_levels=[0.5]).methods == ("uniform",)


def test_run_results_options_are_the_config_with_the_tables_defaults():
    from benchmarks import run_results

    p = run_results.build_parser()
    a = p.parse_args([])
    cpu = run_results.model_config(a, "alexnet", False, None)
    assert cpu.targets == (3.0, 2.0, 5.0) and cpu.n_seeds == 3 and cpu.policy_tucker2 and cpu.latency
    assert (cpu.finetune_epochs, cpu.calib_images, cpu.finetune_batch_size) == (0.1, 256, 128)
    assert cpu.latency_devices == ("cpu",) and cpu.device == "cpu" and cpu.run_id == "results-alexnet-cpu"
    assert cpu.dataset == "cifar10-jpeg" and cpu.checkpoint.endswith("alexnet.pt") and cpu.log_dir == "logs/results"
    cuda = run_results.model_config(a, "vgg16", True, 123.0)
    assert (cuda.finetune_epochs, cuda.calib_images, cuda.finetune_batch_size) == (3.0, 1024, 256)
    assert cuda.latency_devices == ("cuda",) and cuda.deadline == 123.0 and cuda.run_id == "results-vgg16-cuda"
    given = p.parse_args(
        [
            "--no-tucker2",
            "--no-latency",
            "--finetune-epochs",
            "0",
            "--calib-images",
            "512",
            "--targets",
            "3",
            "--run-tag",
            "t",
            "--val-images",
            "0",
            "--shapes",
            "level,energy",
        ]
    )
    cfg = run_results.model_config(given, "alexnet", True, None)
    assert not cfg.policy_tucker2 and not cfg.latency and cfg.finetune_epochs == 0.0 and cfg.calib_images == 512
    assert cfg.targets == (3.0,) and cfg.run_id == "results-alexnet-t" and cfg.val_images is None
    assert cfg.shapes == ("level", "energy")


def test_run_results_names_the_model_of_a_refused_run_and_exits_2(tmp_path, monkeypatch, capsys):
    from benchmarks import run_results
    from common.run.preflight import PreflightError

    for name in ("alexnet", "vgg16"):  # only their existence is checked before a run
        (tmp_path / f"{name}.pt").write_bytes(b"")
    seen = []

    def refuse(cfg):
        seen.append(cfg.run_id)
        raise PreflightError("config differs in proxy")

    monkeypatch.setattr(run_results, "run_experiment", refuse)
    with pytest.raises(SystemExit) as exit_info:
        run_results.main(["--models", "alexnet,vgg16", "--checkpoint-dir", str(tmp_path), "--run-tag", "t"])
    assert exit_info.value.code == 2 and seen == ["results-alexnet-t"]  # stops there: vgg16 is not attempted
    assert "error: alexnet: config differs in proxy" in capsys.readouterr().err


def test_run_results_says_time_box_only_when_the_deadline_stopped_a_stage(tmp_path, monkeypatch, capsys):
    """The message follows the log's last ``end`` record, not the clock: a run whose last stage ended
    past the deadline with every stage done says nothing of a time box."""
    from benchmarks import run_results
    from common.run.logs import RunLog

    for name in ("alexnet", "vgg16"):
        (tmp_path / f"{name}.pt").write_bytes(b"")
    ends = {"alexnet": "ok", "vgg16": "deadline"}

    def fake(cfg):
        log = RunLog(cfg.log_dir, cfg.model, cfg.resolved_run_id())
        log.write("end", status="deadline", wall_seconds=1.0)  # an earlier, stopped run of the same log
        log.write("end", status=ends[cfg.model], wall_seconds=2.0)
        log.close()
        return []

    monkeypatch.setattr(run_results, "run_experiment", fake)
    clock = iter(range(0, 10**9, 1000))  # an hour's stages: every deadline is past by the end
    monkeypatch.setattr(
        run_results, "time", SimpleNamespace(time=lambda: float(next(clock)), perf_counter=time.perf_counter)
    )
    argv = ["--models", "alexnet,vgg16", "--checkpoint-dir", str(tmp_path), "--run-tag", "t", "--minutes", "1"]
    run_results.main([*argv, "--log-dir", str(tmp_path / "logs")])
    out = capsys.readouterr().out
    assert "alexnet: time box" not in out and "vgg16: time box reached" in out


@pytest.mark.slow
def test_finetuning_only_at_its_targets_keeps_the_best_val_epoch(tmp_path):
    """finetune_epochs > 0 finetunes the plans at finetune_targets only; each epoch is logged, and the final
    model is the best val epoch (0 = the recalibrated model itself)."""
    cfg = config(
        tmp_path,
        None,
        "ft",
        methods=("uniform",),
        targets=(3.0, 2.0),
        finetune_targets=(3.0,),
        finetune_epochs=0.1,
        final_calib_images=64,
        sensitivity_levels=(0.5,),
    )
    finals = {f["target"]: f for f in run_experiment(cfg)}
    records, _ = parse_log(log_file(cfg))
    assert finals[2.0]["finetune_epochs"] is None and finals[2.0]["test_top1_ft"] is None
    ft = finals[3.0]
    assert ft["finetune_epochs"] == 0.1 and 0.0 <= ft["test_top1_ft"] <= 1.0 and ft["metric"] == "macs"
    epochs = of_kind(records, "finetune_epoch")
    assert len(epochs) == 1 and epochs[0]["target"] == 3.0 and epochs[0]["method"] == "uniform"
    assert epochs[0]["epoch"] == pytest.approx(0.1, abs=0.05) and epochs[0]["val_top1"] is not None
    better = epochs[0]["val_top1"] > ft["val_top1_bn"]
    assert ft["finetune_selected_epoch"] == (epochs[0]["epoch"] if better else 0.0)
    assert ft["val_top1_ft"] == pytest.approx(max(epochs[0]["val_top1"], ft["val_top1_bn"]), abs=0.01)
    assert not list(log_file(cfg).parent.glob("*.finetune-*.pt"))  # the checkpoint goes once final is logged

    # Every final model is an artifact that rebuilds, from the file alone, the model the record measured.
    data = load_dataset("digits")
    test = make_loader(data, "test", 500)
    for target, stages in ((3.0, ("bn", "ft")), (2.0, ("bn",))):
        rec = finals[target]
        assert sorted(rec["artifacts"]) == sorted(stages)
        for stage in stages:
            entry = rec["artifacts"][stage]
            path = Path(entry["path"])
            assert path.parent == tmp_path / "artifacts" / "alexnet" / "ft" and file_sha256(path) == entry["sha256"]
            assert path.name == f"uniform-x{target:g}-ht2{'-ft' if stage == 'ft' else ''}.pt"
            model = load_compressed(path)
            ev = evaluate(model, test, "cpu", per_image=True)
            assert ev["top1"] == rec[f"test_top1_{stage}"]
            # the logged per-image hits are this model's, image by image
            assert (unpack_hits(rec[f"test_hits_{stage}"], rec["test_images"]) == ev["correct"]).all()
            doc = read_artifact(path)
            assert doc["metrics"]["test_top1"] == rec[f"test_top1_{stage}"] and doc["extra"]["stage"] == stage
            assert doc["plan"] == of_kind(records, "plan", target=target)[0]["plan"]
    # BN logits to 1e-6 against the same final model built again in process
    rec = finals[2.0]
    dense, _ = experiment._dense_model(cfg, data)
    plan = plan_from_dict(of_kind(records, "plan", target=2.0)[0]["plan"])
    again = final_model(dense, plan, SpectraCache(dense), data, cfg.final_calib_images, 0, "cpu")
    x = next(iter(test))[0]
    with torch.no_grad():
        torch.testing.assert_close(load_compressed(rec["artifacts"]["bn"]["path"])(x), again(x), rtol=0, atol=1e-6)


@pytest.mark.slow
def test_seeds_vary_search_and_calibration_and_aggregate(tmp_path, digits_checkpoint):
    """n_seeds runs every method per seed; seeds change the draws and the calibration subset."""
    from common.analysis import aggregate_seeds, summary_table

    cfg = config(
        tmp_path, digits_checkpoint("alexnet"), "seeds", methods=("uniform", "random"), n_seeds=2, final_calib_images=64
    )
    finals = run_experiment(cfg)
    assert sorted((f["method"], f["seed"]) for f in finals) == [
        ("random", 0),
        ("random", 1),
        ("uniform", 0),
        ("uniform", 1),
    ]
    records, _ = parse_log(log_file(cfg))
    plans = {(p["method"], p["seed"]): p["plan"] for p in of_kind(records, "plan")}
    assert plans["uniform", 0] == plans["uniform", 1]  # deterministic: only its calibration differs
    cands = {s: [c["plan"] for c in of_kind(records, "candidate", method="random", seed=s)] for s in (0, 1)}
    assert cands[0] != cands[1]
    # the final of each seed says which proxy chose it and where the val re-ranking landed
    for f in finals:
        assert f["proxy"] == "logit_mse" and f["metric"] == "macs" and f["proxy_score"] <= 0
    doc, _ = run_document(log_file(cfg))
    agg = aggregate_seeds(summary_table([doc]))
    assert set(agg["n_seeds"]) == {2}


def test_rescore_and_budget_band_reach_the_searches_and_their_plan_records(tmp_path, digits_checkpoint):
    cfg = config(
        tmp_path,
        digits_checkpoint("alexnet"),
        "rescore",
        methods=("random",),
        rescore=4,
        rescore_images=96,
        final_calib_images=64,
        budget_tol=0.015,
    )
    cfg = dataclasses.replace(cfg, search_budget=6)
    run_experiment(cfg)
    records, errors = parse_log(log_file(cfg))
    assert not errors
    again = of_kind(records, "rescore", method="random")
    assert len(again) == 4 and {r["calib_images"] for r in again} == {96}
    (plan,) = of_kind(records, "plan", method="random")
    assert plan["params"]["rescore"]["indices"] == [r["index"] for r in again]
    assert {r["index"] for r in of_kind(records, "rerank")} <= {r["index"] for r in again}
    (final,) = of_kind(records, "final", method="random")
    assert abs(final["macs_factor"] / final["target"] - 1) <= 0.015
    assert plan["params"]["config"]["tol"] == 0.015


def test_search_config_maps_every_search_field_and_defaults_what_an_old_log_lacks():
    cfg = ExperimentConfig(
        sensitivity_levels=(0.2, 0.6),
        policy_rounds=2,
        temperature=0.5,
        rerank=4,
        shapes=("energy",),
        policy_knapsack=True,
        rescore=6,
        rescore_images=64,
        budget_tol=0.01,
    )
    got = search_config(dataclasses.asdict(cfg))
    assert (got.sensitivity_levels, got.rounds, got.temperature, got.rerank) == ((0.2, 0.6), 2, 0.5, 4)
    assert (got.shapes, got.knapsack, got.rescore, got.rescore_images, got.tol) == (
        tuple(cfg.shapes),
        True,
        6,
        64,
        0.01,
    )
    assert search_config({"model": "alexnet"}) == SearchConfig()  # a log from before these settings existed


@pytest.mark.parametrize(
    "flags,phrase",
    [
        (["--targets", ""], "at least one reduction factor"),
        (["--targets", "nan"], "finite number > 1"),
        (["--targets", "inf"], "finite number > 1"),
        (["--targets", "0.5"], "finite number > 1"),
        (["--targets", "three"], "could not convert"),
        (["--search-budget", "0"], "search_budget must be at least 1"),
        (["--n-seeds", "0"], "n_seeds must be at least 1"),
        (["--calib-images", "1"], "calib_images must be at least 2"),
        (["--methods", "uniform,greedy"], "unknown rank-selection method 'greedy'"),
        (["--shapes", "spectral"], "shapes must be a non-empty subset"),
        (["--budget-tol", "0"], "budget_tol must be in (0, 0.5)"),
        (["--budget-tol", "0.5"], "budget_tol must be in (0, 0.5)"),
        (["--rescore", "2"], "rescore must be 0 (off) or at least 2 and at least rerank (3)"),
        (["--rescore", "4", "--rescore-images", "1"], "rescore_images must be at least 2"),
        (["--rescore", "4", "--proxy", "top1"], "rescore needs a label-free proxy"),
        (["--finetune-epochs", "-1"], "finetune_epochs must be a number of epochs >= 0"),
        (["--finetune-epochs", "inf"], "finetune_epochs must be a number of epochs >= 0"),
        (["--latency-batches", "1,x"], "invalid literal for int()"),
        (["--search-budget", "ten"], "invalid int value"),
        (["--model", "resnet50"], "invalid choice"),
    ],
)
def test_bad_cli_values_are_refused_before_any_work(flags, phrase, capsys, monkeypatch):
    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    with pytest.raises(SystemExit) as exc:
        experiment.main(["--dataset", "digits", "--log-dir", "unused", *flags])
    assert exc.value.code == 2
    assert phrase in capsys.readouterr().err


# A value other than the default for every field that affects results: a field added to the config must be
# classified here (affects results, or not) before this test passes.
OTHER_VALUES = {
    "model": "vgg16",
    "dataset": "digits",
    "data_root": "/elsewhere",
    "checkpoint": "other.pt",
    "targets": (2.0,),
    "metric": "params",
    "budget_tol": 0.01,
    "methods": ("uniform", "policy"),
    "policy_tucker2": True,
    "search_budget": 50,
    "n_seeds": 3,
    "proxy": "top1",
    "rerank": 5,
    "shapes": ("level", "energy"),
    "final_calib_images": 1024,
    "finetune_epochs": 1.0,
    "finetune_targets": (3.0,),
    "finetune_lr": 0.001,
    "finetune_batch_size": 64,
    "finetune_max_images": 1000,
    "distill": False,
    "calib_images": 128,
    "val_images": 500,
    "sensitivity_levels": (0.3,),
    "policy_rounds": 3,
    "temperature": 2.0,
    "policy_knapsack": True,
    "rescore": 8,
    "rescore_images": 2048,
    "rank_multiple": 4,
    "latency": True,
    "latency_batches": (1,),
    "latency_threads": 1,
    "latency_devices": ("cpu",),
    "device": "cuda",  # against "cpu": "auto" is one of them on any machine
    "seed": 1,
    "stream": "on",
    "crop_size": 64,
    "resize_size": 72,
    "refine": 0.5,
    "finetune_optimizer": "adamw",
    "finetune_clip": 1.0,
    "finetune_warmup": 0.3,
    "finetune_balance": True,
    "mean": (0.5, 0.5, 0.5),
    "std": (0.3, 0.3, 0.3),
}
TOGETHER = {"mean": {"std": (0.25, 0.25, 0.25)}, "std": {"mean": (0.5, 0.5, 0.5)}}
"""Fields given only with a partner (a normalization is a mean and a std): the partner's value for each."""
NO_RESULT_VALUES = {
    "log_dir": "elsewhere",
    "artifacts": False,
    "artifacts_dir": "elsewhere",
    "threads": 1,
    "progress": False,
    "deadline": 123.0,
}


def test_default_run_id_hashes_every_setting_that_affects_results():
    assert set(OTHER_VALUES) == set(RESULT_FIELDS)
    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert names == set(RESULT_FIELDS) | set(NO_RESULT_VALUES) | {"run_id"}
    base = ExperimentConfig(device="cpu")
    run_id = base.resolved_run_id()
    assert re.fullmatch(r"resnet18-auto-x3-s0-[0-9a-f]{8}", run_id), run_id
    assert run_id == "resnet18-auto-x3-s0-7fe9028a"  # the default method, guided, alone
    # an option added later (ADDED_FIELDS) at its default keeps the ids of the settings before it: the
    # methods that were the default until guided became it give the ids they gave then
    before = ("uniform", "energy", "vbmf", "random", "policy", "tpe", "policy_seeded")
    assert ExperimentConfig(device="cpu", methods=before).resolved_run_id() == "resnet18-auto-x3-s0-3c93116a"
    assert ExperimentConfig(device="cpu", model="alexnet", targets=[2, 3, 5], methods=before).resolved_run_id() == (
        "alexnet-auto-x2-3-5-s0-f31885d2"
    )
    ids = {run_id}
    for name, value in OTHER_VALUES.items():
        other = dataclasses.replace(base, **{name: value}, **TOGETHER.get(name, {})).resolved_run_id()
        assert other not in ids, name  # e.g. FINETUNE 0 vs 1, other METHODS or CHECKPOINT: another log
        ids.add(other)
    for name, value in NO_RESULT_VALUES.items():
        assert dataclasses.replace(base, **{name: value}).resolved_run_id() == run_id, name
    # the same settings, written differently, are the same run
    same = ExperimentConfig(
        device="cpu", targets=[3], sensitivity_levels="0.5,0.3,0.15", methods=list(base.methods), val_images=0
    )
    assert same.resolved_run_id() == run_id
    assert ExperimentConfig(run_id="mine").resolved_run_id() == "mine"
    auto = ExperimentConfig(device="auto").result_settings()["device"]
    assert auto in ("cpu", "cuda") and ExperimentConfig(device=auto).resolved_run_id() == (
        ExperimentConfig(device="auto").resolved_run_id()
    )
    assert set(RESUME_FIELDS) == set(RESULT_FIELDS) - set(EXTENDING_FIELDS)


def test_explicit_run_id_with_other_settings_is_refused_naming_them(tmp_path, monkeypatch):
    first = config(tmp_path, None, "mine", methods=("uniform",), deadline=0.0)
    assert run_experiment(first) == []  # config and baseline logged, then the deadline stops it
    log = log_file(first)
    size = log.stat().st_size

    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    changed = dataclasses.replace(first, finetune_epochs=1.0, calib_images=32, checkpoint="other.pt")
    with pytest.raises(ValueError) as exc:
        run_experiment(changed)
    text = str(exc.value)
    assert "'mine'" in text and str(log) in text
    assert "finetune_epochs: logged 0.0, now 1.0" in text
    assert "calib_images: logged 64, now 32" in text and "checkpoint: logged None, now 'other.pt'" in text
    assert "another run id" in text and "set these back" in text
    assert "differs in checkpoint, finetune_epochs, calib_images:" in text  # only what differs
    assert log.stat().st_size == size  # refused before writing anything

    # what only adds stages (more targets or methods), or does not affect results, may change on resume
    monkeypatch.undo()
    more = dataclasses.replace(first, methods=("uniform", "energy"), targets=(3.0, 2.0), log_dir=str(tmp_path))
    assert run_experiment(dataclasses.replace(more, progress=True, threads=1)) == []
    records, _ = parse_log(log)
    assert len(of_kind(records, "config")) == 1 and len(of_kind(records, "baseline")) == 1


def test_an_older_log_with_finetuning_switched_off_resumes_as_zero_epochs():
    from common.run.preflight import resume_changes

    cfg = ExperimentConfig(device="cpu", finetune_epochs=0)
    logged = json.loads(json.dumps(dataclasses.asdict(cfg))) | {"device_type": "cpu"}
    # before the switch was folded into the epochs, a run without finetuning logged these two
    old = logged | {"finetune": False, "finetune_epochs": 3.0}
    assert resume_changes(old, cfg, torch.device("cpu")) == []
    on = logged | {"finetune": True, "finetune_epochs": 3.0}
    assert resume_changes(on, cfg, torch.device("cpu")) == [("finetune_epochs", 3.0, 0.0)]


@pytest.mark.parametrize(
    "field,given,held",
    [
        ("sensitivity_levels", "[0.3]", (0.3,)),  # papermill -p SENSITIVITY_LEVELS "[0.3]"
        ("sensitivity_levels", "0.3,0.15", (0.3, 0.15)),
        ("sensitivity_levels", 0.3, (0.3,)),
        ("targets", [2, 3.5], (2.0, 3.5)),
        ("methods", "uniform", ("uniform",)),
        ("methods", "[uniform, 'policy']", ("uniform", "policy")),
        ("targets", 2, (2.0,)),
        ("finetune_targets", "", None),
        ("search_budget", 50.0, 50),
        ("finetune_epochs", 1, 1.0),
        ("val_images", 0, None),
    ],
)
def test_config_reads_lists_as_notebooks_and_the_command_line_give_them(field, given, held):
    assert getattr(ExperimentConfig(**{field: given}), field) == held


@pytest.mark.parametrize(
    "field,given,phrase",
    [
        ("sensitivity_levels", "[0.3", "'[0.3' is not a number"),
        ("sensitivity_levels", ("[", "0", ".", "3", "]"), "'[' is not a number"),  # a string taken apart
        ("sensitivity_levels", ["0.3"], "'0.3' is not a number"),
        ("sensitivity_levels", True, "must be a number or a list of numbers"),
        ("methods", 3, "must be a list of strings"),
        ("search_budget", "100", "search_budget must be a whole number, got '100'"),
        ("search_budget", True, "search_budget must be a whole number"),
        ("calib_images", 64.5, "calib_images must be a whole number"),
        ("distill", 1, "distill must be True or False"),
        ("finetune_epochs", True, "finetune_epochs must be a number"),
        ("model", None, "model must be a string"),
        ("dataset", "cifar", "dataset must be one of auto, digits"),
        ("device", "gpu", "device must be auto, cpu, cuda or cuda:N"),
        ("methods", (), "methods: give at least one"),
    ],
)
def test_config_refuses_wrong_types_by_name(field, given, phrase):
    with pytest.raises(ValueError, match=re.escape(phrase)):
        ExperimentConfig(**{field: given})


def test_a_given_normalization_reaches_the_log_the_artifact_and_the_onnx_export(tmp_path, digits_checkpoint):
    """``--mean/--std``: the statistics the checkpoint was trained with, used instead of the dataset's,
    recorded in the ``config`` record (as given and as used), stored in each artifact and its ONNX file."""
    import onnx

    from common.deploy import export as export_mod
    from common.deploy.artifacts import read_artifact

    mean, std = (0.4, 0.45, 0.5), (0.2, 0.25, 0.3)
    cfg = dataclasses.replace(
        config(tmp_path, digits_checkpoint("alexnet", fit=False), "norm", methods=("uniform",)),
        mean=mean,
        std=std,
        final_calib_images=64,
        device="cpu",
    )
    default = dataclasses.replace(cfg, run_id=None, mean=None, std=None)
    assert dataclasses.replace(cfg, run_id=None).fingerprint() != default.fingerprint()  # its own default run id
    (final,) = run_experiment(cfg)
    records, _ = parse_log(log_file(cfg))
    (rec,) = [r for r in records if r["kind"] == "config"]
    assert rec["mean"] == list(mean) and rec["std"] == list(std)
    assert rec["normalization"] == {"mean": list(mean), "std": list(std), "source": "given"}
    path = final["artifacts"]["bn"]["path"]
    doc = read_artifact(path)
    assert doc["mean"] == list(mean) and doc["std"] == list(std)
    out = tmp_path / "m.onnx"
    assert export_mod.main([path, "--onnx", str(out), "--batch", "2", "--threads", "1"]) == 0
    props = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert json.loads(props["mean"]) == list(mean) and json.loads(props["std"]) == list(std)


@pytest.mark.parametrize("module", ["common.run.experiment", "common.notebook", "finetuned.train_baseline"])
def test_entry_points_let_openmp_threads_sleep_unless_told_otherwise(module):
    """The CLI (``python -m common.run`` imports the package, then ``common.run.experiment``), the
    notebooks' helper and the baseline trainer set OMP_WAIT_POLICY=PASSIVE before torch
    loads OpenMP (which reads it once): spinning workers slow every process sharing the cores. A user's
    own setting wins."""
    import os
    import subprocess
    import sys

    probe = f"import sys, os; import {module}; print(os.environ.get('OMP_WAIT_POLICY'))"
    repo = Path(__file__).resolve().parents[1]
    env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | {"PYTHONPATH": str(repo)}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        run_env = env if given is None else env | {"OMP_WAIT_POLICY": given}
        out = subprocess.run([sys.executable, "-c", probe], env=run_env, capture_output=True, text=True, check=True)
        assert out.stdout.strip() == expected, (module, given, out.stderr[-500:])
    # the package itself loads no torch: whatever a script imports from it comes after the setting
    first = subprocess.run(
        [sys.executable, "-c", "import sys, common; print('torch' in sys.modules)"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert first.stdout.strip() == "False"

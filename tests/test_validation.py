"""Runs a researcher can trust: bad inputs refused up front by name, one writer per log, resumes only
with the same checkpoint bytes and dataset, and junk logs reported instead of read as runs."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import common.run.experiment as experiment
import common.run.measure as measure
import jsonify_logs
from common.analysis import summary_table
from common.data.splits import TensorSplit, content_fingerprint
from common.deploy.artifacts import file_sha256, read_artifact
from common.run.config import ExperimentConfig
from common.run.documents import run_document
from common.run.experiment import run_experiment
from common.run.lock import LogLockedError
from common.run.logs import RunLog, parse_log
from common.run.preflight import PreflightError
from tests.test_experiment import config, log_file

REPO = Path(__file__).resolve().parents[1]


def _bad_checkpoints(root: Path, good: Path) -> dict[str, Path]:
    root.mkdir(exist_ok=True)
    files = {"garbage": b"hello, not a checkpoint\n", "empty": b"", "truncated": good.read_bytes()[:3000]}
    out = {}
    for name, data in files.items():
        out[name] = root / f"{name}.pt"
        out[name].write_bytes(data)
    state = torch.load(good, weights_only=True)
    state["features.0.weight"][0, 0, 0, 0] = float("nan")
    out["nan-weights"] = root / "nan.pt"
    torch.save(state, out["nan-weights"])
    out["directory"] = root / "folder.pt"
    out["directory"].mkdir(exist_ok=True)
    return out


@pytest.mark.parametrize(
    "flags,phrases",
    [
        (["--targets", "nan"], ["finite number > 1"]),
        (["--targets", ""], ["at least one reduction factor"]),
        (["--targets", "0.5"], ["finite number > 1"]),
        (["--targets", "inf"], ["finite number > 1"]),
        (["--targets", "1000"], ["target 1000x is out of reach", "reachable targets are above 1 and at most"]),
        (["--search-budget", "0"], ["search_budget must be at least 1"]),
        (["--checkpoint", "garbage"], ["garbage.pt could not be read", "expected a state_dict saved by torch.save"]),
        (["--checkpoint", "truncated"], ["truncated.pt could not be read", "cut off or damaged"]),
        (["--checkpoint", "empty"], ["empty.pt is empty (0 bytes)", "expected a state_dict saved by torch.save"]),
        (["--checkpoint", "directory"], ["folder.pt is a directory"]),
        (["--checkpoint", "nan-weights"], ["nan.pt: tensor 'features.0.weight' has 1 non-finite value(s)"]),
        (["--run-id", "a/b"], ["run_id 'a/b' is not usable as a file name"]),
        (["--run-id", "line\n"], ["run_id 'line\\n' is not usable as a file name"]),
        (["--run-id", ".hidden"], ["run_id '.hidden' is not usable"]),
        (["HTD_CACHE=file"], ["cache folder (HTD_CACHE, default .cache/)", "is a file"]),
        (["--log-dir", "file"], ["log folder", "a-file/alexnet is not writable: Not a directory"]),
        (["--artifacts-dir", "file"], ["artifacts folder", "a-file/alexnet/"]),
        (["--dataset", "imagefolder", "--data-root", "file"], ["data_root", "a-file is a file", "--data-root DIR"]),
    ],
)
def test_bad_inputs_are_refused_by_name(flags, phrases, tmp_path, digits_checkpoint, capsys, monkeypatch):
    good = digits_checkpoint("alexnet", fit=False)
    bad = _bad_checkpoints(tmp_path / "ckpt", good)
    a_file = tmp_path / "a-file"
    a_file.write_text("not a folder")
    if flags == ["HTD_CACHE=file"]:
        monkeypatch.setenv("HTD_CACHE", str(a_file))
        flags = []
    flags = [str(a_file) if f == "file" else str(bad[f]) if f in bad else f for f in flags]
    monkeypatch.setattr(measure, "evaluate", lambda *a, **k: pytest.fail("evaluated a model"))
    argv = ["--model", "alexnet", "--dataset", "digits", "--methods", "uniform", "--device", "cpu", "--quiet"]
    argv += ["--log-dir", str(tmp_path / "logs"), "--checkpoint", str(good), *flags]
    with pytest.raises(SystemExit) as exc:
        experiment.main(argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    for phrase in phrases:
        assert phrase in err
    assert "weights_only" not in err and "Traceback" not in err


def test_a_run_failed_before_its_baseline_restarts_with_corrected_arguments(tmp_path, digits_checkpoint):
    ckpt = digits_checkpoint("alexnet", fit=False)
    wrong = config(tmp_path, ckpt, "mine", methods=("uniform",), targets=(1000.0,), deadline=0.0)
    with pytest.raises(PreflightError, match="out of reach"):
        run_experiment(wrong)
    fixed = dataclasses.replace(wrong, targets=(3.0,), calib_images=32)  # calib_images would be refused on resume
    assert run_experiment(fixed) == []  # baseline logged, then the deadline stops it
    failed = log_file(fixed).with_name("mine.log.failed-1")
    assert [r["kind"] for r in parse_log(failed)[0]] == ["config"]
    records, errors = parse_log(log_file(fixed))
    configs = [r for r in records if r["kind"] == "config"]
    assert errors == [] and len(configs) == 1 and configs[0]["calib_images"] == 32


@pytest.mark.slow
def test_resume_with_other_checkpoint_bytes_or_dataset_is_refused(tmp_path, digits_checkpoint, digits, monkeypatch):
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(digits_checkpoint("alexnet", fit=False).read_bytes())
    cfg = config(tmp_path, ckpt, "fp", methods=("uniform",), deadline=0.0)
    assert run_experiment(cfg) == []
    logged = [r for r in parse_log(log_file(cfg))[0] if r["kind"] == "config"][0]
    assert logged["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    sizes = {s: len(digits.split(s).labels) for s in ("train", "val", "test")}
    content = {s: content_fingerprint(digits.split(s)) for s in ("train", "val", "test")}
    assert len(set(content.values())) == 3
    identity = {"name": "digits", "root": "embedded:digits", "sizes": sizes, "content": content}
    assert logged["dataset_identity"] == identity
    assert run_experiment(cfg) == []  # the same inputs resume

    state = torch.load(ckpt, weights_only=True)
    state["features.0.bias"] += 1.0
    torch.save(state, ckpt)
    with pytest.raises(PreflightError) as exc:
        run_experiment(cfg)
    text = str(exc.value)
    assert "checkpoint_sha256: logged" in text and "another run id" in text
    assert f"delete the log {log_file(cfg)}" in text and "set these back" not in text

    ckpt.write_bytes(digits_checkpoint("alexnet", fit=False).read_bytes())  # the logged bytes again
    fewer = dataclasses.replace(digits, train=TensorSplit(digits.train.images[:-1], digits.train.labels[:-1]))
    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: fewer)
    with pytest.raises(
        PreflightError, match=r"differs in dataset_identity\.content\.train, dataset_identity\.sizes\.train:"
    ):
        run_experiment(cfg)


@pytest.mark.slow
def test_resume_on_relabelled_images_of_the_same_split_sizes_is_refused_naming_the_split(
    tmp_path, digits_checkpoint, digits, monkeypatch
):
    """Found: 20 test images moved from class 3 to class 5 (split sizes unchanged) resumed a run, whose
    log then held numbers measured on two test sets. The content fingerprint of each split is logged."""
    cfg = config(tmp_path, digits_checkpoint("alexnet", fit=False), "relabel", methods=("uniform",), deadline=0.0)
    assert run_experiment(cfg) == []
    labels = digits.test.labels.clone()
    threes = (labels == 3).nonzero().flatten()[:20]
    labels[threes] = 5
    moved = dataclasses.replace(digits, test=TensorSplit(digits.test.images, labels))
    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: moved)
    with pytest.raises(PreflightError) as exc:
        run_experiment(cfg)
    text = str(exc.value)
    assert "differs in dataset_identity.content.test:" in text and "the test split(s) changed" in text
    assert "content.train" not in text and "sizes" not in text


@pytest.mark.slow
def test_a_log_from_before_content_fingerprints_resumes_and_says_so(tmp_path, digits_checkpoint):
    cfg = config(tmp_path, digits_checkpoint("alexnet", fit=False), "old", methods=("uniform",), deadline=0.0)
    assert run_experiment(cfg) == []
    path = log_file(cfg)
    lines = path.read_text().splitlines(keepends=True)
    for i, line in enumerate(lines):
        head, sep, body = line.partition(" @@ ")
        if sep and json.loads(body)["kind"] == "config":
            record = json.loads(body)
            del record["dataset_identity"]["content"]  # as logs were written before
            lines[i] = head + sep + json.dumps(record, separators=(",", ":")) + "\n"
    path.write_text("".join(lines))
    assert run_experiment(cfg) == []  # a field the log lacks is no difference
    assert "not compared on resume: the dataset's content" in path.read_text()


def test_one_writer_per_log(tmp_path):
    log = RunLog(tmp_path, "alexnet", "locked")
    again = RunLog(tmp_path, "alexnet", "locked")  # the same process shares the lock
    open_it = textwrap.dedent(f"""
        import os, sys
        from common.run.logs import RunLog
        log = RunLog({str(tmp_path)!r}, "alexnet", "locked")
        if sys.argv[1:] == ["crash"]:
            os._exit(3)  # dies holding the lock: the OS releases it
    """)

    def other(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", open_it, *args], cwd=REPO, capture_output=True, text=True)

    refused = other()
    assert refused.returncode != 0
    assert "LogLockedError" in refused.stderr and str(log.path) in refused.stderr
    assert f"pid {os.getpid()}" in refused.stderr
    log.close()
    assert "LogLockedError" in other().stderr  # still held by `again`
    again.close()
    assert other("crash").returncode == 3
    assert other().returncode == 0
    RunLog(tmp_path, "alexnet", "locked").close()
    held = subprocess.Popen(
        [sys.executable, "-c", open_it + "\nimport time; print('held', flush=True); time.sleep(30)"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert held.stdout.readline().strip() == "held"
        with pytest.raises(LogLockedError, match=f"pid {held.pid}"):
            RunLog(tmp_path, "alexnet", "locked")
    finally:
        held.kill()
        held.wait()


def test_jsonify_reports_junk_and_records_of_another_writer(tmp_path, capsys):
    logs = tmp_path / "logs" / "alexnet"
    logs.mkdir(parents=True)
    (logs / "empty.log").write_bytes(b"")
    (logs / "binary.log").write_bytes(bytes(range(256)) * 4)
    log = RunLog(tmp_path / "logs", "alexnet", "twice")
    log.write("config", model="alexnet", dataset="digits", metric="macs", methods=["uniform"], seed=0)
    log.write("timing", stage="a", seconds=1.0)
    log.close()
    lines = log.path.read_text().splitlines(keepends=True)
    second_config = lines[1].replace('"seq":0', '"seq":2')
    with open(log.path, "a") as fh:
        fh.write(lines[2])  # seq 1 again: line 4
        fh.write(second_config)  # line 5
        fh.write(lines[2].replace('"seq":1', '"seq":3'))  # line 6, after the second config

    doc, errors = run_document(log.path)
    assert [r["seq"] for r in doc["records"]] == [0, 1]
    assert [str(e) for e in errors] == [
        f"{log.path}:4: seq 1 repeats line 3's: two writers? (this record left out)",
        f"{log.path}:5: a second config record (the first is on line 2): this and the 1 record(s) after it "
        "are another run's and are left out",
    ]
    assert jsonify_logs.main([str(tmp_path / "logs"), "--out", str(tmp_path / "json")]) == 0
    err = capsys.readouterr().err
    assert f"{logs / 'empty.log'}:1: no records" in err and f"{logs / 'binary.log'}:1: no records" in err
    assert "binary or non-UTF-8 bytes" in err
    assert sorted(p.name for p in (tmp_path / "json" / "alexnet").iterdir()) == ["twice.json"]


def test_malformed_final_record_is_reported_and_skipped():
    good = {"kind": "final", "seq": 2, "method": "uniform", "target": 3.0, "decomposition": "ht2", "seed": 0}
    good |= {"test_top1_bn": 0.9, "macs_factor": 3.0, "params_factor": 2.5}
    bad = {"kind": "final", "seq": 3, "method": "energy", "target": 3.0, "decomposition": "ht2", "seed": 0}
    config_ = {"kind": "config", "seq": 0, "model": "alexnet", "dataset": "digits", "metric": "macs", "seed": 0}
    run = {"run_id": "r", "model": "alexnet", "source": "logs/alexnet/r.log", "records": [config_, good, bad]}
    with pytest.warns(UserWarning, match=r"logs/alexnet/r.log: final record \(seq 3\) lacks test_top1_bn"):
        table = summary_table([run])
    assert list(table["method"]) == ["uniform"]


def test_missing_cifar10_binaries_name_the_expected_layout_not_a_download_flag(tmp_path):
    from common.data.datasets import load_dataset

    with pytest.raises(FileNotFoundError) as e:
        load_dataset("cifar10", root=tmp_path, cache_dir=tmp_path / "cache")
    msg = str(e.value)
    assert str(tmp_path / "cifar-10-batches-py") in msg and "data_batch_1" in msg and "--data-root" in msg
    assert "download" not in msg


# --- every option checked before any work ----------------------------------------------------------- #

BAD_VALUES: dict[str, list[tuple[dict, str]]] = {
    "model": [({"model": "resnet50"}, "model must be one of")],
    "dataset": [({"dataset": "cifar"}, "dataset must be one of")],
    "data_root": [({"dataset": "imagefolder"}, "data_root: --dataset imagefolder needs --data-root DIR")],
    "stream": [({"stream": "maybe"}, "stream must be one of")],
    "crop_size": [({"crop_size": 0}, "crop_size must be at least 1")],
    "resize_size": [({"resize_size": -1}, "resize_size must be at least 1")],
    "targets": [({"targets": (1.0,)}, "finite number > 1"), ({"targets": ()}, "at least one reduction factor")],
    "metric": [({"metric": "flops"}, "metric must be one of")],
    "mean": [
        ({"mean": (0.5, 0.5, 0.5)}, "give mean and std together"),
        ({"mean": (0.5, 0.5), "std": (0.2, 0.2, 0.2)}, "mean must be 3 finite numbers"),
        ({"mean": (0.5, float("nan"), 0.5), "std": (0.2, 0.2, 0.2)}, "mean must be 3 finite numbers"),
    ],
    "std": [
        ({"std": (0.2, 0.2, 0.2)}, "give mean and std together"),
        ({"mean": (0.5, 0.5, 0.5), "std": (0.2, 0.0, 0.2)}, "std must be positive"),
    ],
    "budget_tol": [({"budget_tol": 0.5}, "budget_tol must be in (0, 0.5)"), ({"budget_tol": math.nan}, "budget_tol")],
    "methods": [({"methods": ("greedy",)}, "unknown rank-selection method 'greedy'")],
    "search_budget": [({"search_budget": 0}, "search_budget must be at least 1")],
    "n_seeds": [({"n_seeds": 0}, "n_seeds must be at least 1")],
    "proxy": [({"proxy": "acc"}, "proxy must be one of")],
    "rerank": [({"rerank": 0}, "rerank must be >= 1")],
    "shapes": [({"shapes": ("round",)}, "shapes must be a non-empty subset")],
    "final_calib_images": [({"final_calib_images": 1}, "final_calib_images must be at least 2")],
    "finetune_epochs": [({"finetune_epochs": -1.0}, "finetune_epochs must be a number of epochs >= 0")],
    "finetune_targets": [
        ({"targets": (3.0,), "finetune_targets": (5.0,)}, "finetune_targets must be among targets [3.0]; 5 is not"),
        ({"finetune_targets": (0.5,)}, "finite number > 1"),
    ],
    "finetune_lr": [
        ({"finetune_lr": -1.0}, "finetune_lr must be > 0 and finite, got -1.0"),
        ({"finetune_lr": math.inf}, "finetune_lr must be > 0 and finite"),
    ],
    "finetune_optimizer": [({"finetune_optimizer": "lbfgs"}, "finetune_optimizer must be one of sgd, adamw")],
    "finetune_clip": [({"finetune_clip": 0.0}, "finetune_clip must be > 0 and finite")],
    "finetune_warmup": [
        ({"finetune_warmup": 0.0}, "finetune_warmup must be in (0, 1)"),
        ({"finetune_warmup": 1.0}, "finetune_warmup must be in (0, 1)"),
    ],
    "finetune_batch_size": [({"finetune_batch_size": 0}, "finetune_batch_size must be at least 1")],
    "finetune_max_images": [({"finetune_max_images": 0}, "finetune_max_images must be at least 1")],
    "calib_images": [({"calib_images": 1}, "calib_images must be at least 2")],
    "val_images": [({"val_images": -5}, "val_images must be at least 1, got -5")],
    "sensitivity_levels": [
        ({"sensitivity_levels": (0.0, 1.5)}, "sensitivity_levels must be in (0, 1), got (0.0, 1.5) (item 0.0)"),
        ({"sensitivity_levels": (0.5, 1.5)}, "(item 1.5)"),
        ({"sensitivity_levels": ()}, "sensitivity_levels must hold at least one value"),
    ],
    "policy_rounds": [({"policy_rounds": 0}, "policy_rounds must be at least 1")],
    "temperature": [
        ({"temperature": 0.0}, "temperature must be > 0 and finite"),
        ({"temperature": math.nan}, "temperature must be > 0 and finite, got nan"),
    ],
    "rescore": [({"rescore": 2}, "rescore must be 0 (off) or at least 2 and at least rerank")],
    "rescore_images": [({"rescore_images": 1}, "rescore_images must be at least 2")],
    "refine": [({"refine": 1.0}, "refine must be a share of the search budget in [0, 1)")],
    "rank_multiple": [
        ({"rank_multiple": 0}, "rank_multiple must be at least 1"),
        ({"rank_multiple": -8}, "rank_multiple must be at least 1, got -8"),
    ],
    "latency_batches": [({"latency_batches": (1, 0)}, "latency_batches must be at least 1, got (1, 0) (item 0)")],
    "latency_threads": [({"latency_threads": 0}, "latency_threads must be at least 1")],
    "latency_devices": [({"latency_devices": ("tpu",)}, "latency_devices must be a non-empty subset of cpu, cuda")],
    "device": [({"device": "gpu"}, "device must be auto, cpu, cuda or cuda:N")],
    "seed": [({"seed": -1}, "seed must be at least 0")],
    "run_id": [({"run_id": "../x"}, "run_id '../x' is not usable as a file name")],
    "threads": [({"threads": 0}, "threads must be at least 1")],
    "deadline": [({"deadline": math.nan}, "deadline must be a finite number")],
}
"""Per field with a range or a choice: values out of it, and what the refusal says."""

EXEMPT: dict[str, str] = {
    "checkpoint": "a path: read and checked before any work by preflight (test_bad_inputs_are_refused_by_name)",
    "log_dir": "a path: must be a writable folder, checked by preflight (test_bad_inputs_are_refused_by_name)",
    "artifacts_dir": "a path: must be a writable folder of this run, checked by preflight",
    "policy_tucker2": "a switch: both values are valid (field_value refuses what is no bool)",
    "finetune_balance": "a switch",
    "distill": "a switch",
    "policy_knapsack": "a switch",
    "latency": "a switch",
    "artifacts": "a switch",
    "progress": "a switch",
}
"""Fields without a range of their own, and why."""


def test_every_config_field_is_range_checked_or_exempt_with_a_reason():
    """A new option must come with its validation (a case in BAD_VALUES) or a reason it needs none."""
    from common.run.validate import RANGES

    names = {f.name for f in dataclasses.fields(ExperimentConfig)}
    assert set(BAD_VALUES) | set(EXEMPT) == names, names ^ (set(BAD_VALUES) | set(EXEMPT))
    assert not set(BAD_VALUES) & set(EXEMPT) and all(why.strip() for why in EXEMPT.values())
    assert set(RANGES) <= set(BAD_VALUES)


@pytest.mark.parametrize("field", sorted(BAD_VALUES))
def test_a_value_out_of_range_is_refused_naming_the_field(field):
    for kwargs, phrase in BAD_VALUES[field]:
        with pytest.raises(ValueError) as exc:
            ExperimentConfig(**kwargs)
        assert phrase in str(exc.value), (kwargs, str(exc.value))


@pytest.mark.parametrize(
    "flags,phrase",
    [
        (["--finetune-lr", "-1"], "finetune_lr must be > 0 and finite"),
        (["--temperature", "0"], "temperature must be > 0 and finite"),
        (["--temperature", "nan"], "temperature must be > 0 and finite, got nan"),
        (["--finetune-batch-size", "0"], "finetune_batch_size must be at least 1"),
        (["--finetune-max-images", "0"], "finetune_max_images must be at least 1"),
        (["--val-images", "-5"], "val_images must be at least 1, got -5"),
        (["--rank-multiple", "0"], "rank_multiple must be at least 1"),
        (["--rank-multiple", "-8"], "rank_multiple must be at least 1, got -8"),
        (["--sensitivity-levels", "0,1.5"], "sensitivity_levels must be in (0, 1)"),
        (["--latency-batches", "0"], "latency_batches must be at least 1"),
        (["--targets", "3", "--finetune-targets", "2"], "finetune_targets must be among targets [3.0]; 2 is not"),
    ],
)
def test_options_found_late_or_never_are_refused_before_anything_is_written(
    flags, phrase, tmp_path, capsys, monkeypatch
):
    """Found: these failed 30-90 s in (after the baseline and the search) or ran silently, and the
    corrected value was then refused on resume. Now: exit 2 at once, naming the option; no log exists."""
    monkeypatch.setattr(experiment, "load_dataset", lambda *a, **k: pytest.fail("loaded data"))
    logs = tmp_path / "logs"
    with pytest.raises(SystemExit) as exc:
        experiment.main(["--model", "alexnet", "--dataset", "digits", "--log-dir", str(logs), "--run-id", "r", *flags])
    assert exc.value.code == 2 and phrase in capsys.readouterr().err
    assert not logs.exists()


def test_the_corrected_value_of_a_refused_option_starts_the_run(tmp_path, capsys, digits_checkpoint):
    ckpt = str(digits_checkpoint("alexnet", fit=False))
    argv = ["--model", "alexnet", "--dataset", "digits", "--checkpoint", ckpt, "--methods", "uniform", "--quiet"]
    argv += ["--log-dir", str(tmp_path / "logs"), "--run-id", "fixed", "--device", "cpu", "--deadline", "0"]
    with pytest.raises(SystemExit):
        experiment.main([*argv, "--finetune-lr", "-1"])
    assert "finetune_lr" in capsys.readouterr().err and not (tmp_path / "logs").exists()
    assert experiment.main([*argv, "--finetune-lr", "0.001"]) == []  # config and baseline, then the deadline
    (config_,) = [r for r in parse_log(tmp_path / "logs" / "alexnet" / "fixed.log")[0] if r["kind"] == "config"]
    assert config_["finetune_lr"] == 0.001


# --- state that outlives its log, and artifacts of two runs ------------------------------------------ #


def _noisy_copy(src: Path, dst: Path) -> Path:
    """``src``'s state_dict with seeded noise on the conv weights (another baseline, same shapes)."""
    state = torch.load(src, weights_only=True)
    g = torch.Generator().manual_seed(7)
    for name, tensor in state.items():
        if name.startswith("features.") and name.endswith(".weight") and tensor.dim() == 4:
            tensor += 0.05 * tensor.std() * torch.randn(tensor.shape, generator=g)
    torch.save(state, dst)
    return dst


@pytest.mark.slow
def test_a_finetune_checkpoint_left_by_a_deleted_log_is_discarded_not_resumed(tmp_path, digits_checkpoint, monkeypatch):
    """Found: run A was killed once its finetune checkpoint existed, its log deleted (as the resume refusal
    says), and run B (another baseline, same run id) "resumed the finetuning": it published A's model."""
    import common.run.finals as finals

    a = tmp_path / "A.pt"
    a.write_bytes(digits_checkpoint("alexnet", fit=False).read_bytes())
    b = _noisy_copy(a, tmp_path / "B.pt")
    kw = {"methods": ("uniform",), "finetune_epochs": 0.2, "final_calib_images": 64, "artifacts": False}
    run_a = config(tmp_path, a, "st", **kw, sensitivity_levels=(0.5,))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # after the finetuning checkpointed, before its final record

    monkeypatch.setattr(finals, "_write_final", killed)
    with pytest.raises(KeyboardInterrupt):
        run_experiment(run_a)
    monkeypatch.undo()
    (stale,) = log_file(run_a).parent.glob("st.finetune-*.pt")
    log_file(run_a).unlink()

    run_b = dataclasses.replace(run_a, checkpoint=str(b))
    (final,) = run_experiment(run_b)
    text = log_file(run_b).read_text()
    assert f"discarded the finetune checkpoint {stale}: it belongs to another dense_checkpoint, log" in text
    assert "resuming from the finetune checkpoint" not in text and not stale.exists()
    (alone,) = run_experiment(dataclasses.replace(run_b, log_dir=str(tmp_path / "alone")))
    assert final["test_hits_ft"] == alone["test_hits_ft"] and final["val_top1_ft"] == alone["val_top1_ft"]


@pytest.mark.slow
def test_two_log_folders_with_one_run_id_keep_their_own_artifacts(tmp_path, digits_checkpoint):
    """Found: two log folders under one parent with the same run id shared ``<parent>/artifacts``, and run
    B overwrote run A's model. The default folder names the log folder; a shared one is refused."""
    a = tmp_path / "A.pt"
    a.write_bytes(digits_checkpoint("alexnet", fit=False).read_bytes())
    kw = {"methods": ("uniform",), "final_calib_images": 64, "sensitivity_levels": (0.5,), "artifacts_dir": None}
    run_a = config(tmp_path / "logsA", a, "same", **kw)
    run_b = config(tmp_path / "logsB", _noisy_copy(a, tmp_path / "B.pt"), "same", **kw)
    assert run_a.artifact_folder() == Path(tmp_path / "artifacts" / "logsA" / "alexnet" / "same")
    (fa,), (fb,) = run_experiment(run_a), run_experiment(run_b)
    path_a, path_b = Path(fa["artifacts"]["bn"]["path"]), Path(fb["artifacts"]["bn"]["path"])
    assert path_a != path_b and path_b.parent == tmp_path / "artifacts" / "logsB" / "alexnet" / "same"
    assert file_sha256(path_a) == fa["artifacts"]["bn"]["sha256"]  # A's file is still A's
    assert read_artifact(path_a)["owner"] == str(log_file(run_a).resolve())

    # an explicit folder two runs share: the second is refused before any work, naming the first's log
    shared = dataclasses.replace(
        run_b, log_dir=str(tmp_path / "logsC"), artifacts_dir=str(tmp_path / "artifacts" / "logsA")
    )
    with pytest.raises(PreflightError, match=r"uniform-x3-ht2\.pt belongs to another run, whose log is .*logsA"):
        run_experiment(shared)
    assert file_sha256(path_a) == fa["artifacts"]["bn"]["sha256"]


def test_jsonify_converts_every_good_log_and_names_each_bad_one(tmp_path, capsys):
    """Found: one crafted log with a path-traversal run id stopped jsonify_logs.py from converting the good
    logs beside it, without naming the file."""
    logs = tmp_path / "logs" / "alexnet"
    for run_id in ("good1", "good2"):
        log = RunLog(tmp_path / "logs", "alexnet", run_id)
        log.write("config", model="alexnet", dataset="digits", metric="macs", methods=["uniform"], seed=0)
        log.close()
    good = (logs / "good1.log").read_text()
    (logs / "evil.log").write_text(good.replace('"run_id":"good1"', '"run_id":"../../escaped"'))
    (logs / "twin.log").write_text(good)  # a second log of run good1
    out = tmp_path / "json"
    assert jsonify_logs.main([str(tmp_path / "logs"), "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{logs / 'evil.log'}:2: run_id '../../escaped' is not usable as a file name" in err
    assert f"{logs / 'twin.log'}:2: run 'good1' of model 'alexnet' is also {logs / 'good1.log'}'s" in err
    assert sorted(p.name for p in out.rglob("*.json")) == ["good1.json", "good2.json"]
    assert not (tmp_path / "escaped.json").exists() and not list(tmp_path.glob("*.json"))
    assert jsonify_logs.main([str(tmp_path / "logs"), "--out", str(out), "--strict"]) == 1
    assert jsonify_logs.main([str(logs / "evil.log"), "--out", str(out)]) == 1  # nothing converted


def _imagefolder(root: Path, splits=("train", "val", "test"), corrupt: str | None = None) -> Path:
    """A 2-class ImageFolder of 8x8 PNGs under ``root``; ``corrupt`` names a split with one unreadable file."""
    from PIL import Image

    for split in splits:
        for c in ("a", "b"):
            (root / split / c).mkdir(parents=True)
            for i in range(4):
                Image.new("RGB", (8, 8), (40 * i, 100 if c == "a" else 0, 0)).save(root / split / c / f"{i}.png")
    if corrupt:
        (root / corrupt / "a" / "bad.png").write_bytes(b"not a png")
    return root


def _main(argv: list[str], capsys) -> str:
    """``python -m common.run argv``: must exit 2; returns its stderr."""
    with pytest.raises(SystemExit) as exc:
        experiment.main([*argv, "--methods", "uniform", "--device", "cpu", "--quiet"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err


def test_an_imagefolder_without_a_test_split_is_named_before_any_log(tmp_path, capsys):
    data = _imagefolder(tmp_path / "data", splits=("train", "val"))
    logs = tmp_path / "logs"
    err = _main(
        ["--model", "alexnet", "--dataset", "imagefolder", "--data-root", str(data), "--log-dir", str(logs)], capsys
    )
    assert f"dataset {data} has no test/ folder ({data / 'test'} not found)" in err
    assert list(logs.rglob("*.log")) == []  # refused before a log was made


def test_a_torchvision_imagenet_checkpoint_names_the_model_it_fits(tmp_path, capsys):
    import torchvision

    ckpt = tmp_path / "resnet18-imagenet.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18().state_dict(), ckpt)
    logs = tmp_path / "logs"
    err = _main(
        ["--model", "resnet18", "--dataset", "digits", "--checkpoint", str(ckpt), "--log-dir", str(logs)], capsys
    )
    assert f"checkpoint {ckpt} holds a resnet18_imagenet state_dict" in err and "use --model resnet18_imagenet" in err
    assert list(logs.rglob("*.log")) == []
    # a state_dict of no registered model says how it differs from the one asked for
    state = torchvision.models.resnet18().state_dict()
    del state["fc.bias"]
    torch.save(state, ckpt)
    err = _main(
        ["--model", "resnet18", "--dataset", "digits", "--checkpoint", str(ckpt), "--log-dir", str(logs)], capsys
    )
    assert "is no resnet18 state_dict, nor one of any other model" in err and "missing keys [fc.bias]" in err


def test_a_run_that_fails_before_its_baseline_leaves_no_header_only_log(tmp_path, digits_checkpoint):
    data = _imagefolder(tmp_path / "data", corrupt="val")
    cfg = dataclasses.replace(
        config(tmp_path / "logs", digits_checkpoint("alexnet", fit=False), "bad-image", methods=("uniform",)),
        dataset="imagefolder",
        data_root=str(data),
        stream="off",
    )
    with pytest.raises(ValueError, match="cannot decode image .*bad.png"):
        run_experiment(cfg)
    assert not log_file(cfg).exists()

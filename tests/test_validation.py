"""Runs a researcher can trust: bad inputs refused up front by name, one writer per log, resumes only
with the same checkpoint bytes and dataset, and junk logs reported instead of read as runs."""

from __future__ import annotations

import dataclasses
import hashlib
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
from common.data.splits import TensorSplit
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


def test_resume_with_other_checkpoint_bytes_or_dataset_is_refused(tmp_path, digits_checkpoint, digits, monkeypatch):
    ckpt = tmp_path / "weights.pt"
    ckpt.write_bytes(digits_checkpoint("alexnet", fit=False).read_bytes())
    cfg = config(tmp_path, ckpt, "fp", methods=("uniform",), deadline=0.0)
    assert run_experiment(cfg) == []
    logged = [r for r in parse_log(log_file(cfg))[0] if r["kind"] == "config"][0]
    assert logged["checkpoint_sha256"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()
    sizes = {s: len(digits.split(s).labels) for s in ("train", "val", "test")}
    assert logged["dataset_identity"] == {"name": "digits", "root": "embedded:digits", "sizes": sizes}
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
    with pytest.raises(PreflightError, match=r"differs in dataset_identity:\n  dataset_identity: logged"):
        run_experiment(cfg)


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

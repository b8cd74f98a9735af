"""Tests for common.run.logs (run-log format, resume, corruption handling), common.run.documents and jsonify_logs.py."""

from __future__ import annotations

import json
import math
import os
from datetime import UTC
from pathlib import Path

import numpy as np
import pytest
import torch

import jsonify_logs
from common.run.documents import jsonify, load_document, records_of
from common.run.jsonvalues import decode_value, encode_value
from common.run.logs import KIND_KEYS, RunLog, config_record, parse_log, plan_records


def same(a, b) -> bool:
    """Deep equality with NaN == NaN and exact types for scalars (1 != 1.0 != True)."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


def _reject_constant(name: str):
    raise AssertionError(f"non-standard JSON constant {name} in log")


# One payload per kind, mixing numpy / torch scalars, tuples and non-finite floats; and the plain
# values a reader must get back.
PAYLOADS = {
    "config": (
        dict(
            model="resnet18",
            dataset="cifar10-jpeg",
            data_root=Path("../shared/data"),
            checkpoint="x.pt",
            target=3.0,
            metric="macs",
            methods=("uniform", "policy"),
            search_budget=np.int64(64),
            finetune=np.bool_(True),
            finetune_epochs=2,
            proxy={"train": 512, "val": 256},
            device=torch.device("cpu"),
            seed=0,
            run_id="r1",
            decomposition="ht2",
        ),
        dict(
            model="resnet18",
            dataset="cifar10-jpeg",
            data_root="../shared/data",
            checkpoint="x.pt",
            target=3.0,
            metric="macs",
            methods=["uniform", "policy"],
            search_budget=64,
            finetune=True,
            finetune_epochs=2,
            proxy={"train": 512, "val": 256},
            device="cpu",
            seed=0,
            run_id="r1",
            decomposition="ht2",
        ),
    ),
    "baseline": (
        dict(
            val_top1=np.float64(0.9142),
            test_top1=torch.tensor(0.5, dtype=torch.float64),
            params=torch.tensor(11173962),
            macs=np.int32(555),
            conv_params=1,
            conv_macs=2,
            latency={"cpu_t1": float("inf"), "cuda": float("nan")},
        ),
        dict(
            val_top1=0.9142,
            test_top1=0.5,
            params=11173962,
            macs=555,
            conv_params=1,
            conv_macs=2,
            latency={"cpu_t1": math.inf, "cuda": math.nan},
        ),
    ),
    "layers": (
        dict(
            layers=[
                dict(
                    name="conv1",
                    weight_shape=torch.Size([64, 3, 3, 3]),
                    in_hw=(32, 32),
                    out_hw=(32, 32),
                    params=1728,
                    macs=1769472,
                    eligible=False,
                    reason="too small",
                )
            ]
        ),
        dict(
            layers=[
                dict(
                    name="conv1",
                    weight_shape=[64, 3, 3, 3],
                    in_hw=[32, 32],
                    out_hw=[32, 32],
                    params=1728,
                    macs=1769472,
                    eligible=False,
                    reason="too small",
                )
            ]
        ),
    ),
    "sensitivity": (
        dict(
            layer="layer1.0.conv1",
            level=np.float32(0.25),
            ranks=np.array([8, 16]),
            score=float("-inf"),
            macs=10,
            params=20,
        ),
        dict(
            layer="layer1.0.conv1",
            level=0.25,
            ranks=[8, 16],
            score=-math.inf,
            macs=10,
            params=20,
        ),
    ),
    "rescore": (
        dict(method="policy", target=3.0, index=np.int64(4), score=np.float64(-0.21), calib_images=1024, seed=2),
        dict(method="policy", target=3.0, index=4, score=-0.21, calib_images=1024, seed=2),
    ),
    "candidate": (
        dict(
            method="random",
            target=3.0,
            index=np.int64(7),
            plan={"layer1.0.conv1": {"method": "ht2", "ranks": (4, 5, 6)}},
            score=torch.tensor(0.75),
            macs_factor=3.1,
            params_factor=2.9,
            seed=1,
            round=0,
        ),
        dict(
            method="random",
            target=3.0,
            index=7,
            plan={"layer1.0.conv1": {"method": "ht2", "ranks": [4, 5, 6]}},
            score=0.75,
            macs_factor=3.1,
            params_factor=2.9,
            seed=1,
            round=0,
        ),
    ),
    "plan": (
        dict(
            method="policy",
            target=3.0,
            metric="macs",
            achieved_factor=3.02,
            macs_factor=3.02,
            params_factor=2.5,
            plan={},
            evaluations=64,
            search_seconds=1.5,
            decomposition="ht2",
        ),
        None,
    ),
    "finetune_epoch": (
        dict(
            method="policy",
            target=3.0,
            epoch=1,
            images_seen=45000,
            train_loss=float("nan"),
            val_top1=0.9,
            lr=0.01,
            seconds=12.5,
        ),
        None,
    ),
    "final": (
        dict(
            method="policy",
            target=3.0,
            decomposition="ht2",
            val_top1_bn=0.88,
            test_top1_bn=0.87,
            val_top1_ft=None,
            test_top1_ft=None,
            params=100,
            macs=200,
            params_factor=2.5,
            macs_factor=3.02,
            latency_ms={"cpu_t1": 3.5},
            speedup={"cpu_t1": 1.9},
            evaluations=64,
            wall_seconds=99.0,
            finetune_epochs=0,
        ),
        None,
    ),
    "timing": (dict(stage="search", seconds=np.float16(1.5)), dict(stage="search", seconds=1.5)),
    "end": (dict(status="ok", wall_seconds=100.0), None),
    "my_extra_kind": (dict(anything={"nested": [1, 2.5, None, "x"]}), None),
}


def write_all(log: RunLog) -> list[dict]:
    return [log.write(kind, f"{kind} text", **payload) for kind, (payload, _) in PAYLOADS.items()]


def test_every_known_kind_is_exercised():
    assert set(KIND_KEYS) <= set(PAYLOADS)


def test_round_trip_every_kind(tmp_path):
    log = RunLog(tmp_path, "resnet18", "r1")
    assert log.path == tmp_path / "resnet18" / "r1.log"
    written = write_all(log)
    records, errors = parse_log(log.path)
    assert errors == []
    assert len(records) == len(PAYLOADS)
    for seq, (record, back, (kind, (payload, expected))) in enumerate(zip(records, written, PAYLOADS.items())):
        assert same(record, back), kind
        assert record["kind"] == kind and record["run_id"] == "r1" and record["seq"] == seq
        assert isinstance(record["t"], float)
        body = {k: v for k, v in record.items() if k not in ("kind", "run_id", "t", "seq")}
        expected = {k: v for k, v in (expected or payload).items() if k != "run_id"}
        assert same(body, expected), kind
    # The file is human-readable lines with standard JSON (no NaN/Infinity tokens).
    lines = [ln for ln in log.path.read_text().splitlines() if not ln.startswith("#")]
    assert len(lines) == len(PAYLOADS)
    for line, kind in zip(lines, PAYLOADS):
        head, payload = line.split(" @@ ", 1)
        assert head.split()[1] == kind.upper() and f"{kind} text" in head
        json.loads(payload, parse_constant=_reject_constant)
    assert '"nan"' in log.path.read_text() and '"-inf"' in log.path.read_text()
    assert log.records("timing")[0]["seconds"] == 1.5


def test_write_validates_input(tmp_path):
    log = RunLog(tmp_path, "m", "r")
    with pytest.raises(ValueError, match="lacks required key"):
        log.write("candidate", method="random", target=3.0)
    with pytest.raises(ValueError, match="reserved"):
        log.write("timing", stage="x", seconds=1.0, seq=3)
    with pytest.raises(ValueError, match="reserved"):
        log.write("timing", stage="x", seconds=1.0, run_id="other")
    with pytest.raises(ValueError, match=r"timing\.stage.*reserved for non-finite"):
        log.write("timing", stage="nan", seconds=1.0)
    with pytest.raises(TypeError, match=r"timing\.extra.*key 3"):
        log.write("timing", stage="x", seconds=1.0, extra={3: "int key"})
    with pytest.raises(TypeError, match="object"):
        log.write("timing", stage="x", seconds=1.0, extra=object())
    with pytest.raises(ValueError, match="kind"):
        log.write("Bad Kind")
    with pytest.raises(ValueError, match="run_id"):
        RunLog(tmp_path, "m", "../escape")
    assert log.records() == []  # nothing half-written
    assert parse_log(log.path) == ([], [])


def test_text_is_one_line_and_cannot_fake_the_separator(tmp_path):
    log = RunLog(tmp_path, "m", "r")
    log.write("timing", 'multi\nline @@@ {"kind": "end"} @', stage="s", seconds=2.0)
    log.write("timing", stage="a @@@@ b", seconds=3.0)  # auto text from the payload
    log.comment("note @@ not a record\nsecond line")
    records, errors = parse_log(log.path)
    assert errors == [] and [r["stage"] for r in records] == ["s", "a @@@@ b"]
    lines = log.path.read_text().splitlines()
    assert len(lines) == 4  # header, 2 records, comment
    assert lines[3] == "# note @ @ not a record second line"
    assert all("@@" not in line.split(" @@ ", 1)[0] for line in lines[1:])


def test_resume_with_find(tmp_path):
    log = RunLog(tmp_path, "vgg16", "run-7")
    for i in range(3):
        for method in ("random", "policy"):
            log.write(
                "candidate",
                method=method,
                target=3.0,
                index=i,
                score=0.1 * i + 0.01,
                macs_factor=3.0,
                params_factor=2.0,
                plan={"c": {"ranks": (i, i)}},
            )
    log.write("plan", method="random", target=3.0, metric="macs", plan={}, loss=float("nan"))
    del log

    log = RunLog(tmp_path, "vgg16", "run-7")  # a restarted run
    assert len(log.records()) == 7 and log.errors == []
    hit = log.find("candidate", method="policy", index=np.int64(1))
    assert hit["seq"] == 3 and hit["score"] == pytest.approx(0.11)
    assert log.find("candidate", method="random")["index"] == 2  # the last match
    assert log.find("candidate", plan={"c": {"ranks": (1, 1)}})["seq"] == 3  # tuple == list
    assert log.find("plan", loss=float("nan"))["method"] == "random"  # NaN matches NaN
    assert log.find("candidate", method="policy", index=5) is None
    assert log.find("final") is None
    new = log.write(
        "final",
        method="random",
        target=3.0,
        decomposition="ht2",
        test_top1_bn=0.5,
        macs_factor=3.0,
        params_factor=2.0,
    )
    assert new["seq"] == 7
    assert log.find("final", method="random")["seq"] == 7
    assert [r["seq"] for r in parse_log(log.path)[0]] == list(range(8))
    # records() hands out copies: callers cannot corrupt the log's memory.
    log.records("final")[0]["method"] = "tampered"
    assert log.find("final")["method"] == "random"


def test_a_log_at_a_path_of_its_own_resumes_and_names_its_records(tmp_path):
    path = tmp_path / "out" / "mm.measured.log"
    log = RunLog.at(path, "alexnet", "matched_macs")
    log.write("timing", stage="a", seconds=1.0)
    del log
    log = RunLog.at(path, "alexnet", "matched_macs")
    assert log.path == path and [r["stage"] for r in log.records()] == ["a"]
    assert log.write("timing", stage="b", seconds=2.0)["seq"] == 1
    assert [(r["run_id"], r["seq"]) for r in parse_log(path)[0]] == [("matched_macs", 0), ("matched_macs", 1)]
    assert path.read_text().startswith("# run log model=alexnet run_id=matched_macs")
    with pytest.raises(ValueError, match="run_id"):
        RunLog.at(tmp_path / "x.log", "alexnet", "no spaces")


def _damaged_log(tmp_path) -> tuple[Path, list[dict]]:
    log = RunLog(tmp_path, "alexnet", "crash")
    good = [log.write("timing", stage=f"s{i}", seconds=float(i)) for i in range(4)]
    lines = log.path.read_text().splitlines(keepends=True)
    # lines: 0 header, 1..4 records. Insert garbage after record 2, then cut the last record.
    lines.insert(3, '2025-01-01T00:00:00.000Z TIMING  x @@ {"kind": "timing", "stage": \x00\n')
    lines.insert(4, "just a free-text comment line\n")
    lines.insert(5, '2025-01-01T00:00:00.000Z TIMING  no kind @@ {"stage": "s9"}\n')
    lines.insert(6, "2025-01-01T00:00:00.000Z TIMING  cut before the payl\n")
    lines.insert(7, '2025-01-01T00:00:00.000Z END  mismatch @@ {"kind": "timing"}\n')
    lines[-1] = lines[-1][: len(lines[-1]) // 2]
    log.path.write_text("".join(lines))
    return log.path, good


def test_corrupt_lines_are_reported_and_skipped(tmp_path):
    path, good = _damaged_log(tmp_path)
    records, errors = parse_log(path)
    assert [r["seq"] for r in records] == [0, 1, 2]
    assert all(same(r, g) for r, g in zip(records, good))
    assert [e.line_no for e in errors] == [4, 6, 7, 8, 10]
    messages = [str(e) for e in errors]
    assert messages[0].startswith(f"{path}:4: bad JSON")
    assert "no 'kind'" in messages[1]
    assert "truncated record" in messages[2]
    assert "kind mismatch" in messages[3]
    assert messages[4].startswith(f"{path}:10: bad JSON") and "cut off" in messages[4]


def test_append_after_cut_off_line(tmp_path):
    path, good = _damaged_log(tmp_path)
    log = RunLog(tmp_path, "alexnet", "crash")
    assert [e.line_no for e in log.errors] == [4, 6, 7, 8, 10]
    assert [r["seq"] for r in log.records()] == [0, 1, 2]
    new = log.write("end", status="resumed")
    assert new["seq"] == 3  # continues after the last good record
    records, errors = parse_log(path)
    assert [r["kind"] for r in records] == ["timing"] * 3 + ["end"]
    assert same(records[-1], new)
    # The cut line stays a single corrupt line; the new record was not glued onto it.
    assert [e.line_no for e in errors] == [4, 6, 7, 8, 10]
    assert path.read_text().splitlines()[10].startswith(new_time_prefix(new))


def new_time_prefix(record: dict) -> str:
    from datetime import datetime

    return datetime.fromtimestamp(record["t"], UTC).strftime("%Y-%m-%dT%H:%M:%S")


def test_decode_and_encode_are_inverse():
    value = {"a": [1.5, math.nan, math.inf, -math.inf, "x", None, True], "b": {"c": (1, 2)}}
    encoded = encode_value(value)
    assert json.loads(json.dumps(encoded, allow_nan=False)) == encoded
    assert same(decode_value(encoded), {**value, "b": {"c": [1, 2]}})


def _two_runs(root: Path) -> dict[str, list[dict]]:
    written = {}
    a = RunLog(root, "resnet18", "r1")
    written["r1"] = write_all(a)
    b = RunLog(root, "vgg16", "b1")
    written["b1"] = [
        b.write("config", model="vgg16", dataset="d", metric="params", methods=["uniform"], seed=3),
        b.write("timing", stage="x", seconds=math.inf),
    ]
    with open(b.path, "a") as fh:
        fh.write('2025-01-01T00:00:00Z TIMING broken @@ {"kind": "timing"\n')
    return written


def test_jsonify_is_lossless_and_idempotent(tmp_path, caplog):
    written = _two_runs(tmp_path / "logs")
    out = tmp_path / "json"
    paths = jsonify(tmp_path / "logs", out)
    assert paths == [out / "resnet18" / "r1.json", out / "vgg16" / "b1.json"]
    first = {p: p.read_bytes() for p in paths}
    assert "b1.log:4: bad JSON" in caplog.text
    assert jsonify([tmp_path / "logs", tmp_path / "logs" / "vgg16" / "b1.log"], out) == paths
    assert {p: p.read_bytes() for p in paths} == first  # byte-identical on re-run
    assert sorted(p.name for p in out.rglob("*")) == ["b1.json", "r1.json", "resnet18", "vgg16"]

    for path, run_id in zip(paths, ["r1", "b1"]):
        raw = json.loads(path.read_text(), parse_constant=_reject_constant)
        assert list(raw) == ["run_id", "model", "source", "records", "errors"]  # records once
        doc = load_document(path)
        assert doc["run_id"] == run_id
        assert len(doc["records"]) == len(written[run_id])
        assert all(same(r, w) for r, w in zip(doc["records"], written[run_id]))
        for kind in {w["kind"] for w in written[run_id]}:
            assert same(records_of(doc, kind), [w for w in written[run_id] if w["kind"] == kind])
    doc_b = load_document(paths[1])
    assert doc_b["model"] == "vgg16" and doc_b["source"].endswith("logs/vgg16/b1.log")
    assert len(doc_b["errors"]) == 1
    assert doc_b["errors"][0].endswith(
        "b1.log:4: bad JSON after '@@': Expecting ',' delimiter: line 1 column 18 (char 17)"
    )
    assert doc_b["records"][1]["seconds"] == math.inf


def test_jsonify_reports_the_second_log_of_one_run_and_converts_the_first(tmp_path):
    RunLog(tmp_path / "x", "m", "r").write("end", status="ok")
    RunLog(tmp_path / "y", "m", "r").write("end", status="ok")
    errors = []
    assert jsonify([tmp_path / "x", tmp_path / "y"], tmp_path / "json", on_error=errors.append) == [
        tmp_path / "json" / "m" / "r.json"
    ]
    (err,) = errors
    assert err.path == str(tmp_path / "y" / "m" / "r.log") and err.line_no == 2
    assert f"run 'r' of model 'm' is also {tmp_path / 'x' / 'm' / 'r.log'}'s" in err.reason


def test_jsonify_cli(tmp_path, capsys):
    _two_runs(tmp_path / "logs")
    out = tmp_path / "out"
    assert jsonify_logs.main([str(tmp_path / "logs"), "--out", str(out)]) == 0
    captured = capsys.readouterr()
    assert "b1.log:4: bad JSON" in captured.err
    assert str(out / "vgg16" / "b1.json") in captured.out
    assert (out / "resnet18" / "r1.json").stat().st_size > 0

    empty = tmp_path / "empty"
    empty.mkdir()
    assert jsonify_logs.main([str(empty), "--out", str(out)]) == 2
    assert "no run logs" in capsys.readouterr().err
    assert jsonify_logs.main([str(tmp_path / "missing.log")]) == 2
    assert "missing.log" in capsys.readouterr().err


def test_records_of_and_documents_with_the_old_by_kind_copy(tmp_path):
    _two_runs(tmp_path / "logs")
    (path, _) = jsonify(tmp_path / "logs", tmp_path / "json")
    raw = json.loads(path.read_text())
    kinds = [r["kind"] for r in raw["records"]]
    assert records_of(raw, "nope") == [] and records_of({}, "config") == []
    plans = records_of(raw, "plan")
    assert plans and [r["seq"] for r in plans] == [r["seq"] for r in raw["records"] if r["kind"] == "plan"]
    assert plans[0] is next(r for r in raw["records"] if r["kind"] == "plan")  # not a copy
    # A document written before by_kind was dropped loads to the same document.
    old = dict(raw)
    old["by_kind"] = {k: [r for r in raw["records"] if r["kind"] == k] for k in dict.fromkeys(kinds)}
    old_path = tmp_path / "old.json"
    old_path.write_text(json.dumps(old))
    assert same(load_document(old_path), load_document(path))
    assert "by_kind" not in load_document(old_path)


def test_atomic_write_replaces_whole_file_or_nothing(tmp_path):
    from common.files import atomic_write

    target = tmp_path / "sub" / "doc.json"
    assert atomic_write(target, lambda fh: fh.write(b"first")) == target
    assert target.read_bytes() == b"first" and (target.stat().st_mode & 0o777) == 0o644

    def crash(fh):
        fh.write(b"partial")
        raise KeyboardInterrupt("simulated crash")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == b"first"  # untouched
    assert sorted(p.name for p in target.parent.iterdir()) == ["doc.json"]  # no temp file left


def test_jsonify_leaves_an_unchanged_document_alone(tmp_path):
    _two_runs(tmp_path / "logs")
    paths = jsonify(tmp_path / "logs", tmp_path / "json")
    for p in paths:
        os.utime(p, ns=(10**9, 10**9))
    assert jsonify(tmp_path / "logs", tmp_path / "json") == paths
    assert [p.stat().st_mtime_ns for p in paths] == [10**9, 10**9]  # not rewritten
    paths[0].write_text("stale")
    jsonify(tmp_path / "logs", tmp_path / "json")
    assert load_document(paths[0])["run_id"] == "r1"  # a changed document is rewritten


def test_plan_records_keep_the_latest_per_method_seed_and_target():
    recs = [
        {"kind": "config", "model": "m", "seq": 0},
        {"kind": "plan", "method": "energy", "target": 3, "score": 1.0},  # before seeds: seed 0
        {"kind": "plan", "method": "policy", "seed": 1, "target": 3.0, "score": 2.0},
        {"kind": "plan", "method": "policy", "seed": 1, "target": 3.0, "score": 3.0, "decomposition": "tucker2"},
        {"kind": "plan", "method": "policy", "seed": 1, "target": 2.0, "score": 4.0, "decomposition": "ht2"},
        {"kind": "plan", "method": "policy", "seed": 1, "target": 3.0, "score": 5.0},  # resumed: the latest wins
        {"kind": "config", "model": "m", "seq": 9},
    ]
    got = plan_records(recs)
    assert list(got) == [("energy", 0, 3.0), ("policy", 1, 3.0), ("policy", 1, 2.0)]
    assert [r["score"] for r in got.values()] == [1.0, 5.0, 4.0]
    assert [r["score"] for r in plan_records(recs, "tucker2").values()] == [3.0]
    assert config_record(recs, "x.log")["seq"] == 0
    with pytest.raises(ValueError, match=r"x\.log: no config record"):
        config_record(recs[1:-1], "x.log")

"""Artifacts: a compressed model saved with what describes it, rebuilt from the file alone; damaged,
tampered or mismatched files are refused naming the file (and the layer); one run's file is never
replaced by another run's."""

from __future__ import annotations

import hashlib
import io
import json
import pickle
import struct
import zipfile

import pytest
import torch

from common.decompose.surgery import LayerPlan, apply_plan
from common.deploy.artifacts import (
    FORMAT_V1,
    ArtifactError,
    artifact_owner,
    file_sha256,
    load_compressed,
    read_artifact,
    save_artifact,
)
from tests.helpers import fast_model

PLAN = {"features.3": LayerPlan("ht2", (16, 16, 16)), "features.6": LayerPlan("tucker2", (32, 32))}
DESCRIPTION = {"base_model": "alexnet", "num_classes": 10, "input_size": 32, "mean": (0.5,) * 3, "std": (0.25,) * 3}


@pytest.fixture(scope="module")
def compressed():
    return apply_plan(fast_model("alexnet", seed=1), PLAN).eval()


@pytest.fixture
def saved(compressed, tmp_path):
    info = save_artifact(tmp_path / "a.pt", compressed, PLAN, **DESCRIPTION, metrics={"test_top1": 0.5})
    return tmp_path / "a.pt", info


def _x() -> torch.Tensor:
    return torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))


def test_round_trip_gives_the_same_model(compressed, saved):
    path, info = saved
    assert info == {"path": str(path), "sha256": file_sha256(path)}
    loaded = load_compressed(path)
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(_x()), compressed(_x()))
    assert type(loaded.features[3]).__name__ == "HT2Conv2d" and loaded.features[3].ranks == (16, 16, 16)
    doc = read_artifact(path)
    assert doc["model"] == "alexnet" and doc["input_size"] == 32 and doc["metrics"] == {"test_top1": 0.5}
    assert doc["plan"]["features.6"] == {"method": "tucker2", "ranks": [32, 32]}
    assert set(doc["versions"]) == {"torch", "torchvision", "python"}


def test_truncated_or_foreign_files_are_refused_by_name(saved, tmp_path):
    path, _ = saved
    short = tmp_path / "short.pt"
    short.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match=r"short\.pt is unreadable"):
        load_compressed(short)
    with pytest.raises(ArtifactError, match=r"missing\.pt: no such file"):
        load_compressed(tmp_path / "missing.pt")
    other = tmp_path / "weights.pt"
    torch.save({"conv.weight": torch.zeros(1)}, other)
    with pytest.raises(ArtifactError, match=r"weights\.pt is not a compressed-model artifact"):
        load_compressed(other)


class _Boom:
    def __reduce__(self):
        return (print, ("code ran",))


def test_a_pickle_with_code_is_refused_without_running_it(tmp_path, capsys):
    evil = tmp_path / "evil.pt"
    torch.save({"format": "htd-compressed-model/1", "x": _Boom()}, evil, pickle_module=pickle)
    with pytest.raises(ArtifactError, match=r"evil\.pt is unreadable"):
        read_artifact(evil)
    assert "code ran" not in capsys.readouterr().out


def _rewrite(path, change) -> None:
    """Load the artifact's dict, change it, save it back as it is (checksum untouched)."""
    doc = torch.load(path, weights_only=True)
    change(doc)
    torch.save(doc, path)


def test_tampered_tensor_or_plan_is_caught_by_the_checksum(saved):
    path, _ = saved

    def bump(doc):
        doc["state_dict"]["features.3.first.weight"][0, 0] += 1e-3

    _rewrite(path, bump)
    with pytest.raises(ArtifactError, match=r"a\.pt: its contents differ .*checksum"):
        load_compressed(path)


def _flip_low_bit(x: float) -> float:
    return struct.unpack("<d", struct.pack("<q", struct.unpack("<q", struct.pack("<d", x))[0] ^ 1))[0]


@pytest.mark.parametrize(
    "change",
    [
        lambda doc: doc["mean"].__setitem__(0, 0.6),
        lambda doc: doc["mean"].__setitem__(1, _flip_low_bit(doc["mean"][1])),  # one bit of the stored mean
        lambda doc: doc["std"].__setitem__(2, 0.3),
        lambda doc: doc["metrics"].__setitem__("test_top1", 0.99),
        lambda doc: doc["plan"]["features.6"].__setitem__("method", "ht2"),
        lambda doc: doc.__setitem__("input_size", 64),
        lambda doc: doc["versions"].__setitem__("torch", "0.1"),
        lambda doc: doc.__setitem__("owner", "/elsewhere/run.log"),
    ],
    ids=["mean", "mean-bit", "std", "metrics", "plan", "input_size", "versions", "owner"],
)
def test_every_stored_value_is_covered_by_the_checksum(saved, change):
    path, _ = saved
    _rewrite(path, change)
    with pytest.raises(ArtifactError, match=r"a\.pt: its contents differ .*checksum mismatch"):
        read_artifact(path)


def test_a_first_format_file_loads_with_a_warning_and_its_tensors_still_checked(saved, compressed):
    path, _ = saved

    def first_format(doc):  # as files were written before the checksum covered everything
        h = hashlib.sha256(json.dumps(doc["plan"], sort_keys=True, separators=(",", ":")).encode())
        for name in sorted(doc["state_dict"]):
            t = doc["state_dict"][name].contiguous()
            h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        doc.update(format=FORMAT_V1, content_sha256=h.hexdigest())
        doc.pop("owner")

    _rewrite(path, first_format)
    with pytest.warns(UserWarning, match=r"a\.pt is of the first format .*mean/std, metrics .* unchecked"):
        model = load_compressed(path)
    with torch.no_grad():
        assert torch.equal(model(_x()), compressed(_x()))
    _rewrite(path, lambda doc: doc["state_dict"]["features.3.first.weight"].add_(1e-3))
    with pytest.raises(ArtifactError, match=r"a\.pt: its contents differ"):
        read_artifact(path)


def test_a_write_never_replaces_another_runs_artifact(compressed, tmp_path):
    """Found: two log folders under one parent with one run id shared an artifacts folder, and run B
    overwrote run A's model. A file whose owner log still exists is not replaced by another run."""
    log_a, log_b = tmp_path / "a" / "r.log", tmp_path / "b" / "r.log"
    for log in (log_a, log_b):
        log.parent.mkdir()
        log.write_text("")
    path = tmp_path / "shared" / "m.pt"
    first = save_artifact(path, compressed, PLAN, **DESCRIPTION, owner=log_a)
    assert artifact_owner(path) == str(log_a.resolve()) and read_artifact(path)["owner"] == str(log_a.resolve())
    with pytest.raises(ArtifactError, match=rf"m\.pt belongs to another run, whose log is {log_a}.*not replaced"):
        save_artifact(path, compressed, PLAN, **DESCRIPTION, owner=log_b)
    assert file_sha256(path) == first["sha256"]  # untouched
    save_artifact(path, compressed, PLAN, **DESCRIPTION, metrics={"again": 1}, owner=log_a)  # its own run: replaced
    log_a.unlink()  # a deleted log's files are nobody's: the run redone under that id may replace them
    save_artifact(path, compressed, PLAN, **DESCRIPTION, owner=log_b)
    assert artifact_owner(path) == str(log_b.resolve())
    junk = tmp_path / "shared" / "junk.pt"
    junk.write_bytes(b"not an artifact")
    with pytest.raises(ArtifactError, match=r"junk\.pt is no readable artifact.*not replaced"):
        save_artifact(junk, compressed, PLAN, **DESCRIPTION, owner=log_b)
    assert junk.read_bytes() == b"not an artifact"


def test_a_plan_that_does_not_fit_its_state_dict_names_file_and_layer(compressed, tmp_path):
    # Written consistently (valid checksum), but the plan's ranks are not those of the tensors.
    wrong = {**PLAN, "features.3": LayerPlan("ht2", (8, 16, 16))}
    save_artifact(tmp_path / "b.pt", compressed, wrong, **DESCRIPTION)
    with pytest.raises(ArtifactError, match=r"b\.pt: its state dict does not fit its plan.*features\.3"):
        load_compressed(tmp_path / "b.pt")
    save_artifact(tmp_path / "c.pt", compressed, {**PLAN, "classifier.9": LayerPlan("ht2", (8, 8, 8))}, **DESCRIPTION)
    with pytest.raises(ArtifactError, match=r"c\.pt: its plan does not fit model 'alexnet'.*classifier\.9"):
        load_compressed(tmp_path / "c.pt")


def test_the_file_is_a_zip_torch_loads_with_weights_only(saved):
    path, _ = saved
    assert zipfile.is_zipfile(path)
    doc = torch.load(io.BytesIO(path.read_bytes()), weights_only=True)
    assert doc["format"] == "htd-compressed-model/2"

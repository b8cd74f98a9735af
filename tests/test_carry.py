"""tools/carry.py: the device pack restores byte-identical checkpoints and refuses damaged ones."""

from __future__ import annotations

import hashlib
import json
import lzma
import subprocess

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from tools import carry


@given(st.binary(max_size=513))
def test_split_then_join_is_the_identity(raw):
    assert carry.join_bytes(carry.split_bytes(raw)) == raw


def test_a_truncated_pack_is_refused():
    packed = carry.split_bytes(bytes(range(256)) * 4)
    with pytest.raises(lzma.LZMAError):  # the stream ends early
        carry.join_bytes(packed[:-5])
    header = np.frombuffer(packed[:16], dtype="<u8").copy()
    header[0] += 1  # a header claiming one byte more than the streams hold
    with pytest.raises(ValueError, match="restores 1024 bytes, its header says 1025"):
        carry.join_bytes(header.tobytes() + packed[16:])


def test_unpack_checks_each_checkpoint_against_the_manifest(tmp_path):
    # a real torch checkpoint of fp16 weights, as the shared ones are; the data is already in place
    ckpt = tmp_path / "tiny.pt"
    torch.save({"w": torch.randn(64, 32, generator=torch.Generator().manual_seed(0)).half()}, ckpt)
    raw = ckpt.read_bytes()
    src = tmp_path / "pack"
    src.mkdir()
    (src / "tiny.pt.split.xz").write_bytes(carry.split_bytes(raw))
    data = tmp_path / "data"
    (data / "test").mkdir(parents=True)
    sha = hashlib.sha256(raw).hexdigest()
    (src / "manifest.json").write_text(json.dumps({"models": {"tiny": {"sha256": sha}}}))
    carry.unpack(src, data, tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / "tiny.pt").read_bytes() == raw
    (src / "manifest.json").write_text(json.dumps({"models": {"tiny": {"sha256": "0" * 64}}}))
    with pytest.raises(SystemExit, match="tiny.pt.split.xz: restored checkpoint sha256"):
        carry.unpack(src, data, tmp_path / "ckpt2")


def test_travelling_bytes_counts_tracked_and_unignored_files_only(tmp_path, capsys):
    repo = tmp_path / "repo"
    (repo / "results").mkdir(parents=True)
    subprocess.run(["git", "init", "-q", str(repo)], check=True)
    (repo / ".gitignore").write_text("/.gpu-pack/\n")
    (repo / "results" / "a.log").write_bytes(b"x" * 1000)  # untracked, not ignored: travels
    (repo / "README.md").write_bytes(b"y" * 10)
    subprocess.run(["git", "-C", str(repo), "add", "README.md"], check=True)
    (repo / ".gpu-pack").mkdir()
    (repo / ".gpu-pack" / "all.npz.xz").write_bytes(b"z" * 5000)  # ignored: travels only when carried
    assert carry.travelling_bytes(repo) == {"results": 1000, ".": 10 + len("/.gpu-pack/\n")}
    total = carry.report_size(repo / ".gpu-pack", repo)
    assert total == 5000 + 1000 + 10 + len("/.gpu-pack/\n")
    assert "of the 64 MiB one call carries" in capsys.readouterr().out

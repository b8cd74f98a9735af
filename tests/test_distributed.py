"""``torchrun`` with the gloo backend on the CPU: the collective helpers (common.dist), and whole experiments
on digits in two processes, whose logs equal a single process's (timings aside), also after a rank dies
mid-search and the run is started again."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from common.dist import (
    backend_for,
    from_main,
    gpu_index,
    initialized,
    leave,
    leaving,
    rank_device,
    shard_map,
    world,
)
from common.run.logs import RunLog, encode_value, parse_log

REPO = Path(__file__).resolve().parents[1]

# --- common.dist in two spawned processes --------------------------------------------------------- #


def _collectives(rank: int, tmp: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{tmp}/rendezvous", rank=rank, world_size=2)
    with leaving():
        seen: list[tuple[int, int]] = []
        done = shard_map(lambda x: (x * x, world()[0]), list(range(5)), lambda i, r: seen.append((i, r[0])))
        main_only = from_main(lambda: f"computed on rank {world()[0]}")
        try:
            shard_map(lambda x: 1 // (x - 3), list(range(6)))
            failure = None
        except Exception as exc:  # every rank must hear of the failure on rank 1 (item 3)
            failure = f"{type(exc).__name__}: {exc}"
        torch.save({"done": done, "seen": seen, "main": main_only, "failure": failure}, f"{tmp}/rank{rank}.pt")
    if initialized():  # spawn re-raises this in the test
        raise AssertionError(f"rank {rank}: the process group outlived leave()")


def test_shard_map_spreads_items_returns_them_in_order_and_fails_on_every_rank(tmp_path):
    mp.spawn(_collectives, args=(str(tmp_path),), nprocs=2, join=True)
    r = [torch.load(tmp_path / f"rank{k}.pt", weights_only=False) for k in (0, 1)]
    for k in (0, 1):
        # item i is computed on rank i % 2, every rank gets every result, in index order
        assert r[k]["done"] == [(i * i, i % 2) for i in range(5)]
        assert r[k]["seen"] == [(i, i * i) for i in range(5)]
        assert r[k]["main"] == "computed on rank 0"
    assert r[1]["failure"] == "ZeroDivisionError: integer division or modulo by zero"
    assert r[0]["failure"].startswith("RuntimeError: item 3 on rank 1: ZeroDivisionError")


def test_single_process_helpers_are_the_plain_calls():
    order = []
    assert shard_map(lambda x: x + 1, [1, 2, 3], lambda i, r: order.append(i)) == [2, 3, 4]
    assert order == [0, 1, 2] and from_main(lambda: 7) == 7 and world() == (0, 1)
    leave()  # nothing to leave: a no-op, not an error
    assert not initialized()


def _one_process_group(tmp_path, name: str) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/{name}", rank=0, world_size=1)


def test_leaving_tears_down_an_owned_group_on_both_exits_and_keeps_a_borrowed_one(tmp_path):
    _one_process_group(tmp_path, "normal")
    with leaving():
        assert initialized()
    assert not initialized()

    _one_process_group(tmp_path, "raised")
    with pytest.raises(KeyError, match="lost"), leaving():
        raise KeyError("lost")  # propagates, and the group goes without a barrier
    assert not initialized()

    _one_process_group(tmp_path, "borrowed")
    try:
        with leaving(owned=False):
            pass
        assert initialized()  # not this block's group to destroy
    finally:
        leave()
    assert not initialized()


def test_ranks_share_gpus_round_robin_over_gloo_when_they_outnumber_them(monkeypatch):
    # 8 ranks on one GPU all land on cuda:0; on 4 GPUs two per GPU, in launch order
    assert [gpu_index(r, 1) for r in range(8)] == [0] * 8
    assert [gpu_index(r, 4) for r in range(8)] == [0, 1, 2, 3, 0, 1, 2, 3]
    assert [gpu_index(r, 8) for r in range(8)] == list(range(8))
    # NCCL only where every rank has a GPU of its own; the CPU always gloo
    assert backend_for("cuda", 8, 8) == "nccl" and backend_for("cuda", 1, 1) == "nccl"
    assert backend_for("cuda", 8, 1) == "gloo" and backend_for("cuda", 9, 8) == "gloo"
    assert backend_for("cpu", 2, 0) == "gloo" and backend_for("cpu", 1, 8) == "gloo"
    with pytest.raises(ValueError, match="needs a GPU, but this machine has 0"):
        gpu_index(0, 0)
    with pytest.raises(ValueError, match="LOCAL_RANK must be >= 0"):
        gpu_index(-1, 1)
    # rank_device reads LOCAL_RANK and the GPU count (faked: this test runs without CUDA too)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setenv("LOCAL_RANK", "5")
    assert rank_device(torch.device("cuda")) == torch.device("cuda", 1)
    assert rank_device(torch.device("cpu")) == torch.device("cpu")


def test_follower_log_keeps_records_in_memory_only(tmp_path):
    main = RunLog(tmp_path, "m", "run")
    main.write("note", score=1.0)
    before = main.path.read_text()
    f = RunLog.follower(tmp_path, "m", "run", main.records())
    rec = f.write("note", score=2.0)
    f.comment("not on disk")
    assert rec["seq"] == 1 and f.find("note")["score"] == 2.0
    assert main.path.read_text() == before
    main.close()


# --- whole experiments under torchrun ------------------------------------------------------------- #

ARGS = [
    "--model",
    "alexnet",
    "--dataset",
    "digits",
    "--targets",
    "3",
    "--methods",
    "uniform,random,policy,tpe",
    "--n-seeds",
    "1",
    "--search-budget",
    "6",
    "--calib-images",
    "64",
    "--val-images",
    "200",
    "--sensitivity-levels",
    "0.5,0.2",
    "--finetune-epochs",
    "0.2",
    "--finetune-max-images",
    "256",
    "--finetune-batch-size",
    "32",
    "--threads",
    "1",
    "--no-progress",
]


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}


def _run(tmp: Path, run_id: str, ckpt: Path, nproc: int, extra=(), env=None) -> subprocess.CompletedProcess:
    args = [*ARGS, "--checkpoint", str(ckpt), "--log-dir", str(tmp / "logs"), "--run-id", run_id]
    args += ["--artifacts-dir", str(tmp / "artifacts" / run_id), *extra]
    if nproc == 1:
        cmd = [sys.executable, "-m", "common.run.experiment", *args]
    else:
        launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
        cmd = [*launcher, str(REPO / "tests" / "dist_entry.py"), *args]
    return subprocess.run(cmd, cwd=REPO, env={**_env(), **(env or {})}, capture_output=True, text=True, timeout=600)


def _records(tmp: Path, run_id: str) -> list[dict]:
    records, errors = parse_log(tmp / "logs" / "alexnet" / f"{run_id}.log")
    assert errors == []
    return records


TIMES = ("t", "seq", "run_id", "latency", "latency_ms", "speedup", "date", "host", "artifacts", "artifacts_dir")


def _comparable(records: list[dict]) -> list[dict]:
    """The records without timings (and without the per-process ``timing``/``config`` details)."""
    out = []
    for r in records:
        if r["kind"] == "timing":
            continue
        r = {k: v for k, v in r.items() if k not in TIMES and "seconds" not in k}
        out.append(json.loads(json.dumps(encode_value(r, "test"), sort_keys=True)))
    return out


def _assert_same(ours: list[dict], theirs: list[dict]) -> None:
    assert [r["kind"] for r in ours] == [r["kind"] for r in theirs]
    for a, b in zip(ours, theirs):
        assert a.keys() == b.keys(), a["kind"]
        for k in a:
            if isinstance(a[k], float) and isinstance(b[k], float) and not (math.isnan(a[k]) and math.isnan(b[k])):
                # the KL score is continuous: oneDNN's float sums may differ in the last bits between processes
                assert a[k] == pytest.approx(b[k], rel=1e-5, abs=1e-9), (a["kind"], k)
            else:
                assert a[k] == b[k], (a["kind"], k)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, digits_checkpoint):
    """The same experiment in one process and under ``torchrun --nproc-per-node 2``."""
    tmp = tmp_path_factory.mktemp("dist")
    ckpt = digits_checkpoint("alexnet")
    one = _run(tmp, "one", ckpt, 1)
    assert one.returncode == 0, one.stderr[-3000:]
    two = _run(tmp, "two", ckpt, 2)
    assert two.returncode == 0, two.stderr[-3000:]
    return tmp, ckpt


@pytest.mark.slow
def test_two_processes_write_the_single_process_log(runs):
    tmp, _ = runs
    one, two = _records(tmp, "one"), _records(tmp, "two")
    assert {r["kind"] for r in one} >= {"config", "baseline", "sensitivity", "candidate", "rerank", "plan", "final"}
    assert len([r for r in one if r["kind"] == "final"]) == 4 and any(r["kind"] == "finetune_epoch" for r in one)
    assert [r["seq"] for r in two] == list(range(len(two)))  # one writer, in order
    _assert_same(_comparable(two), _comparable(one))
    # both ranks finished final models (two per chunk): each left its artifacts, as one process does
    assert sorted(p.name for p in (tmp / "artifacts" / "two").rglob("*.pt")) == sorted(
        p.name for p in (tmp / "artifacts" / "one").rglob("*.pt")
    )


@pytest.mark.slow
def test_a_rank_dying_mid_search_resumes_to_the_same_log(runs):
    tmp, ckpt = runs
    one = _records(tmp, "one")
    sens = [r for r in one if r["kind"] == "sensitivity" and r["seed"] == 0 and r["layer"] != "<dense>"]
    of_seed0 = [r for r in one if r["kind"] == "candidate" and r["seed"] == 0]
    rand = [r for r in of_seed0 if r["method"] == "random"]
    # Seed 0 runs uniform (one candidate: rank 0), random, then the policy's sensitivity
    # profile (the dense point on rank 0, then the layers' points) and candidates, round by round. Each
    # round goes out in chunks of two, rank 1 scoring the second item of each: let it die on its second
    # policy candidate, so the chunk holding that one is lost and every earlier candidate is logged.
    chunks = []
    for rnd in sorted({r["round"] for r in of_seed0 if r["method"] == "policy"}):
        idx = [r["index"] for r in of_seed0 if r["method"] == "policy" and r["round"] == rnd]
        chunks += [idx[i : i + 2] for i in range(0, len(idx), 2)]
    second = [c for c in chunks if len(c) == 2][1]
    kept = [i for c in chunks[: chunks.index(second)] for i in c]
    env = {"HTD_TEST_EXIT_AFTER": str(len(rand) // 2 + len(sens) // 2 + 1)}
    cut = _run(tmp, "cut", ckpt, 2, env=env)
    assert cut.returncode != 0
    partial = _records(tmp, "cut")
    policy = [r for r in partial if r["kind"] == "candidate" and r["method"] == "policy"]
    assert [r["index"] for r in policy] == kept and len(kept) >= 2
    assert not any(r["kind"] == "plan" and r["method"] == "policy" for r in partial)
    again = _run(tmp, "cut", ckpt, 2)
    assert again.returncode == 0, again.stderr[-3000:]
    _assert_same(_comparable(_records(tmp, "cut")), _comparable(one))

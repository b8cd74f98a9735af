"""Tests for common.data.stream and common.data.streamloader: the streamed ImageFolder path and its loader (decoded on the fly)."""

from __future__ import annotations

import dataclasses
import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from common.data.datasets import load_dataset
from common.data.loader import BatchLoader, calibration_loader, make_loader
from common.data.splits import StreamSplit, stratified_indices
from common.data.stream import estimate_decoded_bytes
from common.data.streamloader import StreamLoader, sample_seed
from common.train.evaluate import evaluate
from common.train.finetune import FinetuneConfig, finetune

CLASSES = ("ant", "bee", "cat")
SIZES = {"train": 40, "val": 20, "test": 10}  # per class: 210 images in all
SIZE = 32


def _image(rng: np.random.Generator, label: int, h: int, w: int) -> np.ndarray:
    """A class-tinted noise image ``h x w x 3`` (uint8), so a model can tell the classes apart a little."""
    base = np.zeros(3)
    base[label] = 120.0
    return np.clip(base + rng.normal(100, 40, (h, w, 3)), 0, 255).astype(np.uint8)


def _write_tree(root: Path, sizes=None, ext: str = "jpg", seed: int = 0, per_class=SIZES) -> Path:
    """``root/{train,val,test}/<class>/NNNN.<ext>``; all ``SIZE`` x ``SIZE`` unless ``sizes`` (a list of
    ``(h, w)`` cycled through) is given."""
    rng = np.random.default_rng(seed)
    k = 0
    for split, n in per_class.items():
        for label, cls in enumerate(CLASSES):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                h, w = sizes[k % len(sizes)] if sizes else (SIZE, SIZE)
                k += 1
                Image.fromarray(_image(rng, label, h, w)).save(d / f"{i:04d}.{ext}", quality=90)
    return root


@pytest.fixture(scope="module")
def tree(tmp_path_factory) -> Path:
    return _write_tree(tmp_path_factory.mktemp("stream") / "ds")


@pytest.fixture(scope="module")
def streamed(tree):
    """The tree streamed at its own size: the eval transform (resize 32, center crop 32) is the identity."""
    return load_dataset("imagefolder", root=tree, memory_limit_bytes=1, crop_size=SIZE, resize_size=SIZE, workers=2)


@pytest.fixture(scope="module")
def in_memory(tree, tmp_path_factory):
    return load_dataset("imagefolder", root=tree, cache_dir=tmp_path_factory.mktemp("cache"), workers=1, stream=False)


def _tiny_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, stride=2, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, len(CLASSES)),
    ).eval()


def _batches(loader) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(x.clone(), y.clone()) for x, y in loader]


def _same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(xa, xb) and torch.equal(ya, yb) for (xa, ya), (xb, yb) in zip(a, b))


# --------------------------------------------------------------------------------------------------
# the decision and the dataset object
# --------------------------------------------------------------------------------------------------
def test_small_limit_streams_and_large_limit_keeps_in_memory(tree, tmp_path, streamed):
    assert streamed.streaming and isinstance(streamed.train, StreamSplit)
    assert streamed.name == "imagefolder" and streamed.source == str(tree.resolve())
    assert streamed.image_size == SIZE and streamed.classes == list(CLASSES) and streamed.num_classes == 3
    assert [len(streamed.split(s)) for s in SIZES] == [3 * n for n in SIZES.values()]
    assert torch.equal(torch.bincount(streamed.val.labels), torch.tensor([20, 20, 20]))
    kept = load_dataset("imagefolder", root=tree, cache_dir=tmp_path / "c", workers=1, memory_limit_bytes=1 << 40)
    assert not kept.streaming and kept.train.images.shape == (120, 3, SIZE, SIZE)
    # the estimate reads headers only: 120 images of 32 x 32 x 3 bytes
    assert estimate_decoded_bytes(streamed.train) == (120 * SIZE * SIZE * 3, {(SIZE, SIZE)})


def test_streamed_split_has_no_images(streamed):
    with pytest.raises(AttributeError, match="streamed.*make_loader"):
        _ = streamed.train.images


def test_mean_std_from_train_sample_matches_in_memory(streamed, in_memory):
    # train (120 images) is smaller than the 256-image sample, so both see the same pixels
    assert streamed.mean == pytest.approx(in_memory.mean, abs=1e-9)
    assert streamed.std == pytest.approx(in_memory.std, abs=1e-9)


def test_default_crop_is_224(tree):
    data = load_dataset("imagefolder", root=tree, stream=True, workers=0)
    assert data.image_size == 224 and data.train.resize_size == 256
    x, _ = next(iter(make_loader(data, "val", 4)))
    assert x.shape == (4, 3, 224, 224)


# --------------------------------------------------------------------------------------------------
# equality with the in-memory path
# --------------------------------------------------------------------------------------------------
def test_eval_batches_and_accuracy_equal_in_memory(streamed, in_memory):
    # normalize both with the in-memory statistics, so only the data path differs
    data = dataclasses.replace(streamed, mean=in_memory.mean, std=in_memory.std)
    model = _tiny_model()
    for split in ("val", "test"):
        mem = make_loader(in_memory, split, 16)
        st = make_loader(data, split, 16)
        assert isinstance(mem, BatchLoader) and isinstance(st, StreamLoader)
        assert len(st) == len(mem) and st.num_images == mem.num_images
        assert _same(_batches(st), _batches(mem))
        assert evaluate(model, st) == evaluate(model, mem)
    assert evaluate(model, make_loader(data, "val", 16))["top1"] > 0.0  # a real count, not a vacuous 0 == 0


# --------------------------------------------------------------------------------------------------
# reproducibility
# --------------------------------------------------------------------------------------------------
def test_seeded_epochs_reproduce_for_any_worker_count(streamed):
    kw = {"train": True, "seed": 5}
    two = make_loader(streamed, "train", 16, workers=2, **kw)
    first = _batches(two)
    assert len(first) == len(two) == 120 // 16 and all(x.shape == (16, 3, SIZE, SIZE) for x, _ in first)
    assert _same(_batches(two), first)  # the same epoch again (persistent workers)
    assert _same(_batches(make_loader(streamed, "train", 16, workers=0, **kw)), first)
    two.set_epoch(1)
    second = _batches(two)
    assert not _same(second, first)
    assert not torch.equal(torch.cat([x for x, _ in second]), torch.cat([x for x, _ in first]))
    assert not _same(_batches(make_loader(streamed, "train", 16, workers=2, train=True, seed=6)), first)
    # a run resumed mid-epoch gets the very batches it would have had
    assert _same(list(two.iter_from(3)), second[3:])
    # labels are those of the sampled indices, in order
    idx = [i for b in two.batch_indices(1) for i in b]
    assert torch.equal(torch.cat([y for _, y in second]), streamed.train.labels[idx])
    # an epoch cut short (max_steps) leaves the persistent workers ready for the next, exact one
    for step, _ in enumerate(two):
        if step == 1:
            break
    two.set_epoch(1)
    assert _same(_batches(two), second)
    # (seed, epoch) pairs give distinct orders: seed 1 epoch 0 is not seed 0 epoch 1
    other = make_loader(streamed, "train", 16, workers=0, train=True, seed=6)
    assert other.batch_indices(0) != make_loader(streamed, "train", 16, workers=0, train=True, seed=5).batch_indices(1)
    # the global RNG is left alone when decoding in this process
    torch.manual_seed(0)
    want = torch.rand(3)
    torch.manual_seed(0)
    _batches(make_loader(streamed, "train", 16, workers=0, **kw))
    assert torch.equal(torch.rand(3), want)


def test_augmentation_is_random_crop_and_flip(streamed):
    # per-image seeds differ by seed, epoch and index
    assert len({sample_seed(0, 0, 0), sample_seed(0, 0, 1), sample_seed(0, 1, 0), sample_seed(1, 0, 0)}) == 4
    aug = _batches(make_loader(streamed, "train", 60, train=True, seed=0, drop_last=False, workers=0))
    plain = _batches(make_loader(streamed, "train", 60, train=True, seed=0, augment=False, workers=0))
    assert [y.tolist() for _, y in aug] == [y.tolist() for _, y in plain]  # same order, different pixels
    changed = [not torch.equal(a, p) for (xa, _), (xp, _) in zip(aug, plain) for a, p in zip(xa, xp)]
    assert sum(changed) > 100  # RandomResizedCrop at scale 0.08-1 almost never returns the whole image


def test_auto_epoch_advances(streamed):
    loader = make_loader(streamed, "train", 40, train=True, auto_epoch=True, workers=0)
    a, b = _batches(loader), _batches(loader)
    assert loader.epoch == 2 and not _same(a, b)


# --------------------------------------------------------------------------------------------------
# subsets and sharding
# --------------------------------------------------------------------------------------------------
def test_subset_is_stratified_fixed_and_seeded(streamed):
    s1, s2, s3 = (streamed.train.subset(30, seed=s) for s in (3, 3, 4))
    assert isinstance(s1, StreamSplit) and len(s1) == 30
    assert list(s1.files) == list(s2.files) and list(s1.files) != list(s3.files)
    assert torch.bincount(s1.labels).tolist() == [10, 10, 10]
    want = stratified_indices(streamed.train.labels, 30, 3)
    assert list(s1.files) == list(streamed.train.files[want.numpy()])
    loader = make_loader(streamed, "train", 8, seed=3, subset=30, workers=0)
    assert loader.num_images == 30 and len(loader) == 4
    assert torch.equal(torch.cat([y for _, y in loader]), s1.labels)
    calib = calibration_loader(streamed, 30, seed=3, batch_size=8)
    assert isinstance(calib, StreamLoader) and calib.augment and calib.num_images == 30
    assert Counter(torch.cat([y for _, y in calib]).tolist()) == {0: 10, 1: 10, 2: 10}


def test_eval_shards_cover_the_split_disjointly(streamed):
    sub = dataclasses.replace(streamed, val=streamed.val.subset(31, seed=0))  # not divisible by 3
    whole = _batches(make_loader(sub, "val", 9, workers=0))
    seen: list[int] = []
    for rank in range(3):
        loader = make_loader(sub, "val", 9, rank=rank, world_size=3, workers=0)
        idx = [i for b in loader.batch_indices() for i in b]
        seen += idx
        got = _batches(loader)
        assert all(len(y) <= 3 for _, y in got) and len(got) == len(loader)
        assert torch.equal(torch.cat([y for _, y in got]), sub.val.labels[idx])
        assert torch.equal(torch.cat([x for x, _ in got]), torch.cat([x for x, _ in whole])[idx])
    assert sorted(seen) == list(range(31))  # every image exactly once
    assert loader.num_images == 31


def test_train_shards_make_the_single_process_global_batches(streamed):
    single = make_loader(streamed, "train", 12, train=True, seed=2)
    ranks = [make_loader(streamed, "train", 12, train=True, seed=2, rank=r, world_size=2) for r in range(2)]
    assert len(ranks[0]) == len(ranks[1]) == len(single) == 10 and ranks[0].num_images == single.num_images
    for epoch in (0, 1):
        parts = [r.batch_indices(epoch) for r in ranks]
        for step, batch in enumerate(single.batch_indices(epoch)):
            a, b = parts[0][step], parts[1][step]
            assert len(a) == len(b) == 6 and not set(a) & set(b)
            assert set(a) | set(b) == set(batch)


def test_finetune_runs_on_a_streamed_dataset(streamed):
    model = _tiny_model()
    cfg = FinetuneConfig(epochs=2, batch_size=24, lr=0.05, eval_batch_size=30)
    history = finetune(model, streamed, cfg, device="cpu", progress=False)
    assert len(history) == 2 and all(np.isfinite(h["train_loss"]) for h in history)
    assert history[-1]["images_seen"] == 2 * (120 // 24) * 24 and history[-1]["val_top1"] is not None


# --------------------------------------------------------------------------------------------------
# images of differing sizes, errors
# --------------------------------------------------------------------------------------------------
def test_differing_sizes_come_out_at_the_crop_size(tmp_path):
    sizes = [(20, 30), (50, 41), (64, 64), (17, 90), (33, 25)]
    root = _write_tree(tmp_path / "mixed", sizes=sizes, ext="png", per_class={"train": 5, "val": 4, "test": 2})
    data = load_dataset("imagefolder", root=root, stream=True, crop_size=24, resize_size=28, workers=2)
    for loader in (make_loader(data, "train", 5, train=True), make_loader(data, "val", 5)):
        shapes = {tuple(x.shape[1:]) for x, _ in loader}
        assert shapes == {(3, 24, 24)}
    _, seen = estimate_decoded_bytes(data.train, sample=15)
    assert seen == {(w, h) for h, w in sizes}  # the headers' (width, height)
    with pytest.raises(ValueError, match="stream=True"):
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c", workers=1, stream=False)


@pytest.mark.parametrize("stream", [True, None])
def test_missing_split_names_root_and_split(tree, tmp_path, stream):
    root = tmp_path / "broken"
    shutil.copytree(tree, root)
    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match=rf"{root.resolve() / 'val'}.*root {root.resolve()}"):
        load_dataset("imagefolder", root=root, stream=stream, memory_limit_bytes=1, workers=0)


def test_undecodable_image_is_named(tree, tmp_path):
    root = tmp_path / "bad"
    shutil.copytree(tree, root)
    (root / "val" / "bee" / "0003.jpg").write_bytes(b"not a jpeg")
    data = load_dataset("imagefolder", root=root, stream=True, crop_size=SIZE, resize_size=SIZE, workers=0)
    with pytest.raises(ValueError, match="0003.jpg"):
        list(make_loader(data, "val", 16, workers=0))


def test_an_experiment_runs_on_a_streamed_imagefolder(tree, tmp_path, monkeypatch):
    """--stream on end to end: baseline, search, BN recalibration and evaluation through the streaming
    loader; the log's dataset identity says it was streamed (a resume in memory is refused)."""
    from common.run.config import ExperimentConfig
    from common.run.experiment import run_experiment
    from common.run.logs import parse_log

    monkeypatch.setenv("HTD_CACHE", str(tmp_path / "cache"))
    cfg = ExperimentConfig(
        model="alexnet",
        dataset="imagefolder",
        data_root=str(tree),
        stream="on",
        crop_size=SIZE,
        resize_size=SIZE,
        checkpoint=None,
        methods=("uniform",),
        targets=(2.0,),
        calib_images=30,
        final_calib_images=60,
        val_images=30,
        log_dir=str(tmp_path / "logs"),
        run_id="streamed",
        progress=False,
        device="cpu",
    )
    (final,) = run_experiment(cfg)
    assert 0.0 <= final["test_top1_bn"] <= 1.0 and abs(final["macs_factor"] / 2.0 - 1) <= 0.03
    records, errors = parse_log(tmp_path / "logs" / "alexnet" / "streamed.log")
    (config,) = [r for r in records if r["kind"] == "config"]
    assert errors == [] and config["dataset_identity"]["streamed"] is True
    assert config["dataset_identity"]["image_size"] == SIZE and config["stream"] == "on"

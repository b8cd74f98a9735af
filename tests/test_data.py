"""Tests for common.data (datasets, splits, memory, loader): datasets, the decode cache, and the device-side batch loader."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from common.data.datasets import load_dataset
from common.data.loader import BatchLoader, make_loader
from common.data.splits import SPLITS, TensorSplit, content_fingerprint, stratified_indices
from common.paths import CIFAR_JPEG_ROOT


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _write_imagefolder(root, n_per_class=3, classes=("a", "b"), size=8, seed=0):
    rng = np.random.default_rng(seed)
    for split in ("train", "val", "test"):
        for cls in classes:
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n_per_class):
                arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:04d}.png")
    return root


def test_digits_shapes_and_splits(digits):
    assert digits.name == "digits" and digits.source == "embedded:digits"
    sizes = [len(digits.train), len(digits.val), len(digits.test)]
    assert sum(sizes) == 1797
    assert sizes == [1078, 359, 360]
    for s in (digits.train, digits.val, digits.test):
        assert s.images.dtype == torch.uint8 and s.images.shape[1:] == (3, 32, 32)
        assert s.labels.dtype == torch.int64
        # stratified: every class present in every split
        assert torch.bincount(s.labels, minlength=10).min() >= 30
    assert torch.equal(digits.train.images[:, 0], digits.train.images[:, 2])  # gray replicated
    assert digits.train.images.max() == 255 and digits.train.images.min() == 0
    assert digits.image_size == 32 and len(digits.classes) == 10
    # mean/std computed from the train split
    x = digits.train.images.double() / 255
    assert digits.mean[0] == pytest.approx(x[:, 0].mean().item(), abs=1e-9)
    assert digits.std[1] == pytest.approx(x[:, 1].std().item(), abs=1e-9)


def test_digits_deterministic(digits):
    again = load_dataset("digits")
    for a, b in ((digits.train, again.train), (digits.test, again.test)):
        assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_subset_stratified_and_seeded(digits):
    s1 = digits.train.subset(100, seed=3)
    s2 = digits.train.subset(100, seed=3)
    s3 = digits.train.subset(100, seed=4)
    assert len(s1) == 100
    assert torch.equal(s1.images, s2.images)
    assert not torch.equal(s1.labels, s3.labels) or not torch.equal(s1.images, s3.images)
    counts = torch.bincount(s1.labels, minlength=10)
    assert counts.max() - counts.min() <= 2
    assert digits.train.subset(10**6, 0) is digits.train
    idx = stratified_indices(torch.tensor([0] * 90 + [1] * 10), 10, seed=0)
    assert (torch.tensor([0] * 90 + [1] * 10)[idx] == 1).sum() == 1


def test_unknown_dataset_name():
    with pytest.raises(ValueError, match="digits"):
        load_dataset("mnist")


def test_imagefolder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope"):
        load_dataset("imagefolder", root=tmp_path / "nope", cache_dir=tmp_path / "c")


def test_imagefolder_missing_split(tmp_path):
    root = _write_imagefolder(tmp_path / "ds")
    import shutil

    shutil.rmtree(root / "val")
    with pytest.raises(FileNotFoundError, match="val"):
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c", workers=1)


def test_imagefolder_empty_class(tmp_path):
    root = _write_imagefolder(tmp_path / "ds")
    (root / "train" / "zzz_empty").mkdir()
    with pytest.raises(ValueError, match="zzz_empty"):
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c", workers=1)


def test_imagefolder_corrupt_image_named(tmp_path):
    root = _write_imagefolder(tmp_path / "ds")
    bad = root / "test" / "b" / "0001.png"
    bad.write_bytes(b"\xff\xd8\xff\xe0 definitely not an image")
    with pytest.raises(ValueError, match="0001.png"):
        load_dataset("imagefolder", root=root, cache_dir=tmp_path / "c", workers=1)


def test_imagefolder_cache_roundtrip(tmp_path):
    root = _write_imagefolder(tmp_path / "ds", n_per_class=5)
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", root=root, cache_dir=cache, workers=1)
    files = sorted(p.name for p in cache.rglob("*") if p.is_file())
    assert len(files) == 3 and all(f.endswith(".pt") for f in files)
    assert not list(cache.rglob("*.tmp"))
    assert all(not t["cached"] for t in first.timings.values())
    second = load_dataset("imagefolder", root=root, cache_dir=cache, workers=1)
    assert all(t["cached"] for t in second.timings.values())
    assert torch.equal(first.train.images, second.train.images)
    assert torch.equal(first.test.labels, second.test.labels)
    assert first.classes == ["a", "b"] and first.image_size == 8
    # decoded pixels equal the files' pixels
    ref = np.array(Image.open(root / "train" / "b" / "0002.png").convert("RGB"))
    assert torch.equal(first.train.images[5 + 2], torch.from_numpy(ref).permute(2, 0, 1))
    # mean/std computed from train for a generic imagefolder
    assert first.mean[0] == pytest.approx((first.train.images[:, 0].double() / 255).mean().item())
    # changing a file changes the fingerprint: re-decoded, not served stale
    arr = np.zeros((8, 8, 3), np.uint8)
    Image.fromarray(arr).save(root / "train" / "b" / "0002.png")
    third = load_dataset("imagefolder", root=root, cache_dir=cache, workers=1)
    assert not third.timings["train"]["cached"] and third.timings["val"]["cached"]
    assert third.train.images[5 + 2].sum() == 0
    assert not list(cache.rglob("*.tmp"))


def test_cache_write_is_atomic(tmp_path, monkeypatch):
    """A crash during the cache write leaves neither a cache file nor a temp file."""
    import common.data.memory as cd

    root = _write_imagefolder(tmp_path / "ds")
    cache = tmp_path / "cache"

    def boom(obj, fh):
        fh.write(b"partial")
        raise KeyboardInterrupt("simulated crash")

    monkeypatch.setattr(cd.torch, "save", boom)
    with pytest.raises(KeyboardInterrupt):
        load_dataset("imagefolder", root=root, cache_dir=cache, workers=1)
    assert [p for p in cache.rglob("*") if p.is_file()] == []
    monkeypatch.undo()
    ok = load_dataset("imagefolder", root=root, cache_dir=cache, workers=1)
    assert len(ok.train) == 6


def test_process_pool_decode_matches_serial(tmp_path):
    from common.data.memory import decode_images

    root = _write_imagefolder(tmp_path / "ds", n_per_class=300, classes=("a",))
    paths = sorted(str(p) for p in (root / "train" / "a").iterdir())
    assert torch.equal(decode_images(paths, workers=2), decode_images(paths, workers=1))


def _split(n=20, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TensorSplit(torch.randint(0, 256, (n, 3, size, size), generator=g, dtype=torch.uint8), torch.arange(n) % 3)


def test_batchloader_eval_order_and_normalization():
    s = _split()
    loader = BatchLoader(s, 8, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    batches = list(loader)
    assert len(loader) == 3 and [len(y) for _, y in batches] == [8, 8, 4]
    x = torch.cat([b[0] for b in batches])
    assert torch.allclose(x, (s.images.float() / 255 - 0.5) / 0.25)
    assert torch.equal(torch.cat([b[1] for b in batches]), s.labels)


def test_batchloader_augmentation_deterministic_per_epoch():
    s = _split(n=32)
    kw = dict(mean=(0.0,) * 3, std=(1.0,) * 3, train=True, seed=7)
    a, b = BatchLoader(s, 8, **kw), BatchLoader(s, 8, **kw)
    first = [x for x, _ in a]
    assert all(torch.equal(x, y) for x, (y, _) in zip(first, b))
    a.set_epoch(1)
    second = [x for x, _ in a]
    assert not all(torch.equal(x, y) for x, y in zip(first, second))
    a.set_epoch(0)
    assert all(torch.equal(x, y) for x, (y, _) in zip(first, a))
    c = BatchLoader(s, 8, **{**kw, "seed": 8})
    assert not all(torch.equal(x, y) for x, (y, _) in zip(first, c))


def test_batchloader_augmentation_is_crop_and_flip():
    """Every augmented image is a shifted (and maybe mirrored) window of the reflect-padded image."""
    s = _split(n=16, size=8)
    loader = BatchLoader(s, 16, mean=(0.0,) * 3, std=(1.0,) * 3, train=True, seed=1, drop_last=False)
    labels_seen = []
    for x, y in loader:
        for xi, yi in zip(x, y):
            labels_seen.append(int(yi))
            # find the source image: permutation is unknown, so search all
            ok = False
            for src in s.images:
                p = torch.nn.functional.pad(src.float()[None] / 255, (4, 4, 4, 4), mode="reflect")[0]
                for dy in range(9):
                    for dx in range(9):
                        win = p[:, dy : dy + 8, dx : dx + 8]
                        if torch.allclose(win, xi) or torch.allclose(win.flip(2), xi):
                            ok = True
                            break
                    if ok:
                        break
                if ok:
                    break
            assert ok
    assert sorted(labels_seen) == sorted(s.labels.tolist())


def test_batchloader_shards_partition_global_batch():
    s = _split(n=24)
    kw = dict(mean=(0.0,) * 3, std=(1.0,) * 3, train=True, seed=3)
    full = list(BatchLoader(s, 8, **kw))
    r0 = list(BatchLoader(s, 8, rank=0, world_size=2, **kw))
    r1 = list(BatchLoader(s, 8, rank=1, world_size=2, **kw))
    for (x, y), (x0, y0), (x1, y1) in zip(full, r0, r1):
        assert torch.equal(torch.cat([x0, x1]), x) and torch.equal(torch.cat([y0, y1]), y)


def test_batchloader_channels_last_dtype():
    s = _split()
    x, _ = next(iter(BatchLoader(s, 4, (0.5,) * 3, (0.5,) * 3, channels_last=True, dtype=torch.bfloat16)))
    assert x.dtype == torch.bfloat16 and x.is_contiguous(memory_format=torch.channels_last)


def test_make_loader_subset(digits):
    loader = make_loader(digits, "val", 64, subset=100, seed=0)
    assert sum(len(y) for _, y in loader) == 100
    with pytest.raises(ValueError, match="split"):
        make_loader(digits, "holdout", 64)


@pytest.mark.slow
@pytest.mark.skipif(not CIFAR_JPEG_ROOT.is_dir(), reason="../shared/data/cifar10-jpeg absent")
def test_cifar10_jpeg_shapes(tmp_path_factory):
    d = load_dataset("cifar10-jpeg")  # default cache: decoded once per machine
    assert (len(d.train), len(d.val), len(d.test)) == (45000, 5000, 10000)
    assert d.classes[0] == "airplane" and d.classes[-1] == "truck"
    assert d.mean == (0.4914, 0.4822, 0.4465)
    assert torch.equal(torch.bincount(d.val.labels), torch.full((10,), 500))


def test_content_fingerprint_follows_files_between_classes_in_memory_and_streamed(tmp_path):
    """Moving images between class folders keeps every split's size (and, before, the decode cache's key:
    counts per class, bytes, mtimes): the content fingerprint changes, and the cache is not served stale."""
    root = _write_imagefolder(tmp_path / "ds", n_per_class=4)
    cache = tmp_path / "cache"
    first = load_dataset("imagefolder", root=root, cache_dir=cache, workers=1)
    streamed = load_dataset("imagefolder", root=root, stream=True, crop_size=8, resize_size=8, workers=0)
    fps = {s: content_fingerprint(first.split(s)) for s in SPLITS}
    assert fps == {s: content_fingerprint(streamed.split(s)) for s in SPLITS}  # one listing, one fingerprint
    test = root / "test"
    os.rename(test / "a" / "0000.png", test / "b" / "from-a.png")
    os.rename(test / "b" / "0001.png", test / "a" / "from-b.png")
    again = load_dataset("imagefolder", root=root, cache_dir=cache, workers=1)
    assert again.timings["val"]["cached"] and not again.timings["test"]["cached"]
    assert len(again.test) == len(first.test) and not torch.equal(again.test.images, first.test.images)  # not stale
    assert content_fingerprint(again.test) != fps["test"]
    assert [content_fingerprint(again.split(s)) for s in ("train", "val")] == [fps["train"], fps["val"]]
    moved = load_dataset("imagefolder", root=root, stream=True, crop_size=8, resize_size=8, workers=0)
    assert content_fingerprint(moved.test) == content_fingerprint(again.test)
    assert content_fingerprint(moved.test.subset(4)) != content_fingerprint(moved.test)  # a subset is no split


def test_digits_fingerprints_its_splits_and_a_relabelled_split_differs(digits):
    fps = [content_fingerprint(digits.split(s)) for s in SPLITS]
    assert len(set(fps)) == 3 and fps == [content_fingerprint(load_dataset("digits").split(s)) for s in SPLITS]
    labels = digits.test.labels.clone()
    labels[0] = (labels[0] + 1) % 10
    assert content_fingerprint(TensorSplit(digits.test.images, labels)) != content_fingerprint(
        TensorSplit(digits.test.images, digits.test.labels)
    )


def test_a_model_gets_its_own_normalization(digits):
    """Given mean/std win; an ImageNet architecture defaults to torchvision's ImageNet statistics; others
    keep the dataset's (digits: its train split's); the loaders normalize with what was chosen."""
    from common.models import IMAGENET_MEAN, IMAGENET_STD, normalized_for

    same, norm = normalized_for("resnet18", digits)
    assert same is digits and norm == {"mean": list(digits.mean), "std": list(digits.std), "source": "dataset"}
    imagenet, norm = normalized_for("resnet18_imagenet", digits)
    assert (imagenet.mean, imagenet.std, norm["source"]) == (IMAGENET_MEAN, IMAGENET_STD, "imagenet")
    assert imagenet.train is digits.train  # the images are shared, not copied
    given, norm = normalized_for("resnet18_imagenet", digits, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))
    assert norm == {"mean": [0.5] * 3, "std": [0.25] * 3, "source": "given"}
    x, _ = next(iter(make_loader(given, "val", 8)))
    raw = given.val.images[:8].float() / 255
    assert torch.allclose(x, (raw - 0.5) / 0.25, atol=1e-6)
    for mean, std, phrase in [
        ((0.5, 0.5, 0.5), None, "give mean and std together"),
        ((0.5, 0.5), (1.0, 1.0), "mean must be 3 finite numbers"),
        ((0.5,) * 3, (0.2, 0.0, 0.2), "std must be positive"),
    ]:
        with pytest.raises(ValueError, match=phrase):
            normalized_for("resnet18", digits, mean, std)


def test_cifar10_jpeg_uses_the_shared_baselines_training_normalization():
    """The shared baselines' README: evaluation normalizes with (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435,
    0.2616), their training statistics; cifar10-jpeg and cifar10 use exactly these, not a train-split estimate."""
    from common.data.memory import CIFAR_MEAN, CIFAR_STD

    assert CIFAR_MEAN == (0.4914, 0.4822, 0.4465) and CIFAR_STD == (0.2470, 0.2435, 0.2616)
    readme = CIFAR_JPEG_ROOT.parents[1] / "checkpoints" / "cifar10-jpeg" / "README.md"
    if readme.is_file():
        text = readme.read_text()
        assert "mean (0.4914, 0.4822, 0.4465)" in text and "(0.2470, 0.2435, 0.2616)" in text

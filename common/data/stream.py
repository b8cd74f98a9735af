"""Streamed ImageFolder datasets: splits kept as file lists, decoded on the fly by DataLoader workers.

:mod:`common.data.memory` decodes a whole dataset into one ``uint8`` tensor, which cannot hold ImageNet
(1.28 M train images at 224x224 are about 190 GB decoded). An ImageFolder whose decoded size would
exceed a memory limit (:func:`default_memory_limit`: a quarter of the machine's RAM; estimated from a few
image headers per split, :func:`should_stream`) is therefore kept as a list of files per split
(:class:`common.data.splits.StreamSplit`, listed by :func:`list_split`) and read by a
:class:`common.data.streamloader.StreamLoader`, which decodes, transforms and normalizes the images.
:func:`load_streamed_imagefolder` builds such a :class:`common.data.splits.DatasetSplits`.

Mean/std of a streamed dataset come from a seeded class-stratified sample of ``STATS_IMAGES`` train
images after the eval transform, never from the whole split (:func:`sample_mean_std`).
"""

from __future__ import annotations

import os
import random
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from common.data.splits import (
    DEFAULT_CROP_SIZE,
    DEFAULT_RESIZE_SIZE,
    IMAGE_EXTENSIONS,
    SPLITS,
    DatasetSplits,
    StreamSplit,
    mean_std,
)
from common.data.streamloader import DecodeDataset, eval_transform

STATS_IMAGES = 256  # train images behind a streamed dataset's mean/std
STATS_SEED = 0
SIZE_SAMPLE = 8  # image headers read per split to estimate the decoded size


def default_memory_limit() -> int:
    """A quarter of the machine's physical memory, in bytes: the most a decoded dataset may take."""
    return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 4


def list_split(root: Path, split: str) -> StreamSplit:
    """List ``root/split`` with ``torchvision.datasets.ImageFolder`` (no image is opened).

    Raises:
        FileNotFoundError: the split folder is missing (the message names it and the root).
        ValueError: no class folders, or an empty class folder (named).
    """
    from torchvision.datasets import ImageFolder

    folder = root / split
    if not folder.is_dir():
        raise FileNotFoundError(
            f"split folder not found: {folder} (the dataset root {root} needs {', '.join(s + '/' for s in SPLITS)})"
        )
    try:
        ds = ImageFolder(str(folder), is_valid_file=lambda p: p.lower().endswith(IMAGE_EXTENSIONS), allow_empty=True)
    except FileNotFoundError as exc:  # torchvision's words for "no class folders"
        raise ValueError(f"no class folders in {folder}: {exc}") from None
    counts = np.bincount(np.asarray(ds.targets, dtype=np.int64), minlength=len(ds.classes))
    for cls, n in zip(ds.classes, counts):
        if n == 0:
            raise ValueError(f"empty class folder (no images): {folder / cls}")
    prefix = len(str(folder)) + 1
    files = np.array([os.fsencode(p[prefix:]) for p, _ in ds.samples], dtype=np.bytes_)
    return StreamSplit(folder, files, torch.tensor(ds.targets, dtype=torch.int64), list(ds.classes))


def list_splits(root: Path) -> dict[str, StreamSplit]:
    """:func:`list_split` of every split of ``root``."""
    return {s: list_split(root, s) for s in SPLITS}


def _header_size(path: str) -> tuple[int, int]:
    """``(width, height)`` of an image from its header (PIL decodes no pixels for this)."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:  # PIL raises several types for bad files
        raise ValueError(f"cannot read image {path}: {exc}") from None


def estimate_decoded_bytes(split: StreamSplit, sample: int = SIZE_SAMPLE, seed: int = 0) -> tuple[int, set]:
    """Bytes of ``split`` decoded at native size (uint8 RGB), from the headers of ``sample`` seeded images.

    Returns:
        ``(image count x mean sampled H*W*3, the set of sampled (width, height))``.
    """
    pick = random.Random(seed).sample(range(len(split)), min(sample, len(split)))
    sizes = [_header_size(split.path(i)) for i in pick]
    mean_pixels = sum(w * h for w, h in sizes) / len(sizes)
    return round(len(split) * mean_pixels * 3), set(sizes)


def should_stream(splits: dict[str, StreamSplit], memory_limit_bytes: int | None = None) -> tuple[bool, int]:
    """Whether all splits decoded at once would exceed ``memory_limit_bytes`` (default
    :func:`default_memory_limit`); returns ``(decision, estimated bytes)``."""
    limit = default_memory_limit() if memory_limit_bytes is None else memory_limit_bytes
    total = sum(estimate_decoded_bytes(s)[0] for s in splits.values())
    return total > limit, total


def load_streamed_imagefolder(
    root: Path,
    name: str = "imagefolder",
    splits: dict[str, StreamSplit] | None = None,
    crop_size: int = DEFAULT_CROP_SIZE,
    resize_size: int = DEFAULT_RESIZE_SIZE,
    workers: int | None = None,
    stats_images: int = STATS_IMAGES,
) -> DatasetSplits:
    """A :class:`common.data.splits.DatasetSplits` whose splits are :class:`StreamSplit` s.

    Args:
        root: folder with ``train/``, ``val/``, ``test/`` ImageFolder subfolders (images of any size).
        splits: the listing, when the caller already made it (:func:`list_splits`).
        crop_size, resize_size: the transforms' sizes (``image_size`` is ``crop_size``).
        workers: DataLoader workers of every loader over these splits (``None``: ``min(8, CPUs)``).
        stats_images: train images (seeded, class-stratified) behind mean/std.

    Raises:
        FileNotFoundError: the root or a split folder is missing.
        ValueError: a split's class folders differ from train's, or an image cannot be decoded.
    """
    root = Path(root).resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    timings: dict[str, dict] = {}
    if splits is None:
        splits = {}
        for s in SPLITS:
            t0 = time.perf_counter()
            splits[s] = list_split(root, s)
            timings[s] = {"list_s": time.perf_counter() - t0}
    for s in SPLITS:
        if splits[s].classes != splits["train"].classes:
            raise ValueError(
                f"class folders of {root / s} differ from {root / 'train'}: "
                f"{splits[s].classes} vs {splits['train'].classes}"
            )
        splits[s] = replace(splits[s], crop_size=crop_size, resize_size=resize_size, workers=workers)
        timings.setdefault(s, {}).update(cached=False, streamed=True)
    t0 = time.perf_counter()
    mean, std = sample_mean_std(splits["train"], stats_images, STATS_SEED)
    timings["train"]["stats_s"] = time.perf_counter() - t0
    return DatasetSplits(
        name,
        splits["train"],
        splits["val"],
        splits["test"],
        list(splits["train"].classes),
        mean,
        std,
        crop_size,
        str(root),
        timings,
    )


def sample_mean_std(
    split: StreamSplit, images: int = STATS_IMAGES, seed: int = STATS_SEED
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std (pixel/255 scale) of a seeded class-stratified sample of ``split`` after the
    eval transform: ``images`` crops of ``3 x crop x crop`` bytes are held at once (38 MB at 256 x 224²)."""
    sub = split.subset(min(images, len(split)), seed)
    ds = DecodeDataset(sub, eval_transform(sub.resize_size, sub.crop_size), augment=False, seed=0)
    crops = torch.stack([ds[(i, 0)][0] for i in range(len(sub))])  # n x 3 x crop x crop uint8
    return mean_std(crops)

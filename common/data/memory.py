"""In-memory datasets: decoded once into ``uint8`` tensors, ImageFolders through a decode-once cache.

Every split is a :class:`common.data.splits.TensorSplit` of shape ``N x 3 x H x W`` (about 184 MB for
all of CIFAR-10), so batching, normalization and augmentation are whole-batch tensor ops on the target
device (:class:`common.data.loader.BatchLoader`). :func:`load_digits` builds scikit-learn's digits,
:func:`load_cifar10` reads torchvision's CIFAR-10 binaries, and :func:`load_imagefolder` decodes an
ImageFolder whose images all have one size in a process pool (:func:`decode_images`), caching each
decoded split under the cache folder keyed by the split's files (names, sizes, labels and mtimes), so a
changed, moved or relabelled file is decoded again and never served stale. Which dataset is which:
:mod:`common.data.datasets`.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from common.data.splits import (
    IMAGE_EXTENSIONS,
    SPLITS,
    DatasetSplits,
    TensorSplit,
    listing_fingerprint,
    mean_std,
    stratified_indices,
)
from common.files import atomic_write
from common.paths import default_cache_dir

CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES: list[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGITS_SPLIT_SEED = 0
CIFAR10_VAL_SEED = 0
CIFAR10_VAL_SIZE = 5000
_CACHE_VERSION = 1


def load_digits() -> DatasetSplits:
    """scikit-learn's digits at 32x32 RGB, split 60/20/20 by class (see :mod:`common.data.datasets`)."""
    from sklearn.datasets import load_digits as sklearn_digits
    from sklearn.model_selection import train_test_split

    d = sklearn_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None]  # N x 1 x 8 x 8, 0..16
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=d.target, random_state=DIGITS_SPLIT_SEED)
    va, te = train_test_split(rest, test_size=0.5, stratify=d.target[rest], random_state=DIGITS_SPLIT_SEED)
    split = {
        k: TensorSplit(x[np.sort(v)], y[np.sort(v)], _raw_fingerprint(d.images[np.sort(v)], d.target[np.sort(v)]))
        for k, v in (("train", tr), ("val", va), ("test", te))
    }
    mean, std = mean_std(split["train"].images)
    return DatasetSplits(
        "digits",
        split["train"],
        split["val"],
        split["test"],
        [str(i) for i in range(10)],
        mean,
        std,
        32,
        "embedded:digits",
    )


def _raw_fingerprint(images: np.ndarray, labels: np.ndarray) -> str:
    """A split's content fingerprint from the data it is computed from (digits: scikit-learn's 8x8
    values, exact on every machine, where the upsampled pixels could differ in a rounding)."""
    h = hashlib.sha256(np.ascontiguousarray(images, dtype=np.float64).tobytes())
    h.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
    return h.hexdigest()[:16]


def load_cifar10(root: Path, download: bool) -> DatasetSplits:
    """torchvision's CIFAR-10 binaries under ``root``, with a seeded stratified 5,000-image val split held
    out of train."""
    from torchvision.datasets import CIFAR10

    if not download and not (root / "cifar-10-batches-py").is_dir():
        raise FileNotFoundError(
            f"CIFAR-10 binaries not found: expected torchvision's python version in {root / 'cifar-10-batches-py'}/ "
            "(data_batch_1 ... data_batch_5, test_batch, batches.meta); give the folder that holds "
            "cifar-10-batches-py/ as the data root (--data-root DIR)"
        )
    tr = CIFAR10(str(root), train=True, download=download)
    te = CIFAR10(str(root), train=False, download=download)

    def to_split(ds, idx=None) -> TensorSplit:
        x = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        y = torch.tensor(ds.targets, dtype=torch.int64)
        return TensorSplit(x, y) if idx is None else TensorSplit(x[idx], y[idx])

    full = to_split(tr)
    val_idx = stratified_indices(full.labels, CIFAR10_VAL_SIZE, CIFAR10_VAL_SEED)
    keep = torch.ones(len(full), dtype=torch.bool)
    keep[val_idx] = False
    return DatasetSplits(
        "cifar10",
        TensorSplit(full.images[keep], full.labels[keep]),
        TensorSplit(full.images[val_idx], full.labels[val_idx]),
        to_split(te),
        list(tr.classes),
        CIFAR_MEAN,
        CIFAR_STD,
        32,
        str(root.resolve()),
    )


def _list_imagefolder(split_dir: Path) -> tuple[list[str], list[str], list[int], str, str]:
    """Files, classes, labels, the split's :func:`common.data.splits.listing_fingerprint` (names, sizes,
    labels) and the decode cache's key (that fingerprint and the files' mtimes) of one split folder."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {split_dir}")
    files: list[str] = []
    labels: list[int] = []
    entries: list[tuple[str, int, int]] = []
    mtime_sum = 0
    for ci, cls in enumerate(classes):
        found = sorted(
            (e for e in os.scandir(split_dir / cls) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
            key=lambda e: e.name,
        )
        if not found:
            raise ValueError(f"empty class folder (no images): {split_dir / cls}")
        for e in found:
            st = e.stat()
            mtime_sum += st.st_mtime_ns
            files.append(e.path)
            labels.append(ci)
            entries.append((f"{cls}/{e.name}", st.st_size, ci))
    content = listing_fingerprint(entries)
    # an image edited in place at the same size keeps the content fingerprint, not its mtime
    cache_key = hashlib.sha1(f"{content}:{mtime_sum}".encode()).hexdigest()[:16]
    return files, classes, labels, content, cache_key


def _decode_chunk(paths: Sequence[str]) -> np.ndarray:
    """Decode image files to a uint8 ``n x H x W x 3`` array; all must share one size."""
    from PIL import Image

    out = None
    for i, p in enumerate(paths):
        try:
            # reading the bytes first is ~2x faster than letting PIL read the file handle
            with open(p, "rb") as fh:
                im = Image.open(io.BytesIO(fh.read()))
                a = np.asarray(im.convert("RGB"))
        except Exception as exc:  # PIL raises several types for bad files
            raise ValueError(f"cannot decode image {p}: {exc}") from None
        if out is None:
            out = np.empty((len(paths),) + a.shape, dtype=np.uint8)
        elif a.shape != out.shape[1:]:
            raise ValueError(
                f"image {p} has size {a.shape[1]}x{a.shape[0]}, expected "
                f"{out.shape[2]}x{out.shape[1]} like the rest of the split "
                "(load_dataset('imagefolder', ..., stream=True) decodes images of any size)"
            )
        out[i] = a
    return out


def decode_images(paths: Sequence[str], workers: int | None = None) -> torch.Tensor:
    """Decode ``paths`` in a process pool into a uint8 ``N x 3 x H x W`` tensor."""
    workers = workers or os.cpu_count() or 1
    chunk = max(256, math.ceil(len(paths) / (workers * 8)))
    chunks = [paths[i : i + chunk] for i in range(0, len(paths), chunk)]
    if workers <= 1 or len(chunks) <= 1:
        arrays = [_decode_chunk(c) for c in chunks]
    else:
        with ProcessPoolExecutor(max_workers=workers) as ex:
            arrays = list(ex.map(_decode_chunk, chunks))
    shapes = {a.shape[1:] for a in arrays}
    if len(shapes) > 1:
        raise ValueError(
            f"images in {Path(paths[0]).parents[1]} have different sizes: {sorted(shapes)}; "
            "load_dataset('imagefolder', ..., stream=True) decodes them on the fly at one crop size"
        )
    return torch.from_numpy(np.concatenate(arrays)).permute(0, 3, 1, 2).contiguous()


def _cache_path(cache_dir: Path, root: Path, split: str, fingerprint: str) -> Path:
    key = hashlib.sha1(f"v{_CACHE_VERSION}|{root}|{split}|{fingerprint}".encode()).hexdigest()[:20]
    return cache_dir / "decoded" / f"{root.name}-{split}-{key}.pt"


def atomic_torch_save(obj, path: Path) -> None:
    """``torch.save`` ``obj`` to ``path`` atomically (:func:`common.files.atomic_write`)."""
    atomic_write(path, lambda fh: torch.save(obj, fh))


def _load_split(
    root: Path, split: str, cache_dir: Path | None, workers: int | None
) -> tuple[TensorSplit, list[str], dict]:
    t0 = time.perf_counter()
    files, classes, labels, content, key = _list_imagefolder(root / split)
    t_list = time.perf_counter() - t0
    path = _cache_path(cache_dir, root, split, key) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["classes"] == classes and len(blob["labels"]) == len(files):
                t = {"list_s": t_list, "load_s": time.perf_counter() - t0 - t_list, "cached": True}
                return TensorSplit(blob["images"], blob["labels"], content), classes, t
        except Exception:  # an unreadable cache is re-created below, never trusted
            pass
    images = decode_images(files, workers)
    ts = TensorSplit(images, torch.tensor(labels, dtype=torch.int64), content)
    if path is not None:
        atomic_torch_save({"images": ts.images, "labels": ts.labels, "classes": classes}, path)
    return ts, classes, {"list_s": t_list, "load_s": time.perf_counter() - t0 - t_list, "cached": False}


def load_imagefolder(root: Path, name: str, cache_dir, workers, mean, std) -> DatasetSplits:
    """An ImageFolder ``root/{train,val,test}/<class>/`` decoded in memory through the decode cache under
    ``cache_dir`` (default ``default_cache_dir()``); ``mean``/``std`` ``None``: from its train split."""
    root = root.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    parts, timings, classes = {}, {}, None
    for split in SPLITS:
        parts[split], cls, timings[split] = _load_split(root, split, cache, workers)
        if classes is not None and cls != classes:
            raise ValueError(f"class folders of {root / split} differ from {root / 'train'}: {cls} vs {classes}")
        classes = cls
    for split in SPLITS:
        if tuple(parts[split].images.shape[-2:]) != tuple(parts["train"].images.shape[-2:]):
            raise ValueError(
                f"images in {root / split} are {tuple(parts[split].images.shape[-2:])}, "
                f"train/ has {tuple(parts['train'].images.shape[-2:])}"
            )
    if mean is None:
        mean, std = mean_std(parts["train"].images)
    return DatasetSplits(
        name,
        parts["train"],
        parts["val"],
        parts["test"],
        classes,
        tuple(mean),
        tuple(std),
        int(parts["train"].images.shape[-2]),
        str(root),
        timings,
    )

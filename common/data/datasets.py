"""Datasets as in-memory uint8 tensors and a decode-once cache (batches: :mod:`common.data.loader`).

Every dataset is held as ``uint8`` tensors of shape ``N x 3 x H x W`` (about 184 MB for all of
CIFAR-10), so batching, normalization and augmentation are whole-batch tensor ops on the target
device (:class:`common.data.loader.BatchLoader`) and no PIL work happens per training step.

Datasets (``load_dataset(name=...)``):

* ``"digits"``: scikit-learn's ``load_digits()`` (1,797 images of 8x8 pixels, values 0-16,
  10 classes) upsampled to 32x32 with bilinear interpolation, scaled to 0-255, replicated to 3 RGB
  channels, and split 60/20/20 into train/val/test (1,078/359/360) stratified by class with a
  fixed seed (``DIGITS_SPLIT_SEED``). It ships with scikit-learn, so it needs no files or network:
  the default for tests and smoke runs.
* ``"cifar10-jpeg"``: the ImageFolder tree ``../shared/data/cifar10-jpeg/{train,val,test}/<class>/``.
* ``"imagefolder"``: any root with ``train/``, ``val/`` and ``test/`` ImageFolder subfolders whose
  images all have the same size. Mean/std are computed from its train split. When its decoded size
  (estimated from a few image headers) would exceed ``memory_limit_bytes`` (default: a quarter of the
  RAM), or with ``stream=True``, it is streamed instead: decoded on the fly by DataLoader workers with
  the ImageNet transforms, images of any size, mean/std from a seeded train sample
  (:mod:`common.data.stream`).
* ``"cifar10"``: torchvision's CIFAR-10 binaries under ``root``. A fixed 5,000-image validation split
  (500 per class, chosen with ``CIFAR10_VAL_SEED``) is held out of the 50,000 training images, so
  train/val/test are 45,000/5,000/10,000 like cifar10-jpeg. Downloads only if ``download=True``.
* ``"auto"``: ``"cifar10-jpeg"`` when the shared data exists, else ``"digits"``.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from common.files import atomic_write
from common.paths import CIFAR_JPEG_ROOT, default_cache_dir

if TYPE_CHECKING:  # common.data.stream imports this module
    from common.data.stream import StreamSplit

CIFAR_MEAN: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
CIFAR_STD: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
CIFAR_CLASSES: list[str] = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DIGITS_SPLIT_SEED = 0
CIFAR10_VAL_SEED = 0
CIFAR10_VAL_SIZE = 5000
SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DATASET_NAMES = ("auto", "digits", "cifar10-jpeg", "imagefolder", "cifar10")
_CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------
# containers
# --------------------------------------------------------------------------------------------------
@dataclass
class TensorSplit:
    """One split of a dataset.

    Attributes:
        images: ``uint8`` tensor ``N x 3 x H x W`` (RGB, 0-255).
        labels: ``int64`` tensor ``N``.
    """

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4 or self.images.shape[1] != 3:
            raise ValueError(f"images must be uint8 N x 3 x H x W, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.dim() != 1 or len(self.labels) != len(self.images):
            raise ValueError(
                f"labels must be a vector of length {len(self.images)}, got shape {tuple(self.labels.shape)}"
            )
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def subset(self, n: int, seed: int = 0) -> TensorSplit:
        """Deterministic class-stratified subset of ``n`` images (kept in original order).

        Each class contributes in proportion to its frequency (±1 image): the images of each class
        are shuffled with ``seed`` and ranked by their fractional position within the class, and the
        ``n`` lowest-ranked images are kept. ``n >= len(self)`` returns ``self``.
        """
        if n <= 0:
            raise ValueError(f"subset size must be positive, got {n}")
        if n >= len(self):
            return self
        idx = stratified_indices(self.labels, n, seed)
        return TensorSplit(self.images[idx], self.labels[idx])


def stratified_indices(labels: torch.Tensor, n: int, seed: int) -> torch.Tensor:
    """Sorted indices of a seeded class-stratified sample of size ``n`` from ``labels`` (``N``)."""
    g = torch.Generator().manual_seed(seed)
    labels = labels.cpu()
    rank = torch.empty(len(labels), dtype=torch.float64)
    for c in torch.unique(labels):
        members = torch.nonzero(labels == c).flatten()
        order = members[torch.randperm(len(members), generator=g)]
        # fractional position in the class, so every class is consumed at the same rate
        rank[order] = (torch.arange(len(members), dtype=torch.float64) + 0.5) / len(members)
    # equal ranks across classes are broken by a random order (stable sort on rank after shuffle)
    shuffle = torch.randperm(len(labels), generator=g)
    chosen = shuffle[torch.argsort(rank[shuffle], stable=True)][:n]
    return torch.sort(chosen).values


@dataclass
class DatasetSplits:
    """A dataset: three splits plus what is needed to feed a model.

    Attributes:
        name: dataset name (``"digits"``, ``"cifar10-jpeg"``, ...).
        train, val, test: the splits: in-memory :class:`TensorSplit` s, or for a streamed ImageFolder
            :class:`common.data.stream.StreamSplit` s (``len``, ``labels`` and ``subset`` as a TensorSplit,
            no ``images``); :func:`common.data.loader.make_loader` batches either.
        classes: class names, index = label.
        mean, std: per-channel normalization for pixel/255 inputs.
        image_size: H (= W) of the images (a streamed dataset's crop size).
        source: absolute root path, or ``"embedded:digits"``.
    """

    name: str
    train: TensorSplit | StreamSplit
    val: TensorSplit | StreamSplit
    test: TensorSplit | StreamSplit
    classes: list[str]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    image_size: int
    source: str
    timings: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def hflip(self) -> bool:
        """Whether horizontal flips are a valid augmentation (not for digits: a flipped 3 is no digit)."""
        return self.name != "digits"

    @property
    def streaming(self) -> bool:
        """Whether the splits are decoded on the fly (:mod:`common.data.stream`) rather than held in memory."""
        return not isinstance(self.train, TensorSplit)

    def split(self, name: str) -> TensorSplit | StreamSplit:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; valid: {', '.join(SPLITS)}")
        return getattr(self, name)


# --------------------------------------------------------------------------------------------------
# loading
# --------------------------------------------------------------------------------------------------
def load_dataset(
    name: str = "auto",
    root: str | Path | None = None,
    cache_dir: str | Path | None = None,
    download: bool = False,
    workers: int | None = None,
    stream: bool | None = None,
    memory_limit_bytes: int | None = None,
    crop_size: int | None = None,
    resize_size: int | None = None,
) -> DatasetSplits:
    """Load a dataset as uint8 tensors, or an ImageFolder as a streamed one (see the module docstring).

    Args:
        name: one of ``DATASET_NAMES``.
        root: dataset root; defaults to ``../shared/data/cifar10-jpeg`` for cifar10-jpeg and to
            ``REPO/.cache/cifar10`` for cifar10. Required for imagefolder.
        cache_dir: where decoded ImageFolder splits are cached (default ``default_cache_dir()``).
        download: cifar10 only: allow torchvision to download the binaries.
        workers: processes for the first JPEG decode (default: all CPUs); for a streamed dataset, the
            DataLoader workers of its loaders (default: ``min(8, CPUs)``).
        stream: imagefolder only: ``True`` decodes on the fly (:mod:`common.data.stream`), ``False`` in memory,
            ``None`` (default) streams when the decoded splits would exceed ``memory_limit_bytes``.
        memory_limit_bytes: imagefolder only: the limit of that decision (default: a quarter of the RAM,
            :func:`common.data.stream.default_memory_limit`).
        crop_size, resize_size: streamed only: the transforms' crop (the batches' H = W) and the eval
            transform's shorter side (defaults 224 / 256).

    Raises:
        FileNotFoundError: the root or a split folder is missing.
        ValueError: unknown name, an empty class folder, an unreadable image (the file is named).
    """
    if name == "auto":
        name = "cifar10-jpeg" if (Path(root) if root else CIFAR_JPEG_ROOT).is_dir() else "digits"
    if name == "digits":
        return _load_digits()
    if name == "cifar10-jpeg":
        return _load_imagefolder(
            Path(root) if root else CIFAR_JPEG_ROOT, "cifar10-jpeg", cache_dir, workers, CIFAR_MEAN, CIFAR_STD
        )
    if name == "imagefolder":
        if root is None:
            raise ValueError("load_dataset('imagefolder') needs root=<folder with train/ val/ test/>")
        return _load_imagefolder_auto(
            Path(root), cache_dir, workers, stream, memory_limit_bytes, crop_size, resize_size
        )
    if name == "cifar10":
        return _load_cifar10(Path(root) if root else default_cache_dir() / "cifar10", download)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")


def _load_imagefolder_auto(
    root: Path,
    cache_dir: str | Path | None,
    workers: int | None,
    stream: bool | None,
    memory_limit_bytes: int | None,
    crop_size: int | None,
    resize_size: int | None,
) -> DatasetSplits:
    """An ImageFolder in memory, or streamed when asked or when it would not fit (see :func:`load_dataset`)."""
    from common.data import stream as st  # imports this module

    root = root.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    listing = None
    if stream is None:
        # listing and a few image headers per split: nothing is decoded to decide
        listing = st.list_splits(root)
        stream, _ = st.should_stream(listing, memory_limit_bytes)
    if not stream:
        return _load_imagefolder(root, "imagefolder", cache_dir, workers, None, None)
    return st.load_streamed_imagefolder(
        root,
        "imagefolder",
        listing,
        crop_size or st.DEFAULT_CROP_SIZE,
        resize_size or st.DEFAULT_RESIZE_SIZE,
        workers,
    )


def _load_digits() -> DatasetSplits:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    d = load_digits()
    x = torch.from_numpy(d.images.astype(np.float32))[:, None]  # N x 1 x 8 x 8, 0..16
    x = F.interpolate(x, size=(32, 32), mode="bilinear", align_corners=False)
    x = (x * (255.0 / 16.0)).round().clamp(0, 255).to(torch.uint8).repeat(1, 3, 1, 1)
    y = torch.from_numpy(d.target.astype(np.int64))
    idx = np.arange(len(y))
    tr, rest = train_test_split(idx, test_size=0.4, stratify=d.target, random_state=DIGITS_SPLIT_SEED)
    va, te = train_test_split(rest, test_size=0.5, stratify=d.target[rest], random_state=DIGITS_SPLIT_SEED)
    split = {k: TensorSplit(x[np.sort(v)], y[np.sort(v)]) for k, v in (("train", tr), ("val", va), ("test", te))}
    mean, std = _mean_std(split["train"].images)
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


def _mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of ``images`` (uint8 ``N x 3 x H x W``) on the pixel/255 scale."""
    x = images.double().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())


def _load_cifar10(root: Path, download: bool) -> DatasetSplits:
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


def _list_imagefolder(split_dir: Path) -> tuple[list[str], list[str], list[int], str]:
    """Files, classes, labels and a cheap fingerprint (count, bytes, mtimes) of one split folder."""
    if not split_dir.is_dir():
        raise FileNotFoundError(f"split folder not found: {split_dir}")
    classes = sorted(e.name for e in os.scandir(split_dir) if e.is_dir())
    if not classes:
        raise ValueError(f"no class folders in {split_dir}")
    files: list[str] = []
    labels: list[int] = []
    h = hashlib.sha1()
    total, mtime_sum = 0, 0
    for ci, cls in enumerate(classes):
        entries = sorted(
            (e for e in os.scandir(split_dir / cls) if e.is_file() and e.name.lower().endswith(IMAGE_EXTENSIONS)),
            key=lambda e: e.name,
        )
        if not entries:
            raise ValueError(f"empty class folder (no images): {split_dir / cls}")
        for e in entries:
            st = e.stat()
            total += st.st_size
            mtime_sum += st.st_mtime_ns
            files.append(e.path)
            labels.append(ci)
        h.update(f"{cls}:{len(entries)};".encode())
    h.update(f"{len(files)}:{total}:{mtime_sum}".encode())
    return files, classes, labels, h.hexdigest()[:16]


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
    files, classes, labels, fp = _list_imagefolder(root / split)
    t_list = time.perf_counter() - t0
    path = _cache_path(cache_dir, root, split, fp) if cache_dir is not None else None
    if path is not None and path.is_file():
        try:
            blob = torch.load(path, map_location="cpu", weights_only=True)
            if blob["classes"] == classes and len(blob["labels"]) == len(files):
                t = {"list_s": t_list, "load_s": time.perf_counter() - t0 - t_list, "cached": True}
                return TensorSplit(blob["images"], blob["labels"]), classes, t
        except Exception:  # an unreadable cache is re-created below, never trusted
            pass
    images = decode_images(files, workers)
    ts = TensorSplit(images, torch.tensor(labels, dtype=torch.int64))
    if path is not None:
        atomic_torch_save({"images": ts.images, "labels": ts.labels, "classes": classes}, path)
    return ts, classes, {"list_s": t_list, "load_s": time.perf_counter() - t0 - t_list, "cached": False}


def _load_imagefolder(root: Path, name: str, cache_dir, workers, mean, std) -> DatasetSplits:
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
        mean, std = _mean_std(parts["train"].images)
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

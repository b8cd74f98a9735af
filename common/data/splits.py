"""The splits of a dataset: in-memory :class:`TensorSplit` s or streamed :class:`StreamSplit` s, in a
:class:`DatasetSplits` with what a model needs (classes, normalization, image size).

A :class:`TensorSplit` holds ``uint8`` images ``N x 3 x H x W`` and ``int64`` labels ``N``
(:mod:`common.data.memory` loads them); a :class:`StreamSplit` holds an ImageFolder split's file names and
labels, decoded on the fly (:mod:`common.data.stream`, :mod:`common.data.streamloader`). Both take
seeded class-stratified subsets (:func:`stratified_indices`). :func:`mean_std` is the per-channel
normalization of uint8 images on the pixel/255 scale. ``SPLITS`` and ``IMAGE_EXTENSIONS`` are the
ImageFolder layout both loaders read: ``ROOT/<split>/<class>/<image>``.

:func:`content_fingerprint` identifies what a split holds (a run log records it, so a resume on other
images or labels is refused): an ImageFolder split by its files' names, sizes and labels
(:func:`listing_fingerprint`; listed and stat-ed, never decoded), a split built in memory by its
loader's own fingerprint or else its pixels and labels.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch

SPLITS = ("train", "val", "test")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")
DEFAULT_CROP_SIZE = 224  # a streamed split's crop (H = W of its batches)
DEFAULT_RESIZE_SIZE = 256  # the shorter side a streamed split's eval transform resizes to


@dataclass
class TensorSplit:
    """One split of a dataset.

    Attributes:
        images: ``uint8`` tensor ``N x 3 x H x W`` (RGB, 0-255).
        labels: ``int64`` tensor ``N``.
        fingerprint: what its loader knows identifies it (see :func:`content_fingerprint`); None: its
            pixels and labels do.
    """

    images: torch.Tensor
    labels: torch.Tensor
    fingerprint: str | None = field(default=None, compare=False, repr=False)

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


@dataclass(eq=False)
class StreamSplit:
    """One split of an ImageFolder, kept as file names and decoded on the fly.

    Attributes:
        folder: the split folder (``ROOT/<split>``).
        files: ``N`` paths relative to ``folder`` as a fixed-width bytes array: one buffer, so forked
            workers share it instead of copying a list of Python strings page by page.
        labels: ``int64`` tensor ``N`` (``ImageFolder.targets``).
        classes: class names, index = label.
        crop_size: H = W of the images the loaders yield.
        resize_size: shorter side the eval transform resizes to before its center crop.
        workers: DataLoader worker processes (``None``: ``min(8, CPUs)``).
        fingerprint: :func:`content_fingerprint`, once computed.
    """

    folder: Path
    files: np.ndarray
    labels: torch.Tensor
    classes: list[str]
    crop_size: int = DEFAULT_CROP_SIZE
    resize_size: int = DEFAULT_RESIZE_SIZE
    workers: int | None = None
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if len(self.files) != len(self.labels):
            raise ValueError(f"{self.folder}: {len(self.files)} files but {len(self.labels)} labels")
        if self.crop_size <= 0 or self.resize_size <= 0:
            raise ValueError(f"crop and resize sizes must be positive, got {self.crop_size} / {self.resize_size}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def images(self) -> torch.Tensor:
        raise AttributeError(
            f"the split {self.folder} is streamed (decoded on the fly), so it has no in-memory images: "
            "iterate it with common.data.loader.make_loader"
        )

    def path(self, i: int) -> str:
        """Absolute path of image ``i``."""
        return os.path.join(self.folder, os.fsdecode(self.files[i]))

    def subset(self, n: int, seed: int = 0) -> StreamSplit:
        """Seeded class-stratified subset of ``n`` images in original order, as :meth:`TensorSplit.subset`."""
        if n <= 0:
            raise ValueError(f"subset size must be positive, got {n}")
        if n >= len(self):
            return self
        idx = stratified_indices(self.labels, n, seed)
        return replace(self, files=self.files[idx.numpy()], labels=self.labels[idx], fingerprint=None)


@dataclass
class DatasetSplits:
    """A dataset: three splits plus what is needed to feed a model.

    Attributes:
        name: dataset name (``"digits"``, ``"cifar10-jpeg"``, ...).
        train, val, test: the splits: in-memory :class:`TensorSplit` s, or for a streamed ImageFolder
            :class:`StreamSplit` s (``len``, ``labels`` and ``subset`` as a TensorSplit,
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

    def normalized(self, mean: tuple[float, ...], std: tuple[float, ...]) -> DatasetSplits:
        """These splits fed with another per-channel normalization (a model's own, e.g. the statistics it
        was trained with); the images are shared, not copied.

        Raises:
            ValueError: see :func:`check_normalization`.
        """
        check_normalization(mean, std)
        return replace(self, mean=tuple(float(v) for v in mean), std=tuple(float(v) for v in std))


def check_normalization(mean: tuple[float, ...] | None, std: tuple[float, ...] | None) -> None:
    """Refuse a per-channel normalization that cannot be one: given without the other, not one value per
    RGB channel, not finite, or a std that is not positive (``None`` for both: none given).

    Raises:
        ValueError: naming ``mean`` / ``std`` and the value.
    """
    if mean is None and std is None:
        return
    if mean is None or std is None:
        raise ValueError(
            f"give mean and std together (the normalization a model was trained with), got mean {mean!r}, std {std!r}"
        )
    for name, values in (("mean", mean), ("std", std)):
        if len(values) != 3 or not all(np.isfinite(v) for v in values):
            raise ValueError(
                f"{name} must be 3 finite numbers, one per RGB channel (e.g. 0.485,0.456,0.406), got {values!r}"
            )
    if not all(v > 0 for v in std):
        raise ValueError(f"std must be positive, got {std!r}")


def listing_fingerprint(entries: Iterable[tuple[str, int, int]]) -> str:
    """16 hex digits of the SHA-256 of an ImageFolder split's ``(path relative to the split folder, size
    in bytes, label)`` entries, in path order: a file renamed, moved to another class, resized or swapped
    with another changes it."""
    h = hashlib.sha256()
    for name, size, label in sorted(entries):
        h.update(f"{name}\0{size}\0{label}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def content_fingerprint(split: TensorSplit | StreamSplit) -> str:
    """What a split holds, as 16 hex digits: its loader's ``fingerprint`` where it set one (an ImageFolder
    split read into memory: :func:`listing_fingerprint` of its files); a streamed split's
    :func:`listing_fingerprint` (each file stat-ed once, then kept); else the SHA-256 of its pixels and labels."""
    if split.fingerprint is None and isinstance(split, StreamSplit):
        entries = []
        for i in range(len(split)):
            name = os.fsdecode(split.files[i])
            entries.append((name, os.stat(os.path.join(split.folder, name)).st_size, int(split.labels[i])))
        split.fingerprint = listing_fingerprint(entries)
    if split.fingerprint is not None:
        return split.fingerprint
    h = hashlib.sha256(f"{tuple(split.images.shape)}|".encode())
    h.update(split.images.cpu().contiguous().numpy().tobytes())
    h.update(split.labels.cpu().to(torch.int64).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def mean_std(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of ``images`` (uint8 ``N x 3 x H x W``) on the pixel/255 scale."""
    x = images.double().div_(255.0).transpose(0, 1).reshape(images.shape[1], -1)
    return tuple(x.mean(1).tolist()), tuple(x.std(1).tolist())

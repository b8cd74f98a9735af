"""The streamed loader: a :class:`common.data.splits.StreamSplit` decoded on the fly in normalized batches.

A :class:`StreamLoader` is a ``torch.utils.data.DataLoader`` whose persistent worker processes open each
JPEG with PIL (:class:`DecodeDataset`), apply the standard ImageNet transforms and return ``uint8``
crops, which the loader normalizes on its device exactly as :class:`common.data.loader.BatchLoader`
does. ``common.data.loader.make_loader`` and ``calibration_loader`` return one for a streamed split, so
search, BN recalibration, finetuning and evaluation do not see the difference.

Transforms (sizes are parameters, defaults ``common.data.splits.DEFAULT_CROP_SIZE`` /
``DEFAULT_RESIZE_SIZE``):

* train (augmented): ``RandomResizedCrop(crop_size)`` (scale 0.08-1, ratio 3/4-4/3) then
  ``RandomHorizontalFlip()`` (left out when ``flip=False``);
* eval: ``Resize(resize_size)`` (shorter side) then ``CenterCrop(crop_size)``.

Reproducibility: the augmentation of image ``i`` in epoch ``e`` is drawn from a generator seeded with
``(seed, e, i)`` alone, inside whichever worker decodes it, so an epoch is the same for any number of
workers, any world size, after :meth:`StreamLoader.iter_from`, and when iterated twice (BN
recalibration passes over the same calibration images). The order is
``DistributedSampler``'s seeded permutation of ``(seed, epoch)``; each rank takes every
``world_size``-th image, so global batch ``b`` is the same set of images as batch ``b`` of the
single-process run. Evaluation shards are disjoint (no padding), so all-reduced counts are exact.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.data.loaderbase import LoaderBase
from common.data.splits import StreamSplit

MAX_DEFAULT_WORKERS = 8
_SEED_MASK = (1 << 64) - 1


# --------------------------------------------------------------------------------------------------
# decoding (runs in the DataLoader workers)
# --------------------------------------------------------------------------------------------------
def train_transform(crop_size: int, flip: bool):
    from torchvision import transforms as T

    steps = [T.RandomResizedCrop(crop_size)] + ([T.RandomHorizontalFlip()] if flip else [])
    return T.Compose(steps)


def eval_transform(resize_size: int, crop_size: int):
    from torchvision import transforms as T

    return T.Compose([T.Resize(resize_size), T.CenterCrop(crop_size)])


def _open_rgb(path: str):
    """The image at ``path`` as an RGB PIL image (as ``ImageFolder``'s loader, with the file named on failure)."""
    from PIL import Image

    try:
        with open(path, "rb") as fh:
            return Image.open(fh).convert("RGB")  # convert loads the pixels before the file closes
    except Exception as exc:  # PIL raises several types for bad files
        raise ValueError(f"cannot decode image {path}: {exc}") from None


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """The augmentation seed of image ``index`` in ``epoch``: a hash, so nearby triples give unrelated streams."""
    ss = np.random.SeedSequence([seed & _SEED_MASK, epoch & _SEED_MASK, index])
    return int(ss.generate_state(1, np.uint64)[0])


class DecodeDataset(Dataset):
    """Map-style dataset over a :class:`StreamSplit` keyed by ``(index, epoch)``.

    Returns ``(uint8 3 x crop x crop tensor, label)``: bytes, not floats, cross the worker pipes (4x less).
    """

    def __init__(self, split: StreamSplit, transform, augment: bool, seed: int):
        self.folder = str(split.folder)
        self.files = split.files
        self.labels = split.labels.numpy()
        self.transform = transform
        self.augment = augment
        self.seed = seed

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, key: tuple[int, int]) -> tuple[torch.Tensor, int]:
        i, epoch = key
        img = _open_rgb(os.path.join(self.folder, os.fsdecode(self.files[i])))
        if self.augment:
            # the torchvision transforms draw from the global CPU generator: seed it per image, and restore
            # it after, since with workers=0 this runs in the training process itself
            with torch.random.fork_rng(devices=[]):
                torch.default_generator.manual_seed(sample_seed(self.seed, epoch, i))
                img = self.transform(img)
        else:
            img = self.transform(img)
        x = torch.from_numpy(np.array(img, dtype=np.uint8)).permute(2, 0, 1)  # H x W x 3 -> 3 x H x W
        return x, int(self.labels[i])


class _ShardSampler(DistributedSampler):
    """``DistributedSampler`` without its padding (evaluation): rank ``r`` takes images ``r, r+W, ...``,
    so the shards are disjoint and cover the split exactly once."""

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, len(self.dataset), self.num_replicas))

    def __len__(self) -> int:
        return len(range(self.rank, len(self.dataset), self.num_replicas))


class _EpochBatches:
    """Batch sampler: this rank's batches of epoch ``epoch`` from batch ``start`` on, as ``(index, epoch)`` keys.

    The loader sets ``epoch`` and ``start`` before each pass; the DataLoader iterates this object anew each
    pass in the main process (persistent workers only receive the keys).
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int, drop_last: bool):
        self.sampler, self.batch_size, self.drop_last = sampler, batch_size, drop_last
        self.epoch, self.start = 0, 0

    def total(self) -> int:
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def batches(self, epoch: int) -> list[list[int]]:
        """Image indices of every batch of ``epoch`` on this rank."""
        self.sampler.set_epoch(epoch)
        order = list(self.sampler)
        return [order[b * self.batch_size : (b + 1) * self.batch_size] for b in range(self.total())]

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        epoch = self.epoch
        for idx in self.batches(epoch)[self.start :]:
            yield [(i, epoch) for i in idx]

    def __len__(self) -> int:
        return max(0, self.total() - self.start)


def _worker_init(_worker_id: int) -> None:
    # PIL decodes on one thread anyway; torch ops in a worker must not spawn a pool per worker
    torch.set_num_threads(1)


# --------------------------------------------------------------------------------------------------
# the loader
# --------------------------------------------------------------------------------------------------
class StreamLoader(LoaderBase):
    """Iterate a :class:`StreamSplit` in normalized, optionally augmented batches on a device.

    The same interface as :class:`common.data.loader.BatchLoader` (``__iter__``, ``__len__``, ``iter_from``,
    ``set_epoch``, ``num_images``, ``device``, ``batch_size``, ``train``, ``rank``, ``world_size``).
    ``batch_size`` is the global batch: each rank yields ``ceil(batch_size / world_size)`` images per
    batch. ``pad`` is accepted and ignored (the streamed augmentation is ``RandomResizedCrop``).

    Args:
        split, batch_size, mean, std, **settings: as :class:`common.data.loaderbase.LoaderBase`.
        workers: DataLoader worker processes (``None``: the split's, else ``min(8, CPUs)``; 0: decode in
            this process). Workers persist for the loader's lifetime; use one iterator at a time.
        prefetch_factor: batches each worker decodes ahead.

    Yields:
        ``(x, y)``: ``x`` is ``B x 3 x crop x crop`` of ``dtype`` on ``device``, ``y`` is ``int64`` ``B``.
    """

    def __init__(
        self,
        split: StreamSplit,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pad: int | None = None,
        workers: int | None = None,
        prefetch_factor: int = 2,
        **settings: Any,
    ):
        super().__init__(split, batch_size, mean, std, **settings)
        self.split = split
        self.per_rank = math.ceil(batch_size / self.world_size)
        chosen = workers if workers is not None else split.workers
        self.workers = _default_workers() if chosen is None else chosen
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        self.prefetch_factor = prefetch_factor
        transform = (
            train_transform(split.crop_size, self.flip)
            if self.augment
            else eval_transform(split.resize_size, split.crop_size)
        )
        self._dataset = DecodeDataset(split, transform, self.augment, self.seed)
        self._batches = _EpochBatches(self._sampler(), self.per_rank, self.drop_last)
        self._loader: DataLoader | None = None

    def _empty_split_error(self, split: StreamSplit) -> str:
        return f"cannot batch an empty split ({split.folder})"

    def _sampler(self) -> DistributedSampler:
        """Seeded permutation per (seed, epoch) when shuffling, equal-length shards when dropping the tail
        (training ranks must take the same number of steps), else disjoint unpadded shards."""
        kw = {"num_replicas": self.world_size, "rank": self.rank}
        if self.shuffle or self.drop_last:
            # the sampler seeds with seed + epoch: spread seeds apart so (seed, epoch + 1) != (seed + 1, epoch)
            return DistributedSampler(
                self._dataset, shuffle=self.shuffle, seed=self.seed * 1_000_003, drop_last=self.drop_last, **kw
            )
        return _ShardSampler(self._dataset, shuffle=False, **kw)

    def _dataloader(self) -> DataLoader:
        if self._loader is None:
            workers = self.workers
            self._loader = DataLoader(
                self._dataset,
                batch_sampler=self._batches,
                num_workers=workers,
                pin_memory=self.device.type == "cuda",
                persistent_workers=workers > 0,
                worker_init_fn=_worker_init if workers > 0 else None,
                # seeds the workers' own RNGs (the augmentation is seeded per image, see DecodeDataset)
                generator=torch.Generator().manual_seed(self.seed),
                prefetch_factor=self.prefetch_factor if workers > 0 else None,
            )
        return self._loader

    def __len__(self) -> int:
        return self._batches.total()

    @property
    def num_images(self) -> int:
        """Images per epoch over all ranks."""
        if self.drop_last:
            return len(self) * self.per_rank * self.world_size
        sampler = self._batches.sampler
        return len(self._dataset) if isinstance(sampler, _ShardSampler) else sampler.total_size

    def batch_indices(self, epoch: int | None = None) -> list[list[int]]:
        """Split indices of this rank's batches in ``epoch`` (default: the current one), as iterated."""
        return self._batches.batches(self.epoch if epoch is None else epoch)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from batch ``start`` on, exactly as a full pass yields them (the skipped
        ones are not decoded: every image's augmentation depends on (seed, epoch, index) only)."""
        self._batches.epoch, self._batches.start = self.epoch, start
        for x, y in self._dataloader():
            x = self.finish(self.normalize(x.to(self.device, non_blocking=True)))
            yield x, y.to(self.device, non_blocking=True)
        if self.auto_epoch:
            self.epoch += 1


def _default_workers() -> int:
    return min(MAX_DEFAULT_WORKERS, os.cpu_count() or 1)

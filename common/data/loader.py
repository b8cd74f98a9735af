"""The device-side batch loader: normalized, optionally augmented batches of a uint8 split.

A :class:`common.data.splits.TensorSplit` is moved to the device once; batching, normalization, random crops
and flips are then whole-batch tensor ops there, drawn from a CPU generator seeded with
``(seed, epoch)`` so an epoch is the same on any device. :func:`make_loader` builds one over a split of
a :class:`common.data.splits.DatasetSplits` with the dataset's normalization, :func:`calibration_loader` the
BN-calibration images. For a streamed dataset (:class:`common.data.splits.StreamSplit` splits) both return a
:class:`common.data.streamloader.StreamLoader` instead: the same interface, images decoded by DataLoader workers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from common.data.loaderbase import LoaderBase
from common.data.splits import DatasetSplits, StreamSplit, TensorSplit
from common.data.streamloader import StreamLoader


class BatchLoader(LoaderBase):
    """Iterate a :class:`TensorSplit` in normalized, optionally augmented batches on a device.

    The uint8 split is moved to ``device`` once; each batch is gathered, converted to ``dtype``,
    normalized, and (if ``augment``) randomly cropped from ``pad``-px reflect padding and (if
    ``flip``) horizontally flipped with probability 1/2, all as whole-batch tensor ops. Shuffling and augmentation draw from a CPU generator
    seeded with ``(seed, epoch)``, so an epoch is reproducible on any device; call
    :meth:`set_epoch` before each epoch (iterating also advances the epoch automatically when
    ``auto_epoch`` is True).

    With ``world_size > 1`` (distributed training) every global batch of ``batch_size`` images is
    cut into ``world_size`` contiguous slices and this loader yields slice ``rank``; the global
    order and augmentation are identical to the single-process run.

    Args:
        split, batch_size, mean, std, **settings: as :class:`common.data.loaderbase.LoaderBase`.
        pad: reflect padding of the random crops, in pixels.

    Yields:
        ``(x, y)``: ``x`` is ``B x 3 x H x W`` of ``dtype`` on ``device``, ``y`` is ``int64`` ``B``.
    """

    def __init__(
        self,
        split: TensorSplit,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        pad: int = 4,
        **settings: Any,
    ):
        super().__init__(split, batch_size, mean, std, **settings)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.pad = pad

    def __len__(self) -> int:
        n = len(self.labels)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_images(self) -> int:
        """Images per epoch over all ranks."""
        return len(self) * self.batch_size if self.drop_last else len(self.labels)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """This epoch's batches from batch ``start`` on, exactly as a full pass yields them: the skipped
        batches' shuffling and augmentation are still drawn (cheap, on the CPU generator), their images
        not gathered. A finetuning run resumed mid-epoch continues with the very batches it would have seen.
        """
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        n = len(self.labels)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            if self.augment:
                offs = torch.randint(0, 2 * self.pad + 1, (len(idx), 2), generator=g)
                flips = torch.rand(len(idx), generator=g) < 0.5
                if not self.flip:  # still drawn above, so the crops match the flip=True stream
                    flips.zero_()
            if b < start:
                continue
            if self.world_size > 1:
                per = math.ceil(len(idx) / self.world_size)
                sl = slice(self.rank * per, (self.rank + 1) * per)
                idx = idx[sl]
                if self.augment:
                    offs, flips = offs[sl], flips[sl]
            idx_d = idx.to(self.device)
            x = self.normalize(self.images[idx_d])
            if self.augment and len(idx) > 0:
                x = self._crop_flip(x, offs.to(self.device), flips.to(self.device))
            yield self.finish(x), self.labels[idx_d]
        if self.auto_epoch:
            self.epoch += 1

    def _crop_flip(self, x: torch.Tensor, offs: torch.Tensor, flips: torch.Tensor) -> torch.Tensor:
        """Random crop of the original size from reflect padding, then horizontal flip (``B x C x H x W``)."""
        bsz, _, h, w = x.shape
        p = self.pad
        xp = F.pad(x, (p, p, p, p), mode="reflect")
        rows = offs[:, 0, None] + torch.arange(h, device=x.device)  # B x H
        cols = offs[:, 1, None] + torch.arange(w, device=x.device)  # B x W
        # flipping = reading the crop's columns right-to-left
        cols = torch.where(flips[:, None], cols.flip(1), cols)
        bi = torch.arange(bsz, device=x.device)[:, None, None]
        out = xp.permute(0, 2, 3, 1)[bi, rows[:, :, None], cols[:, None, :]]  # B x H x W x C
        return out.permute(0, 3, 1, 2).contiguous()


def make_loader(
    data: DatasetSplits,
    split: str,
    batch_size: int,
    device: str | torch.device = "cpu",
    train: bool = False,
    seed: int = 0,
    subset: int | None = None,
    **kw,
) -> BatchLoader | StreamLoader:
    """A :class:`BatchLoader` over ``data.<split>`` with the dataset's normalization (a
    :class:`common.data.streamloader.StreamLoader` when the split is streamed).

    Args:
        subset: keep a seeded class-stratified subset of this many images (``seed`` picks it).
        **kw: passed to the loader (augment, drop_last, channels_last, dtype, rank, ...; a
            StreamLoader also takes ``workers`` and ignores ``pad``).
    """
    s = data.split(split)
    if subset is not None:
        s = s.subset(subset, seed)
    cls = StreamLoader if isinstance(s, StreamSplit) else BatchLoader
    return cls(s, batch_size, data.mean, data.std, device=device, train=train, seed=seed, **kw)


def calibration_loader(
    data: DatasetSplits,
    images: int,
    seed: int = 0,
    batch_size: int = 250,
    device: str | torch.device = "cpu",
    channels_last: bool = False,
) -> BatchLoader | StreamLoader:
    """The BN-calibration images: a seeded, class-stratified train subset with training augmentation.

    The baselines' running statistics were gathered on augmented images (random crop from reflect
    padding, flips), and the layers after each BN were fitted to those statistics: recalibrating the
    dense shared ResNet-18 on 1,024 or 4,096 plain train images gives 91.24-91.30 % val against its
    own 91.44 %, on 4,096 augmented ones 91.48 % (``tests/test_bn.py`` checks the augmented case). The
    crops and flips are drawn from ``seed`` (for a streamed dataset: RandomResizedCrop and flips, the
    augmentation its ImageNet-style baselines are trained with).
    """
    return make_loader(
        data,
        "train",
        batch_size,
        device=device,
        seed=seed,
        subset=min(images, len(data.train)),
        augment=True,
        flip=data.hflip,
        channels_last=channels_last,
    )

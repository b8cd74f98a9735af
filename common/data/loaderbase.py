"""What the two batch loaders share: their settings, the checks on them, and the device-side normalization.

:class:`common.data.loader.BatchLoader` (in-memory splits) and :class:`common.data.streamloader.StreamLoader`
(streamed splits) differ only in where a batch's ``uint8`` images come from; both subclass
:class:`LoaderBase`, so the two take the same options, reject bad ones with the same errors, and turn bytes
into floats with the same ops (equal bytes give equal floats on either path).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence, Sized

import torch


class LoaderBase:
    """Settings, checks and normalization common to the loaders; subclasses implement ``iter_from``.

    Args:
        split: the images (only its length is read here).
        batch_size: images per (global) batch.
        mean, std: per-channel normalization of images scaled to ``[0, 1]``.
        device: where batches are yielded.
        train: shuffle, and by default augment and drop the last partial batch.
        augment, drop_last: override the ``train`` defaults (``None``: follow ``train``).
        seed: seeds the shuffling and the augmentation.
        channels_last, dtype: memory format and dtype of the yielded images.
        rank, world_size: this process's share of every batch in distributed training.
        flip: augment with horizontal flips.
        auto_epoch: advance the epoch after every full pass.

    Raises:
        ValueError: a non-positive ``batch_size``, an empty split, ``rank`` outside ``world_size``, or
            ``drop_last`` with fewer images than one batch.
    """

    def __init__(
        self,
        split: Sized,
        batch_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        device: str | torch.device = "cpu",
        train: bool = False,
        augment: bool | None = None,
        seed: int = 0,
        drop_last: bool | None = None,
        channels_last: bool = False,
        dtype: torch.dtype = torch.float32,
        rank: int = 0,
        world_size: int = 1,
        flip: bool = True,
        auto_epoch: bool = False,
    ):
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if len(split) == 0:
            raise ValueError(self._empty_split_error(split))
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.train = train
        self.augment = train if augment is None else augment
        self.shuffle = train
        self.seed = seed
        self.drop_last = train if drop_last is None else drop_last
        self.channels_last = channels_last
        self.dtype = dtype
        self.rank, self.world_size = rank, world_size
        self.flip = flip
        self.auto_epoch = auto_epoch
        self.epoch = 0
        self.mean = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        if self.drop_last and len(split) < batch_size:
            raise ValueError(f"drop_last with batch_size {batch_size} > {len(split)} images would yield no batches")

    def _empty_split_error(self, split: Sized) -> str:
        return "cannot batch an empty split"

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return self.iter_from(0)

    def iter_from(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        raise NotImplementedError

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """``uint8`` images ``B x C x H x W`` on the device as normalized ``float32``."""
        return x.to(torch.float32).div_(255.0).sub_(self.mean).div_(self.std)

    def finish(self, x: torch.Tensor) -> torch.Tensor:
        """A normalized batch in the yielded ``dtype`` and memory format."""
        x = x.to(self.dtype)
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

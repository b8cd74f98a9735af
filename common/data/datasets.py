"""The datasets by name: :func:`load_dataset`, the one entry point (which loader; streamed or in memory).

Datasets are held in memory as ``uint8`` tensors (:mod:`common.data.memory`; about 184 MB for all of
CIFAR-10), so batching, normalization and augmentation are whole-batch tensor ops on the target
device (:class:`common.data.loader.BatchLoader`) and no PIL work happens per training step; an
ImageFolder too large for that is streamed (:mod:`common.data.stream`). The containers are
:mod:`common.data.splits`.

Datasets (``load_dataset(name=...)``):

* ``"digits"``: scikit-learn's ``load_digits()`` (1,797 images of 8x8 pixels, values 0-16,
  10 classes) upsampled to 32x32 with bilinear interpolation, scaled to 0-255, replicated to 3 RGB
  channels, and split 60/20/20 into train/val/test (1,078/359/360) stratified by class with a
  fixed seed (``common.data.memory.DIGITS_SPLIT_SEED``). It ships with scikit-learn, so it needs no files or network:
  the default for tests and smoke runs.
* ``"cifar10-jpeg"``: the ImageFolder tree ``../shared/data/cifar10-jpeg/{train,val,test}/<class>/``.
* ``"imagefolder"``: any root with ``train/``, ``val/`` and ``test/`` ImageFolder subfolders whose
  images all have the same size. Mean/std are computed from its train split. When its decoded size
  (estimated from a few image headers) would exceed ``memory_limit_bytes`` (default: a quarter of the
  RAM), or with ``stream=True``, it is streamed instead: decoded on the fly by DataLoader workers with
  the ImageNet transforms, images of any size, mean/std from a seeded train sample
  (:mod:`common.data.stream`).
* ``"cifar10"``: torchvision's CIFAR-10 binaries under ``root``. A fixed 5,000-image validation split
  (500 per class, chosen with ``common.data.memory.CIFAR10_VAL_SEED``) is held out of the 50,000 training images, so
  train/val/test are 45,000/5,000/10,000 like cifar10-jpeg. Downloads only if ``download=True``.
* ``"auto"``: ``"cifar10-jpeg"`` when the shared data exists, else ``"digits"``.
"""

from __future__ import annotations

from pathlib import Path

from common.data import stream as st
from common.data.memory import CIFAR_MEAN, CIFAR_STD, load_cifar10, load_digits, load_imagefolder
from common.data.splits import DEFAULT_CROP_SIZE, DEFAULT_RESIZE_SIZE, SPLITS, DatasetSplits
from common.paths import CIFAR_JPEG_ROOT, default_cache_dir

DATASET_NAMES = ("auto", "digits", "cifar10-jpeg", "imagefolder", "cifar10")


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
        return load_digits()
    if name == "cifar10-jpeg":
        return load_imagefolder(
            Path(root) if root else CIFAR_JPEG_ROOT, "cifar10-jpeg", cache_dir, workers, CIFAR_MEAN, CIFAR_STD
        )
    if name == "imagefolder":
        if root is None:
            raise ValueError("load_dataset('imagefolder') needs root=<folder with train/ val/ test/>")
        return _load_imagefolder_auto(
            Path(root), cache_dir, workers, stream, memory_limit_bytes, crop_size, resize_size
        )
    if name == "cifar10":
        return load_cifar10(Path(root) if root else default_cache_dir() / "cifar10", download)
    raise ValueError(f"unknown dataset {name!r}; valid: {', '.join(DATASET_NAMES)}")


def check_layout(name: str, root: str | Path | None = None) -> None:
    """What :func:`load_dataset` ``(name, root)`` will read is there, checked without reading an image:
    an ImageFolder root (imagefolder, cifar10-jpeg) with its ``train/``, ``val/`` and ``test/`` folders,
    the CIFAR-10 binaries' folder (cifar10, unless downloaded); digits needs nothing.

    Raises:
        FileNotFoundError: naming the missing root or split folder(s) and the layout expected.
        ValueError: imagefolder without a root.
    """
    if name == "auto":
        name = "cifar10-jpeg" if (Path(root) if root else CIFAR_JPEG_ROOT).is_dir() else "digits"
    if name == "cifar10":
        folder = (Path(root) if root else default_cache_dir() / "cifar10") / "cifar-10-batches-py"
        if not folder.is_dir():
            raise FileNotFoundError(
                f"CIFAR-10 binaries not found: no folder {folder}; give the folder that holds "
                "torchvision's cifar-10-batches-py/ as the data root (--data-root DIR)"
            )
    if name not in ("imagefolder", "cifar10-jpeg"):
        return
    if root is None and name == "imagefolder":
        raise ValueError("dataset imagefolder needs a data root: --data-root DIR with DIR/{train,val,test}/<class>/")
    base = Path(root) if root else CIFAR_JPEG_ROOT
    if not base.is_dir():
        raise FileNotFoundError(f"dataset root not found: {base} (expected {base}/{{train,val,test}}/<class>/*.jpg)")
    missing = [s for s in SPLITS if not (base / s).is_dir()]
    if missing:
        raise FileNotFoundError(
            f"dataset {base} has no {', '.join(f'{s}/' for s in missing)} folder "
            f"({', '.join(str(base / s) for s in missing)} not found): an ImageFolder dataset needs "
            "train/, val/ and test/, each with one folder of images per class (val selects, test reports; "
            "for ImageNet make test/ the official validation set and carve val/ out of train)"
        )


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
    root = root.resolve()
    if not root.is_dir():
        raise FileNotFoundError(f"dataset root not found: {root}")
    listing = None
    if stream is None:
        # listing and a few image headers per split: nothing is decoded to decide
        listing = st.list_splits(root)
        stream, _ = st.should_stream(listing, memory_limit_bytes)
    if not stream:
        return load_imagefolder(root, "imagefolder", cache_dir, workers, None, None)
    return st.load_streamed_imagefolder(
        root,
        "imagefolder",
        listing,
        crop_size or DEFAULT_CROP_SIZE,
        resize_size or DEFAULT_RESIZE_SIZE,
        workers,
    )

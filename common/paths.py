"""Filesystem locations shared by the toolkit.

Everything is resolved relative to the repository root so that the code works from any working
directory and on any machine where ``shared/`` sits next to the repository checkout.
"""

from __future__ import annotations

import os
from pathlib import Path

REPO: Path = Path(__file__).resolve().parents[1]
SHARED: Path = REPO.parent / "shared"
CIFAR_JPEG_ROOT: Path = SHARED / "data" / "cifar10-jpeg"
CHECKPOINT_DIR: Path = SHARED / "checkpoints" / "cifar10-jpeg"


def default_cache_dir() -> Path:
    """Directory for derived, re-creatable files (decoded datasets, ...).

    Returns:
        ``$HTD_CACHE`` when set, else ``REPO/.cache`` (git-ignored).
    """
    env = os.environ.get("HTD_CACHE")
    return Path(env).expanduser().resolve() if env else REPO / ".cache"

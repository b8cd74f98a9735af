"""Peak memory and wall time of one evaluation over a streamed ImageFolder (not a test).

1. Generates (once; reused while its ``.complete`` marker matches the settings) an ImageFolder of
   ``--images`` JPEGs (default 20,000 of 64x64 px, quality 90, 10 classes of class-tinted noise):
   train and test 1,000 images each, val the rest, under ``--root`` (default
   ``$HTD_CACHE/bench-stream/imagefolder-<images>-<size>px``, i.e. ``.cache/bench-stream/...``).
2. In a fresh interpreter (so the figures cover nothing but this), loads it with the streaming path
   forced (``memory_limit_bytes=1``; crop ``--crop`` / resize ``--resize``, default 56 / 64, the
   ImageNet 224/256 ratio), and evaluates a small seeded CNN (3 stride-2 3x3 convs 3->32->64->128 with
   BN and ReLU, global average pool, linear; ~8 M MACs per 56x56 image) over all three splits, with
   ``--workers`` DataLoader workers.
3. Prints the machine, the wall times, and peak memory: ``ru_maxrss`` of the process and of its largest
   waited-for child (the DataLoader workers, after they exit), and the peak over 0.1 s samples of the
   summed RSS and PSS (proportional set size: shared pages split between the processes that map
   them, so the sum is what the tree really holds) of the process and its children.

Goal: peak memory under 2 GB whatever the dataset size (the decoded split is never held).

Usage (from the repository root)::

    PYTHONPATH=. python benchmarks/bench_stream_memory.py [--images 20000] [--root DIR] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import common  # noqa: F401  (first: importing it sets OMP_WAIT_POLICY before torch loads OpenMP)

# isort: split
import numpy as np
import torch
from torch import nn

from common.paths import default_cache_dir

CLASSES = 10
SIDE_SPLIT_IMAGES = 1000  # train and test each; val holds the rest
GENERATION_SEED = 0


# --------------------------------------------------------------------------------------------------
# the dataset
# --------------------------------------------------------------------------------------------------
def split_sizes(images: int) -> dict[str, int]:
    """Images per split: train and test ``SIDE_SPLIT_IMAGES`` each, val the rest."""
    if images < 3 * SIDE_SPLIT_IMAGES:
        raise ValueError(f"--images must be at least {3 * SIDE_SPLIT_IMAGES}, got {images}")
    return {"train": SIDE_SPLIT_IMAGES, "val": images - 2 * SIDE_SPLIT_IMAGES, "test": SIDE_SPLIT_IMAGES}


def _write_class(job: tuple[str, str, int, int, int]) -> int:
    """Write ``n`` JPEGs of class ``label`` to ``folder``: the class's tint (seeded by ``label``, the same in
    every split) plus noise seeded by (split, label)."""
    from PIL import Image

    folder, split, label, n, size = job
    tint = np.random.default_rng([GENERATION_SEED, label]).uniform(40, 200, 3)
    rng = np.random.default_rng([GENERATION_SEED, label, 1 + ["train", "val", "test"].index(split)])
    Path(folder).mkdir(parents=True, exist_ok=True)
    for i in range(n):
        # low-frequency noise upsampled: JPEG-compressible like photos, unlike per-pixel noise
        coarse = rng.normal(0, 50, (size // 8, size // 8, 3))
        img = np.clip(tint + np.kron(coarse, np.ones((8, 8, 1))), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(Path(folder) / f"{i:06d}.jpg", quality=90)
    return n


def ensure_dataset(root: Path, images: int, size: int, workers: int) -> float:
    """Generate the ImageFolder under ``root`` unless its marker says it is there; return seconds spent."""
    marker = root / ".complete"
    settings = {"images": images, "size": size, "classes": CLASSES, "seed": GENERATION_SEED, "format": 2}
    if marker.is_file() and json.loads(marker.read_text()) == settings:
        return 0.0
    if root.exists() and any(root.iterdir()):
        raise SystemExit(f"{root} exists without a matching {marker.name} marker: remove it or pass another --root")
    t0 = time.perf_counter()
    jobs = []
    for split, n in split_sizes(images).items():
        per = [n // CLASSES + (c < n % CLASSES) for c in range(CLASSES)]
        jobs += [(str(root / split / f"class{c:02d}"), split, c, per[c], size) for c in range(CLASSES)]
    with ProcessPoolExecutor(max_workers=workers) as ex:
        written = sum(ex.map(_write_class, jobs))
    assert written == images, (written, images)
    marker.write_text(json.dumps(settings))
    return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------------
# memory sampling
# --------------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    """Direct children of ``pid`` (DataLoader workers), from ``/proc/*/stat``."""
    out = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:  # exited meanwhile
            continue
        # the command name may hold spaces: fields after the closing parenthesis are fixed
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def _rss_pss_kb(pid: int) -> tuple[int, int]:
    try:
        fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:])
    except OSError:
        return 0, 0
    return int(fields["Rss"].split()[0]), int(fields["Pss"].split()[0])


class TreeMemory:
    """Samples the summed RSS and PSS of this process and its children every ``interval`` s in a thread."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.peak_rss_kb, self.peak_pss_kb, self.peak_procs = interval, 0, 0, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        me = os.getpid()
        while not self._stop.is_set():
            pids = [me, *_children(me)]
            rss, pss = (sum(v) for v in zip(*(_rss_pss_kb(p) for p in pids)))
            self.peak_rss_kb, self.peak_pss_kb = max(self.peak_rss_kb, rss), max(self.peak_pss_kb, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            self._stop.wait(self.interval)

    def __enter__(self) -> TreeMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


# --------------------------------------------------------------------------------------------------
# the measured run
# --------------------------------------------------------------------------------------------------
def small_cnn(num_classes: int, seed: int = 0) -> nn.Module:
    """3 stride-2 3x3 convs (3->32->64->128) with BN and ReLU, global average pool, linear (seeded init)."""
    torch.manual_seed(seed)
    layers: list[nn.Module] = []
    for cin, cout in ((3, 32), (32, 64), (64, 128)):
        layers += [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(128, num_classes)).eval()


def machine() -> str:
    from common.deploy.latency import cpu_name

    ram = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") / 2**30
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    return (
        f"{cpu_name()}, {os.cpu_count()} logical cores, {ram:.1f} GiB RAM; torch {torch.__version__}, "
        f"{torch.get_num_threads()} torch threads; load average (1/5/15 min) {load}"
    )


def measure(a: argparse.Namespace) -> None:
    """Load the dataset streamed and evaluate every split; print times and peak memory."""
    import gc

    from common.data.datasets import load_dataset
    from common.data.loader import make_loader
    from common.train.evaluate import evaluate

    print(f"machine: {machine()}")
    with TreeMemory() as mem:
        t0 = time.perf_counter()
        data = load_dataset(
            "imagefolder",
            root=a.root,
            memory_limit_bytes=1,  # force the streaming path
            crop_size=a.crop,
            resize_size=a.resize,
            workers=a.workers,
        )
        t_load = time.perf_counter() - t0
        assert data.streaming
        model = small_cnn(data.num_classes)
        t1 = time.perf_counter()
        results = {}
        for split in ("train", "val", "test"):
            loader = make_loader(data, split, a.batch_size)
            results[split] = evaluate(model, loader, "cpu")
            del loader  # its persistent workers exit here
            gc.collect()
        t_eval = time.perf_counter() - t1
    n = sum(int(r["n"]) for r in results.values())
    self_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    child_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    sizes = {s: len(data.split(s)) for s in ("train", "val", "test")}
    print(
        f"dataset: {a.root} {sizes} ({a.size}x{a.size} JPEG; decoded in memory it would be "
        f"{sum(sizes.values()) * a.size * a.size * 3 / 2**20:.0f} MiB), streamed at crop {a.crop} / resize {a.resize}"
    )
    print(f"load (listing + mean/std from {min(256, sizes['train'])} train images): {t_load:.1f} s")
    print(
        f"evaluation of {n} images ({a.workers} workers, batch {a.batch_size}): {t_eval:.1f} s "
        f"({n / t_eval:.0f} images/s); top-1 " + ", ".join(f"{s} {r['top1']:.3f}" for s, r in results.items())
    )
    print(f"peak RSS, ru_maxrss: this process {self_kb / 2**10:.0f} MiB, largest worker {child_kb / 2**10:.0f} MiB")
    print(
        f"peak over the process tree (0.1 s samples, up to {mem.peak_procs} processes): summed RSS "
        f"{mem.peak_rss_kb / 2**10:.0f} MiB (pages shared by the processes counted in each), summed PSS "
        f"{mem.peak_pss_kb / 2**10:.0f} MiB"
    )
    verdict = "under" if mem.peak_pss_kb < 2 * 2**20 else "OVER"
    print(f"goal: peak memory of the tree (PSS) {verdict} 2 GiB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--size", type=int, default=64, help="side of the generated JPEGs (px)")
    parser.add_argument("--root", type=Path, default=None, help="dataset folder (default: under $HTD_CACHE)")
    parser.add_argument("--crop", type=int, default=56)
    parser.add_argument("--resize", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers (and generation processes)")
    parser.add_argument("--batch-size", type=int, default=250)
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)  # the fresh interpreter
    a = parser.parse_args()
    if a.root is None:
        a.root = default_cache_dir() / "bench-stream" / f"imagefolder-{a.images}-{a.size}px"
    if a.measure:
        measure(a)
        return
    seconds = ensure_dataset(a.root, a.images, a.size, a.workers)
    print(f"dataset {a.root}: " + (f"generated in {seconds:.0f} s" if seconds else "reused (cached)"))
    sys.stdout.flush()
    subprocess.run([sys.executable, __file__, *sys.argv[1:], "--root", str(a.root), "--measure"], check=True)


if __name__ == "__main__":
    main()

"""Pack the shared CIFAR-10 data and baselines small enough to carry to a lent GPU machine, and back.

A device call carries at most 64 MiB with the working tree. The 60,000 JPEGs are 53 MB as one
``.npz`` of their bytes (``../shared/tools/imagefolder_pack.py``) and 18 MB after xz, since every
32x32 JPEG repeats the same headers and tables. The fp16 checkpoints barely compress as they are
(xz: 22.4 -> 20.0 MB for ResNet-18); split into their even and odd bytes (the low bytes of the fp16
weights are near-random, the high bytes hold sign and exponent) each half compresses on its own
terms, 6 % smaller again. Unpacking restores byte-identical files and checks each checkpoint's
sha256 against the shared manifest, so a run's logged checkpoint identity is the shared baseline's.

The pack also takes the committed GPU logs of its models (``--logs``, default ``results/gpu/logs``), so
that a device session continues the committed runs (a run resumes, and adding targets, methods or
seeds extends it), and ``pack`` prints what the call would carry: the working tree (tracked and
untracked-not-ignored files) plus the pack, against the 64 MiB limit, with the largest folders.

    python tools/carry.py pack .gpu-pack --models resnet18,vgg16     # here
    python3 tools/carry.py unpack .gpu-pack /tmp/cifar10-jpeg /tmp/ckpt   # there
"""

from __future__ import annotations

import argparse
import hashlib
import json
import lzma
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
LIMIT_BYTES = 64 * 2**20
"""What one device call carries at most: the working tree plus the carried paths."""
PACK_TOOL = "imagefolder_pack.py"


def split_bytes(raw: bytes) -> bytes:
    """``raw`` as two xz streams, of its even and of its odd bytes, behind a 16-byte header of lengths."""
    b = np.frombuffer(raw, dtype=np.uint8)
    even, odd = lzma.compress(b[0::2].tobytes(), preset=9), lzma.compress(b[1::2].tobytes(), preset=9)
    return np.array([len(raw), len(even)], dtype="<u8").tobytes() + even + odd


def join_bytes(packed: bytes) -> bytes:
    """The inverse of :func:`split_bytes`.

    Raises:
        ValueError: a truncated or foreign file (the restored length differs from the header's).
    """
    n, n_even = (int(x) for x in np.frombuffer(packed[:16], dtype="<u8"))
    even = np.frombuffer(lzma.decompress(packed[16 : 16 + n_even]), dtype=np.uint8)
    odd = np.frombuffer(lzma.decompress(packed[16 + n_even :]), dtype=np.uint8)
    if len(even) + len(odd) != n:
        raise ValueError(f"packed checkpoint restores {len(even) + len(odd)} bytes, its header says {n}")
    out = np.empty(n, dtype=np.uint8)
    out[0::2], out[1::2] = even, odd
    return out.tobytes()


def travelling_bytes(repo: Path = REPO) -> dict[str, int]:
    """Bytes of the working tree that travels with a device call, by top-level folder (``.`` for files
    at the root): tracked files that exist and untracked files git does not ignore."""
    names = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=repo,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    sizes: dict[str, int] = {}
    for name in (n.decode() for n in names if n):
        path = repo / name
        if path.is_file():
            top = name.split("/")[0] if "/" in name else "."
            sizes[top] = sizes.get(top, 0) + path.stat().st_size
    return sizes


def report_size(out: Path, repo: Path = REPO) -> int:
    """Print the pack's and the working tree's share of one call's limit; return their total."""
    tree = travelling_bytes(repo)
    packed = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    total = sum(tree.values()) + packed
    print(
        f"pack {packed / 2**20:.1f} MiB + working tree {sum(tree.values()) / 2**20:.1f} MiB = {total / 2**20:.1f} MiB "
        f"of the {LIMIT_BYTES / 2**20:.0f} MiB one call carries"
    )
    if total > LIMIT_BYTES:
        big = ", ".join(f"{k}/ {v / 2**20:.1f} MiB" for k, v in sorted(tree.items(), key=lambda kv: -kv[1])[:3])
        print(f"over the limit: move folders out of the checkout for the call (largest: {big}), or pack fewer models")
    return total


def pack(out: Path, models: list[str], data: Path, checkpoints: Path, tool: Path, logs: Path | None = None) -> None:
    out.mkdir(parents=True, exist_ok=True)
    npz = out / "all.npz"
    subprocess.run([sys.executable, str(tool), "pack", str(data), str(npz)], check=True)
    (out / "all.npz.xz").write_bytes(lzma.compress(npz.read_bytes(), preset=9))
    npz.unlink()
    (out / tool.name).write_bytes(tool.read_bytes())
    (out / "manifest.json").write_bytes((checkpoints / "manifest.json").read_bytes())
    for m in models:
        (out / f"{m}.pt.split.xz").write_bytes(split_bytes((checkpoints / f"{m}.pt").read_bytes()))
        if logs is not None and (logs / m).is_dir():
            shutil.copytree(logs / m, out / "logs" / m, dirs_exist_ok=True)
    for f in sorted(out.rglob("*")):
        if f.is_file():
            print(f"{f.stat().st_size / 2**20:7.1f} MiB  {f}")
    report_size(out)


def unpack(src: Path, data_dest: Path, ckpt_dest: Path) -> None:
    if not (data_dest / "test").is_dir():
        npz = data_dest.parent / "all.npz"
        npz.write_bytes(lzma.decompress((src / "all.npz.xz").read_bytes()))
        subprocess.run([sys.executable, str(src / PACK_TOOL), "unpack", str(npz), str(data_dest)], check=True)
        npz.unlink()
    ckpt_dest.mkdir(parents=True, exist_ok=True)
    manifest = json.loads((src / "manifest.json").read_text())["models"]
    for f in sorted(src.glob("*.pt.split.xz")):
        m = f.name.removesuffix(".pt.split.xz")
        raw = join_bytes(f.read_bytes())
        sha = hashlib.sha256(raw).hexdigest()
        if sha != manifest[m]["sha256"]:
            raise SystemExit(f"{f}: restored checkpoint sha256 {sha} is not the manifest's {manifest[m]['sha256']}")
        (ckpt_dest / f"{m}.pt").write_bytes(raw)
        print(f"{m}.pt restored, sha256 matches the manifest")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("pack")
    a.add_argument("out", type=Path)
    a.add_argument("--models", default="resnet18,vgg16,alexnet")
    a.add_argument("--data", type=Path, default=SHARED / "data" / "cifar10-jpeg")
    a.add_argument("--checkpoints", type=Path, default=SHARED / "checkpoints" / "cifar10-jpeg")
    a.add_argument("--tool", type=Path, default=SHARED / "tools" / PACK_TOOL)
    a.add_argument("--logs", type=Path, default=REPO / "results" / "gpu" / "logs", help="<model>/ run logs to continue")
    b = sub.add_parser("unpack")
    b.add_argument("src", type=Path)
    b.add_argument("data_dest", type=Path)
    b.add_argument("ckpt_dest", type=Path)
    args = p.parse_args(argv)
    if args.cmd == "pack":
        pack(args.out, [m for m in args.models.split(",") if m], args.data, args.checkpoints, args.tool, args.logs)
    else:
        unpack(args.src, args.data_dest, args.ckpt_dest)


if __name__ == "__main__":
    main()

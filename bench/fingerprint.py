"""What digesting whole checkpoints costs at engine start, beside reading the same bytes.

A 1 GiB weight file (override with --gib) is digested three ways, each beside a plain read of
the file in the same run: cold (out of the page cache where this machine lets us drop it),
warm (in the page cache, no digest cached), and cached (a restart: the digest cache answers).
The old sampled digest (header + 16 x 64 KiB) is shown for scale; it missed most fine-tunes.

    python bench/fingerprint.py [--gib 1] [--repeat 3]
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import median, table  # noqa: E402

import xxhash  # noqa: E402

from kvstore.fingerprint import _READ_BLOCK, checkpoint_digest  # noqa: E402


def plain_read(path: Path) -> None:
    buf = bytearray(_READ_BLOCK)
    with open(path, "rb", buffering=0) as fh:
        while fh.readinto(buf):
            pass


def sampled_digest(path: Path) -> str:
    """The digest kvstore used before: the first 8 bytes' worth of header, 16 x 64 KiB samples."""
    h = xxhash.xxh3_128()
    size = path.stat().st_size
    with open(path, "rb") as fh:
        for i in range(16):
            fh.seek(size * i // 16)
            h.update(fh.read(65536))
    return h.hexdigest()


def drop_cache(path: Path) -> bool:
    """Evict the file from the page cache (fadvise works unprivileged for our own files)."""
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
        return True
    except (AttributeError, OSError):
        return False


def seconds(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="size of the weight file (GiB)")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="kvstore-bench-fp-"))
    try:
        model = work / "model"
        model.mkdir()
        weights = model / "model.safetensors"
        size = int(args.gib * (1 << 30))
        with open(weights, "wb") as fh:
            block = os.urandom(_READ_BLOCK)
            for off in range(0, size, len(block)):
                fh.write(block[: min(len(block), size - off)])
        rows = [["case", "read (s)", "digest (s)", "digest / read", "GB/s"]]
        results: dict[str, tuple[list[float], list[float]]] = {"cold": ([], []), "warm": ([], []),
                                                                "cached (restart)": ([], [])}
        cold_ok = True
        for i in range(args.repeat):
            cache = work / f"digests-{i}"
            cold_ok &= drop_cache(weights)
            results["cold"][0].append(seconds(lambda: plain_read(weights)))
            cold_ok &= drop_cache(weights)
            results["cold"][1].append(seconds(lambda: checkpoint_digest(model, cache_dir=cache / "a")))
            results["warm"][0].append(seconds(lambda: plain_read(weights)))
            results["warm"][1].append(seconds(lambda: checkpoint_digest(model, cache_dir=cache / "b")))
            results["cached (restart)"][0].append(seconds(lambda: plain_read(weights)))
            results["cached (restart)"][1].append(seconds(lambda: checkpoint_digest(model, cache_dir=cache / "b")))
        for name, (reads, digests) in results.items():
            r, d = median(reads), median(digests)
            rows.append([name, f"{r:.3f}", f"{d:.4f}", f"{d / r:.2f}x", f"{size / d / 1e9:.2f}"])
        sampled = median([seconds(lambda: sampled_digest(weights)) for _ in range(args.repeat)])
        rows.append(["old sampled digest (warm)", "", f"{sampled:.4f}", f"{sampled / median(results['warm'][0]):.3f}x", ""])
        print(f"whole-checkpoint digest of a {args.gib:g} GiB file, median of {args.repeat}"
              + ("" if cold_ok else " (page cache could not be dropped: 'cold' is warm)"))
        print(table(rows))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()

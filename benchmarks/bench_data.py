"""Task-sampling throughput: tasks per second (median of repeats).

Cases: Omniglot 5-way 1-shot, 15 queries, meta-batch 32; miniImageNet 5-way 5-shot,
15 queries, meta-batch 4 -- both sampled from the decoded (memory-mapped) cache
through MetaBatchLoader, with 0 and 2 background workers, tensors included.

Usage:
    python benchmarks/bench_data.py                       # synthetic arrays
    python benchmarks/bench_data.py --omniglot-root /data/omniglot \
        --mini-root /data/miniimagenet --cache-dir /tmp/fsl-cache
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from paddlefsl.data import ClassDataset, MetaBatchLoader, TaskSampler  # noqa: E402


def synthetic(directory: Path, name: str, shape: tuple[int, ...], classes: int) -> ClassDataset:
    """A memory-mapped uint8 array of the real dataset's shape, like a built cache."""
    images = np.lib.format.open_memmap(directory / f"{name}.npy", "w+", np.uint8, shape)
    rows = np.arange(shape[0], dtype=np.uint8).reshape(-1, *([1] * (len(shape) - 1)))
    images[:] = rows  # cheap, non-constant content
    images.flush()
    images = np.load(directory / f"{name}.npy", mmap_mode="r")
    return ClassDataset(images, np.repeat(np.arange(classes), shape[0] // classes))


def tasks_per_second(
    sampler: TaskSampler, batch: int, batches: int, workers: int, repeats: int
) -> tuple[float, list[float]]:
    rates = []
    for r in range(repeats + 1):
        # Fresh batches each repeat (different task indices), so no result is reused.
        loader = MetaBatchLoader(
            sampler, batch, num_batches=batches, start=r * batches, num_workers=workers
        )
        start = time.perf_counter()
        for b in loader:
            _ = b.query_x.shape
        elapsed = time.perf_counter() - start
        if r:  # the first pass warms the page cache and thread start-up
            rates.append(batch * batches / elapsed)
    return statistics.median(rates), rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--omniglot-root", help="folder with the Omniglot archives")
    parser.add_argument("--mini-root", help="miniImageNet folder (any supported layout)")
    parser.add_argument("--cache-dir", help="cache folder for read-only data roots")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batches", type=int, default=10, help="meta-batches per repeat")
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        if args.omniglot_root:
            from paddlefsl.data import Omniglot

            omniglot = Omniglot(args.omniglot_root, "train", cache_dir=args.cache_dir)
            omni_source = f"Omniglot {args.omniglot_root}"
        else:
            omniglot = synthetic(Path(tmp), "omniglot", (4112 * 20, 28, 28), 4112)
            omni_source = "synthetic [82240, 28, 28] uint8 memmap"
        if args.mini_root:
            from paddlefsl.data import MiniImageNet

            mini = MiniImageNet(args.mini_root, "train", cache_dir=args.cache_dir)
            mini_source = f"miniImageNet {args.mini_root}"
        else:
            mini = synthetic(Path(tmp), "mini", (64 * 600, 84, 84, 3), 64)
            mini_source = "synthetic [38400, 84, 84, 3] uint8 memmap"

        cases = [
            ("omniglot 5w1s15q", omni_source, TaskSampler(omniglot, 5, 1, 15), 32),
            ("miniimagenet 5w5s15q", mini_source, TaskSampler(mini, 5, 5, 15), 4),
        ]
        for name, source, sampler, batch in cases:
            print(f"{name}, meta-batch {batch}, from {source}")
            for workers in args.workers:
                median, rates = tasks_per_second(
                    sampler, batch, args.batches, workers, args.repeats
                )
                spread = f"{min(rates):.0f}-{max(rates):.0f}"
                print(
                    f"  workers={workers}: {median:8.0f} tasks/s "
                    f"(median of {args.repeats}, range {spread})"
                )


if __name__ == "__main__":
    main()

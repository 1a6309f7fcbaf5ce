"""BatchNorm + ReLU as two ops against the fused op, forward + backward, on Conv4 shapes.

The two ops are what an unmodified ``BatchNorm2D`` + ``ReLU`` runs with ``paddlefsl.ops``
installed (the CPU-kernel BatchNorm, and ReLU on the kernel or natively by size, as the
learners run them); the fused op is :func:`paddlefsl.ops.batch_norm_relu`, which
``paddlefsl.models.Conv4`` uses through ``BatchNormReLU2D``. Both on the same inputs,
alternating, median of ``--repeats`` calls; the last row sums the shapes of one W1s task
(support and query sets through the four blocks), times the meta-batch of 32.

    python benchmarks/bench_batch_norm_relu.py
    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_batch_norm_relu.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import paddle
import paddle.nn.functional as F

from paddlefsl import ops
from paddlefsl.ops import batch_norm_relu, cpu_kernels, onednn
from paddlefsl.runtime import tune_allocator

# W1s (MAML's strided Omniglot Conv4, 64 channels): the four blocks' outputs for a task's
# 5 support and 75 query images.
W1S_SPATIAL = [14, 7, 4, 2]
W1S_SHAPES = [[n, 64, s, s] for n in (5, 75) for s in W1S_SPATIAL]
W1S_META_BATCH = 32


def _inputs(shape: list[int]):
    x = paddle.randn(shape)
    w, b = paddle.rand([shape[1]]) + 0.5, paddle.randn([shape[1]])
    for t in (x, w, b):
        t.stop_gradient = False
    stats = [paddle.zeros([shape[1]]), paddle.ones([shape[1]])]
    return x, w, b, stats, paddle.randn(shape)


def two_ops(x, w, b, stats, dz) -> None:
    y = F.relu(F.batch_norm(x, *stats, w, b, training=True))
    paddle.grad([y], [x, w, b], [dz])


def fused(x, w, b, stats, dz) -> None:
    y = batch_norm_relu(x, *stats, w, b, training=True)
    paddle.grad([y], [x, w, b], [dz])


def median_us(calls: list[Callable[[], None]], repeats: int) -> list[float]:
    """Median microseconds of each call, alternating the calls on every repeat."""
    for call in calls:
        call()
    times: list[list[float]] = [[] for _ in calls]
    for _ in range(repeats):
        for i, call in enumerate(calls):
            start = time.perf_counter()
            call()
            times[i].append((time.perf_counter() - start) * 1e6)
    return [statistics.median(t) for t in times]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=None, help="kernel threads")
    args = parser.parse_args()
    if not cpu_kernels.usable(paddle.zeros([1])):
        raise SystemExit(f"CPU kernels unavailable: {onednn.unavailable_reason()}")
    tune_allocator()
    ops.install()
    if args.threads:
        onednn.set_threads(args.threads)
    print(f"kernel threads {onednn.get_threads()}, median of {args.repeats} calls (µs)")
    print(f"{'shape':>20} {'two ops':>10} {'fused':>10} {'saved':>8}")
    total_two = total_fused = 0.0
    for shape in W1S_SHAPES:
        inputs = _inputs(shape)
        t_two, t_fused = median_us(
            [lambda a=inputs: two_ops(*a), lambda a=inputs: fused(*a)], args.repeats
        )
        total_two, total_fused = total_two + t_two, total_fused + t_fused
        saved = 1 - t_fused / t_two
        print(f"{str(shape):>20} {t_two:10.1f} {t_fused:10.1f} {saved:8.0%}")
    scale = W1S_META_BATCH / 1000  # µs per task -> ms per meta-iteration
    print(
        f"W1s meta-iteration (32 tasks, forward + backward): two ops "
        f"{total_two * scale:.1f} ms, fused {total_fused * scale:.1f} ms, "
        f"saved {(total_two - total_fused) * scale:.1f} ms"
    )


if __name__ == "__main__":
    main()

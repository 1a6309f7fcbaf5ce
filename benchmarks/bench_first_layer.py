"""Milliseconds per forward of the Conv4 first layers on paddlefsl's oneDNN ops.

The first layer of an image network has few input channels (1 for Omniglot, 3 for
miniImageNet): paddlefsl computes its forward (and its filter gradient) as unfolded sgemm
products written straight into Paddle's NCHW layout, where oneDNN's convolution would write
a blocked output to be reordered. Run it at two commits to compare (the ops are built per
source, so ``PYTHONPATH=<other checkout>`` measures the other one):

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/bench_first_layer.py --threads 1
"""

from __future__ import annotations

import argparse
import statistics
import time

import paddle

from paddlefsl.ops import onednn
from paddlefsl.runtime import tune_allocator

# (input shape, output channels, stride): a task's query and support sets.
SHAPES = [
    ([75, 1, 28, 28], 64, 2),  # Omniglot, MAML's strided Conv4
    ([5, 1, 28, 28], 64, 2),
    ([75, 3, 84, 84], 32, 1),  # miniImageNet
    ([5, 3, 84, 84], 32, 1),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=40)
    parser.add_argument("--threads", type=int, default=None, help="kernel threads")
    args = parser.parse_args()
    if not onednn.available():
        raise SystemExit(f"oneDNN ops unavailable: {onednn.unavailable_reason()}")
    tune_allocator()
    threads = args.threads or onednn.get_threads()
    print(f"forward with bias, {threads} thread(s), median of {args.repeats} calls")
    for shape, out_channels, stride in SHAPES:
        x = paddle.randn(shape)
        w, b = paddle.randn([out_channels, shape[1], 3, 3]), paddle.randn([out_channels])
        onednn.conv2d_forward_bias(x, w, b, stride, 1, threads=threads)  # warm-up
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            onednn.conv2d_forward_bias(x, w, b, stride, 1, threads=threads)
            times.append(time.perf_counter() - start)
        print(
            f"{str(shape):>18} -> {out_channels:3d}, stride {stride}: "
            f"{statistics.median(times) * 1e3:8.3f} ms"
        )


if __name__ == "__main__":
    main()

"""Milliseconds per call of the memory-bound layers: Paddle's kernels vs paddlefsl's CPU kernels.

Per-channel bias add and its gradient (a per-channel sum), ReLU and its gradient,
train-mode BatchNorm, and 2x2 max pooling, on float32 NCHW activations of paddlefsl's
workloads:

* ``[300, 64, 28, 28]``: four query batches (75 images) of the Omniglot Conv4's first layer;
* ``[75, 64, 14, 14]``: one task's query batch after the first strided layer (W1s);
* ``[5, 64, 14, 14]``: one task's support set (W1s), where call overhead dominates.

``paddle`` is the native op; for the "fwd+bwd" rows, the forward and ``paddle.grad``
through it. ``ours 1t`` / ``2t`` are :mod:`paddlefsl.ops.cpu_kernels` on 1 and 2 threads
(the forward kernel, then the backward kernel). Each entry is the median of ``--repeats``
calls after a warm-up, with ``paddlefsl.runtime.tune_allocator()`` as the CLI uses. Only
meaningful on an idle machine.

    python benchmarks/bench_layers.py
    python benchmarks/bench_layers.py --quick    # one repeat: does it run?
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import paddle
import paddle.nn.functional as F

from paddlefsl.ops import cpu_kernels, onednn
from paddlefsl.runtime import tune_allocator

SHAPES = [[300, 64, 28, 28], [75, 64, 14, 14], [5, 64, 14, 14]]


def median_ms(fn: Callable[[], object], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def cases(shape: list[int]) -> list[tuple[str, Callable, Callable]]:
    """(name, Paddle's version, ours) for one activation shape."""
    c = shape[1]
    x, dy, b = paddle.randn(shape), paddle.randn(shape), paddle.randn([c])
    w = paddle.rand([c]) + 0.5
    y = F.relu(x)
    running = [paddle.zeros([c]), paddle.ones([c])]
    xg, wg, bg = x.clone(), w.clone(), b.clone()
    for t in (xg, wg, bg):
        t.stop_gradient = False

    def paddle_bn_backward():
        out = F.batch_norm(xg, *running, wg, bg, training=True)
        return paddle.grad([out], [xg, wg, bg], [dy])

    _, mean, inv_std = cpu_kernels.batch_norm_train(x, w, b, *running, 0.9, 1e-5)
    pooled, index = cpu_kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0])
    dpool = paddle.randn(pooled.shape)

    def paddle_pool_backward():
        out = F.max_pool2d(xg, 2, 2)
        return paddle.grad([out], [xg], [dpool])

    axes = [0, 2, 3]
    return [
        (
            "bias add",
            lambda: x + b.reshape([1, c, 1, 1]),
            lambda: cpu_kernels.channel_bias_add(x, b),
        ),
        ("bias gradient", lambda: dy.sum(axes), lambda: cpu_kernels.channel_sum(dy)),
        ("relu", lambda: F.relu(x), lambda: cpu_kernels.relu(x)),
        (
            "relu gradient",
            lambda: paddle._C_ops.relu_grad(y, dy),
            lambda: cpu_kernels.relu_backward(y, dy),
        ),
        (
            "batch norm",
            lambda: F.batch_norm(x, *running, w, b, training=True),
            lambda: cpu_kernels.batch_norm_train(x, w, b, *running, 0.9, 1e-5),
        ),
        (
            "batch norm fwd+bwd",
            paddle_bn_backward,
            lambda: (
                cpu_kernels.batch_norm_train(x, w, b, *running, 0.9, 1e-5),
                cpu_kernels.batch_norm_backward(x, dy, w, mean, inv_std),
            ),
        ),
        (
            "max pool",
            lambda: F.max_pool2d(x, 2, 2),
            lambda: cpu_kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0]),
        ),
        (
            "max pool fwd+bwd",
            paddle_pool_backward,
            lambda: (
                cpu_kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0]),
                cpu_kernels.max_pool2d_backward(index, dpool, shape[2:]),
            ),
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--quick", action="store_true", help="one repeat per entry")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per entry")
    args = parser.parse_args()
    repeats = 1 if args.quick else args.repeats
    if not cpu_kernels.usable(paddle.zeros([1])):
        raise SystemExit(f"CPU kernels unavailable: {onednn.unavailable_reason()}")
    tune_allocator()
    previous = onednn.get_threads()
    print(
        f"{'layer':<20}{'shape':<20}{'paddle ms':>11}{'ours 1t':>10}{'ours 2t':>10}"
        f"{'speed-up 2t':>13}"
    )
    for shape in SHAPES:
        for name, theirs, ours in cases(shape):
            native = median_ms(theirs, repeats)
            timed = {}
            for threads in (1, 2):
                onednn.set_threads(threads)
                timed[threads] = median_ms(ours, repeats)
            onednn.set_threads(previous)
            print(
                f"{name:<20}{str(shape):<20}{native:>11.3f}{timed[1]:>10.3f}{timed[2]:>10.3f}"
                f"{native / timed[2]:>12.1f}x"
            )
            if args.json:
                row = {"layer": name, "shape": shape, "paddle_ms": native}
                row.update({"ours_1t_ms": timed[1], "ours_2t_ms": timed[2]})
                print(json.dumps(row))


if __name__ == "__main__":
    main()

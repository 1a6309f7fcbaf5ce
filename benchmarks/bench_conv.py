"""Forward + backward GFLOP/s of 3x3 convolutions: Paddle's conv2d vs paddlefsl's oneDNN ops.

Shapes are the convolutions of paddlefsl's Conv4 workloads (float32, NCHW, padding 1):

* ``[640, 64, 14, 14] -> 64, s1``: Omniglot Conv4 (max-pool), inner layers, meta-batch 32;
* ``[5, 64, 14, 14] -> 64, s2`` / ``[25, 64, 14, 14] -> 64, s2``: strided Omniglot Conv4,
  one task's support / query set;
* ``[80, 3, 84, 84] -> 32, s1``: miniImageNet first layer (3 input channels);
* ``[80, 32, 42, 42] -> 32, s1``: miniImageNet second layer.

``native`` is ``paddle.nn.functional.conv2d`` forward plus ``paddle.grad`` for the input
and the weights (Paddle's default of one thread); ``onednn 1t`` / ``2t`` are the three raw
ops of :mod:`paddlefsl.ops.onednn` (forward, backward data, backward weights) on 1 and 2
threads. Each figure is ``3 x forward FLOPs / seconds``, the median of ``--repeats`` timed
runs of about ``--target`` seconds each. Numbers are only meaningful on an idle machine.

    python benchmarks/bench_conv.py                  # the table
    python benchmarks/bench_conv.py --quick          # a few ms per entry: does it run?
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable

import paddle
import paddle.nn.functional as F

from paddlefsl.ops import onednn

# (input NCHW, output channels, stride); kernel 3x3, padding 1.
CASES = [
    ([640, 64, 14, 14], 64, 1),
    ([5, 64, 14, 14], 64, 2),
    ([25, 64, 14, 14], 64, 2),
    ([80, 3, 84, 84], 32, 1),
    ([80, 32, 42, 42], 32, 1),
]
K, PAD = 3, 1


def seconds_per_call(fn: Callable[[], object], target: float, repeats: int) -> float:
    """Median over ``repeats`` of the mean time of ``fn`` in a run of about ``target`` s."""
    fn()
    fn()  # warm-up: primitive creation, allocator
    start = time.perf_counter()
    fn()
    calls = max(1, int(target / max(time.perf_counter() - start, 1e-7)))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        times.append((time.perf_counter() - start) / calls)
    return statistics.median(times)


def bench_case(shape, out_channels, stride, target, repeats) -> dict:
    n, c, h, w = shape
    oh = (h + 2 * PAD - K) // stride + 1
    ow = (w + 2 * PAD - K) // stride + 1
    flops = 2 * n * out_channels * oh * ow * c * K * K  # forward; backward is twice that
    x = paddle.randn(shape)
    weight = paddle.randn([out_channels, c, K, K]) * 0.1
    dy = paddle.randn([n, out_channels, oh, ow])
    xg, wg = x.detach(), weight.detach()
    xg.stop_gradient = wg.stop_gradient = False

    def native():
        y = F.conv2d(xg, wg, stride=stride, padding=PAD)
        paddle.grad([y], [xg, wg], [dy])

    def ours(threads):
        def run():
            onednn.conv2d_forward(x, weight, stride, PAD, threads)
            onednn.conv2d_backward_data(dy, weight, stride, PAD, [h, w], threads)
            onednn.conv2d_backward_weight(x, dy, stride, PAD, [K, K], threads)

        return run

    row = {"case": f"{shape} -> {out_channels}, s{stride}"}
    row["native"] = 3 * flops / seconds_per_call(native, target, repeats) / 1e9
    if onednn.available():
        for threads in (1, 2):
            seconds = seconds_per_call(ours(threads), target, repeats)
            row[f"onednn {threads}t"] = 3 * flops / seconds / 1e9
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per entry (median)")
    parser.add_argument("--target", type=float, default=0.25, help="seconds per timed run")
    parser.add_argument("--quick", action="store_true", help="1 short run per entry")
    parser.add_argument("--json", action="store_true", help="also print one JSON line per case")
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.target = 1, 0.001

    if not onednn.available():
        print(f"oneDNN ops unavailable: {onednn.unavailable_reason()}", file=sys.stderr)
    onednn.set_threads(2)  # sets the short OpenMP blocktime before any 2-thread call
    onednn.set_threads(1)

    columns = ["native", "onednn 1t", "onednn 2t"]
    rows = []
    for shape, out_channels, stride in CASES:
        row = bench_case(shape, out_channels, stride, args.target, args.repeats)
        rows.append(row)
        if args.json:
            print(json.dumps(row))

    width = max(len(r["case"]) for r in rows)
    header = f"{'forward + backward, GFLOP/s':<{width}}" + "".join(f"{c:>11}" for c in columns)
    print(header + f"{'x 1t':>7}{'x 2t':>7}")
    for row in rows:
        cells = "".join(f"{row[c]:>11.1f}" if c in row else f"{'-':>11}" for c in columns)
        ratios = "".join(
            f"{row[c] / row['native']:>7.2f}" if c in row else f"{'-':>7}" for c in columns[1:]
        )
        print(f"{row['case']:<{width}}" + cells + ratios)


if __name__ == "__main__":
    main()

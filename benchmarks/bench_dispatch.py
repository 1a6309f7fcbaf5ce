"""Per-op dispatch cost of Paddle's dygraph against ``paddle.jit.to_static``.

A chain of ``L`` tiny layers (matmul, add, ReLU, scale on an [4, 8] x [8, 8] product: four
ops each, then a sum) is run forward and backward, so that kernels cost next to nothing
and the time is the framework's own per-op work. Fitting ``time = fixed + per_op * ops``
over two chain lengths separates a static call's fixed cost from its per-op cost:

    python benchmarks/bench_dispatch.py                # L = 10 and 50
    python benchmarks/bench_dispatch.py --layers 10 50 100 --repeat 7

Prints microseconds per call (median of ``--repeat`` timed rounds of ``--calls`` calls)
for both modes, then the fitted fixed and per-op costs. Pin it to one idle core
(``taskset -c 0``) for stable numbers.
"""

from __future__ import annotations

import argparse
import statistics
import time

import paddle
import paddle.nn.functional as F


def chain(x: paddle.Tensor, weights: list[paddle.Tensor]) -> paddle.Tensor:
    """Four ops per layer, one sum: forward ops = 4 * len(weights) + 1."""
    h = x
    for w in weights:
        h = F.relu(paddle.matmul(h, w) + 0.1) * 0.5
    return h.sum()


def time_per_call(fn, x, weights, calls: int, repeat: int) -> float:
    """Median microseconds of one forward + backward call."""
    for _ in range(max(5, calls // 10)):  # warm-up; to_static traces on the first call
        fn(x, weights).backward()
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            fn(x, weights).backward()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, nargs="+", default=[10, 50])
    parser.add_argument("--calls", type=int, default=200, help="calls per timed round")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (median)")
    args = parser.parse_args()
    if len(args.layers) < 2 or min(args.layers) < 1 or args.calls < 1 or args.repeat < 1:
        parser.error("give at least two --layers >= 1, and --calls, --repeat >= 1")
    paddle.seed(0)
    x = paddle.randn([4, 8])
    static = paddle.jit.to_static(chain, full_graph=True)
    rows = {"dygraph": [], "to_static": []}
    print("layers  ops   dygraph us/call   to_static us/call")
    for layers in args.layers:
        weights = [paddle.randn([8, 8]) for _ in range(layers)]
        for w in weights:
            w.stop_gradient = False
        ops = 4 * layers + 1
        dyn = time_per_call(chain, x, weights, args.calls, args.repeat)
        sta = time_per_call(static, x, weights, args.calls, args.repeat)
        rows["dygraph"].append((ops, dyn))
        rows["to_static"].append((ops, sta))
        print(f"{layers:6d} {ops:4d} {dyn:17.0f} {sta:19.0f}")
    for mode, points in rows.items():
        (n0, t0), (n1, t1) = points[0], points[-1]
        per_op = (t1 - t0) / (n1 - n0)
        print(
            f"{mode}: {per_op:.1f} us per op (forward + backward), "
            f"{t0 - per_op * n0:.0f} us fixed per call"
        )


if __name__ == "__main__":
    main()

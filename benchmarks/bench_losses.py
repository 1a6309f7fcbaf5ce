"""What the double-differentiable losses cost next to Paddle's kernels.

``paddlefsl.ops`` rebuilds ``BCEWithLogitsLoss``, ``BCELoss``, ``NLLLoss``,
``SmoothL1Loss`` and ``KLDivLoss`` from double-differentiable ops while a second-order
clone is alive, because the loss a user computes from a clone's output may be
differentiated twice; otherwise the native kernels run. This script times one forward +
backward of each loss both ways on a few-shot-sized batch and a large one:

    OMP_NUM_THREADS=1 taskset -c 0 python benchmarks/bench_losses.py
    python benchmarks/bench_losses.py --shapes 75x5 --repeat 3   # quick

Prints microseconds per call (median of ``--repeat`` rounds) and the ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import paddle
import paddle.nn.functional as F

from paddlefsl import ops
from paddlefsl.metaopt import MAML

LOSSES: dict[str, Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor]] = {
    "bce_with_logits": lambda x, t: F.binary_cross_entropy_with_logits(x, t),
    "bce": lambda x, t: F.binary_cross_entropy(F.sigmoid(x), t),
    "nll": lambda x, t: F.nll_loss(F.log_softmax(x), t.argmax(1)),
    "smooth_l1": lambda x, t: F.smooth_l1_loss(x, t),
    "kl_div": lambda x, t: F.kl_div(F.log_softmax(x), F.softmax(t), reduction="batchmean"),
}


def time_call(step: Callable[[], None], calls: int, repeat: int) -> float:
    """Median microseconds per call over ``repeat`` rounds of ``calls`` calls."""
    for _ in range(max(calls // 10, 1)):
        step()
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        for _ in range(calls):
            step()
        rounds.append((time.perf_counter() - start) / calls * 1e6)
    return statistics.median(rounds)


def measure(name: str, shape: list[int], repeat: int) -> tuple[float, float]:
    """(native, rebuilt) microseconds per forward + backward of loss ``name``."""
    x = paddle.randn(shape)
    x.stop_gradient = False
    target = (paddle.rand(shape) > 0.5).astype("float32")
    loss = LOSSES[name]

    def step() -> None:
        loss(x, target).backward()
        x.clear_grad()

    calls = 200 if x.size < 100_000 else 10
    assert not ops.second_order_clone_alive()
    native = time_call(step, calls, repeat)
    clone = MAML(paddle.nn.Linear(1, 1), lr=0.1).clone()  # a live second-order clone
    assert ops.second_order_clone_alive()
    rebuilt = time_call(step, calls, repeat)
    del clone
    return native, rebuilt


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["75x5", "8x1x256x256"])
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    ops.install()
    print(f"{'loss':16s} {'shape':14s} {'native us':>10s} {'rebuilt us':>11s} {'ratio':>6s}")
    for text in args.shapes:
        shape = [int(d) for d in text.split("x")]
        for name in args.losses:
            native, rebuilt = measure(name, shape, args.repeat)
            print(f"{name:16s} {text:14s} {native:10.0f} {rebuilt:11.0f} {rebuilt / native:6.2f}")


if __name__ == "__main__":
    main()

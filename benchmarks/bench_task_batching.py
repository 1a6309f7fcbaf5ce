"""Does running the tasks of a meta-batch as one batch pay on a CPU?

The speed issue asks to batch the tasks of a meta-batch only where a measurement shows it
pays. This times the part every learner shares, the backbone's forward + backward over
the query sets of one meta-batch (Conv4 ``features`` of a workload of
``bench_learners.py``, paddlefsl's kernels installed as the learners install them), three
ways:

* ``per task``: one call per task on its [N, C, H, W] queries (what the learners do);
* ``batched, shared statistics``: one call on all [T * N, C, H, W] queries with the
  model's own BatchNorm, whose statistics then mix the tasks. Wrong for MAML (each task
  normalises with its own statistics) but the cheapest a batched pass can be;
* ``batched, per-task statistics``: the same with BatchNorm statistics per task, by
  folding the tasks into the channels ([N, T * C, H, W]) around each normalisation.

Only the backbone with shared weights is timed, the best case for batching: MAML's
adapted weights differ per task and would need grouped convolutions on top.

    python benchmarks/bench_task_batching.py                   # W1s, 5 timed rounds
    taskset -c 1 python benchmarks/bench_task_batching.py --workload W2 --repeat 7

Prints the median seconds per meta-batch of each way and its ratio to ``per task``
(below 1: batching is faster).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import paddle
import paddle.nn.functional as F

from paddlefsl import ops
from paddlefsl.models import BatchNormReLU2D, Conv4
from paddlefsl.ops import onednn
from paddlefsl.runtime import tune_allocator

# The workloads of bench_learners.py (kept in step by tests/test_benchmarks.py).
WORKLOADS = {
    "W1": dict(channels=1, size=28, hidden=64, pooling="max", meta_batch=32),
    "W1s": dict(channels=1, size=28, hidden=64, pooling="stride", meta_batch=32),
    "W2": dict(channels=3, size=84, hidden=32, pooling="max", meta_batch=4),
}
WAYS, QUERIES = 5, 15


def per_task_norm(x: paddle.Tensor, norm: paddle.nn.BatchNorm2D, tasks: int) -> paddle.Tensor:
    """BatchNorm (training statistics) of each task's own slice of a task-major batch."""
    total, channels, height, width = x.shape
    n = total // tasks
    folded = x.reshape([tasks, n, channels, height, width]).transpose([1, 0, 2, 3, 4])
    folded = folded.reshape([n, tasks * channels, height, width])
    out = F.batch_norm(
        folded,
        paddle.zeros([tasks * channels]),
        paddle.ones([tasks * channels]),
        weight=norm.weight.tile([tasks]),
        bias=norm.bias.tile([tasks]),
        training=True,
        epsilon=norm._epsilon,
    )
    out = out.reshape([n, tasks, channels, height, width]).transpose([1, 0, 2, 3, 4])
    return out.reshape([total, channels, height, width])


def features_per_task_statistics(model: Conv4, x: paddle.Tensor, tasks: int) -> paddle.Tensor:
    """``model.features`` with every BatchNorm normalising each task on its own."""
    h = x
    for layer in model.features:
        for sub in layer.children() if isinstance(layer, paddle.nn.Sequential) else [layer]:
            if isinstance(sub, BatchNormReLU2D):  # Conv4's BatchNorm + ReLU
                h = F.relu(per_task_norm(h, sub, tasks))
            elif isinstance(sub, paddle.nn.BatchNorm2D):
                h = per_task_norm(h, sub, tasks)
            else:
                h = sub(h)
    return h


def median_seconds(fn: Callable[[], None], repeat: int) -> float:
    """Median wall-clock seconds of ``fn`` over ``repeat`` rounds after one warm-up."""
    fn()
    rounds = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        rounds.append(time.perf_counter() - start)
    return statistics.median(rounds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="W1s")
    parser.add_argument("--repeat", type=int, default=5, help="timed rounds (median)")
    parser.add_argument(
        "--tasks", type=int, default=None, help="meta-batch size (default: the workload's)"
    )
    parser.add_argument("--threads", type=int, default=1, help="threads of the oneDNN convolutions")
    args = parser.parse_args()
    if args.repeat < 1 or (args.tasks is not None and args.tasks < 1) or args.threads < 1:
        parser.error("--repeat, --tasks and --threads must be at least 1")
    w = WORKLOADS[args.workload]
    tasks = args.tasks or w["meta_batch"]
    tune_allocator()
    onednn.set_threads(args.threads)
    ops.install()
    paddle.seed(0)
    model = Conv4(w["channels"], WAYS, w["hidden"], w["pooling"], w["size"])
    rng = np.random.default_rng(0)
    shape = (tasks * WAYS * QUERIES, w["channels"], w["size"], w["size"])
    batch = paddle.to_tensor(rng.standard_normal(shape), "float32")
    per_task = [batch[i * WAYS * QUERIES : (i + 1) * WAYS * QUERIES] for i in range(tasks)]

    def run_per_task() -> None:
        for x in per_task:
            model.features(x).sum().backward()
        model.clear_gradients()

    def run_shared() -> None:
        model.features(batch).sum().backward()
        model.clear_gradients()

    def run_per_task_statistics() -> None:
        features_per_task_statistics(model, batch, tasks).sum().backward()
        model.clear_gradients()

    ways = {
        "per task": run_per_task,
        "batched, shared statistics": run_shared,
        "batched, per-task statistics": run_per_task_statistics,
    }
    print(
        f"{args.workload}: backbone forward + backward of {tasks} tasks x {WAYS * QUERIES} "
        f"queries, {args.threads} thread(s), median of {args.repeat}"
    )
    print(f"{'way':30s} {'s per meta-batch':>17s} {'vs per task':>12s}")
    base = None
    for name, fn in ways.items():
        seconds = median_seconds(fn, args.repeat)
        base = base or seconds
        print(f"{name:30s} {seconds:17.3f} {seconds / base:12.2f}")


if __name__ == "__main__":
    main()

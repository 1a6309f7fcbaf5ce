"""Where one meta-iteration's time goes, and how far it is from the machine's limit.

Runs a few meta-iterations of a workload from ``bench_learners.py`` under Paddle's
profiler and prints the operator table (top rows), then the convolution FLOPs of one
meta-iteration against the measured peak of ``paddle.matmul`` on this machine.

    python benchmarks/profile_iteration.py --workload W1 --algo maml
"""

from __future__ import annotations

import argparse
import statistics
import time

import numpy as np
import paddle
import paddle.profiler as profiler
from bench_learners import QUERIES, SHOTS, WAYS, WORKLOADS

from paddlefsl.metaopt import ANIL, MAML
from paddlefsl.models import Conv4
from paddlefsl.ops import onednn
from paddlefsl.runtime import tune_allocator, unlock_mkl_on_amd, use_cores


def conv_flops_per_image(w: dict) -> float:
    """Multiply-adds x 2 of the four 3x3 convolutions of Conv4 on one image."""
    size, cin, total = w["size"], w["channels"], 0.0
    for _ in range(4):
        out = (size + 1) // 2 if w["pooling"] == "stride" else size
        total += 2 * 9 * cin * w["hidden"] * out * out
        size = out // 2 if w["pooling"] == "max" else out
        cin = w["hidden"]
    return total


def iteration_flops(w: dict, algo: str) -> float:
    """Convolution FLOPs of one meta-iteration (forward = 1, backward = 2, double = 2+)."""
    per_image = conv_flops_per_image(w)
    support, query = WAYS * SHOTS, WAYS * QUERIES
    # Query: forward + backward (input and weight gradients).
    total = query * per_image * 3
    if algo in ("maml", "fomaml"):
        # Each inner step: forward + backward on the support set; second order adds the
        # backward of that backward (about twice a backward again).
        inner = support * per_image * (3 + (4 if algo == "maml" else 0))
        total += w["steps"] * inner
    else:
        total += w["steps"] * support * per_image  # features forward only matter
    return total * w["meta_batch"]


def peak_matmul_gflops(n: int = 2048, repeats: int = 5) -> float:
    a, b = paddle.randn([n, n]), paddle.randn([n, n])
    paddle.matmul(a, b).numpy()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        paddle.matmul(a, b).numpy()
        times.append(time.perf_counter() - start)
    return 2 * n**3 / statistics.median(times) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    parser.add_argument("--algo", choices=("maml", "fomaml", "anil", "foanil"), default="maml")
    parser.add_argument("--iters", type=int, default=2)
    parser.add_argument("--rows", type=int, default=15)
    args = parser.parse_args()
    tune_allocator()
    unlock_mkl_on_amd()
    use_cores(1)
    w = WORKLOADS[args.workload]
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = Conv4(w["channels"], WAYS, w["hidden"], w["pooling"], w["size"])
    first_order = args.algo.startswith("fo")
    if args.algo.endswith("anil"):
        learner = ANIL(model.features, model.head, lr=w["lr"], first_order=first_order)
    else:
        learner = MAML(model, lr=w["lr"], first_order=first_order)
    shape = (w["channels"], w["size"], w["size"])
    xs = paddle.to_tensor(rng.standard_normal((WAYS * SHOTS, *shape)), "float32")
    xq = paddle.to_tensor(rng.standard_normal((WAYS * QUERIES, *shape)), "float32")
    ys = paddle.to_tensor(np.repeat(np.arange(WAYS), SHOTS))
    yq = paddle.to_tensor(np.repeat(np.arange(WAYS), QUERIES))
    loss_fn = paddle.nn.CrossEntropyLoss()

    def iteration():
        for _ in range(w["meta_batch"]):
            clone = learner.clone()
            for _ in range(w["steps"]):
                clone.adapt(loss_fn(clone(xs), ys))
            (loss_fn(clone(xq), yq) / w["meta_batch"]).backward()
        learner.clear_gradients()

    iteration()  # warm-up
    # paddlefsl's own kernels (oneDNN convolutions, CPU kernels) run inside PyLayers and
    # custom ops that the profiler does not itemise, and the profiler slows them down:
    # time every call of them in separate iterations without it.
    kernel_seconds: dict[str, float] = {}
    run_op = onednn.run_op

    def timed_run_op(op, *op_args, threads=None):
        start = time.perf_counter()
        try:
            return run_op(op, *op_args, threads=threads)
        finally:
            kernel_seconds[op] = kernel_seconds.get(op, 0.0) + time.perf_counter() - start

    onednn.run_op = timed_run_op
    plain = []
    for _ in range(args.iters):
        start = time.perf_counter()
        iteration()
        plain.append(time.perf_counter() - start)
    onednn.run_op = run_op

    times = []
    prof = profiler.Profiler(targets=[profiler.ProfilerTarget.CPU])
    prof.start()
    for _ in range(args.iters):
        start = time.perf_counter()
        iteration()
        times.append(time.perf_counter() - start)
        prof.step()
    prof.stop()
    prof.summary(
        sorted_by=profiler.SortedKeys.CPUTotal, op_detail=False, thread_sep=False, time_unit="ms"
    )
    total = sum(plain)
    print(
        f"\npaddlefsl kernels, without the profiler ({args.iters} iterations, "
        f"{total / args.iters:.2f} s each): ms per meta-iteration, share"
    )
    for op, spent in sorted(kernel_seconds.items(), key=lambda item: -item[1]):
        print(f"  {op:<34}{1e3 * spent / args.iters:9.1f} ms {100 * spent / total:5.1f}%")
    spent = sum(kernel_seconds.values())
    print(f"  {'all of them':<34}{1e3 * spent / args.iters:9.1f} ms {100 * spent / total:5.1f}%")
    seconds = statistics.median(times)
    flops = iteration_flops(w, args.algo)
    peak = peak_matmul_gflops()
    print(
        f"\n{args.workload} {args.algo}: {seconds:.2f} s per meta-iteration under the "
        f"profiler; convolution work {flops / 1e9:.1f} GFLOP -> {flops / seconds / 1e9:.1f} "
        f"GFLOP/s effective; paddle.matmul peak on this process {peak:.0f} GFLOP/s; "
        f"lower bound at that peak {flops / peak / 1e9:.2f} s "
        f"({100 * flops / peak / 1e9 / seconds:.0f}% of the measured time)"
    )


if __name__ == "__main__":
    main()

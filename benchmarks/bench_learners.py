"""Seconds per meta-iteration and peak RSS of paddlefsl's learners on synthetic workloads.

Workloads (synthetic data of the real shapes, float32):

* W1: Omniglot 5-way 1-shot, 1x28x28, Conv4 (64 channels, max-pool), meta-batch 32,
  15 queries per class, 1 inner step (lr 0.4).
* W1s: W1 with MAML's strided Omniglot Conv4 (no max-pool).
* W2: miniImageNet 5-way 1-shot, 3x84x84, Conv4 (32 channels, max-pool), meta-batch 4,
  15 queries per class, 5 inner steps (lr 0.01).

Each (workload, algorithm) runs in its own process so that peak RSS is its own.

    python benchmarks/bench_learners.py                      # all, table at the end
    python benchmarks/bench_learners.py --workload W1 --algo maml --iters 5   # one, JSON line
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

WORKLOADS = {
    "W1": dict(channels=1, size=28, hidden=64, pooling="max", meta_batch=32, steps=1, lr=0.4),
    "W1s": dict(channels=1, size=28, hidden=64, pooling="stride", meta_batch=32, steps=1, lr=0.4),
    "W2": dict(channels=3, size=84, hidden=32, pooling="max", meta_batch=4, steps=5, lr=0.01),
}
ALGOS = ("maml", "fomaml", "anil", "foanil")
WAYS, SHOTS, QUERIES = 5, 1, 15


def run_one(workload: str, algo: str, iters: int, warmup: int, nproc: int = 1) -> dict:
    import numpy as np
    import paddle
    import paddle.distributed as dist

    rank, world = 0, 1
    if nproc > 1:
        dist.init_parallel_env()
        rank, world = dist.get_rank(), dist.get_world_size()

    from paddlefsl.metaopt import ANIL, MAML
    from paddlefsl.models import Conv4
    from paddlefsl.runtime import tune_allocator

    tune_allocator()  # as the paddlefsl CLI does

    w = WORKLOADS[workload]
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = Conv4(w["channels"], WAYS, w["hidden"], w["pooling"], w["size"])
    first_order = algo.startswith("fo")
    if algo.endswith("anil"):
        learner = ANIL(model.features, model.head, lr=w["lr"], first_order=first_order)
    else:
        learner = MAML(model, lr=w["lr"], first_order=first_order)
    opt = paddle.optimizer.Adam(learning_rate=1e-3, parameters=learner.parameters())
    shape = (w["meta_batch"], w["channels"], w["size"], w["size"])
    xs = paddle.to_tensor(rng.standard_normal((shape[0], WAYS * SHOTS) + shape[1:]), "float32")
    xq = paddle.to_tensor(rng.standard_normal((shape[0], WAYS * QUERIES) + shape[1:]), "float32")
    ys = paddle.to_tensor(np.repeat(np.arange(WAYS), SHOTS))
    yq = paddle.to_tensor(np.repeat(np.arange(WAYS), QUERIES))
    loss_fn = paddle.nn.CrossEntropyLoss()

    params = [p for p in learner.parameters() if not p.stop_gradient]

    def iteration():
        # With several processes each takes its share of the meta-batch; the summed
        # gradients are the meta-batch average because every loss is divided by its size.
        for b in range(rank, w["meta_batch"], world):
            clone = learner.clone()
            for _ in range(w["steps"]):
                clone.adapt(loss_fn(clone(xs[b]), ys))
            (loss_fn(clone(xq[b]), yq) / w["meta_batch"]).backward()
        if world > 1:
            for p in params:
                dist.all_reduce(p.grad)
        opt.step()
        opt.clear_grad()

    times = []
    for i in range(warmup + iters):
        start = time.perf_counter()
        iteration()
        if i >= warmup:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if world > 1:
        total = paddle.to_tensor([rss])
        dist.all_reduce(total)
        rss = float(total.numpy()[0])
    return {
        "workload": workload,
        "algo": algo,
        "median_s": round(median, 3),
        "min_s": round(min(times), 3),
        "tasks_per_s": round(w["meta_batch"] / median, 2),
        "peak_rss_mib": round(rss, 1),  # summed over processes
        "nproc": world,
        "iters": iters,
        "threads": os.environ.get("OMP_NUM_THREADS"),
    }


def _spawned(workload: str, algo: str, iters: int, warmup: int, nproc: int) -> None:
    import paddle.distributed as dist

    result = run_one(workload, algo, iters, warmup, nproc)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workload", choices=sorted(WORKLOADS))
    parser.add_argument("--algo", choices=ALGOS)
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument(
        "--nproc",
        type=int,
        default=1,
        help="processes (paddle.distributed, gloo on CPU) sharing each meta-batch",
    )
    args = parser.parse_args()
    if args.workload and args.algo:
        if args.nproc > 1:
            import paddle.distributed as dist

            dist.spawn(
                _spawned,
                args=(args.workload, args.algo, args.iters, args.warmup, args.nproc),
                nprocs=args.nproc,
            )
        else:
            print(
                "RESULT " + json.dumps(run_one(args.workload, args.algo, args.iters, args.warmup))
            )
        return
    rows = []
    for workload in [args.workload] if args.workload else list(WORKLOADS):
        for algo in [args.algo] if args.algo else ALGOS:
            cmd = [
                sys.executable,
                __file__,
                "--workload",
                workload,
                "--algo",
                algo,
                "--iters",
                str(args.iters),
                "--warmup",
                str(args.warmup),
            ]
            out = subprocess.run(cmd, capture_output=True, text=True)
            line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
            if not line:
                print(f"{workload} {algo} failed:\n{out.stderr[-2000:]}", file=sys.stderr)
                continue
            row = json.loads(line[0][7:])
            rows.append(row)
            print(json.dumps(row), flush=True)
    print(f"\n{'workload':<9}{'algo':<8}{'median s/it':>12}{'tasks/s':>9}{'peak RSS MiB':>14}")
    for r in rows:
        print(
            f"{r['workload']:<9}{r['algo']:<8}{r['median_s']:>12.3f}{r['tasks_per_s']:>9.2f}"
            f"{r['peak_rss_mib']:>14.0f}"
        )


if __name__ == "__main__":
    main()

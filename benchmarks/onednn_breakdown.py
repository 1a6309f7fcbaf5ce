"""Where a task's oneDNN time goes: convolutions, layout reorders and sgemm, per shape.

Runs first-order MAML tasks of a workload from ``bench_learners.py`` in a child process
with ``ONEDNN_VERBOSE=1`` (oneDNN then prints one line per primitive it executes, with
its time), drops the warm-up tasks, and prints milliseconds per task by primitive kind
and problem. The reorders are the conversions between Paddle's plain NCHW tensors and the
blocked layouts oneDNN's convolution kernels use (``paddlefsl/ops/_onednn_conv.cc``).
Verbose mode adds its own overhead per call, so the times are a little above an
untraced run's; compare the shares.

    OMP_NUM_THREADS=1 taskset -c 1 python benchmarks/onednn_breakdown.py --workload W1s
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys

CHILD = """
import numpy as np, paddle, sys
sys.path.insert(0, {bench_dir!r})
from bench_learners import QUERIES, SHOTS, WAYS, WORKLOADS
from paddlefsl.metaopt import MAML
from paddlefsl.models import Conv4
from paddlefsl.runtime import tune_allocator
tune_allocator()
w = WORKLOADS[{workload!r}]
paddle.seed(0)
model = Conv4(w["channels"], WAYS, w["hidden"], w["pooling"], w["size"])
learner = MAML(model, lr=w["lr"], first_order=True)
shape = [w["channels"], w["size"], w["size"]]
xs, xq = paddle.randn([WAYS * SHOTS, *shape]), paddle.randn([WAYS * QUERIES, *shape])
ys = paddle.to_tensor(np.arange(WAYS * SHOTS) % WAYS)
yq = paddle.to_tensor(np.arange(WAYS * QUERIES) % WAYS)
loss_fn = paddle.nn.CrossEntropyLoss()
for task in range({tasks}):
    print("TASK", task, flush=True)
    clone = learner.clone()
    for _ in range(w["steps"]):
        clone.adapt(loss_fn(clone(xs), ys))
    loss_fn(clone(xq), yq).backward()
"""


def parse(lines: list[str], warmup: int) -> tuple[dict, int]:
    """(kind, problem) -> [calls, ms] summed over the tasks after ``warmup``."""
    totals: dict = collections.defaultdict(lambda: [0, 0.0])
    task, counted = -1, 0
    for line in lines:
        if line.startswith("TASK"):
            task = int(line.split()[1])
            counted += task >= warmup
            continue
        fields = line.strip().split(",")
        if task < warmup or len(fields) < 6 or fields[3] != "exec":
            continue
        try:
            ms = float(fields[-1])
        except ValueError:
            continue
        entry = totals[(fields[5], fields[-2])]
        entry[0] += 1
        entry[1] += ms
    return totals, counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="W1s", choices=["W1", "W1s", "W2"])
    parser.add_argument("--tasks", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    if args.tasks <= args.warmup:
        raise SystemExit("--tasks must be larger than --warmup")
    code = CHILD.format(
        bench_dir=os.path.dirname(os.path.abspath(__file__)),
        workload=args.workload,
        tasks=args.tasks,
    )
    env = dict(os.environ, ONEDNN_VERBOSE="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    ).stdout
    totals, tasks = parse(out.splitlines(), args.warmup)
    if not totals:
        raise SystemExit("no oneDNN primitive ran (kernels unavailable?)")
    by_kind: dict = collections.defaultdict(float)
    for (kind, _), (_, ms) in totals.items():
        by_kind[kind] += ms / tasks
    whole = sum(by_kind.values())
    print(f"{args.workload}, first-order MAML, ms per task over {tasks} tasks (oneDNN verbose)")
    for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<12} {ms:7.2f} ms  {ms / whole:5.1%}")
    print(f"  {'all':<12} {whole:7.2f} ms")
    print(f"top {args.top} (kind, problem): calls per task, ms per task")
    rows = sorted(totals.items(), key=lambda kv: -kv[1][1])[: args.top]
    for (kind, problem), (calls, ms) in rows:
        print(f"  {kind:<12} {problem:<55} {calls / tasks:5.1f} {ms / tasks:7.3f}")


if __name__ == "__main__":
    main()

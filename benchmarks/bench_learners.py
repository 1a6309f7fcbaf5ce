"""Seconds per meta-iteration and peak RSS of paddlefsl's learners on synthetic workloads.

Workloads (synthetic data of the real shapes, float32):

* W1: Omniglot 5-way 1-shot, 1x28x28, Conv4 (64 channels, max-pool), meta-batch 32,
  15 queries per class, 1 inner step (lr 0.4).
* W1s: W1 with MAML's strided Omniglot Conv4 (no max-pool).
* W2: miniImageNet 5-way 1-shot, 3x84x84, Conv4 (32 channels, max-pool), meta-batch 4,
  15 queries per class, 5 inner steps (lr 0.01).

Each (workload, algorithm) runs in its own process so that peak RSS is its own.

    python benchmarks/bench_learners.py --iters 3        # all: ours (1 and 2 processes) and
                                                         # learn2learn, table at the end
    python benchmarks/bench_learners.py --workload W1 --algo maml --iters 5   # one, JSON line
    python benchmarks/bench_learners.py --workload W1s --algo maml --conv-padding same  # SAME

learn2learn runs through the team's peer script (``shared/bench/peers/bench_torch.py``) in
its own virtualenv (``--peer-python``, default ``~/venv-peers/bin/python``); without it the
column is skipped. paddlefsl itself never imports torch. The peer script waits for an idle
machine before each measurement (up to ``BENCH_MAX_WAIT_S`` seconds): stop other jobs first.
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
from pathlib import Path

WORKLOADS = {
    "W1": dict(channels=1, size=28, hidden=64, pooling="max", meta_batch=32, steps=1, lr=0.4),
    "W1s": dict(channels=1, size=28, hidden=64, pooling="stride", meta_batch=32, steps=1, lr=0.4),
    "W2": dict(channels=3, size=84, hidden=32, pooling="max", meta_batch=4, steps=5, lr=0.01),
}
ALGOS = ("maml", "fomaml", "anil", "foanil")
WAYS, SHOTS, QUERIES = 5, 1, 15


def run_one(
    workload: str,
    algo: str,
    iters: int,
    warmup: int,
    nproc: int = 1,
    conv_padding: str = "symmetric",
) -> dict:
    import numpy as np
    import paddle
    import paddle.distributed as dist

    rank, world = 0, 1
    if nproc > 1:
        dist.init_parallel_env()
        rank, world = dist.get_rank(), dist.get_world_size()

    from paddlefsl.metaopt import ANIL, MAML
    from paddlefsl.models import Conv4
    from paddlefsl.ops import cpu_kernels, onednn
    from paddlefsl.runtime import tune_allocator, unlock_mkl_on_amd, use_cores

    tune_allocator()  # as the paddlefsl CLI does
    unlock_mkl_on_amd()
    use_cores(world)

    w = WORKLOADS[workload]
    paddle.seed(0)
    rng = np.random.default_rng(0)
    model = Conv4(w["channels"], WAYS, w["hidden"], w["pooling"], w["size"], padding=conv_padding)
    first_order = algo.startswith("fo")
    anil = algo.endswith("anil")
    if anil:
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
            if anil:  # as the peer's loop: support features once, then the head adapts
                support = clone.embed(xs[b])
                for _ in range(w["steps"]):
                    clone.adapt(loss_fn(clone.head_forward(support), ys))
                del support  # the adapted head holds what second order needs of it
            else:
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
        "conv_padding": conv_padding,
        "median_s": round(median, 3),
        "min_s": round(min(times), 3),
        "tasks_per_s": round(w["meta_batch"] / median, 2),
        "peak_rss_mib": round(rss, 1),  # summed over processes
        "nproc": world,
        "iters": iters,
        "threads": os.environ.get("OMP_NUM_THREADS"),
        # oneDNN convolutions: their threads per process, or why they were off
        "conv_threads": onednn.get_threads() if onednn.available() else None,
        "onednn_off": onednn.unavailable_reason(),
        # bias / ReLU / BatchNorm / max-pool on paddlefsl's CPU kernels (same thread count)
        "cpu_kernels": cpu_kernels.usable(paddle.zeros([1])),
        "mkl_debug_cpu_type": os.environ.get("MKL_DEBUG_CPU_TYPE"),
    }


def _spawned(
    workload: str, algo: str, iters: int, warmup: int, nproc: int, conv_padding: str
) -> None:
    import paddle.distributed as dist

    result = run_one(workload, algo, iters, warmup, nproc, conv_padding)
    if dist.get_rank() == 0:
        print("RESULT " + json.dumps(result), flush=True)


# W1s runs the peer script through peer_strided.py, which adds the strided network to it.
PEER_SETTINGS = {"W1": "omniglot", "W1s": "omniglot-strided", "W2": "mini"}
PEER_STRIDED = Path(__file__).resolve().parent / "peer_strided.py"
DEFAULT_PEER_SCRIPT = (
    Path(__file__).resolve().parents[1].parent / "shared/bench/peers/bench_torch.py"
)
DEFAULT_PEER_PYTHON = Path.home() / "venv-peers/bin/python"


def _result(cmd: list[str], env: dict | None = None, cwd: str | None = None) -> dict | None:
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=cwd)
    line = [s for s in out.stdout.splitlines() if s.startswith("RESULT ")]
    if not line:
        print(f"failed: {' '.join(cmd)}\n{out.stderr[-2000:]}", file=sys.stderr)
        return None
    return json.loads(line[-1][len("RESULT ") :])


def _peer(workload: str, algo: str, args: argparse.Namespace) -> dict | None:
    """learn2learn on the same workload, through the team's peer script, if it is here."""
    if workload not in PEER_SETTINGS or not (
        args.peer_python.exists() and args.peer_script.exists()
    ):
        return None
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    script = [str(args.peer_script)]
    if workload == "W1s":
        script = [str(PEER_STRIDED), "--peer-dir", str(args.peer_script.parent)]
    cmd = [
        str(args.peer_python),
        *script,
        "--impl",
        "l2l",
        "--setting",
        PEER_SETTINGS[workload],
        "--algo",
        algo,
        "--iters",
        str(args.iters),
        "--warmup",
        str(args.warmup),
    ]
    return _result(cmd, env=env, cwd=str(args.peer_script.parent))


def _cell(row: dict | None) -> str:
    return f"{row['median_s']:.2f} ({row['peak_rss_mib']:.0f})" if row else "-"


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
        help="processes (paddle.distributed, gloo on CPU) sharing each "
        "meta-batch, for a single measurement",
    )
    parser.add_argument(
        "--conv-padding",
        choices=("symmetric", "same"),
        default="symmetric",
        help="Conv4 padding for a single measurement (same: TensorFlow's SAME, as "
        "paddlefsl train --conv-padding same)",
    )
    parser.add_argument(
        "--nproc-list", default="1,2", help="process counts to measure in the table mode"
    )
    parser.add_argument(
        "--table",
        action="store_true",
        help="with --workload and --algo: print the table row (with learn2learn) instead "
        "of one JSON measurement",
    )
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="table mode: alternate ours and learn2learn this many times per row and "
        "report medians (the paired ratios are more robust to a drifting machine)",
    )
    parser.add_argument(
        "--peer-python",
        type=Path,
        default=DEFAULT_PEER_PYTHON,
        help="python of a virtualenv with torch + learn2learn (skipped if missing)",
    )
    parser.add_argument(
        "--peer-script",
        type=Path,
        default=DEFAULT_PEER_SCRIPT,
        help="the team's peer benchmark (shared/bench/peers/bench_torch.py)",
    )
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, got {args.repeat}")
    if (
        args.workload and args.algo and not args.table
    ):  # one measurement (the table mode runs these)
        if args.nproc > 1:
            import paddle.distributed as dist

            dist.spawn(
                _spawned,
                args=(
                    args.workload,
                    args.algo,
                    args.iters,
                    args.warmup,
                    args.nproc,
                    args.conv_padding,
                ),
                nprocs=args.nproc,
            )
        else:
            result = run_one(
                args.workload, args.algo, args.iters, args.warmup, conv_padding=args.conv_padding
            )
            print("RESULT " + json.dumps(result))
        return
    nprocs = [int(n) for n in args.nproc_list.split(",")]
    table = []
    for workload in [args.workload] if args.workload else list(WORKLOADS):
        for algo in [args.algo] if args.algo else ALGOS:
            rounds = [_round(workload, algo, nprocs, args) for _ in range(args.repeat)]
            table.append((workload, algo, rounds))
    head = "".join(f"{f'ours {n} proc':>18}" for n in nprocs)
    repeated = f", median of {args.repeat} alternating rounds" if args.repeat > 1 else ""
    print(
        f"\nseconds per meta-iteration (peak RSS MiB, summed over processes){repeated}; "
        f"ratio = learn2learn s / ours s\n{'workload':<9}{'algo':<8}{head}{'learn2learn':>18}"
        + "".join(f"{f'ratio {n}p':>10}" for n in nprocs)
        + ("   ratio of each round" if args.repeat > 1 else "")
    )
    for workload, algo, rounds in table:
        peer = _combined([peer for _, peer in rounds])
        ours = {n: _combined([o[n] for o, _ in rounds]) for n in nprocs}
        # Paired: each round's ratio uses the two measurements taken next to each other.
        per_round = {
            n: [p["median_s"] / o[n]["median_s"] for o, p in rounds if p and o[n]] for n in nprocs
        }
        ratios = "".join(
            f"{statistics.median(per_round[n]):>10.2f}" if per_round[n] else f"{'-':>10}"
            for n in nprocs
        )
        each = ""
        if args.repeat > 1:
            each = "   " + "; ".join(
                " ".join(f"{r:.2f}" for r in per_round[n]) for n in nprocs if per_round[n]
            )
        print(
            f"{workload:<9}{algo:<8}"
            + "".join(f"{_cell(ours[n]):>18}" for n in nprocs)
            + f"{_cell(peer):>18}"
            + ratios
            + each
        )


def _round(workload: str, algo: str, nprocs: list[int], args: argparse.Namespace):
    """One measurement of ours (each process count) and then of learn2learn."""
    ours = {}
    for n in nprocs:  # alternate ours and theirs, since machine speed drifts
        ours[n] = _result(
            [
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
                "--nproc",
                str(n),
            ]
        )
        print(json.dumps(ours[n]), flush=True)
    peer = _peer(workload, algo, args)
    if peer:
        print(json.dumps(peer), flush=True)
    return ours, peer


def _combined(results: list[dict | None]) -> dict | None:
    """Median seconds and the highest peak RSS over rounds (None if none succeeded)."""
    done = [r for r in results if r]
    if not done:
        return None
    return {
        "median_s": statistics.median(r["median_s"] for r in done),
        "peak_rss_mib": max(r["peak_rss_mib"] for r in done),
    }


if __name__ == "__main__":
    main()

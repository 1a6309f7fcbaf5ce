"""paddle.matmul throughput with and without :func:`paddlefsl.runtime.unlock_mkl_on_amd`.

Each setting runs in its own process (MKL reads its CPU switch once per process), at 1 and
2 threads, on a large square product and on the small products of a Conv4 learner (the
linear head, the global average pooling as a product with a column):

    python benchmarks/bench_matmul.py

Prints one line per (setting, threads, shape): median microseconds of ``--repeat`` timed
runs and GFLOP/s. On Intel CPUs the two settings are the same process twice.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

SHAPES = {  # name: (m, k, n), calls per timed run
    "square 2048": ((2048, 2048, 2048), 2),
    "head [80,64]x[64,5]": ((80, 64, 5), 2000),
    "pooling [8000,4]x[4,1]": ((8000, 4, 1), 2000),
    "im2col [1600,576]x[576,64]": ((1600, 576, 64), 50),
}


def measure(repeat: int) -> list[dict]:
    """Time every shape in this process (its environment already set)."""
    import paddle

    paddle.set_device("cpu")
    rows = []
    for name, ((m, k, n), calls) in SHAPES.items():
        a, b = paddle.randn([m, k]), paddle.randn([k, n])
        for _ in range(max(2, calls // 10)):
            paddle.matmul(a, b)
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            for _ in range(calls):
                out = paddle.matmul(a, b)
            out.numpy()  # waits for the last product
            times.append((time.perf_counter() - start) / calls)
        t = statistics.median(times)
        rows.append({"shape": name, "us": t * 1e6, "gflops": 2 * m * k * n / t / 1e9})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--worker", choices=["default", "unlocked"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        if args.worker == "unlocked":
            from paddlefsl.runtime import unlock_mkl_on_amd

            unlock_mkl_on_amd()
        print("RESULT " + json.dumps(measure(args.repeat)))
        return
    from paddlefsl.runtime import _cpu_vendor

    print(f"CPU vendor: {_cpu_vendor() or 'unknown'}")
    for threads in args.threads:
        for setting in ("default", "unlocked"):
            env = {k: v for k, v in os.environ.items() if k != "MKL_DEBUG_CPU_TYPE"}
            env.update(OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
            done = subprocess.run(
                [sys.executable, __file__, "--worker", setting, "--repeat", str(args.repeat)],
                env=env,
                capture_output=True,
                text=True,
                check=False,
            )
            lines = [x for x in done.stdout.splitlines() if x.startswith("RESULT ")]
            if done.returncode != 0 or not lines:
                sys.exit(f"worker failed ({setting}, {threads} threads):\n{done.stderr[-2000:]}")
            for row in json.loads(lines[-1][len("RESULT ") :]):
                print(
                    f"{setting:9s} threads={threads} {row['shape']:28s}"
                    f" {row['us']:10.1f} us {row['gflops']:8.1f} GFLOP/s"
                )


if __name__ == "__main__":
    main()

"""The benchmark scripts still run (one quick pass each); no timing is asserted here.

Speed is measured by running the scripts on an idle machine (docs/benchmarks.md); these
tests only keep them from rotting as the library changes.
"""

import json
import subprocess
import sys
from pathlib import Path

import paddle
import pytest

from paddlefsl.ops import cpu_kernels, onednn

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def run(*args: str) -> str:
    done = subprocess.run(
        [sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_bench_learners_one_measurement_prints_a_result():
    out = run("bench_learners.py", "--workload", "W1s", "--algo", "foanil", "--iters", "1")
    line = [s for s in out.splitlines() if s.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["workload"] == "W1s" and result["algo"] == "foanil"
    assert result["median_s"] > 0 and result["peak_rss_mib"] > 0


def test_bench_learners_table_repeats_rounds(tmp_path):
    """--repeat alternates the measurements and reports one row (peer absent: skipped)."""
    out = run(
        "bench_learners.py",
        *("--workload", "W1s", "--algo", "foanil", "--iters", "1", "--warmup", "0"),
        *("--table", "--repeat", "2", "--nproc-list", "1"),
        *("--peer-python", str(tmp_path / "no-python")),
    )
    measured = [json.loads(s) for s in out.splitlines() if s.startswith('{"workload"')]
    assert len(measured) == 2, out
    row = [s for s in out.splitlines() if s.startswith("W1s")]
    assert len(row) == 1 and "foanil" in row[0] and row[0].rstrip().endswith("-"), out
    assert "median of 2 alternating rounds" in out


def run_failing(*args: str) -> subprocess.CompletedProcess:
    """Run a benchmark script that should refuse its arguments."""
    return subprocess.run(
        [sys.executable, *args], cwd=BENCHMARKS, capture_output=True, text=True, timeout=600
    )


def test_bench_learners_rejects_a_bad_repeat():
    done = run_failing("bench_learners.py", "--repeat", "0")
    assert done.returncode == 2 and "--repeat must be at least 1" in done.stderr


def test_bench_layers_quick_prints_every_layer():
    if not cpu_kernels.usable(paddle.zeros([1])):
        pytest.skip(f"CPU kernels unavailable: {onednn.unavailable_reason()}")
    out = run("bench_layers.py", "--quick", "--json")
    rows = [json.loads(s) for s in out.splitlines() if s.startswith("{")]
    layers = {row["layer"] for row in rows}
    assert {"bias add", "relu", "batch norm", "max pool fwd+bwd"} <= layers
    assert all(row["ours_2t_ms"] > 0 and row["paddle_ms"] > 0 for row in rows)


def test_bench_matmul_compares_both_settings():
    out = run("bench_matmul.py", "--repeat", "1", "--threads", "1")
    rows = [line.split() for line in out.splitlines() if "GFLOP/s" in line]
    assert [r[0] for r in rows].count("default") == 4 and [r[0] for r in rows].count(
        "unlocked"
    ) == 4
    assert all(float(r[-2]) > 0 for r in rows)


def test_bench_dispatch_fits_per_op_and_fixed_costs():
    out = run("bench_dispatch.py", "--layers", "2", "4", "--calls", "3", "--repeat", "1")
    lines = out.splitlines()
    assert lines[0].split()[:2] == ["layers", "ops"]
    assert [line.split()[:2] for line in lines[1:3]] == [["2", "9"], ["4", "17"]]
    for mode in ("dygraph", "to_static"):
        assert any(line.startswith(f"{mode}: ") and "us per op" in line for line in lines), out


def test_bench_dispatch_needs_two_chain_lengths():
    done = run_failing("bench_dispatch.py", "--layers", "10")
    assert done.returncode == 2 and "at least two --layers" in done.stderr

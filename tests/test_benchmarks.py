"""The benchmark scripts still run (one quick pass each); no timing is asserted here.

Speed is measured by running the scripts on an idle machine (docs/benchmarks.md); these
tests only keep them from rotting as the library changes.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize("padding", ["symmetric", "same"])
def test_bench_learners_one_measurement_prints_a_result(padding):
    out = run(
        "bench_learners.py",
        *("--workload", "W1s", "--algo", "foanil", "--iters", "1", "--conv-padding", padding),
    )
    line = [s for s in out.splitlines() if s.startswith("RESULT ")][-1]
    result = json.loads(line[len("RESULT ") :])
    assert result["workload"] == "W1s" and result["algo"] == "foanil"
    assert result["conv_padding"] == padding
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


def _load_benchmark(name: str):
    import importlib.util

    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_bench_task_batching_prints_three_ways():
    out = run("bench_task_batching.py", "--tasks", "2", "--repeat", "1")
    rows = [line.split() for line in out.splitlines()[2:]]
    assert [" ".join(r[:-2]) for r in rows] == [
        "per task",
        "batched, shared statistics",
        "batched, per-task statistics",
    ]
    assert float(rows[0][-1]) == 1.0 and all(float(r[-2]) > 0 for r in rows)


def test_bench_task_batching_workloads_match_bench_learners():
    batching = _load_benchmark("bench_task_batching").WORKLOADS
    learners = _load_benchmark("bench_learners").WORKLOADS
    assert batching.keys() == learners.keys()
    for name, shape in batching.items():
        assert shape.items() <= learners[name].items(), name


def test_bench_task_batching_per_task_statistics_equal_separate_passes():
    """The batched per-task-statistics pass is the tasks' own passes, stacked."""
    bench = _load_benchmark("bench_task_batching")
    paddle.seed(0)
    model = bench.Conv4(1, 5, hidden=8, pooling="stride", image_size=28)
    x = paddle.randn([3 * 4, 1, 28, 28], dtype="float32") * 2 + 0.5
    batched = bench.features_per_task_statistics(model, x, tasks=3)
    separate = paddle.concat([model.features(x[i * 4 : (i + 1) * 4]) for i in range(3)])
    mixed = model.features(x)  # statistics over all tasks: must differ, or the test is void
    np.testing.assert_allclose(batched.numpy(), separate.numpy(), rtol=1e-4, atol=1e-5)
    assert np.abs(mixed.numpy() - separate.numpy()).max() > 1e-3


def test_bench_losses_prints_native_and_rebuilt_times():
    out = run("bench_losses.py", "--shapes", "6x3", "--repeat", "1")
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [r[0] for r in rows] == ["bce_with_logits", "bce", "nll", "smooth_l1", "kl_div"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in rows)


def test_bench_batch_norm_relu_prints_both_times_per_shape():
    if not cpu_kernels.usable(paddle.zeros([1])):
        pytest.skip("CPU kernels unavailable")
    out = run("bench_batch_norm_relu.py", "--repeats", "1")
    rows = [line.split() for line in out.splitlines() if line.strip().startswith("[")]
    assert len(rows) == 8  # support and query sets through the four W1s blocks
    assert all(float(r[-3]) > 0 and float(r[-2]) > 0 for r in rows)
    assert "W1s meta-iteration" in out


def test_onednn_breakdown_splits_a_task_into_primitive_kinds():
    if not onednn.available():
        pytest.skip("oneDNN kernels unavailable")
    out = run("onednn_breakdown.py", "--tasks", "2", "--warmup", "1", "--top", "3")
    kinds = {line.split()[0] for line in out.splitlines()[1:] if "%" in line}
    assert "convolution" in kinds
    assert "mb75_ic64oc64_ih14oh7" in out  # the strided second layer's query batch


def test_bench_first_layer_times_the_four_shapes():
    if not onednn.available():
        pytest.skip("oneDNN kernels unavailable")
    out = run("bench_first_layer.py", "--repeats", "1")
    rows = [line for line in out.splitlines() if line.rstrip().endswith("ms")]
    assert len(rows) == 4 and all(float(r.split()[-2]) > 0 for r in rows)

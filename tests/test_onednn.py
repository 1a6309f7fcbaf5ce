"""oneDNN convolution ops (paddlefsl.ops.onednn) against Paddle's conv2d and its gradients.

The first test to need the ops builds them into the user cache (~20 s, once); later runs
reuse it. Everything that needs the ops skips, with the reason, where they cannot be
built (no compiler, no network for the headers, not an x86-64 Linux Paddle).
"""

import ctypes
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl.ops import onednn


@pytest.fixture(scope="module")
def ops():
    if not onednn.available():
        reason = f"oneDNN ops unavailable: {onednn.unavailable_reason()}"
        print(reason)
        pytest.skip(reason)
    return onednn


@pytest.fixture
def threads_restored():
    previous = onednn.get_threads()
    yield
    onednn.set_threads(previous)


def close(got, want, what):
    got, want = got.numpy().astype(np.float64), want.numpy().astype(np.float64)
    assert got.shape == want.shape, what
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert error < 1e-4, f"{what}: max error {error:.2e} of the max magnitude"


def reference(x, w, stride, padding):
    """Paddle's conv2d and its two gradients for a random output gradient."""
    x, w = x.detach(), w.detach()
    x.stop_gradient = w.stop_gradient = False
    y = F.conv2d(x, w, stride=stride, padding=padding)
    dy = paddle.randn(y.shape)
    dx, dw = paddle.grad([y], [x, w], [dy])
    return y, dy, dx, dw


def assert_kernels_match_paddle(ops, shape, out_channels, k, stride, padding, threads, parts):
    """Runs the named kernels on random data and compares them with Paddle's conv2d.

    ``parts`` names what to check: "plain" (forward, filter gradient), "data" (input
    gradient) and "bias" (forward with bias, filter and bias gradients in one call).
    """
    x = paddle.randn(shape)
    w = paddle.randn([out_channels, shape[1], k, k]) * 0.1
    b = paddle.randn([out_channels])
    y, dy, dx, dw = reference(x, w, stride, padding)
    what = f"{shape} -> {out_channels}, k{k} s{stride} p{padding}, {threads} thread(s)"
    if "plain" in parts:
        close(ops.conv2d_forward(x, w, stride, padding, threads=threads), y, "forward " + what)
        got = ops.conv2d_backward_weight(x, dy, stride, padding, [k, k], threads)
        close(got, dw, "backward_weight " + what)
    if "data" in parts:
        got = ops.conv2d_backward_data(dy, w, stride, padding, shape[2:], threads=threads)
        close(got, dx, "backward_data " + what)
    if "bias" in parts:
        got = ops.conv2d_forward_bias(x, w, b, stride, padding, threads=threads)
        close(got, y + b.reshape([1, -1, 1, 1]), "forward_bias " + what)
        got_dw, got_db = ops.conv2d_backward_weight_bias(x, dy, stride, padding, [k, k], threads)
        close(got_dw, dw, "backward_weight_bias (dw) " + what)
        close(got_db, dy.sum([0, 2, 3]), "backward_weight_bias (db) " + what)


# (N, C, H, W), O, kernel, stride, padding
CASES = [
    ((1, 1, 7, 7), 4, 3, 2, 1),  # one input channel, 7x7 -> 4x4
    ((5, 64, 14, 14), 64, 3, 2, 1),
    ((25, 64, 5, 5), 64, 3, 1, 1),
    ((5, 3, 9, 9), 8, 3, 1, 0),
    ((5, 64, 7, 7), 32, 3, 2, 0),  # 7x7 -> 3x3
    ((1, 64, 6, 6), 1, 3, 2, 1),  # one output channel
    ((2, 8, 5, 9), 16, 1, 1, 0),  # 1x1 kernel, non-square input
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, out_channels, k, stride, padding", CASES)
def test_matches_paddle(ops, shape, out_channels, k, stride, padding, threads):
    assert_kernels_match_paddle(
        ops, shape, out_channels, k, stride, padding, threads, ("plain", "data")
    )


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, out_channels, k, stride, padding", CASES[:5])
def test_bias_variants_match_paddle(ops, shape, out_channels, k, stride, padding, threads):
    """The folded bias: conv + b forward, and (dw, db) from one backward call."""
    assert_kernels_match_paddle(ops, shape, out_channels, k, stride, padding, threads, ("bias",))


# Forwards and filter gradients with C*KH*KW <= 27 run as unfolded products
# (gemm_forward, gemm_filter_gradient): several blocks of output rows, 5x5 windows, 1x1
# windows, padding beyond the window.
FEW_CHANNEL_CASES = [
    ((2, 3, 84, 84), 32, 3, 1, 1),  # miniImageNet's first layer: 14 blocks of rows
    ((3, 1, 28, 28), 64, 3, 2, 1),  # Omniglot's strided first layer
    ((3, 1, 9, 11), 5, 5, 1, 2),  # 25 = 1*5*5, non-square
    ((4, 2, 11, 8), 5, 3, 2, 0),  # even rows left over by the stride
    ((1, 27, 6, 6), 7, 1, 1, 0),  # 1x1 window: the limit 27
    ((2, 28, 6, 6), 7, 1, 1, 0),  # just above it: oneDNN's kernel
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, out_channels, k, stride, padding", FEW_CHANNEL_CASES)
def test_few_channel_forwards_and_filter_gradients_match_paddle(
    ops, shape, out_channels, k, stride, padding, threads
):
    x = paddle.randn(shape)
    w = paddle.randn([out_channels, shape[1], k, k]) * 0.1
    b = paddle.randn([out_channels])
    y, dy, _, dw = reference(x, w, stride, padding)
    what = f"{shape} -> {out_channels}, k{k} s{stride} p{padding}, {threads} thread(s)"
    close(ops.conv2d_forward(x, w, stride, padding, threads=threads), y, "forward " + what)
    got = ops.conv2d_forward_bias(x, w, b, stride, padding, threads=threads)
    close(got, y + b.reshape([1, -1, 1, 1]), "forward_bias " + what)
    got = ops.conv2d_backward_weight(x, dy, [stride] * 2, [padding] * 2, [k, k], threads)
    close(got, dw, "backward_weight " + what)
    got_dw, got_db = ops.conv2d_backward_weight_bias(x, dy, stride, padding, [k, k], threads)
    close(got_dw, dw, "backward_weight_bias (dw) " + what)
    close(got_db, dy.sum([0, 2, 3]), "backward_weight_bias (db) " + what)


# [top, bottom, left, right]: TensorFlow's SAME padding of strided 3x3 convolutions pads
# one pixel more after than before, on oneDNN's kernels (64 channels) and on the unfolded
# products (1 channel); and an arbitrary uneven padding of a 5x5 window.
ASYMMETRIC_CASES = [
    ((5, 64, 14, 14), 64, 3, 2, [0, 1, 0, 1]),
    ((3, 1, 28, 28), 64, 3, 2, [0, 1, 0, 1]),
    ((2, 16, 9, 11), 8, 5, 1, [2, 1, 0, 3]),
    ((2, 2, 9, 11), 8, 5, 2, [2, 1, 0, 3]),
]


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("shape, out_channels, k, stride, padding", ASYMMETRIC_CASES)
def test_asymmetric_padding_matches_paddle(ops, shape, out_channels, k, stride, padding, threads):
    assert_kernels_match_paddle(
        ops, shape, out_channels, k, stride, padding, threads, ("plain", "data", "bias")
    )


def test_bad_paddings_are_named(ops):
    x, w = paddle.randn([1, 4, 6, 6]), paddle.randn([8, 4, 3, 3])
    with pytest.raises(ValueError, match=r"\[top, bottom, left, right\]"):
        ops.conv2d_forward(x, w, 1, [1, 1, 1])
    with pytest.raises(RuntimeError, match="paddings must be >= 0"):
        ops.conv2d_forward(x, w, 1, [1, -1, 1, 1])


_IMPLEMENTATIONS = textwrap.dedent(
    """
    import paddle
    from paddlefsl.ops import onednn

    for shape, out_channels, k, stride, padding in CASES:
        x, w = paddle.randn(shape), paddle.randn([out_channels, shape[1], k, k])
        y = onednn.conv2d_forward(x, w, stride, padding)
        onednn.conv2d_backward_data(y, w, stride, padding, shape[2:])
        onednn.conv2d_backward_weight(x, y, stride, padding, [k, k])
    """
)


def test_no_convolution_runs_on_the_reference_kernels(ops):
    # oneDNN's naive "ref" kernels accept any layout and are 100x slower; the input
    # gradient of a 1- or 3-channel NCHW input once landed on them.
    cases = CASES + ASYMMETRIC_CASES
    script = f"CASES = {cases!r}\n" + _IMPLEMENTATIONS
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=dict(os.environ, ONEDNN_VERBOSE="1"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    runs = [line for line in done.stdout.splitlines() if ",exec,cpu,convolution," in line]
    assert len(runs) >= len(cases) * 2, done.stdout[-2000:]
    slow = [line for line in runs if ",ref:" in line]
    assert not slow, "\n".join(slow)


def test_bias_variants_on_an_empty_batch_and_a_bad_bias(ops):
    x, w = paddle.randn([0, 4, 6, 6]), paddle.randn([8, 4, 3, 3])
    assert ops.conv2d_forward_bias(x, w, paddle.zeros([8]), 1, 1).shape == [0, 8, 6, 6]
    dw, db = ops.conv2d_backward_weight_bias(x, paddle.randn([0, 8, 6, 6]), 1, 1, [3, 3])
    assert float(dw.abs().sum()) == 0.0 and db.shape == [8] and float(db.abs().sum()) == 0.0
    with pytest.raises(RuntimeError, match="one entry per output channel"):
        ops.conv2d_forward_bias(paddle.randn([1, 4, 6, 6]), w, paddle.zeros([4]), 1, 1)


def test_repeated_calls_reuse_the_cache(ops):
    x, w = paddle.randn([5, 32, 11, 11]), paddle.randn([32, 32, 3, 3])
    first = ops.conv2d_forward(x, w, 2, 1).numpy()
    for _ in range(3):
        np.testing.assert_array_equal(ops.conv2d_forward(x, w, 2, 1).numpy(), first)
    # A different batch size is another cache entry; the first one still works.
    ops.conv2d_forward(paddle.randn([3, 32, 11, 11]), w, 2, 1)
    np.testing.assert_array_equal(ops.conv2d_forward(x, w, 2, 1).numpy(), first)


def test_more_shapes_than_the_cache_holds(ops):
    w = paddle.randn([8, 4, 3, 3])
    for _ in range(2):
        for n in range(1, 141):  # > 128 entries: the oldest are evicted, then rebuilt
            x = paddle.randn([n, 4, 5, 5])
            close(ops.conv2d_forward(x, w, 1, 1), F.conv2d(x, w, padding=1), f"batch {n}")


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


@pytest.mark.parametrize("threads", [1, 2])
def test_kept_forward_input_gives_the_filter_gradient_of_the_same_tensor(ops, threads):
    # A forward with keep=1 leaves its blocked x for the filter gradient of the same x.
    # Two inputs of one shape are kept at once, and the gradient for each must come from
    # its own x: a store matched by shape alone would swap them.
    x1, x2 = paddle.randn([5, 64, 14, 14]), paddle.randn([5, 64, 14, 14])
    w = paddle.randn([32, 64, 3, 3])
    args = ([2, 2], [1, 1])
    for x in (x1, x2):
        ops.run_op(ops.OPS[0], x, w, *args, 1, threads=threads)
    for x in (x1, x2, x1):  # the last x1 finds nothing kept any more: reordered afresh
        y, dy, _, dw = reference(x, w, 2, 1)
        got = ops.run_op(ops.OPS[2], x, dy, *args, [3, 3], threads=threads)[0]
        close(got, dw, "filter gradient from the kept input")
    x3 = paddle.randn([5, 64, 14, 14])
    ops.run_op(ops.OPS[3], x3, w, paddle.zeros([32]), *args, 1, threads=threads)
    y, dy, _, dw = reference(x3, w, 2, 1)
    got, db = ops.run_op(ops.OPS[4], x3, dy, *args, [3, 3], threads=threads)
    close(got, dw, "filter gradient (bias variant) from the kept input")
    close(db, dy.sum([0, 2, 3]), "bias gradient")


def test_kept_inputs_never_taken_are_bounded(ops):
    # Forwards whose filter gradient never comes must not pile up: 150 kept inputs of
    # 4 MiB (and their blocked copies) would be over a GiB.
    w = paddle.randn([64, 64, 3, 3])
    xs = [paddle.randn([16, 64, 32, 32]) for _ in range(3)]
    ops.run_op(ops.OPS[0], xs[0], w, [1, 1], [1, 1], 1)
    before = _rss_mib()
    for _ in range(50):
        for x in xs:
            ops.run_op(ops.OPS[0], x + 0.0, w, [1, 1], [1, 1], 1)
    grown = _rss_mib() - before
    assert grown < 300, f"resident memory grew by {grown:.0f} MiB"


_EXIT_WITH_KEPT_INPUTS = textwrap.dedent(
    """
    import paddle
    from paddlefsl.metaopt import MAML
    from paddlefsl.models import Conv4

    model = Conv4(in_channels=1, num_classes=5, hidden=8, pooling="stride")
    learner = MAML(model, lr=0.4)
    clone = learner.clone()
    # Forwards whose filter gradients never run: their inputs stay kept at exit, each one
    # the output of a recorded op.
    clone(paddle.randn([5, 1, 28, 28])).sum()
    print("FORWARD DONE", flush=True)
    """
)


def test_process_exits_with_kept_inputs(ops):
    # Kept inputs left at exit once hung the process: freeing them ran autograd nodes'
    # destructors, which wait for the interpreter's lock, after the interpreter was gone.
    done = subprocess.run(
        [sys.executable, "-c", _EXIT_WITH_KEPT_INPUTS],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert "FORWARD DONE" in done.stdout, done.stderr[-2000:]
    assert done.returncode == 0, done.stderr[-2000:]


def test_records_no_graph(ops):
    x, w = paddle.randn([2, 4, 6, 6]), paddle.randn([4, 4, 3, 3])
    x.stop_gradient = w.stop_gradient = False
    assert ops.conv2d_forward(x, w, 1, 1).stop_gradient


def test_non_contiguous_input(ops):
    x = paddle.randn([3, 9, 8, 9]).transpose([0, 2, 1, 3])  # a strided view [3, 8, 9, 9]
    w = paddle.randn([8, 8, 3, 3])
    close(ops.conv2d_forward(x, w, 1, 1), F.conv2d(x, w, padding=1), "strided view")


def test_empty_batch(ops):
    x, w = paddle.randn([0, 4, 6, 6]), paddle.randn([8, 4, 3, 3])
    assert ops.conv2d_forward(x, w, 1, 1).shape == [0, 8, 6, 6]
    dw = ops.conv2d_backward_weight(x, paddle.randn([0, 8, 6, 6]), 1, 1, [3, 3])
    assert dw.shape == [8, 4, 3, 3] and float(dw.abs().sum()) == 0.0


@pytest.mark.parametrize(
    "x_shape, w_shape, dtype, strides, match",
    [
        ([2, 4, 6, 6], [8, 4, 3, 3], "float64", 1, "float32"),
        ([2, 4, 6, 6], [8, 2, 3, 3], "float32", 1, "groups=1"),
        ([4, 6, 6], [8, 4, 3, 3], "float32", 1, "4-D"),
        ([2, 4, 6, 6], [8, 4, 3, 3], "float32", 0, "strides"),
        ([2, 4, 2, 2], [8, 4, 5, 5], "float32", 1, "larger than the padded input"),
    ],
)
def test_unsupported_input_is_a_clear_error(ops, x_shape, w_shape, dtype, strides, match):
    x, w = paddle.randn(x_shape).astype(dtype), paddle.randn(w_shape).astype(dtype)
    with pytest.raises(RuntimeError, match=match):
        ops.conv2d_forward(x, w, strides, 0)


def test_inconsistent_gradient_shapes_are_errors(ops):
    dy, w = paddle.randn([2, 8, 3, 3]), paddle.randn([8, 4, 3, 3])
    with pytest.raises(RuntimeError, match="input_hw"):
        ops.conv2d_backward_data(dy, w, 2, 1, [9, 9])  # 9x9 gives 5x5, not 3x3
    with pytest.raises(RuntimeError, match="kernel_hw"):
        ops.conv2d_backward_weight(paddle.randn([2, 4, 6, 6]), dy, 2, 1, [5, 5])


def test_two_threads_leave_paddle_thread_count_alone(ops, threads_restored):
    iomp = ctypes.CDLL(str(Path(paddle.__file__).parent / "libs" / "libiomp5.so"))
    before = iomp.omp_get_max_threads()
    ops.set_threads(2)
    x, w = paddle.randn([4, 16, 8, 8]), paddle.randn([16, 16, 3, 3])
    y = ops.conv2d_forward(x, w, 1, 1)
    assert iomp.omp_get_max_threads() == before
    close(y, F.conv2d(x, w, padding=1), "2 threads via set_threads")
    assert ops.get_threads() == 2


def test_set_threads_validates(threads_restored):
    for bad in (0, -1, 1.5, True):
        with pytest.raises(ValueError):
            onednn.set_threads(bad)
    onednn.set_threads(1)
    assert onednn.get_threads() == 1


_PROBE = textwrap.dedent(
    """
    import json, os, warnings
    warnings.simplefilter("always")
    from paddlefsl.ops import onednn
    out = {"disabled": [onednn.available(), onednn.unavailable_reason()]}
    del os.environ["PADDLEFSL_ONEDNN"]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out["include"] = [onednn.available(), onednn.unavailable_reason(), onednn.available()]
    out["warnings"] = [str(w.message) for w in caught]
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """A fresh process with PADDLEFSL_ONEDNN=0, a bad header folder and an empty cache."""
    tmp = tmp_path_factory.mktemp("onednn-probe")
    env = dict(
        os.environ,
        PADDLEFSL_ONEDNN="0",
        PADDLEFSL_ONEDNN_INCLUDE=str(tmp / "no-headers-here"),
        PADDLEFSL_CACHE=str(tmp / "cache"),
    )
    done = subprocess.run(
        [sys.executable, "-c", _PROBE], env=env, capture_output=True, text=True, timeout=300
    )
    lines = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
    assert done.returncode == 0 and lines, done.stderr[-2000:]
    return json.loads(lines[-1][len("RESULT ") :]), tmp / "cache"


def test_environment_switch_disables(probe):
    result, _ = probe
    available, reason = result["disabled"]
    assert available is False and "PADDLEFSL_ONEDNN=0" in reason


def test_bad_include_folder_is_reported(ops, probe):
    # Needs a platform where the ops can work, so that the header folder is what fails.
    result, cache = probe
    first, reason, again = result["include"]
    assert first is False and again is False
    assert "PADDLEFSL_ONEDNN_INCLUDE" in reason and "no-headers-here" in reason
    assert len(result["warnings"]) == 1 and "PADDLEFSL_ONEDNN_INCLUDE" in result["warnings"][0]
    assert not cache.exists() or not any(cache.rglob("*.so"))  # nothing was built


def test_prune_cache_keeps_the_recently_used_and_the_busy(tmp_path):
    """Old builds go; the newest few, the one in use and one being built stay."""
    import fcntl

    from paddlefsl.ops import _onednn_build

    now = 1_700_000_000
    for age in range(7):  # entry0 is the most recently used
        entry = tmp_path / f"entry{age}"
        entry.mkdir()
        (entry / "lib.so").write_bytes(b"x")
        (entry / "last_used").touch()
        os.utime(entry / "last_used", (now - age * 100, now - age * 100))
    current = tmp_path / "entry6"  # the oldest, but the one this process uses
    (tmp_path / ".entry9.tmp-abc").mkdir()  # a build in progress elsewhere
    with open(tmp_path / "entry5.lock", "a+") as busy:
        fcntl.flock(busy, fcntl.LOCK_EX)
        deleted = _onednn_build.prune_cache(tmp_path, keep=current, entries=2)
    assert sorted(p.name for p in deleted) == ["entry2", "entry3", "entry4"]
    left = sorted(p.name for p in tmp_path.iterdir() if not p.name.endswith(".lock"))
    assert left == [".entry9.tmp-abc", "entry0", "entry1", "entry5", "entry6"]
    assert _onednn_build.prune_cache(tmp_path / "missing", keep=current) == []

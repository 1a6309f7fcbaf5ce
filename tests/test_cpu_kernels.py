"""Multi-threaded CPU kernels (paddlefsl.ops.cpu_kernels) against Paddle's own kernels.

Each raw kernel is compared with Paddle's op on shapes that exercise remainders, one and
two threads; then the op replacements that route float32 CPU tensors to them are checked
end to end: a float32 meta-gradient (first and second order) with the kernels on equals
the one with them off (``PADDLEFSL_CPU_KERNELS=0``), and the kernels never run for what
they cannot take. Skips where the library cannot be built (see test_onednn.py).
"""

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl import ops as fsl_ops
from paddlefsl.metaopt import ANIL, MAML
from paddlefsl.models import Conv4
from paddlefsl.ops import cpu_kernels


def close(got, want, what, tol=1e-5):
    got = np.asarray(got.numpy(), np.float64)
    want = np.asarray(want.numpy(), np.float64)
    assert got.shape == want.shape, f"{what}: shape {got.shape} vs {want.shape}"
    error = np.abs(got - want).max() / max(np.abs(want).max(), 1e-30)
    assert error < tol, f"{what}: max error {error:.2e} of the max magnitude"


# Large enough for the parallel branch (>= 64k elements), odd spatial sizes, and 2-D/3-D.
SHAPES = [(3, 5, 7, 9), (75, 64, 14, 14), (6, 4, 11), (300, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_bias_relu_and_channel_sum_match_paddle(kernels, threads, shape):
    paddle.seed(1)
    x, b, dy = paddle.randn(shape), paddle.randn([shape[1]]), paddle.randn(shape)
    broadcast = [1, shape[1]] + [1] * (len(shape) - 2)
    close(kernels.channel_bias_add(x, b), x + b.reshape(broadcast), "bias add")
    axes = [0] + list(range(2, len(shape)))
    close(kernels.channel_sum(dy), dy.sum(axes), "channel sum")
    y = F.relu(x)
    close(kernels.relu(x), y, "relu")
    close(kernels.relu_backward(y, dy), paddle._C_ops.relu_grad(y, dy), "relu backward")


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_batch_norm_matches_paddle_including_running_statistics(kernels, threads, shape):
    paddle.seed(2)
    c = shape[1]
    x = paddle.randn(shape) * 3 + 1
    w, b = paddle.rand([c]) + 0.5, paddle.randn([c])
    mean0, var0 = paddle.randn([c]), paddle.rand([c]) + 0.5
    ours_mean, ours_var = mean0.clone(), var0.clone()
    ref_mean, ref_var = mean0.clone(), var0.clone()
    xr, wr, br = (t.clone() for t in (x, w, b))
    for t in (xr, wr, br):
        t.stop_gradient = False
    fmt = {2: "NC", 3: "NCL", 4: "NCHW"}[len(shape)]
    want = F.batch_norm(xr, ref_mean, ref_var, wr, br, True, 0.8, 1e-3, fmt)
    y, mean, inv_std = kernels.batch_norm_train(x, w, b, ours_mean, ours_var, 0.8, 1e-3)
    close(y, want, "batch norm output")
    close(ours_mean, ref_mean, "running mean")
    close(ours_var, ref_var, "running var")
    dy = paddle.randn(shape)
    gx, gw, gb = paddle.grad([want], [xr, wr, br], [dy])
    dx, dw, db = kernels.batch_norm_backward(x, dy, w, mean, inv_std)
    close(dx, gx, "dx", 1e-4)
    close(dw, gw, "dweight", 1e-4)
    close(db, gb, "dbias")


def test_batch_norm_against_the_closed_form_in_float64(kernels):
    """Forward and backward against numpy's float64 closed form (independent of Paddle)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((6, 5, 7, 3)) * 2 + 0.5
    dy, w, b = rng.standard_normal(x.shape), rng.random(5) + 0.5, rng.standard_normal(5)
    eps = 1e-3
    axes, keep = (0, 2, 3), (1, 5, 1, 1)
    mean, var = x.mean(axes), x.var(axes)
    inv = 1 / np.sqrt(var + eps)
    x_hat = (x - mean.reshape(keep)) * inv.reshape(keep)
    want_y = x_hat * w.reshape(keep) + b.reshape(keep)
    want_db, want_dw = dy.sum(axes), (dy * x_hat).sum(axes)
    m = x.size / 5
    want_dx = (w * inv).reshape(keep) * (
        dy - (want_db / m).reshape(keep) - x_hat * (want_dw / m).reshape(keep)
    )
    f32 = [paddle.to_tensor(a, "float32") for a in (x, dy, w, b)]
    y, got_mean, got_inv = kernels.batch_norm_train(
        f32[0], f32[2], f32[3], paddle.zeros([5]), paddle.ones([5]), 0.9, eps
    )
    dx, dw, db = kernels.batch_norm_backward(f32[0], f32[1], f32[2], got_mean, got_inv)
    for got, want, what in (
        (y, want_y, "y"),
        (got_mean, mean, "mean"),
        (got_inv, inv, "inv_std"),
        (dx, want_dx, "dx"),
        (dw, want_dw, "dweight"),
        (db, want_db, "dbias"),
    ):
        error = np.abs(got.numpy() - want).max() / np.abs(want).max()
        assert error < 2e-6, f"{what}: {error:.1e}"


def _batch_norm_backward_float64(x, w, dy, eps):
    """numpy's float64 first-order BatchNorm backward (dx, dw, db) for [N, C, S] input."""
    axes = (0, 2)
    mean = x.mean(axes, keepdims=True)
    inv = 1 / np.sqrt(x.var(axes, keepdims=True) + eps)
    x_hat = (x - mean) * inv
    db, dw = dy.sum(axes), (dy * x_hat).sum(axes)
    m = x.shape[0] * x.shape[2]
    dx = (
        w.reshape(1, -1, 1)
        * inv
        * (dy - db.reshape(1, -1, 1) / m - x_hat * dw.reshape(1, -1, 1) / m)
    )
    return dx, dw, db


@pytest.mark.parametrize("present", range(8), ids=lambda p: f"mask{p}")
def test_batch_norm_double_backward_against_float64_finite_differences(kernels, present):
    """gx, gw, gdy of sum(ddx * dx) + ddw . dw + ddb . db, any upstream gradient absent."""
    rng = np.random.default_rng(11)
    eps = 1e-3
    x = rng.standard_normal((4, 3, 5)) * 1.5 + 0.7
    dy, ddx = rng.standard_normal(x.shape), rng.standard_normal(x.shape)
    w, ddw, ddb = rng.random(3) + 0.5, rng.standard_normal(3), rng.standard_normal(3)
    ddx, ddw, ddb = (v if present & bit else None for v, bit in ((ddx, 1), (ddw, 2), (ddb, 4)))

    def objective(x_, w_, dy_):
        dx, dw, db = _batch_norm_backward_float64(x_, w_, dy_, eps)
        total = 0.0 if ddx is None else (ddx * dx).sum()
        total += 0.0 if ddw is None else ddw @ dw
        return total + (0.0 if ddb is None else ddb @ db)

    def numeric(which):
        args, h = [x, w, dy], 1e-6
        out = np.zeros_like(args[which])
        for i in np.ndindex(out.shape):
            plus, minus = [a.copy() for a in args], [a.copy() for a in args]
            plus[which][i] += h
            minus[which][i] -= h
            out[i] = (objective(*plus) - objective(*minus)) / (2 * h)
        return out

    f32 = lambda a: None if a is None else paddle.to_tensor(a, "float32")  # noqa: E731
    mean = x.mean((0, 2))
    inv = 1 / np.sqrt(x.var((0, 2)) + eps)
    got = kernels.batch_norm_double_backward(
        f32(x), f32(dy), f32(w), f32(mean), f32(inv), f32(ddx), f32(ddw), f32(ddb)
    )
    for value, which, what in zip(got, (0, 1, 2), ("gx", "gweight", "gdy")):
        want = numeric(which)
        error = np.abs(value.numpy() - want).max() / max(np.abs(want).max(), 1e-3)
        assert error < 1e-5, f"{what} (present={present}): {error:.1e}"
    if present == 0:
        assert all(not np.any(v.numpy()) for v in got)


def _second_and_third_order(seed):
    """Gradients of a network with BatchNorm to third order (create_graph twice)."""
    paddle.seed(seed)
    net = paddle.nn.Sequential(
        paddle.nn.Conv2D(3, 8, 3, bias_attr=False),
        paddle.nn.BatchNorm2D(8),
        paddle.nn.Tanh(),
        paddle.nn.Flatten(),
        paddle.nn.Linear(8 * 36, 2),
    )
    params = [p for p in net.parameters() if not p.stop_gradient]
    y = net(paddle.randn([4, 3, 8, 8]))
    first = paddle.grad((y * y).mean(), params, create_graph=True)
    second = paddle.grad(sum((g * g).sum() for g in first), params, create_graph=True)
    third = paddle.grad(sum((g * g).sum() for g in second), params)
    return [[g.numpy() for g in gs] for gs in (first, second, third)]


def test_second_and_third_order_through_batch_norm_match_the_formula(kernels, monkeypatch):
    """The fused double backward (second order) and its differentiable closed form (third
    order) against the op-by-op formula that runs with the kernels off."""
    fsl_ops.install()
    calls = []
    original = cpu_kernels.batch_norm_double_backward
    monkeypatch.setattr(
        cpu_kernels,
        "batch_norm_double_backward",
        lambda *a: calls.append(1) or original(*a),
    )
    on = _second_and_third_order(3)
    assert calls, "the fused double backward never ran"
    monkeypatch.setenv("PADDLEFSL_CPU_KERNELS", "0")
    calls.clear()
    off = _second_and_third_order(3)
    assert not calls
    for order, (got, want) in enumerate(zip(on, off), start=1):
        for i, (a, b) in enumerate(zip(got, want)):
            error = np.abs(a - b).max() / np.abs(b).max()
            assert error < 1e-5, f"order {order}, parameter {i}: {error:.1e}"


def test_batch_norm_statistics_keep_precision_far_from_zero(kernels):
    """A large mean and a tiny spread: a naive one-pass variance would lose every digit."""
    paddle.seed(5)
    x = paddle.randn([64, 4, 9, 9]).astype("float64") * 0.01 + 1000.0
    running = [paddle.zeros([4]), paddle.ones([4])]
    w, b = paddle.ones([4]), paddle.zeros([4])
    _, mean, inv_std = kernels.batch_norm_train(x.astype("float32"), w, b, *running, 0.9, 1e-8)
    x32 = x.astype("float32").astype("float64").numpy()  # what the kernel saw
    want_mean = x32.mean(axis=(0, 2, 3))
    want_std = x32.std(axis=(0, 2, 3))
    np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-6)
    np.testing.assert_allclose(1.0 / inv_std.numpy(), want_std, rtol=1e-3)


@pytest.mark.parametrize(
    "shape, kernel, stride, padding",
    [((2, 3, 8, 8), 2, 2, 0), ((75, 64, 28, 28), 2, 2, 0), ((2, 3, 9, 7), 3, 2, 1)],
    ids=str,
)
def test_max_pool_matches_paddle_indices_and_gradient(
    kernels, threads, shape, kernel, stride, padding
):
    paddle.seed(3)
    x = paddle.randn(shape)
    x = paddle.where(x > 1.0, paddle.zeros_like(x), x)  # ties: the first maximum wins
    xr = x.clone()
    xr.stop_gradient = False
    want, mask = F.max_pool2d(xr, kernel, stride, padding, return_mask=True)
    pair = [kernel, kernel]
    y, index = kernels.max_pool2d(x, pair, [stride, stride], [padding, padding])
    close(y, want, "pooled")
    assert (index.numpy() == mask.numpy()).all(), "indices differ from Paddle's"
    dy = paddle.randn(want.shape)
    (gx,) = paddle.grad([want], [xr], [dy])
    close(kernels.max_pool2d_backward(index, dy, shape[2:]), gx, "pool backward")


def _pool_gradients_to_third_order(x_np, dz_np):
    x = paddle.to_tensor(x_np)
    x.stop_gradient = False
    y = F.max_pool2d(x, 3, 2, 1)
    loss = (paddle.tanh(y) * paddle.to_tensor(dz_np)).sum()
    grads = []
    for order in (1, 2, 3):
        (g,) = paddle.grad(loss, [x], create_graph=order < 3)
        grads.append(g.numpy())
        loss = (g * g * g).sum()  # odd, so that the sign of g matters too
    return grads


def test_max_pool_recorded_backward_on_the_kernel_is_exact_to_third_order(kernels, monkeypatch):
    """Second-order MAML's inner step records the pool's backward; on the kernels it is
    one node (scatter forward, gather backward), checked against Paddle's ops."""
    fsl_ops.install()
    rng = np.random.default_rng(8)
    x = rng.standard_normal((3, 4, 9, 7)).astype(np.float32)
    dz = rng.standard_normal((3, 4, 5, 4)).astype(np.float32)
    calls = []
    original = cpu_kernels.max_pool2d_backward
    monkeypatch.setattr(
        cpu_kernels, "max_pool2d_backward", lambda *a: calls.append(1) or original(*a)
    )
    on = _pool_gradients_to_third_order(x, dz)
    assert len(calls) >= 3, "the recorded backward did not run on the kernel"
    monkeypatch.setenv("PADDLEFSL_CPU_KERNELS", "0")
    off = _pool_gradients_to_third_order(x, dz)
    for order, (a, b) in enumerate(zip(on, off), start=1):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=f"order {order}")
        assert np.abs(a).max() > 1e-3, f"order {order} is trivially zero"


def test_bad_input_names_the_problem(kernels):
    with pytest.raises(RuntimeError, match="one entry per channel"):
        kernels.channel_bias_add(paddle.zeros([2, 3, 4]), paddle.zeros([4]))
    with pytest.raises(RuntimeError, match="float32"):
        kernels.relu(paddle.zeros([4], dtype="float64"))
    with pytest.raises(RuntimeError, match="larger than the padded input"):
        kernels.max_pool2d(paddle.zeros([1, 1, 2, 2]), [3, 3], [1, 1], [0, 0])


def test_usable_only_for_float32_cpu_and_honours_the_switch(kernels, monkeypatch):
    assert kernels.usable(paddle.zeros([2]))
    assert not kernels.usable(paddle.zeros([2], dtype="float64"))
    monkeypatch.setenv("PADDLEFSL_CPU_KERNELS", "0")
    assert not kernels.usable(paddle.zeros([2]))


# ---------------------------------------------------------------- through the learners


def _meta_gradient(model_seed, learner_kind, first_order, pooling):
    paddle.seed(model_seed)
    model = Conv4(1, 5, 16, pooling, 28)
    if learner_kind == "anil":
        learner = ANIL(model.features, model.head, lr=0.4, first_order=first_order)
    else:
        learner = MAML(model, lr=0.4, first_order=first_order)
    rng = np.random.default_rng(0)
    xs = paddle.to_tensor(rng.standard_normal((10, 1, 28, 28)), "float32")
    xq = paddle.to_tensor(rng.standard_normal((15, 1, 28, 28)), "float32")
    ys = paddle.to_tensor(np.arange(10) % 5)
    yq = paddle.to_tensor(np.arange(15) % 5)
    loss_fn = paddle.nn.CrossEntropyLoss()
    clone = learner.clone()
    clone.adapt(loss_fn(clone(xs), ys))
    params = [p for p in learner.parameters() if not p.stop_gradient]
    grads = paddle.grad(loss_fn(clone(xq), yq), params, allow_unused=True)
    buffers = [b.numpy().copy() for b in model.buffers()]
    return [None if g is None else g.numpy() for g in grads], buffers


@pytest.mark.parametrize("pooling", ["max", "stride"])
@pytest.mark.parametrize(
    "learner_kind, first_order",
    [("maml", False), ("maml", True), ("anil", False)],
    ids=["maml", "fomaml", "anil"],
)
def test_meta_gradient_is_the_same_with_the_kernels_off(
    kernels, monkeypatch, learner_kind, first_order, pooling
):
    fsl_ops.install()
    calls = []
    watched = (
        "channel_bias_add",
        "relu",
        "batch_norm_train",
        "batch_norm_backward",
        "batch_norm_relu_train",
        "batch_norm_relu_backward",
        "batch_norm_relu_mask",
        "batch_norm_double_backward",
        "batch_norm_relu_double_backward",
    )
    for name in watched:
        original = getattr(cpu_kernels, name)

        def spy(*args, _original=original, _name=name):
            calls.append(_name)
            return _original(*args)

        monkeypatch.setattr(cpu_kernels, name, spy)
    on, on_buffers = _meta_gradient(0, learner_kind, first_order, pooling)
    # Conv4's conv biases are folded into the convolutions (ops.conv), so the bias add
    # kernel has nothing to do here; test_channel_bias_* cover it. Its BatchNorm and ReLU
    # are one fused layer (models.BatchNormReLU2D).
    expected = {"batch_norm_relu_train", "batch_norm_relu_backward"}
    if learner_kind == "maml" and not first_order:
        # The inner step's recorded backward is one fused node each way.
        expected |= {"batch_norm_relu_double_backward"}
    assert expected <= set(calls)
    assert not {"relu", "batch_norm_train", "batch_norm_relu_mask"} & set(calls)
    monkeypatch.setenv("PADDLEFSL_CPU_KERNELS", "0")
    calls.clear()
    off, off_buffers = _meta_gradient(0, learner_kind, first_order, pooling)
    assert not calls, f"kernels ran although switched off: {sorted(set(calls))}"
    assert len(on) == len(off)
    # One scale for all: the conv biases before BatchNorm have a meta-gradient that is
    # mathematically 0, so theirs is rounding noise on both sides.
    scale = max(np.abs(b).max() for b in off if b is not None)
    for i, (a, b) in enumerate(zip(on, off)):
        assert (a is None) == (b is None), i
        if a is not None:
            assert np.abs(a - b).max() / scale < 1e-4, f"parameter {i}"
    for a, b in zip(on_buffers, off_buffers):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_float64_and_small_tensors_stay_on_paddle(kernels, monkeypatch):
    fsl_ops.install()
    calls = []
    monkeypatch.setattr(cpu_kernels, "relu", lambda *a: calls.append("relu"))
    x = paddle.randn([4, 8, 5, 5]).astype("float64")
    x.stop_gradient = False
    F.relu(x)
    F.relu(paddle.randn([2, 3]))  # below the size where the kernels pay
    assert not calls


def test_channel_bias_with_a_frozen_bias_matches_paddle(kernels, monkeypatch):
    """The conv bias add's PyLayer when the bias needs no gradient (a frozen bias)."""
    from paddlefsl.ops import bias as bias_ops

    calls = []
    original = bias_ops._ChannelBias.apply
    monkeypatch.setattr(bias_ops._ChannelBias, "apply", lambda *a: calls.append(1) or original(*a))
    paddle.seed(6)
    conv = paddle.nn.Conv2D(16, 16, 3, padding=1)  # output 4x16x10x10: 6,400 elements
    conv.bias.stop_gradient = True
    x0, dy = paddle.randn([4, 16, 10, 10]), paddle.randn([4, 16, 10, 10])
    results = []
    for installed in (True, False):
        fsl_ops.install() if installed else fsl_ops.uninstall()
        x = x0.clone()
        x.stop_gradient = False
        results.append(paddle.grad([conv(x)], [x, conv.weight], [dy]))
    fsl_ops.install()
    assert calls, "the bias add did not take the replacement"
    close(results[0][0], results[1][0], "input gradient", 1e-4)
    close(results[0][1], results[1][1], "weight gradient", 1e-4)

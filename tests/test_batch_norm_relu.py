"""The fused BatchNorm + ReLU (ops.batch_norm_relu, models.BatchNormReLU2D).

The fused kernels against the two layers they replace: the raw kernels against the
unfused kernels run one after the other, the op's output, running statistics and
gradients (to third order, float32) against ``relu(batch_norm(...))`` in
float64 (whose derivatives test_second_order.py checks against finite differences), the
fallbacks for what the kernels cannot take, and the layer against the pair of layers.
Skips the kernel tests where the library cannot be built (see test_onednn.py).
"""

import contextlib

import numpy as np
import paddle
import paddle.nn.functional as F
import pytest

from paddlefsl import ops as fsl_ops
from paddlefsl.models import BatchNormReLU2D, Conv4
from paddlefsl.ops import batch_norm_relu, cpu_kernels


def _relative_error(got, want) -> float:
    got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
    assert got.shape == want.shape, (got.shape, want.shape)
    return float(np.abs(got - want).max() / max(np.abs(want).max(), 1e-30))


# Large enough for the parallel branch (>= 64k elements), odd spatial sizes, 2-D and 3-D.
SHAPES = [(3, 5, 7, 9), (75, 64, 7, 7), (6, 4, 11), (300, 8)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_kernels_equal_batch_norm_then_relu_kernels(kernels, threads, shape):
    paddle.seed(4)
    c = shape[1]
    x = paddle.randn(shape) * 2 + 0.5
    w, b = paddle.rand([c]) + 0.5, paddle.randn([c])
    fused_stats = [paddle.randn([c]), paddle.rand([c]) + 0.5]
    plain_stats = [t.clone() for t in fused_stats]
    z, mean, inv_std = kernels.batch_norm_relu_train(x, w, b, *fused_stats, 0.8, 1e-3)
    y, mean2, inv_std2 = kernels.batch_norm_train(x, w, b, *plain_stats, 0.8, 1e-3)
    # The same arithmetic in the same order: bitwise equal.
    np.testing.assert_array_equal(z.numpy(), kernels.relu(y).numpy())
    np.testing.assert_array_equal(mean.numpy(), mean2.numpy())
    np.testing.assert_array_equal(inv_std.numpy(), inv_std2.numpy())
    for got, want in zip(fused_stats, plain_stats):
        np.testing.assert_array_equal(got.numpy(), want.numpy())
    dz = paddle.randn(shape)
    masked = kernels.relu_backward(z, dz)
    # The mask alone (second order's recorded backward), exactly ReLU's backward.
    np.testing.assert_array_equal(
        kernels.batch_norm_relu_mask(x, dz, w, b, mean, inv_std).numpy(), masked.numpy()
    )
    fused = kernels.batch_norm_relu_backward(x, dz, w, b, mean, inv_std)
    plain = kernels.batch_norm_backward(x, masked, w, mean, inv_std)
    for got, want, what in zip(fused, plain, ("dx", "dweight", "dbias")):
        assert _relative_error(got.numpy(), want.numpy()) < 1e-6, what
    # Second order (the recorded backward's own backward), for every subset of upstream
    # gradients: mask, double backward, mask again, bit for bit.
    upstream = (paddle.randn(shape), paddle.randn([c]), paddle.randn([c]))
    for present in range(8):
        ups = [g if present >> i & 1 else None for i, g in enumerate(upstream)]
        fused = kernels.batch_norm_relu_double_backward(x, dz, w, b, mean, inv_std, *ups)
        gx, gw, gdy = kernels.batch_norm_double_backward(x, masked, w, mean, inv_std, *ups)
        gdz = kernels.batch_norm_relu_mask(x, gdy, w, b, mean, inv_std)
        for got, want, what in zip(fused, (gx, gw, gdz), ("gx", "gweight", "gdz")):
            np.testing.assert_array_equal(got.numpy(), want.numpy(), err_msg=f"{what} {present}")


def test_backward_mask_is_exactly_the_forward_one(kernels):
    """Pre-activations at and next to zero: the backward's recomputed mask must agree
    with the forward's output on every element, or a whole dz element would leak in."""
    rng = np.random.default_rng(5)
    c, n, s = 3, 64, 50
    x = rng.standard_normal((n, c, s)).astype(np.float32)
    x[:, :, :10] = x[:, :, :1]  # repeated values: ties in the normalised output
    xt, w, b = paddle.to_tensor(x), paddle.to_tensor([1.0, 0.3, 2.0]), paddle.zeros([c])
    stats = [paddle.zeros([c]), paddle.ones([c])]
    z, mean, inv_std = kernels.batch_norm_relu_train(xt, w, b, *stats, 0.9, 1e-5)
    # Shift the bias so that some pre-activations are exactly zero or one ulp either side.
    pre = (x - mean.numpy()[None, :, None]) * (w.numpy() * inv_std.numpy())[None, :, None]
    b = paddle.to_tensor(-pre[0, :, 0])
    z, mean, inv_std = kernels.batch_norm_relu_train(xt, w, b, *stats, 0.9, 1e-5)
    dz = paddle.to_tensor(rng.standard_normal(x.shape).astype(np.float32) + 5)
    masked = kernels.relu_backward(z, dz)
    np.testing.assert_array_equal(
        kernels.batch_norm_relu_mask(xt, dz, w, b, mean, inv_std).numpy(), masked.numpy()
    )
    fused = kernels.batch_norm_relu_backward(xt, dz, w, b, mean, inv_std)
    plain = kernels.batch_norm_backward(xt, masked, w, mean, inv_std)
    for got, want in zip(fused, plain):
        assert _relative_error(got.numpy(), want.numpy()) < 1e-6
    ddx = paddle.to_tensor(rng.standard_normal(x.shape).astype(np.float32))
    fused = kernels.batch_norm_relu_double_backward(xt, dz, w, b, mean, inv_std, ddx, w, b)
    gx, gw, gdy = kernels.batch_norm_double_backward(xt, masked, w, mean, inv_std, ddx, w, b)
    np.testing.assert_array_equal(fused[0].numpy(), gx.numpy())
    np.testing.assert_array_equal(fused[2].numpy(), np.where(z.numpy() > 0, gdy.numpy(), 0))
    assert (z.numpy() == 0).mean() > 0.3, "the test lost its zeros"


def _spy(monkeypatch, *names: str) -> list[str]:
    """The names of these cpu_kernels functions, in the order they get called."""
    calls: list[str] = []
    for name in names:
        original = getattr(cpu_kernels, name)
        monkeypatch.setattr(
            cpu_kernels, name, lambda *a, _o=original, _n=name: calls.append(_n) or _o(*a)
        )
    return calls


def _reference(x, stats, w, b, training, dtype="float64"):
    """relu(batch_norm(...)) as two ops, in float64 unless told otherwise."""
    # Leaves of their own (not casts of the float32 inputs, which would stay connected).
    cast = [paddle.to_tensor(t.numpy(), dtype) for t in (x, *stats, w, b)]
    for t in (cast[0], cast[3], cast[4]):
        t.stop_gradient = False
    y = F.batch_norm(cast[0], cast[1], cast[2], cast[3], cast[4], training, 0.8, 1e-3)
    # ReLU as a product with its mask: Paddle's relu has no third derivative.
    return y * (y > 0).astype(dtype), cast


def _inputs(seed, shape=(6, 4, 5, 5)):
    paddle.seed(seed)
    c = shape[1]
    x = paddle.randn(shape) * 2 + 0.3
    w, b = paddle.rand([c]) + 0.5, paddle.randn([c]) * 0.5
    for t in (x, w, b):
        t.stop_gradient = False
    return x, [paddle.randn([c]), paddle.rand([c]) + 0.5], w, b


def test_op_matches_float64_reference_to_third_order(kernels, monkeypatch):
    fsl_ops.install()  # the float64 reference's BatchNorm needs the double-differentiable op
    calls = _spy(monkeypatch, "batch_norm_relu_train", "batch_norm_relu_backward")
    x, stats, w, b = _inputs(6)
    want, (xd, mean_d, var_d, wd, bd) = _reference(x, stats, w, b, True)  # copies stats
    ref_stats = [mean_d, var_d]
    z = batch_norm_relu(x, stats[0], stats[1], w, b, training=True, momentum=0.8, epsilon=1e-3)
    assert _relative_error(z.numpy(), want.numpy()) < 1e-5
    for got, ref in zip(stats, ref_stats):
        assert _relative_error(got.numpy(), ref.numpy()) < 1e-6  # running statistics
    dz = paddle.randn(x.shape)
    ours, theirs = [x, w, b], [xd, wd, bd]
    # Three orders (MAML needs two), each of a scalar of the previous gradients.
    loss_ours = (paddle.tanh(z) * dz).sum()
    loss_theirs = (paddle.tanh(want) * dz.astype("float64")).sum()
    for order in (1, 2, 3):
        last = order == 3
        g_ours = paddle.grad(loss_ours, ours, create_graph=not last)
        g_theirs = paddle.grad(loss_theirs, theirs, create_graph=not last)
        for i, (a, c) in enumerate(zip(g_ours, g_theirs)):
            error = _relative_error(a.numpy(), c.numpy())
            assert error < 2e-4, f"order {order}, input {i}: {error:.1e}"
        loss_ours = sum((g * g).sum() for g in g_ours)
        loss_theirs = sum((g * g).sum() for g in g_theirs)
    assert set(calls) == {"batch_norm_relu_train", "batch_norm_relu_backward"}


@pytest.mark.parametrize(
    "case", ["eval", "float64", "no_affine", "channel_last", "kernels_off", "no_grad"]
)
def test_fallbacks_equal_the_two_ops(case, monkeypatch):
    fsl_ops.install()
    x, stats, w, b = _inputs(7)
    training, dtype, fmt = True, "float32", "NCHW"
    if case == "eval":
        training = False
    elif case == "float64":
        dtype = "float64"
    elif case == "no_affine":
        w = b = None
    elif case == "channel_last":
        x, fmt = x.transpose([0, 2, 3, 1]), "NHWC"
    elif case == "kernels_off":
        monkeypatch.setenv("PADDLEFSL_CPU_KERNELS", "0")
    cast = [None if t is None else t.astype(dtype) for t in (x, *stats, w, b)]
    ref_stats = [t.clone() for t in cast[1:3]]
    context = paddle.no_grad() if case == "no_grad" else contextlib.nullcontext()
    with context:
        z = batch_norm_relu(cast[0], cast[1], cast[2], cast[3], cast[4], training, 0.8, 1e-3, fmt)
        want = F.relu(F.batch_norm(cast[0], *ref_stats, cast[3], cast[4], training, 0.8, 1e-3, fmt))
    assert z.dtype == want.dtype
    assert _relative_error(z.numpy(), want.numpy()) < 1e-6
    for got, ref in zip(cast[1:3], ref_stats):
        assert _relative_error(got.numpy(), ref.numpy()) < 1e-6
    if case != "no_grad":
        # Every differentiable input at once: a paddle.grad asking for some inputs of a
        # multi-input PyLayer only is a known limitation (docs/concepts.md).
        inputs = [t for t in (cast[0], cast[3], cast[4]) if t is not None]
        dz = paddle.rand(z.shape, dtype=z.dtype) - 0.3
        got = paddle.grad(z, inputs, dz, retain_graph=True)
        ref = paddle.grad(want, inputs, dz)
        for g, h in zip(got, ref):
            assert _relative_error(g.numpy(), h.numpy()) < 1e-5


def test_layer_is_a_drop_in_for_batch_norm_then_relu():
    paddle.seed(8)
    fused = BatchNormReLU2D(4, momentum=0.7, epsilon=1e-3)
    pair = paddle.nn.Sequential(paddle.nn.BatchNorm2D(4, momentum=0.7, epsilon=1e-3))
    pair.add_sublayer("1", paddle.nn.ReLU())
    assert list(fused.state_dict()) == [k.split(".", 1)[1] for k in pair.state_dict()]
    with paddle.no_grad():
        fused.weight.set_value(paddle.rand([4]) + 0.5)
        fused.bias.set_value(paddle.randn([4]))
    pair[0].set_state_dict(fused.state_dict())
    x = paddle.randn([16, 4, 6, 6])
    for mode in ("train", "eval", "train"):
        fused.train() if mode == "train" else fused.eval()
        pair.train() if mode == "train" else pair.eval()
        assert _relative_error(fused(x).numpy(), pair(x).numpy()) < 1e-5, mode
        for a, c in zip(fused.buffers(), pair[0].buffers()):
            assert _relative_error(a.numpy(), c.numpy()) < 1e-6, mode
    with pytest.raises(ValueError, match="4D"):
        fused(paddle.randn([16, 4]))


def test_conv4_uses_the_fused_layer_and_keeps_its_state_dict_keys():
    net = Conv4(1, 5, hidden=8, pooling="max", image_size=28)
    assert sum(isinstance(m, BatchNormReLU2D) for m in net.sublayers()) == 4
    assert not any(isinstance(m, paddle.nn.ReLU) for m in net.sublayers())
    # The keys of the unfused network (sessions 1-15 checkpoints, the zoo) are unchanged.
    assert "features.0.1.weight" in net.state_dict()
    assert "features.3.1._variance" in net.state_dict()
    assert net.batch_norm_offsets()[0] == "features.0.1.bias"

"""The op replacements: same forward and first-order gradients as Paddle's native ops."""

import numpy as np
import paddle
import pytest
from paddle import nn
from paddle.nn import functional as F

from paddlefsl import ops


def _forward_and_grads(fn, inputs):
    tensors = [paddle.to_tensor(a, stop_gradient=False) for a in inputs]
    out = fn(*tensors)
    weights = paddle.to_tensor(np.random.default_rng(1).standard_normal(out.shape), out.dtype)
    grads = paddle.grad([(out * weights).sum()], tensors, allow_unused=True)
    return out.numpy(), [None if g is None else g.numpy() for g in grads]


CASES = {
    "softmax": (lambda x: F.softmax(x, axis=-1), [(6, 5)]),
    "log_softmax": (lambda x: F.log_softmax(x, axis=1), [(6, 5)]),
    "gelu": (lambda x: F.gelu(x), [(6, 5)]),
    "gelu_tanh": (lambda x: F.gelu(x, approximate=True), [(6, 5)]),
    "flatten": (lambda x: paddle.flatten(x, 1), [(2, 3, 4, 5)]),
    "cross_entropy": (lambda x: F.cross_entropy(x, paddle.to_tensor([0, 2, 1, 4, 3, 0])), [(6, 5)]),
    "cross_entropy_none": (
        lambda x: F.cross_entropy(x, paddle.to_tensor([0, 2, 1, 4, 3, 0]), reduction="none"),
        [(6, 5)],
    ),
    "layer_norm": (lambda x, w, b: F.layer_norm(x, [5], w, b), [(6, 5), (5,), (5,)]),
    "batch_norm_train": (
        lambda x, w, b: F.batch_norm(x, paddle.zeros([4]), paddle.ones([4]), w, b, training=True),
        [(6, 4, 3, 3), (4,), (4,)],
    ),
    "batch_norm_eval": (
        lambda x, w, b: F.batch_norm(
            x, paddle.full([4], 0.1), paddle.full([4], 2.0), w, b, training=False
        ),
        [(6, 4, 3, 3), (4,), (4,)],
    ),
    "max_pool2d": (lambda x: F.max_pool2d(x, 2), [(2, 3, 6, 6)]),
    "group_norm": (
        lambda x, w, b: F.group_norm(x, 2, weight=w, bias=b),
        [(3, 4, 5, 5), (4,), (4,)],
    ),
    "logsumexp_axis": (lambda x: paddle.logsumexp(x, axis=1), [(6, 5)]),
    "logsumexp_keepdim": (lambda x: paddle.logsumexp(x, axis=[0, 2], keepdim=True), [(3, 4, 5)]),
    "logsumexp_all": (lambda x: paddle.logsumexp(x), [(6, 5)]),
    "max_axis": (lambda x: paddle.max(x, axis=1), [(6, 5)]),
    "min_keepdim": (lambda x: paddle.min(x, axis=[0, 2], keepdim=True), [(3, 4, 5)]),
    "amax_all": (lambda x: paddle.amax(x), [(6, 5)]),
    "max_ties": (lambda x: paddle.max(F.relu(x - 3.0), axis=1), [(6, 5)]),
    "amax_ties": (lambda x: paddle.amax(F.relu(x - 3.0), axis=1), [(6, 5)]),
    "tensor_max_method": (lambda x: x.max(axis=-1), [(6, 5)]),
    "max_pool2d_pad": (lambda x: F.max_pool2d(x, 3, 1, 1), [(2, 3, 5, 5)]),
    "max_pool2d_mask": (lambda x: F.max_pool2d(x, 2, return_mask=True)[0], [(2, 3, 6, 6)]),
    "embedding": (
        lambda w: F.embedding(paddle.to_tensor([[1, 0, 3], [2, 2, 0]]), w, padding_idx=0),
        [(5, 4)],
    ),
    "conv2d_bias": (
        lambda x, w, b: F.conv2d(x, w, b, padding=1),
        [(4, 3, 20, 20), (8, 3, 3, 3), (8,)],
    ),
    "conv1d_bias": (lambda x, w, b: F.conv1d(x, w, b), [(64, 3, 600), (8, 3, 3), (8,)]),
    "adaptive_avg_pool2d_1": (lambda x: F.adaptive_avg_pool2d(x, 1), [(3, 4, 5, 6)]),
    "adaptive_avg_pool2d_2": (lambda x: F.adaptive_avg_pool2d(x, 2), [(3, 4, 5, 6)]),
    "avg_pool2d": (lambda x: F.avg_pool2d(x, 2), [(3, 4, 6, 6)]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_same_forward_and_gradient_as_native(name):
    fn, shapes = CASES[name]
    rng = np.random.default_rng(0)
    inputs = [rng.standard_normal(s).astype("float32") for s in shapes]
    ops.install()
    patched = _forward_and_grads(fn, inputs)
    ops.uninstall()
    try:
        native = _forward_and_grads(fn, inputs)
    finally:
        ops.install()
    np.testing.assert_allclose(patched[0], native[0], rtol=1e-5, atol=1e-6)
    for got, expected in zip(patched[1], native[1]):
        if expected is None:
            assert got is None or not np.any(got)
        else:
            # Float32 sums of thousands of terms (conv1d's weight gradient sums 38,400)
            # differ with the summation order, which depends on the CPU's kernels: an
            # element that cancels to 0.43 among entries of 200 carries ~1e-4 of error.
            atol = max(1e-5, 1e-6 * float(np.abs(expected).max()))
            np.testing.assert_allclose(got, expected, rtol=1e-4, atol=atol)


def test_dropout_masks_like_native():
    ops.install()
    x = paddle.ones([200, 50])
    x.stop_gradient = False
    out = F.dropout(x, p=0.3, training=True)
    (g,) = paddle.grad([out.sum()], [x])
    kept = out.numpy() != 0
    assert 0.6 < kept.mean() < 0.8
    np.testing.assert_allclose(out.numpy()[kept], 1 / 0.7, rtol=1e-6)
    np.testing.assert_array_equal(g.numpy() != 0, kept)


def test_install_is_idempotent_and_uninstall_restores():
    from paddle import _C_ops

    ops.install()
    ops.install()
    assert ops.is_installed()
    assert _C_ops.softmax is not ops.native("softmax")
    ops.uninstall()
    assert _C_ops.softmax is ops.native("softmax")
    assert not ops.is_installed()
    ops.install()


def test_double_grad_of_softmax_matches_closed_form(float64):
    """Hessian-vector product of sum(softmax(x)[:, 0]) w.r.t. x, against numpy."""
    ops.install()
    rng = np.random.default_rng(0)
    x0, v = rng.standard_normal((3, 4)), rng.standard_normal((3, 4))
    x = paddle.to_tensor(x0, stop_gradient=False)
    (g,) = paddle.grad([F.softmax(x)[:, 0].sum()], [x], create_graph=True)
    (hv,) = paddle.grad([(g * paddle.to_tensor(v)).sum()], [x])
    p = np.exp(x0) / np.exp(x0).sum(1, keepdims=True)
    expected = np.zeros_like(x0)
    for r in range(3):
        e0 = np.eye(4)[0]
        # d p0 / dx = p0 (e0 - p); Hessian of p0 = p0 [(e0-p)(e0-p)^T - (diag(p) - p p^T)]
        a = e0 - p[r]
        hess = p[r, 0] * (np.outer(a, a) - (np.diag(p[r]) - np.outer(p[r], p[r])))
        expected[r] = hess @ v[r]
    np.testing.assert_allclose(hv.numpy(), expected, rtol=1e-10, atol=1e-12)


def test_layers_are_unchanged_objects():
    layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0)
    before = {k: v for k, v in layer.__dict__.items() if callable(v)}
    ops.install()
    after = {k: v for k, v in layer.__dict__.items() if callable(v)}
    assert before == after


def test_static_graph_compilation_is_unaffected():
    """paddle.jit.to_static calls the same _C_ops names with PIR values: they must pass through."""
    from paddlefsl.models import Conv4

    ops.install()
    net = Conv4(1, 5, 4, "max", 28)
    net.eval()

    class Probabilities(nn.Layer):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

        def forward(self, x):
            return F.softmax(self.inner(x))

    x = paddle.randn([4, 1, 28, 28])
    eager = Probabilities(net)(x).numpy()
    static = paddle.jit.to_static(Probabilities(net), full_graph=True)
    np.testing.assert_allclose(static(x).numpy(), eager, rtol=1e-5, atol=1e-6)


@pytest.mark.xfail(
    strict=True,
    reason="Paddle PyLayers cannot see which inputs a partial paddle.grad pruned "
    "(docs/concepts.md, known limitation); remove this marker once fixed",
)
def test_input_gradient_alone_through_batchnorm():
    ops.install()
    net = nn.Sequential(nn.Conv2D(3, 8, 3), nn.BatchNorm2D(8), nn.ReLU())
    x = paddle.randn([4, 3, 8, 8])
    x.stop_gradient = False
    (gx,) = paddle.grad(net(x).square().sum(), [x])
    ops.uninstall()
    (ref,) = paddle.grad(net(x).square().sum(), [x])
    ops.install()
    np.testing.assert_allclose(gx.numpy(), ref.numpy(), rtol=1e-5, atol=1e-6)


def test_global_average_pooling_is_a_product_and_twice_differentiable(float64):
    """AdaptiveAvgPool2D(1) runs as a matrix product: same second derivatives as native."""
    rng = np.random.default_rng(5)
    x0, a0 = rng.standard_normal((3, 4, 2, 3)), rng.standard_normal((3, 4, 1, 1))
    result = {}
    for installed in (True, False):
        (ops.install if installed else ops.uninstall)()
        x = paddle.to_tensor(x0, stop_gradient=False)
        y = nn.AdaptiveAvgPool2D(1)(x)
        (gx,) = paddle.grad((y * y * paddle.to_tensor(a0)).sum(), [x], create_graph=True)
        (hx,) = paddle.grad((gx * gx).sum(), [x])
        result[installed] = (y.grad_fn.name(), y.numpy(), gx.numpy(), hx.numpy())
    ops.install()
    assert "Pool2d" not in result[True][0] and "Pool2d" in result[False][0], result
    # Closed form: y = mean(x), gx = 2 a y / hw, hx = 2 (2 a / hw)^2 y (broadcast).
    hw = x0.shape[2] * x0.shape[3]
    y = x0.mean((2, 3), keepdims=True)
    exact = [y, 2 * a0 * y / hw, 2 * (2 * a0 / hw) ** 2 * y]
    for ours, ref, closed in zip(result[True][1:], result[False][1:], exact):
        np.testing.assert_allclose(ours, np.broadcast_to(closed, ours.shape), rtol=1e-12)
        # Paddle's float64 pooling kernels round 1/hw to float32 precision.
        np.testing.assert_allclose(ours, ref, rtol=1e-6)

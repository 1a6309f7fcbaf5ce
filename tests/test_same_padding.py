"""TensorFlow-style SAME padding (models.SamePadConv2D, Conv4(padding="same"))."""

import numpy as np
import paddle
import paddle.nn.functional as F  # noqa: N812
import pytest

from paddlefsl import ops
from paddlefsl.functional import functional_call
from paddlefsl.models import Conv4, SamePadConv2D, same_padding
from paddlefsl.ops import conv as conv_ops
from paddlefsl.ops.conv_graph import NATIVE_KERNELS


@pytest.mark.parametrize(
    "size, kernel, stride, expected",
    [
        (28, 3, 2, (0, 1)),
        (14, 3, 2, (0, 1)),
        (7, 3, 2, (1, 1)),
        (4, 3, 2, (0, 1)),
        (2, 3, 2, (0, 1)),
        (84, 3, 1, (1, 1)),
        (5, 5, 1, (2, 2)),
        (9, 1, 2, (0, 0)),
    ],
)
def test_same_padding_is_tensorflows(size, kernel, stride, expected):
    before, after = same_padding(size, kernel, stride)
    assert (before, after) == expected
    # TensorFlow's rule: ceil(size / stride) outputs.
    assert (size + before + after - kernel) // stride + 1 == -(-size // stride)


@pytest.mark.parametrize("size, stride", [(28, 2), (7, 2), (12, 2), (9, 1), (6, 3)])
def test_layer_equals_paddles_same_convolution_with_gradients(size, stride):
    paddle.seed(size)
    layer = SamePadConv2D(3, 4, 3, stride=stride)
    native = paddle.nn.Conv2D(3, 4, 3, stride=stride, padding="SAME")
    assert set(layer.state_dict()) == set(native.state_dict()) == {"weight", "bias"}
    native.set_state_dict(layer.state_dict())
    x = paddle.randn([5, 3, size, size])
    outputs, grads = [], []
    for conv in (layer, native):
        xi = x.clone()
        xi.stop_gradient = False
        out = conv(xi)
        (out * out).sum().backward()
        outputs.append(out.numpy())
        grads.append([xi.grad.numpy(), conv.weight.grad.numpy(), conv.bias.grad.numpy()])
    np.testing.assert_allclose(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)
    assert outputs[0].shape[2:] == (-(-size // stride),) * 2
    for got, want in zip(grads[0], grads[1], strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_layer_refuses_a_padding_of_its_own():
    with pytest.raises(ValueError, match="computes its own padding"):
        SamePadConv2D(1, 4, 3, stride=2, padding=1)
    with pytest.raises(ValueError, match="NCHW inputs with dilation 1"):
        SamePadConv2D(1, 4, 3, dilation=2)


def test_conv4_same_padding_differs_only_with_strided_convolutions():
    x = paddle.randn([6, 1, 28, 28])
    for pooling, differs in (("stride", True), ("max", False)):
        paddle.seed(0)
        symmetric = Conv4(1, 5, hidden=8, pooling=pooling, image_size=28)
        paddle.seed(0)
        same = Conv4(1, 5, hidden=8, pooling=pooling, image_size=28, padding="same")
        assert list(same.state_dict()) == list(symmetric.state_dict())
        gap = float((same(x) - symmetric(x)).abs().max())
        assert (gap > 1e-3) if differs else (gap == 0.0), (pooling, gap)
    with pytest.raises(ValueError, match="padding must be 'symmetric' or 'same'"):
        Conv4(1, 5, padding="valid")


def test_uneven_padding_runs_on_the_fast_path_exact_to_second_order(monkeypatch):
    """The convolution takes [top, bottom, left, right] itself (no pad op), and its
    second-order gradients equal those of an explicit F.pad before the convolution."""
    ops.install()  # what every learner does: the conv ops take paddlefsl's path
    geometries = []  # of every forward the fast path runs
    native_forward_bias = NATIVE_KERNELS.forward_bias

    def recording_forward_bias(x, w, b, geo, keep=False):
        geometries.append(geo)
        return native_forward_bias(x, w, b, geo, keep)

    monkeypatch.setattr(NATIVE_KERNELS, "forward_bias", recording_forward_bias)
    monkeypatch.setattr(conv_ops, "FAST_DTYPES", (paddle.float32, paddle.float64))
    monkeypatch.setattr(conv_ops, "_FAST", [NATIVE_KERNELS])
    paddle.seed(1)
    layer = SamePadConv2D(2, 3, 3, stride=2)
    rng = np.random.default_rng(0)
    x0 = rng.standard_normal((4, 2, 8, 8))
    w0, b0 = rng.standard_normal((3, 2, 3, 3)), rng.standard_normal(3)
    results = []
    for explicit_pad in (False, True):
        x = paddle.to_tensor(x0, stop_gradient=False)
        w = paddle.to_tensor(w0, stop_gradient=False)
        b = paddle.to_tensor(b0, stop_gradient=False)
        if explicit_pad:
            y = F.conv2d(F.pad(x, [0, 0, 0, 0, 0, 1, 0, 1]), w, b, stride=2)
        else:
            y = functional_call(layer, {"weight": w, "bias": b}, x)
        gx, gw, gb = paddle.grad((y * y * y).sum(), [x, w, b], create_graph=True)
        second = paddle.grad((gw * gw).sum() + (gx * gx).sum() + (gb * gb).sum(), [x, w, b])
        results.append([t.numpy() for t in (y, gx, gw, gb, *second)])
    assert [g.paddings for g in geometries] == [(0, 1, 0, 1)]
    for got, want in zip(*results, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-10)

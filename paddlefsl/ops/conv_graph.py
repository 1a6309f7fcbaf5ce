"""Convolution as three kernels whose derivatives are each other.

A 2-D convolution ``y = F(x, w)`` is bilinear, so its whole derivative tower closes over
three kernels: the forward ``F``, the input gradient ``D(dy, w)`` and the filter gradient
``W(x, dy)``. With ``<a, b>`` the sum of elementwise products,

    <F(x, w), dy> = <x, D(dy, w)> = <w, W(x, dy)>

gives every vector-Jacobian product: ``D`` and ``W`` for ``F``; ``F(g, w)`` and
``W(g, dy)`` for ``D``; ``D(dy, h)`` and ``F(x, h)`` for ``W``. Graph nodes built on
that are exact to any order, whatever the kernels are: Paddle's own
(:data:`NATIVE_KERNELS`, also in float64, which the tests use against finite differences)
or faster ones (:mod:`paddlefsl.ops.onednn`). Nothing here depends on which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import paddle

from ._common import Held, creating_graph, tracks_grad
from ._registry import in_whole_gradient_scope, native

__all__ = ["ConvGeometry", "ConvKernels", "NATIVE_KERNELS", "conv2d", "conv2d_bias"]

Tensor = paddle.Tensor


@dataclass(frozen=True)
class ConvGeometry:
    """What the kernels need besides the tensors (NCHW, groups 1, dilation 1).

    Attributes:
        strides: (stride_h, stride_w).
        paddings: (pad_h, pad_w), the same on both sides, or (top, bottom, left, right)
            where the two sides differ (TensorFlow's ``SAME`` padding under stride).
        input_hw: (H, W) of the input; fixes the input-gradient shape under stride.
        kernel_hw: (kH, kW) of the filter.

    """

    strides: tuple[int, int]
    paddings: tuple[int, int] | tuple[int, int, int, int]
    input_hw: tuple[int, int]
    kernel_hw: tuple[int, int]


class ConvKernels(Protocol):
    """Raw (graph-free) convolution kernels: forward, input gradient, filter gradient."""

    def forward(self, x: Tensor, w: Tensor, geo: ConvGeometry, keep: bool = False) -> Tensor:
        """``conv(x, w)``.

        ``keep``: the filter gradient of this convolution (same ``x``) will be asked for,
        so the kernel may keep what it prepared of ``x`` for it.
        """
        ...

    def backward_data(self, dy: Tensor, w: Tensor, geo: ConvGeometry) -> Tensor: ...

    def backward_weight(self, x: Tensor, dy: Tensor, geo: ConvGeometry) -> Tensor: ...

    def forward_bias(
        self, x: Tensor, w: Tensor, b: Tensor, geo: ConvGeometry, keep: bool = False
    ) -> Tensor: ...

    def backward_weight_bias(
        self, x: Tensor, dy: Tensor, geo: ConvGeometry
    ) -> tuple[Tensor, Tensor]: ...


class _NativeKernels:
    """Paddle's own conv2d kernels (any dtype); the reference the fast kernels must match."""

    @staticmethod
    def _attrs(geo: ConvGeometry) -> tuple:
        return list(geo.strides), list(geo.paddings), "EXPLICIT", [1, 1], 1, "NCHW"

    def forward(self, x: Tensor, w: Tensor, geo: ConvGeometry, keep: bool = False) -> Tensor:
        with paddle.no_grad():
            return native("conv2d")(x, w, *self._attrs(geo))

    def backward_data(self, dy: Tensor, w: Tensor, geo: ConvGeometry) -> Tensor:
        # conv2d_grad needs an input only for its shape when the filter gradient is unused.
        n, c = dy.shape[0], w.shape[1]
        x = paddle.zeros([n, c, *geo.input_hw], dtype=dy.dtype)
        with paddle.no_grad():
            return native("conv2d_grad")(x, w, dy, *self._attrs(geo))[0]

    def backward_weight(self, x: Tensor, dy: Tensor, geo: ConvGeometry) -> Tensor:
        w = paddle.zeros([dy.shape[1], x.shape[1], *geo.kernel_hw], dtype=x.dtype)
        with paddle.no_grad():
            return native("conv2d_grad")(x, w, dy, *self._attrs(geo))[1]

    def forward_bias(
        self, x: Tensor, w: Tensor, b: Tensor, geo: ConvGeometry, keep: bool = False
    ) -> Tensor:
        with paddle.no_grad():
            return native("add")(self.forward(x, w, geo), b.reshape([1, -1, 1, 1]))

    def backward_weight_bias(self, x: Tensor, dy: Tensor, geo: ConvGeometry):
        with paddle.no_grad():
            return self.backward_weight(x, dy, geo), dy.sum([0, 2, 3])


NATIVE_KERNELS: ConvKernels = _NativeKernels()


def _apply(op: str, a: Tensor, b: Tensor, k: ConvKernels, geo: ConvGeometry) -> Tensor:
    """Run kernel ``op`` ("F", "D" or "W") on (a, b), recording what a gradient can flow to.

    Each graph node takes exactly one differentiable input. A ``paddle.grad`` that needs
    only some inputs (ANIL's inner step reaches a head's convolution through features it
    does not differentiate) prunes the others, and Paddle 3.3.1 rejects a PyLayer that
    returns a gradient for a pruned input without telling it which ones were pruned. With
    one input per node, a pruned input means a node that never runs. When both inputs need
    a gradient, the value comes from the node of ``a`` and the node of ``b`` adds zeros.
    """
    need_a, need_b = tracks_grad(a), tracks_grad(b)
    if not (need_a or need_b):
        return _run(op, a, b, k, geo)
    if need_a and need_b and in_whole_gradient_scope():
        return _Whole.apply(a, b, None, op, k, geo)
    if not need_b:
        return _OneInput.apply(a, Held(b), 0, op, k, geo, None)
    if not need_a:
        return _OneInput.apply(b, Held(a), 1, op, k, geo, None)
    value = _OneInput.apply(a, Held(b), 0, op, k, geo, None)
    return value + _OneInput.apply(b, Held(a), 1, op, k, geo, value.shape)


def _run(op: str, a: Tensor, b: Tensor, k: ConvKernels, geo: ConvGeometry) -> Tensor:
    if op == "F":
        return k.forward(a, b, geo)
    if op == "D":
        return k.backward_data(a, b, geo)
    return k.backward_weight(a, b, geo)


# For output = op(a, b) and an output gradient g: the kernel and argument order giving the
# gradient of a (index 0) and of b (index 1); see the module docstring.
_VJP = {
    "F": (("D", "g", "b"), ("W", "a", "g")),  # y = F(x, w):   D(g, w),  W(x, g)
    "D": (("F", "g", "b"), ("W", "g", "a")),  # dx = D(dy, w): F(g, w),  W(g, dy)
    "W": (("D", "b", "g"), ("F", "a", "g")),  # dw = W(x, dy): D(dy, g), F(x, g)
}


class _OneInput(paddle.autograd.PyLayer):
    """``op(a, b)`` as a function of one operand; the other is held as it is (live)."""

    @staticmethod
    def forward(ctx, operand, held, index, op, kernels, geo, zeros_shape, bias=None):
        # zeros_shape: this node only carries the gradient of its operand; the value
        # (of that shape) comes from the other operand's node. bias (held, forward "F"
        # only): a per-channel bias added by the kernel; it does not change either
        # operand's gradient.
        ctx.held, ctx.index, ctx.op, ctx.kernels, ctx.geo = held, index, op, kernels, geo
        if zeros_shape is not None:
            return paddle.zeros(zeros_shape, dtype=operand.dtype)
        a, b = (operand, held.value) if index == 0 else (held.value, operand)
        if bias is not None:  # a forward convolution; the filter's node keeps x for W
            return kernels.forward_bias(a, b, bias.value, geo, keep=index == 1)
        if op == "F":
            return kernels.forward(a, b, geo, keep=index == 1)
        return _run(op, a, b, kernels, geo)

    @staticmethod
    def backward(ctx, g):
        # The gradient of one operand needs only g and the other operand, which is live:
        # under create_graph the result stays connected to it (the cross derivatives).
        kernel, first, second = _VJP[ctx.op][ctx.index]
        named = {"g": g, "a": ctx.held.value, "b": ctx.held.value}
        return _apply(kernel, named[first], named[second], ctx.kernels, ctx.geo)


class _Whole(paddle.autograd.PyLayer):
    """``op(a, b)`` (+ a bias for "F") as one node of all its inputs.

    Only inside :func:`paddlefsl.ops.whole_gradient_scope`, where no ``paddle.grad`` asks
    for some of the inputs but not the others. It saves what the one-input-per-node form
    needs to join its nodes (a zero-filled output and an add) and a node, on every call.
    ``bias`` is None or the bias of a forward convolution.
    """

    @staticmethod
    def forward(ctx, a, b, bias, op, kernels, geo):
        ctx.a, ctx.b, ctx.has_bias, ctx.op = a, b, bias is not None, op
        ctx.kernels, ctx.geo = kernels, geo
        # A forward convolution's backward always computes the filter gradient W(x, g).
        if bias is not None:
            return kernels.forward_bias(a, b, bias, geo, keep=True)
        if op == "F":
            return kernels.forward(a, b, geo, keep=True)
        return _run(op, a, b, kernels, geo)

    @staticmethod
    def backward(ctx, g):
        k, geo = ctx.kernels, ctx.geo
        named = {"g": g, "a": ctx.a, "b": ctx.b}
        if creating_graph():  # stay differentiable: the cross derivatives need a and b live
            grads = [_apply(kern, named[i], named[j], k, geo) for kern, i, j in _VJP[ctx.op]]
            return (*grads, g.sum([0, 2, 3])) if ctx.has_bias else tuple(grads)
        (kern_a, i, j), (kern_b, m, n) = _VJP[ctx.op]
        grad_a = _run(kern_a, named[i], named[j], k, geo)
        if ctx.has_bias:  # op "F": the filter and bias gradients from one kernel call
            return (grad_a, *k.backward_weight_bias(ctx.a, g, geo))
        return grad_a, _run(kern_b, named[m], named[n], k, geo)


def conv2d(x: Tensor, w: Tensor, geo: ConvGeometry, kernels: ConvKernels) -> Tensor:
    """A 2-D convolution of ``x`` by ``w`` on ``kernels``, differentiable to any order.

    Args:
        x: Input, [N, C, H, W].
        w: Filter, [O, C, kH, kW].
        geo: Strides, paddings and the spatial sizes.
        kernels: The raw kernels to run.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops.conv_graph import NATIVE_KERNELS, ConvGeometry, conv2d
        >>> x, w = paddle.randn([2, 3, 8, 8]), paddle.randn([4, 3, 3, 3])
        >>> geo = ConvGeometry((1, 1), (1, 1), (8, 8), (3, 3))
        >>> conv2d(x, w, geo, NATIVE_KERNELS).shape
        paddle.Size([2, 4, 8, 8])

    """
    return _apply("F", x, w, kernels, geo)


class _FilterAndBias(paddle.autograd.PyLayer):
    """``conv(x, w) + b`` as a function of the filter and the bias; ``x`` is held (live).

    Two differentiable inputs, so a ``paddle.grad`` that asks for one of them but not the
    other fails (as for any such PyLayer; see the known limitation in the docs). The
    filter gradient and the bias gradient come from one kernel call.
    """

    @staticmethod
    def forward(ctx, w, b, held_x, kernels, geo, zeros_shape):
        ctx.held_x, ctx.kernels, ctx.geo = held_x, kernels, geo
        if zeros_shape is not None:
            return paddle.zeros(zeros_shape, dtype=w.dtype)
        return kernels.forward_bias(held_x.value, w, b, geo, keep=True)

    @staticmethod
    def backward(ctx, g):
        x = ctx.held_x.value
        if creating_graph():  # stay differentiable
            return _apply("W", x, g, ctx.kernels, ctx.geo), g.sum([0, 2, 3])
        return ctx.kernels.backward_weight_bias(x, g, ctx.geo)


def conv2d_bias(
    x: Tensor, w: Tensor, b: Tensor, geo: ConvGeometry, kernels: ConvKernels
) -> Tensor | None:
    """``conv2d(x, w) + b`` with the bias folded into the kernels, exact to any order.

    A Conv2D layer's bias add costs a full pass over the output forward and another
    backward; the fused kernels add the bias as they write the output and sum its
    gradient as they read ``dy``.

    Args:
        x: Input, [N, C, H, W].
        w: Filter, [O, C, kH, kW].
        b: Bias, [O].
        geo: Strides, paddings and the spatial sizes.
        kernels: The raw kernels to run.

    Returns:
        The output, or None when only one of ``w`` and ``b`` needs a gradient (a frozen
        bias or filter): the caller then adds the bias itself.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops.conv_graph import NATIVE_KERNELS, ConvGeometry, conv2d_bias
        >>> x, w, b = paddle.randn([2, 3, 8, 8]), paddle.randn([4, 3, 3, 3]), paddle.ones([4])
        >>> geo = ConvGeometry((1, 1), (1, 1), (8, 8), (3, 3))
        >>> y = conv2d_bias(x, w, b, geo, NATIVE_KERNELS)
        >>> bool(paddle.allclose(y, conv2d(x, w, geo, NATIVE_KERNELS) + 1.0))
        True

    """
    need_x, need_w, need_b = tracks_grad(x), tracks_grad(w), tracks_grad(b)
    if need_w != need_b:
        return None
    if not (need_x or need_w):
        return kernels.forward_bias(x, w, b, geo)
    if not need_w:
        return _OneInput.apply(x, Held(w), 0, "F", kernels, geo, None, Held(b))
    if not need_x:
        return _FilterAndBias.apply(w, b, Held(x), kernels, geo, None)
    if in_whole_gradient_scope():
        return _Whole.apply(x, w, b, "F", kernels, geo)
    value = _OneInput.apply(x, Held(w), 0, "F", kernels, geo, None, Held(b))
    return value + _FilterAndBias.apply(w, b, Held(x), kernels, geo, value.shape)

"""Convolution as three kernels whose derivatives are each other.

A 2-D convolution ``y = F(x, w)`` is bilinear, so its whole derivative tower closes over
three kernels: the forward ``F``, the input gradient ``D(dy, w)`` and the filter gradient
``W(x, dy)``. With ``<a, b>`` the sum of elementwise products,

    <F(x, w), dy> = <x, D(dy, w)> = <w, W(x, dy)>

gives every vector-Jacobian product: ``D`` and ``W`` for ``F``; ``F(g, w)`` and
``W(g, dy)`` for ``D``; ``D(dy, h)`` and ``F(x, h)`` for ``W``. One PyLayer built on
that is exact to any order, whatever the kernels are: Paddle's own
(:data:`NATIVE_KERNELS`, also in float64, which the tests use against finite differences)
or faster ones (:mod:`paddlefsl.ops.onednn`). Nothing here depends on which.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import paddle

from ._common import only_required, requires, tracks_grad
from ._registry import native

__all__ = ["ConvGeometry", "ConvKernels", "NATIVE_KERNELS", "conv2d"]

Tensor = paddle.Tensor


@dataclass(frozen=True)
class ConvGeometry:
    """What the kernels need besides the tensors (NCHW, groups 1, dilation 1).

    Attributes:
        strides: (stride_h, stride_w).
        paddings: (pad_h, pad_w), the same on both sides.
        input_hw: (H, W) of the input; fixes the input-gradient shape under stride.
        kernel_hw: (kH, kW) of the filter.

    """

    strides: tuple[int, int]
    paddings: tuple[int, int]
    input_hw: tuple[int, int]
    kernel_hw: tuple[int, int]


class ConvKernels(Protocol):
    """Raw (graph-free) convolution kernels: forward, input gradient, filter gradient."""

    def forward(self, x: Tensor, w: Tensor, geo: ConvGeometry) -> Tensor: ...

    def backward_data(self, dy: Tensor, w: Tensor, geo: ConvGeometry) -> Tensor: ...

    def backward_weight(self, x: Tensor, dy: Tensor, geo: ConvGeometry) -> Tensor: ...


class _NativeKernels:
    """Paddle's own conv2d kernels (any dtype); the reference the fast kernels must match."""

    @staticmethod
    def _attrs(geo: ConvGeometry) -> tuple:
        return list(geo.strides), list(geo.paddings), "EXPLICIT", [1, 1], 1, "NCHW"

    def forward(self, x: Tensor, w: Tensor, geo: ConvGeometry) -> Tensor:
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


NATIVE_KERNELS: ConvKernels = _NativeKernels()


def _apply(op: str, a: Tensor, b: Tensor, k: ConvKernels, geo: ConvGeometry) -> Tensor:
    """Run kernel ``op`` ("F", "D" or "W") on (a, b); recorded only if a gradient can flow."""
    if tracks_grad(a, b):
        return _Bilinear.apply(a, b, op, k, geo)
    return _run(op, a, b, k, geo)


def _run(op: str, a: Tensor, b: Tensor, k: ConvKernels, geo: ConvGeometry) -> Tensor:
    if op == "F":
        return k.forward(a, b, geo)
    if op == "D":
        return k.backward_data(a, b, geo)
    return k.backward_weight(a, b, geo)


# For output = op(a, b) and an output gradient g: the kernels and argument orders giving
# the gradients of a and b (see the module docstring).
_VJP = {
    "F": (("D", "g", "b"), ("W", "a", "g")),  # y = F(x, w):   D(g, w),  W(x, g)
    "D": (("F", "g", "b"), ("W", "g", "a")),  # dx = D(dy, w): F(g, w),  W(g, dy)
    "W": (("D", "b", "g"), ("F", "a", "g")),  # dw = W(x, dy): D(dy, g), F(x, g)
}


class _Bilinear(paddle.autograd.PyLayer):
    """One of the three kernels as a graph node; its backward is the other two."""

    @staticmethod
    def forward(ctx, a, b, op, kernels, geo):
        ctx.save_for_backward(a, b)
        ctx.op, ctx.kernels, ctx.geo, ctx.required = op, kernels, geo, requires(a, b)
        return _run(op, a, b, kernels, geo)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensor()
        named = {"a": a, "b": b, "g": g}
        grads = [
            _apply(op, named[first], named[second], ctx.kernels, ctx.geo) if needed else None
            for (op, first, second), needed in zip(_VJP[ctx.op], ctx.required)
        ]
        return only_required(grads, ctx.required)


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

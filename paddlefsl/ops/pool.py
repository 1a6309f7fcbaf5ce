"""Max pooling: Paddle's pool grad-grad kernel supports average pooling only.

Float32 CPU pooling in floor mode runs on the multi-threaded kernels of
:mod:`paddlefsl.ops.cpu_kernels` (same indices as Paddle's ``max_pool2d_with_index``).
Global average pooling (``AdaptiveAvgPool2D(1)``, the end of many few-shot backbones) runs
as a matrix product with a constant column: the same values, and forward plus backward
several times faster than Paddle's adaptive pooling kernels on CPU.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle

from . import cpu_kernels
from ._common import Held, creating_graph, plain_call, tracks_grad
from ._registry import native, register


def _pair(value) -> list[int] | None:
    values = [int(value)] * 2 if isinstance(value, int) else [int(v) for v in value]
    return values if len(values) == 2 else None


def _kernel_geometry(x: paddle.Tensor, attrs: tuple) -> tuple | None:
    """``(kernel, strides, paddings)`` when :mod:`cpu_kernels` can pool ``x``, else None."""
    kernel_size, strides, paddings, global_pooling, adaptive, ceil_mode = attrs
    if global_pooling or adaptive or ceil_mode or x.ndim != 4:
        return None
    kernel, stride = _pair(kernel_size), _pair(strides)
    pads = [int(p) for p in ([paddings] * 2 if isinstance(paddings, int) else paddings)]
    if len(pads) == 4 and pads[0] == pads[1] and pads[2] == pads[3]:
        pads = [pads[0], pads[2]]  # [top, bottom, left, right], symmetric
    if kernel is None or stride is None or len(pads) != 2:
        return None
    if min(stride) < 1 or min(pads) < 0 or pads[0] >= kernel[0] or pads[1] >= kernel[1]:
        return None
    if x.shape[2] + 2 * pads[0] < kernel[0] or x.shape[3] + 2 * pads[1] < kernel[1]:
        return None
    return (kernel, stride, pads) if cpu_kernels.usable(x) else None


def _scatter_to_input(
    input_shape: list[int], index: paddle.Tensor, dy: paddle.Tensor
) -> paddle.Tensor:
    """Route each pooled gradient back to the input element that was the window's max.

    Differentiable in ``dy``; the routing itself is piecewise constant in the input.
    """
    n, c, h, w = input_shape
    flat_index = index.reshape([n, c, -1]).astype("int64")
    flat_dy = dy.reshape([n, c, -1])
    zeros = paddle.zeros([n, c, h * w], dtype=dy.dtype)
    dx = paddle.put_along_axis(zeros, flat_index, flat_dy, axis=2, reduce="add")
    return dx.reshape([n, c, h, w])


class _RouteToMaxima(paddle.autograd.PyLayer):
    """The max pool's backward on the CPU kernel, as a differentiable op.

    Recorded by a backward pass that creates a graph (MAML's inner step). Linear in
    ``dy``: its own backward gathers the upstream gradient at the window maxima, with
    ``take_along_axis``, which Paddle differentiates to any order.
    """

    @staticmethod
    def forward(ctx, dy, held: Held):
        index, input_shape = held.value
        ctx.held = held
        return cpu_kernels.max_pool2d_backward(index, dy, input_shape[2:])

    @staticmethod
    def backward(ctx, g):
        index, input_shape = ctx.held.value
        n, c = input_shape[:2]
        flat_index = index.reshape([n, c, -1]).astype("int64")
        pooled = paddle.take_along_axis(g.reshape([n, c, -1]), flat_index, axis=2)
        return pooled.reshape(index.shape)


class _MaxPool2dWithIndex(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, attrs, holder: list):
        geometry = _kernel_geometry(x, attrs)
        if geometry is not None:
            out, index = cpu_kernels.max_pool2d(x, *geometry)
        else:
            out, index = native("max_pool2d_with_index")(x, *attrs)
        holder.append(index)
        ctx.attrs = attrs
        ctx.fast = geometry is not None
        ctx.input_shape = list(x.shape)
        # The kernels' backward needs only the indices and the input's shape: not keeping
        # x frees it as soon as its other readers are done (a ReLU output, often the
        # largest activation of a Conv4).
        if ctx.fast:
            ctx.save_for_backward(index)
        else:
            ctx.save_for_backward(index, x)
        return out

    @staticmethod
    def backward(ctx, dy):
        index, *x = ctx.saved_tensor()
        if ctx.fast and cpu_kernels.usable(dy):
            if creating_graph():
                return _RouteToMaxima.apply(dy, Held((index, ctx.input_shape)))
            return cpu_kernels.max_pool2d_backward(index, dy, ctx.input_shape[2:])
        if creating_graph() or ctx.fast:
            return _scatter_to_input(ctx.input_shape, index, dy)
        return native("max_pool2d_with_index_grad")(x[0], index, dy, *ctx.attrs)


def _global_average(x, kernel_size, data_format, pooling_type, global_pooling, adaptive) -> bool:
    """Whether a pool2d call averages each channel of an NCHW tensor over all of space."""
    if pooling_type != "avg" or data_format != "NCHW" or x.ndim != 4:
        return False
    if not global_pooling:
        try:
            if not (adaptive and _pair(kernel_size) == [1, 1]):
                return False
        except (TypeError, ValueError):  # an unusual size argument: leave it to Paddle
            return False
    return all(d > 0 for d in x.shape) and paddle.in_dynamic_mode()


@register("pool2d")
def _pool2d(native_fn: Callable) -> Callable:
    def pool2d(
        x,
        kernel_size,
        strides,
        paddings,
        ceil_mode,
        exclusive,
        data_format,
        pooling_type,
        global_pooling,
        adaptive,
        padding_algorithm,
        *args,
        **kwargs,
    ):
        attrs = (
            kernel_size,
            strides,
            paddings,
            ceil_mode,
            exclusive,
            data_format,
            pooling_type,
            global_pooling,
            adaptive,
            padding_algorithm,
        )
        supported = (
            pooling_type == "max"
            and data_format == "NCHW"
            and padding_algorithm in ("EXPLICIT", "VALID")
            and not (padding_algorithm == "VALID" and any(paddings))
        )
        if not plain_call(args, kwargs) or not tracks_grad(x):
            return native_fn(x, *attrs, *args, **kwargs)
        if _global_average(x, kernel_size, data_format, pooling_type, global_pooling, adaptive):
            n, c, h, w = x.shape
            column = paddle.full([h * w, 1], 1.0 / (h * w), dtype=x.dtype)
            return paddle.matmul(x.reshape([n * c, h * w]), column).reshape([n, c, 1, 1])
        if not supported:
            return native_fn(x, *attrs, *args, **kwargs)
        # The indexed kernel is also the faster one on CPU: its backward is a scatter, while
        # pool2d_grad searches every window again.
        index_attrs = (kernel_size, strides, paddings, global_pooling, adaptive, ceil_mode)
        out, _ = _max_pool2d_with_index_impl(x, index_attrs)
        return out

    return pool2d


def _max_pool2d_with_index_impl(x, attrs):
    holder: list = []
    out = _MaxPool2dWithIndex.apply(x, attrs, holder)
    return out, holder[0]


@register("max_pool2d_with_index")
def _max_pool2d_with_index(native_fn: Callable) -> Callable:
    def max_pool2d_with_index(
        x,
        kernel_size,
        strides,
        paddings,
        global_pooling,
        adaptive,
        ceil_mode=False,
        *args,
        **kwargs,
    ):
        attrs = (kernel_size, strides, paddings, global_pooling, adaptive, ceil_mode)
        if not plain_call(args, kwargs) or not tracks_grad(x):
            return native_fn(x, *attrs, *args, **kwargs)
        return _max_pool2d_with_index_impl(x, attrs)

    return max_pool2d_with_index

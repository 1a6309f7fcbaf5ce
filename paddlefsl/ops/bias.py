"""Per-channel bias addition (``conv(x) + b.reshape([1, C, 1, 1])``).

Paddle's CPU kernel for this broadcast is about 8x slower than a plain elementwise add,
and its backward slower still; every conv layer with a bias pays it twice per pass. For
float32 on the CPU the multi-threaded kernels of :mod:`paddlefsl.ops.cpu_kernels` do the
add and the bias gradient (a per-channel sum); otherwise the same sum is computed as
``[N*C, H*W] + [N*C, 1]``, Paddle's fast broadcast path. The backward is an identity plus
one reduction, exact under ``create_graph`` too.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import paddle

from . import cpu_kernels
from ._common import creating_graph, only_required, reduce_axes, requires, tracks_grad
from ._registry import register

# Below this many elements the PyLayer's Python overhead costs more than it saves: with
# the CPU kernels (forward + backward, measured: 5,120 elements 90 us against Paddle's 132,
# 1,280 elements 109 against 65), else with the [N*C, H*W] layout.
_MIN_ELEMENTS = 1 << 15
_MIN_KERNEL_ELEMENTS = 1 << 12


def _is_channel_bias(x, y) -> bool:
    if not (isinstance(x, paddle.Tensor) and isinstance(y, paddle.Tensor)):
        return False
    if x.ndim < 3 or y.ndim != x.ndim or x.dtype != y.dtype:
        return False
    y_shape, x_shape = y.shape, x.shape
    if y_shape[1] != x_shape[1] or any(d != 1 for i, d in enumerate(y_shape) if i != 1):
        return False
    size = math.prod(x_shape)
    return size >= _MIN_ELEMENTS or (size >= _MIN_KERNEL_ELEMENTS and cpu_kernels.usable(x, y))


def _fast_forward(x: paddle.Tensor, y: paddle.Tensor) -> paddle.Tensor:
    if cpu_kernels.usable(x, y):
        return cpu_kernels.channel_bias_add(x, y)
    n, c = x.shape[0], x.shape[1]
    rows = y.reshape([1, c]).tile([n, 1]).reshape([n * c, 1])
    return paddle.add(x.reshape([n * c, -1]), rows).reshape(x.shape)


class _ChannelBias(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, y):
        ctx.required = requires(x, y)
        ctx.axes = reduce_axes(x.ndim, 1)
        ctx.bias_shape = y.shape
        return _fast_forward(x, y)

    @staticmethod
    def backward(ctx, dy):
        if not ctx.required[1]:
            dbias = None  # a bias that needs no gradient: skip the reduction
        elif not creating_graph() and cpu_kernels.usable(dy):
            dbias = cpu_kernels.channel_sum(dy).reshape(ctx.bias_shape)
        else:
            dbias = dy.sum(ctx.axes, keepdim=True)
        return only_required((dy, dbias), ctx.required)


@register("add")
def _add(native_fn: Callable) -> Callable:
    def add(x, y, *args, **kwargs):
        if args or kwargs or not _is_channel_bias(x, y):
            return native_fn(x, y, *args, **kwargs)
        if not tracks_grad(x, y):
            return _fast_forward(x, y)
        return _ChannelBias.apply(x, y)

    return add

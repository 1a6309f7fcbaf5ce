"""conv2d (and conv1d, which runs on it) and depthwise_conv2d.

Native ``conv2d`` has a double grad, but when the conv's input does not require grad
Paddle drops the path from the filter gradient back to the filter, so a second-order
meta-gradient through a first conv layer comes out silently wrong. Connecting the input
to the filter's graph with an exact zero restores the path. ``depthwise_conv2d`` has no
double-grad kernel at all; the generic conv2d kernel computes the same thing with one.
Both rewrites are applied only inside :func:`second_order_scope`, so ordinary forward
passes keep Paddle's fastest kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle

from ._common import tracks_grad
from ._registry import in_second_order_scope, native, register


def _connect_input(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    if x.stop_gradient and not weight.stop_gradient:
        # Exactly zero, but makes ``x`` part of the graph that is differentiated.
        return x + weight.reshape([-1])[0] * 0.0
    return x


@register("conv2d")
def _conv2d(native_fn: Callable) -> Callable:
    def conv2d(x, weight, *args, **kwargs):
        if in_second_order_scope() and tracks_grad(weight):
            x = _connect_input(x, weight)
        return native_fn(x, weight, *args, **kwargs)

    return conv2d


@register("depthwise_conv2d")
def _depthwise_conv2d(native_fn: Callable) -> Callable:
    def depthwise_conv2d(
        x,
        weight,
        strides,
        paddings,
        padding_algorithm,
        groups,
        dilations,
        data_format,
        *args,
        **kwargs,
    ):
        if args or kwargs or not (in_second_order_scope() and tracks_grad(x, weight)):
            return native_fn(
                x,
                weight,
                strides,
                paddings,
                padding_algorithm,
                groups,
                dilations,
                data_format,
                *args,
                **kwargs,
            )
        x = _connect_input(x, weight)
        return native("conv2d")(
            x, weight, strides, paddings, padding_algorithm, dilations, groups, data_format
        )

    return depthwise_conv2d

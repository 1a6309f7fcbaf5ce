"""softmax, log_softmax and gelu (Paddle has no double grad for them), and a faster relu."""

from __future__ import annotations

import math
from collections.abc import Callable

import paddle

from . import cpu_kernels
from ._common import creating_graph, numel, plain_call, tracks_grad
from ._registry import in_second_order_scope, native, register

# Below this many elements Paddle's relu is faster than the kernel (its call overhead, and
# the PyLayer's when tracked). Forward + backward, 2 threads, idle machine, us, Paddle
# against ours: [5, 64, 14, 14] 75 / 126, [75, 64, 4, 4] 95 / 134, [75, 64, 7, 7] 386 / 381,
# [75, 64, 14, 14] 1528 / 1152, [300, 64, 14, 14] 6008 / 4061.
_MIN_FAST_ELEMENTS = 1 << 18


class _Softmax(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, axis):
        y = native("softmax")(x, axis)
        # Outputs are kept detached: saving a PyLayer's own output leaks the graph.
        ctx.save_for_backward(x)
        ctx.out = y.detach()
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,), y = ctx.saved_tensor(), ctx.out
        if not creating_graph():
            return native("softmax_grad")(y, dy, ctx.axis)
        # Recompute y from x so that the recorded backward depends on x.
        y = native("softmax")(x, ctx.axis)
        return y * (dy - (dy * y).sum(ctx.axis, keepdim=True))


class _LogSoftmax(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, axis):
        y = native("log_softmax")(x, axis)
        ctx.save_for_backward(x)
        ctx.out = y.detach()
        ctx.axis = axis
        return y

    @staticmethod
    def backward(ctx, dy):
        (x,), y = ctx.saved_tensor(), ctx.out
        if not creating_graph():
            return native("log_softmax_grad")(y, dy, ctx.axis)
        p = native("softmax")(x, ctx.axis)
        return dy - p * dy.sum(ctx.axis, keepdim=True)


_SQRT_2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_CUBIC = 0.044715


def gelu_derivative(x: paddle.Tensor, approximate: bool) -> paddle.Tensor:
    """D gelu(x) / dx as a differentiable expression (exact erf form or the tanh form)."""
    if approximate:
        inner = _SQRT_2_OVER_PI * (x + _GELU_CUBIC * x * x * x)
        t = paddle.tanh(inner)
        d_inner = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_CUBIC * x * x)
        return 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * d_inner
    cdf = 0.5 * (1.0 + paddle.erf(x / _SQRT_2))
    return cdf + x * _INV_SQRT_2PI * paddle.exp(-0.5 * x * x)


class _Gelu(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, approximate):
        ctx.save_for_backward(x)
        ctx.approximate = approximate
        return native("gelu")(x, approximate)

    @staticmethod
    def backward(ctx, dy):
        (x,) = ctx.saved_tensor()
        if not creating_graph():
            return native("gelu_grad")(x, dy, ctx.approximate)
        return dy * gelu_derivative(x, ctx.approximate)


class _Relu(paddle.autograd.PyLayer):
    """ReLU on the multi-threaded kernels; the mask comes from the output."""

    @staticmethod
    def forward(ctx, x):
        y = cpu_kernels.relu(x)
        ctx.out = y.detach()
        return y

    @staticmethod
    def backward(ctx, dy):
        if creating_graph() or not cpu_kernels.usable(dy):
            # Paddle's relu_grad is linear in dy and has a double grad of its own.
            return native("relu_grad")(ctx.out, dy)
        return cpu_kernels.relu_backward(ctx.out, dy)


@register("relu")
def _relu(native_fn: Callable) -> Callable:
    def relu(x, *args, **kwargs):
        fast = (
            isinstance(x, paddle.Tensor)  # not a static-graph value
            # Paddle's relu has a double grad; under second order a PyLayer here keeps
            # about 10% more memory alive (W2 MAML: 1180 MiB against 1064) for 7% of time.
            and not in_second_order_scope()
            and plain_call(args, kwargs)
            and numel(x) >= _MIN_FAST_ELEMENTS
            and cpu_kernels.usable(x)
        )
        if not fast:
            return native_fn(x, *args, **kwargs)
        if not tracks_grad(x):
            return cpu_kernels.relu(x)
        return _Relu.apply(x)

    return relu


@register("softmax")
def _softmax(native_fn: Callable) -> Callable:
    def softmax(x, axis, *args, **kwargs):
        if not plain_call(args, kwargs) or not tracks_grad(x):
            return native_fn(x, axis, *args, **kwargs)
        return _Softmax.apply(x, axis)

    return softmax


@register("log_softmax")
def _log_softmax(native_fn: Callable) -> Callable:
    def log_softmax(x, axis, *args, **kwargs):
        if not plain_call(args, kwargs) or not tracks_grad(x):
            return native_fn(x, axis, *args, **kwargs)
        return _LogSoftmax.apply(x, axis)

    return log_softmax


@register("gelu")
def _gelu(native_fn: Callable) -> Callable:
    def gelu(x, approximate=False, *args, **kwargs):
        if not plain_call(args, kwargs) or not tracks_grad(x):
            return native_fn(x, approximate, *args, **kwargs)
        return _Gelu.apply(x, bool(approximate))

    return gelu


def _reduced_axes(x, args: tuple, kwargs: dict) -> list[int]:
    """The axes a ``logsumexp(x, axis, keepdim, reduce_all)`` call reduces."""
    axis = kwargs.get("axis", kwargs.get("dim", args[0] if args else None))
    reduce_all = kwargs.get("reduce_all", args[2] if len(args) > 2 else False)
    if reduce_all or axis is None or (isinstance(axis, list | tuple) and len(axis) == 0):
        return list(range(x.ndim))
    axes = [axis] if isinstance(axis, int) else list(axis)
    return sorted(a % x.ndim for a in axes)


class _LogSumExp(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, args, kwargs):
        out = native("logsumexp")(x, *args, **kwargs)
        ctx.save_for_backward(x)
        ctx.out = out.detach()
        ctx.call = (args, kwargs)
        ctx.axes = _reduced_axes(x, args, kwargs)
        return out

    @staticmethod
    def backward(ctx, dy):
        (x,), out = ctx.saved_tensor(), ctx.out
        keep = [1 if a in ctx.axes else d for a, d in enumerate(x.shape)]
        if creating_graph():
            # Recompute from x so that the recorded backward depends on it.
            args, kwargs = ctx.call
            out = native("logsumexp")(x, *args, **kwargs)
        return dy.reshape(keep) * paddle.exp(x - out.reshape(keep))


@register("logsumexp")
def _logsumexp(native_fn: Callable) -> Callable:
    def logsumexp(x, *args, **kwargs):
        if kwargs.get("name") is not None:
            kwargs = {k: v for k, v in kwargs.items() if k != "name"}
        if not tracks_grad(x) or len(args) > 3:
            return native_fn(x, *args, **kwargs)
        return _LogSumExp.apply(x, tuple(args), dict(kwargs))

    return logsumexp

"""batch_norm and layer_norm.

Paddle has no double grad for ``layer_norm``. For ``batch_norm`` it has one, but it is
quadratic in the batch on CPU and, for an input that does not require grad, silently
wrong; it also raises in eval mode. The replacement keeps a fused forward (which also
updates the running statistics in place) and a fused backward for first-order passes, and
differentiates a closed-form backward when the graph is being created. For float32 on the
CPU kernels that recorded backward is itself one node (``_BatchNormBackward``) whose
backward is a single fused double-backward kernel: second-order MAML then neither runs
nor keeps alive the dozen intermediate tensors of the formula.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import paddle

from . import cpu_kernels
from ._common import (
    Held,
    creating_graph,
    numel,
    only_required,
    plain_call,
    requires,
    tracks_grad,
)
from ._registry import native, register

_CHANNEL_LAST = ("NHWC", "NLC", "NDHWC")


@dataclass
class _BatchNormCall:
    """Everything the backward needs that is not a differentiable input."""

    running_mean: paddle.Tensor
    running_var: paddle.Tensor
    is_test: bool
    momentum: float
    epsilon: float
    data_format: str
    use_global_stats: bool
    trainable_statistics: bool
    outputs: tuple = ()

    @property
    def global_stats(self) -> bool:
        # Mirrors the CPU kernel: test mode uses the running statistics unless
        # ``trainable_statistics`` asks for batch statistics.
        return (self.is_test and not self.trainable_statistics) or self.use_global_stats

    def fast(self, x, weight, bias) -> bool:
        """Whether :mod:`cpu_kernels` can run it.

        That is: training with batch statistics, channel first, an affine weight and bias,
        everything float32 on the CPU.
        """
        return (
            not self.is_test
            and not self.use_global_stats
            and self.data_format not in _CHANNEL_LAST
            and x.ndim >= 2
            and weight is not None
            and bias is not None
            and cpu_kernels.usable(x, weight, bias, self.running_mean, self.running_var)
        )


def _normalized_grads(x, dy, weight, axes, epsilon, mean=None, var=None):
    """Closed-form (differentiable) gradients of ``w * (x - mean) / sqrt(var + eps) + b``.

    With ``mean``/``var`` given they are constants (running statistics); otherwise they
    are the statistics of ``x`` over ``axes``, and their dependence on ``x`` is included.
    """
    batch_stats = mean is None
    if batch_stats:
        mean = x.mean(axes, keepdim=True)
        centered = x - mean
        var = (centered * centered).mean(axes, keepdim=True)
    else:
        centered = x - mean
    inv_std = paddle.rsqrt(var + epsilon)
    x_hat = centered * inv_std
    g = dy if weight is None else dy * weight
    if batch_stats:
        dx = inv_std * (
            g - g.mean(axes, keepdim=True) - x_hat * (g * x_hat).mean(axes, keepdim=True)
        )
    else:
        dx = g * inv_std
    return dx, dy * x_hat


def _per_row(vector: paddle.Tensor, batch: int) -> paddle.Tensor:
    """A per-channel vector [C] as a [N*C, 1] column, matching ``x.reshape([N*C, -1])``."""
    return vector.reshape([1, -1]).tile([batch, 1]).reshape([-1, 1])


def _batch_stats_grads(x, dy, weight, call):
    """Differentiable gradients of train-mode batch norm for channel-first input.

    Written for speed under ``create_graph``: the normalised input comes from the fused
    native kernel (whose first-order gradient is all the recorded graph needs), the
    per-channel statistics from sums, and every per-channel broadcast runs on the
    ``[N*C, spatial]`` view, where Paddle's CPU kernels are fast.
    """
    n, c = x.shape[0], x.shape[1]
    axes = [0] + list(range(2, x.ndim))
    count = numel(x) // c
    scratch_mean, scratch_var = paddle.zeros([c], x.dtype), paddle.ones([c], x.dtype)
    x_hat = native("batch_norm")(
        x,
        scratch_mean,
        scratch_var,
        None,
        None,
        False,
        0.0,
        call.epsilon,
        call.data_format,
        False,
        False,
    )[0]
    mean = x.sum(axes) / count
    var = (x * x).sum(axes) / count - mean * mean
    inv_std = paddle.rsqrt(var + call.epsilon)
    dy_x_hat = dy * x_hat
    dw = dy_x_hat.sum(axes)
    db = dy.sum(axes)
    scale = inv_std if weight is None else weight * inv_std
    rows = [n * c, -1]
    dx = _per_row(scale, n) * (
        dy.reshape(rows) - _per_row(db / count, n) - x_hat.reshape(rows) * _per_row(dw / count, n)
    )
    return dx.reshape(x.shape), dw, db


@dataclass
class _SavedStatistics:
    """Batch mean and 1/sqrt(var + eps) of a forward pass (constants for autograd)."""

    mean: paddle.Tensor
    inv_std: paddle.Tensor
    epsilon: float


def _double_backward_formula(x, dy, weight, ddx, ddweight, ddbias, epsilon):
    """Differentiable ``(gx, gweight, gdy)`` of the CPU kernel ``batch_norm_double_backward``.

    The same closed form, with the statistics recomputed from ``x`` so that their
    dependence on it is recorded too. Only for a backward pass that is itself recorded
    (third-order derivatives).
    """
    axes = [0] + list(range(2, x.ndim))
    per_channel = [1, -1] + [1] * (x.ndim - 2)
    count = numel(x) // x.shape[1]
    mean = x.mean(axes, keepdim=True)
    centered = x - mean
    r = paddle.rsqrt((centered * centered).mean(axes, keepdim=True) + epsilon)
    x_hat = centered * r
    w = weight.reshape(per_channel)
    mean_dy = dy.mean(axes, keepdim=True)
    s = (dy * x_hat).sum(axes, keepdim=True)
    q = dy - mean_dy - x_hat * s / count
    zero = paddle.zeros_like(s)
    dw_up = zero if ddweight is None else ddweight.reshape(per_channel)
    db_up = zero if ddbias is None else ddbias.reshape(per_channel)
    gx = dw_up * r * q
    gdy = db_up + dw_up * x_hat
    gw = zero
    if ddx is not None:
        big_c = ddx.sum(axes, keepdim=True)
        big_b = (ddx * x_hat).sum(axes, keepdim=True)
        big_a = (ddx * dy).sum(axes, keepdim=True) - big_c * mean_dy
        gw = r * (big_a - s * big_b / count)
        gx = gx + w * r * r / count * (
            s * big_c / count - big_a * x_hat - s * ddx + 2 * s * big_b / count * x_hat - big_b * q
        )
        gdy = gdy + w * r * (ddx - big_c / count - x_hat * big_b / count)
    return gx, gw.reshape([-1]), gdy


class _BatchNormBackward(paddle.autograd.PyLayer):
    """The first-order backward of the CPU-kernel BatchNorm, as a differentiable op.

    Recorded when a backward pass through BatchNorm creates a graph (MAML's inner step):
    its own backward is then one fused kernel instead of Paddle differentiating a
    closed form of a dozen ops, and keeps only its inputs alive.
    """

    @staticmethod
    def forward(ctx, x, dy, weight, saved: _SavedStatistics):
        ctx.saved = saved
        ctx.required = requires(x, dy, weight)
        ctx.save_for_backward(x, dy, weight)
        return cpu_kernels.batch_norm_backward(x, dy, weight, saved.mean, saved.inv_std)

    @staticmethod
    def backward(ctx, ddx, ddweight, ddbias):
        x, dy, weight = ctx.saved_tensor()
        saved: _SavedStatistics = ctx.saved
        if creating_graph():
            gx, gw, gdy = _double_backward_formula(
                x, dy, weight, ddx, ddweight, ddbias, saved.epsilon
            )
        else:
            gx, gw, gdy = cpu_kernels.batch_norm_double_backward(
                x, dy, weight, saved.mean, saved.inv_std, ddx, ddweight, ddbias
            )
        return only_required((gx, gdy, gw), ctx.required)


class _BatchNorm(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, call: _BatchNormCall):
        ctx.call = call
        ctx.required = requires(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.statistics = None
        if call.fast(x, weight, bias):
            y, mean, inv_std = cpu_kernels.batch_norm_train(
                x, weight, bias, call.running_mean, call.running_var, call.momentum, call.epsilon
            )
            # Paddle's outputs: y, the running statistics (updated in place), the batch
            # mean and 1/sqrt(var + eps), and a reserve space (unused on CPU).
            call.outputs = (None, call.running_mean, call.running_var, mean, inv_std, None)
            ctx.statistics = (mean, inv_std)
            return y
        outputs = native("batch_norm")(
            x,
            call.running_mean,
            call.running_var,
            weight,
            bias,
            call.is_test,
            call.momentum,
            call.epsilon,
            call.data_format,
            call.use_global_stats,
            call.trainable_statistics,
        )
        # Not outputs[0]: that tensor becomes this PyLayer's output, and keeping it here leaks.
        call.outputs = (None, *outputs[1:])
        return outputs[0]

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensor()
        call: _BatchNormCall = ctx.call
        if not creating_graph() and ctx.statistics is not None:
            # The forward ran on the CPU kernels; dy has its dtype and place.
            grads = cpu_kernels.batch_norm_backward(x, dy, weight, *ctx.statistics)
            return only_required(grads, ctx.required)
        if not creating_graph():
            _, mean_out, var_out, saved_mean, saved_var, reserve = call.outputs
            grads = native("batch_norm_grad")(
                x,
                weight,
                bias,
                mean_out,
                var_out,
                saved_mean,
                saved_var,
                reserve,
                dy,
                call.momentum,
                call.epsilon,
                call.data_format,
                call.is_test,
                call.use_global_stats,
                call.trainable_statistics,
            )
            return only_required(tuple(grads), ctx.required)
        if ctx.statistics is not None:
            saved = _SavedStatistics(*ctx.statistics, call.epsilon)
            dx, dw, db = _BatchNormBackward.apply(x, dy, weight, saved)
            return only_required((dx, dw, db), ctx.required)
        if not call.global_stats and call.data_format not in _CHANNEL_LAST and x.ndim >= 2:
            return only_required(_batch_stats_grads(x, dy, weight, call), ctx.required)
        channel = x.ndim - 1 if call.data_format in _CHANNEL_LAST else 1
        # Work on [C, everything else]: Paddle's CPU kernels broadcast a [C, 1] operand
        # along the last axis quickly, but a [1, C, 1, 1] one several times slower.
        to_rows = [channel] + [a for a in range(x.ndim) if a != channel]
        back = [to_rows.index(a) for a in range(x.ndim)]
        rows_shape = [x.shape[a] for a in to_rows]
        x_rows = x.transpose(to_rows).reshape([x.shape[channel], -1])
        dy_rows = dy.transpose(to_rows).reshape([x.shape[channel], -1])
        w = None if weight is None else weight.reshape([-1, 1])
        if call.global_stats:
            mean = call.running_mean.reshape([-1, 1])
            var = call.running_var.reshape([-1, 1])
            dx, dw_map = _normalized_grads(x_rows, dy_rows, w, [1], call.epsilon, mean, var)
        else:
            dx, dw_map = _normalized_grads(x_rows, dy_rows, w, [1], call.epsilon)
        dx = dx.reshape(rows_shape).transpose(back)
        dw = dw_map.sum(1)
        db = dy_rows.sum(1)
        return only_required((dx, dw, db), ctx.required)


@register("batch_norm")
def _batch_norm(native_fn: Callable) -> Callable:
    def batch_norm(
        x,
        running_mean,
        running_var,
        weight,
        bias,
        is_test,
        momentum,
        epsilon,
        data_format,
        use_global_stats,
        trainable_statistics,
        *args,
        **kwargs,
    ):
        plain = (
            x,
            running_mean,
            running_var,
            weight,
            bias,
            is_test,
            momentum,
            epsilon,
            data_format,
            use_global_stats,
            trainable_statistics,
        )
        if not plain_call(args, kwargs) or not tracks_grad(x, weight, bias):
            return native_fn(*plain, *args, **kwargs)
        call = _BatchNormCall(
            running_mean,
            running_var,
            bool(is_test),
            momentum,
            epsilon,
            data_format,
            bool(use_global_stats),
            bool(trainable_statistics),
        )
        out = _BatchNorm.apply(x, weight, bias, call)
        return (out, *call.outputs[1:])

    return batch_norm


class _LayerNorm(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, epsilon, begin_norm_axis):
        ctx.save_for_backward(x, weight, bias)
        ctx.attrs = (epsilon, begin_norm_axis)
        ctx.required = requires(x, weight, bias)
        return native("layer_norm")(x, weight, bias, epsilon, begin_norm_axis)

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensor()
        epsilon, begin = ctx.attrs
        axes = list(range(begin, x.ndim))
        lead = list(range(begin))
        norm_shape = x.shape[begin:]
        w = None if weight is None else weight.reshape(norm_shape)
        # One closed form serves both cases: under create_graph it is recorded and
        # differentiable; otherwise it is just the gradient.
        dx, dw_map = _normalized_grads(x, dy, w, axes, epsilon)
        dw = None if weight is None else dw_map.sum(lead).reshape(weight.shape)
        db = None if bias is None else dy.sum(lead).reshape(bias.shape)
        return only_required((dx, dw, db), ctx.required)


@register("layer_norm")
def _layer_norm(native_fn: Callable) -> Callable:
    def layer_norm(x, weight, bias, epsilon, begin_norm_axis, *args: Any, **kwargs: Any):
        if not plain_call(args, kwargs) or not tracks_grad(x, weight, bias):
            return native_fn(x, weight, bias, epsilon, begin_norm_axis, *args, **kwargs)
        return _LayerNorm.apply(x, weight, bias, epsilon, begin_norm_axis)

    return layer_norm


class _GroupNorm(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, weight, bias, epsilon, groups):
        ctx.save_for_backward(x, weight, bias)
        ctx.attrs = (epsilon, groups)
        ctx.required = requires(x, weight, bias)
        return native("group_norm")(x, weight, bias, epsilon, groups, "NCHW")

    @staticmethod
    def backward(ctx, dy):
        x, weight, bias = ctx.saved_tensor()
        epsilon, groups = ctx.attrs
        n, c = x.shape[0], x.shape[1]
        channel_shape = [1, c] + [1] * (x.ndim - 2)
        g = dy if weight is None else dy * weight.reshape(channel_shape)
        grouped = [n, groups, -1]
        # Always the closed form: it is also right where Paddle's kernel is not (its input
        # gradient without a weight is wrong on CPU in 3.3.1).
        dx, _ = _normalized_grads(x.reshape(grouped), g.reshape(grouped), None, [2], epsilon)
        sums = [0] + list(range(2, x.ndim))
        dw = db = None
        if weight is not None:
            mean = x.reshape(grouped).mean(2, keepdim=True)
            centered = x.reshape(grouped) - mean
            inv_std = paddle.rsqrt((centered * centered).mean(2, keepdim=True) + epsilon)
            x_hat = (centered * inv_std).reshape(x.shape)
            dw = (dy * x_hat).sum(sums)
        if bias is not None:
            db = dy.sum(sums)
        return only_required((dx.reshape(x.shape), dw, db), ctx.required)


@register("group_norm")
def _group_norm(native_fn: Callable) -> Callable:
    def group_norm(x, weight, bias, epsilon, groups, data_format, *args, **kwargs):
        if (
            not plain_call(args, kwargs)
            or data_format != "NCHW"
            or not tracks_grad(x, weight, bias)
        ):
            return native_fn(x, weight, bias, epsilon, groups, data_format, *args, **kwargs)
        return _GroupNorm.apply(x, weight, bias, epsilon, groups)

    return group_norm


@dataclass
class _RunningStatistics:
    """The buffers and settings of a train-mode forward.

    Kept out of the PyLayer's inputs, where every tensor would need a gradient slot.
    """

    mean: paddle.Tensor
    var: paddle.Tensor
    momentum: float
    epsilon: float


class _BatchNormReLU(paddle.autograd.PyLayer):
    """Train-mode BatchNorm then ReLU on the CPU kernels: one node, one pass each way.

    The first-order backward recomputes the ReLU's mask from ``x`` inside the BatchNorm
    backward kernel. A recorded backward is the one node :class:`_BatchNormReluBackward`
    (the mask is a constant there: ReLU's second derivative is zero).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, running: _RunningStatistics):
        z, mean, inv_std = cpu_kernels.batch_norm_relu_train(
            x, weight, bias, running.mean, running.var, running.momentum, running.epsilon
        )
        ctx.required = requires(x, weight, bias)
        ctx.save_for_backward(x, weight, bias)
        ctx.saved = _SavedStatistics(mean, inv_std, running.epsilon)
        return z

    @staticmethod
    def backward(ctx, dz):
        x, weight, bias = ctx.saved_tensor()
        saved: _SavedStatistics = ctx.saved
        if not creating_graph():
            grads = cpu_kernels.batch_norm_relu_backward(
                x, dz, weight, bias, saved.mean, saved.inv_std
            )
            return only_required(grads, ctx.required)
        grads = _BatchNormReluBackward.apply(x, dz, weight, Held((bias, saved)))
        return only_required(grads, ctx.required)


class _BatchNormReluBackward(paddle.autograd.PyLayer):
    """The first-order backward of the fused BatchNorm + ReLU, as a differentiable op.

    Recorded by a backward pass that creates a graph (MAML's inner step), as
    :class:`_BatchNormBackward` is for BatchNorm alone: one kernel forward
    (``batch_norm_relu_backward``) and one backward (``batch_norm_relu_double_backward``),
    each recomputing the ReLU's mask from ``x`` (alive anyway) instead of keeping it: a
    kept mask, or the output, held about 200 MiB more on W2 MAML. The bias only shapes the
    mask, a constant almost everywhere, so it is not an input. The backward of a backward
    that is itself recorded (third order) composes :class:`_ReluMask` with the closed form.
    """

    @staticmethod
    def forward(ctx, x, dz, weight, held: Held):
        bias, saved = held.value
        ctx.held = held
        ctx.required = requires(x, dz, weight)
        ctx.save_for_backward(x, dz, weight)
        return cpu_kernels.batch_norm_relu_backward(x, dz, weight, bias, saved.mean, saved.inv_std)

    @staticmethod
    def backward(ctx, ddx, ddweight, ddbias):
        x, dz, weight = ctx.saved_tensor()
        bias, saved = ctx.held.value
        if creating_graph():
            mask = Held((x, weight, bias, saved))
            gx, gw, gdy = _double_backward_formula(
                x, _ReluMask.apply(dz, mask), weight, ddx, ddweight, ddbias, saved.epsilon
            )
            gdz = _ReluMask.apply(gdy, mask)
        else:
            gx, gw, gdz = cpu_kernels.batch_norm_relu_double_backward(
                x, dz, weight, bias, saved.mean, saved.inv_std, ddx, ddweight, ddbias
            )
        return only_required((gx, gdz, gw), ctx.required)


class _ReluMask(paddle.autograd.PyLayer):
    """``dz`` masked by the fused forward's ReLU, the mask recomputed from ``x``.

    Linear in ``dz`` with a constant mask, so its backward is itself, and stays
    differentiable to any order.
    """

    @staticmethod
    def forward(ctx, dz, held: Held):
        ctx.held = held
        x, weight, bias, saved = held.value
        return cpu_kernels.batch_norm_relu_mask(x, dz, weight, bias, saved.mean, saved.inv_std)

    @staticmethod
    def backward(ctx, g):
        if creating_graph():
            return _ReluMask.apply(g, ctx.held)
        x, weight, bias, saved = ctx.held.value
        return cpu_kernels.batch_norm_relu_mask(x, g, weight, bias, saved.mean, saved.inv_std)


_CHANNEL_FIRST = ("NCHW", "NC", "NCL", "NCDHW")


def batch_norm_relu(
    x: paddle.Tensor,
    running_mean: paddle.Tensor,
    running_var: paddle.Tensor,
    weight: paddle.Tensor | None,
    bias: paddle.Tensor | None,
    training: bool = False,
    momentum: float = 0.9,
    epsilon: float = 1e-5,
    data_format: str = "NCHW",
    use_global_stats: bool | None = None,
) -> paddle.Tensor:
    """``relu(batch_norm(x, ...))``, fused on the CPU kernels when it can be.

    The arguments are those of :func:`paddle.nn.functional.batch_norm`. Training with
    batch statistics, channel-first float32 on the CPU kernels, with a weight and a bias:
    one kernel normalises and rectifies, and one computes the three gradients (ReLU's
    mask included), saving two passes over the activations and two op dispatches each
    way. Exact to any order: a recorded backward (``create_graph=True``, second-order
    MAML's inner step) is differentiable again. Anything else runs
    ``paddle.nn.functional.relu(paddle.nn.functional.batch_norm(...))``.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import batch_norm_relu
        >>> x = paddle.randn([8, 3, 5, 5])
        >>> mean, var = paddle.zeros([3]), paddle.ones([3])
        >>> w, b = paddle.ones([3]), paddle.zeros([3])
        >>> z = batch_norm_relu(x, mean, var, w, b, training=True)
        >>> ref = paddle.nn.functional.relu(paddle.nn.functional.batch_norm(
        ...     x, paddle.zeros([3]), paddle.ones([3]), w, b, training=True))
        >>> bool(paddle.allclose(z, ref, atol=1e-5))
        True
        >>> bool(paddle.allclose(mean, 0.1 * x.mean([0, 2, 3]), atol=1e-6))  # updated in place
        True

    """
    fused = (
        training
        and not use_global_stats
        and data_format in _CHANNEL_FIRST
        and isinstance(x, paddle.Tensor)
        and x.ndim >= 2
        and weight is not None
        and bias is not None
        and cpu_kernels.usable(x, weight, bias, running_mean, running_var)
    )
    if not fused:
        functional = paddle.nn.functional
        y = functional.batch_norm(
            x,
            running_mean,
            running_var,
            weight,
            bias,
            training=training,
            momentum=momentum,
            epsilon=epsilon,
            data_format=data_format,
            use_global_stats=use_global_stats,
        )
        return functional.relu(y)
    if not tracks_grad(x, weight, bias):
        return cpu_kernels.batch_norm_relu_train(
            x, weight, bias, running_mean, running_var, momentum, epsilon
        )[0]
    running = _RunningStatistics(running_mean, running_var, momentum, epsilon)
    return _BatchNormReLU.apply(x, weight, bias, running)

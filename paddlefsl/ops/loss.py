"""cross_entropy_with_softmax (every built-in classification loss) and mean_all.

Paddle has no double grad for the fused softmax + cross-entropy kernel, nor for
``mean_all``, the reduction behind ``reduction="mean"`` in its loss functions.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle

from ._common import creating_graph, only_required, plain_call, requires, tracks_grad
from ._registry import native, register


def _one_hot_along(label: paddle.Tensor, num_classes: int, axis: int, dtype) -> paddle.Tensor:
    """One-hot of integer labels that hold a size-1 class axis at ``axis``."""
    hot = paddle.nn.functional.one_hot(label.squeeze(axis).astype("int64"), num_classes)
    hot = hot.astype(dtype)
    return hot if axis == label.ndim - 1 else paddle.moveaxis(hot, -1, axis)


class _SoftmaxCrossEntropy(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, logits, label, soft_label, use_softmax, stable, ignore_index, axis):
        softmax, loss = native("cross_entropy_with_softmax")(
            logits, label, soft_label, use_softmax, stable, ignore_index, axis
        )
        ctx.save_for_backward(logits, label)
        # Outputs are kept detached: saving a PyLayer's own output leaks the graph.
        ctx.softmax = softmax.detach()
        # An unused output (the softmax, usually) then gets None, not a zero-filled grad.
        ctx.set_materialize_grads(False)
        ctx.attrs = (soft_label, use_softmax, stable, ignore_index, axis)
        ctx.required = requires(logits, label)
        return softmax, loss

    @staticmethod
    def backward(ctx, d_softmax, d_loss):
        logits, label = ctx.saved_tensor()
        softmax = ctx.softmax
        soft_label, use_softmax, stable, ignore_index, axis = ctx.attrs
        axis = axis % logits.ndim
        if d_loss is None:
            d_loss = paddle.zeros_like(softmax.sum(axis, keepdim=True))
        if not creating_graph():
            d_logits = native("cross_entropy_with_softmax_grad")(
                label, softmax, d_loss, soft_label, use_softmax, stable, ignore_index, axis
            )
            d_label = None
            if d_softmax is not None and use_softmax:
                d_logits = d_logits + softmax * (
                    d_softmax - (d_softmax * softmax).sum(axis, keepdim=True)
                )
            if ctx.required[1] and soft_label:
                log_p = paddle.log(softmax) if use_softmax else paddle.log(logits)
                d_label = -d_loss * log_p
            return only_required((d_logits, d_label), ctx.required)
        if use_softmax and not soft_label and d_softmax is None:
            # Hard labels, softmax output unused (the usual case): one node of the logits
            # times the loss gradient, see _HardLabelGrad.
            held = _HardLabelHeld(label, softmax, stable, ignore_index, axis)
            d_logits = _HardLabelGrad.apply(logits, held) * d_loss
            return only_required((d_logits, None), ctx.required)
        # Differentiable form: recompute the probabilities from the logits.
        n_classes = logits.shape[axis]
        if soft_label:
            target = label
            weight = d_loss
        else:
            target = _one_hot_along(label, n_classes, axis, logits.dtype)
            valid = (label != ignore_index).astype(logits.dtype)
            weight = d_loss * valid
        wants_label = bool(ctx.required[1] and soft_label)
        if use_softmax:
            p = native("softmax")(logits, axis)
            # A one-hot target sums to 1 along the class axis (times the 0/1 valid weight).
            total = target.sum(axis, keepdim=True) if soft_label else 1.0
            d_logits = (p * total - target) * weight
            if d_softmax is not None:
                d_logits = d_logits + p * (d_softmax - (d_softmax * p).sum(axis, keepdim=True))
            log_p = native("log_softmax")(logits, axis) if wants_label else None
        else:
            # ``logits`` already hold probabilities: loss = -sum(target * log p).
            d_logits = -target / logits * weight
            if d_softmax is not None:
                d_logits = d_logits + d_softmax
            log_p = paddle.log(logits) if wants_label else None
        d_label = -weight * log_p if wants_label else None
        return only_required((d_logits, d_label), ctx.required)


class _HardLabelHeld:
    """What the recorded hard-label backward holds besides its inputs (constants)."""

    __slots__ = ("label", "softmax", "stable", "ignore_index", "axis")

    def __init__(self, label, softmax, stable, ignore_index, axis):
        self.label, self.softmax = label, softmax
        self.stable, self.ignore_index, self.axis = stable, ignore_index, axis


class _HardLabelGrad(paddle.autograd.PyLayer):
    """``(softmax(logits) - onehot) * valid`` as one recorded node of the logits.

    The recorded backward of hard-label cross-entropy is this times the loss gradient (a
    native multiply, which carries the loss gradient's own derivative). Its value is
    Paddle's fused gradient kernel, and its backward (the softmax Jacobian) runs only when
    the recorded graph is differentiated, instead of a dozen recorded ops each time. Under
    a graph-creating backward of this node (third order) the probabilities are recomputed
    with the double-differentiable softmax, so every order stays exact.
    """

    @staticmethod
    def forward(ctx, logits, held: _HardLabelHeld):
        ctx.logits, ctx.held = logits, held
        shape = list(held.label.shape)
        return native("cross_entropy_with_softmax_grad")(
            held.label,
            held.softmax,
            paddle.ones(shape, held.softmax.dtype),
            False,
            True,
            held.stable,
            held.ignore_index,
            held.axis,
        )

    @staticmethod
    def backward(ctx, g):
        held: _HardLabelHeld = ctx.held
        g_valid = g * (held.label != held.ignore_index).astype(g.dtype)
        p = (
            paddle.nn.functional.softmax(ctx.logits, held.axis)
            if creating_graph()
            else held.softmax
        )
        return p * (g_valid - (p * g_valid).sum(held.axis, keepdim=True))


@register("cross_entropy_with_softmax")
def _cross_entropy_with_softmax(native_fn: Callable) -> Callable:
    def cross_entropy_with_softmax(
        logits, label, soft_label, use_softmax, stable, ignore_index, axis, *args, **kwargs
    ):
        if not plain_call(args, kwargs) or not tracks_grad(logits, label):
            return native_fn(
                logits, label, soft_label, use_softmax, stable, ignore_index, axis, *args, **kwargs
            )
        return _SoftmaxCrossEntropy.apply(
            logits, label, soft_label, use_softmax, stable, ignore_index, axis
        )

    return cross_entropy_with_softmax


@register("mean_all")
def _mean_all(native_fn: Callable) -> Callable:
    def mean_all(x, *args, **kwargs):
        if not plain_call(args, kwargs) or not tracks_grad(x):
            return native_fn(x, *args, **kwargs)
        # ``mean`` over all axes has a double grad and runs the same reduction kernel.
        return native("mean")(x, [], False)

    return mean_all

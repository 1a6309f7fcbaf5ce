"""Activations and norms without a double gradient, rebuilt from ops that have one.

Paddle 3.3.1 raises on the second derivative of PReLU, SELU, ReLU6, Hardtanh,
Hardsigmoid, Hardswish, Swish, Mish, LogSigmoid, Softsign, Tanhshrink, Softshrink,
ThresholdedReLU, RReLU, of ``p_norm`` (behind ``F.normalize``, the cosine classifiers of
few-shot heads) and of ``dot`` and ``mv`` (spectral-norm hooks). Inside
:func:`~paddlefsl.ops.second_order_scope` each of them is computed from ``relu``,
``sigmoid``, ``tanh``, ``exp``, ``log``, products and sums, which Paddle can
differentiate any number of times; the piecewise-linear ones become sums of shifted ReLUs
(``relu6(x) = relu(x) - relu(x - 6)``), exact everywhere but at the kinks. Outside the
scope the native kernels run, so forward values and first-order passes are untouched;
``logsigmoid``, ``p_norm``, ``dot`` and ``mv``, which losses use outside any learner call
too, take their formulas there as well while a second-order clone is alive. RReLU's
random slopes are read back from the native kernel's output, so its random stream is
Paddle's.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle
import paddle.nn.functional as F

from ._common import softplus, tracks_grad
from ._registry import in_second_order_scope, native, register, second_order_clone_alive

Tensor = paddle.Tensor


def _clip(x: Tensor, low: float, high: float) -> Tensor:
    return low + F.relu(x - low) - F.relu(x - high)


def _prelu(x: Tensor, weight: Tensor, data_format: str, mode: str) -> Tensor:
    if mode == "channel":
        shape = [1] * x.ndim
        shape[1 if data_format == "NCHW" else x.ndim - 1] = -1
        weight = weight.reshape(shape)
    return F.relu(x) - weight * F.relu(-x)


def _p_norm(x: Tensor, porder: float, axis: int, epsilon: float, keepdim: bool, asvector: bool):
    if asvector:
        x, axis = x.reshape([-1]), 0
    total = (x * x if porder == 2.0 else paddle.pow(paddle.abs(x), porder)).sum(
        axis, keepdim=keepdim
    )
    # The root of a zero sum has an infinite slope: take it of 1 there and mask it, so
    # that a zero vector (a padding row) gets a zero gradient, as Paddle's kernel gives.
    nonzero = (total > 0).astype(x.dtype)
    safe = total + (1.0 - nonzero)
    root = paddle.sqrt(safe) if porder == 2.0 else paddle.pow(safe, 1.0 / porder)
    return root * nonzero


def _rrelu(x: Tensor, lower: float, upper: float, is_test: bool) -> Tensor:
    # The kernel draws the negative slopes; read them back from its output, so the
    # random stream and the values are Paddle's: out = x * slope, slope = 1 where x >= 0.
    with paddle.no_grad():
        out = native("rrelu")(x, lower, upper, is_test)
        nonzero = x != 0
        slope = paddle.where(nonzero, out / paddle.where(nonzero, x, paddle.ones_like(x)), 1.0)
    return x * slope


# name -> formula(x, *attributes); the attributes are those of the _C_ops entry point.
_FORMULAS: dict[str, Callable[..., Tensor]] = {
    "relu6": lambda x: _clip(x, 0.0, 6.0),
    "hardtanh": lambda x, low, high: _clip(x, low, high),
    "hardsigmoid": lambda x, slope, offset: _clip(x * slope + offset, 0.0, 1.0),
    "hardswish": lambda x: x * _clip(x + 3.0, 0.0, 6.0) / 6.0,
    "swish": lambda x: x * F.sigmoid(x),
    # Paddle's mish switches its softplus to x above `threshold` (20): exp(-20) apart.
    "mish": lambda x, threshold: x * paddle.tanh(softplus(x)),
    "logsigmoid": lambda x: -softplus(-x),
    "softsign": lambda x: x / (1.0 + paddle.abs(x)),
    "tanh_shrink": lambda x: x - paddle.tanh(x),
    "softshrink": lambda x, threshold: F.relu(x - threshold) - F.relu(-x - threshold),
    "selu": lambda x, scale, alpha: scale * (F.relu(x) + alpha * (paddle.exp(-F.relu(-x)) - 1.0)),
    "thresholded_relu": lambda x, threshold, value: (
        x * (x > threshold).astype(x.dtype) + value * (x <= threshold).astype(x.dtype)
    ),
    "prelu": _prelu,
    "p_norm": _p_norm,
    "rrelu": _rrelu,
    "dot": lambda x, y: (x * y).sum(-1),
    "mv": lambda x, vec: paddle.matmul(x, vec),
}


# Attribute values the formulas cover; others go to the native op.
_COVERED: dict[str, Callable[[tuple], bool]] = {
    # F.prelu passes "all" or "channel"; "element" comes only from direct _C_ops calls.
    "prelu": lambda args: args[-1] in ("all", "channel"),
    # p = inf, -inf and 0 are maxima, minima and counts, not power sums; p < 1 has an
    # infinite slope at 0.
    "p_norm": lambda args: isinstance(args[0], (int, float)) and 1 <= args[0] < float("inf"),
}


# Also used by built-in losses (MultiLabelSoftMarginLoss, TripletMarginLoss) or hooks,
# which run outside the learner's call and so outside second-order scope: these take
# their formula also while a second-order clone is alive (ops.second_order_clone_alive).
_UNSCOPED = frozenset({"logsigmoid", "p_norm", "dot", "mv"})


def _make(name: str, formula: Callable[..., Tensor]) -> None:
    @register(name)
    def factory(native_fn: Callable) -> Callable:
        def op(x, *args, **kwargs):
            tensors = [a for a in args if isinstance(a, Tensor)]
            if (
                kwargs
                or not (
                    in_second_order_scope() or (name in _UNSCOPED and second_order_clone_alive())
                )
                or not isinstance(x, Tensor)
                or not tracks_grad(x, *tensors)
                or (name in _COVERED and not _COVERED[name](args))
            ):
                return native_fn(x, *args, **kwargs)
            return formula(x, *args)

        return op


for _name, _formula in _FORMULAS.items():
    _make(_name, _formula)

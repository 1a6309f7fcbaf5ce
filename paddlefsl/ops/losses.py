"""More built-in losses in second order: NLL, BCE, BCE with logits, Smooth L1, KL divergence.

Paddle 3.3.1 has no double gradient for ``nll_loss``, ``bce_loss``,
``sigmoid_cross_entropy_with_logits`` (``BCEWithLogitsLoss``, ``sigmoid_focal_loss``),
``huber_loss`` (``SmoothL1Loss``) and ``kldiv_loss``. A loss is computed by the user's
code, outside the learner's call and so outside
:func:`~paddlefsl.ops.second_order_scope`, so these replacements compute the loss from
ops with double gradients whenever a second-order clone is alive
(:func:`~paddlefsl.ops.second_order_clone_alive`) or inside the scope; otherwise, in
first-order meta-learning and in ordinary training beside it, the native kernels run.
The formulas follow Paddle's CPU kernels, clamps included (``bce_loss`` bounds each log
at -100). ``nll_loss`` with an ``ignore_index`` that names a class always takes its
formula when a gradient is tracked: Paddle's kernel aborts or hangs there.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle
import paddle.nn.functional as F

from ._common import softplus, tracks_grad
from ._registry import in_second_order_scope, register, second_order_clone_alive

Tensor = paddle.Tensor


def _nll(x: Tensor, label: Tensor, weight: Tensor | None, ignore_index: int, reduction: str):
    # x: [N, C] or [N, C, H, W]; label: [N] or [N, H, W] (F.nll_loss reshapes other ranks).
    keep = (label != ignore_index).astype(x.dtype)
    safe = paddle.where(label == ignore_index, paddle.zeros_like(label), label)
    picked = paddle.take_along_axis(x, safe.unsqueeze(1), axis=1).squeeze(1)
    w = (
        keep
        if weight is None
        else paddle.gather(weight, safe.reshape([-1])).reshape(safe.shape) * keep
    )
    losses = -picked * w
    total = w.sum()
    if reduction == "none":
        return losses, total
    if reduction == "sum":
        return losses.sum(), total
    return losses.sum() / total, total


def _bce(x: Tensor, label: Tensor) -> Tensor:
    low = paddle.full([], -100.0, dtype=x.dtype)
    return -(label * paddle.maximum(paddle.log(x), low)) - (1.0 - label) * paddle.maximum(
        paddle.log(1.0 - x), low
    )


def _bce_logits(x, label, pos_weight, normalize, ignore_index):
    # The kernel's max(x, 0) - x y + log(1 + exp(-|x|)) is softplus(x) - x y; with
    # log_weight = pos_weight (as passed): (1 - y) x + log_weight softplus(-x).
    if pos_weight is None:
        out = softplus(x) - x * label
    else:
        out = (1.0 - label) * x + pos_weight * softplus(-x)
    keep = (label != ignore_index).astype(x.dtype)
    out = out * keep
    if normalize:
        out = out / paddle.clip(keep.sum(), min=1.0)
    return out


def _huber(x: Tensor, label: Tensor, delta: float) -> Tensor:
    size = paddle.abs(label - x)
    quadratic = size - F.relu(size - delta)  # min(|r|, delta)
    return 0.5 * quadratic * quadratic + delta * (size - quadratic)


def _kldiv(x: Tensor, label: Tensor, reduction: str, log_target: bool) -> Tensor:
    if log_target:
        out = paddle.exp(label) * (label - x)
    else:
        positive = label > 0
        safe = paddle.where(positive, label, paddle.ones_like(label))
        out = paddle.where(positive, label * (paddle.log(safe) - x), paddle.zeros_like(x))
    if reduction == "mean":
        return out.mean()
    if reduction == "sum":
        return out.sum()
    if reduction == "batchmean":
        return out.sum() / x.shape[0]
    return out


# name -> (formula, tensor-argument count, covered(args))
_LOSSES: dict[str, tuple[Callable, int, Callable[[tuple], bool]]] = {
    "nll_loss": (
        _nll,
        3,
        lambda args: args[1].ndim in (1, 3) and args[-1] in ("none", "sum", "mean"),
    ),
    "bce_loss": (_bce, 2, lambda args: True),
    "sigmoid_cross_entropy_with_logits": (_bce_logits, 3, lambda args: True),
    "huber_loss": (_huber, 2, lambda args: True),
    "kldiv_loss": (_kldiv, 2, lambda args: args[2] in ("none", "mean", "sum", "batchmean")),
}


def _native_fails(name: str, args: tuple) -> bool:
    # Paddle 3.3.1's CPU nll_loss aborts (or hangs) when ignore_index names a class and
    # the input tracks a gradient; the formula has no such problem, so it always serves.
    return name == "nll_loss" and 0 <= args[3] < args[0].shape[1]


def _make(name: str, formula: Callable, tensor_args: int, covered: Callable) -> None:
    @register(name)
    def factory(native_fn: Callable) -> Callable:
        def op(*args, **kwargs):
            tensors = [a for a in args[:tensor_args] if isinstance(a, Tensor)]
            if (
                kwargs
                or len(tensors) < 2
                or not tracks_grad(*tensors)
                or not covered(args)
                or not (
                    second_order_clone_alive()
                    or in_second_order_scope()
                    or _native_fails(name, args)
                )
            ):
                return native_fn(*args, **kwargs)
            return formula(*args)

        return op


for _name, (_formula, _count, _covered) in _LOSSES.items():
    _make(_name, _formula, _count, _covered)

"""Gradients as name-keyed dicts, with clear errors for missing double gradients."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping

import paddle

__all__ = ["SecondOrderUnsupportedError", "named_grad"]

_MISSING_DOUBLE_GRAD = [
    re.compile(r"The Op (\w+?)_grad doesn't have any grad op"),
    re.compile(r"kernel `(\w+?)_double_grad` is not registered"),
    re.compile(r"(Pool) op grad grad only supports avgpool"),
    re.compile(r"(\w+?)_double_grad only support"),
    re.compile(r"op '(?:pd_op\.)?(\w+?)_grad' has no grad op"),
]


class SecondOrderUnsupportedError(RuntimeError):
    """A second-order gradient was asked through an op Paddle cannot differentiate twice."""

    def __init__(self, op: str, detail: str):
        self.op = op
        super().__init__(
            f"Second-order adaptation needs the second derivative of the Paddle op '{op}', "
            f"which Paddle {paddle.__version__} does not provide and paddlefsl does not "
            "replace. Use first_order=True (FOMAML / first-order ANIL), or build the model "
            "from layers listed by paddlefsl.ops.patched_ops(). "
            "paddlefsl.metaopt.check_second_order(...) verifies a model against finite "
            f"differences. Paddle said: {detail.strip().splitlines()[0][:300]}"
        )


# Paddle's message when a PyLayer returns a gradient for an input that paddle.grad pruned.
_PARTIAL_REQUEST = "backward function should return None at"


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    found = [line for line in lines if _PARTIAL_REQUEST in line]
    return (found or lines or [type(error).__name__])[0][:300]


def _missing_op(error: BaseException) -> str | None:
    text = str(error)
    for pattern in _MISSING_DOUBLE_GRAD:
        match = pattern.search(text)
        if match:
            return match.group(1)
    return None


def named_grad(
    loss: paddle.Tensor,
    params: Mapping[str, paddle.Tensor],
    create_graph: bool = False,
    allow_unused: bool = True,
    scale: float | None = None,
) -> dict[str, paddle.Tensor | None]:
    """``paddle.grad`` of a scalar ``loss`` w.r.t. named tensors, as a dict.

    Args:
        loss: scalar tensor.
        params: structured name -> tensor that ``loss`` depends on.
        create_graph: record the gradient computation so it can be differentiated again
            (second-order meta-learning).
        allow_unused: if ``False``, raise when some tensor does not influence ``loss``;
            if ``True``, its gradient is ``None``.
        scale: return ``scale`` times the gradients, by seeding the backward pass with
            ``scale`` instead of 1 (one multiplication instead of one per tensor).

    Raises:
        SecondOrderUnsupportedError: ``create_graph=True`` through an op without a double
            gradient; the message names the op.
        ValueError: a parameter is unused and ``allow_unused`` is ``False``.

    Example:
        >>> import paddle
        >>> w = paddle.to_tensor([3.0], stop_gradient=False)
        >>> named_grad((w * w).sum(), {"w": w})["w"].numpy()
        array([6.], dtype=float32)

    """
    if math.prod(loss.shape) != 1:  # Tensor.size costs a NumPy product
        raise ValueError(
            f"adapt() needs a scalar loss, got shape {list(loss.shape)}; reduce it first "
            "(e.g. loss.mean())."
        )
    names = list(params)
    seed = None if scale is None else [paddle.full(loss.shape, scale, dtype=loss.dtype)]
    try:
        grads = paddle.grad(
            [loss],
            [params[n] for n in names],
            grad_outputs=seed,
            create_graph=create_graph,
            retain_graph=create_graph or None,
            allow_unused=True,
        )
    except (RuntimeError, ValueError, OSError) as error:
        op = _missing_op(error) if create_graph else None
        if op is not None:
            raise SecondOrderUnsupportedError(op, str(error)) from error
        if _PARTIAL_REQUEST in str(error):
            raise RuntimeError(
                "this gradient asks for some inputs of a paddlefsl op (BatchNorm, a "
                "convolution's filter and bias) but not for others that also require a "
                "gradient, which Paddle cannot tell the op (see 'Known limitation' in the "
                "concepts docs). Ask for all of them, set stop_gradient=True on the "
                "tensors you do not want gradients for, or call paddlefsl.ops.uninstall() "
                f"for this computation. Paddle said: {_first_line(error)}"
            ) from error
        raise
    result = dict(zip(names, grads))
    if not allow_unused:
        unused = [n for n, g in result.items() if g is None]
        if unused:
            raise ValueError(
                f"parameters {unused[:5]} do not influence the loss; pass "
                "allow_unused=True to leave them unchanged, or freeze them "
                "(stop_gradient=True)."
            )
    return result

"""Check a learner's second-order meta-gradient on your own model against finite differences."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import paddle

from .base import BaseLearner

__all__ = ["SecondOrderReport", "check_second_order", "meta_loss"]

Batch = Sequence[Any]  # (inputs, targets)


@dataclass(frozen=True)
class SecondOrderReport:
    """Directional derivatives of the meta-loss along one random direction.

    Attributes:
        ok: ``relative_error <= rtol``.
        relative_error: ``|analytic - numeric| / |numeric|``.
        analytic: from the learner's second-order meta-gradient.
        numeric: central finite difference of the meta-loss, float64.
        first_order: the first-order (FOMAML-style) value, for scale: when it is close to
            ``numeric`` the check cannot tell second order from first order.
        steps: inner steps used.
        rtol: the tolerance applied.

    """

    ok: bool
    relative_error: float
    analytic: float
    numeric: float
    first_order: float
    steps: int
    rtol: float

    def __str__(self) -> str:
        verdict = "OK" if self.ok else "MISMATCH"
        return (
            f"second-order check {verdict}: relative error {self.relative_error:.2e} "
            f"(tolerance {self.rtol:.0e}); analytic {self.analytic:.10g}, finite difference "
            f"{self.numeric:.10g}, first-order {self.first_order:.10g}, {self.steps} step(s)"
        )


def _to_float64(value: Any) -> Any:
    if isinstance(value, paddle.Tensor):
        return value.astype("float64") if value.is_floating_point() else value
    if isinstance(value, list | tuple):
        return type(value)(_to_float64(v) for v in value)
    return value


def _call(learner: BaseLearner, inputs: Any) -> Any:
    return learner(*inputs) if isinstance(inputs, tuple) else learner(inputs)


def meta_loss(
    learner: BaseLearner,
    loss_fn: Callable[[Any, Any], paddle.Tensor],
    support: Batch,
    query: Batch,
    steps: int = 1,
    first_order: bool | None = None,
) -> paddle.Tensor:
    """Query loss after ``steps`` inner steps on ``support`` (the MAML objective of one task).

    Example:
        >>> import paddle
        >>> from paddlefsl.metaopt import MAML
        >>> maml = MAML(paddle.nn.Linear(2, 1), lr=0.1)
        >>> batch = (paddle.randn([4, 2]), paddle.randn([4, 1]))
        >>> loss = meta_loss(maml, paddle.nn.functional.mse_loss, batch, batch, steps=2)
        >>> loss.backward()

    """
    clone = learner.clone(first_order=first_order)
    for _ in range(steps):
        clone.adapt(loss_fn(_call(clone, support[0]), support[1]))
    return loss_fn(_call(clone, query[0]), query[1])


def check_second_order(
    learner: BaseLearner,
    loss_fn: Callable[[Any, Any], paddle.Tensor],
    support: Batch,
    query: Batch,
    steps: int = 1,
    eps: float = 1e-6,
    rtol: float = 1e-5,
    seed: int = 0,
) -> SecondOrderReport:
    """Compare the learner's meta-gradient with float64 finite differences on your data.

    Works on a float64 deep copy of ``learner``: the learner and its model are left as
    they are. Finite differences need the same function at every evaluation, so Paddle's
    global generator is re-seeded with ``seed`` before each one: dropout then draws the same
    masks every time (as long as the model draws its random numbers in a fixed order). The
    global generator's state is restored afterwards. Paddle's default dtype is
    float64 meanwhile, so tensors the model creates itself (a recurrent cell's initial
    state) match.

    Args:
        learner: a second-order learner (``MAML``, ``ANIL``, ...) wrapping your model.
        loss_fn: ``loss_fn(outputs, targets) -> scalar``, the loss you train with.
        support: ``(inputs, targets)`` for the inner loop (a tuple of inputs for
            multi-input models).
        query: ``(inputs, targets)`` for the meta-loss.
        steps: inner steps.
        eps: finite-difference step.
        rtol: tolerance on the relative error.
        seed: seed of the random direction and of Paddle's generator during the check.

    Returns:
        A :class:`SecondOrderReport`; ``report.ok`` says whether the gradient is exact.

    Example:
        >>> import paddle
        >>> from paddlefsl.metaopt import MAML, check_second_order
        >>> net = paddle.nn.Sequential(paddle.nn.Linear(3, 8), paddle.nn.GELU(),
        ...                            paddle.nn.Linear(8, 2))
        >>> x, y = paddle.randn([6, 3]), paddle.to_tensor([0, 1, 0, 1, 0, 1])
        >>> report = check_second_order(MAML(net, lr=0.5), paddle.nn.functional.cross_entropy,
        ...                             (x, y), (x, y))
        >>> report.ok
        True

    """
    if learner.is_clone:
        raise ValueError("pass the meta-learner (e.g. the MAML object), not a clone")
    probe = copy.deepcopy(learner)
    probe.to(dtype="float64")
    support, query = _to_float64(tuple(support)), _to_float64(tuple(query))
    params = [p for p in probe.parameters() if not p.stop_gradient]
    rng = np.random.default_rng(seed)
    directions = [rng.standard_normal(p.shape) for p in params]
    origin = [p.numpy().copy() for p in params]

    def directional(first_order: bool) -> float:
        paddle.seed(seed)
        loss = meta_loss(probe, loss_fn, support, query, steps, first_order=first_order)
        grads = paddle.grad([loss], params, allow_unused=True)
        return float(sum((g.numpy() * d).sum() for g, d in zip(grads, directions) if g is not None))

    def value_at(scale: float) -> float:
        for p, p0, d in zip(params, origin, directions):
            p.set_value(p0 + scale * d)
        try:
            paddle.seed(seed)
            return float(meta_loss(probe, loss_fn, support, query, steps, first_order=True))
        finally:
            for p, p0 in zip(params, origin):
                p.set_value(p0)

    rng_state = paddle.get_rng_state()
    # Tensors the model creates in its forward pass (a recurrent cell's zero initial
    # state, a constant) take the default dtype: float64 too, for the check's duration.
    default_dtype = paddle.get_default_dtype()
    paddle.set_default_dtype("float64")
    try:
        analytic = directional(first_order=False)
        first = directional(first_order=True)
        numeric = (value_at(eps) - value_at(-eps)) / (2 * eps)
    finally:
        paddle.set_rng_state(rng_state)
        paddle.set_default_dtype(default_dtype)
    error = abs(analytic - numeric) / max(abs(numeric), 1e-12)
    return SecondOrderReport(error <= rtol, error, analytic, numeric, first, steps, rtol)

"""Loss and metric per task type: classification (cross-entropy, accuracy), regression (MSE)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import paddle
import paddle.nn.functional as F

from ..metaopt import ANIL
from .errors import ConfigError

__all__ = [
    "CLASSIFICATION",
    "REGRESSION",
    "Objective",
    "TaskType",
    "adapt",
    "get_objective",
    "infer_task_type",
]

TaskType = Literal["classification", "regression"]


def _accuracy(outputs: paddle.Tensor, targets: paddle.Tensor) -> float:
    return float((outputs.argmax(axis=-1) == targets).astype("float32").mean())


def _mse(outputs: paddle.Tensor, targets: paddle.Tensor) -> float:
    return float(F.mse_loss(outputs, targets))


@dataclass(frozen=True)
class Objective:
    """How one task type is trained and scored.

    Attributes:
        task_type: ``"classification"`` or ``"regression"``.
        loss: ``loss(outputs, targets) -> scalar tensor`` (differentiable).
        metric: ``metric(outputs, targets) -> float`` for reporting.
        metric_name: ``"accuracy"`` or ``"mse"``.
        higher_is_better: Whether a larger metric is better (picks the best checkpoint).

    Example:
        >>> import paddle
        >>> logits, y = paddle.to_tensor([[2.0, 0.0], [0.0, 1.0]]), paddle.to_tensor([0, 0])
        >>> CLASSIFICATION.metric(logits, y)
        0.5

    """

    task_type: TaskType
    loss: Callable[[paddle.Tensor, paddle.Tensor], paddle.Tensor]
    metric: Callable[[paddle.Tensor, paddle.Tensor], float]
    metric_name: str
    higher_is_better: bool

    def better(self, new: float, old: float | None) -> bool:
        """Whether metric value ``new`` improves on ``old`` (``None``: nothing yet)."""
        if old is None:
            return True
        return new > old if self.higher_is_better else new < old


CLASSIFICATION = Objective("classification", F.cross_entropy, _accuracy, "accuracy", True)
REGRESSION = Objective("regression", F.mse_loss, _mse, "mse", False)


def get_objective(task_type: str) -> Objective:
    """The :class:`Objective` for ``"classification"`` or ``"regression"``.

    Example:
        >>> get_objective("regression").metric_name
        'mse'

    """
    if task_type == "classification":
        return CLASSIFICATION
    if task_type == "regression":
        return REGRESSION
    raise ConfigError(f"task_type must be 'classification' or 'regression', got {task_type!r}")


def infer_task_type(targets: Any) -> TaskType:
    """Integer targets mean classification, floating-point targets regression.

    Example:
        >>> import numpy as np
        >>> infer_task_type(np.array([0, 1])), infer_task_type(np.zeros((3, 1), np.float32))
        ('classification', 'regression')

    """
    if isinstance(targets, paddle.Tensor):
        return "regression" if targets.is_floating_point() else "classification"
    kind = np.asarray(targets).dtype.kind
    return "classification" if kind in "iub" else "regression"


def adapt(
    learner: Any,
    objective: Objective,
    x: paddle.Tensor,
    y: paddle.Tensor,
    steps: int,
    after_step: Callable[[Any, int], None] | None = None,
) -> Any:
    """Take ``steps`` inner-loop steps of a clone on ``(x, y)``; returns the clone.

    ``after_step(clone, k)``, when given, runs after the ``k``-th step (``k = 1..steps``),
    e.g. to score the query set along the way.

    Example:
        >>> import paddle
        >>> from paddlefsl.metaopt import MAML
        >>> maml = MAML(paddle.nn.Linear(1, 1), lr=0.1)
        >>> x = paddle.randn([4, 1])
        >>> clone = adapt(maml.clone(), REGRESSION, x, 2 * x, steps=2)
        >>> clone.is_clone
        True

    """
    if isinstance(learner, ANIL):  # the features do not adapt: run them once
        support = learner.embed(x)
        for step in range(1, steps + 1):
            learner.adapt(objective.loss(learner.head_forward(support), y))
            if after_step is not None:
                after_step(learner, step)
        return learner
    for step in range(1, steps + 1):
        learner.adapt(objective.loss(learner(x), y))
        if after_step is not None:
            after_step(learner, step)
    return learner

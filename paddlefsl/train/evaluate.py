"""Few-shot evaluation: adapt on each task's support set, score its query set, 95% CI."""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import paddle

from .objectives import Objective, adapt, get_objective, infer_task_type

__all__ = [
    "EvalResult",
    "PairedDifference",
    "confidence_interval",
    "evaluate",
    "paired_difference",
    "unpaired_fields",
]


def confidence_interval(values: Iterable[float]) -> tuple[float, float, float]:
    """``(mean, std, ci95)`` with ``ci95 = 1.96 * std / sqrt(n)``.

    ``std`` is the population standard deviation (``ddof=0``), as in the MAML reference
    code (cbfinn/maml ``main.py``, ``test()``), so numbers are comparable with the papers.

    Example:
        >>> mean, std, ci = confidence_interval([0.0, 1.0])
        >>> mean, std, round(ci, 4)
        (0.5, 0.5, 0.693)

    """
    arr = np.asarray(list(values), dtype=np.float64)
    if arr.size == 0:
        raise ValueError("no values to summarise (zero tasks)")
    std = float(arr.std())
    return float(arr.mean()), std, 1.96 * std / math.sqrt(arr.size)


@dataclass
class EvalResult:
    """Per-task metric summarised over a fixed task set.

    Attributes:
        metric: ``"accuracy"`` or ``"mse"``.
        mean: Mean of the per-task metric.
        ci95: Half-width of the 95% confidence interval, ``1.96 * std / sqrt(n)``.
        std: Population standard deviation of the per-task metric.
        num_tasks: Number of tasks.
        loss: Mean query loss.
        inner_steps: Adaptation steps used on each support set.
        values: The per-task metric.
        by_step: With ``evaluate(..., by_step=True)``, the metric after each number of
            steps ``0..inner_steps``: ``{"step", "mean", "ci95"}`` per entry (the last
            one is ``mean`` and ``ci95`` above); empty otherwise.

    Example:
        >>> r = EvalResult("accuracy", 0.9, 0.01, 0.1, 600, 0.3, 3)
        >>> str(r)
        'accuracy 0.9000 +- 0.0100 (95% CI over 600 tasks, 3 inner steps)'

    """

    metric: str
    mean: float
    ci95: float
    std: float
    num_tasks: int
    loss: float
    inner_steps: int
    values: list[float] = field(default_factory=list, repr=False)
    by_step: list[dict[str, float]] = field(default_factory=list, repr=False)

    @classmethod
    def from_values(
        cls, metric: str, values: list[float], loss: float, inner_steps: int
    ) -> EvalResult:
        """Summarise per-task metrics (e.g. gathered from processes) and the mean query loss.

        Example:
            >>> EvalResult.from_values("accuracy", [1.0, 0.5], 0.2, 3).mean
            0.75

        """
        mean, std, ci95 = confidence_interval(values)
        return cls(
            metric, mean, ci95, std, len(values), float(loss), int(inner_steps), list(values)
        )

    def to_dict(self) -> dict[str, Any]:
        """All fields as a JSON-ready dict."""
        return asdict(self)

    def __str__(self) -> str:
        return (
            f"{self.metric} {self.mean:.4f} +- {self.ci95:.4f} (95% CI over "
            f"{self.num_tasks} tasks, {self.inner_steps} inner steps)"
        )


@dataclass(frozen=True)
class PairedDifference:
    """Per-task difference ``candidate - baseline`` of two evaluations on the same tasks.

    This is the interval of the difference itself; the two separate intervals do not give
    it. It is narrowest when the two models fail on the same tasks (a model and a
    fine-tuned version of it).

    Attributes:
        mean: Mean of ``candidate - baseline`` (positive: the candidate scores higher).
        ci95: Half-width of its 95% confidence interval, ``1.96 * std / sqrt(n)``.
        std: Population standard deviation of the per-task differences.
        num_tasks: Number of tasks.
        better: Tasks on which the candidate is better (higher accuracy, lower MSE).
        worse: Tasks on which it is worse.
        ties: Tasks with equal scores.

    Example:
        >>> d = paired_difference([0.9, 1.0, 0.8], [1.0, 1.0, 0.9])
        >>> round(d.mean, 4), d.better, d.worse, d.ties
        (0.0667, 2, 0, 1)

    """

    mean: float
    ci95: float
    std: float
    num_tasks: int
    better: int
    worse: int
    ties: int

    @property
    def excludes_zero(self) -> bool:
        """Whether the 95% interval lies entirely on one side of zero."""
        return abs(self.mean) > self.ci95

    @property
    def interval(self) -> tuple[float, float]:
        """The 95% interval ``(mean - ci95, mean + ci95)``."""
        return self.mean - self.ci95, self.mean + self.ci95


#: Fields of an evaluation report (``paddlefsl eval``'s JSON) that must agree for two
#: evaluations to have scored the same tasks, at the top level and in its ``config``.
SAME_TASKS = ("split", "task_seed", "num_tasks", "metric")
SAME_SETTING = ("dataset", "ways", "shots", "queries")


def unpaired_fields(baseline: dict[str, Any], candidate: dict[str, Any]) -> list[str]:
    """Names of the report fields showing that two evaluations scored different tasks.

    Pairing (:func:`paired_difference`) is per task, so it is only meaningful when both
    reports come from the same split, task seed, task count, metric and dataset setting.

    Args:
        baseline: An evaluation report (``split``, ``task_seed``, ..., ``config``).
        candidate: Another one.

    Returns:
        The differing fields, empty when the two can be paired.

    Example:
        >>> a = {"split": "test", "task_seed": 1, "num_tasks": 600, "metric": "accuracy"}
        >>> unpaired_fields(a, {**a, "task_seed": 2})
        ['task_seed']

    """
    differing = [k for k in SAME_TASKS if baseline.get(k) != candidate.get(k)]
    base_cfg, cand_cfg = baseline.get("config") or {}, candidate.get("config") or {}
    return differing + [k for k in SAME_SETTING if base_cfg.get(k) != cand_cfg.get(k)]


def paired_difference(
    baseline: Sequence[float], candidate: Sequence[float], higher_is_better: bool = True
) -> PairedDifference:
    """Compare two evaluations task by task (``EvalResult.values`` on the same tasks).

    Args:
        baseline: Per-task metric of the reference model.
        candidate: Per-task metric of the model compared with it, in the same task order.
        higher_is_better: ``True`` for accuracy, ``False`` for MSE (decides ``better``).

    Returns:
        A :class:`PairedDifference`.

    Raises:
        ValueError: the two lists differ in length or are empty.

    Example:
        >>> paired_difference([0.5, 0.6], [0.4, 0.6], higher_is_better=False).better
        1

    """
    base = np.asarray(baseline, dtype=np.float64)
    cand = np.asarray(candidate, dtype=np.float64)
    if base.shape != cand.shape or base.ndim != 1:
        raise ValueError(
            f"paired comparison needs one value per task for the same tasks, got "
            f"{base.size} and {cand.size} values"
        )
    diff = cand - base
    mean, std, ci95 = confidence_interval(diff)
    gain = diff if higher_is_better else -diff
    return PairedDifference(
        mean,
        ci95,
        std,
        int(diff.size),
        int((gain > 0).sum()),
        int((gain < 0).sum()),
        int((diff == 0).sum()),
    )


def _as_tensors(task: Any) -> tuple[paddle.Tensor, ...]:
    if hasattr(task, "to_tensors"):
        return task.to_tensors()
    return tuple(t if isinstance(t, paddle.Tensor) else paddle.to_tensor(t) for t in task)


def _record_query_metric(
    scores: list[float],
    objective: Objective,
    query_x: paddle.Tensor,
    query_y: paddle.Tensor,
    last_step: int,
    model: Any,
    step: int = 0,
) -> None:
    if step < last_step:  # the last step's score is the evaluation's own query pass
        with paddle.no_grad():
            scores.append(objective.metric(model(query_x), query_y))


def evaluate(
    learner: Any,
    tasks: Iterable[Any],
    inner_steps: int,
    task_type: str | None = None,
    progress: bool = False,
    by_step: bool = False,
) -> EvalResult:
    """Adapt a clone on every task's support set and score it on the query set.

    The protocol of MAML and ANIL: the model stays in train mode, so BatchNorm normalises
    with the statistics of the batch at hand (transductive). Each clone adapts first
    order, since no meta-gradient is needed, and the query pass runs without a graph.

    Args:
        learner: A meta-learner (``MAML``, ``ANIL``, ...), not a clone.
        tasks: :class:`~paddlefsl.data.Task` objects (e.g. ``fixed_tasks(...)``) or
            ``(support_x, support_y, query_x, query_y)`` tuples.
        inner_steps: Adaptation steps per task.
        task_type: ``"classification"`` or ``"regression"``; inferred from the first
            task's targets when ``None``.
        progress: Show a tqdm bar.
        by_step: Also score the query set before adaptation and after every step, as
            the MAML reference code reports its test accuracy (``EvalResult.by_step``).
            It costs one extra query pass per step but the last; the final numbers do not
            change (a model with dropout draws extra random numbers, though).

    Returns:
        An :class:`EvalResult` (accuracy for classification, MSE for regression).

    Example:
        >>> import paddle
        >>> from paddlefsl.data import SinusoidTasks, FixedTasks
        >>> from paddlefsl.metaopt import MAML
        >>> from paddlefsl.models import MLP
        >>> maml = MAML(MLP(1, [40, 40], 1), lr=0.01)
        >>> result = evaluate(maml, FixedTasks(SinusoidTasks(seed=1), 5), inner_steps=1)
        >>> result.metric, result.num_tasks
        ('mse', 5)

    """
    if inner_steps < 0:
        raise ValueError(f"inner_steps must be >= 0, got {inner_steps}")
    if getattr(learner, "is_clone", False):
        raise ValueError("evaluate() needs the meta-learner, not a clone")
    objective: Objective | None = get_objective(task_type) if task_type else None
    was_training = learner.training
    learner.train()
    values: list[float] = []
    losses: list[float] = []
    step_values: list[list[float]] = []  # per task: the metric after 0..inner_steps steps
    iterator = tasks
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = iterator = tqdm(tasks, desc="eval", unit="task", leave=False)
    try:
        for task in iterator:
            sx, sy, qx, qy = _as_tensors(task)
            if objective is None:
                objective = get_objective(infer_task_type(sy))
            clone = learner.clone(first_order=True)
            scores: list[float] = []
            record = None
            if by_step:
                record = functools.partial(
                    _record_query_metric, scores, objective, qx, qy, inner_steps
                )
                record(clone)
            clone = adapt(clone, objective, sx, sy, inner_steps, record)
            with paddle.no_grad():
                out = clone(qx)
                losses.append(float(objective.loss(out, qy)))
                values.append(objective.metric(out, qy))
            if by_step:
                step_values.append(scores + values[-1:])
            del clone, out, sx, sy, qx, qy  # free each task's graph and tensors promptly
    finally:
        if bar is not None:
            bar.close()
        if not was_training:
            learner.eval()
    if objective is None:
        raise ValueError("no tasks to evaluate")
    result = EvalResult.from_values(objective.metric_name, values, np.mean(losses), inner_steps)
    if by_step:
        per_step = np.asarray(step_values, dtype=np.float64)  # [tasks, inner_steps + 1]
        for step in range(inner_steps + 1):
            mean, _, ci95 = confidence_interval(per_step[:, step])
            result.by_step.append({"step": step, "mean": mean, "ci95": ci95})
    return result

"""Meta-SGD: MAML with a learned learning rate for every weight (Li et al., 2017)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

import paddle

from .base import BaseLearner, RunningStats
from .maml import sgd_update

__all__ = ["MetaSGD"]


class MetaSGD(BaseLearner):
    """MAML whose inner step ``w - lr_w * g`` has a learned learning rate per weight.

    Every adapted parameter ``w`` gets a learning-rate tensor ``lr_w`` of its own shape
    (Li et al., 2017, "Meta-SGD: Learning to Learn Quickly for Few-Shot Learning",
    Eq. 3: the step is ``w - alpha * grad``, ``*`` elementwise). The learning rates are
    parameters of this learner, so an optimizer over ``metasgd.parameters()`` trains
    them with the model; they start at ``lr`` (as learn2learn's ``MetaSGD`` does; the
    paper draws them from [0.005, 0.1]). With ``first_order=True`` the second-order
    terms are dropped, but the learning rates still get their gradient: the step is
    linear in them, so ``d loss / d lr_w = -g * d loss / d w'`` needs no second order.

    ``state_dict()`` of the learner holds the model's weights (``module.*``) and the
    learning rates (``lrs.*``): save the learner, not only the model
    (:class:`~paddlefsl.train.MetaTrainer` checkpoints do; ``paddlefsl train --algorithm
    metasgd`` trains it from the command line).

    Args:
        model: any ``paddle.nn.Layer``.
        lr: initial value of every learning rate (a positive number).
        first_order: drop second-order terms.
        allow_unused: leave parameters that do not influence the support loss unchanged
            (``True``) or raise (``False``).
        running_stats: BatchNorm statistics policy, ``"isolated"`` or ``"shared"``
            (see :class:`BaseLearner`).
        inner_frozen: names of parameters the inner loop does not step; they get no
            learning rate.

    Example:
        >>> import paddle
        >>> from paddlefsl.metaopt import MetaSGD
        >>> model = paddle.nn.Sequential(paddle.nn.Linear(1, 8), paddle.nn.Tanh(),
        ...                              paddle.nn.Linear(8, 1))
        >>> metasgd = MetaSGD(model, lr=0.1)
        >>> opt = paddle.optimizer.Adam(1e-3, parameters=metasgd.parameters())
        >>> x, y = paddle.randn([10, 1]), paddle.randn([10, 1])
        >>> learner = metasgd.clone()
        >>> learner.adapt(paddle.nn.functional.mse_loss(learner(x), y))
        >>> paddle.nn.functional.mse_loss(learner(x), y).backward()
        >>> opt.step(); opt.clear_grad()
        >>> sorted(metasgd.learning_rates())  # one per adapted weight, by structured name
        ['0.bias', '0.weight', '2.bias', '2.weight']

    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        lr: float = 0.01,
        first_order: bool = False,
        allow_unused: bool = True,
        running_stats: RunningStats = "isolated",
        inner_frozen: Iterable[str] = (),
    ):
        super().__init__(model, first_order, allow_unused, running_stats, inner_frozen)
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr):
            raise ValueError(f"MetaSGD: lr must be a finite number, got {lr!r}")
        if lr <= 0:
            raise ValueError(f"MetaSGD: lr (the initial learning rates) must be > 0, got {lr}")
        stepped = [n for n in self.adapted_names() if n not in self.inner_frozen]
        weights = dict(model.named_parameters())
        self.lrs = paddle.nn.ParameterList(
            [
                self.create_parameter(
                    shape=weights[name].shape,
                    dtype=weights[name].dtype,
                    default_initializer=paddle.nn.initializer.Constant(float(lr)),
                )
                for name in stepped
            ]
        )
        self._lr_names = stepped  # position i of self.lrs belongs to stepped[i]

    def learning_rates(self) -> dict[str, paddle.Tensor]:
        """The learning-rate tensors by the structured name of their weight (a new dict)."""
        return dict(zip(self._lr_names, self.lrs))

    def update(
        self,
        params: Mapping[str, paddle.Tensor],
        grads: Mapping[str, paddle.Tensor | None],
    ) -> dict[str, paddle.Tensor]:
        """``w - lr_w * g`` for every weight with a gradient; the others stay."""
        return sgd_update(params, grads, self.learning_rates())

    def extra_repr(self) -> str:
        return f"learning rates for {len(self._lr_names)} tensors, " + super().extra_repr()

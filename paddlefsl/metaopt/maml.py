"""MAML and first-order MAML (Finn et al., 2017)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import paddle

from .base import BaseLearner, RunningStats

__all__ = ["MAML", "sgd_update"]


def sgd_update(
    params: Mapping[str, paddle.Tensor],
    grads: Mapping[str, paddle.Tensor | None],
    lr: float | Mapping[str, float | paddle.Tensor],
) -> dict[str, paddle.Tensor]:
    """``p - lr * g`` for every named tensor, out of place; ``None`` gradients keep ``p``.

    Example:
        >>> import paddle
        >>> new = sgd_update({"w": paddle.ones([2])}, {"w": paddle.ones([2])}, 0.5)
        >>> new["w"].numpy().tolist()
        [0.5, 0.5]

    """
    out = {}
    for name, p in params.items():
        g = grads.get(name)
        if g is None:
            out[name] = p  # no rate needed (an lr mapping may leave such weights out)
        else:
            out[name] = p - (lr[name] if isinstance(lr, Mapping) else lr) * g
    return out


class MAML(BaseLearner):
    """Model-Agnostic Meta-Learning with exact second-order meta-gradients.

    ``maml.clone()`` gives a learner whose ``adapt(loss)`` takes an SGD step on fast
    weights; calling the clone runs ``model`` with them. Backpropagating a loss of the
    clone puts the meta-gradient on ``model``'s parameters. ``first_order=True`` is
    FOMAML.

    Args:
        model: any ``paddle.nn.Layer``.
        lr: inner-loop learning rate.
        first_order: drop second-order terms (FOMAML).
        allow_unused: leave parameters that do not influence the support loss unchanged
            (``True``) or raise (``False``).
        running_stats: BatchNorm statistics policy, ``"isolated"`` or ``"shared"``
            (see :class:`BaseLearner`).
        inner_frozen: names of parameters the inner loop does not step (the outer loop
            still trains them; see :class:`BaseLearner`).

    Example:
        >>> import paddle
        >>> from paddlefsl.metaopt import MAML
        >>> model = paddle.nn.Sequential(paddle.nn.Linear(1, 8), paddle.nn.Tanh(),
        ...                              paddle.nn.Linear(8, 1))
        >>> maml = MAML(model, lr=0.1)
        >>> opt = paddle.optimizer.Adam(1e-3, parameters=maml.parameters())
        >>> x, y = paddle.randn([10, 1]), paddle.randn([10, 1])
        >>> learner = maml.clone()
        >>> learner.adapt(paddle.nn.functional.mse_loss(learner(x), y))
        >>> paddle.nn.functional.mse_loss(learner(x), y).backward()
        >>> opt.step(); opt.clear_grad()

        ``inner_frozen`` keeps named parameters out of the inner step (the outer loop
        still trains them):

        >>> net = paddle.nn.Sequential(paddle.nn.Linear(1, 8), paddle.nn.BatchNorm1D(8),
        ...                            paddle.nn.Linear(8, 1))
        >>> learner = MAML(net, lr=0.1, inner_frozen=["1.bias"]).clone()
        >>> learner.adapt(paddle.nn.functional.mse_loss(learner(x), y))
        >>> fast = learner.fast_weights()
        >>> [bool((fast[n] == p).all()) for n, p in [("1.bias", net[1].bias),
        ...                                           ("0.weight", net[0].weight)]]
        [True, False]

    """

    def __init__(
        self,
        model: paddle.nn.Layer,
        lr: float,
        first_order: bool = False,
        allow_unused: bool = True,
        running_stats: RunningStats = "isolated",
        inner_frozen: Iterable[str] = (),
    ):
        super().__init__(model, first_order, allow_unused, running_stats, inner_frozen)
        self.lr = float(lr)

    def update(self, params, grads):
        """SGD step with the inner learning rate."""
        return sgd_update(params, grads, self.lr)

    def _gradient_scale(self) -> float | None:
        # adapt() seeds its backward pass with lr, so the gradients arrive as lr * g and
        # the step is one subtraction per tensor instead of a scale and a subtraction
        # (fewer recorded ops under second order too). Not when a subclass has its own
        # update: that one gets the plain gradients.
        return self.lr if type(self).update is MAML.update else None

    def _scaled_update(self, params, grads):
        return {n: p if grads.get(n) is None else p - grads[n] for n, p in params.items()}

    def extra_repr(self) -> str:
        return f"lr={self.lr}, " + super().extra_repr()

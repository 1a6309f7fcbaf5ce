"""ANIL: Almost No Inner Loop (Raghu et al., 2020): only the head adapts."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import paddle

from ..functional import substituted
from .base import RunningStats
from .maml import MAML

__all__ = ["ANIL"]


class _FeaturesThenHead(paddle.nn.Layer):
    def __init__(self, features: paddle.nn.Layer, head: paddle.nn.Layer):
        super().__init__()
        self.features = features
        self.head = head

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.head(self.features(*args, **kwargs))


class ANIL(MAML):
    """MAML whose inner loop adapts only ``head``; ``features`` get the meta-gradient.

    Protocol and arguments as :class:`MAML`; ``learner(x)`` is ``head(features(x))``.

    Example:
        >>> import paddle
        >>> from paddlefsl.metaopt import ANIL
        >>> features = paddle.nn.Sequential(paddle.nn.Linear(4, 16), paddle.nn.ReLU())
        >>> anil = ANIL(features, paddle.nn.Linear(16, 3), lr=0.5)
        >>> x, y = paddle.randn([6, 4]), paddle.to_tensor([0, 1, 2, 0, 1, 2])
        >>> learner = anil.clone()
        >>> learner.adapt(paddle.nn.functional.cross_entropy(learner(x), y))
        >>> sorted(learner.fast_weights())
        ['head.bias', 'head.weight']

    """

    def __init__(
        self,
        features: paddle.nn.Layer,
        head: paddle.nn.Layer,
        lr: float,
        first_order: bool = False,
        allow_unused: bool = True,
        running_stats: RunningStats = "isolated",
        inner_frozen: Iterable[str] = (),
    ):
        super().__init__(
            _FeaturesThenHead(features, head),
            lr,
            first_order,
            allow_unused,
            running_stats,
            inner_frozen,
        )

    @property
    def features(self) -> paddle.nn.Layer:
        """The shared feature extractor (meta-learned, never adapted)."""
        return self.module.features

    @property
    def head(self) -> paddle.nn.Layer:
        """The head (adapted in the inner loop)."""
        return self.module.head

    def adapted_names(self) -> list[str]:
        """Only the head's parameters."""
        return [name for name in super().adapted_names() if name.startswith("head.")]

    def _adapted_among(self, params: dict[str, paddle.Tensor]) -> list[str]:
        if type(self).adapted_names is ANIL.adapted_names:
            return [name for name in params if name.startswith("head.")]
        return self.adapted_names()

    def embed(self, *args: Any, **kwargs: Any) -> Any:
        """The features of an input: ``features(*args)``, with this clone's statistics.

        The features are never adapted, so their output on a support set is the same at
        every inner step: compute it once and adapt the head on it with
        :meth:`head_forward`, instead of calling the clone (features and head) at every
        step. Second-order meta-gradients still reach the features through it. Drop
        your reference to it before the query pass: the adapted head keeps alive what
        second order needs, and first order needs none of it.

        Example:
            >>> import paddle
            >>> from paddlefsl.metaopt import ANIL
            >>> features = paddle.nn.Sequential(paddle.nn.Linear(4, 16), paddle.nn.ReLU())
            >>> anil = ANIL(features, paddle.nn.Linear(16, 3), lr=0.5)
            >>> x, y = paddle.randn([6, 4]), paddle.to_tensor([0, 1, 2, 0, 1, 2])
            >>> learner = anil.clone()
            >>> support = learner.embed(x)  # once
            >>> for _ in range(3):
            ...     logits = learner.head_forward(support)
            ...     learner.adapt(paddle.nn.functional.cross_entropy(logits, y))
            >>> bool(paddle.allclose(learner(x), learner.head_forward(support)))
            True

        """
        if self._fast is None:
            return self.module.features(*args, **kwargs)
        with (
            substituted(self.module, self._substitutions(), self._index),
            self._features_scope(args, kwargs),
        ):
            return self.module.features(*args, **kwargs)

    def head_forward(self, embedding: Any) -> Any:
        """The head, with this clone's fast weights, on the output of :meth:`embed`.

        Example:
            >>> import paddle
            >>> from paddlefsl.metaopt import ANIL
            >>> anil = ANIL(paddle.nn.Linear(4, 8), paddle.nn.Linear(8, 3), lr=0.5)
            >>> learner = anil.clone()
            >>> x = paddle.randn([2, 4])
            >>> bool(paddle.allclose(learner.head_forward(learner.embed(x)), learner(x)))
            True

        """
        if self._fast is None:
            return self.module.head(embedding)
        with substituted(self.module, self._substitutions(), self._index), self._scope():
            return self.module.head(embedding)

    def _forward_adapted(self, *args: Any, **kwargs: Any) -> Any:
        # The features need no second-order graph: only the head is differentiated twice.
        with self._features_scope(args, kwargs):
            hidden = self.module.features(*args, **kwargs)
        with self._scope():
            return self.module.head(hidden)

    def _features_scope(self, args: tuple, kwargs: dict):
        # adapt() asks for the head only, which the features do not reach: it prunes all
        # of the features' ops. The head's ops get features that require grad but are
        # not adapted, so they stay out of the scope.
        return self._whole_gradient(True, args, kwargs)

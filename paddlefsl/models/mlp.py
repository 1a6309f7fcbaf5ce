"""A plain multi-layer perceptron (the MAML paper's sinusoid regressor)."""

from __future__ import annotations

from collections.abc import Sequence

import paddle
from paddle import nn


class MLP(nn.Layer):
    """Linear layers with ReLU in between, split into ``features`` and ``head``.

    Args:
        in_features: input size.
        hidden: sizes of the hidden layers.
        out_features: output size.

    Example:
        >>> import paddle
        >>> net = MLP(1, [40, 40], 1)  # the MAML sinusoid regressor
        >>> list(net(paddle.zeros([5, 1])).shape)
        [5, 1]

    """

    def __init__(self, in_features: int, hidden: Sequence[int], out_features: int):
        super().__init__()
        layers: list[nn.Layer] = []
        width = in_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.ReLU()]
            width = size
        self.features = nn.Sequential(*layers)
        self.head = nn.Linear(width, out_features)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.features(x))

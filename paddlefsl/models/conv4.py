"""The four-block convolutional backbone of MAML, ANIL and most few-shot papers."""

from __future__ import annotations

from typing import Literal

import paddle
from paddle import nn


def _block(in_channels: int, out_channels: int, pooling: str) -> nn.Sequential:
    stride = 2 if pooling == "stride" else 1
    layers: list[nn.Layer] = [
        nn.Conv2D(in_channels, out_channels, 3, stride=stride, padding=1),
        nn.BatchNorm2D(out_channels),
        nn.ReLU(),
    ]
    if pooling == "max":
        layers.append(nn.MaxPool2D(2))
    return nn.Sequential(*layers)


def conv4_feature_size(hidden: int, image_size: int, pooling: str) -> int:
    """Length of the flattened feature vector for a square input."""
    if pooling == "stride":
        return hidden  # spatial mean, as in the MAML reference code
    size = image_size
    for _ in range(4):
        size //= 2
    return hidden * size * size


class Conv4(nn.Layer):
    """Four blocks of conv3x3 + BatchNorm + ReLU (+ 2x2 max-pool), then a linear head.

    ``pooling="max"`` is the miniImageNet network of MAML (and the usual Conv4);
    ``pooling="stride"`` is MAML's Omniglot network: stride-2 convolutions, no max-pool,
    and a spatial mean before the head (Finn et al., 2017, Sec. 5.2; cbfinn/maml
    ``utils.conv_block`` and ``models.forward_conv``).

    Args:
        in_channels: image channels (1 for Omniglot, 3 for miniImageNet).
        num_classes: outputs of the head (ways).
        hidden: channels of every conv (64 for Omniglot, 32 for miniImageNet in MAML).
        pooling: ``"max"`` or ``"stride"``.
        image_size: input height = width (to size the head).

    Example:
        >>> import paddle
        >>> net = Conv4(1, 5, hidden=64, pooling="stride", image_size=28)
        >>> list(net(paddle.zeros([2, 1, 28, 28])).shape)
        [2, 5]
        >>> list(net.features(paddle.zeros([2, 1, 28, 28])).shape)  # ANIL splits here
        [2, 64]

    """

    def __init__(
        self,
        in_channels: int,
        num_classes: int,
        hidden: int = 64,
        pooling: Literal["max", "stride"] = "max",
        image_size: int = 84,
    ):
        super().__init__()
        if pooling not in ("max", "stride"):
            raise ValueError(f"pooling must be 'max' or 'stride', got {pooling!r}")
        blocks = [_block(in_channels if i == 0 else hidden, hidden, pooling) for i in range(4)]
        if pooling == "stride":
            blocks.append(nn.AdaptiveAvgPool2D(1))
        blocks.append(nn.Flatten())
        self.features = nn.Sequential(*blocks)
        self.head = nn.Linear(conv4_feature_size(hidden, image_size, pooling), num_classes)

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.features(x))

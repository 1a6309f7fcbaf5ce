"""The four-block convolutional backbone of MAML, ANIL and most few-shot papers."""

from __future__ import annotations

from typing import Literal

import paddle
from paddle import nn

from .layers import BatchNormReLU2D, SamePadConv2D

Init = Literal["paddle", "maml"]
Padding = Literal["symmetric", "same"]


def _block(
    in_channels: int,
    out_channels: int,
    pooling: str,
    norm_scale: bool,
    norm_epsilon: float,
    init: Init,
    padding: Padding,
) -> nn.Sequential:
    stride = 2 if pooling == "stride" else 1
    conv_weight = _xavier() if init == "maml" else None
    # A scale fixed at 1 (not trainable) rather than none: the same normalisation as
    # no scale, on Paddle's usual BatchNorm path.
    scale = (
        None
        if norm_scale
        else paddle.ParamAttr(initializer=nn.initializer.Constant(1.0), trainable=False)
    )
    # BatchNorm and ReLU as one layer (the same parameters and state-dict keys as
    # BatchNorm2D): on the CPU kernels one fused pass each way instead of two.
    conv = (
        SamePadConv2D(in_channels, out_channels, 3, stride=stride, weight_attr=conv_weight)
        if padding == "same"
        else nn.Conv2D(
            in_channels, out_channels, 3, stride=stride, padding=1, weight_attr=conv_weight
        )
    )
    layers: list[nn.Layer] = [
        conv,
        BatchNormReLU2D(out_channels, epsilon=norm_epsilon, weight_attr=scale),
    ]
    if pooling == "max":
        layers.append(nn.MaxPool2D(2))
    return nn.Sequential(*layers)


def _xavier() -> paddle.ParamAttr:
    return paddle.ParamAttr(initializer=nn.initializer.XavierUniform())


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
        norm_scale: whether BatchNorm has a trainable scale (Paddle's default); ``False``
            fixes it at 1, as TensorFlow's ``batch_norm`` default in cbfinn/maml.
        norm_epsilon: BatchNorm's epsilon (Paddle's 1e-5; cbfinn/maml's TensorFlow 1e-3).
        init: ``"paddle"`` (Paddle's defaults: Kaiming-normal convolutions,
            Xavier-uniform head) or ``"maml"`` (cbfinn/maml ``construct_conv_weights``:
            Xavier-uniform convolutions, and for ``pooling="stride"`` a standard-normal
            head). Biases start at zero either way.
        padding: ``"symmetric"`` (1 pixel on every side) or ``"same"``, TensorFlow's
            ``SAME`` as in cbfinn/maml (:class:`SamePadConv2D`): with stride 2 it pads
            the odd pixel below and right only (28 -> 14: 0 above, 1 below), so it samples
            a grid one pixel off the symmetric one. With stride 1 (``pooling="max"``)
            the two are the same.

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
        norm_scale: bool = True,
        norm_epsilon: float = 1e-5,
        init: Init = "paddle",
        padding: Padding = "symmetric",
    ):
        super().__init__()
        if pooling not in ("max", "stride"):
            raise ValueError(f"pooling must be 'max' or 'stride', got {pooling!r}")
        if init not in ("paddle", "maml"):
            raise ValueError(f"init must be 'paddle' or 'maml', got {init!r}")
        if padding not in ("symmetric", "same"):
            raise ValueError(f"padding must be 'symmetric' or 'same', got {padding!r}")
        blocks = [
            _block(
                in_channels if i == 0 else hidden,
                hidden,
                pooling,
                norm_scale,
                norm_epsilon,
                init,
                padding,
            )
            for i in range(4)
        ]
        if pooling == "stride":
            blocks.append(nn.AdaptiveAvgPool2D(1))
        blocks.append(nn.Flatten())
        self.features = nn.Sequential(*blocks)
        head_weight = None
        if init == "maml":  # the reference code's fc_initializer, or N(0, 1) without pooling
            head_weight = (
                paddle.ParamAttr(initializer=nn.initializer.Normal(0.0, 1.0))
                if pooling == "stride"
                else _xavier()
            )
        self.head = nn.Linear(
            conv4_feature_size(hidden, image_size, pooling), num_classes, weight_attr=head_weight
        )

    def batch_norm_offsets(self) -> list[str]:
        """Structured names of the BatchNorm offsets (biases), e.g. for ``inner_frozen``.

        Example:
            >>> Conv4(1, 5, hidden=4, pooling="stride", image_size=28).batch_norm_offsets()[0]
            'features.0.1.bias'

        """
        return [
            f"{name}.bias"
            for name, layer in self.named_sublayers()
            if isinstance(layer, nn.BatchNorm2D) and layer.bias is not None
        ]

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        return self.head(self.features(x))

"""Layers that fuse common pairs of layers into one op, and TensorFlow-style padding."""

from __future__ import annotations

import paddle
import paddle.nn.functional as F  # noqa: N812
from paddle import nn

from paddlefsl.ops import batch_norm_relu


class BatchNormReLU2D(nn.BatchNorm2D):
    """``BatchNorm2D`` followed by ReLU, run as one fused op where the CPU kernels can.

    A drop-in for ``nn.Sequential(nn.BatchNorm2D(c), nn.ReLU())``: the same parameters
    and buffers (``weight``, ``bias``, ``_mean``, ``_variance``, so the same state-dict
    keys as ``BatchNorm2D``), the same outputs and gradients, to any order. In training
    mode on float32 CPU tensors the normalisation and the rectification are one kernel
    forward and one backward (:func:`paddlefsl.ops.batch_norm_relu`), which saves two
    passes over the activations and two op dispatches each way; otherwise it runs the
    two layers' functions one after the other.

    It takes the arguments of ``paddle.nn.BatchNorm2D`` (``num_features``, ``momentum``,
    ``epsilon``, ``weight_attr``, ``bias_attr``, ``data_format``, ``use_global_stats``).

    Example:
        >>> import paddle
        >>> fused = BatchNormReLU2D(4)
        >>> pair = paddle.nn.Sequential(paddle.nn.BatchNorm2D(4), paddle.nn.ReLU())
        >>> _ = pair[0].set_state_dict(fused.state_dict())
        >>> x = paddle.randn([8, 4, 5, 5])
        >>> bool(paddle.allclose(fused(x), pair(x), atol=1e-5))
        True

    """

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        self._check_data_format(self._data_format)
        self._check_input_dim(x)
        return batch_norm_relu(
            x,
            self._mean,
            self._variance,
            self.weight,
            self.bias,
            training=self.training,
            momentum=self._momentum,
            epsilon=self._epsilon,
            data_format=self._data_format,
            use_global_stats=self._use_global_stats,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", then ReLU"


def same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
    """``(before, after)`` padding of TensorFlow's ``SAME`` along one axis of ``size``.

    The output has ``ceil(size / stride)`` positions; an odd total goes after (below,
    right), so a stride-2 3x3 convolution of 28 pixels pads 0 before and 1 after where
    ``padding=1`` pads 1 on both sides (and samples a grid one pixel off).

    Example:
        >>> same_padding(28, 3, 2), same_padding(7, 3, 2), same_padding(28, 3, 1)
        ((0, 1), (1, 1), (1, 1))

    """
    out = -(-size // stride)
    total = max((out - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class SamePadConv2D(nn.Conv2D):
    """``nn.Conv2D`` that pads as TensorFlow's ``padding="SAME"`` for its input's size.

    The same parameters and state-dict keys as ``nn.Conv2D`` (``weight``, ``bias``); the
    padding is computed from each input's height and width and handed to the convolution
    as ``[top, bottom, left, right]`` where the two sides differ, which paddlefsl's fast
    kernels and Paddle's own take (exact to any order of differentiation), so it costs
    no more than symmetric padding. Takes ``nn.Conv2D``'s arguments except ``padding``
    (NCHW, dilation 1).

    Example:
        >>> import paddle
        >>> conv = SamePadConv2D(1, 4, 3, stride=2)
        >>> [list(conv(paddle.zeros([2, 1, n, n])).shape) for n in (28, 7)]
        [[2, 4, 14, 14], [2, 4, 4, 4]]

    """

    def __init__(self, *args, **kwargs) -> None:
        if "padding" in kwargs or len(args) > 4:
            raise ValueError("SamePadConv2D computes its own padding; do not pass one")
        super().__init__(*args, padding=0, **kwargs)
        if self._data_format != "NCHW" or list(self._dilation) != [1, 1]:
            raise ValueError("SamePadConv2D supports NCHW inputs with dilation 1 only")

    def forward(self, x: paddle.Tensor) -> paddle.Tensor:
        (kh, kw), (sh, sw) = self._kernel_size, self._stride
        top, bottom = same_padding(x.shape[2], kh, sh)
        left, right = same_padding(x.shape[3], kw, sw)
        padding = [top, left] if (top, left) == (bottom, right) else [top, bottom, left, right]
        # As nn.Conv2D.forward calls it (F.conv2d adds the bias separately in eager mode):
        # paddlefsl's conv ops fold the bias into the convolution on this path.
        return F.conv._conv_nd(
            x,
            self.weight,
            bias=self.bias,
            stride=self._stride,
            padding=padding,
            padding_algorithm="EXPLICIT",
            dilation=self._dilation,
            groups=self._groups,
            data_format=self._data_format,
            channel_dim=self._channel_dim,
            op_type=self._op_type,
            use_cudnn=self._use_cudnn,
        )

    def extra_repr(self) -> str:
        return super().extra_repr() + ", TensorFlow SAME padding"

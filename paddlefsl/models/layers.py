"""Layers that fuse common pairs of layers into one op (same parameters, same results)."""

from __future__ import annotations

import paddle
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

"""Multi-threaded float32 CPU kernels for the memory-bound layers of few-shot CNNs.

Per-channel bias, ReLU, train-mode BatchNorm and max pooling, forward and first-order
backward, and BatchNorm's double backward (second-order MAML). Paddle 3.3.1 runs these
on one thread, and its per-channel broadcast add and BatchNorm statistics well below
memory bandwidth (a Conv4 bias add on a query batch: 162 ms against 16 ms here on 2
threads). The loops live in ``_cpu_kernels.cc``, built into
the same library as the oneDNN convolutions (:mod:`paddlefsl.ops.onednn`), so they are
available exactly when those are and use the same thread count
(:func:`paddlefsl.ops.onednn.set_threads`, set by :func:`paddlefsl.runtime.use_cores`).

The functions are raw: they record no autograd graph. The replacements in
:mod:`paddlefsl.ops` call them for the forward pass and for first-order backward passes.
A BatchNorm backward pass that is itself recorded (``create_graph=True``, MAML's inner
step) becomes one graph node whose own backward is :func:`batch_norm_double_backward`;
a third recorded pass falls back to its differentiable closed form. Other layers' recorded
backward passes take the differentiable formulas.

Example:
    >>> import paddle
    >>> from paddlefsl.ops import cpu_kernels
    >>> x, b = paddle.randn([2, 3, 4, 4]), paddle.randn([3])
    >>> if cpu_kernels.usable(x):
    ...     y = cpu_kernels.channel_bias_add(x, b)
    ... else:  # no compiler, or PADDLEFSL_ONEDNN=0
    ...     y = x + b.reshape([1, 3, 1, 1])
    >>> list(y.shape)
    [2, 3, 4, 4]

"""

from __future__ import annotations

import os
from collections.abc import Sequence

import paddle

from . import onednn
from ._common import cpu_only_build

__all__ = [
    "usable",
    "channel_bias_add",
    "channel_sum",
    "relu",
    "relu_backward",
    "batch_norm_train",
    "batch_norm_backward",
    "batch_norm_double_backward",
    "batch_norm_relu_train",
    "batch_norm_relu_backward",
    "batch_norm_relu_mask",
    "batch_norm_relu_double_backward",
    "max_pool2d",
    "max_pool2d_backward",
]

_ENV_SWITCH = "PADDLEFSL_CPU_KERNELS"


def usable(*tensors: paddle.Tensor) -> bool:
    """Whether the kernels can take these tensors: float32 on the CPU, library built.

    ``PADDLEFSL_CPU_KERNELS=0`` turns them off (the oneDNN convolutions stay on).
    Never raises; the first call may build the library (see :mod:`paddlefsl.ops.onednn`).
    Called on every layer call, so it is kept to a few microseconds.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> cpu_kernels.usable(paddle.zeros([2], dtype="float64"))
        False

    """
    switch = os.environ.get(_ENV_SWITCH)
    if (switch is not None and switch.strip().lower() in _OFF) or not onednn.available():
        return False
    float32 = paddle.float32
    cpu_only = cpu_only_build()  # every tensor is on the CPU: skip the (slower) place queries
    for t in tensors:  # a plain loop: a generator costs more here
        if t.dtype != float32 or not (cpu_only or t.place.is_cpu_place()):
            return False
    return True


_OFF = frozenset({"0", "false", "no", "off"})


def channel_bias_add(x: paddle.Tensor, bias: paddle.Tensor) -> paddle.Tensor:
    """``x + bias`` broadcast along axis 1 of ``x`` ([N, C, ...]); ``bias`` has C entries.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x = paddle.zeros([2, 3, 4])
        >>> if cpu_kernels.usable(x):
        ...     y = cpu_kernels.channel_bias_add(x, paddle.to_tensor([1.0, 2.0, 3.0]))
        ...     print(y[1, :, 0].tolist())
        ... else:
        ...     print([1.0, 2.0, 3.0])
        [1.0, 2.0, 3.0]

    """
    return onednn.run_op("pfsl_channel_bias_add", x, bias.reshape([-1]))[0]


def channel_sum(dy: paddle.Tensor) -> paddle.Tensor:
    """Sum over every axis of ``dy`` ([N, C, ...]) but axis 1: shape [C].

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> dy = paddle.ones([2, 3, 4])
        >>> cpu_kernels.channel_sum(dy).tolist() if cpu_kernels.usable(dy) else [8.0] * 3
        [8.0, 8.0, 8.0]

    """
    return onednn.run_op("pfsl_channel_sum", dy)[0]


def relu(x: paddle.Tensor) -> paddle.Tensor:
    """``max(x, 0)``.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x = paddle.to_tensor([-1.0, 2.0])
        >>> cpu_kernels.relu(x).tolist() if cpu_kernels.usable(x) else [0.0, 2.0]
        [0.0, 2.0]

    """
    return onednn.run_op("pfsl_relu", x)[0]


def relu_backward(y: paddle.Tensor, dy: paddle.Tensor) -> paddle.Tensor:
    """The input gradient of ReLU from its output ``y``: ``dy`` where ``y > 0``, else 0.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> y, dy = paddle.to_tensor([0.0, 2.0]), paddle.to_tensor([5.0, 5.0])
        >>> cpu_kernels.relu_backward(y, dy).tolist() if cpu_kernels.usable(y) else [0.0, 5.0]
        [0.0, 5.0]

    """
    return onednn.run_op("pfsl_relu_backward", y, dy)[0]


def batch_norm_train(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor,
    running_mean: paddle.Tensor,
    running_var: paddle.Tensor,
    momentum: float,
    epsilon: float,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Train-mode batch norm of channel-first ``x``: ``(y, batch_mean, inv_std)``.

    Normalises with the biased batch variance and updates the running statistics in
    place (``running = momentum * running + (1 - momentum) * batch``), as Paddle's
    kernel does; ``inv_std = 1 / sqrt(var + epsilon)`` per channel.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x = paddle.to_tensor([[1.0], [3.0]])  # N=2, C=1
        >>> stats = [paddle.zeros([1]), paddle.ones([1])]
        >>> if cpu_kernels.usable(x):
        ...     y, mean, inv_std = cpu_kernels.batch_norm_train(
        ...         x, paddle.ones([1]), paddle.zeros([1]), *stats, 0.9, 0.0)
        ...     print(y.flatten().tolist(), mean.tolist(), round(float(stats[0][0]), 2))
        ... else:
        ...     print([-1.0, 1.0], [2.0], 0.2)
        [-1.0, 1.0] [2.0] 0.2

    """
    return _train(
        "pfsl_batch_norm_train", x, weight, bias, running_mean, running_var, momentum, epsilon
    )


def batch_norm_backward(
    x: paddle.Tensor,
    dy: paddle.Tensor,
    weight: paddle.Tensor,
    mean: paddle.Tensor,
    inv_std: paddle.Tensor,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """First-order gradients ``(dx, dweight, dbias)`` of :func:`batch_norm_train`.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x, dy = paddle.to_tensor([[1.0], [3.0]]), paddle.to_tensor([[1.0], [1.0]])
        >>> if cpu_kernels.usable(x):  # a constant dy moves only the bias
        ...     dx, dw, db = cpu_kernels.batch_norm_backward(
        ...         x, dy, paddle.ones([1]), paddle.to_tensor([2.0]), paddle.to_tensor([1.0]))
        ...     print(dx.flatten().tolist(), dw.tolist(), db.tolist())
        ... else:
        ...     print([0.0, 0.0], [0.0], [2.0])
        [0.0, 0.0] [0.0] [2.0]

    """
    dx, dw, db = onednn.run_op("pfsl_batch_norm_backward", x, dy, weight, mean, inv_std)
    return dx, dw, db


def batch_norm_double_backward(
    x: paddle.Tensor,
    dy: paddle.Tensor,
    weight: paddle.Tensor,
    mean: paddle.Tensor,
    inv_std: paddle.Tensor,
    ddx: paddle.Tensor | None,
    ddweight: paddle.Tensor | None,
    ddbias: paddle.Tensor | None,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Second-order gradients of train-mode BatchNorm, in one pass over the data.

    The vector-Jacobian product of ``(dx, dweight, dbias) = batch_norm_backward(x, dy,
    weight, ...)`` with the upstream gradients ``(ddx, ddweight, ddbias)``: returns the
    gradients ``(gx, gweight, gdy)`` of ``sum(ddx * dx) + ddweight . dweight + ddbias .
    dbias`` with respect to ``x`` (through the batch statistics too), ``weight`` and
    ``dy``. ``None`` stands for a zero upstream gradient.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x, dy = paddle.to_tensor([[1.0], [3.0]]), paddle.to_tensor([[1.0], [-1.0]])
        >>> if cpu_kernels.usable(x):  # d(dweight)/d(dy) is the normalised input
        ...     gx, gw, gdy = cpu_kernels.batch_norm_double_backward(
        ...         x, dy, paddle.ones([1]), paddle.to_tensor([2.0]), paddle.to_tensor([1.0]),
        ...         None, paddle.ones([1]), None)
        ...     print(gx.flatten().tolist(), gw.tolist(), gdy.flatten().tolist())
        ... else:
        ...     print([0.0, 0.0], [0.0], [-1.0, 1.0])
        [0.0, 0.0] [0.0] [-1.0, 1.0]

    """
    inputs = (x, dy, weight, mean, inv_std)
    return _double_backward("pfsl_batch_norm_double_backward", inputs, ddx, ddweight, ddbias)


def _double_backward(op: str, inputs: tuple, ddx, ddweight, ddbias):
    """Run a BatchNorm double-backward op on ``inputs`` and the upstream gradients.

    ``inputs`` starts with ``x`` and its third entry is the weight: they stand in for the
    absent gradients, which the kernel never reads (a bit of ``present`` says which are).
    """
    x, weight = inputs[0], inputs[2]
    present = (ddx is not None) | (ddweight is not None) << 1 | (ddbias is not None) << 2
    gx, gw, g = onednn.run_op(
        op,
        *inputs,
        x if ddx is None else ddx,
        weight if ddweight is None else ddweight,
        weight if ddbias is None else ddbias,
        present,
    )
    return gx, gw, g


def batch_norm_relu_train(
    x: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor,
    running_mean: paddle.Tensor,
    running_var: paddle.Tensor,
    momentum: float,
    epsilon: float,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """:func:`batch_norm_train` followed by ReLU, in the same pass: ``(relu(y), mean, inv_std)``.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x = paddle.to_tensor([[1.0], [3.0]])  # N=2, C=1
        >>> stats = [paddle.zeros([1]), paddle.ones([1])]
        >>> if cpu_kernels.usable(x):
        ...     z, mean, inv_std = cpu_kernels.batch_norm_relu_train(
        ...         x, paddle.ones([1]), paddle.zeros([1]), *stats, 0.9, 0.0)
        ...     print(z.flatten().tolist())
        ... else:
        ...     print([0.0, 1.0])
        [0.0, 1.0]

    """
    return _train(
        "pfsl_batch_norm_relu_train", x, weight, bias, running_mean, running_var, momentum, epsilon
    )


def _train(op: str, x, weight, bias, running_mean, running_var, momentum, epsilon):
    out, mean, inv_std = onednn.run_op(
        op, x, weight, bias, running_mean, running_var, float(momentum), float(epsilon)
    )
    return out, mean, inv_std


def batch_norm_relu_backward(
    x: paddle.Tensor,
    dz: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor,
    mean: paddle.Tensor,
    inv_std: paddle.Tensor,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """First-order gradients ``(dx, dweight, dbias)`` of :func:`batch_norm_relu_train`.

    The ReLU's mask is recomputed from ``x`` and the statistics (exactly the forward's),
    so the output is not read.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x, dz = paddle.to_tensor([[1.0], [3.0]]), paddle.to_tensor([[1.0], [1.0]])
        >>> if cpu_kernels.usable(x):  # only the positive output passes its gradient
        ...     dx, dw, db = cpu_kernels.batch_norm_relu_backward(
        ...         x, dz, paddle.ones([1]), paddle.zeros([1]),
        ...         paddle.to_tensor([2.0]), paddle.to_tensor([1.0]))
        ...     print(dx.flatten().tolist(), dw.tolist(), db.tolist())
        ... else:
        ...     print([0.0, 0.0], [1.0], [1.0])
        [0.0, 0.0] [1.0] [1.0]

    """
    dx, dw, db = onednn.run_op("pfsl_batch_norm_relu_backward", x, dz, weight, bias, mean, inv_std)
    return dx, dw, db


def batch_norm_relu_double_backward(
    x: paddle.Tensor,
    dz: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor,
    mean: paddle.Tensor,
    inv_std: paddle.Tensor,
    ddx: paddle.Tensor | None,
    ddweight: paddle.Tensor | None,
    ddbias: paddle.Tensor | None,
) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor]:
    """Second-order gradients of :func:`batch_norm_relu_backward`, in one pass.

    :func:`batch_norm_double_backward` with ``dy`` = ``dz`` through the fused forward's
    ReLU mask (recomputed from ``x``, exactly the forward's), and the gradient for ``dz``
    masked the same way: ``(gx, gweight, gdz)``, equal bit for bit to masking ``dz`` with
    :func:`batch_norm_relu_mask`, calling :func:`batch_norm_double_backward`, and masking
    its ``gdy``. ``None`` stands for a zero upstream gradient.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x, dz = paddle.to_tensor([[1.0], [3.0]]), paddle.to_tensor([[1.0], [-1.0]])
        >>> if cpu_kernels.usable(x):  # the first output was cut by the ReLU: no gradient
        ...     gx, gw, gdz = cpu_kernels.batch_norm_relu_double_backward(
        ...         x, dz, paddle.ones([1]), paddle.zeros([1]), paddle.to_tensor([2.0]),
        ...         paddle.to_tensor([1.0]), None, paddle.ones([1]), None)
        ...     print(gdz.flatten().tolist())
        ... else:
        ...     print([0.0, 1.0])
        [0.0, 1.0]

    """
    inputs = (x, dz, weight, bias, mean, inv_std)
    return _double_backward("pfsl_batch_norm_relu_double_backward", inputs, ddx, ddweight, ddbias)


def batch_norm_relu_mask(
    x: paddle.Tensor,
    dz: paddle.Tensor,
    weight: paddle.Tensor,
    bias: paddle.Tensor,
    mean: paddle.Tensor,
    inv_std: paddle.Tensor,
) -> paddle.Tensor:
    """``dz`` where :func:`batch_norm_relu_train`'s output was positive, else 0.

    The ReLU's part of :func:`batch_norm_relu_backward` alone, the mask recomputed from
    ``x`` and the statistics exactly as the forward computed it. Linear in ``dz``.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x, dz = paddle.to_tensor([[1.0], [3.0]]), paddle.to_tensor([[5.0], [5.0]])
        >>> if cpu_kernels.usable(x):  # pre-ReLU outputs -1 and 1
        ...     print(cpu_kernels.batch_norm_relu_mask(
        ...         x, dz, paddle.ones([1]), paddle.zeros([1]),
        ...         paddle.to_tensor([2.0]), paddle.to_tensor([1.0])).flatten().tolist())
        ... else:
        ...     print([0.0, 5.0])
        [0.0, 5.0]

    """
    return onednn.run_op("pfsl_batch_norm_relu_mask", x, dz, weight, bias, mean, inv_std)[0]


def max_pool2d(
    x: paddle.Tensor, kernel: Sequence[int], strides: Sequence[int], paddings: Sequence[int]
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """Max pooling of NCHW ``x`` (floor mode): ``(y, index)``.

    ``index`` (int32) is the position of each window's first maximum in its input plane,
    ``h * W + w``, as in Paddle's ``max_pool2d_with_index``.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> x = paddle.to_tensor([[[[1.0, 4.0], [3.0, 2.0]]]])
        >>> if cpu_kernels.usable(x):
        ...     y, index = cpu_kernels.max_pool2d(x, [2, 2], [2, 2], [0, 0])
        ...     print(y.flatten().tolist(), index.flatten().tolist())
        ... else:
        ...     print([4.0], [1])
        [4.0] [1]

    """
    y, index = onednn.run_op(
        "pfsl_max_pool2d",
        x,
        [int(k) for k in kernel],
        [int(s) for s in strides],
        [int(p) for p in paddings],
    )
    return y, index


def max_pool2d_backward(
    index: paddle.Tensor, dy: paddle.Tensor, input_hw: Sequence[int]
) -> paddle.Tensor:
    """The input gradient of :func:`max_pool2d`: each ``dy`` routed to its window's max.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import cpu_kernels
        >>> index, dy = paddle.to_tensor([[[[1]]]], "int32"), paddle.to_tensor([[[[7.0]]]])
        >>> if cpu_kernels.usable(dy):
        ...     print(cpu_kernels.max_pool2d_backward(index, dy, [2, 2]).flatten().tolist())
        ... else:
        ...     print([0.0, 7.0, 0.0, 0.0])
        [0.0, 7.0, 0.0, 0.0]

    """
    return onednn.run_op("pfsl_max_pool2d_backward", index, dy, [int(v) for v in input_hw])[0]

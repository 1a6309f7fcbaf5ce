"""Name-keyed views of a Layer's tensors."""

from __future__ import annotations

import paddle

__all__ = ["adaptable_parameters", "running_statistics"]


def adaptable_parameters(layer: paddle.nn.Layer) -> dict[str, paddle.Tensor]:
    """The parameters an inner loop may adapt, keyed by structured name.

    Frozen parameters (``stop_gradient=True``) are left out; in Paddle that includes
    BatchNorm running statistics, which are ``Parameter`` objects. Tied parameters appear
    once, under their first name.

    Example:
        >>> import paddle
        >>> net = paddle.nn.Sequential(paddle.nn.Linear(2, 3), paddle.nn.BatchNorm1D(3))
        >>> sorted(adaptable_parameters(net))
        ['0.bias', '0.weight', '1.bias', '1.weight']

    """
    return {name: p for name, p in layer.named_parameters() if not p.stop_gradient}


def running_statistics(layer: paddle.nn.Layer) -> dict[str, paddle.Tensor]:
    """Frozen parameters and buffers that a forward pass may update in place.

    These are BatchNorm's ``_mean`` / ``_variance`` and any registered buffer.

    Example:
        >>> import paddle
        >>> sorted(running_statistics(paddle.nn.BatchNorm1D(3)))
        ['_mean', '_variance']

    """
    stats = {name: p for name, p in layer.named_parameters() if p.stop_gradient}
    stats.update({name: b for name, b in layer.named_buffers() if b is not None})
    return stats

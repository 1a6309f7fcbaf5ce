"""Run an unmodified Layer with substituted tensors."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import paddle

from .params import TensorIndex, index_tensors

__all__ = ["substituted", "functional_call"]


@contextmanager
def substituted(
    layer: paddle.nn.Layer,
    tensors: Mapping[str, paddle.Tensor],
    index: TensorIndex | None = None,
) -> Iterator[None]:
    """Temporarily replace named parameters/buffers of ``layer`` by other tensors.

    Names are those of ``named_parameters()`` / ``named_buffers()``. The Layer's own
    tensors are put back when the block exits, also on error, so the model object is
    unchanged afterwards. Inside the block, in-place updates that the forward pass makes
    (BatchNorm running statistics) land in the substituted tensors.

    Args:
        layer: any ``paddle.nn.Layer``.
        tensors: structured name -> tensor to use instead.
        index: ``index_tensors(layer)``, to skip walking the Layer on every call when it
            is called many times (the Layer's structure must not have changed since).

    Raises:
        KeyError: a name that is not a parameter or buffer of ``layer``.

    Example:
        >>> import paddle
        >>> net = paddle.nn.Linear(2, 1)
        >>> zero = {"weight": paddle.zeros([2, 1]), "bias": paddle.zeros([1])}
        >>> with substituted(net, zero):
        ...     float(net(paddle.ones([1, 2])).sum())
        0.0

    """
    if index is None:
        index = index_tensors(layer)
    own = index.tensors
    unknown = [name for name in tensors if name not in own]
    if unknown:
        raise KeyError(
            f"{unknown[:5]} are not parameters or buffers of {type(layer).__name__}; "
            f"expected names like {list(own)[:5]}"
        )
    slots = index.slots
    saved: list[tuple[dict, str, paddle.Tensor]] = []
    rnn_lists: list[tuple[paddle.nn.Layer, list]] = []
    try:
        for name, tensor in tensors.items():
            for store, key in slots[id(own[name])]:
                saved.append((store, key, store[key]))
                store[key] = tensor
        if index.fused_rnns:
            # Fused RNN kernels read their weights from this private list, not _parameters.
            replaced_ids = {id(own[name]): tensor for name, tensor in tensors.items()}
            for sub in index.fused_rnns:
                weights = sub.__dict__["_all_weights"]
                rnn_lists.append((sub, weights))
                sub.__dict__["_all_weights"] = [replaced_ids.get(id(w), w) for w in weights]
        yield
    finally:
        for store, key, original in reversed(saved):
            store[key] = original
        for sub, weights in rnn_lists:
            sub.__dict__["_all_weights"] = weights


def functional_call(
    layer: paddle.nn.Layer,
    tensors: Mapping[str, paddle.Tensor],
    *args: Any,
    **kwargs: Any,
) -> Any:
    """Call ``layer(*args, **kwargs)`` with some parameters/buffers replaced.

    Example:
        >>> import paddle
        >>> net = paddle.nn.Linear(2, 1)
        >>> out = functional_call(net, {"bias": paddle.full([1], 5.0)}, paddle.zeros([1, 2]))
        >>> float(out.sum())
        5.0

    """
    with substituted(layer, tensors):
        return layer(*args, **kwargs)

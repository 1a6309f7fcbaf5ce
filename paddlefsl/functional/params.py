"""Name-keyed views of a Layer's tensors."""

from __future__ import annotations

from dataclasses import dataclass, field

import paddle

__all__ = ["adaptable_parameters", "running_statistics", "TensorIndex", "index_tensors"]


@dataclass
class TensorIndex:
    """A Layer's tensors by structured name, and every dict slot that holds each one.

    Attributes:
        parameters: as ``named_parameters()`` (tied parameters once, first name).
        buffers: as ``named_buffers()``, without ``None`` entries.
        slots: ``id(tensor)`` -> every ``(store, key)`` with ``store[key] is tensor``,
            over the ``_parameters`` and ``_buffers`` dicts of all sublayers (a tensor
            can sit in several: tied weights, fused RNN layers).
        sublayers: the Layer and its sublayers, each once, in ``named_sublayers`` order.
        tensors: ``parameters`` and ``buffers`` in one dict.
        fused_rnns: the sublayers whose fused kernels read a private ``_all_weights``
            list instead of ``_parameters``.

    """

    parameters: dict[str, paddle.Tensor]
    buffers: dict[str, paddle.Tensor]
    slots: dict[int, list[tuple[dict, str]]]
    sublayers: list[paddle.nn.Layer]
    tensors: dict[str, paddle.Tensor] = field(default_factory=dict)
    fused_rnns: list[paddle.nn.Layer] = field(default_factory=list)


def index_tensors(layer: paddle.nn.Layer) -> TensorIndex:
    """Parameters, buffers, sublayers and tensor slots of ``layer`` from one walk.

    The same names and order as ``named_parameters``, ``named_buffers`` and
    ``named_sublayers(include_self=True)``. Every call of a clone needs this; Paddle's
    nested generators take several times longer per walk, and a walk per view.

    Example:
        >>> import paddle
        >>> index = index_tensors(paddle.nn.Sequential(paddle.nn.Linear(2, 3)))
        >>> list(index.parameters)
        ['0.weight', '0.bias']

    """
    sublayers = _sublayers(layer)
    slots: dict[int, list[tuple[dict, str]]] = {}
    for _, sub in sublayers:
        for store in (sub._parameters, sub._buffers):
            for key, tensor in store.items():
                if tensor is not None:
                    slots.setdefault(id(tensor), []).append((store, key))
    parameters = _named(sublayers, "_parameters")
    buffers = _named(sublayers, "_buffers")
    layers = [sub for _, sub in sublayers]
    fused_rnns = [sub for sub in layers if isinstance(sub.__dict__.get("_all_weights"), list)]
    return TensorIndex(parameters, buffers, slots, layers, {**parameters, **buffers}, fused_rnns)


def _sublayers(layer: paddle.nn.Layer) -> list[tuple[str, paddle.nn.Layer]]:
    """``named_sublayers(include_self=True)`` as a list, without nested generators."""
    found: list[tuple[str, paddle.nn.Layer]] = []
    seen: set[int] = set()

    def visit(prefix: str, sub: paddle.nn.Layer) -> None:
        seen.add(id(sub))
        found.append((prefix, sub))
        for key, child in sub._sub_layers.items():
            if child is not None and id(child) not in seen:
                visit(f"{prefix}.{key}" if prefix else key, child)

    visit("", layer)
    return found


def _named(sublayers: list[tuple[str, paddle.nn.Layer]], attribute: str) -> dict:
    """``named_parameters()`` (``attribute="_parameters"``) or ``named_buffers()``."""
    names: dict[str, paddle.Tensor] = {}
    named: set[int] = set()
    for prefix, sub in sublayers:
        for key, tensor in sub.__dict__[attribute].items():
            if tensor is not None and id(tensor) not in named:
                named.add(id(tensor))
                names[f"{prefix}.{key}" if prefix else key] = tensor
    return names


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
    parameters = _named(_sublayers(layer), "_parameters")
    return {name: p for name, p in parameters.items() if not p.stop_gradient}


def running_statistics(layer: paddle.nn.Layer) -> dict[str, paddle.Tensor]:
    """Frozen parameters and buffers that a forward pass may update in place.

    These are BatchNorm's ``_mean`` / ``_variance`` and any registered buffer.

    Example:
        >>> import paddle
        >>> sorted(running_statistics(paddle.nn.BatchNorm1D(3)))
        ['_mean', '_variance']

    """
    sublayers = _sublayers(layer)
    stats = {name: p for name, p in _named(sublayers, "_parameters").items() if p.stop_gradient}
    stats.update(_named(sublayers, "_buffers"))
    return stats

"""Helpers shared by the op replacements."""

from __future__ import annotations

import math
from collections.abc import Sequence

import paddle

Tensor = paddle.Tensor


def tracks_grad(*tensors: Tensor | None) -> bool:
    """Whether autograd will record an op on these inputs."""
    # A plain loop: called several times per layer call, where a generator costs more.
    for t in tensors:
        if isinstance(t, Tensor) and not t.stop_gradient:
            return paddle.is_grad_enabled()
    return False


def softplus(x: Tensor) -> Tensor:
    """``log(1 + exp(x))`` from ops with double gradients, without overflow.

    ``relu(x) + log(1 + exp(-|x|))``; used by the rebuilt Mish, LogSigmoid and
    binary cross-entropy with logits.
    """
    return paddle.nn.functional.relu(x) + paddle.log(1.0 + paddle.exp(-paddle.abs(x)))


def numel(t: Tensor) -> int:
    """Element count; ``Tensor.size`` builds a NumPy product per call (about 5 us)."""
    return math.prod(t.shape)


_CPU_ONLY: list[bool] = []


def cpu_only_build() -> bool:
    """Whether this Paddle has no accelerator at all, so every tensor is on the CPU."""
    if not _CPU_ONLY:
        accelerators = (
            paddle.is_compiled_with_cuda()
            or paddle.is_compiled_with_xpu()
            or bool(paddle.device.get_all_custom_device_type())
        )
        _CPU_ONLY.append(not accelerators)
    return _CPU_ONLY[0]


def requires(*tensors: Tensor | None) -> tuple[bool | None, ...]:
    """Per input, whether a PyLayer backward must return its gradient.

    ``None`` marks an input that is not a tensor at all: the backward returns nothing for it.
    """
    return tuple(None if not isinstance(t, Tensor) else not t.stop_gradient for t in tensors)


def only_required(grads: Sequence[Tensor | None], required: Sequence[bool | None]) -> tuple:
    """What a PyLayer backward returns: one entry per tensor input.

    The entry is ``None`` exactly for inputs that do not require grad (Paddle checks both).
    """
    out = tuple(g if r else None for g, r in zip(grads, required) if r is not None)
    return out if len(out) > 1 else out[0]


def creating_graph() -> bool:
    """Inside a PyLayer backward: is this backward pass itself being recorded?

    Paddle runs a PyLayer backward with grad enabled exactly when the surrounding
    ``paddle.grad`` was called with ``create_graph=True``.
    """
    return paddle.is_grad_enabled()


def reduce_axes(ndim: int, channel_axis: int) -> list[int]:
    """All axes but the channel axis."""
    return [a for a in range(ndim) if a != channel_axis % ndim]


def plain_call(args: tuple, kwargs: dict) -> bool:
    """Whether trailing arguments are only an op ``name`` (the replacement can handle it).

    Anything else (an ``out=`` tensor, an argument a newer Paddle added) sends the call to
    the native op unchanged.
    """
    return all(a is None or isinstance(a, str) for a in args) and all(
        k == "name" or v is None for k, v in kwargs.items()
    )


class Held:
    """A value a PyLayer reads but does not differentiate, kept out of its inputs.

    Every tensor among a PyLayer's inputs is one it must return a gradient for (or None);
    wrapped here, a tensor stays live and is read as it is.
    """

    __slots__ = ("value",)

    def __init__(self, value) -> None:
        self.value = value

"""Ops whose second derivative Paddle records but cannot compute: fail early and clearly.

A transposed convolution's gradient has a double-gradient node in Paddle 3.3.1, but its
CPU kernel is not registered, so a second-order ``adapt`` through ``nn.Conv2DTranspose``
succeeds and the outer ``backward()`` fails later with "The kernel
`conv2d_transpose_double_grad` is not registered" or "Unable to fill empty grad inputs".
Inside :func:`~paddlefsl.ops.second_order_scope` these ops raise
:class:`~paddlefsl.functional.grad.SecondOrderUnsupportedError` at the forward pass
instead, naming the op and the way out (``first_order=True``). Outside the scope, and on
other devices, they run natively. :func:`~paddlefsl.ops.patched_ops` does not list them.
"""

from __future__ import annotations

from collections.abc import Callable

from ._common import tracks_grad
from ._registry import in_second_order_scope, register

#: Paddle's message for each, as the error's "Paddle said" part.
_REASONS = {
    name: f"The kernel `{name}_double_grad` is not registered for the CPU"
    for name in ("conv2d_transpose", "depthwise_conv2d_transpose", "conv3d_transpose")
}


def _make(name: str, reason: str) -> None:
    @register(name, guard=True)
    def factory(native_fn: Callable) -> Callable:
        def op(x, weight, *args, **kwargs):
            if in_second_order_scope() and tracks_grad(x, weight) and x.place.is_cpu_place():
                from ..functional.grad import SecondOrderUnsupportedError

                raise SecondOrderUnsupportedError(name, reason)
            return native_fn(x, weight, *args, **kwargs)

        return op


for _name, _reason in _REASONS.items():
    _make(_name, _reason)

"""max / min / amax / amin reductions: Paddle has no double grad for any of them.

The gradient of a max routes ``dy`` to the selected elements; which elements (and how
ties share) is piecewise constant in ``x``. The replacement takes that routing from the
native gradient kernel itself, so first- and second-order results keep Paddle's tie rules.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle

from ._common import creating_graph, tracks_grad
from ._registry import native, register


def _axes(x: paddle.Tensor, axis) -> list[int]:
    if axis is None or (isinstance(axis, list | tuple) and len(axis) == 0):
        return list(range(x.ndim))
    axes = [axis] if isinstance(axis, int) else [int(a) for a in axis]
    return sorted(a % x.ndim for a in axes) if x.ndim else []


class _Select(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, name, axis, keepdim):
        out = native(name)(x, axis, keepdim)
        axes = _axes(x, axis)
        ctx.save_for_backward(x)
        ctx.out = out.detach()
        ctx.attrs = (name, axes, bool(keepdim), len(axes) == x.ndim)
        return out

    @staticmethod
    def backward(ctx, dy):
        (x,), out = ctx.saved_tensor(), ctx.out
        name, axes, keepdim, reduce_all = ctx.attrs
        grad = native(f"{name}_grad")
        if not creating_graph():
            return grad(x, out, dy, axes, keepdim, reduce_all)
        with paddle.no_grad():
            routing = grad(x.detach(), out, paddle.ones_like(out), axes, keepdim, reduce_all)
        shape = [1 if a in axes else d for a, d in enumerate(x.shape)]
        return dy.reshape(shape) * routing


def _factory(name: str) -> Callable[[Callable], Callable]:
    def factory(native_fn: Callable) -> Callable:
        def reduction(x, axis=None, keepdim=False, *args, **kwargs):
            if args or kwargs or not isinstance(x, paddle.Tensor) or not tracks_grad(x):
                return native_fn(x, axis, keepdim, *args, **kwargs)
            if isinstance(axis, paddle.Tensor):
                return native_fn(x, axis, keepdim)
            return _Select.apply(x, name, axis, keepdim)

        reduction.__name__ = name
        return reduction

    return factory


for _name in ("max", "min", "amax", "amin"):
    register(_name)(_factory(_name))

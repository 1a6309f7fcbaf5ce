"""flatten, embedding and dropout: no double grad in Paddle, simple exact rewrites."""

from __future__ import annotations

from collections.abc import Callable

import paddle

from ._common import creating_graph, plain_call, tracks_grad
from ._registry import native, register


@register("flatten")
def _flatten(native_fn: Callable) -> Callable:
    def flatten(x, start_axis, stop_axis, *args, **kwargs):
        if not plain_call(args, kwargs) or not tracks_grad(x) or x.ndim == 0:
            return native_fn(x, start_axis, stop_axis, *args, **kwargs)
        start, stop = start_axis % x.ndim, stop_axis % x.ndim
        shape = list(x.shape[:start]) + [-1] + list(x.shape[stop + 1 :])
        # reshape has a double grad and is a view, as flatten is.
        return native("reshape")(x, shape)

    return flatten


@register("embedding")
def _embedding(native_fn: Callable) -> Callable:
    def embedding(ids, weight, padding_idx=-1, sparse=False, *args, **kwargs):
        if not plain_call(args, kwargs) or sparse or not tracks_grad(weight):
            return native_fn(ids, weight, padding_idx, sparse, *args, **kwargs)
        rows = paddle.gather(weight, ids.reshape([-1]).astype("int64"), axis=0)
        out = rows.reshape([*ids.shape, weight.shape[-1]])
        if padding_idx is not None and padding_idx >= 0:
            # The padding row reads as zeros and receives no gradient, as in the native op.
            keep = (ids != padding_idx).astype(out.dtype).unsqueeze(-1)
            out = out * keep
        return out

    return embedding


class _Dropout(paddle.autograd.PyLayer):
    @staticmethod
    def forward(ctx, x, seed_tensor, attrs, holder: list):
        out, mask = native("dropout")(x, seed_tensor, *attrs)
        holder.append(mask)
        ctx.save_for_backward(mask)
        ctx.attrs = attrs
        return out

    @staticmethod
    def backward(ctx, dy):
        (mask,) = ctx.saved_tensor()
        p, is_test, mode, _, _ = ctx.attrs
        if not creating_graph():
            return native("dropout_grad")(mask, dy, p, is_test, mode)
        if is_test:
            return dy if mode == "upscale_in_train" else dy * (1.0 - p)
        scale = 1.0 / (1.0 - p) if (mode == "upscale_in_train" and p < 1.0) else 1.0
        return dy * mask.astype(dy.dtype) * scale


@register("dropout")
def _dropout(native_fn: Callable) -> Callable:
    def dropout(x, seed_tensor, p, is_test, mode, seed, fix_seed, *args, **kwargs):
        attrs = (p, is_test, mode, seed, fix_seed)
        if not plain_call(args, kwargs) or not isinstance(p, float | int) or not tracks_grad(x):
            return native_fn(x, seed_tensor, *attrs, *args, **kwargs)
        holder: list = []
        out = _Dropout.apply(x, seed_tensor, attrs, holder)
        return out, holder[0]

    return dropout

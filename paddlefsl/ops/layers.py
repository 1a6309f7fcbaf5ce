"""flatten, embedding and dropout: no double grad in Paddle, simple exact rewrites."""

from __future__ import annotations

from collections.abc import Callable

import paddle

from ._common import plain_call, tracks_grad
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


def _dropout_formula(x, p, is_test, mode):
    """Dropout from elementwise ops, all with double gradients (Paddle's kernel has none)."""
    if is_test:
        return x if mode == "upscale_in_train" else x * (1.0 - p)
    if p >= 1.0:
        return x * 0.0
    keep = (paddle.rand(x.shape, dtype=x.dtype) >= p).astype(x.dtype)
    return x * keep * (1.0 / (1.0 - p)) if mode == "upscale_in_train" else x * keep


@register("dropout")
def _dropout(native_fn: Callable) -> Callable:
    def dropout(x, seed_tensor, p, is_test, mode, seed, fix_seed, *args, **kwargs):
        simple = (
            seed_tensor is None
            and not fix_seed
            and isinstance(p, float | int)
            and mode in ("upscale_in_train", "downscale_in_infer")
        )
        if not plain_call(args, kwargs) or not simple or not tracks_grad(x):
            return native_fn(x, seed_tensor, p, is_test, mode, seed, fix_seed, *args, **kwargs)
        return _dropout_formula(x, float(p), bool(is_test), mode)

    return dropout

"""Resampling, rearranging and selecting in second order: Upsample, PixelShuffle, topk.

Paddle 3.3.1 has no double gradient for ``nearest_interp`` / ``bilinear_interp`` /
``linear_interp`` (``nn.Upsample``, ``F.interpolate``), ``pixel_shuffle``,
``channel_shuffle``, ``unfold``, ``cumsum``, ``topk``, ``argsort`` (``paddle.sort``) and
``index_sample`` (``MultiMarginLoss``). All of them are linear in their input (the
selections given their indices, which are piecewise constant), so inside
:func:`~paddlefsl.ops.second_order_scope` they are rebuilt from ops whose gradients are
linear too: interpolation as gathers along each resized axis with constant weights (the
source indices and weights computed as Paddle's CPU kernels compute them), the shuffles
as reshapes and transposes, ``unfold`` as a padded convolution with one-hot filters,
``cumsum`` as a product with a triangle of ones, ``topk`` and ``sort`` as a gather by the
native kernel's indices, ``index_sample`` as ``take_along_axis``. Outside the scope, and
for the cases not covered (5-D inputs, sizes given as tensors, bicubic), the native
kernels run; ``cumsum`` and the three selections, which losses use too, take their form
also outside it while a second-order clone is alive.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import paddle
import paddle.nn.functional as F

from ._common import tracks_grad
from ._registry import in_second_order_scope, native, register, second_order_clone_alive

Tensor = paddle.Tensor


def _source(
    size_in: int,
    size_out: int,
    scale: float,
    align_corners: bool,
    method: str,
    align_mode: int,
    arithmetic: str,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per output position: two source indices and their weights, as the kernel has them.

    Paddle's CPU kernels keep the ratio in float32 (from a scale given in double). The
    2-D kernel computes the half-pixel source positions in double along the height
    (``arithmetic="height"``) and in float32 along the width (``"width"``), its weights
    in float32; the 1-D kernel (``"linear"``) positions and weights in double (all
    measured against the kernels). The same arithmetic here gives the same indices and
    weights.
    """
    f32 = np.float32
    ratio = f32(0.0)
    if size_out > 1:
        per_step = f32(1.0 / scale) if scale > 0 else f32(size_in) / f32(size_out)
        ratio = f32(size_in - 1) / f32(size_out - 1) if align_corners else per_step
    k = np.arange(size_out)
    if method == "nearest":
        first = (ratio * k.astype(f32) + (f32(0.5) if align_corners else f32(0))).astype(np.int64)
        ones = np.ones(size_out, dtype=f32)
        return first, first, ones, np.zeros(size_out, dtype=f32)
    half_pixel = align_mode == 0 and not align_corners
    real = np.float64 if arithmetic == "linear" else f32  # the weights' type
    if arithmetic == "width":
        exact = centre = ratio * (k.astype(f32) + f32(0.5)) - f32(0.5)
    else:
        exact = np.float64(ratio) * (k + 0.5) - 0.5
        centre = exact.astype(real)
    scaled = ratio * k.astype(real)
    first = np.maximum((exact if half_pixel else scaled).astype(np.int64), 0)
    second = np.minimum(first + 1, size_in - 1)
    if half_pixel:
        weight = np.maximum(centre, real(0)) - first.astype(real)
    else:
        weight = scaled - first.astype(real)
    return first, second, (real(1) - weight).astype(real), weight.astype(real)


def _resample_axis(x: Tensor, axis: int, source: tuple, method: str) -> Tensor:
    first, second, w_first, w_second = source
    out = paddle.gather(x, paddle.to_tensor(first), axis=axis)
    if method == "nearest":
        return out
    shape = [1] * x.ndim
    shape[axis] = -1

    def weights(w: np.ndarray) -> Tensor:
        return paddle.to_tensor(w, dtype=x.dtype).reshape(shape)

    return out * weights(w_first) + paddle.gather(x, paddle.to_tensor(second), axis=axis) * weights(
        w_second
    )


def _interpolate(method: str) -> Callable:
    def formula(x, out_size, size_tensor, scale_tensor, layout, out_d, out_h, out_w, scale,
                interp_method, align_corners, align_mode):  # fmt: skip
        if x.ndim == 3:  # linear_interp: the width of [N, C, W] or [N, W, C] only
            axes, arithmetic, out = [2 if layout == "NCHW" else 1], ["linear"], [out_w]
        else:
            axes = [2, 3] if layout == "NCHW" else [1, 2]
            arithmetic, out = ["height", "width"], [out_h, out_w]
        scales = list(scale) if scale else [-1.0] * len(axes)
        if len(scales) < len(axes):
            scales = scales * len(axes)
        for axis, n_out, s, kind in zip(axes, out, scales, arithmetic):
            n_in = x.shape[axis]
            if n_out <= 0:
                n_out = int(n_in * s)
            source = _source(n_in, n_out, s, align_corners, method, align_mode, kind)
            x = _resample_axis(x, axis, source, method)
        return x

    return formula


def _interp_covered(args: tuple, x: Tensor) -> bool:
    out_size, size_tensor, scale_tensor, layout = args[:4]
    return (
        x.ndim in (3, 4)
        and layout in ("NCHW", "NHWC")
        and out_size is None
        and size_tensor is None
        and scale_tensor is None
    )


def _pixel_shuffle(x: Tensor, factor: int, data_format: str) -> Tensor:
    if data_format == "NHWC":
        x = x.transpose([0, 3, 1, 2])
    n, c, h, w = x.shape
    out = x.reshape([n, c // (factor * factor), factor, factor, h, w])
    out = out.transpose([0, 1, 4, 2, 5, 3]).reshape(
        [n, c // (factor * factor), h * factor, w * factor]
    )
    return out.transpose([0, 2, 3, 1]) if data_format == "NHWC" else out


def _cumsum(x: Tensor, axis: int, flatten: bool, exclusive: bool, reverse: bool) -> Tensor:
    # A product with a triangular matrix of ones: linear, and a matmul has double gradients.
    if flatten:
        x, axis = x.reshape([-1]), 0
    axis %= x.ndim
    n = x.shape[axis]
    rows, cols = np.arange(n).reshape(-1, 1), np.arange(n).reshape(1, -1)
    if reverse:
        rows, cols = cols, rows
    keep = rows < cols if exclusive else rows <= cols
    triangle = paddle.to_tensor(keep.astype(np.float64), dtype=x.dtype)
    moved = paddle.moveaxis(x, axis, -1)
    return paddle.moveaxis(paddle.matmul(moved, triangle), -1, axis)


def _channel_shuffle(x: Tensor, groups: int, data_format: str) -> Tensor:
    axis = 1 if data_format == "NCHW" else 3
    shape = list(x.shape)
    split = shape[:axis] + [groups, shape[axis] // groups] + shape[axis + 1 :]
    order = list(range(len(split)))
    order[axis], order[axis + 1] = order[axis + 1], order[axis]
    return x.reshape(split).transpose(order).reshape(shape)


def _unfold(x: Tensor, kernel_sizes, strides, paddings, dilations) -> Tensor:
    n, c, _, _ = x.shape
    kh, kw = kernel_sizes
    top, left, bottom, right = paddings
    eye = paddle.eye(kh * kw, dtype=x.dtype).reshape([kh * kw, 1, kh, kw])
    planes = x.reshape([n * c, 1, *x.shape[2:]])
    padding = [top, bottom, left, right]  # the convolution pads unevenly itself
    cols = F.conv2d(planes, eye, stride=list(strides), padding=padding, dilation=list(dilations))
    return cols.reshape([n, c * kh * kw, -1])


def _topk(x: Tensor, k, axis: int, largest: bool, sorted_: bool):
    # The selection comes from the native kernel; the values are a gather of x by it, and
    # a gather's gradient is linear in x.
    with paddle.no_grad():
        _, indices = native("topk")(x, k, axis, largest, sorted_)
    return paddle.take_along_axis(x, indices, axis), indices


def _sort(x: Tensor, axis: int, descending: bool, stable: bool):
    with paddle.no_grad():
        _, indices = native("argsort")(x, axis, descending, stable)
    return paddle.take_along_axis(x, indices, axis), indices


# name -> (formula(x, *attributes), covered(attributes, x))
_OPS: dict[str, tuple[Callable[..., Tensor], Callable[[tuple, Tensor], bool]]] = {
    "nearest_interp": (_interpolate("nearest"), _interp_covered),
    "bilinear_interp": (_interpolate("bilinear"), _interp_covered),
    "linear_interp": (_interpolate("bilinear"), _interp_covered),
    # The triangle has n^2 entries: long axes stay native (and name cumsum in second order).
    "cumsum": (_cumsum, lambda args, x: (x.size if args[1] else x.shape[args[0]]) <= 4096),
    "pixel_shuffle": (_pixel_shuffle, lambda args, x: x.ndim == 4),
    "channel_shuffle": (_channel_shuffle, lambda args, x: x.ndim == 4),
    "unfold": (_unfold, lambda args, x: x.ndim == 4 and len(args[2]) == 4),
    "topk": (_topk, lambda args, x: isinstance(args[0], int) and x.ndim > 0),
    "argsort": (_sort, lambda args, x: x.ndim > 0),
    "index_sample": (
        lambda x, index: paddle.take_along_axis(x, index, 1),
        lambda args, x: x.ndim == 2,
    ),
}


# Selections also appear in losses (top-k hinge, MultiMarginLoss), which the user computes
# outside any learner call: these take the gather also while a second-order clone is
# alive (ops.second_order_clone_alive).
_UNSCOPED = frozenset({"topk", "argsort", "index_sample", "cumsum"})


def _make(name: str, formula: Callable[..., Tensor], covered: Callable) -> None:
    @register(name)
    def factory(native_fn: Callable) -> Callable:
        def op(x, *args, **kwargs):
            if (
                # paddle.topk passes out=None: no output buffer, so nothing to honour
                any(v is not None for v in kwargs.values())
                or not (
                    in_second_order_scope() or (name in _UNSCOPED and second_order_clone_alive())
                )
                or not isinstance(x, Tensor)
                or not tracks_grad(x)
                or not covered(args, x)
            ):
                return native_fn(x, *args, **kwargs)
            return formula(x, *args)

        return op


for _name, (_formula, _covered) in _OPS.items():
    _make(_name, _formula, _covered)

"""conv2d (and conv1d, which runs on it) and depthwise_conv2d.

Native ``conv2d`` has a double grad, but when the conv's input does not require grad
Paddle drops the path from the filter gradient back to the filter, so a second-order
meta-gradient through a first conv layer comes out silently wrong. Connecting the input
to the filter's graph with an exact zero restores the path. ``depthwise_conv2d`` has no
double-grad kernel at all; the generic conv2d kernel computes the same thing with one.
Both rewrites are applied only inside :func:`second_order_scope`, so ordinary forward
passes keep Paddle's fastest kernels.

When the oneDNN kernels of :mod:`paddlefsl.ops.onednn` are available, a float32 NCHW
convolution (groups 1, dilation 1, any explicit padding) runs on them instead, through
:mod:`paddlefsl.ops.conv_graph`, which is exact to any order by itself.
Every number of input channels takes that path. RGB first layers (3 channels) stayed on
Paddle's kernels until session 17: the oneDNN forward was no faster there; since the
forwards of layers with few input channels run as unfolded sgemm products written straight
into NCHW (and their filter gradients likewise), routing them too made W2 (miniImageNet
Conv4) MAML 21% and FOMAML 17% faster, with less memory. A one-channel first layer
(Omniglot) gained from oneDNN's filter gradient from the start (75 images of 28x28, stride
2: 0.60 ms forward + filter gradient against 1.48), W1s FOMAML 5-7%.

A Conv2D layer's bias is folded into those kernels: Paddle's ``_conv_nd`` (which Conv2D
layers and ``F.conv2d`` call) is replaced so that a biased float32 convolution on the fast
path adds its bias inside the oneDNN call and gets the bias gradient from the filter
gradient's pass over ``dy`` (:func:`paddlefsl.ops.conv_graph.conv2d_bias`), instead of a
separate broadcast add and sum. With the CPU kernels' own bias add that saved about 6% of
a W1s FOMAML iteration; a frozen bias (or filter) keeps the separate add.
"""

from __future__ import annotations

from collections.abc import Callable

import paddle

from ._common import cpu_only_build, tracks_grad
from ._registry import in_second_order_scope, native, register, register_function
from .conv_graph import ConvGeometry, ConvKernels
from .conv_graph import conv2d as _graph_conv2d
from .conv_graph import conv2d_bias as _graph_conv2d_bias

#: Dtypes the fast kernels take (oneDNN has no float64 convolution on CPU).
FAST_DTYPES = (paddle.float32,)


class _OneDNNKernels:
    """The raw kernels of :mod:`paddlefsl.ops.onednn` behind the ConvKernels protocol.

    Calls the ops directly with the attribute lists of each geometry built once: these
    run several times per convolution layer and task, so the wrappers' argument checks
    are measurable.
    """

    def __init__(self, module) -> None:
        self._m = module
        self._attrs: dict[ConvGeometry, tuple[list[int], ...]] = {}

    def _of(self, geo: ConvGeometry) -> tuple[list[int], ...]:
        attrs = self._attrs.get(geo)
        if attrs is None:  # strides, paddings, input size, kernel size
            attrs = tuple(list(v) for v in (geo.strides, geo.paddings, geo.input_hw, geo.kernel_hw))
            self._attrs[geo] = attrs
        return attrs

    def forward(self, x, w, geo: ConvGeometry, keep: bool = False):
        s, p, _, _ = self._of(geo)
        return self._m.run_op(self._m.OPS[0], x, w, s, p, int(keep))[0]

    def backward_data(self, dy, w, geo: ConvGeometry):
        s, p, hw, _ = self._of(geo)
        return self._m.run_op(self._m.OPS[1], dy, w, s, p, hw)[0]

    def backward_weight(self, x, dy, geo: ConvGeometry):
        s, p, _, k = self._of(geo)
        return self._m.run_op(self._m.OPS[2], x, dy, s, p, k)[0]

    def forward_bias(self, x, w, b, geo: ConvGeometry, keep: bool = False):
        s, p, _, _ = self._of(geo)
        return self._m.run_op(self._m.OPS[3], x, w, b, s, p, int(keep))[0]

    def backward_weight_bias(self, x, dy, geo: ConvGeometry):
        s, p, _, k = self._of(geo)
        dw, db = self._m.run_op(self._m.OPS[4], x, dy, s, p, k)
        return dw, db


_FAST: list[ConvKernels | None] = []  # resolved on the first eligible call


def fast_kernels() -> ConvKernels | None:
    """The oneDNN kernels if they are built (or can be built now), else None."""
    if not _FAST:
        from . import onednn  # built lazily: nothing happens until a conv needs it

        _FAST.append(_OneDNNKernels(onednn) if onednn.available() else None)
    return _FAST[0]


def _fast_geometry(x, weight, strides, paddings, padding_algorithm, dilations, groups, fmt):
    """The geometry if the fast kernels can run this convolution, else None.

    Runs on every convolution call, so the tensor checks come first and the geometry of
    each (sizes, strides, paddings, dilations) is built once.
    """
    if fmt != "NCHW" or groups != 1 or padding_algorithm != "EXPLICIT":
        return None
    if not isinstance(x, paddle.Tensor):  # a static-graph value
        return None
    shape = x.shape
    dtype = x.dtype
    if (
        len(shape) != 4
        or dtype not in FAST_DTYPES
        or weight.dtype != dtype
        or not (cpu_only_build() or x.place.is_cpu_place())  # the kernels are CPU kernels
    ):
        return None
    kernel = weight.shape
    try:
        key = (shape[2], shape[3], kernel[2], kernel[3], (*strides,), (*paddings,), (*dilations,))
    except (TypeError, IndexError):  # not sequences: leave the call to Paddle
        return None
    geo = _GEOMETRIES.get(key, _UNSET)
    if geo is _UNSET:
        geo = _geometry(shape, kernel, strides, paddings, dilations)
        if len(_GEOMETRIES) < _MAX_GEOMETRIES:
            _GEOMETRIES[key] = geo
    return geo


_UNSET = object()
_MAX_GEOMETRIES = 4096  # distinct input sizes and layer settings of one process
_GEOMETRIES: dict[tuple, ConvGeometry | None] = {}


def _geometry(shape, kernel, strides, paddings, dilations) -> ConvGeometry | None:
    if list(dilations) != [1, 1] or len(strides) != 2:
        return None
    pads = [int(p) for p in paddings]
    if len(pads) == 4 and pads[0] == pads[1] and pads[2] == pads[3]:
        pads = [pads[0], pads[2]]  # symmetric: the short form, one cache entry per geometry
    if len(pads) not in (2, 4) or min(pads) < 0:
        return None
    return ConvGeometry(
        (int(strides[0]), int(strides[1])),
        tuple(pads),
        (int(shape[2]), int(shape[3])),
        (int(kernel[2]), int(kernel[3])),
    )


def _connect_input(x: paddle.Tensor, weight: paddle.Tensor) -> paddle.Tensor:
    if x.stop_gradient and not weight.stop_gradient:
        # Exactly zero, but makes ``x`` part of the graph that is differentiated.
        return x + weight.reshape([-1])[0] * 0.0
    return x


@register("conv2d")
def _conv2d(native_fn: Callable) -> Callable:
    def conv2d(x, weight, *args, **kwargs):
        if len(args) == 6 and not kwargs:
            geo = _fast_geometry(x, weight, *args)
            if geo is not None:
                kernels = fast_kernels()
                if kernels is not None:
                    return _graph_conv2d(x, weight, geo, kernels)
        if in_second_order_scope() and tracks_grad(weight):
            x = _connect_input(x, weight)
        return native_fn(x, weight, *args, **kwargs)

    return conv2d


# Paddle 3.3.1's paddle.nn.functional.conv._conv_nd, which Conv2D layers and F.conv2d call.
_CONV_ND_PARAMETERS = (
    "x",
    "weight",
    "bias",
    "stride",
    "padding",
    "padding_algorithm",
    "dilation",
    "groups",
    "data_format",
    "channel_dim",
    "op_type",
    "use_cudnn",
    "name",
)


def _fused_bias_conv(x, weight, bias, stride, padding, padding_algorithm, dilation, groups, fmt):
    """``conv2d(x, weight) + bias`` on the fast kernels with the bias folded in, or None."""
    if not isinstance(bias, paddle.Tensor) or bias.ndim != 1 or not paddle.in_dynamic_mode():
        return None
    geo = _fast_geometry(x, weight, stride, padding, padding_algorithm, dilation, groups, fmt)
    if geo is None or bias.dtype != x.dtype or bias.shape[0] != weight.shape[0]:
        return None
    kernels = fast_kernels()
    if kernels is None:
        return None
    return _graph_conv2d_bias(x, weight, bias, geo, kernels)


@register_function("paddle.nn.functional.conv", "_conv_nd", _CONV_ND_PARAMETERS)
def _conv_nd(original: Callable) -> Callable:
    # Paddle runs a biased conv2d as conv2d then a broadcast add; on the fast kernels the
    # two are one call each way (see conv_graph.conv2d_bias).
    def conv_nd(
        x,
        weight,
        bias=None,
        stride=1,
        padding=0,
        padding_algorithm=None,
        dilation=1,
        groups=1,
        data_format="NCHW",
        channel_dim=1,
        op_type="conv2d",
        use_cudnn=True,
        name=None,
    ):
        if op_type == "conv2d" and bias is not None:
            out = _fused_bias_conv(
                x, weight, bias, stride, padding, padding_algorithm, dilation, groups, data_format
            )
            if out is not None:
                return out
        return original(
            x,
            weight,
            bias,
            stride,
            padding,
            padding_algorithm,
            dilation,
            groups,
            data_format,
            channel_dim,
            op_type,
            use_cudnn,
            name,
        )

    return conv_nd


@register("depthwise_conv2d")
def _depthwise_conv2d(native_fn: Callable) -> Callable:
    def depthwise_conv2d(
        x,
        weight,
        strides,
        paddings,
        padding_algorithm,
        groups,
        dilations,
        data_format,
        *args,
        **kwargs,
    ):
        if args or kwargs or not (in_second_order_scope() and tracks_grad(x, weight)):
            return native_fn(
                x,
                weight,
                strides,
                paddings,
                padding_algorithm,
                groups,
                dilations,
                data_format,
                *args,
                **kwargs,
            )
        x = _connect_input(x, weight)
        return native("conv2d")(
            x, weight, strides, paddings, padding_algorithm, dilations, groups, data_format
        )

    return depthwise_conv2d

"""Fast float32 CPU convolutions from the oneDNN library that ships inside the Paddle wheel.

Paddle 3.3.1's CPU ``conv2d`` and its gradients use plain NCHW kernels; oneDNN's jit
kernels, allowed to pick their blocked memory layouts, run 3x3 convolutions of typical
few-shot models 1.7-2.1x faster on one thread and about 3x faster on two. The Paddle
wheel contains ``libdnnl.so.3`` but not its C++ headers, so a small Paddle custom-op
library (``_onednn_conv.cc``) is built the first time it is needed; how (headers, config,
compile, cache) is described in :mod:`paddlefsl.ops._onednn_build`.

Nothing happens at import time: :func:`available` triggers the build (about 20 s, once
per machine and Paddle version) and never raises -- when anything fails it returns
``False``, :func:`unavailable_reason` says what failed and how to fix it, and one
warning is emitted. ``PADDLEFSL_ONEDNN=0`` switches the kernels off.

The three ops are *raw*: they compute one convolution or one of its two gradients and
record no autograd graph (callers compose them into a differentiable function).

Example:
    >>> import paddle
    >>> from paddlefsl.ops import onednn
    >>> x, w = paddle.randn([2, 8, 7, 7]), paddle.randn([16, 8, 3, 3])
    >>> if onednn.available():
    ...     y = onednn.conv2d_forward(x, w, strides=2, paddings=1)
    ... else:  # e.g. no C++ compiler: the reason says what to do
    ...     y = paddle.nn.functional.conv2d(x, w, stride=2, padding=1)
    >>> list(y.shape)
    [2, 16, 4, 4]

"""

from __future__ import annotations

import ctypes
import numbers
import os
import threading
import warnings
from collections.abc import Sequence

import paddle

from ._onednn_build import ONEDNN_DEVEL, OPS, BuildError, library_path, paddle_libs

__all__ = [
    "ONEDNN_DEVEL",
    "available",
    "unavailable_reason",
    "conv2d_forward",
    "conv2d_backward_data",
    "conv2d_backward_weight",
    "conv2d_forward_bias",
    "conv2d_backward_weight_bias",
    "set_threads",
    "get_threads",
]

_ENV_SWITCH = "PADDLEFSL_ONEDNN"

_lock = threading.Lock()
_attempted = False
_reason: str | None = None
_run_custom_op = None
_threads = 1
_blocktime_set = False


# ----------------------------------------------------------------------------- public


def available() -> bool:
    """Whether the oneDNN convolution ops can be used (builds them on the first call).

    Thread-safe; the first call in a process may take about 20 s when the library is not
    cached yet, later calls are free. Never raises.

    Example:
        >>> from paddlefsl.ops import onednn
        >>> isinstance(onednn.available(), bool)
        True

    """
    if _disabled_by_env():
        return False
    _ensure_loaded()
    return _reason is None


def unavailable_reason() -> str | None:
    """Why :func:`available` is ``False`` (what failed and how to fix it), else ``None``.

    Example:
        >>> from paddlefsl.ops import onednn
        >>> onednn.available() or isinstance(onednn.unavailable_reason(), str)
        True

    """
    if _disabled_by_env():
        return f"disabled by {_ENV_SWITCH}={os.environ[_ENV_SWITCH]}"
    _ensure_loaded()
    return _reason


def set_threads(n: int) -> None:
    """Set the OpenMP team size of the oneDNN ops (default 1, like Paddle's own kernels).

    Only these ops use it: each call sets the thread count, runs and restores the
    previous value, so Paddle's kernels keep theirs. With ``n > 1`` the OpenMP wait
    policy is made passive after 1 ms (``kmp_set_blocktime(1)``, unless ``KMP_BLOCKTIME``
    is set): with the default of 200 ms the extra threads would spin, burning a core,
    for 200 ms after every call while Paddle runs its own single-threaded kernels.

    Args:
        n: Number of threads, at least 1.

    Example:
        >>> from paddlefsl.ops import onednn
        >>> onednn.set_threads(1)
        >>> onednn.get_threads()
        1

    """
    global _threads
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"set_threads: n must be an int >= 1, got {n!r}")
    if n > 1:
        _short_blocktime()
    _threads = n


def get_threads() -> int:
    """The thread count set by :func:`set_threads` (1 unless changed).

    Example:
        >>> from paddlefsl.ops import onednn
        >>> onednn.get_threads() >= 1
        True

    """
    return _threads


def conv2d_forward(
    x: paddle.Tensor,
    w: paddle.Tensor,
    strides: int | Sequence[int],
    paddings: int | Sequence[int],
    threads: int | None = None,
) -> paddle.Tensor:
    """``y = conv2d(x, w)`` for float32 NCHW ``x`` and OIHW ``w`` (groups 1, dilation 1).

    Raw op: records no autograd graph.

    Args:
        x: Input ``[N, C, H, W]``, float32, CPU.
        w: Weights ``[O, C, KH, KW]``, float32, CPU.
        strides: Stride ``s`` or ``[sh, sw]``.
        paddings: Zero padding ``p`` or ``[ph, pw]``, applied on both sides, or
            ``[top, bottom, left, right]`` (TensorFlow's ``SAME`` padding of a strided
            convolution is one pixel larger after than before).
        threads: OpenMP threads for this call (default :func:`get_threads`).

    Returns:
        ``y`` of shape ``[N, O, (H + 2 ph - KH) // sh + 1, (W + 2 pw - KW) // sw + 1]``
        (``top + bottom`` and ``left + right`` in place of ``2 ph`` and ``2 pw``).

    Raises:
        RuntimeError: The ops are unavailable (see :func:`unavailable_reason`), or the
            input is unsupported (float64, groups, wrong rank...).

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import onednn
        >>> x, w = paddle.randn([5, 3, 7, 7]), paddle.randn([4, 3, 3, 3])
        >>> if onednn.available():
        ...     y = onednn.conv2d_forward(x, w, 1, 0)
        ...     ref = paddle.nn.functional.conv2d(x, w)
        ...     print(list(y.shape), bool(paddle.allclose(y, ref, atol=1e-4)))
        ... else:
        ...     print([5, 4, 5, 5], True)
        [5, 4, 5, 5] True

    """
    attrs = [_pair(strides, "strides"), _paddings(paddings), 0]  # 0: keep nothing
    return _call(OPS[0], x, w, attrs, threads)


def conv2d_backward_data(
    dy: paddle.Tensor,
    w: paddle.Tensor,
    strides: int | Sequence[int],
    paddings: int | Sequence[int],
    input_hw: Sequence[int],
    threads: int | None = None,
) -> paddle.Tensor:
    """Gradient of the convolution with respect to its input: ``dx`` from ``dy``.

    Raw op: records no autograd graph.

    Args:
        dy: Output gradient ``[N, O, OH, OW]``, float32, CPU.
        w: Weights ``[O, C, KH, KW]``.
        strides: Stride of the forward convolution, ``s`` or ``[sh, sw]``.
        paddings: Padding of the forward convolution, as :func:`conv2d_forward` takes it.
        input_hw: ``[H, W]`` of the forward input (with stride > 1 several input sizes
            give the same output size).
        threads: OpenMP threads for this call (default :func:`get_threads`).

    Returns:
        ``dx`` of shape ``[N, C, H, W]``.

    Raises:
        RuntimeError: The ops are unavailable, or the shapes are inconsistent.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import onednn
        >>> dy, w = paddle.randn([5, 4, 4, 4]), paddle.randn([4, 3, 3, 3])
        >>> if onednn.available():
        ...     print(list(onednn.conv2d_backward_data(dy, w, 2, 1, [7, 7]).shape))
        ... else:
        ...     print([5, 3, 7, 7])
        [5, 3, 7, 7]

    """
    attrs = [_pair(strides, "strides"), _paddings(paddings), _pair(input_hw, "input_hw")]
    return _call(OPS[1], dy, w, attrs, threads)


def conv2d_backward_weight(
    x: paddle.Tensor,
    dy: paddle.Tensor,
    strides: int | Sequence[int],
    paddings: int | Sequence[int],
    kernel_hw: Sequence[int],
    threads: int | None = None,
) -> paddle.Tensor:
    """Gradient of the convolution with respect to its weights: ``dw`` from ``x``, ``dy``.

    Raw op: records no autograd graph.

    Args:
        x: Forward input ``[N, C, H, W]``, float32, CPU.
        dy: Output gradient ``[N, O, OH, OW]``.
        strides: Stride of the forward convolution, ``s`` or ``[sh, sw]``.
        paddings: Padding of the forward convolution, as :func:`conv2d_forward` takes it.
        kernel_hw: ``[KH, KW]`` of the weights.
        threads: OpenMP threads for this call (default :func:`get_threads`).

    Returns:
        ``dw`` of shape ``[O, C, KH, KW]``.

    Raises:
        RuntimeError: The ops are unavailable, or the shapes are inconsistent.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import onednn
        >>> x, dy = paddle.randn([5, 3, 7, 7]), paddle.randn([5, 4, 4, 4])
        >>> if onednn.available():
        ...     print(list(onednn.conv2d_backward_weight(x, dy, 2, 1, [3, 3]).shape))
        ... else:
        ...     print([4, 3, 3, 3])
        [4, 3, 3, 3]

    """
    attrs = [_pair(strides, "strides"), _paddings(paddings), _pair(kernel_hw, "kernel_hw")]
    return _call(OPS[2], x, dy, attrs, threads)


def conv2d_forward_bias(
    x: paddle.Tensor,
    w: paddle.Tensor,
    b: paddle.Tensor,
    strides: int | Sequence[int],
    paddings: int | Sequence[int],
    threads: int | None = None,
) -> paddle.Tensor:
    """``y = conv2d(x, w) + b`` with the per-channel bias ``b`` added by the convolution.

    As :func:`conv2d_forward`, and ``b`` has one float32 entry per output channel. Raw
    op: records no autograd graph.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import onednn
        >>> x, w, b = paddle.randn([2, 3, 5, 5]), paddle.randn([4, 3, 3, 3]), paddle.randn([4])
        >>> if onednn.available():
        ...     y = onednn.conv2d_forward_bias(x, w, b, 1, 1)
        ...     ref = paddle.nn.functional.conv2d(x, w, b, padding=1)
        ...     print(list(y.shape), bool(paddle.allclose(y, ref, atol=1e-4)))
        ... else:
        ...     print([2, 4, 5, 5], True)
        [2, 4, 5, 5] True

    """
    attrs = [_pair(strides, "strides"), _paddings(paddings), 0]  # 0: keep nothing
    return run_op(OPS[3], x, w, b, *attrs, threads=threads)[0]


def conv2d_backward_weight_bias(
    x: paddle.Tensor,
    dy: paddle.Tensor,
    strides: int | Sequence[int],
    paddings: int | Sequence[int],
    kernel_hw: Sequence[int],
    threads: int | None = None,
) -> tuple[paddle.Tensor, paddle.Tensor]:
    """``(dw, db)``: the filter gradient and the bias gradient from one pass.

    ``dw`` as :func:`conv2d_backward_weight`; ``db`` is ``dy`` summed over batch and
    space. Raw op: records no autograd graph.

    Example:
        >>> import paddle
        >>> from paddlefsl.ops import onednn
        >>> x, dy = paddle.randn([5, 3, 7, 7]), paddle.ones([5, 4, 4, 4])
        >>> if onednn.available():
        ...     dw, db = onednn.conv2d_backward_weight_bias(x, dy, 2, 1, [3, 3])
        ...     print(list(dw.shape), db.tolist())
        ... else:
        ...     print([4, 3, 3, 3], [80.0, 80.0, 80.0, 80.0])
        [4, 3, 3, 3] [80.0, 80.0, 80.0, 80.0]

    """
    attrs = [_pair(strides, "strides"), _paddings(paddings), _pair(kernel_hw, "kernel_hw")]
    dw, db = run_op(OPS[4], x, dy, *attrs, threads=threads)
    return dw, db


# ------------------------------------------------------------------------------ calls


def _paddings(value: int | Sequence[int]) -> list[int]:
    """``[ph, pw]`` (both sides) or ``[top, bottom, left, right]``, as the kernels take them."""
    if isinstance(value, numbers.Integral):
        return [int(value), int(value)]
    values = [int(v) for v in value]
    if len(values) not in (2, 4):
        raise ValueError(
            f"paddings must be an int, 2 ints [ph, pw] (both sides) or 4 ints "
            f"[top, bottom, left, right], got {value!r}"
        )
    return values


def _pair(value: int | Sequence[int], name: str) -> list[int]:
    if isinstance(value, numbers.Integral):  # also numpy integers
        return [int(value), int(value)]
    values = [int(v) for v in value]
    if len(values) != 2:
        raise ValueError(f"{name} must be an int or 2 ints, got {value!r}")
    return values


def _call(
    op: str, a: paddle.Tensor, b: paddle.Tensor, attrs: list, threads: int | None
) -> paddle.Tensor:
    return run_op(op, a, b, *attrs, threads=threads)[0]


def run_op(op: str, *args, threads: int | None = None) -> list[paddle.Tensor]:
    """Run one raw op of the library (inputs, then attributes; the thread count last).

    For the wrappers in this package (:mod:`paddlefsl.ops.cpu_kernels` uses it too).
    """
    if _run_custom_op is None and not available():
        raise RuntimeError(f"paddlefsl oneDNN ops unavailable: {unavailable_reason()}")
    threads = _threads if threads is None else int(threads)
    if threads > 1 and not _blocktime_set:
        _short_blocktime()
    # The ops have no grad op, so Paddle records no backward node for them: the output
    # has stop_gradient=True even when an input requires grad.
    try:
        return _run_custom_op(op, *args, threads)  # the op's output list
    except OSError as error:  # Paddle's type for a custom op's PD_CHECK; keep the message
        message = str(error).strip().splitlines()
        raise RuntimeError(message[0] if message else op) from error


def _short_blocktime() -> None:
    global _blocktime_set
    _blocktime_set = True
    if "KMP_BLOCKTIME" in os.environ:  # the user chose; keep it
        return
    try:
        iomp = ctypes.CDLL(str(paddle_libs() / "libiomp5.so"))
        iomp.kmp_set_blocktime(1)
    except (OSError, AttributeError):  # not Intel's OpenMP: nothing to tune
        pass


# ---------------------------------------------------------------------- loading state


def _disabled_by_env() -> bool:
    return os.environ.get(_ENV_SWITCH, "").strip().lower() in {"0", "false", "no", "off"}


def _ensure_loaded() -> None:
    global _attempted, _reason, _run_custom_op
    if _attempted:
        return
    with _lock:
        if _attempted:
            return
        try:
            _run_custom_op = _load()
        except BuildError as error:
            _reason = str(error)
        except Exception as error:  # noqa: BLE001 -- available() must never raise
            _reason = f"unexpected error: {type(error).__name__}: {error}"
        if _reason is not None:
            warnings.warn(
                f"paddlefsl: oneDNN convolution kernels unavailable, using Paddle's "
                f"conv2d: {_reason} (set {_ENV_SWITCH}=0 to skip this)",
                RuntimeWarning,
                stacklevel=3,
            )
        _attempted = True


def _load():
    """Find or build the library and register its ops; returns ``_C_ops._run_custom_op``."""
    so_path = library_path()
    try:  # it imports setuptools: an incomplete install fails here, with a clear reason
        from paddle.utils.cpp_extension import load_op_meta_info_and_register_op
    except ImportError as error:
        raise BuildError(
            f"cannot import paddle.utils.cpp_extension ({error}); pip install setuptools"
        ) from error
    try:
        names = load_op_meta_info_and_register_op(str(so_path))
    except Exception as error:  # noqa: BLE001
        raise BuildError(
            f"could not load {so_path}: {error} (delete {so_path.parent} to rebuild it)"
        ) from error
    missing = [op for op in OPS if op not in names]
    if missing:
        raise BuildError(f"{so_path} lacks the ops {missing} (delete {so_path.parent} to rebuild)")
    return paddle._C_ops._run_custom_op

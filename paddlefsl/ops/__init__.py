"""Double-differentiable versions of the Paddle ops that second-order MAML needs.

Paddle 3.3.1 has no double gradient for softmax, log_softmax, the fused softmax +
cross-entropy kernel, ``mean_all``, layer_norm, gelu, flatten, embedding, dropout and max
pooling, and its conv2d / batch_norm double gradients are silently wrong or very slow in
common cases. :func:`install` replaces those entry points of ``paddle._C_ops`` with
versions that run the native kernels for the forward pass and for ordinary backward
passes, and switch to an exact differentiable backward only when a backward pass is
itself recorded (``paddle.grad(..., create_graph=True)``).

Example:
    >>> import paddle
    >>> from paddlefsl import ops
    >>> ops.install()
    >>> x = paddle.randn([4, 3])
    >>> x.stop_gradient = False
    >>> (g,) = paddle.grad(paddle.nn.functional.softmax(x)[:, 0].sum(), [x], create_graph=True)
    >>> (h,) = paddle.grad(g.sum(), [x])  # a second derivative the native op cannot give
    >>> list(h.shape)
    [4, 3]

"""

from . import (  # noqa: F401
    activation,
    bias,
    conv,
    layers,
    loss,
    losses,
    norm,
    pointwise,
    pool,
    reduce,
    rnn,
    spatial,
    unsupported,
)
from ._registry import (
    in_second_order_scope,
    in_whole_gradient_scope,
    install,
    is_installed,
    native,
    patched_ops,
    second_order_clone_alive,
    second_order_scope,
    track_second_order_clone,
    uninstall,
    whole_gradient_scope,
)
from .norm import batch_norm_relu

__all__ = [
    "batch_norm_relu",
    "install",
    "uninstall",
    "is_installed",
    "patched_ops",
    "native",
    "second_order_scope",
    "in_second_order_scope",
    "whole_gradient_scope",
    "in_whole_gradient_scope",
    "track_second_order_clone",
    "second_order_clone_alive",
]

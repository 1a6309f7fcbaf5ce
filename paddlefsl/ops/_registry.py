"""Install and remove the double-differentiable replacements of Paddle's eager ops.

Paddle's Python API reaches its kernels through attributes of ``paddle._C_ops`` looked up
at call time (``F.softmax`` calls ``_C_ops.softmax``), so replacing those attributes makes
every layer and loss, including ones built before paddlefsl was imported, use the
replacement. Each replacement keeps the native forward kernel and the native backward
kernel for ordinary (first-order) backward passes; only a backward run with
``create_graph=True`` takes a differentiable formula instead.
"""

from __future__ import annotations

import importlib
import inspect
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from paddle import _C_ops

__all__ = [
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

# name -> factory(native_fn) -> replacement_fn
_FACTORIES: dict[str, Callable[[Callable], Callable]] = {}
# name -> the native function, captured at import so replacements never call themselves
_NATIVE: dict[str, Callable] = {}
# (module name, function name) -> (factory(original) -> replacement, expected parameters):
# plain Python functions of Paddle's API, replaced where the op-level patch cannot see
# enough (a conv's bias is added by a separate op after the convolution)
_PY_FACTORIES: dict[tuple[str, str], tuple[Callable[[Callable], Callable], tuple[str, ...]]] = {}
# names whose replacement only raises a clear error (not listed by patched_ops)
_GUARDS: set[str] = set()
# (module, attribute, original) for every slot that install() overwrote
_SLOTS: list[tuple[object, str, Callable]] = []
_LOCK = threading.Lock()
_SCOPE = threading.local()


def _rebindable(module_name: str) -> bool:
    # The compiled op tables and the static-graph op modules stay as they are.
    return module_name.startswith("paddle") and not any(
        part in module_name for part in ("libpaddle", "_pir_ops", "_legacy_C_ops")
    )


def register(
    name: str, *, guard: bool = False
) -> Callable[[Callable[[Callable], Callable]], Callable]:
    """Register ``factory(native) -> replacement`` for the eager op ``paddle._C_ops.<name>``.

    ``guard=True`` marks a replacement that only raises a clear error where the native op
    would fail later; :func:`patched_ops` does not list those.
    """

    def decorate(factory: Callable[[Callable], Callable]) -> Callable:
        _FACTORIES[name] = factory
        _NATIVE[name] = getattr(_C_ops, name)
        if guard:
            _GUARDS.add(name)
        return factory

    return decorate


def register_function(
    module_name: str, name: str, parameters: tuple[str, ...]
) -> Callable[[Callable[[Callable], Callable]], Callable]:
    """Register ``factory(original) -> replacement`` for a Python function of Paddle's.

    ``<module_name>.<name>`` is replaced at install only if its parameters are
    ``parameters``: the replacement is written against that signature.
    """

    def decorate(factory: Callable[[Callable], Callable]) -> Callable:
        _PY_FACTORIES[(module_name, name)] = (factory, parameters)
        return factory

    return decorate


def native(name: str) -> Callable:
    """The original ``paddle._C_ops.<name>``, whether or not the replacements are installed."""
    return _NATIVE[name] if name in _NATIVE else getattr(_C_ops, name)


def patched_ops() -> list[str]:
    """Names of the ``paddle._C_ops`` entry points that paddlefsl makes double-differentiable."""
    return sorted(set(_FACTORIES) - _GUARDS)


def is_installed() -> bool:
    """Whether the replacements are currently installed."""
    return bool(_SLOTS)


def install() -> None:
    """Make the ops in :func:`patched_ops` exact under ``paddle.grad(..., create_graph=True)``.

    Idempotent and thread-safe. Called by every learner on construction. First-order
    numerics are unchanged: forward and first-order backward passes compute what Paddle's
    kernels compute (on paddlefsl's oneDNN / CPU kernels where those apply).

    Example:
        >>> from paddlefsl import ops
        >>> ops.install()
        >>> "softmax" in ops.patched_ops() and ops.is_installed()
        True

    """
    with _LOCK:
        if _SLOTS:
            return
        for name, factory in _FACTORIES.items():
            original = _NATIVE[name]
            replacement = factory(original)
            # Also rebind names that paddle modules imported straight from _C_ops
            # (``from paddle._C_ops import gelu``); a call-time lookup would miss those.
            for module_name, module in list(sys.modules.items()):
                if module is None or not _rebindable(module_name):
                    continue
                if getattr(module, name, None) is original:
                    _SLOTS.append((module, name, original))
                    setattr(module, name, replacement)
        for (module_name, name), (factory, parameters) in _PY_FACTORIES.items():
            module = importlib.import_module(module_name)
            original = getattr(module, name, None)
            if original is None or tuple(inspect.signature(original).parameters) != parameters:
                continue  # another Paddle version: leave its function alone
            _SLOTS.append((module, name, original))
            setattr(module, name, factory(original))


def uninstall() -> None:
    """Restore Paddle's native ops (undo :func:`install`)."""
    with _LOCK:
        while _SLOTS:
            module, name, original = _SLOTS.pop()
            setattr(module, name, original)


@contextmanager
def second_order_scope() -> Iterator[None]:
    """Mark a forward pass whose graph will be differentiated twice.

    Inside it, ops that need extra graph to be exact in second order (a convolution whose
    input does not require grad) build that graph. Learners enter it around the model call.
    """
    depth = getattr(_SCOPE, "depth", 0)
    _SCOPE.depth = depth + 1
    try:
        yield
    finally:
        _SCOPE.depth = depth


def in_second_order_scope() -> bool:
    """Whether the current thread is inside :func:`second_order_scope`."""
    return getattr(_SCOPE, "depth", 0) > 0


# Second-order clones alive (any thread): losses computed meanwhile may be differentiated
# twice, though the user computes them outside the clone's call.
_CLONES = [0]


def _clone_released() -> None:
    with _LOCK:
        _CLONES[0] -= 1


def track_second_order_clone(clone: object) -> None:
    """Count ``clone`` as alive until it is garbage-collected.

    While any second-order clone is alive, the replacements of ops that losses use
    (``bce_loss``, ``nll_loss``, ``topk``, ...) take their double-differentiable form,
    because the loss a user computes from a clone's output, outside its call, may be
    differentiated twice by ``adapt``. Learners call this from ``clone()``.

    Example:
        >>> import paddle
        >>> from paddlefsl import ops
        >>> from paddlefsl.metaopt import MAML
        >>> learner = MAML(paddle.nn.Linear(2, 2), lr=0.1).clone()  # tracked
        >>> ops.second_order_clone_alive()
        True

    """
    with _LOCK:
        _CLONES[0] += 1
    weakref.finalize(clone, _clone_released)


def second_order_clone_alive() -> bool:
    """Whether a clone made for second-order adaptation is alive.

    See :func:`track_second_order_clone`.

    Example:
        >>> from paddlefsl import ops
        >>> isinstance(ops.second_order_clone_alive(), bool)
        True

    """
    return _CLONES[0] > 0


@contextmanager
def whole_gradient_scope(enabled: bool = True) -> Iterator[None]:
    """Mark a forward pass whose graph is only ever differentiated "whole".

    That is: every ``paddle.grad`` over the graph recorded inside asks, for each op, for
    the gradients of all of the op's inputs that require one, or of none of them
    (``backward()`` always does). Inside, a replacement may record a convolution as one
    graph node with several differentiable inputs, which is faster than one node per
    input. Paddle 3.3.1 raises when a ``paddle.grad`` prunes some inputs of such a node
    (a PyLayer cannot see which ones), so outside this scope every convolution node has
    one differentiable input.

    Learners enter it where that holds by construction: around a clone's model call when
    the clone adapts every trainable parameter of its model and the call's inputs require
    no gradient (every tensor that requires one inside depends on adapted weights), and
    around a second-order ``adapt``'s recorded backward (only ``backward()`` later
    differentiates it; a later ``adapt`` stops at the newer fast weights before it).

    Args:
        enabled: ``False`` gives a no-op scope (convenient for conditional use); a scope
            nested inside an enabled one stays enabled.

    Example:
        >>> from paddlefsl import ops
        >>> with ops.whole_gradient_scope():
        ...     ops.in_whole_gradient_scope()
        True
        >>> ops.in_whole_gradient_scope()
        False

    """
    depth = getattr(_SCOPE, "whole", 0)
    _SCOPE.whole = depth + int(bool(enabled))
    try:
        yield
    finally:
        _SCOPE.whole = depth


def in_whole_gradient_scope() -> bool:
    """Whether the current thread is inside an enabled :func:`whole_gradient_scope`."""
    return getattr(_SCOPE, "whole", 0) > 0

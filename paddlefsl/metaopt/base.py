"""BaseLearner: the clone / adapt / call protocol that every algorithm shares."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from contextlib import nullcontext
from typing import Any, Literal

import paddle

from .. import ops
from ..functional import adaptable_parameters, named_grad, running_statistics, substituted
from ..functional.params import TensorIndex, index_tensors

__all__ = ["BaseLearner", "RunningStats"]

RunningStats = Literal["isolated", "shared"]
_POLICIES = ("isolated", "shared")


class BaseLearner(paddle.nn.Layer):
    """Wraps a model; clones of it adapt fast weights without touching the model.

    Subclasses define :meth:`update` (how gradients change the fast weights) and may
    narrow :meth:`adapted_names`. The wrapped model's parameters are this Layer's
    parameters, so an optimizer over ``learner.parameters()`` steps the model.

    Running statistics (BatchNorm ``_mean`` / ``_variance``) follow ``running_stats``:

    * ``"isolated"`` (default): each clone starts from a copy of the model's statistics
      and updates only its copy; the model's statistics never change through a clone.
    * ``"shared"``: a clone's train-mode forward passes update the model's statistics in
      place, as a plain forward pass of the model would (learn2learn's behaviour).

    Args:
        module: any ``paddle.nn.Layer``.
        first_order: default for :meth:`adapt`: drop second-order terms.
        allow_unused: leave parameters that do not influence the loss unchanged (``True``)
            or raise (``False``).
        running_stats: ``"isolated"`` or ``"shared"``, see above.
        inner_frozen: structured names of parameters the inner loop keeps fixed while the
            outer loop still trains them (e.g. MAML's reference code adapts no BatchNorm
            offsets). Their gradients are still computed, so meta-gradients through them
            stay exact; ``adapt`` just does not step them (their fast weights keep the
            model's values).

    """

    def __init__(
        self,
        module: paddle.nn.Layer,
        first_order: bool = False,
        allow_unused: bool = True,
        running_stats: RunningStats = "isolated",
        inner_frozen: Iterable[str] = (),
    ):
        super().__init__()
        if not isinstance(module, paddle.nn.Layer):
            raise TypeError(
                f"expected a paddle.nn.Layer to meta-learn, got {type(module).__name__}"
            )
        if running_stats not in _POLICIES:
            raise ValueError(f"running_stats must be one of {_POLICIES}, got {running_stats!r}")
        self.module = module
        self.first_order = bool(first_order)
        self.allow_unused = bool(allow_unused)
        self.running_stats = running_stats
        self.inner_frozen = _checked_frozen(module, inner_frozen)
        # Set on clones only: structured name -> current fast weight / statistic.
        self._fast: dict[str, paddle.Tensor] | None = None
        self._stats: dict[str, paddle.Tensor] | None = None
        # On clones: whether they adapt every trainable tensor of the module, and the
        # module's tensor index (see clone()).
        self._adapts_all = False
        self._index: TensorIndex | None = None
        # Needed for exact second order, and faster in first order too (see paddlefsl.ops).
        ops.install()

    # ----------------------------------------------------------------- protocol
    def adapted_names(self) -> list[str]:
        """Structured names (in ``self.module``) of the parameters the inner loop adapts."""
        return list(adaptable_parameters(self.module))

    def _adapted_among(self, params: dict[str, paddle.Tensor]) -> list[str]:
        """:meth:`adapted_names`, given the trainable parameters (saves a model walk)."""
        if type(self).adapted_names is BaseLearner.adapted_names:
            return list(params)
        return self.adapted_names()

    def update(
        self,
        params: Mapping[str, paddle.Tensor],
        grads: Mapping[str, paddle.Tensor | None],
    ) -> dict[str, paddle.Tensor]:
        """One inner-loop step: new fast weights from the current ones and their gradients.

        Must build the result with differentiable, out-of-place ops.
        """
        raise NotImplementedError

    # ----------------------------------------------------------------- public API
    @property
    def is_clone(self) -> bool:
        """Whether this object is a clone (it has fast weights and can ``adapt``)."""
        return self._fast is not None

    def fast_weights(self) -> dict[str, paddle.Tensor]:
        """The clone's current adapted tensors by structured name (a new dict)."""
        self._require_clone("fast_weights")
        return dict(self._fast)

    def clone(
        self, first_order: bool | None = None, allow_unused: bool | None = None
    ) -> BaseLearner:
        """A cheap copy that adapts its own fast weights; the model stays untouched.

        Cloning a clone continues from the clone's fast weights.

        Args:
            first_order: override this learner's ``first_order`` default for the clone.
            allow_unused: override this learner's ``allow_unused`` default for the clone.

        """
        new = object.__new__(type(self))
        new.__dict__.update(self.__dict__)
        if first_order is not None:
            new.__dict__["first_order"] = bool(first_order)
        if allow_unused is not None:
            new.__dict__["allow_unused"] = bool(allow_unused)
        if self._fast is None:
            index = index_tensors(self.module)  # one walk for the parameters and statistics
            params = {n: p for n, p in index.parameters.items() if not p.stop_gradient}
            names = self._adapted_among(params)
            new.__dict__["_fast"] = {name: params[name] for name in names}
            source_stats = {n: p for n, p in index.parameters.items() if p.stop_gradient}
            source_stats.update(index.buffers)
            # Every call of this clone (and of its clones) substitutes through this index:
            # like the fast weights, the model's structure is taken as of clone().
            new.__dict__["_index"] = index
            # Every tensor that requires grad in a call then depends on adapted weights
            # (given inputs that require none): see _whole_gradient.
            new.__dict__["_adapts_all"] = len(new._fast) == len(params) and all(
                t.stop_gradient for t in source_stats.values()
            )
        else:
            new.__dict__["_fast"] = dict(self._fast)
            source_stats = self._stats or running_statistics(self.module)
        if not new.first_order:
            # Losses computed from its output may be differentiated twice by adapt().
            ops.track_second_order_clone(new)
        if self.running_stats == "isolated":
            # An uninitialised buffer holds nothing to isolate: a fused RNN's dropout
            # state (paddle.nn.GRU / LSTM / SimpleRNN), which has no memory on the CPU
            # and cannot be cloned.
            new.__dict__["_stats"] = {
                name: t.clone() if t._is_initialized() else t for name, t in source_stats.items()
            }
        else:
            new.__dict__["_stats"] = {}
        return new

    def adapt(
        self,
        loss: paddle.Tensor,
        first_order: bool | None = None,
        allow_unused: bool | None = None,
    ) -> None:
        """Take one inner-loop step on ``loss`` (a scalar computed with this clone).

        Args:
            loss: scalar loss of this clone's output on the support set.
            first_order: override the default for this step.
            allow_unused: override the default for this step.

        Raises:
            RuntimeError: called on the meta-learner instead of a clone.
            SecondOrderUnsupportedError: the model uses an op Paddle cannot differentiate
                twice and that paddlefsl does not replace.

        """
        self._require_clone("adapt")
        first_order = self.first_order if first_order is None else bool(first_order)
        allow_unused = self.allow_unused if allow_unused is None else bool(allow_unused)
        if not isinstance(loss, paddle.Tensor):
            raise TypeError(f"adapt() needs the loss tensor, got {type(loss).__name__}")
        if not first_order and self.first_order:
            raise ValueError(
                "this clone runs first-order forward passes, so a second-order step would be "
                "inexact; create the learner (or the clone) with first_order=False"
            )
        # The backward recorded here (second order) is later differentiated whole by
        # backward(); a later adapt asks for newer fast weights and stops at them, before it.
        scale = self._gradient_scale()
        with ops.whole_gradient_scope(not first_order):
            grads = named_grad(
                loss,
                self._fast,
                create_graph=not first_order,
                allow_unused=allow_unused,
                scale=scale,
            )
        if first_order:  # paddle.grad without create_graph already returns detached tensors
            grads = {n: g if g is None or g.stop_gradient else g.detach() for n, g in grads.items()}
        frozen = self.inner_frozen.intersection(grads)
        for name in frozen:
            grads[name] = None  # a None gradient leaves the weight as it is
        if scale is None:
            fast = self.update(self._fast, grads)
        else:
            fast = self._scaled_update(self._fast, grads)
        if not first_order:
            # A new node per step, as for the stepped weights: the next adapt() asks for
            # the newest fast weights and stops there instead of walking back into this
            # step's recorded backward (which would ask a paddlefsl op for some of its
            # inputs' gradients but not others).
            for name in frozen:
                fast[name] = fast[name].clone()
        self.__dict__["_fast"] = fast

    def _gradient_scale(self) -> float | None:
        """A factor for ``adapt``'s gradients that :meth:`_scaled_update` expects, or None.

        None (the default) gives :meth:`update` the plain gradients.
        """
        return None

    def _scaled_update(
        self,
        params: Mapping[str, paddle.Tensor],
        grads: Mapping[str, paddle.Tensor | None],
    ) -> dict[str, paddle.Tensor]:
        """The step from gradients already multiplied by :meth:`_gradient_scale`."""
        raise NotImplementedError

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model; on a clone, with its fast weights and statistics."""
        if self._fast is None:
            return self.module(*args, **kwargs)
        with substituted(self.module, self._substitutions(), self._index):
            return self._forward_adapted(*args, **kwargs)

    def _substitutions(self) -> dict[str, paddle.Tensor]:
        """What a clone's calls run the model with: its statistics and fast weights."""
        tensors = dict(self._stats or {})
        tensors.update(self._fast)
        return tensors

    def _forward_adapted(self, *args: Any, **kwargs: Any) -> Any:
        """The model call on a clone (substitution already in place)."""
        with self._scope(), self._whole_gradient(self._adapts_all, args, kwargs):
            return self.module(*args, **kwargs)

    def _scope(self):
        return nullcontext() if self.first_order else ops.second_order_scope()

    @staticmethod
    def _whole_gradient(adapts_all: bool, args: tuple, kwargs: dict):
        """:func:`paddlefsl.ops.whole_gradient_scope` when it holds for this call.

        ``adapt`` asks for the gradients of all adapted weights and ``backward()`` for
        everything. If the clone adapts every trainable tensor of the model and no input
        requires grad, every op input that requires grad depends on adapted weights, so
        neither call prunes some inputs of an op but not others.
        """
        return ops.whole_gradient_scope(adapts_all and not _requires_grad((args, kwargs)))

    def _require_clone(self, what: str) -> None:
        if self._fast is None:
            raise RuntimeError(
                f"{what}() works on a clone: call `learner = {type(self).__name__.lower()}"
                f".clone()` first, so that adaptation never changes the model itself"
            )

    def extra_repr(self) -> str:
        kind = "clone" if self.is_clone else "meta-learner"
        frozen = f", inner_frozen={sorted(self.inner_frozen)}" if self.inner_frozen else ""
        return (
            f"{kind}, first_order={self.first_order}, running_stats={self.running_stats!r}" + frozen
        )


def _checked_frozen(module: paddle.nn.Layer, names: Iterable[str]) -> frozenset[str]:
    """``names`` as a set, after checking that each is a trainable parameter of ``module``."""
    if isinstance(names, str):
        raise TypeError(
            f"inner_frozen takes a list of parameter names, got the string {names!r}; "
            f"write inner_frozen=[{names!r}]"
        )
    frozen = frozenset(names)
    trainable = {n for n, p in module.named_parameters() if not p.stop_gradient}
    unknown = sorted(frozen - trainable)
    if unknown:
        raise ValueError(
            f"inner_frozen names {unknown[:5]} are not trainable parameters of the model; "
            f"use structured names as in model.named_parameters(), e.g. "
            f"{sorted(trainable)[:3]}"
        )
    return frozen


def _requires_grad(value: Any) -> bool:
    """Whether a call argument holds a tensor that requires grad (in lists, dicts...)."""
    if isinstance(value, paddle.Tensor):
        return not value.stop_gradient
    if isinstance(value, (list, tuple)):
        return any(_requires_grad(v) for v in value)
    if isinstance(value, Mapping):
        return any(_requires_grad(v) for v in value.values())
    return False

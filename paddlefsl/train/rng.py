"""Capture and restore the random states of Python, NumPy and Paddle as plain JSON."""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import paddle

__all__ = ["capture_rng_state", "forked_rng", "restore_rng_state", "seed_everything"]


def seed_everything(seed: int) -> None:
    """Seed Python's ``random``, NumPy's global generator and Paddle.

    Example:
        >>> seed_everything(0)

    """
    random.seed(seed)
    np.random.seed(seed)
    paddle.seed(seed)


def _paddle_to_json(states: list[Any]) -> list[list[Any]]:
    out = []
    for state in states:
        # GeneratorState pickles as (device, seed, offset, mt19937 text as byte values);
        # the text is stored as a string so the JSON stays readable and compact.
        fields = list(state.__getstate__())
        out.append([bytes(f).decode("ascii") if isinstance(f, list) else f for f in fields])
    return out


def _paddle_from_json(data: list[list[Any]]) -> list[Any]:
    kind = type(paddle.get_rng_state()[0])
    states = []
    for fields in data:
        state = kind.__new__(kind)
        state.__setstate__(
            tuple(list(f.encode("ascii")) if isinstance(f, str) else f for f in fields)
        )
        states.append(state)
    return states


def capture_rng_state() -> dict[str, Any]:
    """The current random states, JSON-serialisable.

    Example:
        >>> import json
        >>> state = capture_rng_state()
        >>> sorted(state), len(json.dumps(state)) > 0
        (['numpy', 'paddle', 'python'], True)

    """
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    version, internal, python_gauss = random.getstate()
    return {
        "python": [version, list(internal), python_gauss],
        "numpy": [kind, keys.tolist(), int(pos), int(has_gauss), float(gauss)],
        "paddle": _paddle_to_json(paddle.get_rng_state()),
    }


def restore_rng_state(state: dict[str, Any]) -> None:
    """Restore states captured by :func:`capture_rng_state`.

    Example:
        >>> state = capture_rng_state()
        >>> a = np.random.rand()
        >>> restore_rng_state(state)
        >>> bool(np.random.rand() == a)
        True

    """
    version, internal, python_gauss = state["python"]
    random.setstate((version, tuple(internal), python_gauss))
    kind, keys, pos, has_gauss, gauss = state["numpy"]
    np.random.set_state((kind, np.asarray(keys, dtype=np.uint32), pos, has_gauss, gauss))
    paddle.set_rng_state(_paddle_from_json(state["paddle"]))


@contextmanager
def forked_rng() -> Iterator[None]:
    """Run a block without consuming the surrounding random streams.

    Validation runs inside it, so evaluating (or not) never changes training.

    Example:
        >>> with forked_rng():
        ...     _ = np.random.rand()

    """
    state = capture_rng_state()
    try:
        yield
    finally:
        restore_rng_state(state)

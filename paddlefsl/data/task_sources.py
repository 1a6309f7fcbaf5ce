"""Wrappers around a task source: a fixed pool of tasks, random rotations per class.

Each takes any object with ``sample(index) -> Task`` and is one itself, so they stack:
``RandomClassRotation(TaskPool(sampler, 200_000))`` repeats the pool's characters and
drawings but turns them afresh on every pass, as cbfinn/maml's Omniglot pipeline does.
Like :class:`~paddlefsl.data.TaskSampler`, every result is a pure function of the task
index, so background loading and resuming stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from .sampler import Task, TaskBatch, TaskSource, _load_tasks, _positive_int

__all__ = ["RandomClassRotation", "TaskPool"]

#: Mixed into the rotation generator's seed, so that its stream differs from the
#: sampler's (which is seeded with ``[seed, index]`` alone).
_ROTATION_STREAM = 0x0717


class TaskPool:
    """A task source that cycles through the first ``size`` tasks of another.

    ``pool.sample(i)`` is ``source.sample(i % size)``: training sees the same ``size``
    tasks over and over, in the same order, instead of a fresh task every time. This is
    how cbfinn/maml trains (a list of 200,000 tasks drawn once, read in order);
    learn2learn's ``TaskDataset(num_tasks=...)`` also fixes a pool, but draws from it at
    random. With a fresh stream (the default of ``paddlefsl train``) no task repeats.
    The returned task's ``index`` is its place in the pool.

    Args:
        source: A task source with ``sample(index) -> Task``, e.g. :class:`TaskSampler`.
        size: Number of distinct tasks in the pool, at least 1.

    Raises:
        ValueError: If ``size`` is not a positive integer.

    Example:
        >>> import numpy as np
        >>> from paddlefsl.data import TaskSampler
        >>> data = (np.zeros((50, 4, 4), np.uint8), np.repeat(np.arange(10), 5))
        >>> pool = TaskPool(TaskSampler(data, 5, 1, 1, seed=3), size=4)
        >>> [pool.sample(i).index for i in range(6)]
        [0, 1, 2, 3, 0, 1]
        >>> bool((pool.sample(5).classes == pool.sample(1).classes).all())
        True

    """

    def __init__(self, source: TaskSource, size: int) -> None:
        self.source = source
        self.size = _positive_int("size", size)

    def __len__(self) -> int:
        return self.size

    def sample(self, index: int) -> Task:
        """Return task ``index % size`` of the source."""
        return self.source.sample(_positive_int("task index", index, minimum=0) % self.size)

    def sample_batch(self, indices: Sequence[int]) -> TaskBatch:
        """Tasks ``indices`` as one numpy batch, through the source's ``sample_batch`` if any."""
        return _load_tasks(
            self.source, [_positive_int("task index", i, minimum=0) % self.size for i in indices]
        )


class RandomClassRotation:
    """Turn each class of a task by its own random multiple of 90 degrees.

    Task ``i`` is ``source.sample(i)`` with the images of every label (support and query
    alike) rotated by ``k * 90`` degrees, ``k`` drawn from ``quarter_turns`` for each
    label, seeded by ``(seed, i)``. This is cbfinn/maml's Omniglot augmentation (a
    rotation per class, drawn per task) and learn2learn's ``RandomClassRotation``; the
    usual alternative, rotations as extra classes, is ``Omniglot(rotations=True)``.
    The turns are recorded in ``task.info["quarter_turns"]``.

    Args:
        source: A task source of square images ``[n, C, H, H]``.
        seed: Seed of the rotations (non-negative).
        quarter_turns: The multiples of 90 degrees to draw from.

    Raises:
        ValueError: On a negative seed or an empty or non-integer ``quarter_turns``.

    Example:
        >>> import numpy as np
        >>> from paddlefsl.data import TaskSampler
        >>> images = np.arange(40 * 9, dtype=np.uint8).reshape(40, 3, 3)
        >>> sampler = TaskSampler((images, np.repeat(np.arange(8), 5)), 3, 1, 1, seed=1)
        >>> task = RandomClassRotation(sampler, seed=2).sample(0)
        >>> turns = task.info["quarter_turns"]
        >>> plain = sampler.sample(0)
        >>> bool((task.support_x[1] == np.rot90(plain.support_x[1], turns[1], (-2, -1))).all())
        True

    """

    def __init__(
        self, source: TaskSource, seed: int = 0, quarter_turns: Sequence[int] = (0, 1, 2, 3)
    ) -> None:
        self.source = source
        self.seed = _positive_int("seed", seed, minimum=0)
        turns = list(quarter_turns)
        if not turns or any(
            isinstance(k, bool) or not isinstance(k, (int, np.integer)) for k in turns
        ):
            raise ValueError(
                f"quarter_turns must be a non-empty list of integers, got {quarter_turns!r}."
            )
        self.quarter_turns = np.asarray(turns, dtype=np.int64) % 4

    def sample(self, index: int) -> Task:
        """Task ``index`` of the source, each class turned by its own random angle."""
        index = _positive_int("task index", index, minimum=0)
        task = self.source.sample(index)
        ways = int(max(task.support_y.max(initial=-1), task.query_y.max(initial=-1))) + 1
        rng = np.random.default_rng([self.seed, index, _ROTATION_STREAM])
        turns = rng.choice(self.quarter_turns, size=ways)
        return replace(
            task,
            support_x=_turn(task.support_x, task.support_y, turns),
            query_x=_turn(task.query_x, task.query_y, turns),
            info={**(task.info or {}), "quarter_turns": turns.tolist()},
        )


def _turn(images: np.ndarray, labels: np.ndarray, turns: np.ndarray) -> np.ndarray:
    if images.ndim < 3 or images.shape[-1] != images.shape[-2]:
        raise ValueError(
            f"RandomClassRotation needs square images [..., H, H], got shape {list(images.shape)}."
        )
    out = np.array(images, copy=True)  # the source's arrays may be views of a cache
    for label, k in enumerate(turns):
        if k:
            mask = labels == label
            out[mask] = np.rot90(images[mask], int(k), axes=(-2, -1))
    return out

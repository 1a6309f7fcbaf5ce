"""N-way K-shot task sampling, meta-batch loading and fixed evaluation tasks.

Every task is a pure function of ``(seed, index)``: its random generator is
``np.random.default_rng([seed, index])``. Tasks therefore do not depend on which
worker draws them, in which order, or on what was drawn before, which is what makes
background loading reproducible and lets a run resume at any meta-batch.
"""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, overload

import numpy as np
import paddle

from .base import as_class_dataset
from .errors import TaskConfigError

__all__ = [
    "DEFAULT_EVAL_SEED",
    "FixedTasks",
    "MetaBatchLoader",
    "Task",
    "TaskBatch",
    "TaskSampler",
    "TaskSource",
    "fixed_tasks",
]

#: Seed of :func:`fixed_tasks` unless given; distinct from the training default (0)
#: so that evaluation tasks drawn from the training classes differ from training tasks.
DEFAULT_EVAL_SEED = 271828

T = TypeVar("T")


@dataclass
class Task:
    """One few-shot task: a support set to adapt on and a query set to evaluate on.

    For classification, ``support_x`` is float32 ``[N*K, C, H, W]`` and ``support_y``
    int64 ``[N*K]`` with labels ``0..N-1`` (class-major: K examples of label 0, then
    K of label 1, ...); the query set is laid out the same way with Q per class.
    For regression (:class:`~paddlefsl.data.SinusoidTasks`) ``x`` and ``y`` are
    float32 ``[K, 1]``.

    Attributes:
        support_x: Support inputs.
        support_y: Support targets.
        query_x: Query inputs.
        query_y: Query targets.
        index: The task index it was drawn with (``-1`` if built by hand).
        classes: For classification, the dataset class id behind each new label
            (``classes[j]`` is relabelled ``j``).
        info: Extra task parameters (e.g. sinusoid amplitude and phase).

    Example:
        >>> import numpy as np
        >>> t = Task(np.zeros((2, 1, 4, 4), np.float32), np.array([0, 1]),
        ...          np.zeros((2, 1, 4, 4), np.float32), np.array([0, 1]))
        >>> sx, sy, qx, qy = t.to_tensors()
        >>> list(sx.shape), str(sy.dtype)
        ([2, 1, 4, 4], 'paddle.int64')

    """

    support_x: np.ndarray
    support_y: np.ndarray
    query_x: np.ndarray
    query_y: np.ndarray
    index: int = -1
    classes: np.ndarray | None = None
    info: dict[str, Any] | None = field(default=None)

    def to_tensors(self) -> tuple[paddle.Tensor, paddle.Tensor, paddle.Tensor, paddle.Tensor]:
        """Return ``(support_x, support_y, query_x, query_y)`` as paddle tensors."""
        return tuple(  # type: ignore[return-value]
            paddle.to_tensor(a)
            for a in (self.support_x, self.support_y, self.query_x, self.query_y)
        )


@dataclass
class TaskBatch:
    """A meta-batch: ``B`` tasks stacked along a new leading axis.

    Attributes:
        support_x: ``[B, N*K, ...]`` inputs (paddle tensor, or numpy if requested).
        support_y: ``[B, N*K]`` (or ``[B, K, 1]`` for regression) targets.
        query_x: ``[B, N*Q, ...]`` inputs.
        query_y: ``[B, N*Q]`` targets.
        indices: int64 ``[B]``, the task index of each row.

    Iterating over a batch yields one ``(support_x, support_y, query_x, query_y)``
    tuple per task.

    Example:
        >>> import numpy as np
        >>> t = Task(np.zeros((2, 1)), np.zeros((2, 1)), np.zeros((3, 1)), np.zeros((3, 1)))
        >>> b = TaskBatch.from_tasks([t, t], to_tensor=False)
        >>> len(b), b.query_x.shape
        (2, (2, 3, 1))

    """

    support_x: Any
    support_y: Any
    query_x: Any
    query_y: Any
    indices: np.ndarray

    @classmethod
    def from_tasks(cls, tasks: Sequence[Task], to_tensor: bool = True) -> TaskBatch:
        """Stack tasks of equal shapes into one batch (tensors unless ``to_tensor=False``)."""
        arrays = [
            np.stack([getattr(t, name) for t in tasks])
            for name in ("support_x", "support_y", "query_x", "query_y")
        ]
        batch = cls(*arrays, indices=np.array([t.index for t in tasks], dtype=np.int64))
        return batch.to_tensors() if to_tensor else batch

    def to_tensors(self) -> TaskBatch:
        """Return a copy whose four data fields are paddle tensors."""
        conv = [
            a if isinstance(a, paddle.Tensor) else paddle.to_tensor(a)
            for a in (self.support_x, self.support_y, self.query_x, self.query_y)
        ]
        return TaskBatch(*conv, indices=self.indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[tuple[Any, Any, Any, Any]]:
        for b in range(len(self)):
            yield self.support_x[b], self.support_y[b], self.query_x[b], self.query_y[b]


class TaskSource(Protocol):
    """Anything that draws task ``index`` deterministically, e.g. :class:`TaskSampler`.

    Example:
        >>> import numpy as np
        >>> class Constant:
        ...     def sample(self, index: int) -> Task:
        ...         x = np.full((2, 1), index, np.float32)
        ...         return Task(x, x, x, x, index=index)
        >>> MetaBatchLoader(Constant(), 3, return_numpy=True).batch(1).support_x[:, 0, 0].tolist()
        [3.0, 4.0, 5.0]

    """

    def sample(self, index: int) -> Task:
        """Return task number ``index``."""
        ...


def _positive_int(name: str, value: Any, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}.")
    return int(value)


class TaskSampler:
    """Draw N-way K-shot tasks with Q queries per class from a labelled dataset.

    Task ``index`` picks ``ways`` distinct classes in random order (the j-th one is
    relabelled ``j``), then ``shots + queries`` distinct examples of each class:
    the first ``shots`` form the support set, the rest the query set, so support
    and query never share an example. The same ``(seed, index)`` always gives the
    same task.

    Args:
        dataset: A :class:`~paddlefsl.data.ClassDataset` (or any object with
            ``classes``, ``indices_of`` and ``get_images``), an ``(images, labels)``
            tuple of arrays, or a ``paddle.io.Dataset`` of ``(x, y)`` pairs.
        ways: Number of classes per task (N).
        shots: Support examples per class (K).
        queries: Query examples per class (Q); 0 is allowed.
        seed: Non-negative integer seed of the task stream.

    Raises:
        TaskConfigError: If ``ways`` exceeds the number of classes, or some class has
            fewer than ``shots + queries`` examples.

    Example:
        >>> import numpy as np
        >>> images = np.zeros((40, 8, 8), np.uint8)
        >>> labels = np.repeat(np.arange(8), 5)
        >>> sampler = TaskSampler((images, labels), ways=3, shots=1, queries=2, seed=7)
        >>> task = sampler.sample(0)
        >>> task.support_x.shape, task.support_y.tolist(), task.query_y.tolist()
        ((3, 1, 8, 8), [0, 1, 2], [0, 0, 1, 1, 2, 2])

    """

    def __init__(self, dataset: Any, ways: int, shots: int, queries: int, seed: int = 0) -> None:
        self.dataset = as_class_dataset(dataset)
        self.ways = _positive_int("ways", ways)
        self.shots = _positive_int("shots", shots)
        self.queries = _positive_int("queries", queries, minimum=0)
        self.seed = _positive_int("seed", seed, minimum=0)
        self._classes = np.asarray(self.dataset.classes)
        self._pools = [np.asarray(self.dataset.indices_of(c)) for c in self._classes]
        self._check()

    def _check(self) -> None:
        n_classes = len(self._classes)
        if self.ways > n_classes:
            raise TaskConfigError(
                f"ways={self.ways} but the dataset has only {n_classes} classes. "
                f"Fix: use ways <= {n_classes}, or a split with more classes."
            )
        need = self.shots + self.queries
        counts = np.array([len(p) for p in self._pools])
        short = np.flatnonzero(counts < need)
        if len(short):
            names = getattr(self.dataset, "class_names", None)
            examples = ", ".join(
                f"{names[i] if names else self._classes[i]} ({counts[i]} examples)"
                for i in short[:5]
            )
            raise TaskConfigError(
                f"shots + queries = {self.shots} + {self.queries} = {need} but "
                f"{len(short)} class(es) have fewer examples: {examples}. Fix: lower "
                f"shots/queries to at most {int(counts.min())} in total, or drop those classes."
            )

    def _plan(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """Class positions (in label order) and ``[ways, shots + queries]`` example ids."""
        index = _positive_int("index", index, minimum=0)
        rng = np.random.default_rng([self.seed, index])
        chosen = rng.choice(len(self._classes), size=self.ways, replace=False)
        per_class = self.shots + self.queries
        picks = np.empty((self.ways, per_class), dtype=np.int64)
        for j, c in enumerate(chosen):
            pool = self._pools[c]
            picks[j] = pool[rng.choice(len(pool), size=per_class, replace=False)]
        return chosen, picks

    def _labels(self, per_class: int) -> np.ndarray:
        return np.repeat(np.arange(self.ways, dtype=np.int64), per_class)

    def sample(self, index: int) -> Task:
        """Return task number ``index`` (deterministic in ``(seed, index)``)."""
        chosen, picks = self._plan(index)
        support_idx = picks[:, : self.shots].reshape(-1)
        query_idx = picks[:, self.shots :].reshape(-1)
        x = self.dataset.get_images(np.concatenate([support_idx, query_idx]))
        n_support = len(support_idx)
        return Task(
            support_x=x[:n_support],
            support_y=self._labels(self.shots),
            query_x=x[n_support:],
            query_y=self._labels(self.queries),
            index=int(index),
            classes=self._classes[chosen],
        )

    def sample_batch(self, indices: Sequence[int]) -> TaskBatch:
        """Tasks ``indices`` stacked as a numpy :class:`TaskBatch`, in one image gather.

        Equal to stacking :meth:`sample` of each index, with fewer copies: all
        support images of the batch, then all query images, are fetched at once.

        Example:
            >>> import numpy as np
            >>> s = TaskSampler((np.zeros((20, 2, 2), np.uint8), np.repeat(np.arange(4), 5)),
            ...                 ways=2, shots=1, queries=3)
            >>> s.sample_batch([4, 5]).query_x.shape
            (2, 6, 1, 2, 2)

        """
        picks = np.stack([self._plan(i)[1] for i in indices])  # [B, ways, shots + queries]
        n_tasks, n_support = len(picks), self.ways * self.shots
        x = self.dataset.get_images(
            np.concatenate(
                [picks[:, :, : self.shots].reshape(-1), picks[:, :, self.shots :].reshape(-1)]
            )
        )
        split = n_tasks * n_support
        return TaskBatch(
            support_x=x[:split].reshape(n_tasks, n_support, *x.shape[1:]),
            support_y=np.tile(self._labels(self.shots), (n_tasks, 1)),
            query_x=x[split:].reshape(n_tasks, self.ways * self.queries, *x.shape[1:]),
            query_y=np.tile(self._labels(self.queries), (n_tasks, 1)),
            indices=np.asarray(indices, dtype=np.int64).reshape(-1),
        )

    def tasks(self, start: int = 0, count: int | None = None) -> Iterator[Task]:
        """Yield tasks ``start, start + 1, ...`` (``count`` of them, or forever)."""
        indices = itertools.count(start) if count is None else range(start, start + count)
        for i in indices:
            yield self.sample(i)

    def __iter__(self) -> Iterator[Task]:
        return self.tasks()


def _load_tasks(source: TaskSource, indices: Sequence[int]) -> TaskBatch:
    """Numpy batch of tasks ``indices``, through ``sample_batch`` when the source has it."""
    sample_batch = getattr(source, "sample_batch", None)
    if sample_batch is not None:
        return sample_batch(indices)
    return TaskBatch.from_tasks([source.sample(i) for i in indices], to_tensor=False)


def _prefetch_map(
    fn: Callable[[int], T], items: Iterable[int], num_workers: int, prefetch: int
) -> Iterator[T]:
    """Map ``fn`` over ``items`` in order, computing up to ``num_workers*prefetch`` ahead.

    Threads, not processes: the work is numpy gathers from memory-mapped caches,
    which release the GIL, and threads keep startup instant and need no pickling.
    """
    if num_workers == 0:
        for item in items:
            yield fn(item)
        return
    pool = ThreadPoolExecutor(num_workers, thread_name_prefix="paddlefsl-data")
    pending: deque[Future[T]] = deque()
    it = iter(items)
    try:
        for item in itertools.islice(it, num_workers * prefetch):
            pending.append(pool.submit(fn, item))
        while pending:
            future = pending.popleft()
            for item in itertools.islice(it, 1):
                pending.append(pool.submit(fn, item))
            yield future.result()
    finally:
        # Reached on exhaustion, on error, and when the consumer stops early
        # (generator close): drop what was queued and let running work finish.
        for future in pending:
            future.cancel()
        pool.shutdown(wait=True, cancel_futures=True)


class MetaBatchLoader:
    """Iterate over meta-batches of tasks, optionally loading ahead in threads.

    Meta-batch number ``n`` holds tasks ``n*B, ..., n*B + B - 1`` of ``sampler``
    (``B = meta_batch_size``). Iteration yields batches ``start, start + 1, ...``,
    ``num_batches`` of them (forever if ``None``). Resuming a run at batch ``k``
    with ``start=k`` therefore continues exactly the stream an uninterrupted run
    would have seen, and the worker count never changes the data.

    Args:
        sampler: A task source with ``sample(index) -> Task`` (:class:`TaskSampler`,
            :class:`~paddlefsl.data.SinusoidTasks`, ...).
        meta_batch_size: Tasks per meta-batch (B).
        num_batches: Number of batches this loader yields, or ``None`` for no end.
        start: Number of the first batch to yield.
        num_workers: Background threads; 0 loads in the calling thread.
        prefetch: Batches each worker may prepare ahead of the consumer.
        return_numpy: Yield numpy arrays instead of paddle tensors.

    Example:
        >>> import numpy as np
        >>> data = (np.zeros((50, 4, 4), np.uint8), np.repeat(np.arange(10), 5))
        >>> loader = MetaBatchLoader(TaskSampler(data, 5, 1, 2), meta_batch_size=4,
        ...                          num_batches=3, num_workers=2)
        >>> [list(b.support_x.shape) for b in loader]
        [[4, 5, 1, 4, 4], [4, 5, 1, 4, 4], [4, 5, 1, 4, 4]]

    """

    def __init__(
        self,
        sampler: TaskSource,
        meta_batch_size: int,
        num_batches: int | None = None,
        start: int = 0,
        num_workers: int = 0,
        prefetch: int = 2,
        return_numpy: bool = False,
    ) -> None:
        self.sampler = sampler
        self.meta_batch_size = _positive_int("meta_batch_size", meta_batch_size)
        self.num_batches = (
            None if num_batches is None else _positive_int("num_batches", num_batches, 0)
        )
        self.start = _positive_int("start", start, minimum=0)
        self.num_workers = _positive_int("num_workers", num_workers, minimum=0)
        self.prefetch = _positive_int("prefetch", prefetch)
        self.return_numpy = return_numpy

    def _load(self, number: int) -> TaskBatch:
        first = number * self.meta_batch_size
        return _load_tasks(self.sampler, range(first, first + self.meta_batch_size))

    def batch(self, number: int) -> TaskBatch:
        """Return meta-batch ``number`` (absolute, independent of ``start``)."""
        batch = self._load(_positive_int("number", number, minimum=0))
        return batch if self.return_numpy else batch.to_tensors()

    def __len__(self) -> int:
        if self.num_batches is None:
            raise TypeError("this MetaBatchLoader is endless (num_batches=None)")
        return self.num_batches

    def __iter__(self) -> Iterator[TaskBatch]:
        stop = None if self.num_batches is None else self.start + self.num_batches
        numbers = itertools.count(self.start) if stop is None else range(self.start, stop)
        for batch in _prefetch_map(self._load, numbers, self.num_workers, self.prefetch):
            # Tensors are made in the consumer's thread, on paddle's current device.
            yield batch if self.return_numpy else batch.to_tensors()


class FixedTasks(Sequence[Task]):
    """A fixed, lazily drawn list of tasks: ``fixed[i]`` is ``source.sample(i)``.

    Nothing is held in memory; each access redraws the (identical) task, so even
    600 miniImageNet tasks cost nothing until used.

    Args:
        source: A task source with ``sample(index) -> Task``.
        num_tasks: Length of the sequence.

    Example:
        >>> import numpy as np
        >>> data = (np.zeros((50, 4, 4), np.uint8), np.repeat(np.arange(10), 5))
        >>> tasks = FixedTasks(TaskSampler(data, 5, 1, 1, seed=3), num_tasks=10)
        >>> len(tasks), tasks[9].index, len(list(tasks.batches(4)))
        (10, 9, 3)

    """

    def __init__(self, source: TaskSource, num_tasks: int) -> None:
        self.source = source
        self.num_tasks = _positive_int("num_tasks", num_tasks, minimum=0)

    def __len__(self) -> int:
        return self.num_tasks

    @overload
    def __getitem__(self, i: int) -> Task: ...

    @overload
    def __getitem__(self, i: slice) -> list[Task]: ...

    def __getitem__(self, i: int | slice) -> Task | list[Task]:
        if isinstance(i, slice):
            return [self.source.sample(j) for j in range(*i.indices(self.num_tasks))]
        if not -self.num_tasks <= i < self.num_tasks:
            raise IndexError(f"task {i} out of range for {self.num_tasks} fixed tasks")
        return self.source.sample(i % self.num_tasks)

    def batches(
        self,
        batch_size: int,
        num_workers: int = 0,
        prefetch: int = 2,
        return_numpy: bool = False,
    ) -> Iterator[TaskBatch]:
        """Yield the tasks in order as meta-batches; the last one may be smaller."""
        size = _positive_int("batch_size", batch_size)

        def load(number: int) -> TaskBatch:
            stop = min((number + 1) * size, self.num_tasks)
            return _load_tasks(self.source, range(number * size, stop))

        count = -(-self.num_tasks // size)
        for batch in _prefetch_map(load, range(count), num_workers, prefetch):
            yield batch if return_numpy else batch.to_tensors()


def fixed_tasks(
    dataset: Any,
    ways: int,
    shots: int,
    queries: int,
    num_tasks: int = 600,
    seed: int = DEFAULT_EVAL_SEED,
) -> FixedTasks:
    """The standard fixed evaluation set: ``num_tasks`` seeded tasks, same every run.

    Args:
        dataset: Any dataset :class:`TaskSampler` accepts (usually a test split).
        ways: Classes per task.
        shots: Support examples per class.
        queries: Query examples per class.
        num_tasks: Number of tasks (600 is the usual few-shot protocol).
        seed: Seed of the evaluation stream.

    Returns:
        A lazy :class:`FixedTasks` sequence; ``list(...)`` it to materialise.

    Example:
        >>> import numpy as np
        >>> data = (np.zeros((50, 4, 4), np.uint8), np.repeat(np.arange(10), 5))
        >>> a = fixed_tasks(data, 5, 1, 3, num_tasks=20)
        >>> b = fixed_tasks(data, 5, 1, 3, num_tasks=20)
        >>> bool((a[7].classes == b[7].classes).all())
        True

    """
    return FixedTasks(TaskSampler(dataset, ways, shots, queries, seed=seed), num_tasks)

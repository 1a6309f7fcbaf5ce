"""Task-source wrappers: TaskPool and RandomClassRotation (paddlefsl.data.task_sources)."""

from __future__ import annotations

import numpy as np
import pytest
from data_factories import assert_same_task, example_ids

from paddlefsl.data import MetaBatchLoader, RandomClassRotation, TaskPool, TaskSampler


def test_task_pool_cycles_through_the_sources_first_tasks(index_dataset):
    source = TaskSampler(index_dataset, 5, 1, 2, seed=9)
    pool = TaskPool(source, size=3)
    assert len(pool) == 3
    for i in range(8):
        task = pool.sample(i)
        assert task.index == i % 3
        assert_same_task(task, source.sample(i % 3))
    # The pool's tasks are distinct: only the cycle repeats them.
    ids = [tuple(example_ids(pool.sample(i).support_x)) for i in range(3)]
    assert len(set(ids)) == 3
    # Meta-batches of a pool of two batches come round every second batch.
    loader = MetaBatchLoader(TaskPool(source, 4), 2, num_batches=5, return_numpy=True)
    batches = list(loader)
    np.testing.assert_array_equal(batches[0].support_x, batches[2].support_x)
    np.testing.assert_array_equal(batches[1].query_x, batches[3].query_x)
    assert not np.array_equal(batches[0].support_x, batches[1].support_x)
    assert batches[4].indices.tolist() == [0, 1]  # tasks 8 and 9 are the pool's 0 and 1
    # The loader gathers a pool's batch in one go (the sampler's sample_batch): same tasks.
    for j, task in enumerate(TaskPool(source, 4).sample(i) for i in (8, 9)):
        np.testing.assert_array_equal(batches[4].support_x[j], task.support_x)
        np.testing.assert_array_equal(batches[4].query_y[j], task.query_y)


@pytest.mark.parametrize("size", [0, -2, 1.5, True, None])
def test_task_pool_rejects_a_bad_size(index_dataset, size):
    with pytest.raises(ValueError, match="size must be an integer >= 1"):
        TaskPool(TaskSampler(index_dataset, 5, 1, 2), size)


@pytest.mark.parametrize("index", [-1, 2.0, "3"])
def test_task_pool_rejects_a_bad_index(index_dataset, index):
    with pytest.raises(ValueError, match="task index must be an integer >= 0"):
        TaskPool(TaskSampler(index_dataset, 5, 1, 2), 4).sample(index)


def _square_sampler(seed: int = 9) -> TaskSampler:
    # Asymmetric random images, so that every rotation of one differs from the others.
    rng = np.random.default_rng(0)
    images = rng.integers(0, 255, (60, 6, 6)).astype(np.uint8)
    return TaskSampler((images, np.repeat(np.arange(12), 5)), 4, 2, 3, seed=seed)


def test_random_class_rotation_turns_each_class_as_a_whole():
    source = _square_sampler()
    rotated = RandomClassRotation(source, seed=3)
    seen = set()
    for i in range(30):
        plain, task = source.sample(i), rotated.sample(i)
        turns = task.info["quarter_turns"]
        assert len(turns) == 4 and set(turns) <= {0, 1, 2, 3}
        seen.update(turns)
        for images, plain_images, labels in (
            (task.support_x, plain.support_x, task.support_y),
            (task.query_x, plain.query_x, task.query_y),
        ):
            for label, k in enumerate(turns):
                mask = labels == label
                want = np.rot90(plain_images[mask], k, axes=(-2, -1))
                np.testing.assert_array_equal(images[mask], want)
        np.testing.assert_array_equal(task.support_y, plain.support_y)
        np.testing.assert_array_equal(task.classes, plain.classes)
        assert_same_task(rotated.sample(i), task)  # a pure function of the index
    assert seen == {0, 1, 2, 3}
    # The source's arrays are not touched.
    assert_same_task(source.sample(0), _square_sampler().sample(0))


def test_random_class_rotation_after_a_pool_turns_the_pools_tasks_afresh():
    source = _square_sampler()
    rotated = RandomClassRotation(TaskPool(source, 2), seed=0)
    first = rotated.sample(0)
    again = [rotated.sample(2 * c) for c in range(1, 8)]
    for task in again:  # the same characters and drawings ...
        np.testing.assert_array_equal(task.classes, first.classes)
        assert task.index == 0
    # ... at other angles on some passes
    assert any(t.info["quarter_turns"] != first.info["quarter_turns"] for t in again)
    # With only the identity turn it is the source itself.
    same = RandomClassRotation(source, seed=0, quarter_turns=[0])
    for i in range(3):
        assert_same_task(same.sample(i), source.sample(i))


def test_random_class_rotation_streams_depend_on_the_seed():
    source = _square_sampler()
    a = [RandomClassRotation(source, seed=1).sample(i).info["quarter_turns"] for i in range(20)]
    b = [RandomClassRotation(source, seed=2).sample(i).info["quarter_turns"] for i in range(20)]
    assert a != b


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"seed": -1}, "seed must be an integer >= 0"),
        ({"quarter_turns": []}, "quarter_turns must be a non-empty list of integers"),
        ({"quarter_turns": [0.5]}, "quarter_turns must be a non-empty list of integers"),
    ],
)
def test_random_class_rotation_rejects_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        RandomClassRotation(_square_sampler(), **kwargs)


def test_random_class_rotation_needs_square_images():
    images = np.zeros((40, 4, 6), np.uint8)
    source = TaskSampler((images, np.repeat(np.arange(8), 5)), 3, 1, 1)
    with pytest.raises(ValueError, match="square images"):
        RandomClassRotation(source).sample(0)
    with pytest.raises(ValueError, match="task index must be an integer >= 0"):
        RandomClassRotation(_square_sampler()).sample(-3)

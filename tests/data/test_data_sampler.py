from __future__ import annotations

import threading

import numpy as np
import paddle
import pytest
from data_factories import assert_same_task, example_ids

from paddlefsl.data import (
    ClassDataset,
    DatasetAdapter,
    FixedTasks,
    MetaBatchLoader,
    SinusoidTasks,
    Task,
    TaskBatch,
    TaskConfigError,
    TaskSampler,
    fixed_tasks,
)


def test_labels_remapped_exactly(index_dataset):
    images, labels = index_dataset
    sampler = TaskSampler((images, labels), ways=4, shots=2, queries=3, seed=5)
    orders = set()
    for i in range(50):
        t = sampler.sample(i)
        assert t.support_y.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
        assert t.query_y.tolist() == [j for j in range(4) for _ in range(3)]
        assert t.support_y.dtype == np.int64 and t.query_y.dtype == np.int64
        assert len(set(t.classes.tolist())) == 4
        # every example labelled j really is of dataset class classes[j]
        for x, y in ((t.support_x, t.support_y), (t.query_x, t.query_y)):
            np.testing.assert_array_equal(labels[example_ids(x)], t.classes[y])
        orders.add(tuple(np.argsort(t.classes)))
    assert len(orders) > 1, "class order within tasks should be random, not sorted"


def test_support_and_query_disjoint_and_counted(index_dataset):
    images, labels = index_dataset
    sampler = TaskSampler((images, labels), ways=5, shots=3, queries=4, seed=1)
    for i in range(30):
        t = sampler.sample(i)
        s, q = example_ids(t.support_x), example_ids(t.query_x)
        assert len(set(s)) == len(s) == 15 and len(set(q)) == len(q) == 20
        assert not set(s) & set(q)
        assert np.bincount(t.support_y).tolist() == [3] * 5
        assert np.bincount(t.query_y).tolist() == [4] * 5


def test_same_seed_same_tasks_any_order(index_dataset):
    a = TaskSampler(index_dataset, 5, 1, 2, seed=11)
    b = TaskSampler(index_dataset, 5, 1, 2, seed=11)
    forward = [a.sample(i) for i in range(10)]
    backward = [b.sample(i) for i in reversed(range(10))][::-1]
    for x, y in zip(forward, backward, strict=True):
        assert_same_task(x, y)
    other = TaskSampler(index_dataset, 5, 1, 2, seed=12)
    assert any(
        not np.array_equal(other.sample(i).support_x, forward[i].support_x) for i in range(10)
    )


def test_golden_tasks_are_stable(index_dataset):
    # Fixed evaluation tasks must not change silently (e.g. with a new sampling
    # algorithm or a numpy Generator stream change): that would make results
    # incomparable across versions.
    sampler = TaskSampler(index_dataset, 3, 1, 1, seed=0)
    got = []
    for i in range(3):
        t = sampler.sample(i)
        got.append(
            (t.classes.tolist(), example_ids(t.support_x).tolist(), example_ids(t.query_x).tolist())
        )
    assert got == GOLDEN, got


GOLDEN = [
    ([20, 32, 23], [68, 8, 53], [11, 40, 51]),
    ([32, 17, 29], [35, 2, 22], [8, 39, 58]),
    ([11, 26, 5], [59, 21, 65], [25, 34, 16]),
]


def test_task_to_tensors(index_dataset):
    t = TaskSampler(index_dataset, 3, 2, 1).sample(0)
    sx, sy, qx, qy = t.to_tensors()
    assert list(sx.shape) == [6, 1, 3, 3] and sx.dtype == paddle.float32
    assert list(qy.shape) == [3] and qy.dtype == paddle.int64


def test_meta_batch_layout_and_indices(index_dataset):
    sampler = TaskSampler(index_dataset, 5, 2, 3, seed=2)
    loader = MetaBatchLoader(sampler, meta_batch_size=4, num_batches=3, start=2)
    batches = list(loader)
    assert len(batches) == len(loader) == 3
    for n, batch in enumerate(batches):
        assert isinstance(batch, TaskBatch) and isinstance(batch.support_x, paddle.Tensor)
        assert list(batch.support_x.shape) == [4, 10, 1, 3, 3]
        assert list(batch.support_y.shape) == [4, 10]
        assert list(batch.query_x.shape) == [4, 15, 1, 3, 3]
        assert list(batch.query_y.shape) == [4, 15]
        assert batch.indices.tolist() == list(range((2 + n) * 4, (3 + n) * 4))
        for b, (sx, sy, qx, qy) in enumerate(batch):
            t = sampler.sample(int(batch.indices[b]))
            np.testing.assert_array_equal(sx.numpy(), t.support_x)
            np.testing.assert_array_equal(sy.numpy(), t.support_y)
            np.testing.assert_array_equal(qx.numpy(), t.query_x)
            np.testing.assert_array_equal(qy.numpy(), t.query_y)


def stream(loader: MetaBatchLoader) -> list[np.ndarray]:
    return [np.concatenate([b.support_x.reshape(-1), b.query_x.reshape(-1)]) for b in loader]


@pytest.mark.parametrize("workers", [1, 3])
def test_worker_count_does_not_change_data(index_dataset, workers):
    sampler = TaskSampler(index_dataset, 5, 1, 2, seed=3)
    ref = stream(MetaBatchLoader(sampler, 3, num_batches=8, return_numpy=True))
    got = stream(
        MetaBatchLoader(
            sampler, 3, num_batches=8, num_workers=workers, prefetch=2, return_numpy=True
        )
    )
    for x, y in zip(ref, got, strict=True):
        np.testing.assert_array_equal(x, y)


def test_resume_equals_uninterrupted_stream(index_dataset):
    sampler = TaskSampler(index_dataset, 4, 1, 1, seed=9)
    full = stream(MetaBatchLoader(sampler, 2, num_batches=10, return_numpy=True))
    resumed = stream(
        MetaBatchLoader(sampler, 2, num_batches=4, start=6, num_workers=2, return_numpy=True)
    )
    for x, y in zip(full[6:], resumed, strict=True):
        np.testing.assert_array_equal(x, y)
    single = MetaBatchLoader(sampler, 2, return_numpy=True).batch(7)
    np.testing.assert_array_equal(single.support_x.reshape(-1), full[7][: single.support_x.size])


def test_endless_loader_stops_cleanly(index_dataset):
    loader = MetaBatchLoader(TaskSampler(index_dataset, 2, 1, 1), 2, num_workers=2)
    with pytest.raises(TypeError):
        len(loader)
    before = threading.active_count()
    it = iter(loader)
    for _ in range(5):
        next(it)
    it.close()  # what a `break` out of the for loop does
    assert threading.active_count() <= before


def test_worker_errors_reach_the_consumer():
    class Broken:
        def sample(self, index: int) -> Task:
            if index == 5:
                raise RuntimeError("boom at 5")
            z = np.zeros((1, 1), np.float32)
            return Task(z, z, z, z, index=index)

    loader = MetaBatchLoader(Broken(), 2, num_batches=5, num_workers=2)
    with pytest.raises(RuntimeError, match="boom at 5"):
        list(loader)


def test_fixed_tasks_are_identical_and_lazy(index_dataset):
    a = fixed_tasks(index_dataset, 5, 1, 2)
    b = fixed_tasks(index_dataset, 5, 1, 2)
    assert isinstance(a, FixedTasks) and len(a) == 600
    for i in (0, 1, 599, -1):
        assert_same_task(a[i], b[i])
    assert a[-1].index == 599
    with pytest.raises(IndexError):
        a[600]
    # differs from the training stream of the same data (default seed 0)
    train = TaskSampler(index_dataset, 5, 1, 2)
    assert not np.array_equal(a[0].support_x, train.sample(0).support_x)
    small = fixed_tasks(index_dataset, 5, 1, 2, num_tasks=10, seed=4)
    batches = list(small.batches(4, num_workers=2))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert np.concatenate([b.indices for b in batches]).tolist() == list(range(10))
    np.testing.assert_array_equal(batches[2].query_x[1].numpy(), small[9].query_x)


def test_paddle_dataset_adapter():
    class Pairs(paddle.io.Dataset):
        def __len__(self):
            return 12

        def __getitem__(self, i):
            return paddle.full([1, 2, 2], float(i)), i % 4

    sampler = TaskSampler(Pairs(), ways=4, shots=1, queries=2, seed=0)
    t = sampler.sample(0)
    ids = t.support_x.reshape(4, -1)[:, 0].astype(int)
    assert (ids % 4).tolist() == t.classes.tolist()
    adapter = DatasetAdapter(Pairs())
    assert adapter.num_classes == 4 and adapter.indices_of(3).tolist() == [3, 7, 11]


def test_class_dataset_getitem_and_channels():
    rgb = np.zeros((4, 5, 6, 3), np.uint8)
    rgb[..., 1] = 255
    ds = ClassDataset(rgb, [0, 0, 1, 1])
    x, y = ds[3]
    assert x.shape == (3, 5, 6) and x.dtype == np.float32 and y == 1
    assert x[1].min() == 1.0 and x[0].max() == 0.0
    assert len(ds) == 4 and ds.classes.tolist() == [0, 1]
    with pytest.raises(ValueError, match="channels-first"):
        ClassDataset(np.zeros((4, 3, 8, 8), np.uint8), [0, 0, 1, 1])
    with pytest.raises(ValueError, match=r"\[N, H, W\]"):
        ClassDataset(np.zeros((4, 8), np.uint8), [0, 0, 1, 1])


# --- errors ------------------------------------------------------------------------


def test_too_many_ways(index_dataset):
    with pytest.raises(TaskConfigError, match=r"ways=11 but the dataset has only 10 classes"):
        TaskSampler(index_dataset, ways=11, shots=1, queries=1)


def test_too_many_shots_plus_queries():
    images = np.zeros((9, 2, 2), np.uint8)
    labels = np.array([0, 0, 0, 0, 1, 1, 1, 1, 1])
    with pytest.raises(TaskConfigError, match=r"= 5 but 1 class\(es\).*0 \(4 examples\)"):
        TaskSampler((images, labels), ways=2, shots=2, queries=3)
    TaskSampler((images, labels), ways=2, shots=1, queries=3)  # 4 fit


@pytest.mark.parametrize(
    "labels", [np.array([0.0, 1.0, 0.5]), np.array(["a", "b", "c"]), [True, False, True]]
)
def test_non_integer_labels(labels):
    with pytest.raises(ValueError, match="labels must be integer class ids"):
        TaskSampler((np.zeros((3, 2, 2), np.uint8), labels), 1, 1, 0)


def test_non_integer_labels_from_dataset():
    pairs = [(np.zeros((1, 2, 2), np.float32), 0.5) for _ in range(3)]
    with pytest.raises(ValueError, match="example 0: label 0.5 .* not a single integer"):
        TaskSampler(pairs, 1, 1, 0)


@pytest.mark.parametrize("kwargs", [{"ways": 0}, {"shots": 0}, {"queries": -1}, {"seed": -1}])
def test_invalid_counts(index_dataset, kwargs):
    args = {"ways": 2, "shots": 1, "queries": 1, **kwargs}
    with pytest.raises(ValueError, match=f"{next(iter(kwargs))} must be an integer"):
        TaskSampler(index_dataset, **args)


# --- sinusoid ------------------------------------------------------------------------


def test_sinusoid_tasks():
    tasks = SinusoidTasks(shots=10, queries=7, seed=0)
    t = tasks.sample(4)
    assert t.support_x.shape == (10, 1) and t.query_y.shape == (7, 1)
    assert t.support_x.dtype == np.float32 and t.support_y.dtype == np.float32
    amp, phase = t.info["amplitude"], t.info["phase"]
    np.testing.assert_allclose(t.support_y, amp * np.sin(t.support_x - phase), atol=1e-5)
    assert_same_task(t, SinusoidTasks(shots=10, queries=7, seed=0).sample(4))
    draws = [tasks.sample(i) for i in range(300)]
    amps = np.array([d.info["amplitude"] for d in draws])
    phases = np.array([d.info["phase"] for d in draws])
    xs = np.concatenate([d.support_x for d in draws])
    assert 0.1 <= amps.min() and amps.max() <= 5.0 and amps.std() > 1.0
    assert 0.0 <= phases.min() and phases.max() <= np.pi
    assert -5.0 <= xs.min() and xs.max() <= 5.0


def test_sinusoid_with_loader():
    loader = MetaBatchLoader(SinusoidTasks(5, 3), 8, num_batches=2, num_workers=2)
    batches = list(loader)
    assert list(batches[0].support_x.shape) == [8, 5, 1]
    assert list(batches[1].query_y.shape) == [8, 3, 1]
    assert batches[1].indices.tolist() == list(range(8, 16))

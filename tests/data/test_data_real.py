"""Checks on the real datasets; marked ``data`` and skipped when the data is absent.

Omniglot is read from ``$PADDLEFSL_DATA/omniglot`` (default ``../shared/data``, which
is read-only: the cache goes to ``$PADDLEFSL_TEST_CACHE`` or the user cache).
miniImageNet needs the images, so it is read from ``$PADDLEFSL_MINI_ROOT`` or from
``$PADDLEFSL_DATA/miniimagenet`` when that holds an ``images/`` folder. The first run
decodes everything (a few seconds for Omniglot, ~20 s for miniImageNet); later runs
load the caches.
"""

from __future__ import annotations

import os
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from data_factories import SHARED

from paddlefsl.data import MetaBatchLoader, MiniImageNet, Omniglot, TaskSampler, fixed_tasks

pytestmark = pytest.mark.data

OMNIGLOT = SHARED / "omniglot"
CACHE = os.environ.get("PADDLEFSL_TEST_CACHE")  # None: the library's default choice


def mini_root() -> Path | None:
    for candidate in (os.environ.get("PADDLEFSL_MINI_ROOT"), SHARED / "miniimagenet"):
        if candidate and (Path(candidate) / "images").is_dir():
            return Path(candidate)
    return None


needs_omniglot = pytest.mark.skipif(
    not (OMNIGLOT / "images_background.zip").is_file()
    or not (OMNIGLOT / "images_evaluation.zip").is_file(),
    reason=f"real Omniglot archives not found in {OMNIGLOT}",
)
needs_mini = pytest.mark.skipif(
    mini_root() is None, reason="miniImageNet images not found (set PADDLEFSL_MINI_ROOT)"
)

# split -> (classes with rotations, characters)
EXPECTED = {
    "vinyals": {
        "train": (4112, 1028),
        "val": (688, 172),
        "test": (1692, 423),
        "trainval": (4800, 1200),
    },
    "maml": {
        "train": (4400, 1100),
        "val": (400, 100),
        "test": (1692, 423),
        "trainval": (4800, 1200),
    },
}


@needs_omniglot
@pytest.mark.parametrize("scheme", ["vinyals", "maml"])
def test_omniglot_counts(scheme):
    chars = {}
    for split, (n_classes, n_chars) in EXPECTED[scheme].items():
        ds = Omniglot(OMNIGLOT, split=split, scheme=scheme, cache_dir=CACHE)
        assert (ds.num_classes, len(ds.characters)) == (n_classes, n_chars), split
        assert len(ds) == 20 * n_classes and set(ds.class_counts().tolist()) == {20}
        chars[split] = set(ds.characters)
    assert len(chars["train"] | chars["val"] | chars["test"]) == 1623
    assert not chars["train"] & chars["test"] and not chars["val"] & chars["test"]
    assert not (OMNIGLOT / "paddlefsl-cache").exists(), "read-only data must not get a cache"


@needs_omniglot
def test_omniglot_images_and_tasks():
    ds = Omniglot(OMNIGLOT, split="test", cache_dir=CACHE)
    x = ds.get_images(np.arange(0, len(ds), 997))
    assert x.shape[1:] == (1, 28, 28) and set(np.unique(x).tolist()) == {0.0, 1.0}
    assert 0.02 < x.mean() < 0.4  # inverted: strokes (1) on background (0)
    loader = MetaBatchLoader(TaskSampler(ds, 20, 1, 5), 4, num_batches=2, num_workers=2)
    assert [list(b.query_x.shape) for b in loader] == [[4, 100, 1, 28, 28]] * 2
    tasks = fixed_tasks(ds, 5, 1, 15)
    assert len(tasks) == 600 and tasks[599].query_x.shape == (75, 1, 28, 28)


@needs_mini
@pytest.mark.parametrize("split,n_classes", [("train", 64), ("val", 16), ("test", 20)])
def test_miniimagenet_counts(split, n_classes):
    ds = MiniImageNet(mini_root(), split=split, cache_dir=CACHE)
    assert ds.num_classes == n_classes and len(ds) == 600 * n_classes
    assert set(ds.class_counts().tolist()) == {600}
    assert ds.images.shape[1:] == (84, 84, 3) and isinstance(ds.images, np.memmap)
    ravi = resources.files("paddlefsl.data").joinpath("splits/miniimagenet/ravi")
    assert ds.class_names == ravi.joinpath(f"{split}.txt").read_text().split()
    t = TaskSampler(ds, 5, 5, 15).sample(0)
    assert t.support_x.shape == (25, 3, 84, 84) and t.query_x.shape == (75, 3, 84, 84)

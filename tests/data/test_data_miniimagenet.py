from __future__ import annotations

import os
import pickle
import shutil

import numpy as np
import pytest
from data_factories import (
    MINI_CLASSES,
    MINI_PER_CLASS,
    class_colour,
    make_mini_csv,
    make_mini_folders,
    make_mini_pickles,
    mini_pickle_data,
)

from paddlefsl.data import (
    CorruptDataError,
    DatasetNotFoundError,
    MiniImageNet,
    TaskSampler,
)


def check_colours(ds: MiniImageNet) -> None:
    """Each image's dominant colour must be that of its class: labels match images."""
    for label, wnid in enumerate(ds.class_names):
        x = ds.get_images(ds.indices_of(label))  # [n, 3, 84, 84]
        centre = x[:, :, 42:, 42:].mean(axis=(2, 3)) * 255
        np.testing.assert_allclose(centre, np.tile(class_colour(wnid), (len(x), 1)), atol=4)


@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_csv_layout(tmp_path, split):
    root = make_mini_csv(tmp_path / "mini")
    ds = MiniImageNet(root, split=split)
    assert ds.layout == "csv"
    assert ds.class_names == MINI_CLASSES[split]
    assert ds.class_counts().tolist() == [MINI_PER_CLASS] * len(MINI_CLASSES[split])
    x, y = ds[0]
    assert x.shape == (3, 84, 84) and x.dtype == np.float32 and 0 <= x.min() <= x.max() <= 1
    assert isinstance(ds.images, np.memmap) and ds.images.shape[1:] == (84, 84, 3)
    check_colours(ds)


def test_folder_layout_matches_csv_layout(tmp_path):
    a = MiniImageNet(make_mini_csv(tmp_path / "csv"), split="train")
    b = MiniImageNet(make_mini_folders(tmp_path / "dirs"), split="train", check_split=False)
    assert b.layout == "folders" and a.class_names == b.class_names
    np.testing.assert_array_equal(a.labels, b.labels)
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_folder_layout_checks_ravi_classes(tmp_path):
    root = make_mini_folders(tmp_path / "dirs")
    with pytest.raises(ValueError, match=r"holds 3 class folders, which are not the 64 classes"):
        MiniImageNet(root, split="train")


@pytest.mark.parametrize("val_name", ["val", "validation"])
def test_pickle_layout(tmp_path, val_name):
    root = make_mini_pickles(tmp_path / "pkl", val_name=val_name)
    for split in ("train", "val", "test"):
        ds = MiniImageNet(root, split=split)
        assert ds.layout == "pickle"
        data = mini_pickle_data(split)
        assert ds.class_names == sorted(data["class_dict"])
        for label, wnid in enumerate(ds.class_names):
            idx = data["class_dict"][wnid]
            assert ds.indices_of(label).tolist() == idx
            np.testing.assert_array_equal(ds.images[idx], data["image_data"][idx])


def test_images_are_resized(tmp_path):
    root = make_mini_csv(tmp_path / "big", size=100)
    ds = MiniImageNet(root, split="val")
    assert ds.images.shape[1:] == (84, 84, 3)
    check_colours(ds)
    small = MiniImageNet(root, split="val", image_size=32, cache_dir=tmp_path / "c32")
    assert small[0][0].shape == (3, 32, 32)
    pkl = make_mini_pickles(tmp_path / "pkl", size=90)
    assert MiniImageNet(pkl, split="test").images.shape[1:] == (84, 84, 3)


def test_cache_is_reused_and_rebuilt_when_truncated(tmp_path):
    root = make_mini_csv(tmp_path / "mini")
    ds = MiniImageNet(root, split="train")
    expected = np.asarray(ds.images).copy()
    images_npy = ds.cache_dir / "miniimagenet-train-84px.images.npy"
    mtime = images_npy.stat().st_mtime_ns
    MiniImageNet(root, split="train")
    assert images_npy.stat().st_mtime_ns == mtime
    with open(images_npy, "r+b") as f:
        f.truncate(1000)
    again = MiniImageNet(root, split="train")
    np.testing.assert_array_equal(np.asarray(again.images), expected)


def test_sampling_5way_from_mini(tmp_path):
    root = make_mini_pickles(tmp_path / "pkl")
    ds = MiniImageNet(root, split="train")
    t = TaskSampler(ds, ways=3, shots=1, queries=2).sample(0)
    assert t.support_x.shape == (3, 3, 84, 84)


# --- errors ------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        MiniImageNet(tmp_path / "none", split="test")
    msg = str(err.value)
    assert "test.csv" in msg and "test/<wnid>/*.jpg" in msg
    assert "mini-imagenet-cache-test.pkl" in msg and "no official download" in msg


def test_missing_images(tmp_path):
    root = make_mini_csv(tmp_path / "mini")
    victim = sorted((root / "images").iterdir())[0]
    victim.unlink()
    with pytest.raises(DatasetNotFoundError, match=rf"1 of the 18 images listed .*{victim.name}"):
        MiniImageNet(root, split="train")


def test_corrupt_jpeg(tmp_path):
    root = make_mini_csv(tmp_path / "mini")
    victim = sorted((root / "images").iterdir())[-1]
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(CorruptDataError, match=rf"cannot decode image .*{victim.name}"):
        MiniImageNet(root, split="test")
    assert not any(p.suffix == ".json" for p in (root / "paddlefsl-cache").iterdir())


def test_bad_csv_header(tmp_path):
    root = make_mini_csv(tmp_path / "mini")
    text = (root / "val.csv").read_text().splitlines()
    (root / "val.csv").write_text("\n".join(["file,class", *text[1:]]))
    with pytest.raises(CorruptDataError, match="expected the header 'filename,label'"):
        MiniImageNet(root, split="val")


def test_corrupt_and_malicious_pickles(tmp_path):
    root = tmp_path / "pkl"
    root.mkdir()
    (root / "mini-imagenet-cache-train.pkl").write_bytes(b"\x80\x04garbage")
    with pytest.raises(CorruptDataError, match="cannot read the miniImageNet pickle"):
        MiniImageNet(root, split="train")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned > /dev/null",))

    with open(root / "mini-imagenet-cache-train.pkl", "wb") as f:
        pickle.dump({"image_data": Evil(), "class_dict": {}}, f)
    with pytest.raises(CorruptDataError, match=r"refusing to load (posix|os)\.system"):
        MiniImageNet(root, split="train")


def test_unknown_split(tmp_path):
    root = make_mini_csv(tmp_path / "mini")
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*'train', 'val', 'test'"):
        MiniImageNet(root, split="validation")
    shutil.rmtree(root)

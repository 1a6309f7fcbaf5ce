from __future__ import annotations

import io
import random
import shutil
import zipfile
from importlib import resources
from pathlib import Path

import numpy as np
import pytest
from data_factories import (
    OMNI_DRAWINGS,
    make_omniglot,
    omniglot_characters,
    write_vinyals_splits,
)

from paddlefsl.data import (
    CorruptDataError,
    DatasetNotFoundError,
    Omniglot,
    TaskConfigError,
    TaskSampler,
)


def load(root: Path, cache: Path, **kwargs) -> Omniglot:
    return Omniglot(root, cache_dir=cache, **kwargs)


def test_vinyals_split_with_rotations(omniglot_zips, omniglot_splits, tmp_path):
    ds = load(omniglot_zips, tmp_path, split="train", split_dir=omniglot_splits)
    chars = omniglot_characters()[:4]
    assert ds.characters == chars
    assert ds.num_classes == 16 and len(ds) == 16 * OMNI_DRAWINGS
    assert ds.class_counts().tolist() == [OMNI_DRAWINGS] * 16
    assert ds.class_names[:4] == [f"{chars[0]}/rot{r:03d}" for r in (0, 90, 180, 270)]
    x, y = ds[0]
    assert x.shape == (1, 28, 28) and x.dtype == np.float32 and y == 0
    # rot090 class images are the rot000 images turned by 90 degrees
    base = ds.get_images(ds.indices_of(0))
    for k in (1, 2, 3):
        turned = ds.get_images(ds.indices_of(k))
        np.testing.assert_array_equal(turned, np.rot90(base, k, axes=(2, 3)))
    assert not np.array_equal(base, ds.get_images(ds.indices_of(1)))


def test_splits_are_disjoint_and_without_rotations(omniglot_zips, omniglot_splits, tmp_path):
    got = {
        s: load(omniglot_zips, tmp_path, split=s, split_dir=omniglot_splits, rotations=False)
        for s in ("train", "val", "test", "trainval")
    }
    assert [got[s].num_classes for s in ("train", "val", "test", "trainval")] == [4, 1, 3, 5]
    assert set(got["train"].characters).isdisjoint(got["test"].characters)
    assert got["trainval"].characters == got["train"].characters + got["val"].characters
    assert all(n.endswith("/rot000") for n in got["test"].class_names)


def test_preprocessing_follows_maml(omniglot_zips, omniglot_splits, tmp_path):
    ds = load(omniglot_zips, tmp_path, split="train", split_dir=omniglot_splits)
    x = ds.get_images(ds.indices_of(0))
    # 1-bit originals resized by PIL stay binary (nearest), and are inverted:
    # mostly-white paper becomes mostly 0, strokes 1.
    assert set(np.unique(x).tolist()) == {0.0, 1.0}
    assert x.mean() < 0.3
    soft = load(omniglot_zips, tmp_path, split="train", split_dir=omniglot_splits, antialias=True)
    assert len(np.unique(soft.get_images(soft.indices_of(0)))) > 2
    raw = load(
        omniglot_zips,
        tmp_path,
        split="train",
        split_dir=omniglot_splits,
        invert=False,
        image_size=105,
        rotations=False,
    )
    original = raw.get_images(raw.indices_of(0)[:1])[0, 0]
    with zipfile.ZipFile(omniglot_zips / "images_background.zip") as zf:
        from PIL import Image

        member = "images_background/Alpha/character01/0001_01.png"
        expected = np.asarray(Image.open(io.BytesIO(zf.read(member))).convert("L")) / 255.0
    np.testing.assert_array_equal(original, expected.astype(np.float32))


def test_maml_split_reproduces_reference_procedure(omniglot_zips, tmp_path):
    chars = omniglot_characters()
    # cbfinn/maml: random.seed(1); random.shuffle(folders); here on sorted folders.
    expected = sorted(chars)
    random.seed(1)
    random.shuffle(expected)
    sizes = (3, 2)
    parts = {
        "train": expected[:3],
        "val": expected[3:5],
        "test": expected[5:],
        "trainval": expected[:5],
    }
    for split, members in parts.items():
        ds = load(omniglot_zips, tmp_path, split=split, scheme="maml", maml_sizes=sizes)
        assert ds.characters == members, split
        assert ds.num_classes == 4 * len(members)
    with pytest.raises(ValueError, match="needs more than 1200 characters but only 8"):
        load(omniglot_zips, tmp_path, split="train", scheme="maml")


def test_extracted_folders_equal_zips(omniglot_zips, omniglot_splits, tmp_path):
    folders = make_omniglot(tmp_path / "extracted", extracted=True)
    assert (folders / "images_background" / "Alpha" / "character01").is_dir()
    a = load(omniglot_zips, tmp_path / "c1", split="test", split_dir=omniglot_splits)
    b = load(folders, tmp_path / "c2", split="test", split_dir=omniglot_splits)
    assert a.class_names == b.class_names
    np.testing.assert_array_equal(np.asarray(a.images), np.asarray(b.images))


def test_cache_next_to_writable_data_and_reused(omniglot_splits, tmp_path):
    root = make_omniglot(tmp_path / "omni")
    ds = Omniglot(root, split="val", split_dir=omniglot_splits)
    assert ds.cache_dir == root / "paddlefsl-cache"
    assert isinstance(ds.images.base, np.memmap)
    header = next(ds.cache_dir.glob("*.json"))
    mtime = header.stat().st_mtime_ns
    Omniglot(root, split="train", split_dir=omniglot_splits)
    assert header.stat().st_mtime_ns == mtime, "a valid cache must not be rebuilt"


def test_truncated_cache_is_rebuilt(omniglot_zips, omniglot_splits, tmp_path):
    ds = load(omniglot_zips, tmp_path, split="train", split_dir=omniglot_splits)
    expected = np.asarray(ds.images)
    npy = next(ds.cache_dir.glob("*.npy"))
    with open(npy, "r+b") as f:
        f.truncate(npy.stat().st_size // 2)
    again = load(omniglot_zips, tmp_path, split="train", split_dir=omniglot_splits)
    np.testing.assert_array_equal(np.asarray(again.images), expected)
    assert npy.stat().st_size > 0 and np.load(npy, mmap_mode="r").shape[0] == 8 * OMNI_DRAWINGS


def test_stale_cache_when_source_changes(omniglot_splits, tmp_path):
    root = make_omniglot(tmp_path / "omni")
    cache = tmp_path / "cache"
    load(root, cache, split="train", split_dir=omniglot_splits)
    header = next(cache.rglob("*.json"))
    before = header.read_text()
    # Replace the evaluation archive by one with an extra alphabet.
    from data_factories import write_omniglot_zip

    write_omniglot_zip(
        root / "images_evaluation.zip", "images_evaluation", {"Gamma": 3, "Delta": 1}
    )
    ds = load(root, cache, split="train", split_dir=omniglot_splits)
    assert header.read_text() != before
    assert len(np.asarray(ds.images.base)) == 9 * OMNI_DRAWINGS


def test_sampling_from_omniglot(omniglot_zips, omniglot_splits, tmp_path):
    ds = load(omniglot_zips, tmp_path, split="train", split_dir=omniglot_splits)
    t = TaskSampler(ds, ways=5, shots=1, queries=3, seed=0).sample(0)
    assert t.support_x.shape == (5, 1, 28, 28) and t.query_x.shape == (15, 1, 28, 28)
    with pytest.raises(TaskConfigError, match="ways=17 but the dataset has only 16 classes"):
        TaskSampler(ds, ways=17, shots=1, queries=1)
    with pytest.raises(TaskConfigError, match=r"Alpha/character01/rot000 \(4 examples\)"):
        TaskSampler(ds, ways=5, shots=2, queries=3)


def test_packaged_vinyals_split_files():
    base = resources.files("paddlefsl.data").joinpath("splits/omniglot/vinyals")
    lines = {
        s: base.joinpath(f"{s}.txt").read_text().split()
        for s in ("train", "val", "test", "trainval")
    }
    assert [len(lines[s]) for s in ("train", "val", "test", "trainval")] == [4112, 688, 1692, 4800]
    chars = {s: {line.rsplit("/", 1)[0] for line in v} for s, v in lines.items()}
    assert [len(chars[s]) for s in ("train", "val", "test")] == [1028, 172, 423]
    assert not chars["train"] & chars["val"] and not chars["train"] & chars["test"]
    assert chars["trainval"] == chars["train"] | chars["val"]
    assert (base.parent.parent / "README.md").is_file()


# --- errors ------------------------------------------------------------------------


def test_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as err:
        Omniglot(tmp_path / "nowhere", cache_dir=tmp_path)
    msg = str(err.value)
    assert "images_background.zip" in msg and "images_evaluation.zip" in msg
    assert "github.com/brendenlake/omniglot" in msg and "download=True" in msg


def test_missing_one_archive(tmp_path):
    root = make_omniglot(tmp_path / "omni")
    (root / "images_evaluation.zip").unlink()
    with pytest.raises(DatasetNotFoundError, match="images_evaluation"):
        Omniglot(root, cache_dir=tmp_path / "c")


def test_corrupt_archive(tmp_path):
    root = make_omniglot(tmp_path / "omni")
    (root / "images_background.zip").write_bytes(b"this is not a zip file" * 10)
    with pytest.raises(CorruptDataError, match=r"cannot read Omniglot archive .*images_background"):
        Omniglot(root, cache_dir=tmp_path / "c")


def test_corrupt_image(tmp_path, omniglot_splits):
    root = make_omniglot(tmp_path / "omni")
    with zipfile.ZipFile(root / "images_evaluation.zip", "a") as zf:
        zf.writestr("images_evaluation/Gamma/character01/0001_99.png", b"\x89PNG broken")
    cache = tmp_path / "c"
    with pytest.raises(CorruptDataError, match=r"cannot decode image .*0001_99\.png"):
        Omniglot(root, cache_dir=cache, split_dir=omniglot_splits)
    # The (empty) lock file stays: deleting it would let a waiting process and a newcomer
    # hold two different locks.
    leftovers = [p.name for p in cache.rglob("*") if p.is_file() and p.suffix != ".lock"]
    assert leftovers == [], "a failed build must not leave cache files"


def test_unknown_split_and_scheme(omniglot_zips, tmp_path):
    with pytest.raises(ValueError, match=r"unknown split 'validation'.*'train', 'val'"):
        Omniglot(omniglot_zips, split="validation", cache_dir=tmp_path)
    with pytest.raises(ValueError, match=r"unknown Omniglot scheme 'lake'"):
        Omniglot(omniglot_zips, scheme="lake", cache_dir=tmp_path)


def test_split_file_not_matching_data(omniglot_zips, tmp_path):
    # The packaged Vinyals split names real alphabets that the tiny archives lack.
    with pytest.raises(CorruptDataError, match=r"lists 1028 character\(s\) that are not in"):
        Omniglot(omniglot_zips, split="train", cache_dir=tmp_path)
    bad = tmp_path / "splits"
    write_vinyals_splits(bad)
    (bad / "val.txt").write_text("Alpha/character01/rot045\n")
    with pytest.raises(CorruptDataError, match=r"val.txt line 1: 'Alpha/character01/rot045'"):
        Omniglot(omniglot_zips, split="val", split_dir=bad, cache_dir=tmp_path)


def test_read_only_root_falls_back_to_user_cache(tmp_path, omniglot_splits, monkeypatch):
    root = make_omniglot(tmp_path / "omni")
    monkeypatch.setenv("PADDLEFSL_CACHE", str(tmp_path / "user-cache"))
    root.chmod(0o555)
    try:
        ds = Omniglot(root, split="val", split_dir=omniglot_splits)
    finally:
        root.chmod(0o755)
    assert ds.cache_dir.parent == tmp_path / "user-cache"
    assert not (root / "paddlefsl-cache").exists()
    shutil.rmtree(tmp_path / "user-cache")


def test_existing_cache_is_found_anywhere(omniglot_splits, tmp_path, monkeypatch):
    monkeypatch.setenv("PADDLEFSL_CACHE", str(tmp_path / "user-cache"))
    root = make_omniglot(tmp_path / "omni")
    Omniglot(root, split="val", split_dir=omniglot_splits)  # built next to the data
    again = Omniglot(root, split="val", split_dir=omniglot_splits, cache_dir=tmp_path / "else")
    assert again.cache_dir == root / "paddlefsl-cache" and not (tmp_path / "else").exists()
    root.chmod(0o555)  # e.g. shared data made read-only after its cache was built
    try:
        shared = Omniglot(root, split="test", split_dir=omniglot_splits)
    finally:
        root.chmod(0o755)
    assert shared.cache_dir == root / "paddlefsl-cache"
    assert not (tmp_path / "user-cache").exists()

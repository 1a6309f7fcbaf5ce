"""Fixtures that build tiny datasets on disk in each supported layout."""

from __future__ import annotations

import csv
import io
import os
import pickle
import sys
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:  # run from a checkout without installing the package
    sys.path.insert(0, str(REPO))

#: Real data (read-only); tests using it are marked ``data`` and skip when absent.
SHARED = Path(os.environ.get("PADDLEFSL_DATA", REPO.parent / "shared" / "data"))

# Omniglot-like layout used by the synthetic archives: archive -> {alphabet: n_chars}.
OMNI_LAYOUT = {
    "images_background": {"Alpha": 3, "Beta": 2},
    "images_evaluation": {"Gamma": 3},
}
OMNI_DRAWINGS = 4


def png_bytes(seed: int, size: int = 105) -> bytes:
    """A 1-bit PNG like Omniglot's: white background, a few black strokes."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.ones((size, size), dtype=bool)
    for _ in range(3):
        r, c = rng.integers(10, size - 30, size=2)
        pixels[r : r + 20, c : c + 4] = False
    pixels[5:9, 5 : 5 + (seed % 50) + 10] = False  # asymmetric mark, so rotations differ
    buf = io.BytesIO()
    Image.fromarray(pixels).convert("1").save(buf, "PNG")
    return buf.getvalue()


def omniglot_characters() -> list[str]:
    return sorted(
        f"{alphabet}/character{i:02d}"
        for alphabets in OMNI_LAYOUT.values()
        for alphabet, n in alphabets.items()
        for i in range(1, n + 1)
    )


def write_omniglot_zip(path: Path, top: str, alphabets: dict[str, int]) -> None:
    """Zip in the official layout, with directory entries like the real archives."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr(f"{top}/", "")
        for alphabet, n in alphabets.items():
            zf.writestr(f"{top}/{alphabet}/", "")
            for ci in range(1, n + 1):
                char = f"{top}/{alphabet}/character{ci:02d}"
                zf.writestr(f"{char}/", "")
                for d in range(1, OMNI_DRAWINGS + 1):
                    seed = sum(map(ord, alphabet)) * 1000 + ci * 100 + d
                    zf.writestr(f"{char}/{ci:04d}_{d:02d}.png", png_bytes(seed))


def make_omniglot(root: Path, extracted: bool = False) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for top, alphabets in OMNI_LAYOUT.items():
        write_omniglot_zip(root / f"{top}.zip", top, alphabets)
        if extracted:
            with zipfile.ZipFile(root / f"{top}.zip") as zf:
                zf.extractall(root)
            (root / f"{top}.zip").unlink()
    return root


def write_vinyals_splits(directory: Path) -> dict[str, list[str]]:
    """Vinyals-format split files for the synthetic characters."""
    chars = omniglot_characters()
    splits = {"train": chars[:4], "val": chars[4:5], "test": chars[5:]}
    splits["trainval"] = splits["train"] + splits["val"]
    directory.mkdir(parents=True, exist_ok=True)
    for name, members in splits.items():
        lines = [f"{c}/rot{r:03d}" for c in members for r in (0, 90, 180, 270)]
        (directory / f"{name}.txt").write_text("\n".join(lines) + "\n")
    return splits


@pytest.fixture(scope="session")
def omniglot_zips(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Read-only use: synthetic Omniglot zips (tests must pass their own cache_dir)."""
    return make_omniglot(tmp_path_factory.mktemp("omniglot"))


@pytest.fixture(scope="session")
def omniglot_splits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("splits")
    write_vinyals_splits(directory)
    return directory


# --- miniImageNet ------------------------------------------------------------------

MINI_CLASSES = {
    "train": ["n00000001", "n00000002", "n00000003"],
    "val": ["n00000004", "n00000005"],
    "test": ["n00000006", "n00000007"],
}
MINI_PER_CLASS = 6


def class_colour(wnid: str) -> tuple[int, int, int]:
    k = int(wnid[1:])
    return (40 * k % 256, 255 - 30 * k % 256, 90 + 20 * k % 160)


def jpeg_bytes(colour: tuple[int, int, int], size: int, seed: int) -> bytes:
    from PIL import Image

    rng = np.random.default_rng(seed)
    pixels = np.empty((size, size, 3), np.uint8)
    pixels[:] = colour
    pixels[: size // 4, : size // 4] = rng.integers(0, 256, 3)  # per-image detail
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def mini_items(split: str) -> list[tuple[str, str]]:
    return [
        (f"{wnid}{i:08d}.jpg", wnid) for wnid in MINI_CLASSES[split] for i in range(MINI_PER_CLASS)
    ]


def make_mini_csv(root: Path, size: int = 84) -> Path:
    (root / "images").mkdir(parents=True, exist_ok=True)
    for split in MINI_CLASSES:
        rows = mini_items(split)
        with open(root / f"{split}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(["filename", "label"])
            writer.writerows(rows)
        for n, (name, wnid) in enumerate(rows):
            (root / "images" / name).write_bytes(jpeg_bytes(class_colour(wnid), size, n))
    return root


def make_mini_folders(root: Path, size: int = 84) -> Path:
    for split in MINI_CLASSES:
        for n, (name, wnid) in enumerate(mini_items(split)):
            folder = root / split / wnid
            folder.mkdir(parents=True, exist_ok=True)
            (folder / name).write_bytes(jpeg_bytes(class_colour(wnid), size, n))
    return root


def mini_pickle_data(split: str, size: int = 84) -> dict:
    """learn2learn's format: image_data [N, H, W, 3] uint8, class_dict {wnid: [indices]}."""
    rng = np.random.default_rng(len(split))
    n = len(MINI_CLASSES[split]) * MINI_PER_CLASS
    images = rng.integers(0, 256, size=(n, size, size, 3), dtype=np.uint8)
    # Interleave classes so that labels must really come from class_dict.
    class_dict = {
        w: list(range(i, n, len(MINI_CLASSES[split]))) for i, w in enumerate(MINI_CLASSES[split])
    }
    return {"image_data": images, "class_dict": class_dict}


def make_mini_pickles(root: Path, val_name: str = "validation", size: int = 84) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for split in MINI_CLASSES:
        name = val_name if split == "val" else split
        with open(root / f"mini-imagenet-cache-{name}.pkl", "wb") as f:
            pickle.dump(mini_pickle_data(split, size), f, protocol=4)
    return root


@pytest.fixture
def index_dataset() -> tuple[np.ndarray, np.ndarray]:
    """float images whose every pixel is the example's index, 10 classes x 7 examples.

    The labels are shuffled so that no test can rely on class-contiguous storage.
    """
    rng = np.random.default_rng(123)
    labels = rng.permutation(np.repeat(np.arange(10) * 3 + 5, 7))  # ids 5, 8, ..., 32
    images = np.broadcast_to(
        np.arange(len(labels), dtype=np.float32)[:, None, None], (len(labels), 3, 3)
    ).copy()
    return images, labels


def example_ids(x: np.ndarray) -> np.ndarray:
    """Recover the dataset index from the index-encoding images of ``index_dataset``."""
    return x.reshape(len(x), -1)[:, 0].astype(np.int64)


def assert_same_task(a: Any, b: Any) -> None:
    for name in ("support_x", "support_y", "query_x", "query_y", "classes"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)

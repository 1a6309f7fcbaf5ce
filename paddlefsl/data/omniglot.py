"""Omniglot (Lake et al., 2015) with the Vinyals and MAML class splits."""

from __future__ import annotations

import contextlib
import io
import os
import random
import re
import threading
import zipfile
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .base import ClassDataset
from .cache import cache_search_path, describe_sources, load_or_build
from .download import RemoteFile, download_file, extract_zip
from .errors import CorruptDataError, DatasetNotFoundError
from .imaging import decode_into, load_image, require_pillow

__all__ = ["OMNIGLOT_ARCHIVES", "Omniglot"]

_RAW = "https://raw.githubusercontent.com/brendenlake/omniglot/master/python"
_TFDS = "tensorflow/datasets url_checksums/omniglot.txt @ 333639b37af6c6fedf3610a4a2d42f1c6ef6f7d5"

#: The official archives. The sha256 values (and sizes 9,464,212 / 6,462,886 bytes)
#: are those pinned by TensorFlow Datasets for the same files. Replace an entry to
#: use a mirror or a different checksum (``sha256=None`` skips the check).
OMNIGLOT_ARCHIVES: dict[str, RemoteFile] = {
    "images_background": RemoteFile(
        f"{_RAW}/images_background.zip",
        "ad41ab679c8b5d90b271ef46be6987cc81211774a695c29dcc5367b2b26ee640",
        "images_background.zip",
        _TFDS,
    ),
    "images_evaluation": RemoteFile(
        f"{_RAW}/images_evaluation.zip",
        "1f61a8f3366785b057fc117d9228e78a16e3d976c8953b2a10fcc74cf0609cee",
        "images_evaluation.zip",
        _TFDS,
    ),
}

_SPLITS = ("train", "val", "test", "trainval")
_SCHEMES = ("vinyals", "maml")
_SPLIT_LINE = re.compile(r"^([^/]+/[^/]+)/rot(000|090|180|270)$")

# cbfinn/maml data_generator.py (commit a7f45f1bcd7457fe97b227a21e89b8a82cc5fa49,
# lines 41-54): all 1,623 character folders, random.seed(1); random.shuffle(...);
# the first 1,100 meta-train, the next 100 meta-val, the remaining 423 meta-test
# (with FLAGS.test_set). The paper's "1,200 training characters" are train + val.
_MAML_SEED = 1
_MAML_SIZES = (1100, 100)


class _RotatedImages:
    """Read-only array-like over base images, each turned by a multiple of 90 degrees.

    Rotated classes are views, not copies: memory stays that of the base cache.
    """

    def __init__(self, base: np.ndarray, src: np.ndarray, turns: np.ndarray) -> None:
        self.base, self.src, self.turns = base, src, turns
        self.shape = (len(src), *base.shape[1:])
        self.dtype = base.dtype
        self.ndim = base.ndim

    def __len__(self) -> int:
        return len(self.src)

    def __getitem__(self, index: Any) -> np.ndarray:
        if np.ndim(index) == 0 and not isinstance(index, slice):
            return np.rot90(self.base[self.src[index]], self.turns[index]).copy()
        idx = np.arange(len(self))[index] if isinstance(index, slice) else np.asarray(index)
        out = np.asarray(self.base[self.src[idx]])  # fancy indexing copies
        turns = self.turns[idx]
        for k in (1, 2, 3):
            mask = turns == k
            if mask.any():
                # np.rot90 turns counter-clockwise like PIL's rotate(90) used for
                # the rotDDD classes of the Vinyals split files.
                out[mask] = np.rot90(out[mask], k, axes=(1, 2))
        return out

    def __array__(self, dtype: Any = None, copy: Any = None) -> np.ndarray:
        out = self[np.arange(len(self))]
        return out if dtype is None else out.astype(dtype)


def _missing_message(root: Path) -> str:
    return (
        f"Omniglot not found in {root}. Expected images_background.zip and "
        "images_evaluation.zip, or their extracted folders "
        "images_background/<Alphabet>/<characterNN>/*.png and images_evaluation/... . "
        f"Get them from https://github.com/brendenlake/omniglot (python/ folder: "
        f"{_RAW}/images_background.zip and images_evaluation.zip), or pass download=True."
    )


def _sources(root: Path, download: bool) -> dict[str, Path]:
    """Locate (and with ``download``, fetch) each archive, preferring extracted folders."""
    found: dict[str, Path] = {}
    for name, remote in OMNIGLOT_ARCHIVES.items():
        folder, archive = root / name, root / f"{name}.zip"
        if folder.is_dir():
            found[name] = folder
        elif archive.is_file():
            found[name] = archive
        elif download:
            root.mkdir(parents=True, exist_ok=True)
            zip_path = download_file(remote, root)
            found[name] = extract_zip(zip_path, root, name)
        else:
            raise DatasetNotFoundError(_missing_message(root))
    return found


def _list_images(source: Path) -> list[tuple[str, str]]:
    """Return sorted ``(Alphabet/characterNN, member)`` pairs of one archive or folder."""
    items = []
    if source.is_dir():
        for dirpath, _, files in os.walk(source):
            for f in files:
                if f.lower().endswith(".png"):
                    rel = os.path.relpath(os.path.join(dirpath, f), source).split(os.sep)
                    if len(rel) == 3:
                        items.append((f"{rel[0]}/{rel[1]}", os.path.join(dirpath, f)))
    else:
        try:
            with zipfile.ZipFile(source) as zf:
                names = zf.namelist()
        except (zipfile.BadZipFile, OSError) as err:
            raise CorruptDataError(
                f"cannot read Omniglot archive {source}: {err}. Fix: delete it and copy or "
                "download it again (download=True)."
            ) from err
        for member in names:
            parts = member.split("/")
            if member.lower().endswith(".png") and len(parts) >= 3 and parts[0] != "__MACOSX":
                items.append((f"{parts[-3]}/{parts[-2]}", member))
    if not items:
        raise CorruptDataError(
            f"no images found in {source}; expected <Alphabet>/<characterNN>/*.png inside. "
            "Fix: use the official Omniglot archive or its extracted folder."
        )
    return sorted(items)


def _decode_all(
    sources: dict[str, Path], size: int, antialias: bool, invert: bool, alloc: Any
) -> dict:
    listing = []  # (character, source name, member)
    for name, source in sources.items():
        listing += [(char, name, member) for char, member in _list_images(source)]
    listing.sort()
    image_mod = require_pillow()
    with contextlib.ExitStack() as stack:
        zips = {
            n: stack.enter_context(zipfile.ZipFile(s)) for n, s in sources.items() if s.is_file()
        }
        lock = threading.Lock()

        def decode(item: tuple[str, str, str]) -> np.ndarray:
            _, name, member = item
            if name in zips:
                try:
                    with lock:  # one reader at a time on a shared ZipFile
                        data = zips[name].read(member)
                except (zipfile.BadZipFile, OSError, EOFError) as err:
                    raise CorruptDataError(
                        f"cannot read {member} from {sources[name]}: {err}. Fix: the archive "
                        "is damaged; delete it and copy or download it again."
                    ) from err
                img = load_image(io.BytesIO(data), f"{sources[name]}:{member}")
            else:
                img = load_image(member, member)
            if antialias:
                img = img.convert("L")
            if img.size != (size, size):
                # As in cbfinn/maml data/omniglot_resized/resize_images.py: PIL resize with
                # LANCZOS. For the official 1-bit PNGs Pillow then resamples with NEAREST
                # (it always does for mode "1"), so MAML's 28x28 images are binary.
                # antialias=True converts to grey first, so LANCZOS really applies.
                img = img.resize((size, size), image_mod.Resampling.LANCZOS)
            pixels = np.asarray(img.convert("L"), dtype=np.uint8)
            # MAML inverts (data_generator.py line 118: image = 1.0 - image): strokes
            # become bright on a dark background.
            return 255 - pixels if invert else pixels

        out = alloc("images", (len(listing), size, size), np.uint8)
        decode_into(out, listing, decode)
    chars = [c for c, _, _ in listing]
    characters, counts = np.unique(chars, return_counts=True)
    return {"characters": characters.tolist(), "counts": counts.tolist()}


def _read_split_file(path: Any, label: str) -> list[tuple[str, int]]:
    classes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        match = _SPLIT_LINE.match(line)
        if not match:
            raise CorruptDataError(
                f"{label} line {number}: {line!r} is not 'Alphabet/characterNN/rotDDD' "
                "with DDD in 000, 090, 180, 270."
            )
        classes.append((match.group(1), int(match.group(2)) // 90))
    return classes


def _split_classes(
    scheme: str,
    split: str,
    characters: Sequence[str],
    rotations: bool,
    split_dir: str | os.PathLike | None,
    maml_sizes: tuple[int, int],
) -> list[tuple[str, int]]:
    """The ``(character, quarter_turns)`` classes of a split, in label order."""
    turns = (0, 1, 2, 3) if rotations else (0,)
    if scheme == "maml":
        order = sorted(characters)
        # Sorted first, because the reference shuffles os.listdir() order, which
        # differs between file systems; then the reference's seeded shuffle.
        random.Random(_MAML_SEED).shuffle(order)
        n_train, n_val = maml_sizes
        if len(order) <= n_train + n_val:
            raise ValueError(
                f"the MAML split needs more than {n_train + n_val} characters but only "
                f"{len(order)} were found. Fix: root must hold both images_background and "
                "images_evaluation (all 1,623 characters), or pass maml_sizes=(train, val)."
            )
        bounds = {
            "train": (0, n_train),
            "val": (n_train, n_train + n_val),
            "test": (n_train + n_val, len(order)),
            "trainval": (0, n_train + n_val),
        }[split]
        return [(c, k) for c in order[slice(*bounds)] for k in turns]
    if split_dir is not None:
        path: Any = Path(split_dir) / f"{split}.txt"
        if not path.is_file():
            raise DatasetNotFoundError(f"split file {path} not found (split_dir={split_dir}).")
    else:
        path = resources.files(__package__).joinpath("splits/omniglot/vinyals", f"{split}.txt")
    listed = _read_split_file(path, str(path))
    known = set(characters)
    missing = sorted({c for c, _ in listed if c not in known})
    if missing:
        raise CorruptDataError(
            f"the {scheme} split '{split}' lists {len(missing)} character(s) that are not in "
            f"the data (e.g. {missing[:3]}). Fix: make sure both archives are complete "
            "(remove a partial extraction), or pass split_dir= with split files that "
            "match your data."
        )
    if rotations:
        return [(c, k) for c, k in listed if k in turns]
    return [(c, 0) for c in dict.fromkeys(c for c, _ in listed)]


class Omniglot(ClassDataset):
    """Omniglot characters as classes, with the Vinyals or the MAML split.

    Reads the official archives ``images_background.zip`` and
    ``images_evaluation.zip`` (or their extracted folders) from ``root``, decodes all
    32,460 drawings once into a uint8 cache (memory-mapped afterwards) and serves
    the classes of one split. Each character is a class; with ``rotations`` its
    copies rotated by 90, 180 and 270 degrees are three more classes.

    Schemes:
        * ``"vinyals"``: Vinyals et al. (2016), as published with Prototypical
          Networks: 1,028 / 172 / 423 characters for train / val / test (4,112 /
          688 / 1,692 classes with rotations); ``"trainval"`` is 1,200.
        * ``"maml"``: Finn et al. (2017), following cbfinn/maml: all characters
          sorted, shuffled with ``random.Random(1)``, then 1,100 train, 100 val and
          the remaining 423 test (``"trainval"`` = the paper's 1,200).

    Preprocessing follows cbfinn/maml: resize to ``image_size`` with PIL (binary
    nearest-neighbour for the 1-bit originals, unless ``antialias``), and invert so
    strokes are 1.0 on 0.0.

    Args:
        root: Folder with the archives or extracted folders.
        split: ``"train"``, ``"val"``, ``"test"`` or ``"trainval"``.
        scheme: ``"vinyals"`` or ``"maml"``.
        image_size: Output side length (105 keeps the originals).
        rotations: Add the 90/180/270-degree rotations as extra classes.
        download: Fetch missing archives from GitHub (sha256-verified).
        cache_dir: Where to put the decoded cache; by default next to the data if
            ``root`` is writable, else ``~/.cache/paddlefsl``.
        invert: Make strokes bright (MAML convention).
        antialias: Convert to grey before resizing, for smooth edges.
        split_dir: Folder with custom ``<split>.txt`` files in the Vinyals format.
        maml_sizes: ``(train, val)`` character counts of the MAML scheme.

    Example:
        >>> ds = Omniglot("/data/omniglot", split="train")  # doctest: +SKIP
        >>> ds.num_classes, len(ds), ds[0][0].shape  # doctest: +SKIP
        (4112, 82240, (1, 28, 28))

    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        scheme: str = "vinyals",
        image_size: int = 28,
        rotations: bool = True,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        *,
        invert: bool = True,
        antialias: bool = False,
        split_dir: str | os.PathLike | None = None,
        maml_sizes: tuple[int, int] = _MAML_SIZES,
    ) -> None:
        if scheme not in _SCHEMES:
            raise ValueError(f"unknown Omniglot scheme {scheme!r}; choose one of {_SCHEMES}.")
        if split not in _SPLITS:
            raise ValueError(
                f"unknown split {split!r} for Omniglot; choose one of {_SPLITS} "
                "('trainval' is train + val)."
            )
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
        self.root = Path(root).expanduser()
        self.split, self.scheme = split, scheme
        sources = _sources(self.root, download)
        key = {
            "dataset": "omniglot",
            "image_size": image_size,
            "antialias": antialias,
            "invert": invert,
            "sources": describe_sources(self.root, sources.values()),
        }
        name = f"omniglot-{image_size}px-{'lanczos' if antialias else 'maml'}"
        name += "-inv" if invert else ""
        build, lookup = cache_search_path(self.root, cache_dir, "omniglot")
        arrays, extra, self.cache_dir = load_or_build(
            build,
            name,
            key,
            lambda alloc: _decode_all(sources, image_size, antialias, invert, alloc),
            what="Omniglot",
            lookup=lookup,
        )
        characters, counts = extra["characters"], np.asarray(extra["counts"], dtype=np.int64)
        starts = dict(zip(characters, np.concatenate([[0], np.cumsum(counts)[:-1]]), strict=True))
        sizes = dict(zip(characters, counts, strict=True))
        classes = _split_classes(scheme, split, characters, rotations, split_dir, maml_sizes)
        src = [np.arange(starts[c], starts[c] + sizes[c]) for c, _ in classes]
        labels = np.repeat(np.arange(len(classes)), [len(s) for s in src])
        turns = np.repeat(np.array([k for _, k in classes], dtype=np.int64), [len(s) for s in src])
        images = _RotatedImages(arrays["images"], np.concatenate(src).astype(np.int64), turns)
        names = [f"{c}/rot{90 * k:03d}" for c, k in classes]
        super().__init__(images, labels, class_names=names)
        self.characters = list(dict.fromkeys(c for c, _ in classes))

"""miniImageNet with the Ravi & Larochelle (2017) class split, from common disk layouts."""

from __future__ import annotations

import csv
import os
import pickle
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .base import ClassDataset
from .cache import cache_search_path, describe_sources, load_or_build
from .errors import CorruptDataError, DatasetNotFoundError
from .imaging import decode_into, load_image, require_pillow

__all__ = ["MiniImageNet"]

_SPLITS = ("train", "val", "test")
_LAYOUTS = ("auto", "pickle", "csv", "folders")
_IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")
# learn2learn names the validation pickle after its mode "validation".
_PICKLE_NAMES = {
    "train": ("mini-imagenet-cache-train.pkl",),
    "val": ("mini-imagenet-cache-val.pkl", "mini-imagenet-cache-validation.pkl"),
    "test": ("mini-imagenet-cache-test.pkl",),
}

_WHERE_TO_GET = (
    "miniImageNet has no official download. Build it from ImageNet with the Ravi & "
    "Larochelle split CSVs (https://github.com/twitter/meta-learning-lstm, "
    "data/miniImagenet/*.csv; tools such as yaoyao-liu/mini-imagenet-tools do this), or "
    "use the learn2learn pickles mini-imagenet-cache-{train,validation,test}.pkl. See "
    "docs/data.md."
)


def _layouts_message(root: Path, split: str) -> str:
    return (
        f"miniImageNet split '{split}' not found in {root}. Expected one of: "
        f"(1) images/<file>.jpg with {split}.csv (header 'filename,label'); "
        f"(2) {split}/<wnid>/*.jpg class folders; "
        f"(3) the pickle {' or '.join(_PICKLE_NAMES[split])}. {_WHERE_TO_GET}"
    )


def _detect_layout(root: Path, split: str, layout: str) -> tuple[str, list[Path]]:
    """Return the layout in use and its source files."""
    pickles = [root / n for n in _PICKLE_NAMES[split] if (root / n).is_file()]
    csv_ok = (root / f"{split}.csv").is_file() and (root / "images").is_dir()
    folders_ok = (root / split).is_dir()
    candidates = {
        "pickle": (bool(pickles), pickles[:1]),
        "csv": (csv_ok, [root / f"{split}.csv", root / "images"]),
        "folders": (folders_ok, [root / split]),
    }
    order = ("pickle", "csv", "folders") if layout == "auto" else (layout,)
    for name in order:
        ok, sources = candidates[name]
        if ok:
            return name, sources
    raise DatasetNotFoundError(_layouts_message(root, split))


def _ravi_classes(split: str) -> list[str]:
    path = resources.files(__package__).joinpath("splits", "miniimagenet", "ravi", f"{split}.txt")
    return [w for w in path.read_text().split() if w]


def _read_csv(path: Path) -> list[tuple[str, str]]:
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or [c.strip() for c in rows[0][:2]] != ["filename", "label"]:
        raise CorruptDataError(
            f"{path}: expected the header 'filename,label', got {rows[:1]}. Fix: use the "
            "Ravi & Larochelle split CSVs."
        )
    out = []
    for number, row in enumerate(rows[1:], 2):
        if len(row) < 2 or not row[0] or not row[1]:
            raise CorruptDataError(f"{path} line {number}: expected 'filename,label', got {row}.")
        out.append((row[1].strip(), row[0].strip()))
    return out


def _list_folders(folder: Path, split: str, check_split: bool) -> list[tuple[str, str]]:
    wnids = sorted(d.name for d in folder.iterdir() if d.is_dir())
    if check_split and set(wnids) != set(_ravi_classes(split)):
        raise ValueError(
            f"{folder} holds {len(wnids)} class folders, which are not the "
            f"{len(_ravi_classes(split))} classes of the Ravi & Larochelle '{split}' split "
            "(some copies split each class's images into train/val instead of splitting "
            "classes). Fix: arrange <split>/<wnid>/ by the split CSVs, or pass "
            "check_split=False to use the folders as they are."
        )
    return [
        (wnid, str(p))
        for wnid in wnids
        for p in sorted((folder / wnid).iterdir())
        if p.suffix.lower() in _IMAGE_EXTENSIONS
    ]


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickler that only rebuilds numpy arrays and plain containers.

    A pickle can run arbitrary code on load; the dataset pickles only need these.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("collections", "OrderedDict"),
        ("_codecs", "encode"),
        ("copyreg", "_reconstructor"),
        ("builtins", "object"),
    } | {
        (f"numpy.{core}.{module}", name)
        for core in ("core", "_core")
        for module, name in (
            ("multiarray", "_reconstruct"),
            ("multiarray", "scalar"),
            ("numeric", "_frombuffer"),
        )
    }

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name} from a data pickle")
        return super().find_class(module, name)


def _load_pickle(path: Path) -> tuple[np.ndarray, dict]:
    try:
        with open(path, "rb") as f:
            try:
                data = _ArrayUnpickler(f).load()
            except UnicodeDecodeError:  # written by Python 2
                f.seek(0)
                data = _ArrayUnpickler(f, encoding="latin1").load()
        images, class_dict = data["image_data"], data["class_dict"]
    except (pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError, OSError) as err:
        raise CorruptDataError(
            f"cannot read the miniImageNet pickle {path}: {err!r}. Expected a dict with "
            "'image_data' (uint8 [N, 84, 84, 3]) and 'class_dict' ({wnid: [indices]}). "
            "Fix: re-download the learn2learn pickle, or use another layout."
        ) from err
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[3] != 3 or images.dtype != np.uint8:
        raise CorruptDataError(
            f"{path}: image_data has shape {images.shape} {images.dtype}, expected uint8 "
            "[N, H, W, 3]."
        )
    return images, class_dict


def _build(
    layout: str,
    sources: list[Path],
    split: str,
    size: int,
    check_split: bool,
    alloc: Any,
) -> dict:
    image_mod = require_pillow()

    def fit(img: Any) -> np.ndarray:
        if img.size != (size, size):
            # cbfinn/maml data/miniImagenet/proc_images.py resizes with PIL LANCZOS.
            img = img.resize((size, size), image_mod.Resampling.LANCZOS)
        return np.asarray(img, dtype=np.uint8)

    if layout == "pickle":
        images, class_dict = _load_pickle(sources[0])
        wnids = sorted(class_dict)
        labels = np.full(len(images), -1, dtype=np.int64)
        for label, wnid in enumerate(wnids):
            labels[np.asarray(class_dict[wnid], dtype=np.int64)] = label
        if (labels < 0).any():
            raise CorruptDataError(
                f"{sources[0]}: {(labels < 0).sum()} images belong to no class in class_dict."
            )
        out = alloc("images", (len(images), size, size, 3), np.uint8)
        if images.shape[1:3] == (size, size):
            out[:] = images
        else:
            decode_into(out, images, lambda a: fit(image_mod.fromarray(a)))
        alloc("labels", labels.shape, np.int64)[:] = labels
        return {"classes": wnids, "layout": layout}

    if layout == "csv":
        items = sorted(_read_csv(sources[0]))
        paths = [str(sources[1] / name) for _, name in items]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DatasetNotFoundError(
                f"{len(missing)} of the {len(paths)} images listed in {sources[0]} are missing "
                f"from {sources[1]} (e.g. {missing[:2]}). Fix: put every image of the split "
                "CSVs into images/."
            )
    else:
        items = _list_folders(sources[0], split, check_split)
        paths = [p for _, p in items]
        if not paths:
            raise DatasetNotFoundError(_layouts_message(sources[0].parent, split))
    wnids = sorted({w for w, _ in items})
    index = {w: i for i, w in enumerate(wnids)}
    out = alloc("images", (len(paths), size, size, 3), np.uint8)
    decode_into(out, paths, lambda p: fit(load_image(p, p, mode="RGB")))
    labels = alloc("labels", (len(items),), np.int64)
    labels[:] = [index[w] for w, _ in items]
    return {"classes": wnids, "layout": layout}


class MiniImageNet(ClassDataset):
    """miniImageNet, Ravi & Larochelle split: 64 / 16 / 20 classes of 600 RGB images.

    The layout under ``root`` is detected per split, in this order:

    1. ``mini-imagenet-cache-<split>.pkl`` (learn2learn's pickles; the validation
       one may be named ``...-val.pkl`` or ``...-validation.pkl``): a dict with
       ``image_data`` uint8 ``[N, 84, 84, 3]`` and ``class_dict`` ``{wnid: [indices]}``.
    2. ``images/<file>.jpg`` plus ``<split>.csv`` with header ``filename,label``.
    3. ``<split>/<wnid>/*.jpg`` class folders (checked against the Ravi classes).

    Images are decoded once (resized with PIL LANCZOS when not ``image_size``
    square) into a uint8 cache that is memory-mapped, so the ~800 MB training split
    is not held in RAM.

    Args:
        root: Folder holding one of the layouts.
        split: ``"train"``, ``"val"`` or ``"test"``.
        image_size: Side length of the cached images.
        download: There is no official download; if the data is missing this raises
            an error that says where to get it.
        cache_dir: Where to put the cache; by default next to the data if ``root``
            is writable, else ``~/.cache/paddlefsl``.
        layout: Force ``"pickle"``, ``"csv"`` or ``"folders"`` instead of ``"auto"``.
        check_split: For class folders, require the Ravi class list of the split.

    Example:
        >>> ds = MiniImageNet("/data/miniimagenet", split="test")  # doctest: +SKIP
        >>> ds.num_classes, len(ds), ds[0][0].shape  # doctest: +SKIP
        (20, 12000, (3, 84, 84))

    """

    def __init__(
        self,
        root: str | os.PathLike,
        split: str = "train",
        image_size: int = 84,
        download: bool = False,
        cache_dir: str | os.PathLike | None = None,
        *,
        layout: str = "auto",
        check_split: bool = True,
    ) -> None:
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r} for miniImageNet; choose one of {_SPLITS}.")
        if layout not in _LAYOUTS:
            raise ValueError(f"unknown layout {layout!r}; choose one of {_LAYOUTS}.")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be a positive int, got {image_size!r}.")
        self.root = Path(root).expanduser()
        self.split = split
        if not self.root.is_dir():
            raise DatasetNotFoundError(_layouts_message(self.root, split))
        try:
            self.layout, sources = _detect_layout(self.root, split, layout)
        except DatasetNotFoundError as err:
            if download:
                raise DatasetNotFoundError(f"download=True is not available: {err}") from None
            raise
        key = {
            "dataset": "miniimagenet",
            "split": split,
            "image_size": image_size,
            "layout": self.layout,
            "check_split": check_split,
            "sources": describe_sources(self.root, sources),
        }
        build, lookup = cache_search_path(self.root, cache_dir, "miniimagenet")
        arrays, extra, self.cache_dir = load_or_build(
            build,
            f"miniimagenet-{split}-{image_size}px",
            key,
            lambda alloc: _build(self.layout, sources, split, image_size, check_split, alloc),
            what=f"miniImageNet {split}",
            lookup=lookup,
        )
        super().__init__(arrays["images"], arrays["labels"], class_names=extra["classes"])

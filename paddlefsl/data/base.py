"""Class-indexed datasets: the protocol the task sampler draws from.

A classification dataset for few-shot learning needs three things: the list of
classes, the positions of each class's examples, and a fast way to fetch a batch
of examples. :class:`ClassDataset` provides them over a uint8 image array (which
may be a read-only memory map of a cache file), and :class:`DatasetAdapter` over
any ``paddle.io.Dataset`` that yields ``(x, y)`` pairs.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import paddle

__all__ = ["ClassDataset", "DatasetAdapter", "as_class_dataset"]


def _check_labels(labels: Any, expected_len: int | None = None) -> np.ndarray:
    """Return ``labels`` as a 1-D int64 array, or raise an actionable ValueError."""
    arr = np.asarray(labels)
    if arr.dtype.kind not in "iu":
        first = arr.reshape(-1)[:1].tolist()
        raise ValueError(
            f"labels must be integer class ids, got dtype {arr.dtype} (first value {first}). "
            "Fix: convert integral floats with labels.astype(np.int64), or map class names "
            "to ids first, e.g. ids = {n: i for i, n in enumerate(sorted(set(names)))}."
        )
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D (one id per example), got shape {arr.shape}.")
    if expected_len is not None and len(arr) != expected_len:
        raise ValueError(
            f"got {len(arr)} labels for {expected_len} examples; pass exactly one label "
            "per example."
        )
    return arr.astype(np.int64, copy=False)


def _label_to_int(y: Any, index: int) -> int:
    """Convert one label as returned by a dataset (int, numpy or paddle scalar) to int."""
    if isinstance(y, paddle.Tensor):
        y = y.numpy()
    arr = np.asarray(y)
    if arr.size != 1 or arr.dtype.kind not in "iu":
        raise ValueError(
            f"example {index}: label {y!r} (dtype {arr.dtype}, shape {arr.shape}) is not a "
            "single integer class id. Fix: make the dataset return y as an int (or an "
            "integer array of size 1), or pass labels=... explicitly."
        )
    return int(arr.reshape(()))


class _ClassIndex:
    """Groups example positions by label; shared by the dataset classes."""

    labels: np.ndarray

    def _build_index(self) -> None:
        order = np.argsort(self.labels, kind="stable")
        classes, starts, counts = np.unique(
            self.labels[order], return_index=True, return_counts=True
        )
        self._classes = classes
        self._counts = counts
        self._groups = {
            int(c): order[s : s + n] for c, s, n in zip(classes, starts, counts, strict=True)
        }

    @property
    def classes(self) -> np.ndarray:
        """Sorted array of the distinct labels (int64)."""
        return self._classes

    @property
    def num_classes(self) -> int:
        """Number of distinct labels."""
        return len(self._classes)

    def class_counts(self) -> np.ndarray:
        """Number of examples of each class, aligned with :attr:`classes`."""
        return self._counts

    def indices_of(self, cls: int) -> np.ndarray:
        """Positions (int64, ascending) of the examples whose label is ``cls``."""
        try:
            return self._groups[int(cls)]
        except KeyError:
            raise ValueError(
                f"unknown class {cls!r}; this dataset has {self.num_classes} classes "
                f"(labels {self._classes[:5].tolist()}...)."
            ) from None


class ClassDataset(paddle.io.Dataset, _ClassIndex):
    """Labelled images held in an array, indexed by class.

    Images are stored as uint8 (scaled to [0, 1] on access) or as floats (used as
    they are), with shape ``[N, H, W]`` (grayscale) or ``[N, H, W, C]``. The array
    may be a read-only ``np.memmap``; it is only read in small batches.

    Args:
        images: Array-like of shape ``[N, H, W]`` or ``[N, H, W, C]`` supporting
            integer-array indexing (numpy array, memmap, or a lazy view).
        labels: ``N`` integer class ids.
        class_names: Optional names, one per entry of :attr:`classes` (sorted ids).

    Example:
        >>> import numpy as np
        >>> images = np.zeros((6, 4, 4), dtype=np.uint8)
        >>> ds = ClassDataset(images, [0, 0, 1, 1, 2, 2])
        >>> x, y = ds[2]
        >>> x.shape, x.dtype, y
        ((1, 4, 4), dtype('float32'), 1)
        >>> ds.indices_of(2).tolist()
        [4, 5]

    """

    def __init__(self, images: Any, labels: Any, class_names: Sequence[str] | None = None) -> None:
        super().__init__()
        shape = tuple(images.shape)
        if len(shape) not in (3, 4):
            raise ValueError(
                f"images must have shape [N, H, W] or [N, H, W, C], got {shape}. "
                "Fix: add or remove axes so that each example is one H x W (x C) image."
            )
        if len(shape) == 4 and shape[3] > 4 and shape[1] <= 4:
            raise ValueError(
                f"images look channels-first {shape}; ClassDataset expects channels-last "
                "[N, H, W, C]. Fix: pass images.transpose(0, 2, 3, 1)."
            )
        self.images = images
        self.labels = _check_labels(labels, shape[0])
        self._build_index()
        if class_names is not None and len(class_names) != self.num_classes:
            raise ValueError(f"got {len(class_names)} class names for {self.num_classes} classes.")
        self.class_names = list(class_names) if class_names is not None else None

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """Return ``(image, label)``: float32 ``[C, H, W]`` in [0, 1] and an int."""
        return self.get_images([index])[0], int(self.labels[index])

    def get_images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Fetch several images at once as float32 ``[n, C, H, W]``.

        Example:
            >>> import numpy as np
            >>> ds = ClassDataset(np.full((3, 2, 2, 3), 255, np.uint8), [0, 1, 1])
            >>> ds.get_images([2, 0]).shape
            (2, 3, 2, 2)

        """
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        # Reading a memory map in ascending order keeps disk access sequential.
        order = np.argsort(idx, kind="stable")
        raw = np.asarray(self.images[idx[order]])
        batch = np.empty_like(raw)
        batch[order] = raw
        chw = batch[:, None] if batch.ndim == 3 else batch.transpose(0, 3, 1, 2)
        # One pass from the (strided) uint8 view into contiguous float32.
        out = np.empty(chw.shape, dtype=np.float32)
        if batch.dtype == np.uint8:
            np.divide(chw, np.float32(255.0), out=out, dtype=np.float32)
        else:
            out[...] = chw
        return out


class DatasetAdapter(paddle.io.Dataset, _ClassIndex):
    """View any ``paddle.io.Dataset`` of ``(x, y)`` pairs as a class-indexed dataset.

    The labels are read once at construction (one ``dataset[i]`` call per example)
    unless given as ``labels``. ``x`` is used as the dataset returns it, converted
    to a float32 numpy array; it should already be ``[C, H, W]`` for images.

    Args:
        dataset: Map-style dataset returning ``(x, y)`` with an integer ``y``.
        labels: Optional precomputed labels, one per example, to skip the scan.

    Example:
        >>> import numpy as np
        >>> pairs = [(np.zeros((1, 2, 2), np.float32), i % 2) for i in range(4)]
        >>> ds = DatasetAdapter(pairs)
        >>> ds.classes.tolist(), ds.get_images([0, 1]).shape
        ([0, 1], (2, 1, 2, 2))

    """

    def __init__(self, dataset: Any, labels: Any = None) -> None:
        super().__init__()
        self.dataset = dataset
        if labels is None:
            labels = [_label_to_int(dataset[i][1], i) for i in range(len(dataset))]
            labels = np.asarray(labels, dtype=np.int64)
        self.labels = _check_labels(labels, len(dataset))
        self._build_index()

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[np.ndarray, int]:
        """Return ``(x, label)`` with ``x`` as a float32 array."""
        x, _ = self.dataset[index]
        return self._to_array(x), int(self.labels[index])

    @staticmethod
    def _to_array(x: Any) -> np.ndarray:
        if isinstance(x, paddle.Tensor):
            x = x.numpy()
        return np.asarray(x, dtype=np.float32)

    def get_images(self, indices: Sequence[int] | np.ndarray) -> np.ndarray:
        """Fetch several examples as one float32 array ``[n, ...]``."""
        return np.stack([self._to_array(self.dataset[int(i)][0]) for i in indices])


def as_class_dataset(data: Any) -> Any:
    """Wrap ``data`` so that it has ``classes``, ``indices_of`` and ``get_images``.

    Accepts a :class:`ClassDataset` or anything with that interface (returned as
    is), an ``(images, labels)`` pair of arrays, or a map-style dataset of
    ``(x, y)`` pairs (wrapped in :class:`DatasetAdapter`).

    Example:
        >>> import numpy as np
        >>> ds = as_class_dataset((np.zeros((4, 3, 3), np.uint8), np.array([0, 0, 1, 1])))
        >>> type(ds).__name__, ds.num_classes
        ('ClassDataset', 2)

    """
    if all(hasattr(data, a) for a in ("classes", "indices_of", "get_images")):
        return data
    if isinstance(data, tuple) and len(data) == 2:
        return ClassDataset(data[0], data[1])
    if hasattr(data, "__getitem__") and hasattr(data, "__len__"):
        return DatasetAdapter(data)
    raise TypeError(
        f"cannot sample tasks from {type(data).__name__}; pass a ClassDataset, an "
        "(images, labels) tuple of arrays, or a paddle.io.Dataset of (x, y) pairs."
    )

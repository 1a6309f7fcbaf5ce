"""Image decoding helpers. Pillow is imported lazily, only when images are decoded."""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from .errors import CorruptDataError

__all__ = ["decode_into", "load_image", "require_pillow"]


def require_pillow() -> Any:
    """Return the ``PIL.Image`` module, or raise an ImportError that says how to get it.

    Example:
        >>> require_pillow().__name__
        'PIL.Image'

    """
    try:
        from PIL import Image
    except ImportError as err:  # pragma: no cover - Pillow is installed in CI
        raise ImportError(
            "decoding dataset images needs Pillow, which is not installed. "
            "Fix: pip install pillow (or pip install 'paddlefsl[data]'). Already-built "
            "caches load without it."
        ) from err
    return Image


def load_image(source: Any, name: str, mode: str | None = None) -> Any:
    """Open and fully decode an image from a path or file object.

    Args:
        source: Path or binary file object.
        name: Description used in error messages (e.g. the archive member).
        mode: Convert to this PIL mode (``"L"``, ``"RGB"``) if given.

    Raises:
        CorruptDataError: If the file is not a readable image.

    Example:
        >>> import io
        >>> from PIL import Image
        >>> buf = io.BytesIO(); Image.new("1", (5, 5), 1).save(buf, "PNG"); _ = buf.seek(0)
        >>> load_image(buf, "demo.png").size
        (5, 5)

    """
    image_mod = require_pillow()
    try:
        img = image_mod.open(source)
        img.load()  # decode now, so truncation errors surface here
        if mode is not None and img.mode != mode:
            img = img.convert(mode)
    except (OSError, ValueError, SyntaxError) as err:
        raise CorruptDataError(
            f"cannot decode image {name}: {err}. Fix: the file is damaged or not an "
            "image; re-extract or re-download the dataset."
        ) from err
    return img


def decode_into(
    out: np.ndarray,
    items: Sequence[Any],
    decode: Callable[[Any], np.ndarray],
    workers: int | None = None,
) -> None:
    """Fill ``out[i] = decode(items[i])`` for all items, using a few threads.

    Pillow releases the GIL while decoding, so threads give a real speed-up on
    JPEG-heavy datasets; results land by index, so the order never depends on
    the thread count.

    Example:
        >>> import numpy as np
        >>> out = np.zeros((3, 2), np.uint8)
        >>> decode_into(out, [1, 2, 3], lambda v: np.full(2, v, np.uint8), workers=2)
        >>> out[:, 0].tolist()
        [1, 2, 3]

    """
    workers = workers or min(4, os.cpu_count() or 1)

    def run(start: int, stop: int) -> None:
        for i in range(start, stop):
            out[i] = decode(items[i])

    n = len(items)
    if workers <= 1 or n < 256:
        run(0, n)
        return
    chunk = 256
    with ThreadPoolExecutor(workers, thread_name_prefix="paddlefsl-decode") as pool:
        futures = [pool.submit(run, s, min(s + chunk, n)) for s in range(0, n, chunk)]
        try:
            for f in futures:
                f.result()  # re-raises the first decoding error here
        finally:
            for f in futures:
                f.cancel()  # stop early on error or Ctrl-C instead of decoding the rest

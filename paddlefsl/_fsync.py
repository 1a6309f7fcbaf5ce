"""fsync of files and folders, shared by the dataset caches and the checkpoints."""

from __future__ import annotations

import os


def fsync_path(path: str | os.PathLike, directory: bool = False) -> None:
    """Flush ``path`` (a file, or with ``directory=True`` a folder's entries) to disk.

    Best effort: where a folder cannot be opened (Windows, some filesystems) the preceding
    ``os.replace`` is still atomic, only its durability is not forced.
    """
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    try:
        fd = os.open(path, flags)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
